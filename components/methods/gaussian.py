"""Gaussian baselines on frozen features: Gaussian AD and PaDiM.

- Gaussian AD (Rippel et al. 2020): every stage's features spatially mean-pooled, one multivariate
  Gaussian per stage (mean + Ledoit-Wolf shrunk precision), image score = Mahalanobis distance averaged
  over stages. The paper pools all 9 EfficientNet blocks; timm's ``features_only`` exposes the 5 stage
  outputs, which are used instead. Pixel map (not in the paper): per-location Mahalanobis under a
  Gaussian of each map stage's location features, upsampled, averaged, blurred.
- PaDiM (Defard et al. 2020): the first three stages at the first one's resolution, a random subset of
  ``d`` channels, one Gaussian per position (covariance + 0.01·I), Mahalanobis map, upsampled and
  blurred; image score = map maximum.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from components.methods.base import (
    AnomalyMethod,
    Prediction,
    aligned,
    flat_locations,
    load_tensors,
    pooled,
    save_tensors,
)


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """sqrt((x-μ)ᵀ P (x-μ)) over the last dimension."""
    diff = x - mean
    return torch.einsum("...i,ij,...j->...", diff, precision, diff).clamp_min(0).sqrt()


def ledoit_wolf(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and Ledoit-Wolf shrunk precision of rows ``x`` (n, d)."""
    from sklearn.covariance import LedoitWolf  # here: importing sklearn costs ~2 s in every process

    lw = LedoitWolf().fit(x.astype(np.float64))
    return torch.from_numpy(lw.location_).float(), torch.from_numpy(lw.precision_).float()


class GaussianAD(AnomalyMethod):
    """One Ledoit-Wolf Gaussian per stage on pooled features; Mahalanobis averaged over stages."""

    name = "gaussian"
    default_levels = (0, 1, 2, 3, 4)

    def __init__(self, extractor, image_size, max_locations: int = 200_000, seed: int = 0, **kwargs):
        super().__init__(extractor, image_size, **kwargs)
        self.max_locations, self.seed = max_locations, seed
        strides = extractor.reductions
        self.map_levels = [i for i, s in enumerate(strides) if 4 <= s <= 16] or [len(strides) - 1]
        self.image_gaussians: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.map_gaussians: list[tuple[torch.Tensor, torch.Tensor]] = []

    def fit(self, loader: Iterable[dict]) -> None:
        pools: list[list[np.ndarray]] = [[] for _ in self.extractor.reductions]
        locs: list[list[np.ndarray]] = [[] for _ in self.map_levels]
        for _, feats in self.batches(loader, "fit"):
            for i, f in enumerate(feats):
                pools[i].append(pooled(f).float().cpu().numpy())
            for j, i in enumerate(self.map_levels):
                locs[j].append(flat_locations(feats[i]))
        rng = np.random.default_rng(self.seed)
        self.image_gaussians = [ledoit_wolf(np.concatenate(p)) for p in pools]
        self.map_gaussians = []
        for chunks in locs:
            x = np.concatenate(chunks)
            if len(x) > self.max_locations:
                x = x[rng.choice(len(x), self.max_locations, replace=False)]
            self.map_gaussians.append(ledoit_wolf(x))

    def save_memory(self, directory: Path) -> None:
        tensors = {}
        for kind, gaussians in (("image", self.image_gaussians), ("map", self.map_gaussians)):
            for i, (m, p) in enumerate(gaussians):
                tensors[f"{kind}{i}.mean"], tensors[f"{kind}{i}.precision"] = m, p
        save_tensors(tensors, directory / "gaussians.safetensors")

    def load_memory(self, directory: Path) -> None:
        t = load_tensors(directory / "gaussians.safetensors")
        self.image_gaussians = [
            (t[f"image{i}.mean"], t[f"image{i}.precision"]) for i in range(len(self.extractor.reductions))
        ]
        self.map_gaussians = [
            (t[f"map{j}.mean"], t[f"map{j}.precision"]) for j in range(len(self.map_levels))
        ]

    def predict(self, images: torch.Tensor) -> Prediction:
        feats = [f.float().cpu() for f in self.features(images)]
        scores = torch.stack(
            [mahalanobis(pooled(f), m, p) for f, (m, p) in zip(feats, self.image_gaussians, strict=True)]
        ).mean(0)
        size = feats[self.map_levels[0]].shape[-2:]
        maps = []
        for i, (m, p) in zip(self.map_levels, self.map_gaussians, strict=True):
            d = mahalanobis(feats[i].permute(0, 2, 3, 1), m, p)
            maps.append(torch.nn.functional.interpolate(d[:, None], size=size, mode="bilinear")[:, 0])
        return Prediction(scores=scores.numpy(), maps=self.to_maps(torch.stack(maps).mean(0)))


class PaDiM(AnomalyMethod):
    """Per-position Gaussians over randomly selected channels of the first three stages."""

    name = "padim"
    default_levels = (1, 2, 3)

    def __init__(self, extractor, image_size, d: int = 100, eps: float = 0.01, seed: int = 0, **kwargs):
        super().__init__(extractor, image_size, **kwargs)
        total = sum(extractor.channels)
        if not 1 <= d <= total:
            raise ValueError(
                f"padim d={d}: must be between 1 and the {total} channels of levels {extractor.levels}"
            )
        self.d, self.eps = d, eps
        generator = torch.Generator().manual_seed(seed)
        self.channels = torch.randperm(total, generator=generator)[:d].sort().values
        self.mean: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None

    def embed(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """(B, P, d) float64 position-major embeddings on the CPU."""
        emb = aligned(feats)[:, self.channels.to(feats[0].device)]
        return emb.flatten(2).transpose(1, 2).double().cpu()

    def fit(self, loader: Iterable[dict]) -> None:
        n, s1, s2 = 0, None, None
        for _, feats in self.batches(loader, "fit"):
            x = self.embed(feats)
            n += len(x)
            s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
            outer = torch.einsum("bpi,bpj->pij", x, x)
            s2 = outer if s2 is None else s2 + outer
        if n < 2:
            raise ValueError("padim: needs at least 2 training images")
        mean = s1 / n
        cov = (s2 - n * torch.einsum("pi,pj->pij", mean, mean)) / (n - 1)
        cov += self.eps * torch.eye(self.d, dtype=cov.dtype)
        self.mean = mean.float()
        self.precision = torch.linalg.inv(cov).float()

    def save_memory(self, directory: Path) -> None:
        assert self.mean is not None and self.precision is not None, "fit() first"
        save_tensors({"mean": self.mean, "precision": self.precision}, directory / "gaussians.safetensors")

    def load_memory(self, directory: Path) -> None:
        t = load_tensors(directory / "gaussians.safetensors")
        self.mean, self.precision = t["mean"], t["precision"]

    def predict(self, images: torch.Tensor) -> Prediction:
        assert self.mean is not None and self.precision is not None, "fit() first"
        feats = self.features(images)
        x = self.embed(feats).float()
        diff = x - self.mean
        dist = torch.einsum("bpi,pij,bpj->bp", diff, self.precision, diff).clamp_min(0).sqrt()
        maps = self.to_maps(dist.view(len(x), *feats[0].shape[-2:]))
        return Prediction(scores=maps.reshape(len(x), -1).max(1), maps=maps)
