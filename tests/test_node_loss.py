"""Two Ray nodes on this machine, one lost mid-training (issue 22, item 3).

``ray.cluster_utils.Cluster`` starts a head and a second node as separate raylets with their own
resources; ``train.placement_strategy: SPREAD`` puts one DDP rank on each. Removing the second node kills
its raylet and every worker on it (the node, not one worker). The job must resume from its last checkpoint
on the node that is left and end with the same weights as an unfaulted run; through the pipeline, with one
registered version. A grid job whose node dies while it evaluates there is retried by Prefect on the other
node and the grid finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import subprocess
import tempfile
import threading
import time

import psutil
import pytest
import yaml

from components.data import scan_mvtec
from components.methods import MethodSpec
from flows.train import TrainJob, train
from tests.conftest import REPO, copy_subset, service_env

TIMING = ("epoch_seconds", "train_seconds", "monitor_seconds")


@pytest.fixture(scope="module")
def cluster():
    """A head node with 2 CPUs (room for both ranks once the second node is gone); tests add the second."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short socket paths
    head = {"num_cpus": 2, "include_dashboard": False}
    nodes = Cluster(initialize_head=True, head_node_args=head)
    yield nodes
    nodes.shutdown()


def second_node(nodes):
    return nodes.add_node(num_cpus=1)


