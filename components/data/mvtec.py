"""Folder readers for the MVTec AD layout (also MPDD, BTAD and the shared industrial sets)."""

from __future__ import annotations

import os
from pathlib import Path

from components.data.samples import IMAGE_EXTENSIONS, DataError, Sample


def list_categories(root: str | os.PathLike) -> list[str]:
    """Sorted sub-folders of ``root`` that look like MVTec categories (have ``train/good`` or ``test``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root is not a folder")
    return sorted(
        d.name
        for d in root.iterdir()
        if not d.name.startswith(".") and ((d / "train" / "good").is_dir() or (d / "test").is_dir())
    )


def image_files(folder: Path) -> list[Path]:
    """Sorted image files of ``folder``; dotfiles and sub-folders are skipped, any other file is an error."""
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.is_dir():
            continue
        if entry.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{entry}: not an image file (unexpected extension {entry.suffix!r})")
        files.append(entry)
    return files


def _subfolders(folder: Path) -> list[Path]:
    """Sorted sub-folders of ``folder``; a stray (non-hidden) file there is an error."""
    folders = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise DataError(f"{entry}: unexpected file (expected only defect folders in {folder})")
        folders.append(entry)
    return folders


def _mask_index(folder: Path) -> dict[str, Path]:
    """Mask files of a ground-truth folder by stem (empty when the folder is absent)."""
    return {p.stem: p for p in image_files(folder)} if folder.is_dir() else {}


def scan_mvtec(root: str | os.PathLike, category: str, masks: bool = True) -> list[Sample]:
    """Samples of one category in MVTec AD layout, in sorted order (train, then test by defect).

    ``train/good`` holds normal training images; ``test/good`` normal and ``test/<defect>`` anomalous test
    images. An anomalous image's mask is ``ground_truth/<defect>/<stem>_mask.<ext>`` (MVTec AD, MPDD) or
    ``ground_truth/<defect>/<stem>.<ext>`` (BTAD). With ``masks=False`` no mask is looked up.
    """
    base = Path(root) / category
    if not category or not base.is_dir():
        available = ", ".join(list_categories(root)) or "none"
        raise DataError(f"{base}: unknown category {category!r}; available: {available}")
    train_dir, test_dir = base / "train" / "good", base / "test"
    if not train_dir.is_dir():
        raise DataError(f"{base}: train/good is missing")
    train = image_files(train_dir)
    if not train:
        raise DataError(f"{train_dir}: train/good is empty (no images)")
    if not test_dir.is_dir():
        raise DataError(f"{base}: test is missing")

    samples = [Sample(str(p), category, "train", 0, "good") for p in train]
    for defect_dir in _subfolders(test_dir):
        defect = defect_dir.name
        label = int(defect != "good")
        index = _mask_index(base / "ground_truth" / defect) if masks and label else {}
        for image in image_files(defect_dir):
            mask = None
            if masks and label:
                mask = index.get(f"{image.stem}_mask") or index.get(image.stem)
                if mask is None:
                    raise DataError(
                        f"{image}: no mask ground_truth/{defect}/{image.stem}_mask.* or {image.stem}.*"
                    )
            samples.append(Sample(str(image), category, "test", label, defect, str(mask) if mask else None))
    return samples


def scan_image_folder(root: str | os.PathLike, what: str = "image folder") -> list[Sample]:
    """Every image under ``root`` (recursively, sorted), as normal train samples whose ``category`` is the
    image's first sub-folder ("" for images at the top) — e.g. outlier-exposure sets or anchor images.

    Files with other extensions are skipped; a missing or image-less folder is a DataError naming ``what``.
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"{what} {base}: not a folder")
    samples = []
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            group = rel.parts[0] if len(rel.parts) > 1 else ""
            samples.append(Sample(str(path), group, "train", 0, "good"))
    if not samples:
        raise DataError(f"{what} {base}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return samples
