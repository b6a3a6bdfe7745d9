"""The Prefect ``grid`` flow: a benchmark grid — datasets × categories × methods × backbones × image sizes
× seeds — run as jobs on the Ray cluster, and its leaderboard.

**Jobs.** params.yaml's ``grid`` section (flows/params.py ``Grid``) expands into jobs. A job is a Params
variant (dataset, method, backbone, image size, seed; everything else as in params.yaml) and one category;
its run key is the one the pipeline computes (flows/pipeline.py ``category_key``), and its run folder is
``<grid.runs_dir>/<run key>/`` in the pipeline's format. A finished job is found by its run key and never
recomputed (set ``grid.runs_dir`` to ``pipeline.runs_dir`` to share run folders with the pipeline). A
method with a ``seed`` knob gets the job's seed unless params.yaml sets the knob. ``grid.adapted`` adds
jobs of frozen methods on the backbones fine-tuned methods adapted (``adapted_by``; named
``<adapter>+<method>``): their training job is the adapter's, shared by run key with its own jobs.

**Scheduling.** At most ``grid.concurrency`` jobs are in flight, each a Prefect task. A job trains with
the pipeline's ``train_task`` (a TorchTrainer, ScalingConfig from ``train``: ``use_gpu: auto`` gives every
worker a GPU; dataset-scope methods such as ``topology`` train once per dataset, shared by its categories)
and is evaluated as a Ray task asking for ``grid.cpus_per_job`` CPUs (default ``train.num_workers ×
train.cpus_per_worker``) and — when the cluster has GPUs and ``evaluate.use_gpu`` allows — one GPU. Ray
therefore packs GPU jobs one per GPU and CPU jobs within the cores, and queues the rest. Every evaluation
runs in a fresh worker process (``max_calls=1``), so the peak memory it records is its own.
A lost job (its worker killed, a node gone, bad data) is retried by Prefect (``pipeline.retries``) while
the others go on; the flow then writes the leaderboard of the finished jobs and ends failed, naming every
job that still fails.

**Outputs.** ``<grid.output>/leaderboard.md``, ``leaderboard.parquet`` (per dataset, category and variant:
mean ± std over seeds), ``jobs.parquet`` (one row per job) and ``heatmaps/<dataset>__<category>.png``
(every method on the same test images); DVC metrics (``grid.metrics_file``) and plots
(``grid.plots_dir``); a Prefect markdown artifact; and an MLflow parent run in the experiment
``adaptad-grid`` (tag ``grid_key``: a hash of the jobs' run keys) whose children — one per job, logged once
per grid by run key — carry the tag ``mlflow.parentRunId``. The grid never registers model versions nor
moves ``challenger``: that stays the pipeline's job.

**Cost estimate** (``adaptad grid --dry-run``, :func:`estimate`): per job, seconds =
``SETUP_SECONDS + train + fit + predict`` with ``c = BACKBONE_SECONDS[backbone] × (image_size / 224)² /
cpus`` the seconds per image on ``cpus`` cores: ``fit = train images × c × FIT_FACTOR[method]``,
``predict = test images × c × PREDICT_FACTOR[method]``, ``train = TRAIN_SETUP_SECONDS + epochs × training
images × 3c × TRAIN_FACTOR[method] × cpus / train.num_workers`` (a dataset-wide training counted once, with
its first category). Where finished runs of the same (method, backbone, image size) exist in
``grid.runs_dir``, their measured median seconds per image replace the model's
(``benchmarks/calibrate_grid_costs.py`` prints the factors that finished runs imply).
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import os
import shutil
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from components.data import Sample
from components.methods import METHODS
from flows.decide import check_decision, decide_in_ray_task, read_decision
from flows.evaluate import read_run
from flows.params import (
    Params,
    ParamsError,
    adapted_name,
    check_method,
    code_version,
    git_commit,
    load_params,
    run_key,
)
from flows.pipeline import (
    WorkerCodeError,
    _reason,
    category_key,
    dataset_scope,
    dataset_version,
    decision_folder,
    evaluate_remotely,
    load_category_samples,
    on_adapted_backbone,
    remote_call,
    run_bounded,
    start_ray,
    train_task,
    trainer,
    training_key,
    trains,
    tuned,
)
from flows.pipeline import (
    category_job as make_category_job,
)

# --- the cost model (module docstring) ------------------------------------------------------------------
SETUP_SECONDS = 8.0  # Ray worker start, imports, backbone + weights
TRAIN_SETUP_SECONDS = 40.0  # a Ray Train job's start and teardown + the method's one-time set-up (demo)
# Seconds per image on one CPU core at 224 px (decode, resize, forward), and per-method factors (units of
# c, see the module docstring) calibrated on the evidence grid's 30 industrial jobs (192 px) and 10
# Fashion-MNIST DN2 jobs (64 px) on 2 cores with OMP_WAIT_POLICY=PASSIVE (benchmarks/calibrate_grid_costs.py;
# topology's training per image of the whole dataset; panda_oe's training stops when it diverges).
# Measured rates of finished runs replace them.
BACKBONE_SECONDS = {
    "tf_efficientnet_lite0": 0.08,
    "tf_efficientnet_lite1": 0.12,
    "tf_efficientnet_lite2": 0.16,
    "mobilenetv2_100": 0.07,
}
DEFAULT_BACKBONE_SECONDS = 0.25
FIT_FACTOR = {
    "dn2": 0.8, "spade": 0.55, "patchcore": 0.85, "gaussian": 0.6, "padim": 1.4, "gaussian_ft": 0.8,
    "panda": 0.55, "panda_oe": 0.55, "topology": 0.85,
}  # fmt: skip
PREDICT_FACTOR = {
    "dn2": 0.95, "spade": 4.4, "patchcore": 0.6, "gaussian": 0.5, "padim": 0.95, "gaussian_ft": 0.8,
    "panda": 2.8, "panda_oe": 2.8, "topology": 4.3, "recontrast": 1.6,
}  # fmt: skip
TRAIN_FACTOR = {"panda": 0.7, "panda_oe": 2.4, "gaussian_ft": 0.8, "topology": 2.2, "recontrast": 1.2}
GRID_EXPERIMENT = "grid"  # the MLflow experiment adaptad-grid


@dataclass(frozen=True)
class GridJob:
    """One job of the grid: a variant of params.yaml and a category, named by its run key."""

    dataset: str
    category: str
    method: str
    backbone: str
    image_size: int
    seed: int
    run_key: str
    shared_key: str | None  # the dataset-wide training job of a dataset-scope method (or adapter)
    train_images: int
    test_images: int
    epochs: int
    training_images: int = 0  # images its training job sees (every category's for a dataset-wide job)
    adapted_by: str | None = None  # the fine-tuned method whose adapted backbone this frozen method uses
    adapter_key: str | None = None  # that method's per-category training job (None when dataset-wide)

    @property
    def name(self) -> str:
        """The method as the leaderboard names it: ``<adapter>+<method>`` on an adapted backbone."""
        return adapted_name(self.method, self.adapted_by)

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.category}/{self.name}/{self.backbone}@{self.image_size}/seed{self.seed}"

    @property
    def training_key(self) -> str:
        """The run key of the training job whose folder holds this job's trained weights."""
        return self.shared_key or self.adapter_key or self.run_key

    @property
    def variant(self) -> tuple[str, str, str, int, int, str | None]:
        return (self.dataset, self.method, self.backbone, self.image_size, self.seed, self.adapted_by)


