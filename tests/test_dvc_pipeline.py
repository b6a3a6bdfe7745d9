"""`dvc repro` end to end on the embedded demo in a fresh copy of the repo, with the real services:
DVC → Prefect (a temporary API first, as a new user's; then the tests' server) → Ray Train (2 CPU workers,
DDP) → faiss banks → metrics → MLflow (sqlite)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import repo_copy, service_env
from tests.prefect_server import temporary_prefect


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def versions(repo: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    return client.search_model_versions("name='adaptad-demo-deeppcb'")


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """One `dvc repro` of a fresh copy (PANDA, 2 epochs at 128 px to fit CI) and its output."""
    home = tmp_path_factory.mktemp("dvc")
    repo = repo_copy(home / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["image_size"] = 128
    params["methods"]["panda"].update(epochs=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "commit", "-qam", "ci params"], cwd=repo, check=True)
    env = service_env(home)
    first = run(["dvc", "repro"], repo, temporary_prefect(env))  # as a new user's: a temporary Prefect API
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return repo, env, first


def test_dvc_repro_runs_every_stage_with_real_services(repro) -> None:
    repo, env, first = repro
    for stage in ("prepare@demo", "pipeline", "promote"):
        assert f"Running stage '{stage}'" in first.stdout
    # the CLI's own embedded Prefect API served the flows (flows/services.py), not Prefect's fallback
    assert "Starting temporary server" not in first.stderr and "View at http://127.0.0.1:" in first.stderr
    assert (repo / "manifests" / "demo.parquet").is_file()
    metrics = json.loads((repo / "metrics" / "pipeline.json").read_text())
    m = metrics["categories"]["deeppcb"]
    assert metrics["method"] == "panda" and 0.0 <= m["image_auroc"] <= 1.0
    assert m["pixel_auroc"] > 0.7, m  # SPADE-style maps on adapted features localise PCB defects
    assert metrics["mean"]["aupro"] == m["aupro"]
    assert (repo / "plots" / "roc" / "deeppcb.csv").is_file() and (
        repo / "plots" / "pro" / "deeppcb.csv"
    ).is_file()
    # the Ray Train job ran with 2 DDP workers and wrote a checkpoint per epoch
    run_dirs = list((repo / "runs" / "categories").iterdir())
    assert len(run_dirs) == 1
    summary = json.loads((run_dirs[0] / "trained" / "summary.json").read_text())
    # the default PANDA is the official code's protocol: every epoch runs, neither EWC nor early stopping
    assert summary["workers"] == 2 and summary["epochs"] == 2
    assert summary["tags"]["panda.regulariser"] == "fixed_epochs:2" and "panda.fisher" not in summary["tags"]
    assert len(list((repo / "runs" / "ray" / run_dirs[0].name).glob("checkpoint_*/progress.json"))) >= 1
    assert (run_dirs[0] / "evaluation" / "method" / "memory" / "global" / "index.faiss").is_file()
    # MLflow: one version, challenger; the promote stage made it champion (no champion before)
    (version,) = versions(repo)
    assert version.tags["run_key"] == run_dirs[0].name and version.tags["method"] == "panda"
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    assert client.get_model_version_by_alias("adaptad-demo-deeppcb", "champion").version == version.version
    promotion = json.loads((repo / "metrics" / "promotion.json").read_text())
    assert promotion  # DVC metric of the promote stage
    shown = run(["dvc", "metrics", "show"], repo, env, 120)
    assert shown.returncode == 0 and "image_auroc" in shown.stdout and "deeppcb" in shown.stdout


def test_second_repro_does_no_work(repro) -> None:
    repo, env, _ = repro
    again = run(["dvc", "repro"], repo, env, 300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Running stage" not in again.stdout, again.stdout
    assert len(versions(repo)) == 1


def test_pipeline_rerun_with_nothing_changed_reuses_every_step(repro) -> None:
    """Bypassing DVC, the flow itself finds the run key's outputs and registers nothing twice."""
    repo, env, _ = repro
    again = run(["adaptad", "pipeline"], repo, env, 600)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    # train and evaluate return the run folder's finished outputs: no Ray cluster, no training
    assert "Started a local Ray instance" not in log and "deeppcb: trained" in log, log[-3000:]
    assert len(versions(repo)) == 1


