"""MLflow tracking and registry: one experiment per dataset, one run per (category, method), one
registered model per (dataset, category) whose versions carry the run key, data version, method and
metrics as tags, a reviewer's markdown description, and the alias ``challenger``.

Logging is idempotent by run key (a key that already has a registered version, or a finished run, is
not logged again) and leaves no half-written state: a failure after the run started ends the run FAILED,
and the model version is registered last, after every artifact is logged — when registration fails the
new version is deleted again, so no half-registered version carries an alias.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.decision import DECISION_METRICS
from components.metrics import METRIC_KEYS
from flows.params import Params, code_version, git_commit

CHALLENGER = "challenger"
CHAMPION = "champion"
METRIC_TAGS = METRIC_KEYS + DECISION_METRICS  # on every model version: what promotion gates read
ARTIFACTS = (
    "heatmaps.png",
    "curves.png",
    "roc.csv",
    "pro.csv",
    "scores.parquet",
    "metrics.json",
    "history.json",
    "train.json",
)
PARAM_VALUE_LIMIT = 500
HEALTH_TIMEOUT_SECONDS = 5.0
MODEL_URI_TAG = "adaptad.model_uri"


class TrackingError(RuntimeError):
    """The MLflow tracking URI cannot be used; the one-line message names the URI and the reason."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# --- where ----------------------------------------------------------------------------------------------
