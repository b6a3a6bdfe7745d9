"""Build methods by name: the registry's classes, a method from its spec, a saved method."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from components.backbones import FeatureExtractor, default_device
from components.methods.base import AnomalyMethod, load_networks, load_spec
from components.methods.registry import REGISTRY
from components.specs import MethodSpec

METHODS: dict[str, type[AnomalyMethod]] = {
    name: getattr(importlib.import_module(f"components.methods.{module}"), cls)
    for name, (module, cls) in REGISTRY.items()
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
