"""Verified, content-hashed manifests of samples as parquet tables; their hash is the data set version."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from components.data.images import decode, mask_image
from components.data.oneclass import array_item, split_item_path
from components.data.samples import DataError, Sample

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("category", pa.string()),
        ("split", pa.string()),
        ("label", pa.int8()),
        ("defect", pa.string()),
        ("mask_path", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mask_sha256", pa.string()),
    ]
)
_SAMPLE_FIELDS = ("path", "category", "split", "label", "defect", "mask_path")


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e


def verify_sample(sample: Sample) -> dict[str, Any]:
    """Decode the sample's image (and mask) fully and return its manifest row."""
    if split_item_path(sample.path) is not None:
        pixels = array_item(sample.path)
        digest, (height, width) = hashlib.sha256(pixels.tobytes()).hexdigest(), pixels.shape[:2]
    else:
        data = _read_bytes(sample.path)
        digest, (width, height) = hashlib.sha256(data).hexdigest(), decode(sample.path, data).size
    mask_digest = None
    if sample.mask_path is not None:
        mask_data = _read_bytes(sample.mask_path)
        mask_image(sample.mask_path, (width, height), mask_data)
        mask_digest = hashlib.sha256(mask_data).hexdigest()
    row = {name: getattr(sample, name) for name in _SAMPLE_FIELDS}
    return row | {"sha256": digest, "width": width, "height": height, "mask_sha256": mask_digest}


def build_manifest(samples: Sequence[Sample], workers: int = 2) -> pa.Table:
    """Verify every image and mask and tabulate them with sha256 and size (``workers=0``: in process).

    Columns: path, category, split, label (int8), defect, mask_path (nullable), sha256 (of the file bytes,
    or of the pixel bytes for ``#index`` items), width, height (int32), mask_sha256 (nullable).
    The first bad file raises :class:`DataError` naming it.
    """
    samples = list(samples)
    bar = {"total": len(samples), "desc": "verify images", "unit": "img", "disable": None}
    if workers <= 0 or len(samples) < 2:
        rows = [verify_sample(s) for s in tqdm(samples, **bar)]
    else:
        chunksize = max(1, min(64, len(samples) // (4 * workers)))
        with ProcessPoolExecutor(workers) as pool:
            try:
                rows = list(tqdm(pool.map(verify_sample, samples, chunksize=chunksize), **bar))
            except BaseException:
                pool.shutdown(cancel_futures=True)  # stop at the first bad file
                raise
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _complete(table: pa.Table, where: str) -> pa.Table:
    """``table`` with the manifest's columns in order; ``mask_sha256`` may be absent (then null)."""
    missing = [name for name in SCHEMA.names[:-1] if name not in table.column_names]
    if missing:
        raise DataError(f"{where}: manifest lacks column(s) {', '.join(missing)}")
    if "mask_sha256" not in table.column_names:
        table = table.append_column("mask_sha256", pa.nulls(table.num_rows, pa.string()))
    try:
        return table.select(SCHEMA.names).cast(SCHEMA)
    except (pa.ArrowException, ValueError) as e:
        raise DataError(f"{where}: manifest column types do not fit ({' '.join(str(e).split())})") from e


def write_manifest(table: pa.Table, path: str | os.PathLike) -> None:
    """Write ``table`` as parquet atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    table = _complete(table, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(path: str | os.PathLike) -> list[Sample]:
    """Samples of a parquet manifest written by :func:`write_manifest`, in stored order."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read manifest ({' '.join(str(e).split())})") from e
    table = _complete(table, str(path))
    return [Sample(**{k: row[k] for k in _SAMPLE_FIELDS}) for row in table.select(_SAMPLE_FIELDS).to_pylist()]


def manifest_version(table: pa.Table) -> str:
    """Data set version: sha256 over the sorted rows (path, split, label, sha256, mask_path, mask_sha256).

    Independent of row order; changes when any image or mask changes content or role.
    """
    table = _complete(table, "manifest_version")
    columns = ("path", "split", "label", "sha256", "mask_path", "mask_sha256")
    values = zip(*(table.column(c).to_pylist() for c in columns), strict=True)
    lines = sorted("\t".join("" if v is None else str(v) for v in row) for row in values)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
