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


def _save(fig: plt.Figure, path: str | os.PathLike, title: str | None) -> None:
    """Title, lay out, write and close a figure."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


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
    _save(fig, path, title)


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


# --- comparing methods on the same test images ----------------------------------------------------------
EXAMPLE_FILES = ("images.npy", "masks.npy", "maps.npy", "examples.json")


def comparison_examples(samples: Sequence[Sample], n_anomalous: int = 4, n_normal: int = 2) -> list[int]:
    """Test images every method of a category is shown on: chosen from the samples alone, never from scores.

    Anomalous images round-robin over the defect types, normal ones after them; within a kind the order is
    the sha256 of :attr:`Sample.key`, so every method (and every seed) of the category picks the same images.
    """
    import hashlib

    def order(i: int) -> str:
        return hashlib.sha256(samples[i].key.encode()).hexdigest()

    by_defect: dict[str, list[int]] = {}
    for i in sorted(range(len(samples)), key=order):
        if samples[i].label == 1:
            by_defect.setdefault(samples[i].defect, []).append(i)
    chosen: list[int] = []
    queues = [by_defect[d] for d in sorted(by_defect)]
    while len(chosen) < n_anomalous and any(queues):
        for q in queues:
            if q and len(chosen) < n_anomalous:
                chosen.append(q.pop(0))
    normal = [i for i in sorted(range(len(samples)), key=order) if samples[i].label == 0]
    return chosen + normal[:n_normal]


def save_examples(
    folder: str | os.PathLike,
    samples: Sequence[Sample],
    maps: np.ndarray,
    masks: np.ndarray,
    indices: Sequence[int],
) -> None:
    """The chosen test images (resized), masks and this method's maps as .npy files (no pickle) + json."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = maps.shape[-1]
    images = [
        np.asarray(load_image(samples[i].path).resize((size, size), Image.Resampling.BILINEAR))
        for i in indices
    ]
    np.save(folder / "images.npy", np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8))
    np.save(folder / "masks.npy", masks[list(indices)].astype(np.uint8))
    np.save(folder / "maps.npy", maps[list(indices)].astype(np.float16))
    info = {
        "paths": [samples[i].path for i in indices],
        "labels": [int(samples[i].label) for i in indices],
        "defects": [samples[i].defect for i in indices],
        # the method's own colour range, over all its test maps (methods' scales differ)
        "vmin": float(np.percentile(maps, 1)),
        "vmax": float(np.percentile(maps, 99.9)),
    }
    (folder / "examples.json").write_text(json.dumps(info, indent=2))


def load_examples(folder: str | os.PathLike) -> dict | None:
    """What :func:`save_examples` wrote (arrays + info), or None when the folder is incomplete."""
    import json
    from pathlib import Path

    folder = Path(folder)
    if not all((folder / name).is_file() for name in EXAMPLE_FILES):
        return None
    out = json.loads((folder / "examples.json").read_text())
    for name in ("images", "masks", "maps"):
        out[name] = np.load(folder / f"{name}.npy", allow_pickle=False)
    return out


def _resized(array: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    if array.shape[0] == size:
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), resample))


def method_comparison(
    columns: Sequence[tuple[str, dict]], path: str | os.PathLike, title: str = "", max_rows: int = 6
) -> bool:
    """Save a PNG: one row per shared test image — image, ground truth, then every method's heat map.

    ``columns`` are (label, :func:`load_examples` result) per method; only images every method has are
    shown. Each method's map uses its own colour range. Returns False (and writes nothing) when the
    methods share no image.
    """
    if not columns:
        return False
    shared = set(columns[0][1]["paths"])
    for _, ex in columns[1:]:
        shared &= set(ex["paths"])
    paths = [p for p in columns[0][1]["paths"] if p in shared][:max_rows]
    if not paths:
        return False
    base = max((ex for _, ex in columns), key=lambda ex: ex["images"].shape[1])
    size = base["images"].shape[1]
    fig, axes = plt.subplots(
        len(paths), 2 + len(columns), figsize=(2.2 * (2 + len(columns)), 2.3 * len(paths)), squeeze=False
    )
    for r, p in enumerate(paths):
        i = base["paths"].index(p)
        image = base["images"][i]
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(base["defects"][i], fontsize=8)
        axes[r, 1].imshow(base["masks"][i], cmap="gray", vmin=0, vmax=1)
        axes[r, 1].set_title("ground truth", fontsize=8)
        for c, (label, ex) in enumerate(columns):
            j = ex["paths"].index(p)
            heat = _resized(ex["maps"][j].astype(np.float32), size, Image.Resampling.BILINEAR)
            axes[r, 2 + c].imshow(image)
            axes[r, 2 + c].imshow(heat, cmap="jet", alpha=0.5, vmin=ex["vmin"], vmax=ex["vmax"])
            if r == 0:  # the method names head their columns
                axes[r, 2 + c].set_title(label, fontsize=7)
        for ax in axes[r]:
            ax.axis("off")
    _save(fig, path, title)
    return True