def resolve_tracking_uri(params: Params | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` from the environment wins over ``params.mlflow.tracking_uri``."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return params.mlflow.tracking_uri if params is not None else "sqlite:///mlflow.db"


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https", "databricks")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for ``:memory:`` or another scheme)."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    # sqlite:///relative.db -> path "/relative.db"; sqlite:////abs/file.db -> path "//abs/file.db"
    path = unquote(parsed.path)
    path = path[1:] if path.startswith("/") else path
    if not path or path == ":memory:":
        return None
    return Path(path)


def check_tracking(uri: str, must_exist: bool = False) -> None:
    """Fail fast with :class:`TrackingError` when ``uri`` cannot work.

    http(s): ``GET <uri>/health`` must answer 200 within a few seconds. sqlite: the database folder must
    exist or be creatable (with ``must_exist``, the database file itself must exist — for readers).
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=HEALTH_TIMEOUT_SECONDS) as response:
                status = response.status
        except urllib.error.HTTPError as err:
            raise TrackingError(
                f"mlflow tracking URI {uri}: unhealthy (GET /health: HTTP {err.code})"
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"mlflow tracking URI {uri}: unreachable ({reason})") from None
        if status != 200:
            raise TrackingError(f"mlflow tracking URI {uri}: unhealthy (GET /health: HTTP {status})")
        return
    db = sqlite_path(uri)
    if db is None:
        return
    if must_exist:
        if not db.is_file():
            raise TrackingError(f"mlflow tracking URI {uri}: no database file at {db}")
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrackingError(
            f"mlflow tracking URI {uri}: cannot create the folder {db.parent} ({err.strerror or err})"
        ) from None
    if not os.access(db.parent, os.W_OK):
        raise TrackingError(f"mlflow tracking URI {uri}: folder {db.parent} is not writable")


def create_store(uri: str) -> None:
    """Create a missing sqlite store all at once: MLflow creates its tables in a file beside it that is
    renamed into place when complete. MLflow's own creation runs dozens of migrations in the file itself;
    a process that ends part-way (a refused run, a signal) would leave a store that no later run can open
    ("table ... already exists"). Other URIs, and a store that exists, are left alone."""
    db = sqlite_path(uri)
    if db is None or db.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    for stale in db.parent.glob(f".{db.name}.*-*.creating"):  # left by a process that was killed
        pid = stale.name.rsplit(".", 2)[1].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except (ValueError, PermissionError):  # not our name, or another user's live process
            pass
    scratch = db.with_name(f".{db.name}.{os.getpid()}-{threading.get_ident()}.creating")
    try:
        MlflowClient(tracking_uri=f"sqlite:///{scratch.resolve()}").search_experiments(max_results=1)
        with contextlib.suppress(FileExistsError):  # another process or thread created it first: theirs
            os.link(scratch, db)
    finally:
        scratch.unlink(missing_ok=True)


_WARM_UPS: dict[str, threading.Thread] = {}


def warm_up(uri: str) -> None:
    """In a background thread: import the pyfunc machinery and open the store (a fresh sqlite store creates
    its tables). Seconds that would otherwise fall on the first :func:`log_run`, after the training, are
    spent while the training runs. :func:`log_run` waits for it; errors are left for log_run to report."""
    if uri in _WARM_UPS:
        return

    def run() -> None:
        with contextlib.suppress(Exception):
            import mlflow.pyfunc  # noqa: F401

            create_store(uri)
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)

    _WARM_UPS[uri] = thread = threading.Thread(target=run, name="mlflow-warm-up", daemon=True)
    thread.start()


def use_tracking(uri: str) -> None:
    """Point MLflow's fluent API and default clients at ``uri`` in this process (a missing sqlite store is
    created first, whole: :func:`create_store`).

    The registry follows the tracking URI (unless ``MLFLOW_REGISTRY_URI`` names another). The
    ``MLFLOW_TRACKING_URI`` that ``mlflow.set_tracking_uri`` exports is restored, as it would otherwise
    "win" over the next params file in this process (see :func:`resolve_tracking_uri`).
    """
    create_store(uri)
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


# --- names ----------------------------------------------------------------------------------------------
def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "unnamed"


def experiment_name(dataset: str) -> str:
    return f"adaptad-{_sanitise(dataset)}"


def registered_model_name(dataset: str, category: str) -> str:
    """One registered model per (dataset, category): ``adaptad-<dataset>-<category>``."""
    return f"adaptad-{_sanitise(dataset)}-{_sanitise(category)}"


def experiment_id(dataset: str, artifact_root: str | os.PathLike = "mlartifacts") -> str:
    """Id of the dataset's experiment ``adaptad-<dataset>`` in the current tracking store (created once).

    Local stores get an explicit artifact location ``file://<abs artifact_root>/<dataset>``; an http
    server chooses its own (proxied artifacts). A deleted experiment of that name is restored.
    """
    client = MlflowClient()
    name = experiment_name(dataset)
    found = client.get_experiment_by_name(name)
    if found is None:
        location = None
        if not is_remote(mlflow.get_tracking_uri()):
            location = (Path(artifact_root).resolve() / _sanitise(dataset)).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            found = client.get_experiment_by_name(name)  # created meanwhile by a concurrent category
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


# --- what -----------------------------------------------------------------------------------------------
def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts → ``a.b.c`` keys; values as text cut to MLflow's param limit."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{name}.")
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:PARAM_VALUE_LIMIT]
    return out


def run_params(record: dict[str, Any], params: Params) -> dict[str, str]:
    """Flattened method spec (from the run folder) + seed + train and evaluate settings."""
    spec = dict(record.get("spec") or {})
    knobs = spec.pop("params", {}) or {}
    flat = flatten(spec)
    flat |= flatten(knobs, f"{spec.get('method', record.get('method', 'method'))}.")
    flat |= flatten({"seed": params.seed})
    if params.adapted_by:  # the training job that adapted the backbone (its file is the spec's weights)
        flat |= flatten({"adapted_by": params.adapted_by})
        flat |= flatten(params.methods.get(params.adapted_by, {}), f"{params.adapted_by}.")
    flat |= flatten(params.train.model_dump(), "train.")
    flat |= flatten(params.evaluate.model_dump(), "evaluate.")
    return flat


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def _example_image(run_dir: Path, scratch: Path) -> str | None:
    """A real test image of the run (a normal one first) for the model's input example.

    Array-backed samples (one-class sets, ``<file>#<index>``) are decoded and written as a PNG into
    ``scratch``, since the model's input is an image file.
    """
    scores = run_dir / "scores.parquet"
    if not scores.is_file():
        return None
    import pyarrow.parquet as pq

    from components.data import load_image, split_item_path

    table = pq.read_table(scores, columns=["path", "label"]).to_pylist()
    for row in sorted(table, key=lambda r: r["label"]):
        path = row["path"]
        if split_item_path(path) is not None:
            out = scratch / "example.png"
            load_image(path).save(out)
            return str(out)
        if Path(path).is_file():
            return path
    return None


def _fmt(value: Any) -> str:
    v = _finite(value)
    return "n/a" if v is None else f"{v:.4f}"


def run_link(experiment: str, run_id: str) -> str:
    """The run's page: absolute for an http server, the UI's relative route for a local store."""
    uri = mlflow.get_tracking_uri()
    route = f"#/experiments/{experiment}/runs/{run_id}"
    return f"{uri.rstrip('/')}/{route}" if urlparse(uri).scheme in ("http", "https") else route


MONITOR_COLUMNS = ("effective_rank", "rank_ratio", "knn_overlap", "separation", "drift")


def monitor_markdown(training: dict[str, Any]) -> str:
    """The collapse monitor's summary: pretrained, selected and last epoch, and the verdict."""
    rows = training.get("monitor") or []
    if not rows:
        return ""
    collapsed = training.get("collapsed")
    verdict = (
        f"**COLLAPSED** at epoch {collapsed['epoch']}: {collapsed['reason']} — stopped, never a challenger"
        if collapsed
        else "healthy (no threshold crossed)"
    )
    shown = {0: "pretrained", rows[-1]["epoch"]: "last"}
    lines = ["| epoch | " + " | ".join(MONITOR_COLUMNS) + " |", "|---" * (len(MONITOR_COLUMNS) + 1) + "|"]
    for row in rows:
        if row["epoch"] in shown:
            label = f"{row['epoch']} ({shown[row['epoch']]})"
            lines.append(f"| {label} | " + " | ".join(_fmt(row.get(k)) for k in MONITOR_COLUMNS) + " |")
    return f"**Collapse monitor** — {verdict}\n\n" + "\n".join(lines) + "\n\n"


def operating_point_markdown(decision: dict[str, Any] | None) -> str:
    """The thresholds a model decides with, how they were set, and the test figures at them."""
    if decision is None:
        return "**Operating point** none: this version answers scores and maps only (no decision).\n\n"
    c, m = decision["calibration"], decision["metrics"]
    rate = f" at false-alarm rate {c['false_alarm_rate']}" if c.get("false_alarm_rate") else ""
    rows = "\n".join(f"| {k} | {_fmt(m.get(k))} |" for k in DECISION_METRICS)
    where = "held-out normal train images" if "recalibrated" not in decision else "new normal images"
    return (
        f"**Operating point** set without test labels: rule `{c['rule']}`{rate} on {c['held_out_normal']}"
        f" {where} (and {c['synthetic']} synthetic anomalies made from them), scored by a memory that"
        f" does not hold them; {_fmt(100 * c['held_out_false_alarm_rate'])} % of those normals are above"
        " the image threshold.\n\n"
        f"| at the thresholds (test split) | value |\n|---|---|\n{rows}\n\n"
    )


def version_description(
    record: dict[str, Any], training: dict[str, Any], link: str, run_name: str, decision: dict | None = None
) -> str:
    """Markdown a reviewer reads on the model version page."""
    metrics = record.get("metrics", {})
    spec = record.get("spec", {})
    rows = "\n".join(f"| {k} | {_fmt(metrics.get(k))} |" for k in METRIC_KEYS)
    spec_rows = "\n".join(f"| {k} | `{json.dumps(v, default=str)}` |" for k, v in spec.items())
    tags = training.get("tags") or {}
    train_lines = []
    if tune := training.get("tune"):  # flows/tune.py
        signal = tune["trials"][tune["chosen"]]["signal"]
        train_lines.append(
            f"- chosen by tune: trial {tune['chosen'] + 1} of {len(tune['trials'])}, knobs "
            f"`{json.dumps(tune['knobs'])}`, {tune['metric']} {_fmt(signal)}"
        )
    train_lines += [
        f"- epochs: {training.get('epochs', metrics.get('epochs', 0))}",
        f"- training seconds: {_fmt(training.get('seconds', metrics.get('train_seconds')))}",
        f"- evaluation seconds: {_fmt(metrics.get('evaluate_seconds'))}",
        *(f"- `{k}`: {v}" for k, v in sorted(tags.items())),
    ]
    return (
        f"## {record.get('dataset')}/{record.get('category')} · {record.get('method')}\n\n"
        f"| metric (test split) | value |\n|---|---|\n{rows}\n\n"
        f"{operating_point_markdown(decision)}"
        f"**Method** `{record.get('method')}`\n\n| spec | value |\n|---|---|\n{spec_rows}\n\n"
        f"**Data version** `{record.get('data_version')}` · **run key** `{record.get('run_key')}`\n\n"
        f"**Training**\n" + "\n".join(train_lines) + "\n\n"
        f"{monitor_markdown(training)}"
        f"**Run** [{run_name}]({link})\n"
    )


def version_tags(record: dict[str, Any], git_commit: str, code: str) -> dict[str, str]:
    metrics = record.get("metrics", {})
    tags = {
        "run_key": str(record["run_key"]),
        "data_version": str(record.get("data_version")),
        "method": str(record.get("method")),
        "git_commit": git_commit,
        "code_version": code,
    }
    for key in METRIC_TAGS:
        v = _finite(metrics.get(key))
        tags[key] = "nan" if v is None else repr(v)
    return tags


# --- log ------------------------------------------------------------------------------------------------
def _find_version(client: MlflowClient, model_name: str, key: str):
    try:
        found = client.search_model_versions(f"name = '{model_name}' and tags.run_key = '{key}'")
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def _find_finished_run(client: MlflowClient, experiment: str, key: str):
    runs = client.search_runs(
        [experiment],
        f"tags.run_key = '{key}' and attributes.status = 'FINISHED'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def register_version(
    client: MlflowClient,
    model_name: str,
    model_uri: str,
    tags: dict[str, str],
    description: str,
) -> str:
    """Create the version with its tags and description, then move ``challenger`` onto it.

    All or nothing: when any step fails the new version is deleted again (its alias goes with it).
    """
    try:
        client.create_registered_model(
            model_name, description="adaptad anomaly detector; aliases `challenger` and `champion`."
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = None
    try:
        version = mlflow.register_model(model_uri, model_name, tags=tags).version
        client.update_model_version(model_name, version, description=description)
        client.set_registered_model_alias(model_name, CHALLENGER, version)
    except BaseException:
        if version is not None:
            with contextlib.suppress(MlflowException):
                client.delete_model_version(model_name, version)
        raise
    return str(version)


def log_run(run_dir: str | Path, params: Params, decision_dir: str | Path | None = None) -> dict[str, Any]:
    """Log a run folder (flows/evaluate.py) to MLflow and register it as the category's challenger.

    Returns ``{"run_id", "model_name", "version" (None when not registered), "skipped"}``; ``skipped`` is
    true when the run key was already logged (nothing is logged again). ``decision_dir`` (flows/decide.py):
    its thresholds and test figures at them are logged with the run, and its decision.json as an artifact.
    """
    run_dir = Path(run_dir)
    record = _read_json(run_dir / "metrics.json", None)
    if record is None:
        raise FileNotFoundError(f"{run_dir}: not a run folder (no metrics.json)")
    training = _read_json(run_dir / "train.json", {})
    history = _read_json(run_dir / "history.json", [])
    decision = _read_json(Path(decision_dir) / "decision.json", None) if decision_dir else None
    if decision is not None:  # the figures at the thresholds go wherever the test metrics go
        record = record | {"metrics": record.get("metrics", {}) | decision["metrics"]}
    key, dataset, category = record["run_key"], record["dataset"], record["category"]
    method = record.get("method", params.method)

    uri = resolve_tracking_uri(params)
    if uri in _WARM_UPS:
        _WARM_UPS[uri].join()  # never two table creations at once
    use_tracking(uri)
    client = MlflowClient()
    experiment = experiment_id(dataset, params.mlflow.artifact_root)
    model_name = registered_model_name(dataset, category)
    collapsed = training.get("collapsed")  # stopped by the collapse monitor: logged, never registered
    register = params.mlflow.register_versions and not collapsed
    commit, code = git_commit(), code_version()
    run_name = f"{category}-{method}"

    existing = _find_version(client, model_name, key)
    if existing is not None:
        return {
            "run_id": existing.run_id,
            "model_name": model_name,
            "version": str(existing.version),
            "skipped": True,
        }
    finished = _find_finished_run(client, experiment, key)
    if finished is not None:
        version = None
        model_uri = finished.data.tags.get(MODEL_URI_TAG)
        if register and model_uri:  # logged before with register_versions off: register it now
            link = run_link(experiment, finished.info.run_id)
            version = register_version(
                client,
                model_name,
                model_uri,
                version_tags(record, finished.data.tags.get("git_commit", commit), code),
                version_description(record, training, link, run_name, decision),
            )
        return {"run_id": finished.info.run_id, "model_name": model_name, "version": version, "skipped": True}

    tags = {
        "run_key": key,
        "data_version": str(record.get("data_version")),
        "method": method,
        "category": category,
        "dataset": dataset,
        "git_commit": commit,
        "code_version": code,
    }
    tags |= {str(k): str(v) for k, v in (training.get("tags") or {}).items()}
    if collapsed:
        tags |= {"collapsed": "true", "collapsed.reason": str(collapsed["reason"])[:PARAM_VALUE_LIMIT]}
    summary = monitor_markdown(training)
    if summary:
        tags["mlflow.note.content"] = summary
    with mlflow.start_run(experiment_id=experiment, run_name=run_name, tags=tags) as run:
        run_id = run.info.run_id
        mlflow.log_params(run_params(record, params))
        metrics = {k: v for k, v in record.get("metrics", {}).items() if _finite(v) is not None}
        if training.get("tune"):  # the trials and the choice (flows/tune.py)
            t = training["tune"]
            mlflow.log_params(
                {"tune.metric": t["metric"], "tune.mode": t["mode"], "tune.trials": len(t["trials"])}
                | {f"tune.chosen.{k}": v for k, v in t["knobs"].items()}
            )
            mlflow.log_dict(t, "tune.json")
        if decision is not None:
            calibration = decision["calibration"]
            mlflow.log_params({f"decision.{k}": calibration[k] for k in ("rule", "false_alarm_rate")})
            mlflow.log_artifact(str(Path(decision_dir) / "decision.json"))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        for entry in history:
            step = entry.get("epoch")
            values = {
                f"train/{k}": float(v) for k, v in entry.items() if k != "epoch" and _finite(v) is not None
            }
            if values and _finite(step) is not None:
                mlflow.log_metrics(values, step=int(step))
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                mlflow.log_artifact(str(run_dir / name))
        version = None
        if collapsed:  # no model: the collapsed run's weights are discarded
            return {"run_id": run_id, "model_name": model_name, "version": None, "skipped": False}
        from flows.pyfunc import log_pyfunc

        with tempfile.TemporaryDirectory(prefix="adaptad-example-") as scratch:
            example = _example_image(run_dir, Path(scratch))
            if example is None:
                raise FileNotFoundError(f"{run_dir}: no readable test image for the model's input example")
            decided = Path(decision_dir) / "decision.json" if decision is not None else None
            info = log_pyfunc(run_dir / "method", example, decision=decided)
        mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
        if register:
            link = run_link(experiment, run_id)
            version = register_version(
                client,
                model_name,
                info.model_uri,
                version_tags(record, commit, code),
                version_description(record, training, link, run_name, decision),
            )
    return {"run_id": run_id, "model_name": model_name, "version": version, "skipped": False}