@dataclass
class Plan:
    """The expanded grid: jobs, their Params variants and every dataset's samples and data versions."""

    params: Params
    jobs: list[GridJob]
    variants: dict[tuple[str, str, str, int, int, str | None], Params]
    samples: dict[str, dict[str, tuple[list[Sample], str]]]
    grid_key: str
    code: str = ""
    runs_dir: Path = field(default_factory=Path)


def _knob_default(method: str, name: str) -> Any:
    for klass in METHODS[method].__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            p = inspect.signature(init).parameters.get(name)
            if p is not None and p.default is not p.empty:
                return p.default
    return inspect.Parameter.empty


def variant_params(
    params: Params,
    dataset: str,
    method: str,
    backbone: str,
    size: int,
    seed: int,
    adapted_by: str | None = None,
) -> Params:
    """params.yaml with this job's dataset, method (on ``adapted_by``'s backbone), backbone, image size and
    seed (validated again)."""
    raw = params.model_dump()
    raw.update(dataset=dataset, method=method, backbone=backbone, image_size=size, seed=seed)
    raw.update(adapted_by=adapted_by)
    raw["pipeline"]["runs_dir"] = params.grid.runs_dir
    for name in filter(None, (method, adapted_by)):
        knobs = dict(raw["methods"].get(name, {}))
        default = _knob_default(name, "seed")
        if default is not inspect.Parameter.empty and "seed" not in knobs and seed != default:
            knobs["seed"] = seed  # the method's own randomness (coresets, channel subsets) follows the seed
            raw["methods"][name] = knobs
    return Params.model_validate(raw)


