"""The generic Ray Train loop on a real local Ray cluster: 2 DDP workers, checkpoints, a killed worker."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from components.data import scan_mvtec
from components.methods import MethodSpec
from flows.train import TrainJob, train


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short socket paths
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def kolektor_train(industrial_root):
    return [s for s in scan_mvtec(industrial_root, "kolektorsdd") if s.split == "train"][:20]


def job(tmp_path: Path, train_samples, key: str, epochs: int) -> TrainJob:
    spec = MethodSpec(
        "panda", "tf_efficientnet_lite0", "pypi", None, 64, {"epochs": epochs, "gallery": 2, "patience": 9}
    )
    return TrainJob(
        key, spec, train_samples, batch_size=4, num_workers=2, max_failures=2, storage=str(tmp_path / "ray")
    )


def _ray_processes(name: str) -> list[psutil.Process]:
    """This test process's Ray processes whose command line names ``name`` (an actor class)."""
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if name in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _train_workers() -> list[psutil.Process]:
    return _ray_processes("RayTrainWorker")


def test_two_ddp_workers_train_checkpoint_and_reuse(ray_cluster, kolektor_train, tmp_path) -> None:
    result = train(job(tmp_path, kolektor_train, "ddp", 2), tmp_path / "out")
    s = result.summary
    assert s["epochs"] == 2 and s["workers"] == 2 and s["restarts"] == 0 and not s["use_gpu"]
    assert [row["epoch"] for row in s["history"]] == [1, 2]
    assert all(0 <= row["val_auroc"] <= 1 and row["loss"] > 0 for row in s["history"])
    assert s["history"][-1]["weight_drift"] > 0  # the trainable stages really moved
    assert (result.directory / "backbone.safetensors").stat().st_size > 1_000_000
    checkpoints = sorted(p for p in (tmp_path / "ray" / "ddp").glob("checkpoint_*") if p.is_dir())
    assert checkpoints and all((c / "progress.json").is_file() for c in checkpoints)
    # the same output folder is reused without touching Ray
    again = train(job(tmp_path, kolektor_train, "ddp", 2), tmp_path / "out")
    assert again.summary == json.loads((tmp_path / "out" / "summary.json").read_text())


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_cluster, kolektor_train, tmp_path) -> None:
    holder: dict = {}
    t = threading.Thread(
        target=lambda: holder.update(
            result=train(job(tmp_path, kolektor_train, "fault", 4), tmp_path / "out")
        ),
        daemon=True,
    )
    t.start()
    run = tmp_path / "ray" / "fault"
    deadline = time.monotonic() + 240
    # wait until Ray has registered a checkpoint (its manager snapshot names it), then kill a worker
    while not (run / "checkpoint_manager_snapshot.json").is_file():
        assert time.monotonic() < deadline and t.is_alive(), "no checkpoint appeared"
        time.sleep(0.2)
    victims = _train_workers()
    assert victims, "no RayTrainWorker process found"
    victims[-1].send_signal(signal.SIGKILL)
    t.join(timeout=400)
    assert not t.is_alive()
    s = holder["result"].summary
    assert s["restarts"] >= 1 and s["epochs"] == 4
    assert [row["epoch"] for row in s["history"]] == [1, 2, 3, 4]  # no epoch lost or repeated


