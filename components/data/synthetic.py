"""Synthetic anomalies for model selection without test labels: CutPaste and noise blobs."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from components.data.samples import DataError, Sample

SYNTHETIC_PREFIX = "synthetic_"
AREA_RATIO = (0.02, 0.15)
ASPECT_RATIO = (0.3, 3.3)


def _patch_size(h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of a patch: area ratio in AREA_RATIO, aspect (w/h) log-uniform in ASPECT_RATIO."""
    area = rng.uniform(*AREA_RATIO) * h * w
    aspect = np.exp(rng.uniform(np.log(ASPECT_RATIO[0]), np.log(ASPECT_RATIO[1])))
    ph = int(np.clip(round(np.sqrt(area / aspect)), 1, h))
    pw = int(np.clip(round(np.sqrt(area * aspect)), 1, w))
    return ph, pw


def _is_gray(image: np.ndarray) -> bool:
    return image.shape[2] == 1 or bool((image == image[..., :1]).all())


def cutpaste(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste (Li et al., CVPR 2021): paste a jittered rectangle of the image at a random place.

    ``image`` is HWC uint8; returns the new image and the bool (H, W) mask of the pasted area.
    """
    h, w = image.shape[:2]
    ph, pw = _patch_size(h, w, rng)
    y1, x1 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    y2, x2 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    patch = image[y1 : y1 + ph, x1 : x1 + pw].astype(np.float32)
    mean = patch.mean()
    contrast, brightness = rng.uniform(0.9, 1.1, size=2)
    patch = (patch - mean) * contrast + mean * brightness
    out = image.copy()
    out[y2 : y2 + ph, x2 : x2 + pw] = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), bool)
    mask[y2 : y2 + ph, x2 : x2 + pw] = True
    return out, mask


def noise_patch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blend a noisy random-colour blob into a random rotated ellipse; gray images get gray noise.

    ``image`` is HWC uint8; returns the new image and the bool (H, W) mask of the ellipse.
    """
    h, w, c = image.shape
    ph, pw = _patch_size(h, w, rng)
    a, b = max(pw / np.sqrt(np.pi), 0.5), max(ph / np.sqrt(np.pi), 0.5)  # ellipse area = ph * pw
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.ogrid[:h, :w]
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = (yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)
    mask = (u / a) ** 2 + (v / b) ** 2 <= 1
    channels = 1 if _is_gray(image) else c
    colour = rng.uniform(0, 255, size=channels)
    noise = colour + rng.normal(0, rng.uniform(10, 50), size=(int(mask.sum()), channels))
    alpha = rng.uniform(0.5, 1.0)
    out = image.copy()
    blended = (1 - alpha) * image[mask].astype(np.float32) + alpha * noise
    out[mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out, mask


SYNTHETIC_KINDS = {"cutpaste": cutpaste, "noise": noise_patch}


def check_kind(kind: str | None) -> str | None:
    """Validate a synthetic kind name (None means no synthesis)."""
    if kind is not None and kind not in SYNTHETIC_KINDS:
        raise DataError(f"synthetic: unknown kind {kind!r}; available: {', '.join(SYNTHETIC_KINDS)}")
    return kind


def synthetic_kind(sample: Sample) -> str | None:
    """The synthetic kind a sample from :func:`synthetic_anomalies` stands for, else None."""
    if sample.defect.startswith(SYNTHETIC_PREFIX):
        return check_kind(sample.defect.removeprefix(SYNTHETIC_PREFIX))
    return None


def synthetic_anomalies(
    samples: Iterable[Sample], kinds: Sequence[str] = ("cutpaste", "noise")
) -> list[Sample]:
    """Anomalous stand-ins for (normal) samples: one per sample and kind, label 1, defect "synthetic_<kind>".

    :class:`~components.data.dataset.ImageDataset` synthesises the anomaly when it loads such a sample.
    """
    for kind in kinds:
        check_kind(kind)
    samples = list(samples)
    return [
        dataclasses.replace(s, label=1, defect=SYNTHETIC_PREFIX + kind, mask_path=None)
        for kind in kinds
        for s in samples
    ]


def synthesize(image: np.ndarray, kind: str, seed: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``kind`` to an HWC uint8 image with a generator seeded by (seed, kind, key)."""
    digest = hashlib.sha256(f"{seed}\0{kind}\0{key}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:16], "little"))
    return SYNTHETIC_KINDS[kind](image, rng)
