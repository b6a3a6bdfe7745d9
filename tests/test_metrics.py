"""Unit tests for components.metrics (MVTec AD evaluation protocol)."""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from components.metrics import (
    aupro,
    binary_curve,
    evaluate,
    f1_max,
    image_auroc,
    pixel_auroc,
    pro_curve,
    pro_curve_table,
    roc_curve_table,
)

STRUCT_8 = np.ones((3, 3), dtype=int)
STRUCT_4 = ndimage.generate_binary_structure(2, 1)


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------
def sk_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(labels.ravel(), scores.ravel())
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def official_trapezoid(x, y, x_max):
    """Copy of mvtec_ad_evaluation generic_util.trapezoid (finite inputs)."""
    x = np.asarray(x)
    y = np.asarray(y)
    correction = 0.0
    if x_max not in x:
        ins = bisect.bisect(x, x_max)
        assert 0 < ins < len(x)
        y_interp = y[ins - 1] + ((y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1]))
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    mask = x <= x_max
    x = x[mask]
    y = y[mask]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def slow_pro_curve(maps, masks, structure=STRUCT_8):
    """Loop over every distinct threshold: global FPR and mean per-region overlap."""
    masks = masks.astype(bool)
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=structure)
        regions += [(i, lab == k) for k in range(1, n + 1)]
    ok = ~masks
    xs, ys = [0.0], [0.0]
    for th in np.unique(maps)[::-1]:
        pred = maps >= th
        xs.append((pred & ok).sum() / ok.sum())
        ys.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
    xs.append(1.0)
    ys.append(1.0)
    return np.array(xs), np.array(ys)


def slow_aupro(maps, masks, limit=0.3, structure=STRUCT_8):
    xs, ys = slow_pro_curve(maps, masks, structure)
    return official_trapezoid(xs, ys, limit) / limit


