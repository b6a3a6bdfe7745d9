"""Anomaly detection methods behind one protocol (see base.py).

Importing this package is light (no torch): the names below that need torch — the method classes'
registry, building and loading methods, the protocol — are imported on first use (PEP 562), so that
params.yaml can be validated (registry.py, components/specs.py) by stages that never build a model.
"""

from __future__ import annotations

from components._lazy import lazy_names
from components.methods.registry import METHOD_NAMES, method_knobs
from components.specs import MethodSpec

_LAZY = {
    "METHODS": "factory",
    "build_method": "factory",
    "load_method": "factory",
    "method_class": "factory",
    "AnomalyMethod": "base",
    "EpochReport": "base",
    "Prediction": "base",
    "load_networks": "base",
    "save_networks": "base",
}


__getattr__ = lazy_names(globals(), _LAZY)


__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "AnomalyMethod",
    "EpochReport",
    "MethodSpec",
    "Prediction",
    "build_method",
    "load_method",
    "load_networks",
    "method_class",
    "method_knobs",
    "save_networks",
]