def _epochs(variant: Params, training_images: int) -> int:
    """A job's training epochs; with ``steps`` set (ReContrast's unit), the whole epochs that hold them —
    each DDP rank takes 1/num_workers of the fit images (those left after the validation slice), in full
    batches only when there are more fit images than one batch (flows/train.py's ``drop_last``)."""
    if not trains(variant):
        return 0
    knobs = variant.method_params()
    if knobs.get("steps"):
        t = variant.train
        fit = training_images - round(t.val_fraction * training_images)
        per_rank = math.ceil(fit / t.num_workers)
        per_epoch = per_rank // t.batch_size if fit > t.batch_size else math.ceil(per_rank / t.batch_size)
        return math.ceil(knobs["steps"] / max(per_epoch, 1))
    return int(knobs.get("epochs", _knob_default(variant.method, "epochs")))


def expand(params: Params, path: str | os.PathLike = "params.yaml", check: bool = True) -> Plan:
    """Every job of the grid with its run key. Raises ParamsError / DataError on bad input.

    With ``check`` every (method, backbone, image size) is built once on the CPU with random weights
    (flows/params.py ``check_method``), so a bad knob fails here, before anything runs.
    """
    grid = params.grid
    if grid is None:
        raise ParamsError(f"{path}: grid: no grid section (see the grid section of the repo's params.yaml)")
    try:
        params.check_grid()
    except ValueError as err:
        raise ParamsError(f"{path}: {err}") from None
    backbones = grid.backbones or [params.backbone]
    sizes = grid.image_sizes or [params.image_size]
    seeds = grid.seeds or [params.seed]
    # (method, adapter): every method as it is, then the frozen ones on adapted backbones (grid.adapted)
    entries = [(m, None) for m in grid.methods] + grid.adapted_pairs()
    if check:
        checked = set()
        for (method, adapter), backbone, size in itertools.product(entries, backbones, sizes):
            if (method, adapter, backbone, size) not in checked:
                checked.add((method, adapter, backbone, size))
                v = variant_params(params, grid.datasets[0], method, backbone, size, seeds[0], adapter)
                check_method(v, path)
    code = code_version()
    jobs, variants, samples = [], {}, {}
    for dataset in grid.datasets:
        samples[dataset] = load_category_samples(params.model_copy(update={"dataset": dataset}))
        categories = grid.categories.get(dataset) or params.datasets[dataset].categories
        for (method, adapter), backbone, size, seed in itertools.product(entries, backbones, sizes, seeds):
            v = variant_params(params, dataset, method, backbone, size, seed, adapter)
            variants[(dataset, method, backbone, size, seed, adapter)] = v
            fitter = trainer(v)  # the job's training: its own method's, or the adapter's
            shared = None
            if dataset_scope(fitter):
                shared = run_key(fitter, "dataset:" + dataset, dataset_version(samples[dataset]), code)
            for category in categories:
                rows, version = samples[dataset][category]
                adapter_key = None if shared else training_key(v, category, version, code, None)
                training_images = sum(
                    s.split == "train"
                    for c in (samples[dataset] if shared else [category])
                    for s in samples[dataset][c][0]
                )
                jobs.append(
                    GridJob(
                        dataset=dataset,
                        category=category,
                        method=method,
                        backbone=backbone,
                        image_size=size,
                        seed=seed,
                        run_key=category_key(v, category, version, code, shared or adapter_key),
                        shared_key=shared,
                        train_images=sum(s.split == "train" for s in rows),
                        test_images=sum(s.split == "test" for s in rows),
                        epochs=_epochs(fitter, training_images),
                        training_images=training_images,
                        adapted_by=adapter,
                        adapter_key=adapter_key,
                    )
                )
    grid_key = hashlib.sha256("\n".join(sorted(j.run_key for j in jobs)).encode()).hexdigest()[:16]
    return Plan(params, jobs, variants, samples, grid_key, code, Path(grid.runs_dir))


