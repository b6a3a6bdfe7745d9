"""Vicinal-risk-minimisation augmentations as deterministic image alterations (forgetting detection).

Rippel et al. (2022) detect the onset of catastrophic forgetting by how well a fine-tuned model still
separates held-out normal images from the same images altered by augmentations used for vicinal risk
minimisation. Three alterations of an HWC uint8 image, each returning ``(image, mask)`` like
:mod:`components.data.synthetic` (``mask``: bool (H, W), the pixels the alteration touched):

- ``mixup``  (Zhang et al. 2018): blend with another image, ``(1 − λ)·x + λ·x'`` with the other image's
  weight λ uniform in ``MIXUP_WEIGHT`` (kept below one half so the altered image stays mostly itself);
- ``cutmix`` (Yun et al. 2019): a rectangle of another image pasted at the same place (area and aspect
  drawn as for CutPaste: :data:`components.data.synthetic.AREA_RATIO` / ``ASPECT_RATIO``);
- ``cutpaste`` (Li et al. 2021): :func:`components.data.synthetic.cutpaste` (the partner is unused).

:func:`vicinal` alters images of a pool (B, 3, H, W) with partners drawn from the same pool, seeded by
(seed, kind, image index): the same call gives the same altered images every time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from components.data.samples import DataError
from components.data.synthetic import _patch_size, cutpaste

MIXUP_WEIGHT = (0.2, 0.5)


def mixup(image: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``other`` into ``image`` (both HWC uint8) with weight λ ~ U(MIXUP_WEIGHT)."""
    lam = rng.uniform(*MIXUP_WEIGHT)
    out = (1 - lam) * image.astype(np.float32) + lam * other.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), np.ones(image.shape[:2], bool)


def cutmix(image: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste a random rectangle of ``other`` into ``image`` at the same place (both HWC uint8)."""
    h, w = image.shape[:2]
    ph, pw = _patch_size(h, w, rng)
    y, x = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    out = image.copy()
    out[y : y + ph, x : x + pw] = other[y : y + ph, x : x + pw]
    mask = np.zeros((h, w), bool)
    mask[y : y + ph, x : x + pw] = True
    return out, mask


def _cutpaste(
    image: np.ndarray, other: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    return cutpaste(image, rng)


VICINAL_KINDS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "mixup": mixup,
    "cutmix": cutmix,
    "cutpaste": _cutpaste,
}
#: kinds that need a partner image (another image of the pool)
NEEDS_PARTNER = frozenset({"mixup", "cutmix"})


def check_vicinal(kinds: Sequence[str]) -> list[str]:
    """Validate a list of vicinal kinds: non-empty, known, no repeats."""
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in VICINAL_KINDS]
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise DataError(
            f"augmentations={kinds!r}: need a non-empty list of distinct kinds "
            f"from {', '.join(VICINAL_KINDS)}"
        )
    return kinds


def _rng(seed: int, kind: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\0vicinal\0{kind}\0{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def vicinal(
    pool: torch.Tensor, kind: str, seed: int = 0, indices: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alter ``pool[indices]`` (uint8 (N, 3, H, W); default: all) with ``kind``, deterministically.

    Image ``i`` gets a generator seeded by (seed, kind, i); for mixup and cutmix it also picks its
    partner, another image of the pool (never itself). Returns the altered uint8 images (len(indices),
    3, H, W) and their bool masks (len(indices), H, W).
    """
    check_vicinal([kind])
    if pool.dtype != torch.uint8 or pool.ndim != 4:
        raise DataError(f"vicinal: need a uint8 (N, C, H, W) pool, got {pool.dtype} {tuple(pool.shape)}")
    pool = pool.cpu()
    n = len(pool)
    if kind in NEEDS_PARTNER and n < 2:
        raise DataError(f"vicinal {kind}: needs at least 2 images to pick a partner from, got {n}")
    indices = range(n) if indices is None else indices
    images, masks = [], []
    for i in indices:
        if not 0 <= i < n:
            raise DataError(f"vicinal: index {i} outside the pool of {n} images")
        rng = _rng(seed, kind, int(i))
        j = (int(i) + 1 + int(rng.integers(n - 1))) % n if n > 1 else int(i)
        image = pool[i].permute(1, 2, 0).numpy()
        other = pool[j].permute(1, 2, 0).numpy()
        out, mask = VICINAL_KINDS[kind](image, other, rng)
        images.append(torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))))
        masks.append(torch.from_numpy(mask))
    if not images:
        return pool[:0].clone(), torch.zeros((0, *pool.shape[-2:]), dtype=torch.bool)
    return torch.stack(images), torch.stack(masks)
