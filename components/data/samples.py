"""The sample record shared by every data set reader, the data error type, and the validation split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
SPLITS = ("train", "test")


class DataError(ValueError):
    """Bad input data or option; the one-line message names the file (or option) and the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Sample:
    """One image of a data set.

    ``path`` is an image file, or ``"<file>#<index>"`` for array-backed sets (CIFAR, Fashion-MNIST).
    ``label`` is 0 for normal and 1 for anomalous; ``defect`` is ``"good"`` for normal images.
    ``mask_path`` is None for normal images or when masks are declared absent.
    """

    path: str
    category: str
    split: str
    label: int
    defect: str
    mask_path: str | None = None

    @property
    def key(self) -> str:
        """The sample's identity wherever its data set lives: category, split, and the file's own folder
        and name (with the index of array-backed sets). It seeds every per-sample choice (validation slice,
        synthetic anomalies, images shown), so the same data in another folder gives the same results;
        a synthetic stand-in keeps its source image's key."""
        path = Path(self.path)
        return f"{self.category}/{self.split}/{path.parent.name}/{path.name}"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise DataError(f"{self.path}: split must be one of {SPLITS}, got {self.split!r}")
        if self.label not in (0, 1):
            raise DataError(f"{self.path}: label must be 0 or 1, got {self.label!r}")


def split_validation(
    samples: list[Sample], fraction: float, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Split off ``round(fraction * n)`` samples as validation, chosen by sha256 of (seed, ``Sample.key``).

    The choice does not depend on the input order; both parts keep the original order. At least one
    sample goes to validation when n >= 2 and fraction > 0, and at least one stays for training.
    """
    if not 0 <= fraction < 1:
        raise DataError(f"fraction: must satisfy 0 <= fraction < 1, got {fraction!r}")
    n = len(samples)
    k = round(fraction * n)
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)

    def rank(i: int) -> tuple[str, int]:
        return hashlib.sha256(f"{seed}\0{samples[i].key}".encode()).hexdigest(), i

    val_idx = set(sorted(range(n), key=rank)[:k])
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val