# --- status and cost -------------------------------------------------------------------------------------
def job_done(plan: Plan, job: GridJob) -> bool:
    return (plan.runs_dir / job.run_key / "evaluation" / "metrics.json").is_file()


def _trained(plan: Plan, job: GridJob) -> bool:
    return (plan.runs_dir / job.training_key / "trained" / "summary.json").is_file()


def _measured_rates(runs_dir: Path) -> dict[tuple[str, str, int], dict[str, float]]:
    """Median seconds per image of the finished runs under ``runs_dir``, per (method, backbone, size)."""
    samples: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    for path in runs_dir.glob("*/evaluation/metrics.json") if runs_dir.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            spec, m = record["spec"], record["metrics"]
            key = (spec["method"], spec["backbone"], int(spec["image_size"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        rates = samples.setdefault(key, {"fit": [], "predict": [], "train": []})
        if m.get("train_images") and m.get("fit_seconds") is not None:
            rates["fit"].append(m["fit_seconds"] / m["train_images"])
        if m.get("test_images") and m.get("predict_seconds") is not None:
            rates["predict"].append(m["predict_seconds"] / m["test_images"])
        if m.get("train_images") and m.get("epochs"):
            rates["train"].append(m.get("train_seconds", 0.0) / (m["epochs"] * m["train_images"]))
    return {k: {n: statistics.median(v) for n, v in r.items() if v} for k, r in samples.items()}


def seconds_per_image(backbone: str, image_size: int, cpus: int) -> float:
    """The cost model's ``c``: seconds per image of ``backbone`` at ``image_size`` on ``cpus`` cores."""
    return BACKBONE_SECONDS.get(backbone, DEFAULT_BACKBONE_SECONDS) * (image_size / 224) ** 2 / cpus


def estimate(plan: Plan, job: GridJob, rates: dict | None = None, training: bool = True) -> tuple[float, str]:
    """Estimated seconds to run ``job`` and where the figure comes from (``model`` or ``measured``).

    ``training=False`` leaves out the training (a dataset-wide job counted with another category).
    """
    v = plan.variants[job.variant]
    cpus = plan.params.grid.cpus_per_job or v.train.num_workers * v.train.cpus_per_worker
    c = seconds_per_image(job.backbone, job.image_size, cpus)
    fit = job.train_images * c * FIT_FACTOR.get(job.method, 1.0)
    predict = job.test_images * c * PREDICT_FACTOR.get(job.method, 1.0)
    per_epoch = 3 * c * TRAIN_FACTOR.get(job.adapted_by or job.method, 1.0) * cpus / v.train.num_workers
    measured = (rates or {}).get((job.method, job.backbone, job.image_size), {})
    fit = job.train_images * measured["fit"] if "fit" in measured else fit
    predict = job.test_images * measured["predict"] if "predict" in measured else predict
    per_epoch = measured.get("train", per_epoch)
    train = 0.0
    if training and job.epochs and not _trained(plan, job):
        train = job.epochs * job.training_images * per_epoch + ("train" not in measured) * TRAIN_SETUP_SECONDS
    return SETUP_SECONDS + train + fit + predict, "measured" if measured else "model"


def dry_run(plan: Plan) -> str:
    """Every job with its run key, whether it is done, and its estimated cost; nothing runs."""
    rates = _measured_rates(plan.runs_dir)
    rows, total, todo, trained_keys = [], 0.0, 0, set()
    for job in plan.jobs:
        if job_done(plan, job):
            status, cost, source = "done", 0.0, "-"
        else:
            status = "trained" if _trained(plan, job) else "todo"
            # a training job that several jobs share (dataset-wide; an adapter's) is counted once
            first = job.training_key not in trained_keys
            cost, source = estimate(plan, job, rates, training=first)
            trained_keys.add(job.training_key)
            total, todo = total + cost, todo + 1
        rows.append(
            (
                job.dataset,
                job.category,
                job.name,
                job.backbone,
                str(job.image_size),
                str(job.seed),
                job.run_key,
                status,
                "-" if status == "done" else f"{cost:.0f}",
                source,
            )
        )
    head = (
        "dataset",
        "category",
        "method",
        "backbone",
        "size",
        "seed",
        "run key",
        "status",
        "est. s",
        "from",
    )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    grid = plan.params.grid
    lines = [fmt(head), *(fmt(r) for r in rows)]
    lines.append(
        f"{len(plan.jobs)} jobs: {len(plan.jobs) - todo} done, {todo} to run; estimated {total:.0f} s of "
        f"compute, about {total / min(grid.concurrency, max(todo, 1)):.0f} s wall at concurrency "
        f"{grid.concurrency} (CPU model, see flows/grid.py); grid key {plan.grid_key}"
    )
    return "\n".join(lines)


# --- MLflow: a parent run per grid, a child per job -----------------------------------------------------
_MLFLOW_LOCK = threading.Lock()


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def parent_run(plan: Plan, tracking_uri: str) -> tuple[str, str, str]:
    """(experiment id, run id, status) of the grid's parent run, created the first time."""
    from flows.tracking import experiment_id, flatten, use_tracking

    with _MLFLOW_LOCK:
        use_tracking(tracking_uri)
        client = _client()
        experiment = experiment_id(GRID_EXPERIMENT, plan.params.mlflow.artifact_root)
        found = client.search_runs(
            [experiment],
            f"tags.grid_key = '{plan.grid_key}' and tags.`adaptad.grid` = 'parent'",
            max_results=1,
        )
        if found:
            return experiment, found[0].info.run_id, found[0].info.status
        grid = plan.params.grid
        run = client.create_run(
            experiment,
            run_name=f"grid {'+'.join(grid.datasets)} · {len(plan.jobs)} jobs",
            tags={
                "grid_key": plan.grid_key,
                "adaptad.grid": "parent",
                "git_commit": git_commit(),
                "code_version": plan.code,
            },
        )
        from mlflow.entities import Param

        values = flatten(
            grid.model_dump(exclude={"output", "metrics_file", "plots_dir", "runs_dir"}), "grid."
        )
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in values.items()])
        return experiment, run.info.run_id, run.info.status


def log_job(
    experiment: str, parent: str, grid_key: str, job: GridJob, variant: Params, run_dir: Path
) -> tuple[str, bool]:
    """The job's child run (logged once per grid and run key): (run id, whether it was new)."""
    from mlflow.entities import Metric, Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from flows.tracking import run_params

    with _MLFLOW_LOCK:
        client = _client()
        found = client.search_runs(
            [experiment],
            f"tags.grid_key = '{grid_key}' and tags.run_key = '{job.run_key}' "
            "and attributes.status = 'FINISHED'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id, False
        record = json.loads((run_dir / "metrics.json").read_text())
        tags = {
            MLFLOW_PARENT_RUN_ID: parent,
            "adaptad.grid": "job",
            "grid_key": grid_key,
            "run_key": job.run_key,
            "data_version": str(record.get("data_version")),
            **{
                k: str(v)
                for k, v in asdict(job).items()
                if k in ("dataset", "category", "method", "backbone") or (k == "adapted_by" and v)
            },
            "image_size": str(job.image_size),
            "seed": str(job.seed),
        }
        if record.get("collapsed"):
            tags["collapsed"] = "true"
        run = client.create_run(experiment, run_name=job.label, tags=tags)
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            values = record.get("metrics", {})
            metrics = [
                Metric(k, float(v), now, 0)
                for k, v in values.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and abs(float(v)) < float("inf")
            ]
            params = [Param(k, v) for k, v in run_params(record, variant).items()]
            for i in range(0, max(len(params), len(metrics)), 100):
                client.log_batch(run_id, metrics=metrics[i : i + 100], params=params[i : i + 100])
            for name in ("heatmaps.png", "curves.png", "metrics.json", "roc.csv", "pro.csv"):
                if (run_dir / name).is_file():
                    client.log_artifact(run_id, str(run_dir / name))
            client.set_terminated(run_id, "FINISHED")
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        return run_id, True


def finish_parent(run_id: str, status: str, files: list[Path], markdown: str, counts: dict[str, int]) -> None:
    from mlflow.entities import Metric

    with _MLFLOW_LOCK:
        client = _client()
        client.set_tag(run_id, "mlflow.note.content", markdown)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"jobs_{k}", float(v), now, 0) for k, v in counts.items()])
        for path in files:
            client.log_artifact(run_id, str(path), "heatmaps" if path.parent.name == "heatmaps" else None)
        client.set_terminated(run_id, status)


