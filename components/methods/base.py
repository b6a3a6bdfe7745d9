"""The method protocol (DESIGN.md) and the parts every method shares.

A method declares its trainable parameter groups, computes a training loss for a batch, reports
validation signals at epoch end, and — after training — builds its memory of normal features (``fit``)
and turns a batch of images into image scores and pixel anomaly maps (``predict``). Frozen baselines
have no trainable parameters; one generic training loop (flows/) drives every method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from components.backbones import FeatureExtractor


@dataclass
class Prediction:
    """Image scores (B,) and pixel anomaly maps (B, S, S) at the input resolution."""

    scores: np.ndarray
    maps: np.ndarray


@dataclass
class EpochReport:
    """What a method says at the end of a training epoch: signals to log, and whether to stop."""

    metrics: dict[str, float] = field(default_factory=dict)
    stop: bool = False


class AnomalyMethod(ABC):
    """Base class of every method. Subclasses set ``name`` and ``default_levels``."""

    name: ClassVar[str]
    default_levels: ClassVar[tuple[int, ...]]

    def __init__(
        self, extractor: FeatureExtractor, image_size: int, sigma: float = 4.0, progress: bool = True
    ):
        self.extractor = extractor
        self.image_size = image_size
        self.sigma = sigma
        self.progress = progress

    # --- training protocol (frozen baselines keep the defaults) -----------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; empty for a frozen method."""
        return []

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} is a frozen-feature method: it has no training step")

    def end_epoch(self, epoch: int, validation: Iterable[dict]) -> EpochReport:
        return EpochReport()

    # --- memory and scoring -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.extractor.parameters()).device

    @abstractmethod
    def fit(self, loader: Iterable[dict]) -> None:
        """Build the method's memory (banks, Gaussians) from batches of normal training images."""

    @abstractmethod
    def predict(self, images: torch.Tensor) -> Prediction:
        """Score a uint8 batch (B, 3, S, S)."""

    # --- shared helpers ------------------------------------------------------------------------------
    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor(images.to(self.device, non_blocking=True))

    def batches(self, loader: Iterable[dict], desc: str) -> Iterator[tuple[dict, list[torch.Tensor]]]:
        """Yield (batch, feature levels) over ``loader`` with a progress bar."""
        for batch in tqdm(loader, desc=f"{self.name}: {desc}", disable=not self.progress, leave=False):
            yield batch, self.features(batch["image"])

    def to_maps(self, patch_scores: torch.Tensor) -> np.ndarray:
        """(B, h, w) patch scores → (B, S, S) maps: bilinear upsampling, then Gaussian blur (σ=sigma)."""
        up = F.interpolate(
            patch_scores[:, None].float(), size=(self.image_size,) * 2, mode="bilinear", align_corners=False
        )[:, 0]
        maps = up.cpu().numpy()
        if self.sigma > 0:
            maps = gaussian_filter(maps, sigma=(0, self.sigma, self.sigma), truncate=4.0)
        return maps.astype(np.float32)


def pooled(feature: torch.Tensor) -> torch.Tensor:
    """Global average pooling (B, C, h, w) → (B, C)."""
    return feature.mean(dim=(2, 3))


def aligned(features: Sequence[torch.Tensor], local: int = 1) -> torch.Tensor:
    """Concatenate levels at the first level's resolution (B, ΣC, h, w).

    ``local > 1`` first averages each location's ``local × local`` neighbourhood (PatchCore's locally
    aware patch features).
    """
    size = features[0].shape[-2:]
    out = []
    for f in features:
        if local > 1:
            f = F.avg_pool2d(f, local, stride=1, padding=local // 2)
        if f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


def flat_locations(feature: torch.Tensor) -> np.ndarray:
    """(B, C, h, w) → float32 numpy (B·h·w, C), row-major over (b, y, x)."""
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1]).float().cpu().numpy()
