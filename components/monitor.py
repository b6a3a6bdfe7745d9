"""The collapse monitor: is fine-tuning on normal images destroying the pretrained feature space?

Every fine-tuned method shares one failure: trained on normal data alone, the features collapse (all
images map near one point) or forget what made them discriminative. The monitor turns that into measured
signals, computed on the validation slice (held-out normal images + synthetic anomalies, never the test
split) with the method's own image representation (``AnomalyMethod.monitor_features``):

- ``effective_rank``: exp of the entropy of the normalised singular values of the centred features of the
  held-out normal images (Roy & Vetterli 2007); ``rank_ratio`` is it over the pretrained value.
- ``knn_overlap``: mean fraction of each validation image's ``knn`` nearest validation images that are
  also its nearest ones under the pretrained features (1 = the neighbourhood graph is intact).
- ``separation``: AUROC of synthetic anomalies vs held-out normal images, scored by the sum of squared
  L2 distances to the 2 nearest features of a fixed reference subset of training images (DN2 rule; the
  first ``reference_images`` of each category, an image scored against its own category's);
  ``separation_drop`` is the pretrained value minus it.
- ``drift``: mean relative change ||f − f₀|| / ||f₀|| of the validation features from their pretrained
  values.

A run is *collapsed* when any signal crosses its threshold (:class:`CollapseThresholds`, from params).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from components.metrics import validation_auroc
from components.specs import CollapseThresholds

Features = Callable[[torch.Tensor], torch.Tensor]


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of the centred rows of ``x`` (n, d)."""
    x = x.double()
    s = torch.linalg.svdvals(x - x.mean(0))
    if float(s.sum()) <= 0:
        return 1.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def knn_sets(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """(n, k) indices of each row's k nearest other rows (L2, exact, in float64).

    Computed ``chunk`` rows at a time: memory O(chunk · n), not the O(n²) distance matrix (a
    dataset-wide validation slice has tens of thousands of rows; 36 000² float64 is 10 GB).
    """
    x = x.double()
    k = min(k, len(x) - 1)
    parts = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start : start + chunk], x)
        rows = torch.arange(len(d))
        d[rows, rows + start] = float("inf")
        parts.append(d.topk(k, largest=False).indices)
    return torch.cat(parts) if parts else torch.zeros(0, max(k, 0), dtype=torch.long)


def knn_overlap(current: torch.Tensor, pretrained: torch.Tensor, k: int) -> float:
    """Mean |N_k(current) ∩ N_k(pretrained)| / k over the rows."""
    a, b = knn_sets(current, k), knn_sets(pretrained, k)
    shared = (a[:, :, None] == b[:, None, :]).any(2).float().sum(1)
    return float((shared / a.shape[1]).mean())


def knn_separation(
    features: torch.Tensor,
    labels: np.ndarray,
    reference: torch.Tensor,
    k: int = 2,
    groups: Sequence[str] | None = None,
    reference_groups: Sequence[str] | None = None,
) -> float:
    """AUROC of label-1 vs label-0 rows scored by the sum of squared distances to the k nearest references.

    With ``groups`` (e.g. the categories of a dataset-wide model) a row is scored against the references
    of its own group only (against all of them when its group has none).
    """
    d2 = torch.cdist(features.double(), reference.double()).pow(2)
    k = min(k, len(reference))
    if groups is not None and reference_groups is not None:
        ref = np.asarray(reference_groups)
        for i, group in enumerate(groups):
            own = ref == group
            if own.any():
                d2[i, torch.from_numpy(~own)] = float("inf")
                k = min(k, int(own.sum()))
    scores = d2.topk(k, largest=False).values.sum(1)
    return validation_auroc(labels, scores.numpy())


@dataclass
class MonitorReport:
    """One epoch's signals, and whether (and why) they say collapse."""

    metrics: dict[str, float]
    collapsed: bool = False
    reason: str = ""


