"""infra/local/services.sh: start the real Prefect server + worker, MLflow server and Ray head on free
ports, use them through the env file alone, and check that `stop` leaves none of their processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "local" / "services.sh"
SERVICES = ("prefect-server", "mlflow", "ray", "prefect-worker")
BIN = REPO / ".venv" / "bin" if (REPO / ".venv" / "bin" / "prefect").exists() else Path(sys.executable).parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="services.sh needs Linux")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def session_members(sid: int) -> set[int]:
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
                members.add(int(entry.name))
    return members


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200, url
        return response.read().decode()


def run(env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd="/")


@pytest.fixture
def services(tmp_path: Path):
    """Start the services in a tmp state dir on free ports; always stop them at teardown."""
    prefect_port, mlflow_port, ray_port, dashboard_port = free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_"))}
    env.update(
        ADAPTAD_SERVICES_DIR=str(tmp_path / "services"),
        PREFECT_PORT=str(prefect_port),
        MLFLOW_PORT=str(mlflow_port),
        RAY_PORT=str(ray_port),
        RAY_DASHBOARD_PORT=str(dashboard_port),
        RAY_NUM_CPUS="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        DVC_NO_ANALYTICS="1",
    )
    state = tmp_path / "services"
    try:
        yield env, state, {"prefect": prefect_port, "mlflow": mlflow_port, "ray": ray_port}
    finally:
        run(env, "bash", str(SCRIPT), "stop", timeout=120)
        # Ray's temp dir moves out of the (long) pytest path to a short /tmp one: remove it too.
        conf = state / "services.conf"
        lines = conf.read_text().splitlines() if conf.exists() else []
        ray_tmp = next((line[8:] for line in lines if line.startswith("RAY_TMP=")), "")
        if ray_tmp.startswith("/tmp/adaptad-ray-"):
            shutil.rmtree(ray_tmp, ignore_errors=True)


def test_services_start_use_stop(services) -> None:
    env, state, ports = services
    t0 = time.monotonic()
    started = run(env, "bash", str(SCRIPT), "start")
    t_start = time.monotonic() - t0
    assert started.returncode == 0, started.stdout + started.stderr
    for name in SERVICES:
        assert f"{name} ready in" in started.stdout, started.stdout

    pids = {name: int((state / "pids" / f"{name}.pid").read_text()) for name in SERVICES}
    processes = set().union(*(session_members(pid) for pid in pids.values()))
    assert all(alive(pid) for pid in pids.values()), pids

    assert http_get(f"http://127.0.0.1:{ports['prefect']}/api/health").strip() == "true"
    assert http_get(f"http://127.0.0.1:{ports['mlflow']}/health").strip() == "OK"

    status = run(env, "bash", str(SCRIPT), "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("running (pid") == 4, status.stdout

    env_file = state / "env"
    exported = env_file.read_text()
    assert f"export PREFECT_API_URL=http://127.0.0.1:{ports['prefect']}/api" in exported
    assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{ports['mlflow']}" in exported
    assert f"export RAY_ADDRESS=127.0.0.1:{ports['ray']}" in exported
    assert "export RAY_AUTH_MODE=token" in exported
    secrets = state / "secrets"
    for path in (env_file, secrets, *secrets.iterdir(), state / "mlflow" / "auth.ini"):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    creds = dict(
        line[len("export ") :].split("=", 1) for line in exported.splitlines() if line.startswith("export ")
    )
    assert creds["RAY_AUTH_TOKEN_PATH"] == str(secrets / "ray_token")
    assert creds["PREFECT_API_AUTH_STRING"].startswith("adaptad:") and creds["MLFLOW_TRACKING_USERNAME"]
    refusals(env, ports, creds)

    # The env file alone points the clients at the servers: no address is passed in code.
    bare = {k: v for k, v in env.items() if not k.endswith("_PORT")} | {"COLUMNS": "250"}  # rich tables
    pools = run(bare, "bash", "-c", f'. "$1" && exec "{BIN}/prefect" work-pool ls', "_", str(env_file))
    assert pools.returncode == 0, pools.stdout + pools.stderr
    assert "adaptad-process" in pools.stdout, pools.stdout

    client = """
import mlflow, ray
ray.init()
assert ray.cluster_resources().get("CPU") == 1.0, ray.cluster_resources()
print("ray nodes", len(ray.nodes()))
ray.shutdown()
mlflow.set_experiment("services-check")
with mlflow.start_run() as run:
    mlflow.log_metric("m", 1.0)
    mlflow.log_text("served", "check.txt")
