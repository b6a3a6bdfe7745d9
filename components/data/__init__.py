"""Data sets for anomaly detection: folder and CSV readers, strict image loading, synthetic anomalies,
a uint8 torch dataset and verified parquet manifests.

``ImageDataset`` (torch) is imported on first use (PEP 562) and the vicinal augmentations live in
``components.data.vicinal``: the prepare stage reads and verifies data without torch.
"""

from components._lazy import lazy_names
from components.data.images import load_image, load_mask
from components.data.manifest import build_manifest, manifest_version, read_manifest, write_manifest
from components.data.mvtec import list_categories, scan_image_folder, scan_mvtec
from components.data.oneclass import (
    FASHION_MNIST_ROOT,
    ONECLASS_LAYOUTS,
    class_names,
    oneclass_category,
    oneclass_samples,
    split_item_path,
)
from components.data.samples import IMAGE_EXTENSIONS, DataError, Sample, split_validation
from components.data.synthetic import SYNTHETIC_KINDS, cutpaste, noise_patch, synthetic_anomalies
from components.data.visa import scan_visa

_LAZY = {"ImageDataset": "dataset"}  # the vicinal augmentations (torch): components.data.vicinal


__getattr__ = lazy_names(globals(), _LAZY)


__all__ = [
    "FASHION_MNIST_ROOT",
    "IMAGE_EXTENSIONS",
    "ONECLASS_LAYOUTS",
    "SYNTHETIC_KINDS",
    "DataError",
    "ImageDataset",
    "Sample",
    "build_manifest",
    "class_names",
    "cutpaste",
    "list_categories",
    "load_image",
    "load_mask",
    "manifest_version",
    "noise_patch",
    "oneclass_category",
    "oneclass_samples",
    "read_manifest",
    "scan_image_folder",
    "scan_mvtec",
    "scan_visa",
    "split_item_path",
    "split_validation",
    "synthetic_anomalies",
    "write_manifest",
]
