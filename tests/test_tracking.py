"""MLflow tracking and registry on a real sqlite store: log_run, idempotency, failures, the pyfunc."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow import MlflowClient

from components.data import ImageDataset, scan_mvtec
from components.methods import MethodSpec, load_method
from flows.decide import decide_category
from flows.evaluate import CategoryJob, evaluate_category
from flows.params import load_params
from flows.pyfunc import encode_image_file
from flows.tracking import (
    TrackingError,
    check_tracking,
    experiment_name,
    log_run,
    registered_model_name,
    resolve_tracking_uri,
    use_tracking,
)

MODEL = "adaptad-mini-kolektorsdd"
HISTORY = [{"epoch": 1, "loss": 0.5, "val_auroc": 0.6}, {"epoch": 2, "loss": 0.25, "val_auroc": float("nan")}]


@pytest.fixture(scope="module", autouse=True)
def _env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        yield


def run_job(root: Path, key: str, weights: str = "pypi", history=None) -> CategoryJob:
    """The evaluation job of the kolektorsdd subset under ``root`` (PatchCore at 96 px)."""
    samples = scan_mvtec(root, "kolektorsdd")
    return CategoryJob(
        dataset="mini",
        category="kolektorsdd",
        run_key=key,
        data_version="data-v1",
        spec=MethodSpec("patchcore", "tf_efficientnet_lite0", weights, None, 96, {"coreset_ratio": 0.05}),
        train=[s for s in samples if s.split == "train"],
        test=[s for s in samples if s.split == "test"],
        batch_size=8,
        loader_workers=0,
        training={"seconds": 1.5, "epochs": len(history or []), "tags": {"panda.fisher": "none"}}
        | {"history": history or []},
    )


def make_run_folder(root: Path, out: Path, key: str, weights: str = "pypi", history=None) -> Path:
    """A real run folder; ``weights="none"`` is a random backbone, seeded so that it is reproducible."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        evaluate_category(run_job(root, key, weights, history), out)
    return out


def make_decision(root: Path, run_dir: Path, out: Path) -> Path:
    """The decision folder of the pypi run folder ``run_dir`` (24 train images hold out 5: rate 0.2)."""
    decision = {"rule": "normal_quantile", "false_alarm_rate": 0.2}
    decide_category(run_job(root, "key"), run_dir, out, decision, 0.2, 0, ["cutpaste", "noise"])
    return out


def copy_with_key(run_dir: Path, out: Path, key: str) -> Path:
    """The same real run folder under another run key (a re-run with changed params)."""
    shutil.copytree(run_dir, out)
    record = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps(record | {"run_key": key}))
    return out


def write_params(path: Path, root: Path, store: Path, **mlflow_extra) -> Path:
    params = {
        "dataset": "mini",
        "datasets": {"mini": {"root": str(root), "categories": ["kolektorsdd"]}},
        "method": "patchcore",
        "image_size": 96,
        "methods": {"patchcore": {"coreset_ratio": 0.05}},
        "mlflow": {
            "tracking_uri": f"sqlite:///{store / 'mlflow.db'}",
            "artifact_root": str(store / "artifacts"),
            **mlflow_extra,
        },
    }
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_root) -> Path:
    return make_run_folder(data_root, tmp_path_factory.mktemp("runs") / "good", "key-good", history=HISTORY)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def params(tmp_path_factory, data_root, store):
    return load_params(write_params(tmp_path_factory.mktemp("p") / "params.yaml", data_root, store))


@pytest.fixture(scope="module")
def logged(run_dir, params) -> dict:
    return log_run(run_dir, params)