# --- one job ---------------------------------------------------------------------------------------------
_TRAIN_LOCKS: dict[str, threading.Lock] = {}
_TRAIN_LOCKS_GUARD = threading.Lock()


def _train(job: GridJob, variant: Params, samples: list[Sample], dataset_train: list[Sample]) -> dict:
    """The pipeline's train_task (cached by run key); one training job per key, however many jobs ask (a
    dataset-wide one; an adapter's, which its own method's job and the adapted jobs share)."""
    fitter = trainer(variant)
    if not trains(fitter):
        return {}
    with _TRAIN_LOCKS_GUARD:
        lock = _TRAIN_LOCKS.setdefault(job.training_key, threading.Lock())
    with lock:  # the first job trains, the others find its result
        if job.shared_key:
            return train_task(job.shared_key, fitter, f"{job.dataset} (all categories)", dataset_train)
        train = [s for s in samples if s.split == "train"]
        return train_task(job.training_key, fitter, job.category, train)


def _pending_decision(variant: Params, run_key: str) -> dict | None:
    """The training summary (train.json; ``{}`` for a frozen method) of a job whose thresholds are still to
    compute (a Ray task, :func:`_decide`): a finished run with its model (not an archived one) and its
    trained weights, not collapsed, without a decision under the current ``decision`` params. None when
    there is nothing to compute."""
    folder = decision_folder(variant, run_key)
    run_dir = folder.parent / "evaluation"
    record = read_run(run_dir)
    if read_decision(folder) is not None or record is None or record.get("collapsed"):
        return None
    if not (run_dir / "method" / "spec.json").is_file():
        return None
    train = run_dir / "train.json"
    training = json.loads(train.read_text()) if train.is_file() else {}
    if training.get("directory") and not Path(training["directory"]).is_dir():
        return None
    if training.get("adapted_by") and not Path(training["adapted_by"]["backbone"]).is_file():
        return None
    return training


