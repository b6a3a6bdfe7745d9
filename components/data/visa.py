"""Reader for VisA through its "1cls" split CSV."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from components.data.samples import DataError, Sample

_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}


def scan_visa(
    root: str | os.PathLike,
    category: str,
    split_csv: str | os.PathLike = "split_csv/1cls.csv",
    masks: bool = True,
) -> list[Sample]:
    """Samples of one VisA object from the 1cls split CSV (columns object,split,label,image,mask).

    Image and mask paths in the CSV are relative to ``root``; ``split_csv`` is absolute or relative to
    ``root``. Anomalous images get defect "anomaly" and need a mask unless ``masks=False``. Sorted by
    split (train first), then path.
    """
    root = Path(root)
    csv_path = root / split_csv
    try:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or ()
    except OSError as e:
        raise DataError(f"{csv_path}: cannot read split CSV ({e.strerror})") from e
    missing = [c for c in _COLUMNS if c not in header]
    if missing:
        raise DataError(f"{csv_path}: split CSV lacks column(s) {', '.join(missing)}")

    samples = []
    for line, row in enumerate(rows, start=2):
        if row["object"] != category:
            continue
        split, label = row["split"], _LABELS.get(row["label"])
        if split not in ("train", "test") or label is None:
            raise DataError(f"{csv_path}: line {line}: bad split {split!r} or label {row['label']!r}")
        image = root / row["image"]
        if not image.is_file():
            raise DataError(f"{image}: image listed in {csv_path.name} line {line} does not exist")
        mask = str(root / row["mask"]) if masks and label and row["mask"] else None
        if masks and label and (mask is None or not os.path.isfile(mask)):
            raise DataError(
                f"{image}: mask {mask or '(none given)'} is missing ({csv_path.name} line {line})"
            )
        samples.append(Sample(str(image), category, split, label, "anomaly" if label else "good", mask))
    if not samples:
        available = ", ".join(sorted({r["object"] for r in rows})) or "none"
        raise DataError(f"{csv_path}: unknown category {category!r}; available: {available}")
    return sorted(samples, key=lambda s: (s.split != "train", s.path))