def test_log_run_records_params_metrics_curves_artifacts_and_version(logged, run_dir, params, store) -> None:
    assert logged["model_name"] == MODEL and logged["version"] == "1" and not logged["skipped"]
    client = MlflowClient(params.mlflow.tracking_uri)
    record = json.loads((run_dir / "metrics.json").read_text())

    experiment = client.get_experiment_by_name("adaptad-mini")
    assert experiment.artifact_location == (store / "artifacts" / "mini").resolve().as_uri()
    run = client.get_run(logged["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "kolektorsdd-patchcore"
    assert run.info.experiment_id == experiment.experiment_id
    tags = run.data.tags
    assert tags["run_key"] == "key-good" and tags["data_version"] == "data-v1"
    assert tags["method"] == "patchcore" and tags["category"] == "kolektorsdd" and tags["dataset"] == "mini"
    assert tags["git_commit"] and tags["panda.fisher"] == "none"
    assert tags["code_version"].startswith(("code-", "src-"))
    p = run.data.params
    assert p["method"] == "patchcore" and p["image_size"] == "96" and p["weights"] == "pypi"
    assert p["patchcore.coreset_ratio"] == "0.05" and p["seed"] == "0" and p["train.batch_size"] == "16"
    assert p["levels"] == json.dumps(record["spec"]["levels"]) and "evaluate.batch_size" in p
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "fit_seconds"):
        assert run.data.metrics[key] == pytest.approx(record["metrics"][key])
    loss = client.get_metric_history(logged["run_id"], "train/loss")
    assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == [(1, 0.5), (2, 0.25)]
    assert [m.step for m in client.get_metric_history(logged["run_id"], "train/val_auroc")] == [
        1
    ]  # NaN skipped
    artifacts = {a.path for a in client.list_artifacts(logged["run_id"])}
    assert {"heatmaps.png", "curves.png", "roc.csv", "pro.csv", "scores.parquet", "metrics.json"} <= artifacts

    version = client.get_model_version_by_alias(MODEL, "challenger")
    assert str(version.version) == "1" and version.run_id == logged["run_id"]
    vt = version.tags
    assert vt["run_key"] == "key-good" and vt["data_version"] == "data-v1" and vt["method"] == "patchcore"
    assert vt["git_commit"] == tags["git_commit"]
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"):
        assert float(vt[key]) == pytest.approx(record["metrics"][key])
    text = version.description
    assert "| image_auroc |" in text and "data-v1" in text and "coreset_ratio" in text
    assert f"#/experiments/{experiment.experiment_id}/runs/{logged['run_id']}" in text
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(MODEL, "champion")


def test_second_log_run_with_the_same_key_does_nothing(logged, run_dir, params) -> None:
    again = log_run(run_dir, params)
    assert again == logged | {"skipped": True}
    client = MlflowClient(params.mlflow.tracking_uri)
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 1
    experiment = client.get_experiment_by_name("adaptad-mini").experiment_id
    assert len(client.search_runs([experiment], "tags.run_key = 'key-good'")) == 1


def test_pyfunc_from_registry_scores_like_the_method(logged, run_dir, data_root, params) -> None:
    use_tracking(params.mlflow.tracking_uri)  # (mlflow.set_tracking_uri would export it)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@challenger")
    signature = model.metadata.get_input_schema()
    assert signature.input_names() == ["image"]
    test = [s for s in scan_mvtec(data_root, "kolektorsdd") if s.split == "test"]
    import pandas as pd

    out = model.predict(pd.DataFrame({"image": [encode_image_file(s.path) for s in test]}))
    assert list(out.columns) == ["score", "anomaly_map", "size"] and len(out) == len(test)
    assert (out["size"] == 96).all() and all(len(m) == 96 * 96 for m in out["anomaly_map"])

    method = load_method(run_dir / "method")
    dataset = ImageDataset(test, method.image_size)
    expected = method.predict(torch.stack([dataset[i]["image"] for i in range(len(dataset))]))
    np.testing.assert_allclose(out["score"].to_numpy(), expected.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        np.stack(out["anomaly_map"]).reshape(-1, 96, 96), expected.maps, rtol=1e-4, atol=1e-5
    )
    evaluated = pq.read_table(run_dir / "scores.parquet").column("score").to_numpy()
    np.testing.assert_allclose(out["score"].to_numpy(), evaluated, rtol=1e-4, atol=1e-5)


def test_failed_logging_leaves_a_failed_run_and_no_version(
    logged, run_dir, params, tmp_path, monkeypatch
) -> None:
    client = MlflowClient(params.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("adaptad-mini").experiment_id

    # the model cannot be logged: the run ends FAILED, nothing is registered
    broken = copy_with_key(run_dir, tmp_path / "broken", "key-broken")

    def no_model(*args, **kwargs):
        raise RuntimeError("artifact store is full")

    monkeypatch.setattr(mlflow.pyfunc, "log_model", no_model)
    with pytest.raises(RuntimeError, match="artifact store is full"):
        log_run(broken, params)
    monkeypatch.undo()
    (failed,) = client.search_runs([experiment], "tags.run_key = 'key-broken'")
    assert failed.info.status == "FAILED"
    assert client.search_model_versions(f"name = '{MODEL}' and tags.run_key = 'key-broken'") == []

    # registration itself fails at the last step (the alias): the new version is removed again
    def no_alias(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("registry went away")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", no_alias)
    with pytest.raises(mlflow.exceptions.MlflowException, match="registry went away"):
        log_run(broken, params)
    monkeypatch.undo()
    runs = client.search_runs([experiment], "tags.run_key = 'key-broken'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]
    assert client.search_model_versions(f"name = '{MODEL}' and tags.run_key = 'key-broken'") == []
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == logged["version"]

    # failed runs do not count as logged: a retry logs and registers
    retry = log_run(broken, params)
    assert not retry["skipped"] and retry["version"] is not None
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == retry["version"]


def test_run_logged_without_registration_is_registered_later(run_dir, data_root, tmp_path) -> None:
    store = tmp_path / "store"
    folder = copy_with_key(run_dir, tmp_path / "unregistered", "key-later")
    off = load_params(write_params(tmp_path / "off.yaml", data_root, store, register_versions=False))
    first = log_run(folder, off)
    assert first["version"] is None and not first["skipped"]
    client = MlflowClient(off.mlflow.tracking_uri)
    assert client.search_model_versions(f"name = '{MODEL}'") == []

    on = load_params(write_params(tmp_path / "on.yaml", data_root, store))
    second = log_run(folder, on)
    assert second["skipped"] and second["run_id"] == first["run_id"] and second["version"] == "1"
    assert client.get_model_version_by_alias(MODEL, "challenger").run_id == first["run_id"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_or_unusable_tracking_uri(tmp_path, params, monkeypatch) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=rf"^mlflow tracking URI {uri}: unreachable \(.+\)$"):
        check_tracking(uri)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TrackingError, match=r"mlflow tracking URI sqlite:///.*cannot create"):
        check_tracking(f"sqlite:///{blocker / 'sub' / 'mlflow.db'}")
    with pytest.raises(TrackingError, match="no database file"):
        check_tracking(f"sqlite:///{tmp_path / 'absent.db'}", must_exist=True)
    check_tracking(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert (tmp_path / "new").is_dir()

    assert resolve_tracking_uri(params) == params.mlflow.tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert resolve_tracking_uri(params) == uri


def test_names_are_sanitised() -> None:
    assert registered_model_name("MVTec AD", "screw/bag") == "adaptad-MVTec-AD-screw-bag"
    assert experiment_name("demo") == "adaptad-demo"


def test_model_example_from_an_array_backed_one_class_image(tmp_path) -> None:
    """One-class sets are arrays (``<file>#<index>``): the model's input example is decoded to a PNG."""
    import pyarrow as pa
    from PIL import Image

    from components.data import FASHION_MNIST_ROOT, oneclass_samples
    from flows.tracking import _example_image

    if not Path(FASHION_MNIST_ROOT).is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    test = [s for s in oneclass_samples("fashion_mnist", FASHION_MNIST_ROOT, 8) if s.split == "test"][:50]
    rows = {"path": [s.path for s in test], "label": [s.label for s in test]}
    pq.write_table(pa.table(rows), tmp_path / "scores.parquet")
    (tmp_path / "scratch").mkdir()
    example = _example_image(tmp_path, tmp_path / "scratch")
    assert example is not None and Path(example).parent == tmp_path / "scratch"
    assert Image.open(example).size == (28, 28)
    assert "#" in test[0].path


def test_a_store_is_created_whole_or_not_at_all(tmp_path) -> None:
    """A process killed while MLflow creates a fresh sqlite store's tables leaves no store behind (a
    half-migrated one could never be opened again), and the next creation succeeds."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from flows.tracking import create_store

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    code = f"from flows.tracking import create_store; create_store({uri!r})"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".mlflow.db.*.creating")) and child.poll() is None:
        assert time.monotonic() < deadline, "the store's scratch file never appeared"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not db.exists(), "a killed creation left a store behind"
    create_store(uri)
    assert db.is_file() and not list(tmp_path.glob(".*.creating"))
    assert [e.name for e in MlflowClient(tracking_uri=uri).search_experiments()] == ["Default"]
    create_store(uri)  # an existing store is left alone
    assert [e.name for e in MlflowClient(tracking_uri=uri).search_experiments()] == ["Default"]
