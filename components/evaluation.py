"""Fit a method on a category's normal training images, score its test split, compute the metrics."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from components.data import ImageDataset, Sample
from components.methods import AnomalyMethod
from components.metrics import evaluate


def loader(samples: Sequence[Sample], image_size: int, batch_size: int, workers: int, **kwargs) -> DataLoader:
    """A DataLoader of uint8 images; workers decode and resize while the model runs."""
    return DataLoader(
        ImageDataset(samples, image_size, **kwargs),
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None,
    )


@dataclass
class Evaluation:
    """Per-image scores, the maps and masks of the test split, metrics and timings (seconds)."""

    samples: list[Sample]
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    metrics: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)

    def table(self) -> pa.Table:
        return pa.table(
            {
                "path": [s.path for s in self.samples],
                "defect": [s.defect for s in self.samples],
                "label": pa.array([s.label for s in self.samples], pa.int8()),
                "score": pa.array(self.scores, pa.float32()),
                "map_max": pa.array(self.maps.reshape(len(self.maps), -1).max(1), pa.float32()),
            }
        )


def score_all(method: AnomalyMethod, batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image scores (N,), anomaly maps (N, H, W) and masks (N, H, W) of every batch of a fitted method."""
    scores, maps, masks = [], [], []
    for batch in batches:
        pred = method.predict(batch["image"])
        scores.append(pred.scores)
        maps.append(pred.maps)
        masks.append(batch["mask"].numpy())
    return np.concatenate(scores), np.concatenate(maps), np.concatenate(masks)


def fit_and_evaluate(
    method: AnomalyMethod,
    train: Sequence[Sample],
    test: Sequence[Sample],
    batch_size: int = 16,
    workers: int = 1,
    has_masks: bool = True,
) -> Evaluation:
    """Fit ``method`` on ``train`` (normal images), score ``test``, compute the MVTec metrics."""
    size = method.image_size
    t0 = time.perf_counter()
    method.fit(loader(train, size, batch_size, workers))
    t1 = time.perf_counter()
    scores_a, maps_a, masks_a = score_all(method, loader(test, size, batch_size, workers))
    t2 = time.perf_counter()
    labels = np.array([s.label for s in test])
    metrics = evaluate(scores_a, labels, maps_a if has_masks else None, masks_a if has_masks else None)
    t3 = time.perf_counter()
    timings = {
        "fit_seconds": t1 - t0,
        "predict_seconds": t2 - t1,
        "metrics_seconds": t3 - t2,
        "train_images": float(len(train)),
        "test_images": float(len(test)),
        "fit_images_per_second": len(train) / max(t1 - t0, 1e-9),
        "predict_images_per_second": len(test) / max(t2 - t1, 1e-9),
    }
    return Evaluation(list(test), scores_a, maps_a, masks_a, metrics, timings)
