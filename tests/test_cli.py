"""``adaptad run`` end to end on real data, and every bad input of the foundation issue."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.cli import main

BASE = [
    "run",
    "--category",
    "kolektorsdd",
    "--image-size",
    "128",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--quiet",
    "--false-alarm-rate",
    "0.2",  # 24 train images hold out 5: the thresholds need ⌈1/0.2⌉ = 5
]


def run(root: Path, out: Path, *extra: str) -> int:
    return main([*BASE, "--data-root", str(root), "--output", str(out), *extra])


def test_run_writes_metrics_scores_and_heatmaps(mini_root, tmp_path) -> None:
    out = tmp_path / "out"
    assert run(mini_root, out, "--method", "padim", "--param", "d=40") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "image_f1_max",
        "pixel_f1_max",
        "fit_seconds",
        "total_seconds",
    ):
        assert key in metrics
    assert 0 <= metrics["aupro"] <= 1 and metrics["pixel_auroc"] > 0.5
    scores = pq.read_table(out / "scores.parquet")
    assert scores.num_rows == 16 and set(scores.column_names) >= {"path", "label", "score"}
    with Image.open(out / "heatmaps.png") as png:
        assert png.size[0] > 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]  # no temp folders left
    # the decision: thresholds from 5 held-out train images scored by a second memory without them
    decision = metrics["decision"]
    assert decision["held_out_normal"] == 5 and decision["rule"] == "normal_quantile"
    assert metrics["image_threshold"] == decision["image"]["value"] and 0 <= metrics["pixel_f1"] <= 1
    frame = scores.to_pandas()
    assert ((frame.score > metrics["image_threshold"]) == frame.predicted.astype(bool)).all()
    assert metrics["image_fpr"] == frame[frame.label == 0].predicted.mean()
    assert metrics["image_recall"] == frame[frame.label == 1].predicted.mean()
    held = pq.read_table(out / "calibration.parquet").to_pandas()
    train = {p.name for p in (mini_root / "kolektorsdd" / "train" / "good").iterdir()}
    assert (held.label == 0).sum() == 5 and {Path(p).name for p in held.path} <= train


def test_run_refuses_a_rule_the_held_out_images_cannot_support(mini_root, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert run(mini_root, out, "--method", "dn2", "--false-alarm-rate", "0.05") == 2
    err = capsys.readouterr().err
    assert "needs 20 held-out normal images; --val-fraction 0.2 holds out 5 of its 24" in err, err
    assert not out.exists()
    assert run(mini_root, out, "--method", "dn2", "--val-fraction", "0") == 0  # no thresholds asked
    metrics = json.loads((out / "metrics.json").read_text())
    assert "image_threshold" not in metrics and not (out / "calibration.parquet").exists()


def test_console_script_help_explains_every_option() -> None:
    exe = Path(sys.executable).with_name("adaptad")
    text = subprocess.run([str(exe), "run", "--help"], capture_output=True, text=True, check=True).stdout
    for option in (
        "--data-root",
        "--category",
        "--method",
        "--backbone",
        "--weights",
        "--image-size",
        "--output",
    ):
        assert option in text


def _break(root: Path, how: str) -> str:
    """Damage the mini data set; return a string the error message must contain."""
    cat = root / "kolektorsdd"
    good = sorted((cat / "train" / "good").iterdir())
    defect = sorted((cat / "test" / "defect").iterdir())
    if how == "zero-byte":
        good[0].write_bytes(b"")
        return good[0].name
    if how == "truncated":
        data = good[1].read_bytes()
        good[1].write_bytes(data[: len(data) // 2])
        return good[1].name
    if how == "not-an-image":
        (cat / "train" / "good" / "notes.txt").write_text("hello")
        return "notes.txt"
    if how == "garbage-png":
        (cat / "train" / "good" / "fake.png").write_bytes(b"this is not a png" * 10)
        return "fake.png"
    if how == "mask-size":
        mask = cat / "ground_truth" / "defect" / f"{defect[0].stem}_mask.png"
        Image.open(mask).resize((7, 9)).save(mask)
        return mask.name
    if how == "missing-mask":
        (cat / "ground_truth" / "defect" / f"{defect[0].stem}_mask.png").unlink()
        return defect[0].name
    if how == "empty-train":
        for p in good:
            p.unlink()
        return "train/good"
    if how == "missing-train":
        shutil.rmtree(cat / "train")
        return "train/good"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "zero-byte",
        "truncated",
        "not-an-image",
        "garbage-png",
        "mask-size",
        "missing-mask",
        "empty-train",
        "missing-train",
    ],
)
def test_bad_data_fails_cleanly(mini_root, tmp_path, capsys, how) -> None:
    needle = _break(mini_root, how)
    out = tmp_path / "out"
    assert run(mini_root, out, "--method", "padim") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adaptad: error:") and needle in err and "\n" not in err, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_no_masks_flag_accepts_defects_without_masks(mini_root, tmp_path) -> None:
    shutil.rmtree(mini_root / "kolektorsdd" / "ground_truth")
    out = tmp_path / "out"
    assert run(mini_root, out, "--method", "dn2", "--no-masks") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["image_auroc"] == metrics["image_auroc"] and metrics["pixel_auroc"] != metrics["pixel_auroc"]
    )


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--method", "padim", "--backbone", "resnet_nope"], "--backbone"),
        (["--method", "padim", "--image-size", "8"], "--image-size 8"),
        (["--method", "patchcore", "--param", "coreset_ratio=2"], "coreset_ratio"),
        (["--method", "padim", "--category", "nothing_here"], "nothing_here"),
    ],
)
def test_bad_options_fail_cleanly(mini_root, tmp_path, capsys, extra, needle) -> None:
    out = tmp_path / "out"
    assert run(mini_root, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    assert not out.exists()


def test_unknown_method_is_refused(mini_root, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        run(mini_root, tmp_path / "out", "--method", "nope")
    assert exc.value.code == 2 and "--method" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