def test_a_new_tracking_store_gets_the_finished_runs_logged_without_recomputing(repro, tmp_path) -> None:
    """The tracking store is the record of what was logged: pointed at a new (or wiped) store, the pipeline
    reuses its trained and evaluated run folder and logs and registers it there."""
    import mlflow

    repo, env, _ = repro
    store = tmp_path / "new-store.db"
    again = run(["adaptad", "pipeline"], repo, env | {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}, 600)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "Started a local Ray instance" not in log, log[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    (version,) = client.search_model_versions("name='adaptad-demo-deeppcb'")
    (old,) = versions(repo)
    assert version.tags["run_key"] == old.tags["run_key"]
    assert client.get_model_version_by_alias("adaptad-demo-deeppcb", "challenger").version == version.version
    assert len(versions(repo)) == 1  # the project's own store is untouched


def test_bad_inputs_fail_clearly_and_register_nothing(repro, tmp_path) -> None:
    repo, env, _ = repro
    before = len(versions(repo))
    bad = run(["adaptad", "pipeline", "-S", "methods.panda.lr=-1"], repo, env, 120)
    assert bad.returncode == 2 and "panda" in bad.stderr, bad.stderr
    bad = run(["adaptad", "pipeline", "-S", "train.num_workers=0"], repo, env, 120)
    assert bad.returncode == 2 and "train.num_workers" in bad.stderr
    unreachable = run(
        ["adaptad", "pipeline", "-S", "method=patchcore"],
        repo,
        env | {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
        120,
    )
    assert unreachable.returncode == 2 and "http://127.0.0.1:9" in unreachable.stderr, unreachable.stderr
    # a truncated image in the dataset: prepare names it, exit != 0, the old manifest stays intact
    manifest = (repo / "manifests" / "demo.parquet").read_bytes()
    broken = repo / "data" / "demo" / "deeppcb" / "train" / "good" / "zz_truncated.png"
    good = next((repo / "data" / "demo" / "deeppcb" / "train" / "good").glob("*.png"))
    broken.write_bytes(good.read_bytes()[:300])
    try:
        failed = run(["dvc", "repro"], repo, env, 300)
        assert failed.returncode != 0 and "zz_truncated.png" in failed.stdout + failed.stderr
        assert not (repo / "manifests" / "demo.parquet").exists() or (
            (repo / "manifests" / "demo.parquet").read_bytes() == manifest
        )
        assert "Running stage 'pipeline'" not in failed.stdout
    finally:
        broken.unlink()
    assert len(versions(repo)) == before


def test_dvc_exp_run_compares_methods_and_plots_render(repro) -> None:
    """Last in this module: `dvc exp run -S` changes the workspace params."""
    repo, env, _ = repro
    exp = run(["dvc", "exp", "run", "-S", "method=padim", "-S", "methods.padim.d=40"], repo, env, 600)
    assert exp.returncode == 0, exp.stdout[-2000:] + exp.stderr[-3000:]
    assert "Running stage 'pipeline'" in exp.stdout and "Running stage 'prepare@demo'" not in exp.stdout
    metrics = json.loads((repo / "metrics" / "pipeline.json").read_text())
    assert metrics["method"] == "padim" and metrics["categories"]["deeppcb"]["pixel_auroc"] > 0.7
    shown = run(["dvc", "exp", "show", "--json"], repo, env, 120)
    assert shown.returncode == 0 and "padim" in shown.stdout and "image_auroc" in shown.stdout
    assert {v.tags["method"] for v in versions(repo)} == {"panda", "padim"}
    plots = run(["dvc", "plots", "show", "-o", str(repo / "plots-html")], repo, env, 120)
    assert plots.returncode == 0, plots.stderr[-2000:]
    html = (repo / "plots-html" / "index.html").read_text()
    assert "plots_roc_deeppcb_csv" in html and "plots_pro_deeppcb_csv" in html  # both plots, with data
    assert '"tpr"' in html and '"pro"' in html
