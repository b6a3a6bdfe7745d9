"""The method protocol (DESIGN.md) and the parts every method shares.

A method declares its trainable parameter groups, computes a training loss for a batch, reports
validation signals at epoch end, and — after training — builds its memory of normal features (``fit``)
and turns a batch of images into image scores and pixel anomaly maps (``predict``). Frozen baselines
have no trainable parameters; one generic training loop (flows/) drives every method.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.ndimage import gaussian_filter
from torch import nn
from tqdm.auto import tqdm

from components.atomic import replace_dir
from components.backbones import FeatureExtractor
from components.prefix import image_key
from components.specs import MethodSpec

SAVE_FORMAT = "adaptad-method/1"


@dataclass
class Prediction:
    """Image scores (B,) and pixel anomaly maps (B, S, S) at the input resolution."""

    scores: np.ndarray
    maps: np.ndarray


@dataclass
class EpochReport:
    """What a method says at the end of a training epoch: signals to log, and whether to stop."""

    metrics: dict[str, float] = field(default_factory=dict)
    stop: bool = False


class AnomalyMethod(ABC):
    """Base class of every method. Subclasses set ``name`` and ``default_levels``."""

    name: ClassVar[str]
    default_levels: ClassVar[tuple[int, ...]]
    #: what one training job covers: "category" (one model per category) or "dataset" (one model for
    #: all categories of a dataset, e.g. TPTL's weak supervision by category labels)
    scope: ClassVar[str] = "category"

    spec: MethodSpec | None = None  # set by build_method; needed to save()

    def __init__(
        self, extractor: FeatureExtractor, image_size: int, sigma: float = 4.0, progress: bool = True
    ):
        self.extractor = extractor
        self.image_size = image_size
        self.sigma = sigma
        self.progress = progress

    # --- training protocol (frozen baselines keep the defaults) -----------------------------------
    #: training epochs the generic loop runs at most; 0 for frozen methods
    epochs: int = 0
    #: gradient-norm clipping applied by the loop before each optimizer step (None: off)
    max_grad_norm: float | None = None

    @property
    def trains(self) -> bool:
        return self.epochs > 0 and bool(self.param_groups())

    def trainable(self) -> nn.Module:
        """The module whose parameters train; the loop wraps it (DDP) and passes it to training_loss."""
        return self.extractor

    def networks(self) -> dict[str, nn.Module]:
        """Every module whose weights scoring needs, by file name: saved, checkpointed and restored.

        The backbone is always ``"backbone"``; methods with heads, decoders or frozen copies add theirs.
        """
        return {"backbone": self.extractor.model}

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; empty for a frozen method."""
        return []

    def make_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError(f"{self.name} is a frozen-feature method: it has no optimizer")

    def begin_training(self, train: Iterable[dict], validation: Iterable[dict]) -> dict[str, str]:
        """One-time set-up before the first epoch (on every worker, same data); returns run tags."""
        return {}

    def train_mode(self) -> None:
        """Put the trainable module into training mode (methods may keep parts, e.g. BatchNorm, in eval)."""
        self.trainable().train()

    def training_loss(self, batch: dict, model: nn.Module) -> torch.Tensor:
        """Loss of one batch; ``model`` is :meth:`trainable` as wrapped by the training loop."""
        raise NotImplementedError(f"{self.name} is a frozen-feature method: it has no training step")

    def plan_epochs(self, steps_per_epoch: int) -> None:  # noqa: B027 (optional hook)
        """Called once before the first epoch with this worker's optimizer steps per epoch (a method whose
        schedule is counted in steps sets ``epochs`` from it)."""

    def begin_epoch(self, epoch: int, steps: int) -> None:  # noqa: B027 (optional hook)
        """Called before ``epoch`` (1-based) with the optimizer steps this worker will take in it."""

    def end_epoch(self, epoch: int, validation: Iterable[dict]) -> EpochReport:
        """Validation signals after ``epoch`` (1-based) on held-out normal + synthetic anomalies."""
        return EpochReport()

    def end_training(self) -> None:  # noqa: B027 (optional hook)
        """Called once after the last epoch (e.g. to restore the selected epoch's weights)."""

    # --- model selection (what the method keeps, and on which label-free signal) ----------------------
    #: the epoch-history key the method selects its epoch on (None: it keeps the last epoch)
    selection_signal: str | None = None
    #: the selection signal of the pretrained weights (epoch 0), set by ``begin_training`` where measured
    pretrained_signal: float | None = None
    #: whether epoch 0 (the weights before the first step) is a model the method could keep
    epoch0_candidate: ClassVar[bool] = True

    def kept_epoch(self, last: int) -> int:
        """The epoch whose weights :meth:`end_training` keeps (0: the weights before training)."""
        return last

    def state_dict(self) -> dict[str, Any]:
        """The method's own training state (tensors, numbers, strings) for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore :meth:`state_dict` output when a training job resumes from a checkpoint."""

    # --- persistence of a fitted method ------------------------------------------------------------
    def save_memory(self, directory: Path) -> None:
        """Write what ``fit`` built (banks, Gaussians) into ``directory`` (exists, empty)."""
        raise NotImplementedError(f"{self.name}: save_memory not implemented")

    def load_memory(self, directory: Path) -> None:
        """Inverse of :meth:`save_memory`."""
        raise NotImplementedError(f"{self.name}: load_memory not implemented")

    def save(self, directory: str | Path) -> Path:
        """Save the fitted method atomically: spec.json, backbone.safetensors and its memory."""
        if self.spec is None:
            raise ValueError(f"{self.name}: built without a MethodSpec (use build_method) — cannot save")
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            spec = self.spec.to_json() | {"levels": list(self.extractor.levels)}
            meta = {"format": SAVE_FORMAT, "spec": spec, "sigma": self.sigma}
            (tmp / "spec.json").write_text(json.dumps(meta, indent=2))
            save_networks(self, tmp)
            (tmp / "memory").mkdir()
            self.save_memory(tmp / "memory")
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    # --- memory and scoring -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.extractor.parameters()).device

    @abstractmethod
    def fit(self, loader: Iterable[dict]) -> None:
        """Build the method's memory (banks, Gaussians) from batches of normal training images."""

    @abstractmethod
    def predict(self, images: torch.Tensor) -> Prediction:
        """Score a uint8 batch (B, 3, S, S)."""

    # --- shared helpers ------------------------------------------------------------------------------
    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor(images.to(self.device, non_blocking=True))

    #: batch digest → monitor features, while :meth:`sharing_monitor_features` is active
    _monitor_memo: dict[bytes, torch.Tensor] | None = None

    @contextmanager
    def sharing_monitor_features(self) -> Iterator[None]:
        """Inside the block, :meth:`monitor_features` of a batch it has seen returns the features it
        computed then (exact while the weights do not change: validation and the collapse monitor score
        the same slice after an epoch with one forward pass instead of two)."""
        self._monitor_memo = {}
        try:
            yield
        finally:
            self._monitor_memo = None

    @torch.no_grad()
    def monitor_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) image representation the collapse monitor watches: the pooled last level, eval mode."""
        memo = self._monitor_memo
        key = image_key(images) if memo is not None else b""
        if memo is not None and key in memo:
            return memo[key]
        with evaluating(self.extractor):
            out = pooled(self.extractor(images.to(self.device))[-1]).float()
        if memo is not None:
            memo[key] = out
        return out

    def batches(self, loader: Iterable[dict], desc: str) -> Iterator[tuple[dict, list[torch.Tensor]]]:
        """Yield (batch, feature levels) over ``loader`` with a progress bar."""
        for batch in tqdm(loader, desc=f"{self.name}: {desc}", disable=not self.progress, leave=False):
            yield batch, self.features(batch["image"])

    def to_maps(self, patch_scores: torch.Tensor) -> np.ndarray:
        """(B, h, w) patch scores → (B, S, S) maps: bilinear upsampling, then Gaussian blur (σ=sigma)."""
        up = F.interpolate(
            patch_scores[:, None].float(), size=(self.image_size,) * 2, mode="bilinear", align_corners=False
        )[:, 0]
        maps = up.cpu().numpy()
        if self.sigma > 0:
            maps = gaussian_filter(maps, sigma=(0, self.sigma, self.sigma), truncate=4.0)
        return maps.astype(np.float32)


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block; every submodule's own mode is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def train_with_frozen_batchnorm(module: nn.Module) -> None:
    """Training mode for ``module``, but every BatchNorm keeps its (ImageNet) running statistics."""
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def pooled(feature: torch.Tensor) -> torch.Tensor:
    """Global average pooling (B, C, h, w) → (B, C)."""
    return feature.mean(dim=(2, 3))


def aligned(features: Sequence[torch.Tensor], local: int = 1) -> torch.Tensor:
    """Concatenate levels at the first level's resolution (B, ΣC, h, w).

    ``local > 1`` first averages each location's ``local × local`` neighbourhood (PatchCore's locally
    aware patch features).
    """
    size = features[0].shape[-2:]
    out = []
    for f in features:
        if local > 1:
            f = F.avg_pool2d(f, local, stride=1, padding=local // 2)
        if f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


def flat_locations(feature: torch.Tensor) -> np.ndarray:
    """(B, C, h, w) → float32 numpy (B·h·w, C), row-major over (b, y, x)."""
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1]).float().cpu().numpy()


def load_spec(directory: str | Path) -> tuple[MethodSpec, dict[str, Any]]:
    """The MethodSpec and metadata of a method saved with :meth:`AnomalyMethod.save`."""
    meta_file = Path(directory) / "spec.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{directory}: not a saved adaptad method (no spec.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != SAVE_FORMAT:
        raise ValueError(f"{meta_file}: unknown format {meta.get('format')!r}")
    return MethodSpec.from_json(meta["spec"]), meta


def save_networks(method: AnomalyMethod, directory: Path) -> None:
    """Write ``<name>.safetensors`` for every network of ``method`` into ``directory``."""
    for name, module in method.networks().items():
        save_tensors(module.state_dict(), Path(directory) / f"{name}.safetensors")


def load_networks(method: AnomalyMethod, directory: Path) -> None:
    """Load every network of ``method`` strictly from ``directory`` (files of other networks are ignored)."""
    for name, module in method.networks().items():
        path = Path(directory) / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {path.name} for {method.name}'s network {name!r}")
        module.load_state_dict(load_tensors(path), strict=True)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