def _check_files(samples: list[Sample]) -> None:
    """Every image and mask file the manifest named is still there (before a worker is started for it)."""
    from components.data import DataError
    from components.data.oneclass import split_item_path

    files = {(split_item_path(s.path) or (s.path,))[0] for s in samples}
    files |= {s.mask_path for s in samples if s.mask_path}
    for path in sorted(files):
        if not os.access(path, os.R_OK):
            raise DataError(f"{path}: file not found or unreadable (it was verified by prepare)")


def _evaluate(
    job: GridJob, variant: Params, data_version: str, samples: list[Sample], training: dict, cpus: int | None
) -> dict:
    """Banks + evaluation as a Ray task in a fresh worker: ``cpus`` CPUs, one GPU when the cluster has any."""
    run_dir = Path(variant.pipeline.runs_dir).resolve() / job.run_key / "evaluation"
    for stale in run_dir.parent.glob(".evaluation.*"):  # left by a killed attempt; the folder is atomic
        shutil.rmtree(stale, ignore_errors=True)
    category_job = make_category_job(variant, job.category, job.run_key, data_version, samples, training)
    return evaluate_remotely(category_job, run_dir, variant, cpus, max_calls=1, name=f"evaluate:{job.label}")


def _decide(
    job: GridJob, variant: Params, data_version: str, samples: list[Sample], cpus: int | None
) -> dict | None:
    """The job's thresholds (flows/decide.py) as a Ray task, reused from its decision folder; None for a
    collapsed run and for a run folder without its model (an archived one: restored evidence)."""
    folder = decision_folder(variant, job.run_key)
    training = _pending_decision(variant, job.run_key)
    if training is None:
        return read_decision(folder)  # None: collapsed, archived or its trained weights gone
    run_dir = folder.parent / "evaluation"
    variant, training = on_adapted_backbone(tuned(variant, training), training)
    category_job = make_category_job(variant, job.category, job.run_key, data_version, samples, training)
    t = variant.train
    args = (variant.decision.model_dump(), t.val_fraction, variant.seed, list(t.synthetic))
    name = f"decide:{job.label}"
    return remote_call(decide_in_ray_task, (category_job, str(run_dir), str(folder), *args), variant, cpus,
                       max_calls=1, name=name)  # fmt: skip


