"""Anomaly detection methods behind one protocol (see base.py)."""

from components.methods.base import AnomalyMethod, EpochReport, Prediction
from components.methods.gaussian import GaussianAD, PaDiM
from components.methods.knn import DN2, SPADE, PatchCore

METHODS: dict[str, type[AnomalyMethod]] = {m.name: m for m in (DN2, SPADE, PatchCore, GaussianAD, PaDiM)}


def method_class(name: str) -> type[AnomalyMethod]:
    """The method registered under ``name``; ValueError naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"--method {name!r}: unknown method; choose from {', '.join(METHODS)}") from None


__all__ = ["METHODS", "AnomalyMethod", "EpochReport", "Prediction", "method_class"]
