"""Authentication of the services adaptad starts itself (issue 22): the embedded local Ray cluster runs
with a per-run token, and a client without it is refused — tested against a real Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Starts Ray the way `adaptad pipeline` / `grid` do (flows/cli.py defaults, flows/train.py ensure_ray),
# prints the GCS address and the token, and holds the cluster until stdin closes.
DRIVER = """
import json, os, sys
from flows.cli import _embedded_defaults
_embedded_defaults()
from flows.train import ensure_ray
import ray
ensure_ray()
print(json.dumps({"address": ray.get_runtime_context().gcs_address, "mode": os.environ["RAY_AUTH_MODE"],
                  "token": os.environ.get("RAY_AUTH_TOKEN", "")}), flush=True)
sys.stdin.read()
"""

CLIENT = """
import sys, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    print("CPU", ray.cluster_resources().get("CPU"))
except Exception as err:
    print("REFUSED", type(err).__name__, str(err)[:300])
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_TMPDIR": extra.pop("RAY_TMPDIR"), "PYTHONPATH": str(REPO), **extra}
    return env


def _client(address: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, address], env=env, capture_output=True, text=True, timeout=120
    )
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]


def test_the_embedded_ray_cluster_refuses_clients_without_its_token() -> None:
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        env=_env(RAY_TMPDIR=tmp),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        info = json.loads(driver.stdout.readline())
        assert info["mode"] == "token" and len(info["token"]) == 64, info
        address = info["address"]
        refused = _client(address, _env(RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled"))
        assert refused.startswith("REFUSED")
        wrong = _env(RAY_TMPDIR=tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
        refused = _client(address, wrong)
        assert refused.startswith("REFUSED")
        right = _env(RAY_TMPDIR=tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=info["token"])
        assert _client(address, right).startswith("CPU"), _client(address, right)
    finally:
        driver.stdin.close()
        driver.wait(timeout=60)


def test_a_token_or_mode_the_user_set_is_kept(monkeypatch) -> None:
    from flows.cli import embedded_ray_token

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit choice (this suite's own default)
    embedded_ray_token()
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN" not in os.environ
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/some/where/token")
    embedded_ray_token()
    assert os.environ["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in os.environ