def _start_ray(attempts: int = 2) -> None:
    """ensure_ray on the flow's thread (Ray's local processes live as long as it does), tried twice.

    On an overloaded machine a local Ray may miss its start-up windows (GCS port file, raylet
    registration: 30 s each); the GCS wait is raised to 120 s unless set, and a failed start is retried once.
    """
    import ray

    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
    for attempt in range(1, attempts + 1):
        try:
            start_ray()
            return
        except Exception as err:
            if attempt == attempts or os.environ.get("RAY_ADDRESS") or isinstance(err, WorkerCodeError):
                raise
            get_run_logger().warning("a local Ray did not start (%s); trying again", err)
            ray.shutdown()


@task(name="grid-job", cache_policy=NO_CACHE, task_run_name="{job.label}")
def job_task(
    job: GridJob,
    variant: Params,
    data_version: str,
    samples: list[Sample],
    dataset_train: list[Sample],
    mlflow_run: tuple[str, str, str],
    cpus: int | None,
) -> dict[str, Any]:
    """Train (when the method trains), evaluate and log one job; a finished run folder is reused."""
    from prefect.runtime import task_run

    t0 = time.perf_counter()
    run_dir = Path(variant.pipeline.runs_dir) / job.run_key / "evaluation"
    record = read_run(run_dir)
    reused = record is not None
    if record is None:
        _check_files(samples)  # fails in milliseconds, not after a worker started
        training = _train(job, variant, samples, dataset_train)
        evaluated, training = on_adapted_backbone(tuned(variant, training), training)
        record = _evaluate(job, evaluated, data_version, samples, training, cpus)
        get_run_logger().info("%s: done in %.1f s", job.label, time.perf_counter() - t0)
    decision = _decide(job, variant, data_version, samples, cpus)
    experiment, parent, grid_key = mlflow_run
    mlflow_id, logged = log_job(experiment, parent, grid_key, job, variant, run_dir)
    return {
        **asdict(job),
        "status": "done",
        "reason": None,
        "attempts": task_run.run_count,
        "reused": reused,
        "logged": logged,
        "mlflow_run_id": mlflow_id,
        "metrics": record["metrics"],
        "decision": decision["metrics"] if decision else None,
        "collapsed": record.get("collapsed"),
    }


