"""One-class protocol on classification sets (CIFAR-10, CIFAR-100, Fashion-MNIST) and their array readers.

Samples of these sets are array-backed: ``path`` is ``"<file>#<index>"`` and the pixels come from
:func:`array_item`, which decodes each file once per process.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from components.data.samples import DataError, Sample

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
DATASETS = ("cifar10", "cifar100", "fashion_mnist")
ONECLASS_LAYOUTS = DATASETS  # the `layout` values of one-class data sets in params.yaml
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)  # fmt: skip  (the label_names of cifar-10-batches-py/batches.meta)

_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, lists and dicts (the CIFAR pickle format)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def read_cifar_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Read a CIFAR python-version pickle; keys and label names come back as str."""
    try:
        with open(path, "rb") as f:
            raw = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a CIFAR pickle ({e})") from e
    if not isinstance(raw, dict):
        raise DataError(f"{path}: not a CIFAR pickle (top level is {type(raw).__name__}, not dict)")

    def text(v: Any) -> Any:
        return v.decode() if isinstance(v, bytes) else v

    return {text(k): [text(x) for x in v] if isinstance(v, list) else v for k, v in raw.items()}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (MNIST format, plain or gzip) of unsigned bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read idx file ({e})") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte idx file (bad magic {data[:4].hex()})")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DataError(f"{path}: idx file has {len(data) - offset} data bytes, header says {dims}")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


@functools.lru_cache(maxsize=8)
def _array_file(path: str) -> np.ndarray:
    """All images of one array-backed file: (N, H, W) gray or (N, H, W, 3) RGB uint8, read once."""
    if "idx3-ubyte" in Path(path).name:
        return read_idx(path)
    data = read_cifar_pickle(path).get("data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: CIFAR pickle has no N x 3072 'data' array")
    return np.ascontiguousarray(data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def split_item_path(path: str) -> tuple[str, int] | None:
    """``"<file>#<index>"`` -> (file, index); None for an ordinary file path."""
    file, sep, index = path.rpartition("#")
    return (file, int(index)) if sep and index.isdigit() else None


def array_item(path: str) -> np.ndarray:
    """Pixels (H, W) or (H, W, 3) uint8 of an array-backed ``"<file>#<index>"`` item."""
    parts = split_item_path(path)
    if parts is None:
        raise DataError(f"{path}: not an array item path ('<file>#<index>')")
    file, index = parts
    array = _array_file(file)
    if index >= len(array):
        raise DataError(f"{path}: index {index} out of range ({file} holds {len(array)} images)")
    return array[index]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _locate(root: Path, sub: str, probe: str) -> Path:
    """The data folder: ``root/sub`` or ``root`` itself when it already holds ``probe``."""
    for folder in (root / sub, root):
        if (folder / probe).is_file():
            return folder
    raise DataError(f"{root}: no {sub}/{probe} found")


def _cifar_parts(
    dataset: str, root: Path, coarse: bool
) -> tuple[list[str], list[tuple[str, list[int], str]]]:
    """Class names and (file, labels, split) of each CIFAR batch file."""
    if dataset == "cifar10":
        folder = _locate(root, "cifar-10-batches-py", "batches.meta")
        names = read_cifar_pickle(folder / "batches.meta")["label_names"]
        files = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]
        key = "labels"
    else:
        folder = _locate(root, "cifar-100-python", "meta")
        kind = "coarse" if coarse else "fine"
        names = read_cifar_pickle(folder / "meta")[f"{kind}_label_names"]
        files, key = [("train", "train"), ("test", "test")], f"{kind}_labels"
    parts = []
    for name, split in files:
        file = folder / name
        if not file.is_file():
            raise DataError(f"{file}: missing {dataset} batch file")
        labels = read_cifar_pickle(file).get(key)
        if labels is None:
            raise DataError(f"{file}: CIFAR pickle has no {key!r}")
        parts.append((str(file), [int(x) for x in labels], split))
    return list(names), parts


