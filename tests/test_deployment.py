"""A Prefect deployment run against real servers: `prefect server` + process worker, MLflow server and a
Ray head from infra/local/services.sh; `prefect deployment run 'pipeline/demo' --watch` completes on the
demo data in a fresh copy of the repo and registers a version on the MLflow server."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import repo_copy, service_env
from tests.prefect_server import temporary_prefect
from tests.test_services import free_ports

OVERRIDES = {
    "image_size": 96,
    "methods.panda.epochs": 1,
    "methods.panda.fisher_images": 4,
    "train.num_workers": 2,
}


@pytest.fixture
def services(tmp_path):
    repo = repo_copy(tmp_path / "repo")
    env = temporary_prefect(service_env(tmp_path))  # the services' own Prefect server, not the tests'
    prefect, mlflow_port, ray = free_ports(3)
    env.update(
        ADAPTAD_SERVICES_DIR=str(tmp_path / "svc"),
        PREFECT_PORT=str(prefect),
        MLFLOW_PORT=str(mlflow_port),
        RAY_PORT=str(ray if not 10002 <= ray <= 19999 else 6391),
        RAY_DASHBOARD_PORT=str(free_ports(1)[0]),
    )
    start = subprocess.run(
        ["bash", "infra/local/services.sh", "start"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    try:
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        yield repo, env, tmp_path / "svc" / "env"
    finally:
        subprocess.run(
            ["bash", "infra/local/services.sh", "stop"], cwd=repo, env=env, capture_output=True, timeout=120
        )


def test_deployment_run_completes_on_the_demo(services, monkeypatch) -> None:
    """Against the authenticated servers (services.sh's default): the clients' secrets come from the env
    file alone; the pipeline registers its model and promote aliases it."""
    repo, env, env_file = services
    run_params = json.dumps({"overrides": OVERRIDES})
    script = f"""
        set -e
        source {env_file}
        adaptad prepare
        prefect --no-prompt deploy --all
        prefect deployment run 'pipeline/demo' --watch --watch-timeout 900 --params '{run_params}'
        prefect deployment run 'promote/demo' --watch --watch-timeout 300
        python -c 'import os; print("TRACKING=" + os.environ["MLFLOW_TRACKING_URI"])'
    """
    out = subprocess.run(
        ["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=1500
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "Completed" in log
    uri = log.split("TRACKING=")[1].split()[0]
    assert uri.startswith("http://127.0.0.1:")
    import mlflow

    exported = dict(
        line[len("export ") :].split("=", 1)
        for line in env_file.read_text().splitlines()
        if line.startswith("export ")
    )
    assert exported["RAY_AUTH_MODE"] == "token" and exported["PREFECT_API_AUTH_STRING"]
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, exported[name])
    client = mlflow.MlflowClient(tracking_uri=uri)
    (version,) = client.search_model_versions("name='adaptad-demo-deeppcb'")
    assert version.tags["method"] == "panda"
    assert client.get_model_version_by_alias("adaptad-demo-deeppcb", "champion").version == version.version
    (run_dir,) = list((repo / "runs" / "categories").iterdir())
    summary = json.loads((run_dir / "trained" / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["epochs"] == 1
