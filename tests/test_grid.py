"""The benchmark grid end to end — real Prefect engine (ephemeral API), real local Ray cluster, MLflow on
sqlite — on small subsets of the shared industrial data sets (2 frozen methods × 2 categories × 1 seed at
64 px) and a Fashion-MNIST slice through the one-class protocol.

All grid runs share one process (tests/grid_runner.py), so the services start once:

1. ``first``: one magnetic_tile train image is hidden (that category's jobs fail, retried once) and the
   Ray worker evaluating kolektorsdd/padim is SIGKILLed mid-run (Prefect retries it, it finishes);
2. ``rerun``: the image is back — only the two missing jobs run;
3. ``again``: nothing changed — nothing is recomputed, no MLflow run is added;
4. ``plan``: the dry-run table now says every job is done;
5. ``fmnist``: two Fashion-MNIST classes as the normal one, padim, every test class scored;
6. ``topology``: a dataset-scope method (TPTL) — one Ray Train job for both categories, banks per category
   — and PatchCore on the backbone it adapted (``grid.adapted``), sharing that training job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from components.data import FASHION_MNIST_ROOT
from tests.conftest import run_in_one_process, service_env, two_category_params
from tests.prefect_server import temporary_prefect

SIZE = 64
KILL = "evaluate:two/kolektorsdd/padim/"  # the Ray task name of one job (its worker's process title)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, industrial_root):
    home = tmp_path_factory.mktemp("grid")
    params = two_category_params(industrial_root, home, (12, 4, 4, 1), SIZE)
    if Path(FASHION_MNIST_ROOT).is_dir():
        params["datasets"]["fmnist"] = {
            "layout": "fashion_mnist",
            "root": FASHION_MNIST_ROOT,
            "categories": ["trouser", "bag"],
            "limit_train": 40,
            "limit_test": 10,
        }
    params["methods"].update(padim={"d": 40}, patchcore={"coreset_ratio": 0.1})
    params["train"].update(storage=str(home / "ray"))
    params["pipeline"].update(retries=1, retry_delay_seconds=0, runs_dir=str(home / "pipeline-runs"))
    params["grid"] = {
        "datasets": ["two"],
        "methods": ["padim", "patchcore"],
        "seeds": [0],
        "concurrency": 2,
        "cpus_per_job": 1,
        "runs_dir": str(home / "jobs"),
        "output": str(home / "grid"),
        "metrics_file": str(home / "metrics" / "grid.json"),
        "plots_dir": str(home / "plots" / "grid"),
    }
    params["mlflow"].update(tracking_uri=f"sqlite:///{home / 'mlflow.db'}", artifact_root=str(home / "art"))
    path = home / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    from flows.stages import prepare

    for dataset in params["datasets"]:  # the manifests (adaptad prepare --dataset NAME), in this process
        prepare(path, dataset)
    return home, path, service_env(home)


@pytest.fixture(scope="module")
def dry(setup):
    """``adaptad grid --dry-run`` before anything ran."""
    home, path, env = setup
    out = subprocess.run(
        ["adaptad", "grid", "--params", str(path), "--dry-run"], env=env, capture_output=True, text=True
    )
    return out, sorted(p.name for p in home.iterdir())


@pytest.fixture(scope="module")
def steps(setup, dry):
    home, path, env = setup
    victim = sorted((home / "data" / "magnetic_tile" / "train" / "good").iterdir())[0]
    hidden = home / f"hidden-{victim.name}"
    plan = [
        {"name": "first", "move": [[str(victim), str(hidden)]], "kill": KILL},
        {"name": "rerun", "move": [[str(hidden), str(victim)]]},
        {"name": "again"},
        {"name": "plan", "plan": True},
    ]
    if Path(FASHION_MNIST_ROOT).is_dir():
        fmnist = {"grid.datasets": ["fmnist"], "grid.methods": ["padim"], "grid.output": str(home / "fm")}
        fmnist |= {"grid.metrics_file": str(home / "fm.json"), "grid.plots_dir": str(home / "fm-plots")}
        plan.append({"name": "fmnist", "overrides": fmnist})
    # a dataset-scope method (TPTL): ONE Ray Train job for both categories, then banks per category
    topology = {"grid.methods": ["topology"], "grid.adapted": {"patchcore": ["topology"]}}
    topology |= {"grid.output": str(home / "topo")}
    topology |= {"grid.metrics_file": str(home / "topo.json"), "grid.plots_dir": str(home / "topo-plots")}
    topology |= {f"methods.topology.{k}": v for k, v in {"epochs": 1, "lr": 1e-3, "anchor_batch": 4}.items()}
    plan.append({"name": "topology", "overrides": topology})
    lines, out = run_in_one_process("grid_runner", path, plan, env, "GRID-RESULT", timeout=1200)
    (home / "runner.log").write_text(out.stdout + out.stderr)
    return {line["name"]: line for line in lines}, victim, out


def _jobs(home: Path, step: str) -> dict[tuple[str, str], dict]:
    outputs = {"fmnist": "fm.fmnist", "topology": "topo.topology"}
    folder = home / outputs.get(step, f"grid.{step}")  # the output after the step
    rows = pq.read_table(folder / "jobs.parquet").to_pylist()
    return {(r["category"], r["method"]): r for r in rows}


def _children(line: dict) -> list[dict]:
    return [r for r in line["mlflow"] if r["tags"].get("adaptad.grid") == "job"]


def test_dry_run_lists_every_job_and_its_cost_before_anything_runs(dry) -> None:
    out, created = dry
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["dataset", "category", "method"] and "run key" in lines[0]
    jobs = [line.split() for line in lines[1:-1]]
    assert len(jobs) == 4
    assert {(j[1], j[2]) for j in jobs} == {
        (c, m) for c in ("kolektorsdd", "magnetic_tile") for m in ("padim", "patchcore")
    }
    assert all(j[4] == str(SIZE) and j[5] == "0" and len(j[6]) == 16 and j[7] == "todo" for j in jobs)
    assert all(float(j[8]) > 0 and j[9] == "model" for j in jobs)  # nothing measured yet: the cost model
    assert lines[-1].startswith("4 jobs: 0 done, 4 to run; estimated")
    # nothing ran: no run folder, no leaderboard, no MLflow store
    assert not {"jobs", "grid", "mlflow.db", "art", "metrics"} & set(created), created


def test_a_killed_job_is_retried_and_failing_jobs_are_named_while_the_others_finish(setup, steps) -> None:
    home, _, _ = setup
    lines, victim, _ = steps
    first = lines["first"]
    killed = first["killed"]
    assert killed and killed[0].startswith("ray::" + KILL), killed  # a job's worker process was lost
    error = first["error"]
    assert error and error.startswith("RuntimeError: grid jobs failed:"), error
    failed = error.split("grid jobs failed:")[1]
    assert "two/magnetic_tile/padim/" in failed and "two/magnetic_tile/patchcore/" in failed
    assert "kolektorsdd" not in failed and victim.name in failed
    jobs = _jobs(home, "first")
    assert jobs[("kolektorsdd", "padim")]["status"] == "done"
    assert jobs[("kolektorsdd", "padim")]["attempts"] == 2  # killed once, retried by Prefect
    assert jobs[("kolektorsdd", "patchcore")]["status"] == "done"
    assert jobs[("kolektorsdd", "patchcore")]["attempts"] == 1  # the others went on
    for method in ("padim", "patchcore"):
        row = jobs[("magnetic_tile", method)]
        assert row["status"] == "failed" and row["attempts"] == 2 and victim.name in row["reason"]
    assert len(first["folders"]) == 2  # only the finished jobs have run folders
    assert not list((home / "jobs").rglob(".evaluation*"))  # nothing half-written is left
    board = (home / "grid.first" / "leaderboard.md").read_text()
    assert "## Failed jobs" in board and "kolektorsdd | padim" in board
    parents = [r for r in first["mlflow"] if r["tags"].get("adaptad.grid") == "parent"]
    assert len(parents) == 1 and parents[0]["status"] == "FAILED"
    assert len(_children(first)) == 2


def test_the_rerun_finishes_only_the_missing_jobs(steps) -> None:
    lines, _, _ = steps
    first, rerun = lines["first"], lines["rerun"]
    assert rerun["error"] is None, rerun["error"]
    assert rerun["result"]["computed"] == 2 and rerun["result"]["reused"] == 2
    for key, mtime in first["folders"].items():  # the finished jobs' results are intact, not recomputed
        assert rerun["folders"][key] == mtime
    assert len(rerun["folders"]) == 4
    parents = [r for r in rerun["mlflow"] if r["tags"].get("adaptad.grid") == "parent"]
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED"  # the same parent, now finished
    assert {r["id"] for r in _children(first)} < {r["id"] for r in _children(rerun)}
    assert len(_children(rerun)) == 4


def test_rerunning_a_finished_grid_does_no_work(steps) -> None:
    lines, _, _ = steps
    rerun, again = lines["rerun"], lines["again"]
    assert again["error"] is None and again["result"]["computed"] == 0 and again["result"]["reused"] == 4
    assert again["folders"] == rerun["folders"]  # nothing recomputed
    assert [r["id"] for r in again["mlflow"]] == [r["id"] for r in rerun["mlflow"]]  # no new MLflow runs
    table = lines["plan"]["result"].splitlines()
    assert all(line.split()[7] == "done" for line in table[1:-1]) and table[-1].startswith("4 jobs: 4 done")


def test_the_leaderboard_in_markdown_parquet_dvc_prefect_and_mlflow(setup, steps) -> None:
    home, _, _ = setup
    lines, _, _ = steps
    again = lines["again"]
    board = pq.read_table(home / "grid" / "leaderboard.parquet").to_pylist()
    assert {(r["category"], r["method"]) for r in board} == {
        (c, m) for c in ("kolektorsdd", "magnetic_tile") for m in ("padim", "patchcore")
    }
    for r in board:
        assert r["seeds"] == 1 and r["image_auroc_std"] == 0.0
        for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
            assert 0 <= r[f"{k}_mean"] <= 1, (k, r)
        assert r["fit_seconds"] > 0 and r["inference_seconds"] > 0 and r["images_per_second"] > 0
        assert r["peak_rss_mb"] > 100  # the evaluation process's own peak (torch + backbone)
        # each job's own thresholds (held-out normal train images) and the test figures at them
        assert 0 <= r["image_fpr_mean"] <= 1 and 0 <= r["image_recall_mean"] <= 1, r
    assert len(list((home / "jobs").glob("*/decision-*/decision.json"))) >= 4
    text = (home / "grid" / "leaderboard.md").read_text()
    assert "## two" in text and "Mean over the 2 categories" in text and "peak RSS MB" in text
    assert "FPR at threshold" in text
    for category in ("kolektorsdd", "magnetic_tile"):
        assert (home / "grid" / "heatmaps" / f"two__{category}.png").is_file()
        assert (home / "plots" / "grid" / "heatmaps" / f"two__{category}.png").is_file()
    metrics = json.loads((home / "metrics" / "grid.json").read_text())
    assert metrics["done"] == 4 and set(metrics["datasets"]["two"]) == {"kolektorsdd", "magnetic_tile"}
    header = (home / "plots" / "grid" / "leaderboard.csv").read_text().splitlines()[0].replace('"', "")
    assert header.startswith("job,dataset,category,variant,image_auroc")
    assert again["artifact"]["count"] >= 1 and "padim" in again["artifact"]["latest"]  # Prefect artifact
    (parent,) = [r for r in again["mlflow"] if r["tags"].get("adaptad.grid") == "parent"]
    children = _children(again)
    assert {c["tags"]["mlflow.parentRunId"] for c in children} == {parent["id"]}
    assert {c["tags"]["run_key"] for c in children} == set(again["folders"])
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    assert {"leaderboard.md", "leaderboard.parquet", "heatmaps"} <= {
        a.path for a in client.list_artifacts(parent["id"])
    }
    child = client.get_run(children[0]["id"])
    assert "image_auroc" in child.data.metrics and "peak_rss_mb" in child.data.metrics


def test_fashion_mnist_one_class_protocol_through_the_grid(setup, steps) -> None:
    if not Path(FASHION_MNIST_ROOT).is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    home, _, _ = setup
    lines, _, _ = steps
    line = lines["fmnist"]
    assert line["error"] is None and line["result"]["jobs"] == 2, line["error"]
    jobs = _jobs(home, "fmnist")
    assert set(jobs) == {("trouser", "padim"), ("bag", "padim")}
    for (category, _), row in jobs.items():
        assert row["status"] == "done" and row["test_images"] == 100  # 10 per class, all 10 classes
        assert row["image_auroc"] > 0.6, row  # the normal class vs the other nine
        assert row["pixel_auroc"] is None  # no masks in the one-class protocol
        metrics = json.loads((home / "jobs" / row["run_key"] / "evaluation" / "metrics.json").read_text())
        assert metrics["category"] == category and metrics["metrics"]["train_images"] == 40


def test_a_dataset_scope_method_trains_once_for_all_its_categories(setup, steps) -> None:
    home, _, _ = setup
    lines, _, _ = steps
    line = lines["topology"]
    assert line["error"] is None and line["result"]["jobs"] == 4, line["error"]
    jobs = _jobs(home, "topology")
    methods = ("topology", "topology+patchcore")  # TPTL, and PatchCore on the backbone TPTL adapted
    assert set(jobs) == {(c, m) for c in ("kolektorsdd", "magnetic_tile") for m in methods}
    (shared,) = {row["shared_key"] for row in jobs.values()}  # one training job for the dataset and both
    assert shared and all(row["status"] == "done" and row["run_key"] != shared for row in jobs.values())
    summary = json.loads((home / "jobs" / shared / "trained" / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["workers"] == 2 and summary["ray_run"].endswith(shared)
    assert [p.name for p in (home / "ray").iterdir() if p.name == shared] == [shared]  # one Ray Train run
    for row in jobs.values():  # each category's banks were built with the shared adapted backbone
        assert 0 <= row["image_auroc"] <= 1 and 0 <= row["pixel_auroc"] <= 1
        train = json.loads((home / "jobs" / row["run_key"] / "evaluation" / "train.json").read_text())
        assert train["run_key"] == shared
    for category in ("kolektorsdd", "magnetic_tile"):
        run = home / "jobs" / jobs[(category, "topology+patchcore")]["run_key"] / "evaluation"
        record = json.loads((run / "metrics.json").read_text())
        assert record["method"] == "patchcore"
        assert record["spec"]["weights"] == str(home / "jobs" / shared / "trained" / "backbone.safetensors")
    assert "topology+patchcore" in (home / "topo.topology" / "leaderboard.md").read_text()
    children = _children(line)
    assert sorted(r["tags"].get("adapted_by", "") for r in children).count("topology") == 2


def _service_processes(exclude: set[int], env: dict[str, str]) -> list[str]:
    """Command lines of the Ray / Prefect API processes not in ``exclude`` (pids seen before) started with
    ``env``'s PREFECT_HOME: ours, not those of another Ray cluster or Prefect server on the machine."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if proc.info["pid"] in exclude or not ("ray" in cmdline or "uvicorn" in cmdline):
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("PREFECT_HOME") == env["PREFECT_HOME"]:
                found.append(cmdline[:160])
    return found


