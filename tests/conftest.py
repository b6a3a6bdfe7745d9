"""Shared fixtures: the real industrial data sets of ../shared and small real subsets of them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
INDUSTRIAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "industrial"


@pytest.fixture(scope="session")
def industrial_root() -> Path:
    if not INDUSTRIAL.is_dir():
        pytest.skip(f"shared industrial data not found at {INDUSTRIAL}")
    return INDUSTRIAL


def copy_subset(src: Path, dst: Path, n_train: int, n_good: int, n_defect: int) -> Path:
    """Copy the first images of each split (with masks) of an MVTec-layout category."""

    def take(folder: Path, n: int) -> list[Path]:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))[:n]

    for img in take(src / "train" / "good", n_train):
        (dst / "train" / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(img, dst / "train" / "good" / img.name)
    for img in take(src / "test" / "good", n_good):
        (dst / "test" / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(img, dst / "test" / "good" / img.name)
    for defect in sorted(p.name for p in (src / "test").iterdir() if p.name != "good"):
        for img in take(src / "test" / defect, n_defect):
            (dst / "test" / defect).mkdir(parents=True, exist_ok=True)
            (dst / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            shutil.copy(img, dst / "test" / defect / img.name)
            mask = src / "ground_truth" / defect / f"{img.stem}_mask.png"
            shutil.copy(mask, dst / "ground_truth" / defect / mask.name)
    return dst


@pytest.fixture
def mini_root(tmp_path: Path, industrial_root: Path) -> Path:
    """A data root with a small real kolektorsdd subset: 24 train, 8 normal and 8 defect test images."""
    copy_subset(industrial_root / "kolektorsdd", tmp_path / "data" / "kolektorsdd", 24, 8, 8)
    return tmp_path / "data"
