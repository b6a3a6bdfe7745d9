"""Decisions, not only scores: thresholds set without test labels, normalized scores and maps, labels and
defect masks, and the figures at that operating point.

A threshold comes from *held-out* normal images of train/good, scored by a memory (bank, Gaussian,
gallery) fitted without them, and — for the rule that needs positives — from synthetic anomalies made
from those images (:mod:`components.data.synthetic`). Throughout, "anomalous" means score > threshold.

Rules (``decision.rule`` in params.yaml):

- ``normal_quantile``: the image threshold leaves at most ``false_alarm_rate`` of the held-out normal
  images above it; the pixel threshold does the same for the maxima of their maps, so at most that
  fraction of normal images gets any defect pixel. Needs ⌈1 / false_alarm_rate⌉ held-out normal images.
- ``synthetic_f1``: the thresholds with the best F1 on held-out normals vs their synthetic anomalies
  (image scores; map pixels against the synthetic masks). Needs :data:`MIN_F1_IMAGES` of each.

Normalized scores and maps are piecewise linear: ``low`` → 0, the threshold → 0.5, ``high`` → 1, clipped
(anomalib's min-max normalization around the threshold); ``low`` is the lowest held-out normal score,
``high`` the highest synthetic-anomaly score (the highest normal one without synthetic anomalies).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from components.metrics import f1_max_threshold

RULES = ("normal_quantile", "synthetic_f1")
#: the figures at the operating point a decision reports (thresholds first: per model, never averaged)
DECISION_METRICS = (
    "image_threshold",
    "pixel_threshold",
    "image_fpr",
    "image_recall",
    "image_precision",
    "image_f1",
    "pixel_f1",
)
#: held-out normal images (and synthetic anomalies) the ``synthetic_f1`` rule needs at least
MIN_F1_IMAGES = 10


class CalibrationError(ValueError):
    """Too few or unusable calibration images for the rule asked (the message says how many are needed)."""


def required_normals(rule: str, false_alarm_rate: float) -> int:
    """Held-out normal images ``rule`` needs: ⌈1 / rate⌉ for a quantile, :data:`MIN_F1_IMAGES` for F1."""
    if rule not in RULES:
        raise CalibrationError(f"decision.rule: unknown rule {rule!r}; choose from {', '.join(RULES)}")
    if rule == "normal_quantile":
        if not 0 < false_alarm_rate < 1:
            raise CalibrationError(f"decision.false_alarm_rate: must be in (0, 1), got {false_alarm_rate!r}")
        return math.ceil(1 / false_alarm_rate - 1e-9)
    return MIN_F1_IMAGES


def quantile_threshold(normal: np.ndarray, false_alarm_rate: float) -> float:
    """The lowest normal score that leaves at most ⌊rate · n⌋ of the ``normal`` scores above it."""
    s = np.sort(np.asarray(normal, np.float64).ravel())[::-1]
    return float(s[min(math.floor(false_alarm_rate * s.size + 1e-9), s.size - 1)])


@dataclass(frozen=True)
class Threshold:
    """A threshold and the range its normalization maps to [0, 1] (the threshold to 0.5)."""

    value: float
    low: float
    high: float

    @classmethod
    def around(cls, value: float, low: float, high: float) -> Threshold:
        """``low`` < ``value`` < ``high`` made to hold (a degenerate side mirrors the other, or spans 1)."""
        if not high > value and not low < value:
            low, high = value - 1.0, value + 1.0
        elif not high > value:
            high = value + (value - low)
        elif not low < value:
            low = value - (high - value)
        return cls(float(value), float(low), float(high))

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """``x`` piecewise linearly: low → 0, threshold → 0.5, high → 1, clipped to [0, 1] (float32)."""
        x = np.asarray(x, np.float64)
        below = 0.5 * (x - self.low) / (self.value - self.low)
        above = 0.5 + 0.5 * (x - self.value) / (self.high - self.value)
        return np.clip(np.where(x > self.value, above, below), 0.0, 1.0).astype(np.float32)

    def decide(self, x: np.ndarray) -> np.ndarray:
        """Anomalous (True) where ``x`` is above the threshold: labels for scores, defect masks for maps."""
        return np.asarray(x) > self.value

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> Threshold:
        return cls(float(d["value"]), float(d["low"]), float(d["high"]))


@dataclass(frozen=True)
class Calibration:
    """The thresholds of one model and how they were set."""

    rule: str
    false_alarm_rate: float | None
    image: Threshold
    pixel: Threshold
    held_out_normal: int
    synthetic: int
    held_out_false_alarm_rate: float  # of the calibration normals, at the image threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        fields = {k: d[k] for k in ("rule", "false_alarm_rate", "held_out_normal", "synthetic")}
        image, pixel = Threshold.from_dict(d["image"]), Threshold.from_dict(d["pixel"])
        return cls(
            **fields, image=image, pixel=pixel, held_out_false_alarm_rate=d["held_out_false_alarm_rate"]
        )


def calibrate(
    rule: str,
    normal_scores: np.ndarray,
    normal_maps: np.ndarray,
    synthetic_scores: np.ndarray | None = None,
    synthetic_maps: np.ndarray | None = None,
    synthetic_masks: np.ndarray | None = None,
    false_alarm_rate: float = 0.05,
) -> Calibration:
    """Image and pixel thresholds from held-out normal images (scores (N,), maps (N, H, W)) and, for
    ``synthetic_f1``, synthetic anomalies made from them (scores, maps and their bool masks)."""
    need = required_normals(rule, false_alarm_rate)
    normal_scores = np.asarray(normal_scores, np.float64)
    normal_maps = np.asarray(normal_maps)
    n = normal_scores.size
    if n < need:
        at = f" at false_alarm_rate {false_alarm_rate}" if rule == "normal_quantile" else ""
        raise CalibrationError(f"decision.rule {rule}{at} needs {need} held-out normal images, got {n}")
    m = 0 if synthetic_scores is None else int(np.asarray(synthetic_scores).size)
    if rule == "synthetic_f1" and m < MIN_F1_IMAGES:
        raise CalibrationError(
            f"decision.rule synthetic_f1 needs {MIN_F1_IMAGES} synthetic anomalies, got {m} "
            "(train.synthetic names their kinds)"
        )
    peaks = normal_maps.reshape(n, -1).max(1)
    if rule == "normal_quantile":
        image = quantile_threshold(normal_scores, false_alarm_rate)
        pixel = quantile_threshold(peaks, false_alarm_rate)
    else:
        labels = np.r_[np.zeros(n, np.int8), np.ones(m, np.int8)]
        _, image = f1_max_threshold(np.r_[normal_scores, np.asarray(synthetic_scores, np.float64)], labels)
        maps = np.concatenate([normal_maps, np.asarray(synthetic_maps)]).ravel()
        masks = np.concatenate([np.zeros(normal_maps.shape, bool), np.asarray(synthetic_masks, bool)]).ravel()
        _, pixel = f1_max_threshold(maps, masks)
    high_image = float(np.max(synthetic_scores)) if m else float(normal_scores.max())
    high_pixel = float(np.max(synthetic_maps)) if m else float(normal_maps.max())
    return Calibration(
        rule=rule,
        false_alarm_rate=false_alarm_rate if rule == "normal_quantile" else None,
        image=Threshold.around(image, float(normal_scores.min()), high_image),
        pixel=Threshold.around(pixel, float(normal_maps.min()), high_pixel),
        held_out_normal=n,
        synthetic=m,
        held_out_false_alarm_rate=float(np.mean(normal_scores > image)),
    )


def image_operating_point(scores: np.ndarray, labels: np.ndarray, threshold: Threshold) -> dict[str, float]:
    """Test-split figures at ``threshold``: ``image_fpr``, ``image_recall``, ``image_precision``,
    ``image_f1`` (NaN where undefined: no normal / no anomalous image / nothing flagged)."""
    predicted = threshold.decide(scores)
    labels = np.asarray(labels).astype(bool)
    tp, fp = int(np.sum(predicted & labels)), int(np.sum(predicted & ~labels))
    positives, negatives = int(labels.sum()), int((~labels).sum())
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {
        "image_fpr": ratio(fp, negatives),
        "image_recall": ratio(tp, positives),
        "image_precision": ratio(tp, tp + fp),
        "image_f1": ratio(2 * tp, tp + fp + positives),
    }


def pixel_f1(maps: np.ndarray, masks: np.ndarray, threshold: Threshold) -> float:
    """F1 of the defect masks at ``threshold`` over every pixel (NaN without anomalous pixels)."""
    masks = np.asarray(masks, bool)
    predicted = threshold.decide(maps)
    tp, flagged, positives = int(np.sum(predicted & masks)), int(predicted.sum()), int(masks.sum())
    return 2 * tp / (flagged + positives) if positives else float("nan")
