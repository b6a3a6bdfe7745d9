"""Selection regret: how much test image AUROC a method's label-free epoch selection gives away.

A fine-tuned method keeps one epoch's weights, chosen on a validation signal of held-out normal images and
synthetic anomalies (PANDA's kNN AUROC, gaussian_ft's separation; TPTL and ReContrast at ``select=last``
keep the last epoch). After training — never during it — each recorded epoch's weights are fitted and
scored on the test split. The regret is the best test image AUROC over the epochs the method could have
kept minus the test image AUROC of the epoch it kept: 0 when the label-free choice was the best one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from components.data import Sample
from components.evaluation import loader, score_all
from components.methods import AnomalyMethod, load_networks
from components.metrics import image_auroc


def epoch_test_aurocs(
    method: AnomalyMethod,
    epochs: Mapping[int, Path],
    train: Sequence[Sample],
    test: Sequence[Sample],
    batch_size: int = 16,
    workers: int = 1,
) -> dict[int, float]:
    """Test image AUROC of each epoch's weights (folders of ``<network>.safetensors``): load, fit, score.

    ``method`` is left holding the last epoch's weights and memory.
    """
    labels = np.array([s.label for s in test])
    out: dict[int, float] = {}
    for epoch in sorted(epochs):
        load_networks(method, epochs[epoch])
        method.extractor.eval()
        method.fit(loader(train, method.image_size, batch_size, workers))
        scores, _, _ = score_all(method, loader(test, method.image_size, batch_size, workers))
        out[epoch] = image_auroc(scores, labels)
    return out


def selection_record(
    test_auroc: Mapping[int, float],
    history: Sequence[Mapping[str, Any]],
    kept_epoch: int,
    signal: str | None,
    pretrained_signal: float | None = None,
) -> dict[str, Any]:
    """Per epoch: the signal the method selected on and the test image AUROC; the kept and the best
    epoch and the regret (best − kept test image AUROC)."""
    if kept_epoch not in test_auroc:
        raise ValueError(
            f"selection: the kept epoch {kept_epoch} has no recorded weights ({sorted(test_auroc)})"
        )
    by_epoch = {int(row["epoch"]): row for row in history}
    rows = []
    for epoch in sorted(test_auroc):
        value = pretrained_signal if epoch == 0 else by_epoch.get(epoch, {}).get(signal) if signal else None
        rows.append({"epoch": epoch, "signal": value, "test_image_auroc": test_auroc[epoch]})
    best = max(test_auroc, key=lambda e: (test_auroc[e], -e))  # ties: the earliest
    return {
        "signal": signal or "last epoch",
        "kept_epoch": kept_epoch,
        "best_test_epoch": best,
        "kept_test_image_auroc": test_auroc[kept_epoch],
        "best_test_image_auroc": test_auroc[best],
        "regret": test_auroc[best] - test_auroc[kept_epoch],
        "epochs": rows,
    }


def regret_table(
    records: Sequence[Mapping[str, Any]], group: Callable[[Mapping[str, Any]], str]
) -> list[dict]:
    """Mean / max regret and how often epoch 0 (or any epoch before the best) was kept, per group key."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(group(r), []).append(r)
    out = []
    for key, rs in sorted(groups.items()):
        regrets = np.array([r["regret"] for r in rs])
        out.append(
            {
                "group": key,
                "runs": len(rs),
                "mean_regret": float(regrets.mean()),
                "max_regret": float(regrets.max()),
                "kept_epoch_0": sum(r["kept_epoch"] == 0 for r in rs),
                "kept_best": int((regrets == 0).sum()),
                "mean_kept_auroc": float(np.mean([r["kept_test_image_auroc"] for r in rs])),
                "mean_best_auroc": float(np.mean([r["best_test_image_auroc"] for r in rs])),
            }
        )
    return out


def trial_signal(summary: Mapping[str, Any], metric: str | None = None) -> float | None:
    """A finished training job's validation signal at the epoch it kept: ``metric`` (an epoch-history
    key) or, by default, the signal the method selects on. None where there is none to compare: a
    collapsed run, or a kept epoch without that value (e.g. epoch 0 for a metric other than the method's
    own, which is measured on the pretrained weights only)."""
    own = summary.get("selection_signal")
    key = metric or own
    if key is None:
        raise ValueError(
            "tune.metric: the method keeps its last epoch and selects on no signal — name an epoch-history "
            "key to compare trials on (e.g. val_auroc)"
        )
    if summary.get("collapsed"):
        return None
    kept = int(summary.get("kept_epoch") if summary.get("kept_epoch") is not None else summary["epochs"])
    if kept == 0:
        value = summary.get("pretrained_signal") if key == own else None
    else:
        row = next((r for r in summary.get("history", []) if int(r["epoch"]) == kept), {})
        value = row.get(key)
    return None if value is None or not np.isfinite(value) else float(value)


def choose_trial(signals: Sequence[float | None], mode: str = "max") -> int:
    """Index of the best signal (``mode`` max or min; ties: the first trial); None is never chosen."""
    candidates = [(s if mode == "max" else -s, -i) for i, s in enumerate(signals) if s is not None]
    if not candidates:
        raise ValueError("tune: no trial has a validation signal to choose by (all collapsed or unmeasured)")
    return -max(candidates)[1]
