"""Make ``import torchvision`` (hence ``import timm``) work on a CPU-only torch.

PyPI's torchvision is a CUDA build. On the CPU torch its C extension does not load, and its Python
side then fails with ``operator torchvision::nms does not exist`` when it registers fake kernels.
Defining the two op schemas first is enough for import (adaptad never calls nms). This runs in every
process that imports ``components`` (Ray workers included) and does nothing when the extension loads.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None  # kept alive: the schemas live as long as this object


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision absent: nothing to fix
    libs = glob.glob(os.path.join(next(iter(spec.submodule_search_locations)), "_C*.so"))
    if not libs:
        return False
    try:
        torch.ops.load_library(libs[0])
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> bool:
    """Define the missing ``torchvision::nms``/``qnms`` schemas if the C extension cannot load.

    Returns True when the schemas were defined by this call (the fallback is active).
    """
    global _library
    if _library is not None or _extension_loads():
        return False
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        try:
            _library.define(schema)
        except RuntimeError as err:  # already defined by someone else
            if "already" not in str(err):
                raise
    return True