@flow(name="grid", log_prints=True)
def grid(
    params_path: str = "params.yaml", overrides: dict[str, Any] | None = None, check: bool = True
) -> dict[str, Any]:
    """Run every job of params.yaml's grid and write the leaderboard (see module docstring).

    ``check=False`` skips building every variant once on the CPU (the caller did, e.g. the CLI).
    """
    from flows import leaderboard
    from flows.tracking import check_tracking, resolve_tracking_uri

    logger = get_run_logger()
    t0 = time.perf_counter()
    params = load_params(params_path, overrides)
    plan = expand(params, params_path, check)
    d = params.decision
    for dataset, categories in plan.samples.items():  # every job's held-out slice supports the rule
        used = {j.category for j in plan.jobs if j.dataset == dataset}
        train = {c: [s for s in categories[c][0] if s.split == "train"] for c in sorted(used)}
        check_decision(d.rule, d.false_alarm_rate, params.train.val_fraction, train, dataset)
    uri = resolve_tracking_uri(params)
    check_tracking(uri)
    g = params.grid
    pending = [j for j in plan.jobs if not job_done(plan, j)]
    logger.info(
        "grid %s: %d jobs, %d done, %d to run", plan.grid_key, len(plan.jobs), len(plan.jobs) - len(pending),
        len(pending),
    )  # fmt: skip
    if pending or any(_pending_decision(plan.variants[j.variant], j.run_key) is not None for j in plan.jobs):
        _start_ray()
    experiment, parent, parent_status = parent_run(plan, uri)
    run_job = job_task.with_options(
        retries=params.pipeline.retries, retry_delay_seconds=params.pipeline.retry_delay_seconds
    )

    def submit(job: GridJob) -> Any:
        rows, version = plan.samples[job.dataset][job.category]
        every = []
        if job.shared_key:
            every = [s for r, _ in plan.samples[job.dataset].values() for s in r if s.split == "train"]
        variant = plan.variants[job.variant]
        mlflow_run = (experiment, parent, plan.grid_key)
        return run_job.submit(job, variant, version, quote(rows), quote(every), mlflow_run, g.cpus_per_job)

    done = run_bounded([(job.run_key, partial(submit, job)) for job in plan.jobs], g.concurrency)
    records, failed = [], []
    for job, future in ((job, done[job.run_key]) for job in plan.jobs):
        if future.state.is_completed():
            records.append(future.result())
            continue
        try:
            future.result()
            reason = future.state.name
        except Exception as err:  # the job's own error, named in the failure message
            reason = _reason(getattr(err, "cause", None) or err)  # a Ray task's error: the original one
        failed.append(job.label)
        attempts = params.pipeline.retries + 1
        records.append({**asdict(job), "status": "failed", "reason": reason, "attempts": attempts})
    jobs = [leaderboard.job_row(r) for r in records]
    computed = sum(not r.get("reused", True) for r in records if r["status"] == "done")
    wall = time.perf_counter() - t0
    summary = (
        f"{len(jobs)} jobs ({', '.join(g.datasets)}): {len(jobs) - len(failed)} done "
        f"({computed} computed now, {len(jobs) - len(failed) - computed} reused by run key), "
        f"{len(failed)} failed · wall {wall:.0f} s · grid key `{plan.grid_key}`"
    )
    written = leaderboard.write(
        jobs,
        summary,
        runs_dir=g.runs_dir,
        output=g.output,
        metrics_file=g.metrics_file,
        plots_dir=g.plots_dir,
    )
    create_markdown_artifact(
        written["markdown"], key="grid-leaderboard", description="adaptad grid leaderboard"
    )
    new_children = any(r.get("logged") for r in records)
    if failed or computed or new_children or parent_status != "FINISHED":
        finish_parent(
            parent,
            "FAILED" if failed else "FINISHED",
            written["files"],
            written["markdown"],
            {"total": len(jobs), "failed": len(failed), "computed": computed},
        )
    logger.info("grid finished in %.1f s\n%s", wall, written["markdown"])
    if failed:
        reasons = {r["run_key"]: r["reason"] for r in records if r["status"] == "failed"}
        raise RuntimeError(
            "grid jobs failed: "
            + "; ".join(f"{j.label} ({reasons[j.run_key]})" for j in plan.jobs if j.label in failed)
        )
    return {
        "grid_key": plan.grid_key,
        "jobs": len(jobs),
        "computed": computed,
        "reused": len(jobs) - computed,
        "leaderboard": str(Path(g.output) / "leaderboard.md"),
    }


def run_grid(
    params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None, check: bool = True
) -> dict:
    """Run the grid flow in this process (ephemeral Prefect API unless PREFECT_API_URL is set)."""
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(Path("runs/prefect-results").resolve()))
    return grid(str(params_path), overrides, check)
