"""Anomaly detection methods behind one protocol (see base.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from components.backbones import FeatureExtractor, default_device
from components.methods.base import (
    AnomalyMethod,
    EpochReport,
    MethodSpec,
    Prediction,
    load_networks,
    load_spec,
    save_networks,
)
from components.methods.gaussian import GaussianAD, PaDiM
from components.methods.gaussian_ft import GaussianFT
from components.methods.knn import DN2, SPADE, PatchCore
from components.methods.panda import PANDA, PANDAOE
from components.methods.recontrast import ReContrast
from components.methods.topology import Topology

METHODS: dict[str, type[AnomalyMethod]] = {
    m.name: m
    for m in (DN2, SPADE, PatchCore, GaussianAD, PaDiM, PANDA, PANDAOE, GaussianFT, Topology, ReContrast)
}


def method_class(name: str) -> type[AnomalyMethod]:
    """The method registered under ``name``; ValueError naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"--method {name!r}: unknown method; choose from {', '.join(METHODS)}") from None


def build_method(
    spec: MethodSpec,
    device: torch.device | str | None = None,
    progress: bool = True,
    weights: str | None = None,
) -> AnomalyMethod:
    """Build ``spec``'s method on ``device`` (default: CUDA when present); ``weights`` overrides it."""
    cls = method_class(spec.method)
    extractor = FeatureExtractor(spec.backbone, weights or spec.weights, spec.levels or cls.default_levels)
    extractor = extractor.to(torch.device(device) if device is not None else default_device())
    method = cls(extractor, spec.image_size, progress=progress, **spec.params)
    method.spec = spec
    return method


def load_method(directory: str | Path, device: torch.device | str | None = None, progress: bool = False):
    """Rebuild a method saved with :meth:`AnomalyMethod.save` (adapted weights and fitted memory)."""
    directory = Path(directory)
    spec, meta = load_spec(directory)
    method = build_method(spec, device, progress=progress, weights="none")
    load_networks(method, directory)
    method.extractor.eval()
    method.sigma = meta.get("sigma", method.sigma)
    method.load_memory(directory / "memory")
    return method


__all__ = [
    "METHODS",
    "AnomalyMethod",
    "EpochReport",
    "MethodSpec",
    "Prediction",
    "build_method",
    "load_method",
    "load_networks",
    "method_class",
    "save_networks",
]
