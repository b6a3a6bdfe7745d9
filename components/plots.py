"""Pictures a person reads: a grid of test images with their anomaly heat maps and ground truth."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from components.data import Sample, load_image


def pick_examples(samples: Sequence[Sample], scores: np.ndarray, per_kind: int = 4) -> list[int]:
    """Indices to show: the highest-scoring anomalous, lowest-scoring anomalous and highest normal."""
    labels = np.array([s.label for s in samples])
    anomalous, normal = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    by_score = lambda idx: idx[np.argsort(-scores[idx])]  # noqa: E731
    a = by_score(anomalous)
    chosen = [*a[:per_kind], *a[::-1][:per_kind], *by_score(normal)[:per_kind]]
    return list(dict.fromkeys(int(i) for i in chosen))


def heatmap_grid(
    samples: Sequence[Sample],
    scores: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """Save a PNG: one row per example — image, heat map overlay, ground truth."""
    rows = pick_examples(samples, scores)
    vmin, vmax = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    size = maps.shape[-1]
    for r, i in enumerate(rows):
        image = np.asarray(load_image(samples[i].path).resize((size, size), Image.Resampling.BILINEAR))
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(f"{samples[i].defect}  score {scores[i]:.3g}", fontsize=8)
        axes[r, 1].imshow(image)
        axes[r, 1].imshow(maps[i], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        axes[r, 1].set_title("anomaly map", fontsize=8)
        axes[r, 2].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        axes[r, 2].set_title("ground truth", fontsize=8)
        for ax in axes[r]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def curves_plot(
    roc: dict[str, np.ndarray],
    pro: dict[str, np.ndarray] | None,
    metrics: dict[str, float],
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """Save a PNG with the image ROC curve and (when masks exist) the PRO curve up to FPR 0.3."""
    fig, axes = plt.subplots(
        1, 2 if pro is not None else 1, figsize=(9 if pro is not None else 4.5, 4), squeeze=False
    )
    ax = axes[0, 0]
    ax.plot(roc["fpr"], roc["tpr"], lw=1.5)
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"image ROC (AUROC {metrics['image_auroc']:.3f})",
    )
    if pro is not None:
        ax = axes[0, 1]
        ax.plot(pro["fpr"], pro["pro"], lw=1.5)
        ax.set(xlim=(0, 0.3), ylim=(0, 1), xlabel="false positive rate (pixels)", ylabel="per-region overlap")
        ax.set_title(f"PRO (AUPRO@0.3 {metrics['aupro']:.3f})")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
