"""Thresholds set without test labels (components/decision.py, flows/decide.py), on real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from components.data import DataError, scan_mvtec
from components.data.oneclass import FASHION_MNIST_ROOT, oneclass_category
from components.decision import (
    CalibrationError,
    Threshold,
    calibrate,
    image_operating_point,
    pixel_f1,
    quantile_threshold,
    required_normals,
)
from components.evaluation import loader, score_all
from components.methods import MethodSpec, load_method
from components.metrics import f1_max, f1_max_threshold
from flows.decide import check_decision, decide_category, decision_key, held_out
from flows.evaluate import CategoryJob, evaluate_category


# ----------------------------------------------------------------------------------------------- rules
def test_quantile_threshold_leaves_at_most_the_rate_above_it() -> None:
    rng = np.random.default_rng(0)
    for n, rate in [(20, 0.05), (100, 0.05), (57, 0.1), (1000, 0.01), (5, 0.5)]:
        s = rng.normal(size=n)
        t = quantile_threshold(s, rate)
        assert np.sum(s > t) <= np.floor(rate * n) and t in s  # the lowest such normal score
        assert np.sum(s > np.max(s[s < t], initial=-np.inf)) > np.floor(rate * n)


def test_f1_max_threshold_reproduces_f1_max() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.integers(0, 2, 300)
        y[:2] = [0, 1]
        s = np.round(rng.normal(size=300) + y, 1)  # ties
        f1, t = f1_max_threshold(s, y)
        predicted = s > t
        tp = np.sum(predicted & (y == 1))
        assert f1 == pytest.approx(f1_max(s, y)) == pytest.approx(2 * tp / (predicted.sum() + y.sum()))


def test_normalization_puts_the_threshold_at_one_half() -> None:
    th = Threshold.around(2.0, 1.0, 6.0)
    x = np.array([0.0, 1.0, 1.5, 2.0, 4.0, 6.0, 9.0])
    assert th.normalize(x).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert th.decide(x).tolist() == [False] * 4 + [True] * 3  # anomalous: above the threshold
    assert Threshold.around(2.0, 2.0, 2.0) == Threshold(2.0, 1.0, 3.0)  # degenerate ranges made valid
    assert Threshold.around(2.0, 0.0, 1.0) == Threshold(2.0, 0.0, 4.0)


def test_too_few_held_out_images_are_refused_with_the_count_needed() -> None:
    assert (
        required_normals("normal_quantile", 0.05) == 20 and required_normals("normal_quantile", 0.01) == 100
    )
    scores, maps = np.arange(19.0), np.zeros((19, 4, 4))
    with pytest.raises(CalibrationError, match="needs 20 held-out normal images, got 19"):
        calibrate("normal_quantile", scores, maps, false_alarm_rate=0.05)
    with pytest.raises(CalibrationError, match="needs 10 synthetic anomalies, got 0"):
        calibrate("synthetic_f1", scores, maps)
    with pytest.raises(CalibrationError, match="unknown rule"):
        required_normals("oracle", 0.1)


def test_synthetic_f1_separates_normals_from_synthetic_anomalies() -> None:
    rng = np.random.default_rng(2)
    normal_maps = rng.random((30, 8, 8))
    fake_maps = rng.random((30, 8, 8))
    fake_masks = np.zeros((30, 8, 8), bool)
    fake_masks[:, 2:5, 2:5] = True
    fake_maps[fake_masks] += 2.0
    c = calibrate(
        "synthetic_f1", normal_maps.max((1, 2)), normal_maps, fake_maps.max((1, 2)), fake_maps, fake_masks
    )
    assert 1.0 <= c.image.value < 2.0 and 1.0 <= c.pixel.value < 2.0 and c.held_out_false_alarm_rate == 0
    assert pixel_f1(fake_maps, fake_masks, c.pixel) == 1.0
    figures = image_operating_point(np.r_[0.5, 0.7, 2.5, 0.9], np.array([0, 0, 1, 1]), c.image)
    assert figures == {"image_fpr": 0.0, "image_recall": 0.5, "image_precision": 1.0, "image_f1": 2 / 3}


# --------------------------------------------------------------------------------- on real images
def _evaluated(root: Path, out: Path, spec: MethodSpec, category: str = "kolektorsdd") -> CategoryJob:
    samples = scan_mvtec(root, category)
    job = CategoryJob(
        dataset="mini",
        category=category,
        run_key="key",
        data_version="v",
        spec=spec,
        train=[s for s in samples if s.split == "train"],
        test=[s for s in samples if s.split == "test"],
        batch_size=8,
        loader_workers=0,
    )
    evaluate_category(job, out / "evaluation")
    return job


def test_held_out_images_are_not_in_the_memory_that_sets_the_threshold(
    tmp_path: Path, data_root: Path
) -> None:
    """DN2 with k = 1 scores an image of its memory 0 (its own nearest neighbour): the calibration's
    held-out normals all score above 0, while the deployed memory — every train image — scores them 0."""
    spec = MethodSpec("dn2", "tf_efficientnet_lite0", "pypi", None, 64, {"k": 1})
    job = _evaluated(data_root, tmp_path, spec)
    decision = {"rule": "normal_quantile", "false_alarm_rate": 0.2}
    doc = decide_category(
        job, tmp_path / "evaluation", tmp_path / "decision", decision, 0.2, 0, ["cutpaste", "noise"]
    )
    fit, normals = held_out(job.train, 0.2, 0)
    assert len(normals) == 5 and not {s.path for s in fit} & {s.path for s in normals}
    held = pq.read_table(tmp_path / "decision" / "calibration.parquet").to_pandas()
    calibration_normals = held[held.label == 0]
    assert sorted(calibration_normals.path) == sorted(s.path for s in normals)
    assert (calibration_normals.score > 1e-3).all(), calibration_normals.score
    deployed = load_method(tmp_path / "evaluation" / "method")
    in_memory, _, _ = score_all(deployed, loader(normals, 64, 8, 0))
    assert np.allclose(in_memory, 0, atol=1e-3), in_memory  # the test would see a leak
    assert len(held[held.label == 1]) == 10  # cutpaste + noise stand-ins of each held-out image
    # the figures and per-image outputs agree with the thresholds
    c, m = doc["calibration"], doc["metrics"]
    scores = pq.read_table(tmp_path / "decision" / "scores.parquet").to_pandas()
    th = Threshold.from_dict(c["image"])
    assert (scores.predicted == (scores.score > th.value)).all() and m["image_threshold"] == th.value
    assert ((scores.score_normalized > 0.5) == scores.predicted.astype(bool)).all()
    assert m == pytest.approx(m | image_operating_point(scores.score, scores.label, th), nan_ok=True)
    assert 0 <= m["pixel_f1"] <= 1 and c["held_out_normal"] == 5 and c["synthetic"] == 10
    assert json.loads((tmp_path / "decision" / "decision.json").read_text())["metrics"] == pytest.approx(
        m, nan_ok=True
    )


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="dataset-fashion-mnist not installed")
def test_realized_false_alarm_rate_on_other_normal_images_is_near_the_target(tmp_path: Path) -> None:
    """Fashion-MNIST trousers: thresholds from 600 held-out of 3000 train images at a 5 % target; the 1000
    normal test images (another split) are flagged at about that rate, conservatively."""
    samples = oneclass_category("fashion_mnist", None, "trouser", limit_train=3000, limit_test=1000)
    train, test = [s for s in samples if s.split == "train"], [s for s in samples if s.split == "test"]
    spec = MethodSpec("dn2", "tf_efficientnet_lite0", "pypi", None, 32, {})
    job = CategoryJob(
        "fm", "trouser", "key", "v", spec, train, test, masks=False, batch_size=64, loader_workers=0
    )
    evaluate_category(job, tmp_path / "evaluation")
    decision = {"rule": "normal_quantile", "false_alarm_rate": 0.05}
    doc = decide_category(job, tmp_path / "evaluation", tmp_path / "decision", decision, 0.2, 0, ["cutpaste"])
    assert doc["calibration"]["held_out_normal"] == 600
    realized = doc["metrics"]["image_fpr"]
    assert 0.01 <= realized <= 0.08, realized
    assert np.isnan(doc["metrics"]["pixel_f1"])  # no masks


def test_a_slice_too_small_for_the_rule_is_refused_before_any_work(data_root: Path) -> None:
    train = [s for s in scan_mvtec(data_root, "kolektorsdd") if s.split == "train"]
    check_decision("normal_quantile", 0.2, 0.2, {"kolektorsdd": train}, "m.parquet")  # 5 held out: enough
    with pytest.raises(
        DataError, match=r"'kolektorsdd'.* needs 20 held-out normal images.* holds out 5 of its 24"
    ):
        check_decision("normal_quantile", 0.05, 0.2, {"kolektorsdd": train}, "m.parquet")


def test_decision_key_follows_the_rule_and_the_slice() -> None:
    base = decision_key("run", {"rule": "normal_quantile", "false_alarm_rate": 0.05}, 0.2, 0, ["cutpaste"])
    assert base == decision_key(
        "run", {"false_alarm_rate": 0.05, "rule": "normal_quantile"}, 0.2, 0, ["cutpaste"]
    )
    others = [
        decision_key("run", {"rule": "normal_quantile", "false_alarm_rate": 0.01}, 0.2, 0, ["cutpaste"]),
        decision_key("run", {"rule": "normal_quantile", "false_alarm_rate": 0.05}, 0.3, 0, ["cutpaste"]),
        decision_key("other", {"rule": "normal_quantile", "false_alarm_rate": 0.05}, 0.2, 0, ["cutpaste"]),
    ]
    assert base not in others and len(set(others)) == 3
