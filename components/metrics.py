"""MVTec AD evaluation protocol: image/pixel AUROC, F1-max and AUPRO.

Only numpy, scipy and scikit-learn are used (no torch).

Speed: ``np.argsort`` over all pixels is slow (no SIMD argsort), so the normal scores are value-sorted
once (SIMD ``np.sort``) and the (few) anomalous scores are argsorted. The curves of
:func:`binary_curve` / :func:`pro_curve` follow sklearn's ``_binary_clf_curve`` semantics exactly:
thresholds are the distinct scores in decreasing order, each point counts every sample whose score
is >= the threshold (ties are never split). The scalar metrics (AUROC, F1-max, AUPRO) use the same
curves in compressed form: between two consecutive distinct *anomalous* scores the curve is a flat
run of normal pixels, so it is fully described by a few vertices per distinct anomalous score, found
with ``np.searchsorted`` in the sorted normal scores. The trapezoid areas are identical (collinear
points add nothing), at O(#anomalous * log #normal) cost after the one sort.

AUPRO reproduces the official ``mvtec_ad_evaluation`` code (``pro_curve_util.compute_pro`` and
``generic_util.trapezoid``) in float64 (the official code accumulates the FPR in float32, so results
can differ from it by ~1e-7).
"""

from __future__ import annotations

import math

import numpy as np

#: the quality metrics every evaluation reports, in report order
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")

__all__ = [
    "aupro",
    "binary_curve",
    "evaluate",
    "f1_max",
    "f1_max_threshold",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "pro_curve_table",
    "roc_curve_table",
]

_STRUCTURE_8 = np.ones((3, 3), dtype=int)


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------
def _as_scores(scores: np.ndarray, name: str) -> np.ndarray:
    """Return ``scores`` as a finite float array (float32/float64 kept, other types -> float64)."""
    arr = np.asarray(scores)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return arr


def _as_binary(labels: np.ndarray, name: str) -> np.ndarray:
    """Return ``labels`` as a bool array; only bool or 0/1 values are accepted."""
    arr = np.asarray(labels)
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.number)):
        raise ValueError(f"{name} must be bool or 0/1, got dtype {arr.dtype}")
    if np.any((arr != 0) & (arr != 1)):
        bad = np.unique(arr[(arr != 0) & (arr != 1)])[:5]
        raise ValueError(f"{name} must contain only 0/1 (or bool) values, found e.g. {bad.tolist()}")
    return arr != 0