def test_a_tune_trial_whose_driver_dies_is_retried_and_resumes(ray_cluster, kolektor_train, tmp_path) -> None:
    """Tune retries a trial whose driver process (ImplicitFunc) is killed. The dead Train run's placement
    group holds both CPUs of this cluster (no dashboard, as adaptad starts it); the trial's sweep frees it,
    and the retry resumes the Train run from its checkpoint: no epoch lost or repeated."""
    import ray

    from flows.params import Tune
    from flows.tune import free_orphaned_placement_groups, trial_jobs, tune_and_train

    base = job(tmp_path, kolektor_train, "tuned", 4)
    tune = Tune(space={"lr": [0.01]}, max_failures=1)
    ((_, trial),) = trial_jobs(base, tune)
    holder: dict = {}
    t = threading.Thread(
        target=lambda: holder.update(result=tune_and_train(base, tune, tmp_path / "job" / "trained")),
        daemon=True,
    )
    t.start()
    deadline = time.monotonic() + 240
    while not (tmp_path / "ray" / trial.run_key / "checkpoint_manager_snapshot.json").is_file():
        assert time.monotonic() < deadline and t.is_alive(), "no checkpoint appeared"
        time.sleep(0.2)
    drivers = _ray_processes("ImplicitFunc")
    assert len(drivers) == 1, "expected one Tune trial driver"
    drivers[0].send_signal(signal.SIGKILL)
    t.join(timeout=400)
    assert not t.is_alive(), "the retried trial did not finish (its CPUs were never freed?)"
    s = holder["result"].summary
    assert s["epochs"] == 4 and [row["epoch"] for row in s["history"]] == [1, 2, 3, 4]
    assert s["tune"]["chosen"] == 0 and s["tune"]["trials"][0]["run_key"] == trial.run_key
    assert free_orphaned_placement_groups() == 0  # nothing left behind
    assert ray.available_resources().get("CPU") == 2


def test_recorded_epochs_give_the_selection_regret(
    ray_cluster, kolektor_train, industrial_root, tmp_path
) -> None:
    """record_epochs: every epoch's weights are kept; after training the evaluation scores each one on the
    test split and writes selection.json, whose kept epoch is the model the run folder holds."""
    from safetensors.torch import load_file

    from flows.evaluate import CategoryJob, evaluate_category

    recorded = dataclasses.replace(job(tmp_path, kolektor_train, "epochs", 2), record_epochs=True)
    result = train(recorded, tmp_path / "trained")
    s = result.summary
    assert s["epoch_weights"] == "epochs" and s["selection_signal"] == "val_auroc"
    assert s["pretrained_signal"] is not None and 0 <= s["kept_epoch"] <= 2
    epochs = result.directory / "epochs"
    assert sorted(int(d.name) for d in epochs.iterdir()) == [0, 1, 2]
    kept = load_file(str(epochs / str(s["kept_epoch"]) / "backbone.safetensors"))
    final = load_file(str(result.directory / "backbone.safetensors"))
    assert all(torch.equal(kept[k], final[k]) for k in final)  # the kept epoch is the final model
    first = load_file(str(epochs / "0" / "backbone.safetensors"))
    assert any(
        not torch.equal(first[k], load_file(str(epochs / "2" / "backbone.safetensors"))[k]) for k in first
    )

    test = [s_ for s_ in scan_mvtec(industrial_root, "kolektorsdd") if s_.split == "test"]
    test = [t for t in test if t.label == 0][:6] + [t for t in test if t.label == 1][:6]
    evaluation = CategoryJob(
        "industrial",
        "kolektorsdd",
        "epochs",
        "v",
        recorded.spec,
        kolektor_train,
        test,
        batch_size=4,
        loader_workers=0,  # no forked loader workers in a process that holds a Ray driver (as in a Ray task)
        trained=result.directory,
        training=s,
    )
    out = evaluate_category(evaluation, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert [r["epoch"] for r in record["epochs"]] == [0, 1, 2] and record["kept_epoch"] == s["kept_epoch"]
    # the run folder's model is the kept epoch's: the same test image AUROC
    assert record["kept_test_image_auroc"] == pytest.approx(out["metrics"]["image_auroc"], abs=1e-9)
    aurocs = [r["test_image_auroc"] for r in record["epochs"]]
    assert (
        record["regret"] == pytest.approx(max(aurocs) - aurocs[record["kept_epoch"]])
        and record["regret"] >= 0
    )
    assert record["epochs"][0]["signal"] == s["pretrained_signal"]
    assert [r["signal"] for r in record["epochs"][1:]] == [h["val_auroc"] for h in s["history"]]
    assert out["metrics"]["selection_regret"] == record["regret"]
