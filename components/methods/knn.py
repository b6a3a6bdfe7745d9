"""Nearest-neighbour baselines on frozen features: DN2, SPADE and PatchCore.

- DN2 (Bergman et al. 2020): image score = sum of squared L2 distances to the k=2 nearest training
  images' globally pooled last-stage features.
- SPADE (Cohen & Hoshen 2020): image score = mean distance to the k=50 nearest images; pixel map =
  per-location distance to the nearest feature among all locations of the ``gallery`` nearest training
  images, per mid-level stage, upsampled, averaged, Gaussian σ=4. (The paper's gallery is the same K
  images; the default of 10 is a CPU-budget deviation, a parameter.) DN2 uses the same alignment with
  its k=2 neighbours for its map.
- PatchCore (Roth et al. 2022): locally aware patch features (3×3 average) of two mid stages at the
  first one's resolution, greedy coreset (random projection to 128-d, 10 %), image score = max over
  patches of the nearest-neighbour distance (as in the official code; the paper's reweighting is off),
  map = patch distances upsampled and blurred.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import torch

from components.banks import BankConfig, FeatureBank
from components.coreset import greedy_coreset
from components.methods.base import (
    AnomalyMethod,
    Prediction,
    aligned,
    flat_locations,
    load_tensors,
    pooled,
    save_tensors,
)


class DN2(AnomalyMethod):
    """kNN on globally pooled features; SPADE-style maps from the retrieved neighbours."""

    name = "dn2"
    default_levels = (2, 3, 4)  # map stages ..., global stage last

    def __init__(self, extractor, image_size, k: int = 2, gallery: int | None = None, **kwargs):
        super().__init__(extractor, image_size, **kwargs)
        self.k = k
        self.gallery = gallery or k
        self.bank: FeatureBank | None = None
        self.train_maps: list[torch.Tensor] = []

    def fit(self, loader: Iterable[dict]) -> None:
        globals_, maps = [], []
        for _, feats in self.batches(loader, "fit"):
            globals_.append(pooled(feats[-1]).float().cpu())
            maps.append([f.half().cpu() for f in feats[:-1]])
        x = torch.cat(globals_).numpy()
        if len(x) < max(self.k, self.gallery):
            raise ValueError(
                f"{self.name}: k={self.k}/gallery={self.gallery} exceed the {len(x)} train images"
            )
        self.bank = FeatureBank.build(x, pa.table({"image": np.arange(len(x))}), BankConfig(kind="flat"))
        self.train_maps = [torch.cat(level) for level in zip(*maps, strict=True)]

    def image_scores(self, dist2: np.ndarray) -> np.ndarray:
        return dist2[:, : self.k].sum(1)

    def save_memory(self, directory: Path) -> None:
        assert self.bank is not None, "fit() first"
        self.bank.save(directory / "global")
        save_tensors(
            {f"level{i}": m for i, m in enumerate(self.train_maps)}, directory / "train_maps.safetensors"
        )

    def load_memory(self, directory: Path) -> None:
        self.bank = FeatureBank.load(directory / "global", BankConfig(kind="flat"))
        maps = load_tensors(directory / "train_maps.safetensors")
        self.train_maps = [maps[f"level{i}"] for i in range(len(maps))]

    def predict(self, images: torch.Tensor) -> Prediction:
        assert self.bank is not None, "fit() first"
        feats = self.features(images)
        g = pooled(feats[-1]).float().cpu().numpy()
        dist2, ids = self.bank.search(g, max(self.k, self.gallery))
        return Prediction(
            scores=self.image_scores(dist2).astype(np.float32), maps=self.gallery_maps(feats, ids)
        )

    def gallery_maps(self, feats: list[torch.Tensor], ids: np.ndarray) -> np.ndarray:
        """SPADE alignment: per map level, each location's distance to the nearest location of the
        ``gallery`` retrieved training images (``ids``); levels upsampled, averaged, blurred."""
        level_maps = []
        for level, train in zip(feats[:-1], self.train_maps, strict=True):
            per_image = []
            for b in range(len(level)):
                gallery = flat_locations(train[ids[b, : self.gallery]])
                d2, _ = faiss.knn(flat_locations(level[b : b + 1]), gallery, 1)
                per_image.append(np.sqrt(np.maximum(d2[:, 0], 0)).reshape(level.shape[-2:]))
            level_maps.append(torch.from_numpy(np.stack(per_image)))
        size = level_maps[0].shape[-2:]
        mean_map = torch.stack(
            [
                torch.nn.functional.interpolate(m[:, None], size=size, mode="bilinear")[:, 0]
                for m in level_maps
            ]
        ).mean(0)
        return self.to_maps(mean_map)


class SPADE(DN2):
    """Semantic Pyramid Anomaly Detection: DN2 with k=50 mean distance and pixel-level alignment."""

    name = "spade"
    default_levels = (1, 2, 3, 4)

    def __init__(self, extractor, image_size, k: int = 50, gallery: int = 10, **kwargs):
        super().__init__(extractor, image_size, k=k, gallery=gallery, **kwargs)

    def image_scores(self, dist2: np.ndarray) -> np.ndarray:
        return np.sqrt(dist2[:, : self.k]).mean(1)


class PatchCore(AnomalyMethod):
    """Locally aware patch features, greedy coreset memory bank, nearest-neighbour patch scores."""

    name = "patchcore"
    default_levels = (2, 3)

    def __init__(
        self,
        extractor,
        image_size,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        local: int = 3,
        bank: BankConfig | None = None,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(extractor, image_size, **kwargs)
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio {coreset_ratio}: must be in (0, 1]")
        self.coreset_ratio, self.projection_dim, self.local, self.seed = (
            coreset_ratio,
            projection_dim,
            local,
            seed,
        )
        self.bank_config = bank or BankConfig(seed=seed)
        self.bank: FeatureBank | None = None

    def embed(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return aligned(feats, local=self.local)

    def fit(self, loader: Iterable[dict]) -> None:
        chunks, where = [], []
        for batch, feats in self.batches(loader, "patch features"):
            emb = self.embed(feats)
            _, _, h, w = emb.shape
            chunks.append(flat_locations(emb))
            yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            for i in batch["index"].tolist():
                where.append(np.stack([np.full(h * w, i), yy.ravel(), xx.ravel()], 1))
        x = np.concatenate(chunks)
        pos = np.concatenate(where).astype(np.int32)
        n_select = max(1, round(self.coreset_ratio * len(x)))
        keep = (
            greedy_coreset(x, n_select, self.projection_dim, self.seed)
            if n_select < len(x)
            else np.arange(len(x))
        )
        rows = pa.table({"image": pos[keep, 0], "y": pos[keep, 1], "x": pos[keep, 2]})
        self.bank = FeatureBank.build(x[keep], rows, self.bank_config)

    def save_memory(self, directory: Path) -> None:
        assert self.bank is not None, "fit() first"
        self.bank.save(directory / "patches")

    def load_memory(self, directory: Path) -> None:
        self.bank = FeatureBank.load(directory / "patches", self.bank_config)

    def predict(self, images: torch.Tensor) -> Prediction:
        assert self.bank is not None, "fit() first"
        emb = self.embed(self.features(images))
        b, _, h, w = emb.shape
        dist2, _ = self.bank.search(flat_locations(emb), 1)
        patch = torch.from_numpy(np.sqrt(dist2[:, 0]).reshape(b, h, w))
        return Prediction(scores=patch.flatten(1).max(1).values.numpy(), maps=self.to_maps(patch))