def random_case(seed: int, n: int = 4, h: int = 10, w: int = 12, decimals: int = 1):
    """Small maps with many ties; blob masks; image 0 normal."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(n, h, w)), sigma=(0, 1.2, 1.2))
    masks = field > np.quantile(field, 0.8)
    masks[0] = False
    maps = np.round(0.5 * masks + rng.random((n, h, w)), decimals)
    return maps, masks


# ----------------------------------------------------------------------------------------------
# AUROC / F1 vs sklearn
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # many ties
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert f1_max(scores, labels) == pytest.approx(sk_f1_max(scores, labels), abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_metrics_match_sklearn(seed, dtype):
    rng = np.random.default_rng(seed)
    masks = rng.random((6, 20, 24)) < [[[0.02]], [[0.3]], [[0.0]], [[0.1]], [[0.6]], [[0.05]]]
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 2).astype(dtype)
    ref_auc = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(ref_auc, abs=1e-9)
    assert f1_max(maps.ravel(), masks.ravel()) == pytest.approx(sk_f1_max(maps, masks), abs=1e-9)
    # Integer masks (0/1) behave like bool masks.
    assert pixel_auroc(maps, masks.astype(np.uint8)) == pytest.approx(ref_auc, abs=1e-9)


@pytest.mark.parametrize("pos_frac", [0.01, 0.5, 0.99])
def test_binary_curve_matches_sklearn_semantics(pos_frac):
    rng = np.random.default_rng(1)
    labels = rng.random(2000) < pos_frac
    labels[:2] = [True, False]
    scores = np.round(rng.normal(size=2000), 1)
    fps, tps, thr = binary_curve(scores, labels)
    fpr, tpr, ref_thr = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(thr, ref_thr[1:])
    np.testing.assert_allclose(fps / fps[-1], fpr[1:], atol=1e-15)
    np.testing.assert_allclose(tps / tps[-1], tpr[1:], atol=1e-15)
    assert np.all(np.diff(thr) < 0)


def test_perfect_and_inverted_pixel_auroc():
    masks = np.zeros((2, 4, 4), bool)
    masks[1, 1:3, 1:3] = True
    assert pixel_auroc(masks.astype(float), masks) == 1.0
    assert pixel_auroc(1.0 - masks, masks) == 0.0
    assert f1_max(masks.astype(float).ravel(), masks.ravel()) == 1.0


# ----------------------------------------------------------------------------------------------
# AUPRO: hand-computed cases
# ----------------------------------------------------------------------------------------------
def test_aupro_perfect_is_one():
    _, masks = random_case(0)
    perfect = masks + 0.1 * np.random.default_rng(0).random(masks.shape)
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)


def test_aupro_inverted_is_zero():
    maps, masks = random_case(1)
    inverted = np.where(masks, 0.0, 1.0 + maps)  # every normal pixel above every anomalous pixel
    assert aupro(inverted, masks) == 0.0


def two_region_case():
    """Two 5x5 images: R1 = 2x2 block (4 px) in image 0, R2 = 2x3 block (6 px) in image 1; 40 ok px.

    Score levels (FPR = #ok >= t / 40, PRO = mean over regions of overlap):
      0.9: all of R1                     -> FPR 0,          PRO (1 + 0)/2     = 0.5
      0.8: 6 ok px (3 per image), 3 of R2 -> FPR 6/40=0.15,  PRO (1 + 3/6)/2   = 0.75
      0.7: 10 ok px, other 3 of R2        -> FPR 16/40=0.4,  PRO (1 + 1)/2     = 1.0
      0.1: the other 24 ok px             -> FPR 1,          PRO 1
    Curve: (0,0) (0,0.5) (0.15,0.75) (0.4,1.0) (1,1) (1,1).
    """
    masks = np.zeros((2, 5, 5), bool)
    masks[0, 0:2, 0:2] = True
    masks[1, 2:4, 1:4] = True
    maps = np.full(masks.shape, 0.1)
    maps[0][masks[0]] = 0.9
    r2 = np.argwhere(masks[1])
    maps[1][tuple(r2[:3].T)] = 0.8
    maps[1][tuple(r2[3:].T)] = 0.7
    ok0 = np.argwhere(~masks[0])
    ok1 = np.argwhere(~masks[1])
    maps[0][tuple(ok0[:3].T)] = 0.8
    maps[1][tuple(ok1[:3].T)] = 0.8
    maps[0][tuple(ok0[3:8].T)] = 0.7
    maps[1][tuple(ok1[3:8].T)] = 0.7
    return maps, masks


def test_aupro_two_regions_hand_computed():
    maps, masks = two_region_case()
    fprs, pros = pro_curve(maps, masks, fpr_limit=1.0)
    np.testing.assert_allclose(fprs, [0, 0, 0.15, 0.4, 1, 1])
    np.testing.assert_allclose(pros, [0, 0.5, 0.75, 1.0, 1, 1])
    # Up to 0.3: the curve stops at the first point beyond the limit.
    fprs, pros = pro_curve(maps, masks, fpr_limit=0.3)
    np.testing.assert_allclose(fprs, [0, 0, 0.15, 0.4])
    # [0, 0.15]: 0.15 * (0.5 + 0.75)/2 = 0.09375.
    # 0.3 lies between 0.15 and 0.4: PRO(0.3) = 0.75 + 0.25 * 0.15/0.25 = 0.9,
    # area [0.15, 0.3] = 0.15 * (0.75 + 0.9)/2 = 0.12375.  AUPRO = (0.09375 + 0.12375)/0.3 = 0.725.
    assert aupro(maps, masks) == pytest.approx(0.725, abs=1e-12)
    # Limit exactly on a curve point: 0.09375 / 0.15 = 0.625.
    assert aupro(maps, masks, fpr_limit=0.15) == pytest.approx(0.625, abs=1e-12)
    # Limit inside the first sloped segment: PRO(0.1) = 0.5 + 0.25 * 0.1/0.15, area 0.1*(0.5+PRO)/2.
    expected = 0.1 * (0.5 + (0.5 + 0.25 * 0.1 / 0.15)) / 2 / 0.1
    assert aupro(maps, masks, fpr_limit=0.1) == pytest.approx(expected, abs=1e-12)
    # Whole curve: 0.09375 + 0.25*(0.75+1)/2 + 0.6*1 = 0.91250.
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.9125, abs=1e-12)


def test_aupro_uses_8_connectivity():
    """(0,0) touches (1,1) only diagonally: with 8-connectivity {(0,0),(1,1),(1,2)} is ONE region.

    (0,0) scores 0.9, the ok pixels 0.5, (1,1),(1,2) score 0.0.
      8-conn: one region of 3 px: PRO = 1/3 on [0, 1) -> AUPRO = 1/3.
      4-conn: regions {(0,0)} and {(1,1),(1,2)}: PRO = (1 + 0)/2 = 0.5 -> AUPRO = 0.5.
    """
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.full(masks.shape, 0.5)
    maps[0, 0, 0] = 0.9
    maps[0, 1, 1] = maps[0, 1, 2] = 0.0
    assert aupro(maps, masks) == pytest.approx(1 / 3, abs=1e-12)
    assert slow_aupro(maps, masks, structure=STRUCT_8) == pytest.approx(1 / 3, abs=1e-12)
    assert slow_aupro(maps, masks, structure=STRUCT_4) == pytest.approx(0.5, abs=1e-12)


def test_aupro_fpr_is_global_over_normal_images():
    """Adding an all-normal image whose pixels all score high changes the FPR axis."""
    maps, masks = two_region_case()
    extra_maps = np.concatenate([maps, np.full((1, 5, 5), 0.95)])
    extra_masks = np.concatenate([masks, np.zeros((1, 5, 5), bool)])
    # 25 more ok px above everything: 65 ok px; the first point is (25/65, 0) which is beyond 0.3,
    # so the curve is the line from (0,0) to (25/65, 0) and AUPRO(0.3) = 0.
    assert aupro(extra_maps, extra_masks) == 0.0
    assert aupro(extra_maps, extra_masks, fpr_limit=1.0) == pytest.approx(
        slow_aupro(extra_maps, extra_masks, 1.0), abs=1e-12
    )


# ----------------------------------------------------------------------------------------------
# AUPRO vs slow reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [0.3, 0.05, 0.5, 1.0])
def test_aupro_matches_slow_reference(seed, limit):
    maps, masks = random_case(seed, decimals=1 + seed % 3)
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(slow_aupro(maps, masks, limit), abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_pro_curve_is_prefix_of_slow_curve(seed):
    maps, masks = random_case(seed, decimals=1)
    xs, ys = slow_pro_curve(maps, masks)
    fprs, pros = pro_curve(maps, masks, fpr_limit=0.3)
    np.testing.assert_allclose(fprs, xs[: fprs.size], atol=1e-12)
    np.testing.assert_allclose(pros, ys[: pros.size], atol=1e-12)
    assert fprs[-1] > 0.3 and fprs[-2] <= 0.3
    full_x, full_y = pro_curve(maps, masks, fpr_limit=1.0)
    np.testing.assert_allclose(full_x, xs, atol=1e-12)
    np.testing.assert_allclose(full_y, ys, atol=1e-12)


@pytest.mark.parametrize("limit", [0.3, 0.02, 1.0])
def test_aupro_equals_trapezoid_of_pro_curve(limit):
    rng = np.random.default_rng(11)
    masks = ndimage.gaussian_filter(rng.normal(size=(12, 40, 40)), sigma=(0, 3, 3)) > 0.12
    masks[:4] = False
    maps = (
        ndimage.gaussian_filter(masks.astype(float), sigma=(0, 2, 2)) + rng.normal(0, 0.3, masks.shape)
    ).astype(np.float32)
    fprs, pros = pro_curve(maps, masks, fpr_limit=limit)
    expected = official_trapezoid(fprs, pros, limit) / limit
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected < 1.0


def test_aupro_float32_maps():
    maps, masks = random_case(7, decimals=2)
    maps32 = maps.astype(np.float32)
    assert aupro(maps32, masks) == pytest.approx(slow_aupro(maps32, masks), abs=1e-9)


def test_aupro_nan_without_anomalies():
    maps, masks = random_case(2)
    assert math.isnan(aupro(maps, np.zeros_like(masks)))


# ----------------------------------------------------------------------------------------------
# Tables and evaluate
# ----------------------------------------------------------------------------------------------
def test_roc_curve_table():
    rng = np.random.default_rng(3)
    labels = rng.random(5000) < 0.2
    scores = rng.normal(size=5000) + labels
    table = roc_curve_table(scores, labels, max_points=100)
    assert set(table) == {"fpr", "tpr", "threshold"}
    assert 2 <= len(table["fpr"]) <= 100
    assert (table["fpr"][0], table["tpr"][0], table["threshold"][0]) == (0.0, 0.0, np.inf)
    assert (table["fpr"][-1], table["tpr"][-1]) == (1.0, 1.0)
    assert np.all(np.diff(table["fpr"]) >= 0) and np.all(np.diff(table["threshold"]) < 0)
    # Undecimated: every row is a point of sklearn's full curve, the corners are all there (same AUC).
    for n in (50, 5000):
        sc = np.round(scores[:n], 1)
        full = roc_curve_table(sc, labels[:n], max_points=10**6)
        fpr, tpr, thr = roc_curve(labels[:n], sc, drop_intermediate=False)
        where = np.searchsorted(-thr, -full["threshold"])
        np.testing.assert_array_equal(thr[where], full["threshold"])
        np.testing.assert_allclose(full["fpr"], fpr[where], atol=1e-15)
        np.testing.assert_allclose(full["tpr"], tpr[where], atol=1e-15)
        assert np.trapezoid(full["tpr"], full["fpr"]) == pytest.approx(
            roc_auc_score(labels[:n], sc), abs=1e-12
        )
        corners = roc_curve(labels[:n], sc, drop_intermediate=True)[2]
        assert len(full["threshold"]) <= len(corners)
    # Many negatives in a row: only the two ends of the run are kept.
    table = roc_curve_table(np.array([0.1, 0.2, 0.3, 0.4, 0.9]), np.array([0, 0, 0, 0, 1]))
    np.testing.assert_allclose(table["fpr"], [0, 0, 1])
    np.testing.assert_allclose(table["tpr"], [0, 1, 1])
    np.testing.assert_allclose(table["threshold"], [np.inf, 0.9, 0.1])


def test_pro_curve_table():
    maps, masks = random_case(4, n=6, h=30, w=30, decimals=4)
    full = pro_curve(maps, masks, fpr_limit=0.3)
    table = pro_curve_table(maps, masks, max_points=20)
    assert set(table) == {"fpr", "pro"}
    assert len(table["fpr"]) <= 20 < full[0].size
    assert table["fpr"][0] == 0.0 and table["fpr"][-1] == full[0][-1] and table["pro"][-1] == full[1][-1]


def test_evaluate():
    maps, masks = random_case(5, n=8)
    labels = masks.reshape(8, -1).any(axis=1).astype(int)
    scores = maps.reshape(8, -1).max(axis=1)
    res = evaluate(scores, labels, maps, masks)
    assert set(res) == {"image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro"}
    assert res["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert res["image_f1_max"] == pytest.approx(sk_f1_max(scores, labels), abs=1e-9)
    assert res["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert res["pixel_f1_max"] == pytest.approx(sk_f1_max(maps, masks), abs=1e-9)
    assert res["aupro"] == pytest.approx(slow_aupro(maps, masks), abs=1e-9)
    image_only = evaluate(scores, labels)
    assert image_only["image_auroc"] == res["image_auroc"]
    assert all(math.isnan(image_only[k]) for k in ("pixel_auroc", "pixel_f1_max", "aupro"))
    no_anomalous_px = evaluate(scores, labels, maps, np.zeros_like(masks))
    assert all(math.isnan(no_anomalous_px[k]) for k in ("pixel_auroc", "pixel_f1_max", "aupro"))


# ----------------------------------------------------------------------------------------------
# Invalid input
# ----------------------------------------------------------------------------------------------
def test_invalid_inputs():
    maps, masks = random_case(0)
    with pytest.raises(ValueError, match=r"\(4, 10, 12\).*\(4, 10, 11\)"):
        pixel_auroc(maps, masks[..., :11])
    with pytest.raises(ValueError, match=r"shape"):
        aupro(maps, masks[:3])
    bad = maps.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        aupro(bad, masks)
    with pytest.raises(ValueError, match="NaN or inf"):
        image_auroc(np.array([0.1, np.inf]), np.array([0, 1]))
    with pytest.raises(ValueError, match="one class"):
        image_auroc(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="one class"):
        pixel_auroc(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="0/1"):
        image_auroc(np.array([0.1, 0.2, 0.3]), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="0/1"):
        aupro(maps, masks * 255)
    with pytest.raises(ValueError, match="positive"):
        f1_max(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit=1.5)
    with pytest.raises(ValueError, match="max_points"):
        roc_curve_table(maps.ravel(), masks.ravel(), max_points=1)
    with pytest.raises(ValueError, match="together"):
        evaluate(np.array([0.1, 0.2]), np.array([0, 1]), maps=maps)
    with pytest.raises(ValueError, match="anomalous"):
        pro_curve(maps, np.zeros_like(masks))
