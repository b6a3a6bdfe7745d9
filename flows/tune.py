"""Label-free hyper-parameter search of one training job with Ray Tune (params.yaml ``tune``).

Every combination of ``tune.space`` (knobs of the method) is one Tune trial; a trial runs the ordinary
Ray Train job (flows/train.py) with those knobs, on the same cluster, under its own run key, so a finished
trial is reused and a trial that loses a DDP rank or a node resumes from its last checkpoint
(``train.max_failures``). Tune retries a trial whose driver process dies (``tune.max_failures``): the
dead driver's Train run leaves its placement group holding the run's CPUs (Ray keeps a group whose creating
actor died while the job lives on, and Ray Train's own cleaner asks the state API, which needs the Ray
dashboard that adaptad's local cluster does not start), so each trial frees such orphaned groups while it
runs (:func:`free_orphaned_placement_groups`) and the retry gets its CPUs.

Trials are packed as the cluster's resources allow (each asks for its DDP ranks;
``tune.max_concurrent_trials`` at once). The trial whose validation signal at its kept epoch is best
(components/selection.py: held-out normal images and synthetic anomalies, never the test split) is copied
to the job's output with the list of trials and the choice in its summary; only it is evaluated and
registered downstream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from components.atomic import replace_dir
from components.selection import choose_trial, trial_signal
from flows.params import Tune
from flows.train import TrainJob, TrainResult, storage_uri, train

TRIAL_MEMORY = 2**20  # bytes of Ray's memory resource a trial's driver reserves


def trial_key(run_key: str, knobs: dict[str, Any]) -> str:
    """The run key of a trial: the job's key and the trial's knobs."""
    payload = json.dumps({"job": run_key, "knobs": knobs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def trial_jobs(job: TrainJob, tune: Tune) -> list[tuple[dict[str, Any], TrainJob]]:
    """One training job per combination of the candidate values: the job's spec with the trial's knobs."""
    out = []
    for knobs in tune.trials():
        spec = dataclasses.replace(job.spec, params={**job.spec.params, **knobs})
        trial = dataclasses.replace(
            job, run_key=trial_key(job.run_key, knobs), spec=spec, storage=storage_uri(job.storage)
        )
        out.append((knobs, trial))
    return out


def free_orphaned_placement_groups() -> int:
    """Remove this Ray job's placement groups whose creating actor is dead (not detached, still placed or
    pending); returns how many. Ray frees such a group only when its job ends too, so a Train run whose
    controller died with its Tune trial's driver would hold its CPUs for the rest of the job. A group
    created by a driver (Tune's trial groups) has no creating actor and is never touched. Reads the GCS
    placement group table through Ray's private accessor, as ``ray.util.placement_group_table`` does,
    because the public view leaves the creator out."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    live = {gcs_pb2.PlacementGroupTableData.CREATED, gcs_pb2.PlacementGroupTableData.PENDING}
    live.add(gcs_pb2.PlacementGroupTableData.RESCHEDULING)
    job = bytes.fromhex(ray.get_runtime_context().get_job_id())
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = gcs_pb2.PlacementGroupTableData.FromString(raw)
        creator = group.creator_actor_id  # empty or nil (all 0xff): created by a driver
        by_actor = len(creator) == ray.ActorID.size() and not ray.ActorID(creator).is_nil()
        ours = group.creator_job_id == job  # this job's only: a shared cluster's other jobs are theirs
        if ours and by_actor and group.creator_actor_dead and not group.is_detached and group.state in live:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
            removed += 1
    return removed


def _free_orphans_until(done: threading.Event, every: float = 2.0) -> None:
    """Free orphaned placement groups every ``every`` seconds until ``done`` (a trial's watcher thread: a
    retry's Train run waits for the CPUs that its dead predecessor's group may still hold)."""
    while not done.wait(every):
        with contextlib.suppress(Exception):  # a failed sweep is tried again; the trial is what matters
            free_orphaned_placement_groups()


def _run_trial(config: dict[str, Any], trials: list[dict[str, Any]]) -> None:
    """A Tune trial (in a Ray process): train job ``config["trial"]``, report its validation signal."""
    import ray.tune

    trial = trials[config["trial"]]
    job, output, metric = trial["job"], Path(trial["output"]), trial["metric"]
    done = threading.Event()
    threading.Thread(target=_free_orphans_until, args=(done,), daemon=True).start()
    try:
        summary = train(job, output).summary
    finally:
        done.set()
    signal = trial_signal(summary, metric)
    ray.tune.report({"signal": float("nan") if signal is None else signal, "epochs": summary["epochs"]})


def tune_and_train(job: TrainJob, tune: Tune, output: Path) -> TrainResult:
    """Run every trial of ``tune.space`` as a Ray Tune trial; copy the chosen trial's weights to ``output``.

    ``output`` appears atomically, as :func:`flows.train.train`'s (networks + summary.json), its summary
    the chosen trial's with ``tune``: every trial's knobs, run key, signal, kept epoch and seconds, and the
    choice. Trial outputs stay in ``output``'s parent under ``trials/<trial key>/``.
    """
    import ray.tune

    from flows.train import ensure_ray

    output = Path(output).resolve()
    if (output / "summary.json").is_file():
        return TrainResult(output, json.loads((output / "summary.json").read_text()))
    trials = trial_jobs(job, tune)
    folders = [output.parent / "trials" / trial.run_key for _, trial in trials]
    ensure_ray()
    configs = [
        {"job": trial, "output": str(folder), "metric": tune.metric}
        for (_, trial), folder in zip(trials, folders, strict=True)
    ]
    tuner = ray.tune.Tuner(
        # a trial only drives its Train run, whose DDP ranks ask for the CPUs (and GPUs): a token of memory
        # (Ray refuses an empty request) keeps the trial from holding a CPU its ranks then wait for
        ray.tune.with_resources(
            ray.tune.with_parameters(_run_trial, trials=configs), {"memory": TRIAL_MEMORY}
        ),
        param_space={"trial": ray.tune.grid_search(list(range(len(configs))))},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=tune.max_concurrent_trials),
        run_config=ray.tune.RunConfig(
            name=f"{job.run_key}-tune",
            storage_path=storage_uri(job.storage),
            failure_config=ray.tune.FailureConfig(max_failures=tune.max_failures),
            verbose=0,
        ),
    )
    results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"tune {job.run_key}: {len(results.errors)} trial(s) failed: {results.errors[0]}")
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in folders]
    signals = [trial_signal(s, tune.metric) for s in summaries]
    chosen = choose_trial(signals, tune.mode)
    record = {
        "metric": tune.metric or summaries[chosen].get("selection_signal"),
        "mode": tune.mode,
        "chosen": chosen,
        "knobs": trials[chosen][0],
        "trials": [
            {
                "knobs": knobs,
                "run_key": trial.run_key,
                "signal": signal,
                "kept_epoch": s.get("kept_epoch"),
                "epochs": s["epochs"],
                "collapsed": s.get("collapsed"),
                "seconds": s["seconds"],
            }
            for (knobs, trial), s, signal in zip(trials, summaries, signals, strict=True)
        ],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        shutil.copytree(folders[chosen], tmp, dirs_exist_ok=True)
        summary = summaries[chosen] | {"tune": record}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TrainResult(output, summary)
