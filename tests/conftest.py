"""Shared fixtures: the real industrial data sets of ../shared and small real subsets of them."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.prefect_server import shared_prefect_api, stop_shared_prefect

os.environ.setdefault("OMP_NUM_THREADS", "2")
INDUSTRIAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "industrial"


@pytest.fixture(scope="session")
def industrial_root() -> Path:
    if not INDUSTRIAL.is_dir():
        pytest.skip(f"shared industrial data not found at {INDUSTRIAL}")
    return INDUSTRIAL


def copy_subset(src: Path, dst: Path, n_train: int, n_good: int, n_defect: int) -> Path:
    """Copy the first images of each split (with masks) of an MVTec-layout category."""

    def take(folder: Path, n: int) -> list[Path]:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))[:n]

    for img in take(src / "train" / "good", n_train):
        (dst / "train" / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(img, dst / "train" / "good" / img.name)
    for img in take(src / "test" / "good", n_good):
        (dst / "test" / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(img, dst / "test" / "good" / img.name)
    for defect in sorted(p.name for p in (src / "test").iterdir() if p.name != "good"):
        for img in take(src / "test" / defect, n_defect):
            (dst / "test" / defect).mkdir(parents=True, exist_ok=True)
            (dst / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            shutil.copy(img, dst / "test" / defect / img.name)
            mask = src / "ground_truth" / defect / f"{img.stem}_mask.png"
            shutil.copy(mask, dst / "ground_truth" / defect / mask.name)
    return dst


@pytest.fixture(scope="session")
def data_root(tmp_path_factory, industrial_root: Path) -> Path:
    """A session-wide data root with the same kolektorsdd subset as ``mini_root`` (read-only use)."""
    root = tmp_path_factory.mktemp("data")
    copy_subset(industrial_root / "kolektorsdd", root / "kolektorsdd", 24, 8, 8)
    return root


@pytest.fixture
def mini_root(tmp_path: Path, industrial_root: Path) -> Path:
    """A data root with a small real kolektorsdd subset: 24 train, 8 normal and 8 defect test images."""
    copy_subset(industrial_root / "kolektorsdd", tmp_path / "data" / "kolektorsdd", 24, 8, 8)
    return tmp_path / "data"


REPO = Path(__file__).resolve().parents[1]


def pytest_sessionfinish(session, exitstatus) -> None:
    """Stop the session's Prefect server (tests/prefect_server.py), if a test started it."""
    stop_shared_prefect()


def service_env(home: Path) -> dict[str, str]:
    """Environment for subprocesses that run the real services in isolation (no telemetry, own state).

    Flows report to the session's Prefect server (``shared_prefect_api``); Ray and MLflow stay per test.
    """
    import sys

    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        RAY_AUTH_MODE="disabled",
        # Ray's socket paths must stay under 107 bytes: a short folder of its own under /tmp
        RAY_TMPDIR=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
        PREFECT_HOME=str(home / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        MLFLOW_DISABLE_TELEMETRY="true",
        DVC_NO_ANALYTICS="1",
        ADAPTAD_CACHE=os.environ.get("ADAPTAD_CACHE", str(Path.home() / ".cache" / "adaptad")),
    )
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env["PREFECT_API_URL"] = shared_prefect_api()
    return env


def repo_copy(dst: Path) -> Path:
    """A fresh git clone-like copy of the working tree (tracked + untracked, not ignored files)."""
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    dst.mkdir(parents=True)
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and not name.startswith(("tests/", "benchmarks/")):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    git = ["git", "-c", "user.email=ci@adaptad", "-c", "user.name=ci"]
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dst, check=True)
    return dst


def run_in_one_process(runner: str, params: Path, steps: list, env: dict, prefix: str, timeout: int):
    """Run ``python -m tests.<runner> PARAMS STEPS_JSON``; return its ``<prefix> {json}`` lines and output.

    The runners keep several flow runs in one process, so the services start once. A failing run or a
    missing result line fails the calling test with the tail of the runner's output.
    """
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", f"tests.{runner}", str(params), json.dumps(steps)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [json.loads(x.split(" ", 1)[1]) for x in out.stdout.splitlines() if x.startswith(f"{prefix} ")]
    assert out.returncode == 0 and len(lines) == len(steps), out.stdout[-3000:] + out.stderr[-5000:]
    return lines, out


def two_category_params(industrial_root: Path, home: Path, sizes: tuple[int, int, int, int], image_size: int):
    """params.yaml as a dict over a dataset ``two`` of small kolektorsdd and magnetic_tile subsets.

    ``sizes``: train images, normal test images, defect images per kolektorsdd and per magnetic_tile type.
    """
    import yaml

    n_train, n_good, n_kol, n_mt = sizes
    data = home / "data"
    copy_subset(industrial_root / "kolektorsdd", data / "kolektorsdd", n_train, n_good, n_kol)
    copy_subset(industrial_root / "magnetic_tile", data / "magnetic_tile", n_train, n_good, n_mt)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = {"two": {"root": str(data), "categories": ["kolektorsdd", "magnetic_tile"]}}
    params.update(dataset="two", image_size=image_size, manifests_dir=str(home / "manifests"))
    params["decision"]["false_alarm_rate"] = 0.5  # 12+ train images hold out 2: enough at 0.5 only
    return params