def worker_titles(node) -> list[str]:
    """Process titles (command lines) of the processes ``node``'s raylet started: its Ray workers."""
    titles = []
    for info in node.all_processes.get("raylet", []):
        for proc in psutil.Process(info.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                titles.append(" ".join(proc.cmdline()))
    return titles


def train_workers(node) -> list[str]:
    """The Ray Train workers on ``node``."""
    return [title for title in worker_titles(node) if "RayTrainWorker" in title]


def wait_for(pattern: str, alive, seconds: float = 300) -> bool:
    """Wait until a file matches ``pattern`` (True), or the work ends first (False)."""
    deadline = time.monotonic() + seconds
    while not glob.glob(pattern):
        if not alive():
            return False
        assert time.monotonic() < deadline, f"nothing matched {pattern} in {seconds} s"
        time.sleep(0.2)
    return True


def test_a_lost_node_resumes_on_the_rest_with_the_unfaulted_weights(
    cluster, industrial_root, tmp_path
) -> None:
    import ray

    node = second_node(cluster)
    ray.shutdown()  # a cluster an earlier test left attached would take this driver
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        samples = [s for s in scan_mvtec(industrial_root, "kolektorsdd") if s.split == "train"][:20]
        options = {"epochs": 4, "gallery": 2, "early_stopping": False}  # the last weights are kept
        spec = MethodSpec("panda", "tf_efficientnet_lite0", "pypi", None, 64, options)
        job = TrainJob(
            "lost", spec, samples, batch_size=4, num_workers=2, max_failures=2,
            storage=str(tmp_path / "ray"), placement_strategy="SPREAD",
        )  # fmt: skip
        holder: dict = {}
        thread = threading.Thread(target=lambda: holder.update(r=train(job, tmp_path / "out")), daemon=True)
        thread.start()
        assert wait_for(f"{tmp_path}/ray/lost/checkpoint_manager_snapshot.json", thread.is_alive), holder
        assert train_workers(node) and train_workers(cluster.head_node), "SPREAD did not use both nodes"
        lost_at = time.perf_counter()
        cluster.remove_node(node, allow_graceful=False)
        thread.join(timeout=600)
        assert not thread.is_alive() and "r" in holder, "training did not finish after the node was lost"
        faulted = holder["r"].summary
        resumed_in = time.perf_counter() - lost_at
        assert faulted["restarts"] >= 1 and [row["epoch"] for row in faulted["history"]] == [1, 2, 3, 4]

        whole = dataclasses.replace(job, run_key="whole", placement_strategy="PACK")
        unfaulted = train(whole, tmp_path / "ref")
        assert unfaulted.summary["restarts"] == 0
        weights = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
        assert weights and all(
            (tmp_path / "out" / w).read_bytes() == (tmp_path / "ref" / w).read_bytes() for w in weights
        ), "the resumed run's weights differ from the unfaulted run's"
        assert faulted["history"][-1]["weight_drift"] > 0  # the weights moved: the comparison means something

        def strip(history: list[dict]) -> list[dict]:
            return [{k: v for k, v in row.items() if k not in TIMING} for row in history]

        assert strip(faulted["history"]) == strip(unfaulted.summary["history"])
        print(
            f"node lost after a checkpoint: finished {resumed_in:.1f} s later; {faulted['seconds']:.1f} s "
            f"in all vs {unfaulted.summary['seconds']:.1f} s unfaulted"
        )
    finally:
        ray.shutdown()


def test_a_pipeline_that_loses_a_node_registers_one_version(cluster, industrial_root, tmp_path) -> None:
    data = tmp_path / "data"
    copy_subset(industrial_root / "kolektorsdd", data / "kolektorsdd", 16, 6, 6)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = {"one": {"root": str(data), "categories": ["kolektorsdd"]}}
    params.update(dataset="one", method="panda", image_size=64, manifests_dir=str(tmp_path / "manifests"))
    params["methods"]["panda"].update(epochs=4, gallery=2)
    params["decision"]["false_alarm_rate"] = 0.34  # 16 train images hold out 3
    params["train"].update(placement_strategy="SPREAD", storage=str(tmp_path / "ray"), batch_size=4)
    params["pipeline"].update(
        retries=0,
        runs_dir=str(tmp_path / "runs"),
        metrics_file=str(tmp_path / "metrics.json"),
        plots_dir=str(tmp_path / "plots"),
    )
    db = tmp_path / "mlflow.db"
    params["mlflow"].update(tracking_uri=f"sqlite:///{db}", artifact_root=str(tmp_path / "art"))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    env = service_env(tmp_path) | {"RAY_ADDRESS": cluster.address}
    subprocess.run(["adaptad", "prepare", "--params", str(path)], env=env, check=True, capture_output=True)

    node = second_node(cluster)
    run = subprocess.Popen(
        ["adaptad", "pipeline", "--params", str(path)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        checkpoint = f"{tmp_path}/ray/*/checkpoint_manager_snapshot.json"
        assert wait_for(checkpoint, lambda: run.poll() is None), run.communicate()[0][-4000:]
        assert train_workers(node), "no training rank ran on the second node"
        cluster.remove_node(node, allow_graceful=False)
        out, _ = run.communicate(timeout=600)
    finally:
        run.kill()
    assert run.returncode == 0, out[-4000:]
    (trained,) = (tmp_path / "runs").glob("*/trained/summary.json")
    assert json.loads(trained.read_text())["restarts"] >= 1
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    versions = client.search_model_versions("name='adaptad-one-kolektorsdd'")
    assert len(versions) == 1, [v.version for v in versions]
    assert json.loads((tmp_path / "metrics.json").read_text())["categories"]["kolektorsdd"]["image_auroc"] > 0


def test_a_grid_job_whose_node_dies_is_retried_and_finishes(industrial_root, tmp_path) -> None:
    """Two 1-CPU nodes and two 1-CPU grid jobs at once: one job evaluates on each node. The second node is
    removed while its job runs there; Prefect retries that job on the head and the grid finishes."""
    import pyarrow.parquet as pq
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        node = second_node(nodes)
        home = tmp_path
        data = home / "data"
        for category in ("kolektorsdd", "magnetic_tile"):
            copy_subset(industrial_root / category, data / category, 40, 10, 6)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["datasets"] = {"two": {"root": str(data), "categories": ["kolektorsdd", "magnetic_tile"]}}
        params.update(dataset="two", image_size=64, manifests_dir=str(home / "manifests"))
        params["methods"]["padim"] = {"d": 40}
        params["pipeline"].update(retries=1, retry_delay_seconds=0)
        params["grid"] = {
            "datasets": ["two"], "methods": ["padim"], "seeds": [0], "concurrency": 2, "cpus_per_job": 1,
            "runs_dir": str(home / "jobs"), "output": str(home / "grid"),
            "metrics_file": str(home / "grid.json"), "plots_dir": str(home / "plots"),
        }  # fmt: skip
        params["decision"]["false_alarm_rate"] = 0.2  # 40 train images hold out 8
        params["mlflow"].update(
            tracking_uri=f"sqlite:///{home / 'mlflow.db'}", artifact_root=str(home / "art")
        )
        path = home / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        env = service_env(home) | {"RAY_ADDRESS": nodes.address}
        subprocess.run(
            ["adaptad", "prepare", "--params", str(path)], env=env, check=True, capture_output=True
        )
        grid = subprocess.Popen(
            ["adaptad", "grid", "--params", str(path)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            victim = None
            deadline = time.monotonic() + 300
            while victim is None and grid.poll() is None:
                assert time.monotonic() < deadline, "no grid job ran on the second node"
                victim = next((t for t in worker_titles(node) if t.startswith("ray::evaluate:")), None)
                time.sleep(0.05)
            assert victim, grid.communicate()[0][-4000:]
            nodes.remove_node(node, allow_graceful=False)
            out, _ = grid.communicate(timeout=600)
        finally:
            grid.kill()
        assert grid.returncode == 0, out[-4000:]
        rows = {r["category"]: r for r in pq.read_table(home / "grid" / "jobs.parquet").to_pylist()}
        assert all(r["status"] == "done" for r in rows.values()), rows
        lost = [c for c in rows if f"/{c}/" in victim]
        assert len(lost) == 1 and rows[lost[0]]["attempts"] == 2, (victim, rows)
        (other,) = set(rows) - set(lost)
        assert rows[other]["attempts"] == 1
    finally:
        nodes.shutdown()