@dataclass
class CollapseMonitor:
    """Measures the collapse signals of a training run against its pretrained starting point."""

    thresholds: CollapseThresholds = field(default_factory=CollapseThresholds)
    reference: torch.Tensor | None = None  # uint8 train images the separation is scored against
    reference_groups: list[str] = field(default_factory=list)  # their categories
    pretrained: torch.Tensor | None = None  # validation features before training
    baseline: dict[str, float] = field(default_factory=dict)

    def _features(
        self, features: Features, validation: Iterable[dict]
    ) -> tuple[torch.Tensor, np.ndarray, list[str] | None]:
        feats, labels, groups = [], [], []
        for batch in validation:
            feats.append(features(batch["image"]).float().cpu())
            labels.append(np.asarray(batch["label"]))
            groups.extend(batch.get("category") or [])
        n = sum(len(f) for f in feats)
        return torch.cat(feats), np.concatenate(labels), (groups if len(groups) == n else None)

    def _reference_features(self, features: Features) -> torch.Tensor:
        assert self.reference is not None, "begin() first"
        return torch.cat([features(chunk).float().cpu() for chunk in self.reference.split(32)])

    def begin(self, features: Features, train: Iterable[dict], validation: Iterable[dict]) -> MonitorReport:
        """Record the pretrained state (epoch 0): reference images (the first ``reference_images`` training
        images of each category), validation features, baseline signals."""
        kept: list[torch.Tensor] = []
        groups: list[str] = []
        count: dict[str, int] = {}
        for batch in train:
            names = batch.get("category") or [""] * len(batch["image"])
            for image, group in zip(batch["image"], names, strict=True):
                if count.get(group, 0) < self.thresholds.reference_images:
                    kept.append(image.cpu())
                    groups.append(group)
                    count[group] = count.get(group, 0) + 1
        if len(kept) < 2:
            raise ValueError("collapse monitor: needs at least 2 training images for its reference set")
        self.reference, self.reference_groups = torch.stack(kept), groups
        self.pretrained, _, _ = self._features(features, validation)
        report = self.measure(features, validation)
        self.baseline = dict(report.metrics)
        return report

    def measure(self, features: Features, validation: Iterable[dict]) -> MonitorReport:
        """The signals of the current weights, and the verdict against the thresholds."""
        assert self.pretrained is not None, "begin() first"
        current, labels, groups = self._features(features, validation)
        if current.shape != self.pretrained.shape:
            raise ValueError(
                f"collapse monitor: the validation slice changed ({tuple(current.shape)} features, "
                f"pretrained {tuple(self.pretrained.shape)})"
            )
        if not torch.isfinite(current).all():  # the weights diverged
            nan = float("nan")
            metrics = dict.fromkeys(("effective_rank", "knn_overlap", "separation", "drift"), nan)
            metrics |= {"rank_ratio": nan, "separation_drop": nan}
            return MonitorReport(metrics, collapsed=True, reason="non-finite features (training diverged)")
        normal = labels == 0
        t = self.thresholds
        rank = effective_rank(current[torch.from_numpy(normal)])
        separation = knn_separation(
            current, labels, self._reference_features(features), 2, groups, self.reference_groups
        )
        rel = (current - self.pretrained).norm(dim=1) / self.pretrained.norm(dim=1).clamp_min(1e-12)
        metrics = {
            "effective_rank": rank,
            "knn_overlap": knn_overlap(current, self.pretrained, t.knn),
            "separation": separation,
            "drift": float(rel.mean()),
        }
        base = self.baseline or metrics
        metrics["rank_ratio"] = rank / max(base["effective_rank"], 1e-12)
        metrics["separation_drop"] = base["separation"] - separation
        return self.verdict(metrics)

    def verdict(self, metrics: dict[str, float]) -> MonitorReport:
        t = self.thresholds
        checks = [
            ("rank_ratio", t.min_rank_ratio, lambda v, lim: v < lim, "<"),
            ("knn_overlap", t.min_knn_overlap, lambda v, lim: v < lim, "<"),
            ("separation_drop", t.max_separation_drop, lambda v, lim: v > lim, ">"),
            ("drift", t.max_drift, lambda v, lim: v > lim, ">"),
        ]
        reasons = [
            f"{name} {metrics[name]:.3f} {op} {limit}"
            for name, limit, crossed, op in checks
            if limit is not None and np.isfinite(metrics[name]) and crossed(metrics[name], limit)
        ]
        return MonitorReport(metrics=metrics, collapsed=bool(reasons), reason="; ".join(reasons))

    def state_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "reference_groups": list(self.reference_groups),
            "pretrained": self.pretrained,
            "baseline": dict(self.baseline),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference, self.pretrained = state["reference"], state["pretrained"]
        self.reference_groups = list(state.get("reference_groups", []))
        self.baseline = dict(state["baseline"])
