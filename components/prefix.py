"""A timm feature pyramid split at a stage boundary, and a per-image cache of its frozen prefix.

A method that trains only a backbone's last stages, with every earlier parameter frozen, every earlier
BatchNorm in eval mode and no random augmentation, sees each training image through the same prefix
output in every epoch. :class:`PrefixCache` computes that output once per distinct image (keyed by the
image's bytes) and reuses it — the same numbers the full forward computes, a fraction of the FLOPs. It is
exact up to the float rounding that a different batch composition may give the prefix's kernels.

Supported structures (the rest run uncached): timm's ``EfficientNetFeatures`` (EfficientNet,
EfficientNet-Lite, MobileNetV2/V3: ``conv_stem``, ``bn1``, ``blocks``) and ``FeatureListNet`` (ResNet,
WideResNet and every model timm flattens into a sequence of named modules).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

#: modules whose output is random in training mode: a prefix holding one (with p > 0) is not cached
STOCHASTIC = ("Dropout", "DropPath", "DropBlock")


class PrefixSplit:
    """``model``'s forward split after ``boundary`` (a ``feature_info`` module name, e.g. ``blocks.2``).

    ``prefix(x)`` returns (the feature levels produced inside the prefix, the boundary activation);
    ``suffix(h)`` returns the levels produced after it. ``prefix + suffix`` = ``model(x)``.
    """

    def __init__(self, model: nn.Module, boundary: str) -> None:
        self.model = model
        kind = type(model).__name__
        if hasattr(model, "blocks") and hasattr(model, "conv_stem") and hasattr(model, "_stage_out_idx"):
            head, _, index = boundary.partition(".")
            if head != "blocks" or not index.isdigit() or int(index) >= len(model.blocks):
                raise ValueError(f"prefix boundary {boundary!r}: not a block of {kind}")
            self.split = int(index) + 1  # blocks[:split] belong to the prefix
            self.modules = [model.conv_stem, model.bn1, *model.blocks[: self.split]]
            self._prefix, self._suffix = self._efficientnet_prefix, self._efficientnet_suffix
        elif hasattr(model, "return_layers") and hasattr(model, "items"):
            names = [name for name, _ in model.items()]
            key = boundary.replace(".", "_")
            if key not in names:
                raise ValueError(f"prefix boundary {boundary!r}: not a module of {kind}")
            self.split = names.index(key) + 1
            self.modules = [module for _, module in list(model.items())[: self.split]]
            self._prefix, self._suffix = self._sequence_prefix, self._sequence_suffix
        else:
            raise ValueError(f"prefix split: {kind} is not a supported feature model")

    def deterministic(self) -> bool:
        """True while the prefix is frozen and repeatable: no trainable parameter, no BatchNorm in
        training mode, no active dropout / drop-path."""
        for module in self.modules:
            for m in module.modules():
                if any(p.requires_grad for p in m.parameters(recurse=False)):
                    return False
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                    return False
                p = getattr(m, "p", getattr(m, "drop_prob", 0.0)) or 0.0
                if m.training and any(s in type(m).__name__ for s in STOCHASTIC) and p > 0:
                    return False
        return True

    def prefix(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self._prefix(x)

    def suffix(self, h: torch.Tensor) -> list[torch.Tensor]:
        return self._suffix(h)

    # EfficientNetFeatures: stem (level 0 when asked), then one level after each selected block
    def _efficientnet_prefix(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        m = self.model
        x = m.bn1(m.conv_stem(x))
        levels = [x] if 0 in m._stage_out_idx else []
        for i, block in enumerate(m.blocks[: self.split]):
            x = block(x)
            if i + 1 in m._stage_out_idx:
                levels.append(x)
        return levels, x

    def _efficientnet_suffix(self, x: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        levels = []
        for i, block in enumerate(m.blocks[self.split :], start=self.split):
            x = block(x)
            if i + 1 in m._stage_out_idx:
                levels.append(x)
        return levels

    # FeatureListNet: named modules in order, a level after each module named in return_layers
    def _run(self, modules: list[tuple[str, nn.Module]], x: torch.Tensor):
        levels = []
        for name, module in modules:
            x = module(x)
            if name in self.model.return_layers:
                levels.append(x[0] if isinstance(x, (tuple, list)) else x)
        return levels, x

    def _sequence_prefix(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self._run(list(self.model.items())[: self.split], x)

    def _sequence_suffix(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._run(list(self.model.items())[self.split :], x)[0]


def image_key(image: torch.Tensor) -> bytes:
    """A digest of one image's bytes (its dtype and shape included)."""
    data = image.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.numpy().tobytes())
    return h.digest()


class PrefixCache:
    """Per-image prefix outputs (levels + boundary activation), computed once, up to ``max_mb``.

    ``__call__(images, x)`` takes the raw batch (for the keys) and its normalised input and returns the
    full list of feature levels: cached prefix levels + the suffix run on the cached activation. Misses
    are computed in one batch under ``no_grad``; once ``max_mb`` is reached new images are computed but
    not stored. ``hits`` / ``misses`` count images.
    """

    def __init__(self, split: PrefixSplit, max_mb: float = 1024.0) -> None:
        self.split, self.max_bytes = split, max_mb * 2**20
        self.store: dict[bytes, list[torch.Tensor]] = {}
        self.bytes, self.hits, self.misses = 0, 0, 0

    def __call__(self, images: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        keys = [image_key(image) for image in images]
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        fresh: dict[int, list[torch.Tensor]] = {}
        if missing:
            with torch.no_grad():
                part = x if len(missing) == len(keys) else x[missing]
                part = part.contiguous(memory_format=torch.channels_last)
                levels, h = self.split.prefix(part)
            for j, i in enumerate(missing):
                fresh[i] = [t[j].clone() for t in (*levels, h)]
                size = sum(t.numel() * t.element_size() for t in fresh[i])
                if self.bytes + size <= self.max_bytes:
                    self.store[keys[i]] = fresh[i]
                    self.bytes += size
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        rows = [fresh[i] if i in fresh else self.store[k] for i, k in enumerate(keys)]
        channels_last = torch.channels_last
        stacked = [torch.stack(t).contiguous(memory_format=channels_last) for t in zip(*rows, strict=True)]
        return [*stacked[:-1], *self.split.suffix(stacked[-1])]

    def stats(self) -> dict[str, float]:
        return {"images": len(self.store), "mb": self.bytes / 2**20, "hits": self.hits, "misses": self.misses}