def _fashion_parts(root: Path) -> tuple[list[str], list[tuple[str, list[int], str]]]:
    parts = []
    for prefix, split in (("train", "train"), ("t10k", "test")):
        files = {}
        for kind in ("images-idx3", "labels-idx1"):
            base = root / f"{prefix}-{kind}-ubyte"
            found = [p for p in (base, base.with_name(base.name + ".gz")) if p.is_file()]
            if not found:
                raise DataError(f"{base}(.gz): missing Fashion-MNIST file")
            files[kind] = found[0]
        parts.append((str(files["images-idx3"]), read_idx(files["labels-idx1"]).tolist(), split))
    return list(FASHION_MNIST_CLASSES), parts


def oneclass_samples(
    dataset: str, root: str | os.PathLike | None, normal_class: int, *, coarse: bool = False
) -> list[Sample]:
    """One-class protocol: train = train images of ``normal_class`` (label 0); test = the whole test set.

    Test images of ``normal_class`` are normal (defect "good"); all others are anomalous with the class
    name as defect. ``category`` is the normal class name (lower case, ``_`` separated). ``root`` holds
    ``cifar-10-batches-py`` / ``cifar-100-python`` or the Fashion-MNIST idx files; None means the
    Debian default for Fashion-MNIST (:data:`FASHION_MNIST_ROOT`). ``coarse`` picks CIFAR-100's 20
    super-classes instead of the 100 fine classes. No masks.
    """
    if dataset not in DATASETS:
        raise DataError(f"dataset: unknown {dataset!r}; available: {', '.join(DATASETS)}")
    if root is None:
        if dataset != "fashion_mnist":
            raise DataError(f"root: required for {dataset}")
        root = FASHION_MNIST_ROOT
    root = Path(root)
    names, parts = _fashion_parts(root) if dataset == "fashion_mnist" else _cifar_parts(dataset, root, coarse)
    if not 0 <= normal_class < len(names):
        raise DataError(f"normal_class: {normal_class!r} is not in 0..{len(names) - 1} for {dataset}")
    category = _slug(names[normal_class])
    samples = []
    for file, labels, split in parts:
        for i, y in enumerate(labels):
            if y == normal_class:
                samples.append(Sample(f"{file}#{i}", category, split, 0, "good"))
            elif split == "test":
                samples.append(Sample(f"{file}#{i}", category, split, 1, _slug(names[y])))
    return samples


def class_names(dataset: str, root: str | os.PathLike | None, *, coarse: bool = False) -> list[str]:
    """The category names of a one-class data set (its class names, lower case, ``_`` separated).

    Fashion-MNIST and CIFAR-10 have fixed names; CIFAR-100's come from ``cifar-100-python/meta``.
    """
    if dataset == "fashion_mnist":
        return [_slug(n) for n in FASHION_MNIST_CLASSES]
    if dataset == "cifar10":
        return list(CIFAR10_CLASSES)
    if dataset == "cifar100":
        if root is None:
            raise DataError("root: required for cifar100")
        folder = _locate(Path(root), "cifar-100-python", "meta")
        key = "coarse_label_names" if coarse else "fine_label_names"
        return [_slug(n) for n in read_cifar_pickle(folder / "meta")[key]]
    raise DataError(f"dataset: unknown {dataset!r}; available: {', '.join(DATASETS)}")


def oneclass_category(
    dataset: str,
    root: str | os.PathLike | None,
    category: str,
    *,
    coarse: bool = False,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> list[Sample]:
    """:func:`oneclass_samples` of the class named ``category``, optionally cut for quick runs.

    ``limit_train`` keeps the first N train images of the normal class, ``limit_test`` the first N test
    images of every class (so the anomaly ratio of the whole test set is kept). None: all of them.
    """
    names = class_names(dataset, root, coarse=coarse)
    if category not in names:
        raise DataError(f"categories: {category!r} is not a class of {dataset} ({', '.join(names)})")
    samples = oneclass_samples(dataset, root, names.index(category), coarse=coarse)
    kept, seen = [], {}
    for s in samples:
        limit = limit_train if s.split == "train" else limit_test
        group = (s.split, s.defect)
        if limit is None or seen.get(group, 0) < limit:
            seen[group] = seen.get(group, 0) + 1
            kept.append(s)
    return kept