print("artifact_uri", run.info.artifact_uri)
"""
    used = run(bare, "bash", "-c", f'. "$1" && exec "{BIN}/python" -c "$2"', "_", str(env_file), client)
    assert used.returncode == 0, used.stdout + used.stderr
    assert "ray nodes 1" in used.stdout
    assert "artifact_uri mlflow-artifacts:/" in used.stdout, used.stdout  # uploaded through the server
    assert list((state / "mlflow" / "mlartifacts").rglob("check.txt")), "artifact not under the server root"

    t0 = time.monotonic()
    stopped = run(env, "bash", str(SCRIPT), "stop", timeout=120)
    t_stop = time.monotonic() - t0
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    deadline = time.monotonic() + 5
    while any(alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in processes if alive(p)], "stop left processes running"
    assert not list((state / "pids").glob("*.pid"))

    again = run(env, "bash", str(SCRIPT), "stop")  # idempotent
    assert again.returncode == 0 and "not running" in again.stdout, again.stdout + again.stderr
    status = run(env, "bash", str(SCRIPT), "status")
    assert status.returncode == 3 and "running (pid" not in status.stdout, status.stdout
    print(f"start {t_start:.1f} s, stop {t_stop:.1f} s")


def _status(url: str, auth: tuple[str, str] | None = None, body: bytes | None = None) -> int:
    """HTTP status of a GET (or a JSON POST with ``body``), with basic auth when given."""
    import base64
    import urllib.error

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    if auth:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


RAY_CLIENT = """
import sys, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    print("CPU", ray.cluster_resources().get("CPU"))
except Exception as err:
    print("REFUSED", type(err).__name__)
"""


def refusals(env: dict, ports: dict, creds: dict) -> None:
    """Each server refuses a client without its credentials and answers one with them."""
    prefect = f"http://127.0.0.1:{ports['prefect']}/api/flows/filter"
    assert _status(prefect, body=b"{}") == 401
    assert _status(prefect, ("adaptad", "wrong"), body=b"{}") == 401
    assert _status(prefect, tuple(creds["PREFECT_API_AUTH_STRING"].split(":", 1)), body=b"{}") == 200
    mlflow = f"http://127.0.0.1:{ports['mlflow']}/api/2.0/mlflow/registered-models/search"
    assert _status(mlflow) == 401
    assert _status(mlflow, ("adaptad", "wrong")) == 401
    assert _status(mlflow, (creds["MLFLOW_TRACKING_USERNAME"], creds["MLFLOW_TRACKING_PASSWORD"])) == 200
    address = f"127.0.0.1:{ports['ray']}"
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_")} | {"RAY_TMPDIR": creds["RAY_TMPDIR"]}
    for extra, want in (
        ({"RAY_AUTH_MODE": "disabled"}, "REFUSED"),
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "REFUSED"),
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": creds["RAY_AUTH_TOKEN_PATH"]}, "CPU"),
    ):
        out = run(bare | extra, str(BIN / "python"), "-c", RAY_CLIENT, address, timeout=120)
        assert out.stdout.strip().startswith(want), (extra, out.stdout[-500:], out.stderr[-1500:])


def test_start_refuses_to_expose_services_without_auth(tmp_path: Path) -> None:
    env = dict(os.environ, ADAPTAD_SERVICES_DIR=str(tmp_path / "s"), ADAPTAD_SERVICES_AUTH="off")
    env |= {"ADAPTAD_SERVICES_HOST": "0.0.0.0"}
    result = run(env, "bash", str(SCRIPT), "start", timeout=60)
    assert result.returncode == 1
    assert "refusing to bind Prefect and MLflow to 0.0.0.0 without authentication" in result.stderr
    assert "Unset ADAPTAD_SERVICES_AUTH" in result.stderr, result.stderr
    assert not (tmp_path / "s" / "pids").exists()  # nothing was started


def test_start_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, ADAPTAD_SERVICES_DIR=str(tmp_path / "s"), PREFECT_PORT=str(port))
        env.update(
            zip(("MLFLOW_PORT", "RAY_PORT", "RAY_DASHBOARD_PORT"), map(str, free_ports(3)), strict=True)
        )
        result = run(env, "bash", str(SCRIPT), "start", timeout=60)
    assert result.returncode == 1
    assert f"port(s) {port} on 127.0.0.1 already in use" in result.stderr, result.stderr
    assert not (tmp_path / "s" / "pids").exists()  # nothing was started
