"""Torch dataset of resized uint8 images and masks, optionally with synthetic anomalies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from components.data.images import decode_sized, mask_image
from components.data.samples import DataError, Sample
from components.data.synthetic import check_kind, synthesize, synthetic_kind

REDUCING_GAP = 3.0  # Pillow: >= 3 is indistinguishable from plain resampling, and faster on big images


class ImageDataset(torch.utils.data.Dataset):
    """Items ``{"image": uint8 (3, S, S), "mask": bool (S, S), "label": int, "index": int, "category": str}``.

    Images are resized to S x S with Pillow BILINEAR, masks with NEAREST; normalisation is left to the
    model (uint8 is 4x cheaper to pass between DataLoader workers). With ``synthetic`` ("cutpaste" or
    "noise") every item, and otherwise every sample from :func:`synthetic_anomalies`, gets that anomaly
    after resizing, seeded by (seed, kind, path): the item is then label 1 with the synthetic mask.
    """

    def __init__(
        self, samples: Sequence[Sample], image_size: int, synthetic: str | None = None, seed: int = 0
    ) -> None:
        if not isinstance(image_size, int) or image_size <= 0:
            raise DataError(f"image_size: must be a positive int, got {image_size!r}")
        self.samples = list(samples)
        self.image_size = image_size
        self.synthetic = check_kind(synthetic)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        size = (self.image_size, self.image_size)
        image, full_size = decode_sized(sample.path, draft=(2 * self.image_size, 2 * self.image_size))
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
        pixels = np.asarray(image)
        pixels = np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels

        if sample.mask_path is not None:
            mask_img = mask_image(sample.mask_path, full_size)
            mask = np.asarray(mask_img.resize(size, Image.Resampling.NEAREST)) > 0
        else:
            mask = np.zeros(size[::-1], bool)

        label = sample.label
        kind = self.synthetic or synthetic_kind(sample)
        if kind is not None:
            pixels, extra = synthesize(pixels, kind, self.seed, sample.key)
            mask, label = mask | extra, 1
        return {
            "image": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),
            "mask": torch.from_numpy(mask),
            "label": int(label),
            "index": index,
            "category": sample.category,
        }
