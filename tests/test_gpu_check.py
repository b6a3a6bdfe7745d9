"""benchmarks/gpu_check.py, the one-shot GPU check: kept working on CPU machines, run in full on a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_steps_and_bank_check_run_on_the_cpu(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--methods", "gaussian_ft", "recontrast"]
    cmd += ["--steps", "2", "--size", "64", "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == [] and report["device"] == "cpu"
    for method in ("gaussian_ft", "recontrast"):
        check = report["checks"][f"train/{method}"]
        assert (
            check["ok"]
            and check["finite"]
            and check["largest_step"] > 0
            and check["param_devices"] == ["cpu"]
        )
    assert report["checks"]["faiss_bank"]["ok"]
    assert report["checks"]["cpu_vs_cuda"] == {"skipped": "no CUDA device"}


def test_score_comparison_and_throughput_paths() -> None:
    """The CUDA-only steps' code, run with the CPU on both sides (identical scores expected)."""
    gc = _module()
    train, test = gc.demo_samples(REPO / "data" / "demo")
    few = [s for s in test if s.label == 0][:4] + [s for s in test if s.label == 1][:4]
    out = gc.cpu_vs_cuda(train[:12], few, 64, devices=("cpu", "cpu"), methods=("gaussian",))
    assert out["gaussian"]["ok"] and out["gaussian"]["max_rel_score_diff"] == 0.0
    assert gc.throughput("cpu", size=64, batch=4, n=8) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_whole_gpu_check_passes_on_cuda(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