def _check_pair(
    scores: np.ndarray, labels: np.ndarray, score_name: str, label_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate scores/labels together: same shape, finite scores, binary labels."""
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.shape != y.shape:
        raise ValueError(
            f"shape mismatch: {score_name} has shape {s.shape} but {label_name} has shape {y.shape}"
        )
    return _as_scores(s, score_name), _as_binary(y, label_name)


def _check_maps_masks(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate anomaly maps and ground-truth masks; 2-D inputs are treated as one image."""
    m, g = _check_pair(maps, masks, "maps", "masks")
    if m.ndim == 2:
        m, g = m[None], g[None]
    if m.ndim != 3:
        raise ValueError(f"maps and masks must have shape (N, H, W), got {m.shape}")
    return m, g


def _check_fpr_limit(fpr_limit: float) -> float:
    limit = float(fpr_limit)
    if not (0.0 < limit <= 1.0):
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return limit


# --------------------------------------------------------------------------------------------------
# Shared sorting machinery
# --------------------------------------------------------------------------------------------------
def _split_sort(
    scores: np.ndarray, is_pos: np.ndarray, with_perm: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Value-sort negative and positive scores (ascending) separately.

    With ``with_perm`` the positives are argsorted instead and the permutation (indices into
    ``scores[is_pos]``) is returned too, so per-pixel weights can follow.
    """
    flat = scores.reshape(-1)
    pos_mask = is_pos.reshape(-1)
    neg = flat[~pos_mask]
    neg.sort()  # in place: avoids another full-size copy
    pos = flat[pos_mask]
    if with_perm:
        perm = np.argsort(pos, kind="stable")
        return neg, pos[perm], perm
    pos.sort()
    return neg, pos, None


def _merged_curve(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Curve of two ascending-sorted score arrays, with sklearn ``_binary_clf_curve`` semantics.

    Returns ``(thresholds, fps, tps)``: distinct scores in decreasing order and, for each, the number
    of negatives / positives with score >= threshold (int64).
    """
    n_neg, n_pos = neg.size, pos.size
    n = n_neg + n_pos
    # Positions of the positives in the merged ascending order (ties: positives first; irrelevant).
    ins = np.searchsorted(neg, pos, side="left") + np.arange(n_pos)
    merged = np.empty(n, dtype=np.result_type(neg.dtype, pos.dtype))
    is_pos = np.zeros(n, dtype=bool)
    is_pos[ins] = True
    merged[ins] = pos
    merged[~is_pos] = neg
    del is_pos
    desc = merged[::-1]
    # Last index of each run of tied scores in decreasing order.
    last = np.empty(n, dtype=bool)
    np.not_equal(desc[1:], desc[:-1], out=last[:-1])
    last[-1] = True
    thr_idx = np.flatnonzero(last)
    del last
    # Positions of the positives in decreasing order, ascending: count those <= each threshold index.
    pos_desc = (n - 1 - ins)[::-1]
    tps = np.searchsorted(pos_desc, thr_idx, side="right").astype(np.int64)
    fps = thr_idx.astype(np.int64) + 1 - tps
    return desc[thr_idx], fps, tps


def binary_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative false/true positives at each distinct threshold (sklearn ``_binary_clf_curve``).

    Inputs of any (equal) shape are flattened. Returns ``(fps, tps, thresholds)`` with thresholds
    decreasing; ``fps``/``tps`` count the negatives/positives with score >= threshold.
    """
    s, y = _check_pair(scores, labels, "scores", "labels")
    neg, pos, _ = _split_sort(s, y)
    thresholds, fps, tps = _merged_curve(neg, pos)
    return fps, tps, thresholds


class _Levels:
    """Compressed curve: one entry per distinct positive score ``p`` (decreasing).

    ``ge``/``gt``: number of negatives with score >= p / > p; ``tp``: positives with score >= p;
    ``w``: cumulative positive weight (score >= p), when weights are given; ``values``: the scores p.
    ``n_neg``/``n_pos``: totals.
    """

    def __init__(self, neg: np.ndarray, pos: np.ndarray, pos_w: np.ndarray | None = None) -> None:
        self.n_neg, self.n_pos = int(neg.size), int(pos.size)
        desc = pos[::-1]
        last = np.empty(desc.size, dtype=bool)
        np.not_equal(desc[1:], desc[:-1], out=last[:-1])
        if desc.size:
            last[-1] = True
        idx = np.flatnonzero(last)[::-1]  # ascending scores: searchsorted keys in increasing order
        values = desc[idx]
        self.ge = (self.n_neg - np.searchsorted(neg, values, side="left"))[::-1]
        self.gt = (self.n_neg - np.searchsorted(neg, values, side="right"))[::-1]
        self.values = values[::-1]
        self.tp = idx[::-1] + 1
        self.w = None if pos_w is None else np.cumsum(pos_w[::-1])[idx[::-1]]

    def vertices(self, y_cum: np.ndarray, y_total: float | int) -> tuple[np.ndarray, np.ndarray]:
        """Curve vertices in (negative count, cumulative y) space, from (0, 0) to (n_neg, y_total).

        Per distinct positive score p: (gt, y(> p)) then (ge, y(>= p)); the flat runs of negatives
        between them are straight segments, so these vertices carry the whole trapezoid area.
        """
        k = self.ge.size
        xs = np.empty(2 * k + 2, dtype=np.int64)
        ys = np.empty(2 * k + 2, dtype=np.result_type(y_cum.dtype, type(y_total)))
        xs[0], ys[0] = 0, 0
        xs[1:-1:2], xs[2:-1:2], xs[-1] = self.gt, self.ge, self.n_neg
        ys[1:-1:2] = np.concatenate(([0], y_cum[:-1]))
        ys[2:-1:2], ys[-1] = y_cum, y_total
        return xs, ys

    def roc_points(self, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The corner points of the ROC curve as ``(fps, tps, thresholds)``, starting at (0, 0, inf).

        Every row is a point of the full curve (same threshold, counts); only points inside straight
        runs of negatives are left out. ``neg`` is the ascending-sorted negative scores.
        """
        fp, tp = self.vertices(self.tp, self.n_pos)
        thr = np.empty(fp.size, dtype=np.float64)
        thr[0] = np.inf
        # (gt, tp(> p)): threshold = the smallest negative score above p; (ge, tp(>= p)): threshold p.
        thr[1:-1:2] = neg[np.minimum(self.n_neg - self.gt, self.n_neg - 1)] if self.n_neg else np.nan
        thr[2:-1:2] = self.values
        thr[-1] = neg[0] if self.n_neg else np.nan
        # Drop vertices that repeat the previous point (no negative between two positive scores).
        keep = np.ones(fp.size, dtype=bool)
        keep[1:] = (fp[1:] != fp[:-1]) | (tp[1:] != tp[:-1])
        return fp[keep], tp[keep], thr[keep]

    def auroc(self) -> float:
        """Trapezoid ROC AUC, summed exactly in integers (equals sklearn ``roc_auc_score``)."""
        if self.n_neg == 0 or self.n_pos == 0:
            raise ValueError(
                f"AUROC needs both classes, got {self.n_pos} positive and {self.n_neg} negative samples "
                "(only one class present)"
            )
        fp, tp = self.vertices(self.tp, self.n_pos)
        twice_area = int(np.dot(np.diff(fp), tp[1:] + tp[:-1]))
        return twice_area / (2.0 * self.n_pos * self.n_neg)

    def f1_max(self) -> float:
        """max over thresholds of F1 = 2 tp / (tp + fp + P) (= 2PR/(P+R), 0/0 -> 0).

        For a given tp the fewest false positives are at a threshold equal to a positive score, so
        only those thresholds need checking (others give F1 = 0 or less than one of these).
        """
        if self.n_pos == 0:
            raise ValueError("F1-max needs at least one positive label, got none")
        f1 = 2.0 * self.tp / (self.tp + self.ge + self.n_pos)
        return float(f1.max())

    def aupro(self, num_regions: int, fpr_limit: float) -> float:
        """Official AUPRO: trapezoid of PRO over the global FPR up to ``fpr_limit``, / fpr_limit."""
        assert self.w is not None
        xs, ys = self.vertices(self.w, float(self.w[-1]))
        fprs = np.clip(xs / float(self.n_neg), 0.0, 1.0)
        pros = np.clip(ys / float(num_regions), 0.0, 1.0)
        return _trapezoid(fprs, pros, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------------------------------
# Image / pixel AUROC and F1-max
# --------------------------------------------------------------------------------------------------
def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image-level AUROC (sklearn ``roc_auc_score``); labels 0 = normal, 1 = anomalous."""
    s, y = _check_pair(scores, labels, "scores", "labels")
    if s.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shape {s.shape}")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(
            f"AUROC needs both classes, got {n_pos} anomalous and {y.size - n_pos} normal samples "
            "(only one class present)"
        )
    from sklearn.metrics import roc_auc_score  # sklearn costs ~2 s to import: only where it is used

    return float(roc_auc_score(y, s))


def validation_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of label 1 vs 0 for model selection: NaN (never "best") when a class is missing or any score
    is non-finite (a diverged model), instead of an error."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    if len(np.unique(labels)) < 2 or not np.isfinite(scores).all():
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Pixel-level AUROC over every pixel of every image (equal to sklearn ``roc_auc_score``)."""
    m, g = _check_pair(maps, masks, "maps", "masks")
    neg, pos, _ = _split_sort(m, g)
    return _Levels(neg, pos).auroc()


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best F1 over the precision-recall curve (pass flattened maps/masks for pixel F1-max)."""
    s, y = _check_pair(scores, labels, "scores", "labels")
    neg, pos, _ = _split_sort(s, y)
    return _Levels(neg, pos).f1_max()


def f1_max_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """F1-max and a threshold that reaches it with the rule "anomalous: score > threshold": midway between
    the positive score where F1 peaks and the next lower score (same predictions as score >= that
    positive score). Pass flattened maps / masks for pixels; one sort, as :func:`f1_max`."""
    s, y = _check_pair(scores, labels, "scores", "labels")
    neg, pos, _ = _split_sort(s, y)
    levels = _Levels(neg, pos)
    if levels.n_pos == 0:
        raise ValueError("F1-max needs at least one positive label, got none")
    f1 = 2.0 * levels.tp / (levels.tp + levels.ge + levels.n_pos)
    best = int(np.argmax(f1))
    peak = float(levels.values[best])
    below = [float(a[i - 1]) for a in (neg, pos) if (i := int(np.searchsorted(a, peak, side="left")))]
    lower = max(below) if below else peak - max(abs(peak), 1.0)
    return float(f1[best]), (peak + lower) / 2


# --------------------------------------------------------------------------------------------------
# PRO / AUPRO
# --------------------------------------------------------------------------------------------------
def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per anomalous pixel (row-major order of ``masks``) 1 / size of its 8-connected region.

    Returns the weights (float64) and the total number of regions over all images.
    """
    from scipy import ndimage

    flat_any = masks.reshape(masks.shape[0], -1).any(axis=1)
    parts: list[np.ndarray] = []
    num_regions = 0
    for i in np.flatnonzero(flat_any):
        labeled, n = ndimage.label(masks[i], structure=_STRUCTURE_8)
        sizes = np.bincount(labeled.ravel())[1:]
        inv = 1.0 / sizes.astype(np.float64)
        parts.append(inv[labeled[masks[i]] - 1])
        num_regions += int(n)
    weights = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    return weights, num_regions


def _pro_points(
    neg: np.ndarray, pos: np.ndarray, pos_w: np.ndarray, num_regions: int, fpr_limit: float
) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve from sorted normal scores and sorted anomalous scores with their region weights.

    Only pixels with score >= t matter, where t is the score at which the global FPR first exceeds
    ``fpr_limit`` (all ties at t are kept). Returns the curve starting at (0, 0), up to and including
    the first point with FPR > fpr_limit ((1, 1) is appended, as officially, if the whole curve is kept).
    """
    n_ok = neg.size
    m = math.floor(fpr_limit * n_ok) + 2  # m / n_ok > fpr_limit with margin; exactness needs only ">".
    full = m > n_ok
    if not full:
        t = neg[n_ok - m]
        neg = neg[np.searchsorted(neg, t, side="left") :]
        j = np.searchsorted(pos, t, side="left")
        pos, pos_w = pos[j:], pos_w[j:]
    _, fps, tps = _merged_curve(neg, pos)
    cum_w = np.concatenate(([0.0], np.cumsum(pos_w[::-1])))
    fprs = fps / float(n_ok)
    pros = cum_w[tps] / float(num_regions)
    np.clip(fprs, 0.0, 1.0, out=fprs)
    np.clip(pros, 0.0, 1.0, out=pros)
    fprs = np.concatenate(([0.0], fprs, [1.0] if full else []))
    pros = np.concatenate(([0.0], pros, [1.0] if full else []))
    end = int(np.searchsorted(fprs, fpr_limit, side="right"))  # first index with fpr > fpr_limit
    return fprs[: end + 1], pros[: end + 1]


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Official ``generic_util.trapezoid``: area under (x, y) for x <= x_max, interpolating at x_max."""
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))  # == bisect.bisect(x, x_max)
        if not 0 < ins < len(x):
            raise ValueError(f"x_max={x_max} lies outside the curve's range [{x[0]}, {x[-1]}]")
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def _pro_inputs(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Sorted normal scores, sorted anomalous scores, their region weights and the region count."""
    weights, num_regions = _region_weights(masks)
    neg, pos, perm = _split_sort(maps, masks, with_perm=True)
    assert perm is not None
    return neg, pos, weights[perm], num_regions


def pro_curve(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve (official MVTec AD ``compute_pro``), as ``(fprs, pros)``.

    Starts at (0, 0) and stops at the first point whose FPR exceeds ``fpr_limit`` (inclusive); use
    ``fpr_limit=1.0`` for the whole curve. Raises ValueError without anomalous or normal pixels.
    """
    limit = _check_fpr_limit(fpr_limit)
    m, g = _check_maps_masks(maps, masks)
    n_anom = int(np.count_nonzero(g))
    if n_anom == 0 or n_anom == g.size:
        raise ValueError(f"PRO curve needs anomalous and normal pixels, got {n_anom} of {g.size} anomalous")
    return _pro_points(*_pro_inputs(m, g), fpr_limit=limit)


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, normalised by ``fpr_limit`` (official protocol).

    Regions are 8-connected components of each mask; the FPR is global over all normal pixels of all
    images. Returns NaN when the masks contain no anomalous pixel (or no normal pixel).
    """
    limit = _check_fpr_limit(fpr_limit)
    m, g = _check_maps_masks(maps, masks)
    n_anom = int(np.count_nonzero(g))
    if n_anom == 0 or n_anom == g.size:
        return float("nan")
    neg, pos, pos_w, num_regions = _pro_inputs(m, g)
    return _Levels(neg, pos, pos_w).aupro(num_regions, limit)


# --------------------------------------------------------------------------------------------------
# Curve tables
# --------------------------------------------------------------------------------------------------
def _decimate(progress: np.ndarray, max_points: int) -> np.ndarray:
    """At most ``max_points`` indices evenly spread along a non-decreasing ``progress``; keeps ends."""
    n = progress.size
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    if n <= max_points:
        return np.arange(n)
    targets = np.linspace(progress[0], progress[-1], max_points - 1)
    idx = np.searchsorted(progress, targets, side="left")
    return np.unique(np.concatenate((np.clip(idx, 0, n - 1), [n - 1])))


def roc_curve_table(scores: np.ndarray, labels: np.ndarray, max_points: int = 1000) -> dict[str, np.ndarray]:
    """ROC curve as columns ``fpr``, ``tpr``, ``threshold`` (first row (0, 0, inf), like sklearn).

    Rows are points of sklearn's ``roc_curve`` (points inside straight runs of normal samples are
    skipped), decimated to at most ``max_points`` rows evenly along the curve; first/last rows kept.
    """
    s, y = _check_pair(scores, labels, "scores", "labels")
    neg, pos, _ = _split_sort(s, y)
    if neg.size == 0 or pos.size == 0:
        raise ValueError("ROC curve needs both classes (only one class present)")
    fps, tps, thr = _Levels(neg, pos).roc_points(neg)
    fpr = fps / float(neg.size)
    tpr = tps / float(pos.size)
    idx = _decimate(fpr + tpr, max_points)
    return {"fpr": fpr[idx], "tpr": tpr[idx], "threshold": thr[idx]}


def pro_curve_table(
    maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, max_points: int = 1000
) -> dict[str, np.ndarray]:
    """PRO curve (see :func:`pro_curve`) as columns ``fpr``, ``pro``, decimated to ``max_points`` rows."""
    fprs, pros = pro_curve(maps, masks, fpr_limit=fpr_limit)
    idx = _decimate(fprs + pros, max_points)
    return {"fpr": fprs[idx], "pro": pros[idx]}


# --------------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------------
def evaluate(
    image_scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All MVTec AD metrics: ``image_auroc``, ``image_f1_max``, ``pixel_auroc``, ``pixel_f1_max``, ``aupro``.

    Image metrics raise ValueError if a class is missing. Pixel metrics are computed when ``maps`` and
    ``masks`` are given and the masks contain anomalous pixels, else NaN (AUROC/AUPRO are NaN too when
    there is no normal pixel). The pixel scores are sorted once for all pixel metrics.
    """
    nan = float("nan")
    out = {
        "image_auroc": image_auroc(image_scores, labels),
        "image_f1_max": f1_max(image_scores, labels),
        "pixel_auroc": nan,
        "pixel_f1_max": nan,
        "aupro": nan,
    }
    if (maps is None) != (masks is None):
        raise ValueError("maps and masks must be given together (one of them is None)")
    if maps is None or masks is None:
        return out
    limit = _check_fpr_limit(fpr_limit)
    m, g = _check_maps_masks(maps, masks)
    n_images = np.asarray(image_scores).shape[0]
    if m.shape[0] != n_images:
        raise ValueError(f"shape mismatch: maps has shape {m.shape} but image_scores has {n_images} entries")
    n_anom = int(np.count_nonzero(g))
    if n_anom == 0:
        return out
    neg, pos, pos_w, num_regions = _pro_inputs(m, g)
    levels = _Levels(neg, pos, pos_w)
    out["pixel_f1_max"] = levels.f1_max()
    if n_anom < g.size:
        out["pixel_auroc"] = levels.auroc()
        out["aupro"] = levels.aupro(num_regions, limit)
    return out