def test_sigterm_stops_a_running_grid_and_every_service_it_started(setup, steps) -> None:
    import psutil

    home, path, env = setup
    env = temporary_prefect(env)  # the grid's own Prefect API must end with it
    before = {p.pid for p in psutil.process_iter()}
    out = home / "stopped"
    overrides = {"grid.methods": "[dn2]", "grid.output": out, "grid.metrics_file": out / "grid.json"}
    overrides |= {"grid.plots_dir": out / "plots"}
    cmd = ["adaptad", "grid", "--params", str(path)]
    cmd += [arg for k, v in overrides.items() for arg in ("-S", f"{k}={v}")]
    with (home / "stopped.log").open("w") as log:  # a file, not a pipe: the grid never blocks on output
        grid = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while grid.poll() is None and time.monotonic() < deadline:  # until a job's Ray worker runs
        if any(c.startswith("ray::evaluate:") for c in _service_processes(before, env)):
            break
        time.sleep(0.2)
    assert grid.poll() is None, "the grid ended before a job ran"
    t0 = time.monotonic()
    grid.send_signal(signal.SIGTERM)
    grid.wait(timeout=60)
    log = (home / "stopped.log").read_text()
    assert grid.returncode == 143, log[-3000:]  # 128 + SIGTERM
    assert time.monotonic() - t0 < 30 and "adaptad grid: stopped" in log, log[-3000:]
    for _ in range(30):  # the local Ray cluster and the Prefect API end with it
        survivors = _service_processes(before, env)
        if not survivors:
            break
        time.sleep(0.5)
    assert not survivors, survivors
    assert not (out / "leaderboard.md").exists()  # nothing written as if the grid had finished
    # the flow run and its unfinished task runs are Cancelled on the Prefect API, not left Running (the API
    # records task runs from their events, asynchronously: those it had not recorded yet are not there)
    with contextlib.closing(sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db")) as db:
        flow_run, state = db.execute("SELECT id, state_type FROM flow_run ORDER BY created DESC").fetchone()
        unfinished = db.execute(
            "SELECT count(*) FROM task_run WHERE flow_run_id = ? AND state_type IN (?, ?, ?)",
            (flow_run, "RUNNING", "PENDING", "SCHEDULED"),
        ).fetchone()[0]
    assert state == "CANCELLED" and unfinished == 0, (state, unfinished)


def test_sigkill_of_the_grid_leaves_none_of_its_processes(setup) -> None:
    """SIGKILL (or the OOM killer) runs no handler: the reaper (flows/reaper.py) ends the Prefect API and
    every Ray process the killed driver had started, its agents included."""
    import psutil

    home, path, env = setup
    env = temporary_prefect(env)  # the reaper must end the grid's own Prefect API
    before = {p.pid for p in psutil.process_iter()}
    out = home / "killed"
    overrides = {"grid.methods": "[dn2]", "grid.output": out, "grid.metrics_file": out / "grid.json"}
    overrides |= {"grid.plots_dir": out / "plots", "grid.runs_dir": home / "killed-jobs"}
    cmd = ["adaptad", "grid", "--params", str(path)]
    cmd += [arg for k, v in overrides.items() for arg in ("-S", f"{k}={v}")]
    with (home / "killed.log").open("w") as log:
        grid = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    started: list[psutil.Process] = []
    while grid.poll() is None and time.monotonic() < deadline:  # until a job's Ray worker runs
        with contextlib.suppress(psutil.Error):
            started = psutil.Process(grid.pid).children(recursive=True)
        if any(c.startswith("ray::evaluate:") for c in _service_processes(before, env)):
            break
        time.sleep(0.2)
    assert grid.poll() is None, "the grid ended before a job ran"
    with contextlib.suppress(psutil.Error):
        started = psutil.Process(grid.pid).children(recursive=True)
    names = {p.name() for p in started if p.is_running()}
    assert any("raylet" in n for n in names) and len(started) > 3, names  # Ray and the API were up
    grid.send_signal(signal.SIGKILL)
    grid.wait(timeout=10)
    for _ in range(60):  # the reaper waits 5 s for a normal shutdown, then ends the rest
        survivors = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not survivors and not _service_processes(before, env):
            break
        time.sleep(0.5)
    assert not survivors and not _service_processes(before, env), (
        [p.cmdline()[:3] for p in survivors if p.is_running()],
        _service_processes(before, env),
    )


def test_a_finished_grid_computes_the_decisions_a_new_rule_needs(setup, steps) -> None:
    """Every job done, but the decision params changed: the thresholds are Ray tasks, so the grid starts
    Ray for them (it used to start none and fail: "Ray has not been started") and recomputes no job."""
    home, path, env = setup
    runs = home / "jobs"
    before = {p: p.stat().st_mtime_ns for p in runs.glob("*/evaluation/metrics.json")}
    out = home / "redecided"
    overrides = {"decision.false_alarm_rate": 0.6, "grid.output": out}  # 0.5 in the steps; 2 held out
    overrides |= {"grid.metrics_file": out / "grid.json", "grid.plots_dir": out / "plots"}
    cmd = ["adaptad", "grid", "--params", str(path)]
    cmd += [arg for k, v in overrides.items() for arg in ("-S", f"{k}={v}")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    base = {(c, m) for c in ("kolektorsdd", "magnetic_tile") for m in ("padim", "patchcore")}
    board = pq.read_table(out / "leaderboard.parquet").to_pylist()
    assert {(r["category"], r["method"]) for r in board} == base
    jobs = [p.parent.parent for p in before if json.loads(p.read_text())["dataset"] == "two"]
    jobs = [  # the steps' padim and patchcore jobs (not PatchCore on TPTL's backbone: its own rule)
        j
        for j in jobs
        if json.loads((j / "evaluation" / "metrics.json").read_text())["method"] in ("padim", "patchcore")
        and "adapted_by" not in json.loads((j / "evaluation" / "train.json").read_text())
    ]
    assert len(jobs) == 4 and all(len(list(j.glob("decision-*/decision.json"))) == 2 for j in jobs)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # no evaluation recomputed


def test_a_grid_started_beside_another_copy_of_the_code_stops_before_any_job(setup, tmp_path) -> None:
    """Ray puts the working directory first on its workers' path: started in a folder that holds another
    components/ (an older clone), the workers would run that code under this code's run keys. Refused."""
    import shutil

    _home, path, env = setup
    other = tmp_path / "older-clone"
    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "components", other / "components", ignore=shutil.ignore_patterns("__pycache__"))
    with (other / "components" / "monitor.py").open("a") as f:
        f.write("# another version of the result code\n")
    runs, out = tmp_path / "jobs", tmp_path / "grid"
    overrides = {"grid.methods": "[gaussian]", "grid.runs_dir": runs, "grid.output": out}
    overrides |= {"grid.metrics_file": out / "grid.json", "grid.plots_dir": out / "plots"}
    cmd = ["adaptad", "grid", "--params", str(path)]
    cmd += [arg for k, v in overrides.items() for arg in ("-S", f"{k}={v}")]
    result = subprocess.run(cmd, cwd=other, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert "Ray's workers import the result code" in log and str(other) in log, log[-3000:]
    assert not list(runs.glob("*/evaluation/metrics.json")) and not (out / "leaderboard.md").exists()


def _cluster_usage(address: str) -> dict:
    """Ray's own accounting, read from the GCS (no driver, no dashboard): resources in use on the cluster
    and the shapes of the tasks waiting for resources."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(address)
    used: dict[str, float] = {}
    for node in status.active_nodes + status.idle_nodes:
        for usage in node.resource_usage.usage:
            used[usage.resource_name] = used.get(usage.resource_name, 0.0) + usage.used
    demands = status.resource_demands.ray_task_actor_demand
    waiting = [(dict(b.bundle), b.count) for d in demands for b in d.bundles_by_count]
    return {"used": used, "waiting": waiting}


def test_gpu_jobs_are_packed_one_per_gpu_while_cpus_are_free(setup, tmp_path) -> None:
    """A Ray head that declares 2 GPUs and 4 CPUs (Ray schedules declared GPUs like real ones; without CUDA
    each job then runs on the CPU), a grid of 4 frozen jobs, all 4 in flight, 1 CPU each: the CPUs and the
    grid would run 4 at once, but every evaluation asks for one GPU, so Ray runs 2 — one per GPU — and the
    other 2 wait with CPUs free. Read off Ray's own accounting while the grid runs."""
    import tempfile
    import threading

    from tests.test_tracking import free_port

    _home, path, env = setup
    port = free_port()
    address = f"127.0.0.1:{port}"
    ray_tmp = tempfile.mkdtemp(prefix="rg-", dir="/tmp")  # socket paths stay under 107 bytes
    head_cmd = ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port)]
    head_cmd += ["--num-cpus", "4", "--num-gpus", "2", "--include-dashboard", "false"]
    head_cmd += ["--disable-usage-stats", "--temp-dir", ray_tmp]
    head_log = tmp_path / "head.log"
    with head_log.open("w") as log:
        head = subprocess.Popen(head_cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    samples: list[dict] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            with contextlib.suppress(Exception):  # the GCS may not answer every poll on a busy machine
                samples.append(_cluster_usage(address))

    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in head_log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, head_log.read_text()[-3000:]
            time.sleep(0.5)
        runs, out = tmp_path / "jobs", tmp_path / "grid"
        overrides = {"grid.concurrency": 4, "grid.cpus_per_job": 1, "grid.runs_dir": runs, "grid.output": out}
        overrides |= {"grid.metrics_file": out / "grid.json", "grid.plots_dir": out / "plots"}
        overrides |= {"mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        cmd = ["adaptad", "grid", "--params", str(path)]
        cmd += [arg for k, v in overrides.items() for arg in ("-S", f"{k}={v}")]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = subprocess.run(
            cmd, env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=900
        )
    finally:
        stop.set()
        head.send_signal(signal.SIGTERM)  # `ray start --block` shuts down exactly the node it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    records = [json.loads(p.read_text()) for p in runs.glob("*/evaluation/metrics.json")]
    assert len(records) == 4 and {r["device"] for r in records} == {"cpu"}, log[-3000:]  # no CUDA here
    # the grid's jobs waiting for resources (check_worker_code's task asks for no CPU)
    evaluations = [bundle for s in samples for bundle, _ in s["waiting"] if bundle.get("CPU")]
    assert evaluations and all(bundle == {"CPU": 1.0, "GPU": 1.0} for bundle in evaluations), evaluations
    assert max(s["used"].get("GPU", 0.0) for s in samples) == 2.0
    busy = [s for s in samples if s["used"].get("GPU") == 2.0 and s["used"].get("CPU") == 2.0]
    packed = [s for s in busy if any("GPU" in b for b, _ in s["waiting"])]  # jobs wait for a GPU, CPUs idle
    assert packed, samples[-20:]


def test_grid_params_errors_name_the_key(setup, tmp_path) -> None:
    from flows.params import ParamsError, load_params

    _, path, env = setup
    from flows.grid import expand

    # cross-references are checked where the grid runs (a pipeline params file may change datasets)
    for key, overrides in {
        "grid.datasets": {"grid.datasets": ["missing"]},
        "grid.categories.two": {"grid.categories": {"two": ["screw"]}},
    }.items():
        with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
            expand(load_params(path, overrides), path, check=False)
    cases = {
        "grid.methods": {"grid.methods": ["padim", "nope"]},
        "grid.image_sizes.0": {"grid.image_sizes": [8]},
        "grid.concurrency": {"grid.concurrency": 0},
        "datasets.fm": {"datasets.fm": {"layout": "fashion_mnist", "masks": True}},
    }
    for key, overrides in cases.items():
        with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
            load_params(path, overrides)
    bad = subprocess.run(
        ["adaptad", "grid", "--params", str(path), "--dry-run", "-S", "grid.methods=[padim,nope]"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "grid.methods" in bad.stderr, bad.stderr
    no_grid = yaml.safe_load(path.read_text())
    del no_grid["grid"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(no_grid))
    with pytest.raises(ParamsError, match="grid: no grid section"):
        expand(load_params(tmp_path / "params.yaml"), tmp_path / "params.yaml", check=False)


def test_dry_run_counts_each_training_once(tmp_path: Path) -> None:
    """Per-category trainings are each counted; a dataset-wide one (TPTL) once, with its first category; a
    frozen method on PANDA's adapted backbone not again (it shares PANDA's training jobs)."""
    from flows.grid import TRAIN_SETUP_SECONDS, GridJob, Plan, dry_run, estimate, variant_params
    from flows.params import load_params

    params = load_params(
        Path(__file__).resolve().parents[1] / "params.yaml", {"grid.runs_dir": str(tmp_path)}
    )
    jobs, variants = [], {}
    for method, shared in (("panda", None), ("topology", "dataset-key")):
        variants[("demo", method, params.backbone, 128, 0, None)] = variant_params(
            params, "demo", method, params.backbone, 128, 0
        )
        for category in ("a", "b"):
            jobs.append(
                GridJob("demo", category, method, params.backbone, 128, 0, f"{method}-{category}", shared,
                        train_images=100, test_images=50, epochs=2, training_images=200 if shared else 100)
            )  # fmt: skip
    variants[("demo", "patchcore", params.backbone, 128, 0, "panda")] = variant_params(
        params, "demo", "patchcore", params.backbone, 128, 0, "panda"
    )
    adapted = [
        GridJob("demo", c, "patchcore", params.backbone, 128, 0, f"adapted-{c}", None, train_images=100,
                test_images=50, epochs=2, training_images=100, adapted_by="panda", adapter_key=f"panda-{c}")
        for c in ("a", "b")
    ]  # fmt: skip
    plan = Plan(params, jobs + adapted, variants, {}, "grid-key", "code", tmp_path)
    cost = {j.run_key: estimate(plan, j)[0] for j in jobs}
    without = estimate(plan, jobs[3], training=False)[0]
    adapted_cost = sum(estimate(plan, j, training=False)[0] for j in adapted)
    assert adapted[0].name == "panda+patchcore" and adapted[0].training_key == "panda-a"
    assert estimate(plan, adapted[0])[0] > estimate(plan, adapted[0], training=False)[0]
    assert (
        cost["panda-a"] == cost["panda-b"] > estimate(plan, jobs[0], training=False)[0] + TRAIN_SETUP_SECONDS
    )
    assert cost["topology-b"] > without
    total = float(dry_run(plan).splitlines()[-1].split("estimated ")[1].split(" s")[0])
    expected = cost["panda-a"] + cost["panda-b"] + cost["topology-a"] + without + adapted_cost
    assert total == pytest.approx(expected, abs=1)
    assert "panda+patchcore" in dry_run(plan)


def test_a_job_with_steps_is_estimated_at_the_epochs_that_hold_them(tmp_path: Path) -> None:
    """ReContrast's unit is optimizer steps: 1000 steps of kolektorsdd's 222 fit images at 2 ranks × 16,
    full batches only, are 167 epochs of 6 steps (what its training ran), not its epochs knob."""
    from flows.grid import _epochs, variant_params
    from flows.params import load_params

    params = load_params(
        Path(__file__).resolve().parents[1] / "params.yaml",
        {"grid.runs_dir": str(tmp_path), "methods.recontrast.steps": 1000},
    )
    variant = variant_params(params, "demo", "recontrast", params.backbone, 128, 0)
    assert _epochs(variant, 278) == 167
    assert (
        _epochs(variant_params(params, "demo", "recontrast", params.backbone, 128, 0), 20) == 1000
    )  # 1 step
    assert _epochs(variant_params(params, "demo", "panda", params.backbone, 128, 0), 278) == 15
