"""The Prefect ``pipeline`` flow: per category, a Ray Train job, banks + evaluation, MLflow run + version.

Categories fan out under ``pipeline.concurrency``. Each step is a Prefect task with retries and a cache
key derived from the run key, and each writes its output folder atomically under the run key too, so a
re-run with nothing changed does no work. A failing category does not stop the others; the flow then
ends failed, naming it. DVC metrics (``metrics/pipeline.json``) and plots (ROC / PRO curves per
category) are written for the categories that finished, and a markdown artifact shows the table.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.atomic import replace_dir, write_text_atomic
from components.data import DataError, Sample, manifest_version, read_manifest
from components.decision import DECISION_METRICS
from components.methods import method_class
from flows.decide import check_decision, decide_category, decide_in_ray_task, decision_key, read_decision
from flows.evaluate import METRIC_KEYS, CategoryJob, evaluate_category, evaluate_in_ray_task, read_run
from flows.params import (
    RESULT_CODE,
    Params,
    adapted_name,
    check_method,
    code_version,
    load_params,
    run_key,
    trains,
)
from flows.services import restore_stop_handler, worker_env_defaults
from flows.train import TrainJob, absolute, ensure_ray, train
from flows.tune import tune_and_train


def dataset_scope(params: Params) -> bool:
    """Whether one training job covers every category of the dataset (e.g. TPTL), then per-category banks."""
    return method_class(params.method).scope == "dataset" and trains(params)


def dataset_version(categories: dict[str, tuple[list[Sample], str]]) -> str:
    """The data version of a whole dataset: a hash of its categories' versions."""
    import hashlib

    text = "\n".join(f"{c}\t{v}" for c, (_, v) in sorted(categories.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _key(suffix: str, artifact: str):
    """Prefect cache key of a task by run key, only while ``artifact`` (a file in the run folder) exists: a
    cached result whose run folder was deleted or moved is recomputed, not returned."""

    def key(context: Any, arguments: dict[str, Any]) -> str | None:
        runs = Path(arguments["params"].pipeline.runs_dir)
        if not (runs / arguments["key"] / artifact).is_file():
            return None  # no cache key: the task runs
        return f"{arguments['key']}-{suffix}"

    return key


@task(name="train", cache_key_fn=_key("train", "trained/summary.json"), persist_result=True)
def train_task(key: str, params: Params, category: str, train_samples: list[Sample]) -> dict[str, Any]:
    """Fine-tune the backbone on the Ray cluster (a TorchTrainer run named by the run key)."""
    t = params.train
    job = TrainJob(
        run_key=key,
        spec=params.spec(),
        train=train_samples,
        seed=params.seed,
        batch_size=t.batch_size,
        val_fraction=t.val_fraction,
        synthetic=tuple(t.synthetic),
        loader_workers=t.loader_workers,
        num_workers=t.num_workers,
        cpus_per_worker=t.cpus_per_worker,
        use_gpu=t.use_gpu,
        max_failures=t.max_failures,
        storage=t.storage,
        placement_strategy=t.placement_strategy,
        collapse=t.collapse.thresholds(),
        record_epochs=t.record_epochs,
    )
    output = Path(params.pipeline.runs_dir) / key / "trained"
    result = tune_and_train(job, params.tune, output) if params.tune.space else train(job, output)
    if "tune" in result.summary:
        t = result.summary["tune"]
        get_run_logger().info(
            "%s: tune kept trial %d of %d (%s, %s %s)",
            category,
            t["chosen"] + 1,
            len(t["trials"]),
            t["knobs"],
            t["metric"],
            t["trials"][t["chosen"]]["signal"],
        )
    get_run_logger().info(
        "%s: trained %s epochs in %.1f s", category, result.summary["epochs"], result.summary["seconds"]
    )
    if result.summary.get("collapsed"):
        get_run_logger().warning(
            "%s: the collapse monitor stopped training (%s): the run will not be registered",
            category,
            result.summary["collapsed"]["reason"],
        )
    return {"directory": str(result.directory.resolve()), "run_key": key, **result.summary}


def tuned(params: Params, training: dict[str, Any]) -> Params:
    """``params`` with the knobs of the trial a tune kept (unchanged without a tune, and with
    ``adapted_by``: the tune chose the adapter's knobs, not the frozen method's)."""
    if not training.get("tune") or params.adapted_by:
        return params
    return params.with_knobs(training["tune"]["knobs"])


def trainer(params: Params) -> Params:
    """The params of the category's training job: the adapter's with ``adapted_by``, else ``params``."""
    return params.adapter() or params


def training_key(params: Params, category: str, version: str, code: str, shared: str | None) -> str | None:
    """The key of the training job a category's run shares: the dataset-wide one (``shared``), or with
    ``adapted_by`` the adapter's own job for the category; None when the run trains under its own key."""
    if shared or params.adapted_by is None:
        return shared
    return run_key(trainer(params), category, version, code)


def on_adapted_backbone(params: Params, training: dict[str, Any]) -> tuple[Params, dict[str, Any]]:
    """With ``adapted_by``: the frozen method's params with ``weights`` = the backbone the adapter's
    training job left (``trained/backbone.safetensors``), and that job's summary as the run's training
    record (seconds, epochs, tags, the collapse monitor's verdict; not its folder or per-epoch weights,
    which belong to the adapter's networks). Unchanged without ``adapted_by``."""
    if params.adapted_by is None or not training:
        return params, training
    if "adapted_by" in training:  # a run's record (its train.json): already the adapted one
        return params.model_copy(update={"weights": training["adapted_by"]["backbone"]}), training
    backbone = Path(training["directory"]) / "backbone.safetensors"
    adapted = {"method": params.adapted_by, "run_key": training["run_key"], "backbone": str(backbone)}
    record = {k: v for k, v in training.items() if k not in ("directory", "epoch_weights")}
    record["tags"] = (training.get("tags") or {}) | {
        "adapted_by": params.adapted_by,
        "adapted_by.run_key": training["run_key"],
    }
    return params.model_copy(update={"weights": str(backbone)}), record | {"adapted_by": adapted}


def category_job(
    params: Params,
    category: str,
    key: str,
    data_version: str,
    samples: list[Sample],
    training: dict[str, Any],
) -> CategoryJob:
    """The evaluation job of one category of ``params.dataset`` (absolute paths: workers may run anywhere)."""
    return CategoryJob(
        dataset=params.dataset,
        category=category,
        run_key=key,
        data_version=data_version,
        spec=params.spec(),
        train=[absolute(s) for s in samples if s.split == "train"],
        test=[absolute(s) for s in samples if s.split == "test"],
        masks=params.data.masks,
        batch_size=params.evaluate.batch_size,
        loader_workers=params.evaluate.loader_workers,
        trained=Path(training["directory"]) if training.get("directory") else None,
        training=training,
    )


@task(name="evaluate", cache_key_fn=_key("evaluate", "evaluation/metrics.json"), persist_result=True)
def evaluate_task(
    key: str,
    params: Params,
    category: str,
    data_version: str,
    samples: list[Sample],
    training: dict[str, Any],
) -> dict[str, Any]:
    """Build banks with the (adapted) backbone and evaluate the test split (a Ray task on a cluster)."""
    run_dir = Path(params.pipeline.runs_dir).resolve() / key / "evaluation"
    done = read_run(run_dir)
    if done is not None:
        return done
    job = category_job(params, category, key, data_version, samples, training)
    t0 = time.perf_counter()
    if not os.environ.get("RAY_ADDRESS"):  # embedded: evaluate here (CUDA when this machine has it)
        result = evaluate_category(job, run_dir, local_device(params))
    else:  # a cluster: a Ray task, on a GPU node when the cluster has GPUs
        ensure_ray()
        result = evaluate_remotely(job, run_dir, params)
    get_run_logger().info("%s: banks + evaluation in %.1f s", category, time.perf_counter() - t0)
    return result


def local_device(params: Params) -> str | None:
    """The device of a step run in this process: the CPU when ``evaluate.use_gpu`` is off, else default."""
    return "cpu" if params.evaluate.use_gpu in (False, "false") else None


def remote_call(
    fn: Callable[..., Any], args: tuple, params: Params, cpus: int | None = None, **options: Any
) -> Any:
    """``fn(*args, cpus)`` as a Ray task: ``cpus`` CPUs (default: the training's), clamped to the cluster,
    and one GPU when ``evaluate.use_gpu`` allows and the cluster has GPUs; ``options`` (e.g. ``max_calls``,
    ``name``) go to ``ray.remote``."""
    import ray

    from flows.train import _use_gpu

    wanted = cpus or params.train.num_workers * params.train.cpus_per_worker
    wanted = max(1, min(wanted, int(ray.cluster_resources().get("CPU", 1))))
    gpus = 1 if _use_gpu(params.evaluate.use_gpu) else 0
    remote = ray.remote(num_cpus=wanted, num_gpus=gpus, max_retries=0, **options)(fn)
    return ray.get(remote.remote(*args, wanted))


def evaluate_remotely(
    job: CategoryJob, run_dir: Path, params: Params, cpus: int | None = None, **options: Any
) -> dict[str, Any]:
    """Evaluate ``job`` as a Ray task (:func:`remote_call`)."""
    return remote_call(evaluate_in_ray_task, (job, str(run_dir)), params, cpus, **options)


def decision_folder(params: Params, key: str) -> Path:
    """``<runs_dir>/<run key>/decision-<decision key>``: the run's thresholds under ``params.decision``."""
    t = params.train
    dkey = decision_key(key, params.decision.model_dump(), t.val_fraction, params.seed, list(t.synthetic))
    return Path(params.pipeline.runs_dir).resolve() / key / f"decision-{dkey}"


def _decision_cache_key(context: Any, arguments: dict[str, Any]) -> str | None:
    folder = decision_folder(arguments["params"], arguments["key"])
    return f"{arguments['key']}-{folder.name}" if (folder / "decision.json").is_file() else None


@task(name="decide", cache_key_fn=_decision_cache_key, persist_result=True)
def decide_task(
    key: str,
    params: Params,
    category: str,
    data_version: str,
    samples: list[Sample],
    training: dict[str, Any],
) -> dict[str, Any]:
    """Set the run's image and pixel thresholds on held-out normal images (flows/decide.py)."""
    folder = decision_folder(params, key)
    evaluation = folder.parent / "evaluation"
    done = read_decision(folder)
    if done is not None:
        return done
    job = category_job(params, category, key, data_version, samples, training)
    t, decision = params.train, params.decision.model_dump()
    args = (decision, t.val_fraction, params.seed, list(t.synthetic))
    t0 = time.perf_counter()
    if not os.environ.get("RAY_ADDRESS"):
        result = decide_category(job, evaluation, folder, *args, local_device(params))
    else:  # a cluster: a Ray task, as the evaluation's
        ensure_ray()
        result = remote_call(decide_in_ray_task, (job, str(evaluation), str(folder), *args), params)
    get_run_logger().info("%s: thresholds set in %.1f s", category, time.perf_counter() - t0)
    return result


@task(name="log-and-register")
def log_task(
    key: str, params: Params, category: str, evaluation: dict[str, Any], decided: bool = False
) -> dict[str, Any]:
    """One MLflow run with params, curves, artifacts and the pyfunc model; a version with alias challenger.

    Not cached by Prefect: the tracking store is the record (``log_run`` finds the run key's run and version
    there and logs nothing twice), so a new or wiped store gets the finished runs logged again."""
    from flows.tracking import log_run

    t0 = time.perf_counter()
    decision = decision_folder(params, key) if decided else None
    logged = log_run(Path(params.pipeline.runs_dir) / key / "evaluation", params, decision)
    get_run_logger().info("%s: MLflow run + registration in %.1f s", category, time.perf_counter() - t0)
    return logged


def category_key(params: Params, category: str, version: str, code: str, shared: str | None = None) -> str:
    """The category's run key; the key of a training job it shares (``shared``: a dataset-wide one, or the
    adapter's with ``adapted_by``) is part of it."""
    return run_key(params, category, f"{version}+{shared}" if shared else version, code)


@task(name="category")
def category_task(
    params: Params,
    category: str,
    samples: list[Sample],
    version: str,
    code: str,
    shared: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (when the method trains), evaluate and register one category.

    ``shared`` is the result of a dataset-wide training job (dataset-scope methods): then the category
    only builds its banks with that backbone, is evaluated and registered. With ``adapted_by`` the training
    job is the adapter's (its own run key, shared with that method's runs) and the run key names it.
    """
    fitter = trainer(params)
    train_key = training_key(params, category, version, code, shared["run_key"] if shared else None)
    key = category_key(params, category, version, code, train_key)
    if shared is not None:
        training = shared
    elif trains(fitter):
        training = train_task(train_key or key, fitter, category, [s for s in samples if s.split == "train"])
    else:
        training = {}
    params = tuned(params, training)  # evaluated, decided and logged with the kept trial's knobs
    params, training = on_adapted_backbone(params, training)
    evaluation = evaluate_task(key, params, category, version, samples, training)
    decision = None
    if not evaluation.get("collapsed"):  # a collapsed run has no model to decide with
        decision = decide_task(key, params, category, version, samples, training)
    logged = log_task(key, params, category, evaluation, decision is not None)
    return {
        "category": category,
        "run_key": key,
        "metrics": evaluation["metrics"],
        "decision": decision["metrics"] if decision else None,
        "mlflow": logged,
        "collapsed": evaluation.get("collapsed"),
    }


def load_category_samples(params: Params) -> dict[str, tuple[list[Sample], str]]:
    """Samples and data version of each category of the chosen dataset, from its verified manifest."""
    path = params.manifest_path()
    if not path.is_file():
        raise DataError(
            f"{path}: manifest not found — run the prepare stage first (dvc repro prepare@{params.dataset})"
        )
    table = pq.read_table(path)
    samples = read_manifest(path)
    out = {}
    for category in params.data.categories:
        rows = [s for s in samples if s.category == category]
        if not any(s.split == "train" for s in rows) or not any(s.split == "test" for s in rows):
            raise DataError(f"{path}: category {category!r} has no train or no test images in the manifest")
        mask = [c == category for c in table.column("category").to_pylist()]
        out[category] = (rows, manifest_version(table.filter(mask)))
    return out


def _reason(err: BaseException) -> str:
    """One line: the error's type and message (the original one when a DataLoader worker wrapped it)."""
    name, message = type(err).__name__, str(err)
    if "Traceback" in message and f"{name}: " in message:
        message = message.rsplit(f"{name}: ", 1)[-1]
    return " ".join(f"{name}: {message}".split())[:300]


def _fmt(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def results_markdown(params: Params, results: dict[str, dict], failed: dict[str, str]) -> str:
    lines = [
        f"# adaptad pipeline — {params.dataset} · {adapted_name(params.method, params.adapted_by)} · "
        f"{params.backbone} @ {params.image_size}px",
        "",
        "| category | image AUROC | pixel AUROC | AUPRO | image F1-max | pixel F1-max "
        "| at the threshold: false alarms | recall | image F1 | pixel F1 | model version |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for category, r in results.items():
        m, logged = r["metrics"], r.get("mlflow") or {}
        version = f"{logged.get('model_name')} v{logged.get('version')}" if logged.get("version") else "—"
        if r.get("collapsed"):
            version = f"collapsed at epoch {r['collapsed']['epoch']}: not evaluated, not registered"
        d = r.get("decision") or {}
        cells = [_fmt(m[k]) for k in METRIC_KEYS]
        cells += [_fmt(d.get(k)) for k in ("image_fpr", "image_recall", "image_f1", "pixel_f1")]
        lines.append(f"| {category} | " + " | ".join(cells) + f" | {version} |")
    for category, reason in failed.items():
        lines.append(f"| {category} | failed: {reason} ||||||||||")
    return "\n".join(lines)


def write_dvc_outputs(params: Params, results: dict[str, dict]) -> None:
    """metrics/pipeline.json (per category and mean) and plots/{roc,pro}/<category>.csv."""
    per_category = {c: {k: r["metrics"][k] for k in METRIC_KEYS} for c, r in results.items()}
    for c, r in results.items():  # the operating point: the figures at the calibrated thresholds
        per_category[c] |= {k: (r.get("decision") or {}).get(k, math.nan) for k in DECISION_METRICS}
    finite = lambda k: [v[k] for v in per_category.values() if not math.isnan(v[k])]  # noqa: E731
    averaged = METRIC_KEYS + DECISION_METRICS[2:]  # not the thresholds: each model has its own scale
    mean = {k: float(sum(finite(k)) / len(finite(k))) if finite(k) else None for k in averaged}
    clean = lambda d: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}  # noqa: E731
    doc = {
        "dataset": params.dataset,
        "method": adapted_name(params.method, params.adapted_by),
        "categories": {c: clean(v) for c, v in per_category.items()},
        "mean": clean(mean),
    }
    write_text_atomic(params.pipeline.metrics_file, json.dumps(doc, indent=2))
    plots = Path(params.pipeline.plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    for kind in ("roc", "pro"):
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}.", dir=plots))  # same filesystem: rename is atomic
        try:
            for category, r in results.items():
                src = Path(params.pipeline.runs_dir) / r["run_key"] / "evaluation" / f"{kind}.csv"
                if src.is_file():
                    shutil.copy(src, tmp / f"{category}.csv")
            replace_dir(tmp, plots / kind)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def shared_training_key(
    params: Params, categories: dict[str, tuple[list[Sample], str]], code: str
) -> str | None:
    """The run key of the dataset-wide training job of a dataset-scope method (else None)."""
    params = trainer(params)
    if not dataset_scope(params):
        return None
    return run_key(params, "dataset:" + params.dataset, dataset_version(categories), code)


def start_ray_if_needed(
    params: Params, categories: dict[str, tuple[list[Sample], str]], code: str | None = None
) -> None:
    """Start (or attach to) Ray when a category still has to train, or when ``RAY_ADDRESS`` names a cluster.

    Call it on the flow's thread: Ray's local processes live as long as the thread that started them.
    """
    if os.environ.get("RAY_ADDRESS"):
        start_ray()
        return
    params = trainer(params)
    if not trains(params):
        return
    code = code or code_version()
    shared = shared_training_key(params, categories, code)
    keys = [shared] if shared else [run_key(params, c, v, code) for c, (_, v) in categories.items()]
    runs = Path(params.pipeline.runs_dir)
    if any(not (runs / k / "trained" / "summary.json").is_file() for k in keys):
        start_ray()


def start_ray() -> None:
    """:func:`ensure_ray` on the flow's thread, with the worker environment defaults for a local cluster
    (``flows/services.py``) and the CLI's stop handler kept (``ray.init`` replaces SIGTERM's)."""
    if not os.environ.get("RAY_ADDRESS"):
        worker_env_defaults()
    ensure_ray()
    restore_stop_handler()
    check_worker_code()


class WorkerCodeError(RuntimeError):
    """Ray's workers would run other result code than the code version that names the runs."""


def check_worker_code() -> None:
    """Fail unless Ray's workers import the same result code (RESULT_CODE, by content) as this process.

    Ray puts the driver's working directory first on its workers' ``sys.path``: started from a folder that
    holds another copy of the project (an older clone, say), the workers would train and score with that
    copy's ``components/`` while the run keys name this process's code version. One zero-CPU task checks.
    """
    import ray

    def digest(paths: tuple[str, ...]) -> tuple[str, str]:  # by value: no import of this module there
        import hashlib
        from pathlib import Path

        import components

        root = Path(components.__file__).resolve().parents[1]
        h = hashlib.sha256()
        for rel in paths:
            for file in sorted((root / rel).glob("**/*.py")) if (root / rel).is_dir() else [root / rel]:
                content = file.read_bytes() if file.is_file() else b"<missing>"
                h.update(file.relative_to(root).as_posix().encode() + content)
        return str(root), h.hexdigest()

    here = digest(RESULT_CODE)
    there = ray.get(ray.remote(num_cpus=0)(digest).remote(RESULT_CODE))
    if there[1] != here[1]:
        raise WorkerCodeError(
            f"Ray's workers import the result code ({', '.join(RESULT_CODE)}) from {there[0]}, which differs "
            f"from this process's ({here[0]}): Ray puts the working directory ({os.getcwd()}) first on its "
            "workers' path. Run adaptad from the project folder or a folder without a copy of it (on a "
            "cluster: install this version on every node)."
        )


def run_bounded(submissions: list[tuple[str, Callable[[], Any]]], concurrency: int) -> dict[str, Any]:
    """Call each ``(key, submit)``'s ``submit`` (a Prefect ``Task.submit``), at most ``concurrency``
    futures unfinished at a time, in order; returns every future by key, all finished (final state set).

    Finished futures arrive through done-callbacks: polling each future's state would ask the Prefect API
    twice a second for the whole run, CPU taken from the jobs on a small machine.
    """
    finished: queue.SimpleQueue[str] = queue.SimpleQueue()
    futures: dict[str, Any] = {}
    running: set[str] = set()
    todo = list(submissions)
    while todo or running:
        while todo and len(running) < concurrency:
            key, submit = todo.pop(0)
            futures[key] = future = submit()
            running.add(key)
            future.add_done_callback(lambda _, key=key: finished.put(key))
        with contextlib.suppress(queue.Empty):  # a timeout keeps Ctrl-C responsive
            running.discard(finished.get(timeout=5))
    for future in futures.values():
        future.wait()  # the final state from the task's own future, not from the API
    return futures


@flow(name="pipeline", log_prints=True)
def pipeline(
    params_path: str = "params.yaml", overrides: dict[str, Any] | None = None, check: bool = True
) -> dict[str, Any]:
    """Run the chosen method on every category of the chosen dataset (see module docstring).

    ``check=False``: the caller (the CLI) has already built the method once and checked the MLflow URI.
    """
    from flows.tracking import check_tracking, resolve_tracking_uri, warm_up

    logger = get_run_logger()
    params = load_params(params_path, overrides)
    uri = resolve_tracking_uri(params)
    if check:
        check_method(params, params_path)
        check_tracking(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    categories = load_category_samples(params)
    d = params.decision
    train = {c: [s for s in samples if s.split == "train"] for c, (samples, _) in categories.items()}
    check_decision(d.rule, d.false_alarm_rate, params.train.val_fraction, train, str(params.manifest_path()))
    warm_up(uri)  # the store opens while the categories train (after the checks: a refused run opens nothing)
    code = code_version()
    shared_key = shared_training_key(params, categories, code)
    start_ray_if_needed(params, categories, code)
    task_opts = {
        "retries": params.pipeline.retries,
        "retry_delay_seconds": params.pipeline.retry_delay_seconds,
    }
    t0 = time.perf_counter()
    shared = None
    if shared_key:  # one training job on every category's train images, then banks per category
        every = [s for samples, _ in categories.values() for s in samples if s.split == "train"]
        shared = train_task.with_options(**task_opts)(
            shared_key, trainer(params), f"{params.dataset} (all categories)", every
        )
    run_category = category_task.with_options(**task_opts)
    submissions = [
        (category, partial(run_category.submit, params, category, samples, version, code, shared))
        for category, (samples, version) in categories.items()
    ]
    futures = run_bounded(submissions, params.pipeline.concurrency)
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for category, future in futures.items():
        state = future.state
        if state.is_completed():
            results[category] = future.result()
        else:
            try:
                future.result()
                failed[category] = state.name
            except Exception as err:  # the category's own error, shown in the failure message
                failed[category] = _reason(err)
    write_dvc_outputs(params, results)
    markdown = results_markdown(params, results, failed)
    create_markdown_artifact(
        markdown, key=f"pipeline-{params.dataset}".lower(), description="adaptad results"
    )
    logger.info("pipeline finished in %.1f s\n%s", time.perf_counter() - t0, markdown)
    if failed:
        raise RuntimeError("categories failed: " + "; ".join(f"{c} ({r})" for c, r in failed.items()))
    return {
        c: {"run_key": r["run_key"], **{k: r["metrics"][k] for k in METRIC_KEYS}} for c, r in results.items()
    }
