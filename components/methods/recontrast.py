"""ReContrast (Guo et al., NeurIPS 2023): reverse distillation, trainable encoder, cross reconstruction.

As the paper and its official code (github.com/guojiajeremy/ReContrast) define it:

- Encoder: the pretrained pyramid up to its third stage (WRN-50-2 layer1..3 in the paper), **trainable**,
  plus a frozen deep copy of it (no gradients, always in eval mode).
- A shared bottleneck, RD4AD's one-class bottleneck embedding (OCBE): the two shallower scales are brought
  to the deepest one's resolution with strided 3×3 convolutions (+ BatchNorm + ReLU; one per halving),
  concatenated with the deepest scale, then a stage of residual bottleneck blocks that downsamples once
  more (output 2 × the deepest scale's channels).
- A reverse decoder, RD4AD-style: one upsampling residual stage per encoder scale (2×2 transposed
  convolutions in the first block and its shortcut), deep → shallow, each ending at that scale's channels
  and resolution; two 1×1 output heads per scale (the official ``output_conv=2``).
- Cross reconstruction: the trainable-encoder features and the frozen-encoder features are concatenated
  along the batch (2B) and go through the shared bottleneck and decoder, whose output is split in two
  halves (each head runs only on the half whose output the official code keeps: the same numbers).
  Head 0 on the half fed by the trainable encoder reconstructs the FROZEN encoder's features; head 1 on
  the half fed by the frozen encoder reconstructs the TRAINABLE encoder's features (target detached:
  the trainable encoder learns only through the bottleneck's input).
- Loss: global cosine distance per image over each flattened scale map (target detached), summed over the
  three scales, with hard mining: the gradient at points whose (1 − cos) distance lies below
  mean + α·std (over the branch's batch and that scale) is multiplied by ``factor`` (0: dropped);
  α ramps linearly from −3 to +1 over the first 10 % of all iterations; total = ½ of each branch.
- AdamW, betas (0.9, 0.999), weight decay 1e-5, lr 2e-3 for bottleneck + decoder and 1e-5 for the encoder
  (one optimizer with two parameter groups = the official two optimizers). The paper trains 2000
  iterations at batch 16 and 256 px; here training runs whole epochs: ``epochs`` ≈ 2000 / ⌈N_fit / 16⌉,
  e.g. ≈ 160 for a 190-image fit split (a 240-image MVTec category with 20 % held out for validation).
- Scoring: anomaly map = the sum of the six (1 − cos) maps (three scales × two branches), each upsampled
  bilinearly (``align_corners=True``, as the official ``cal_anomaly_map``) to the input size, Gaussian
  σ = 4; image score = the map's maximum. There is no memory bank: ``fit`` builds nothing.

Knobs (defaults = the official code): ``epochs`` (160), ``steps`` (null: ``epochs`` counts),
``lr`` (2e-3, bottleneck + decoder), ``encoder_lr`` (1e-5), ``weight_decay`` (1e-5), ``betas``
((0.9, 0.999)), ``max_grad_norm`` (None, as the official code), ``alpha_start`` / ``alpha_end`` /
``ramp`` (−3, 1, 0.1), ``factor`` (0), ``encoder_bn`` ("eval"), ``select`` ("last"),
``bottleneck_blocks`` (3), ``decoder_blocks`` ((3, 4, 6)), ``sigma`` (4).

Deviations (each a knob, or a consequence of the project's contracts):

- ``backbone``/``levels`` (spec): any timm pyramid with three feature stages whose resolutions halve
  (or shrink by powers of two) from one stage to the next; bottleneck and decoder widths are derived from
  the encoder's channels and strides (for WRN-50-2 with levels (1, 2, 3) they are the official shapes; the
  official OCBE's never-used ``conv4``/``bn4`` are left out). Parameters of the timm feature model that
  the three stages do not use (e.g. EfficientNet's later blocks) are frozen, so every trainable
  parameter gets a gradient every step (DDP).
- ``encoder_bn``: ONE BatchNorm mode for the trainable encoder for every category, default ``"eval"``
  (ImageNet running statistics; ``"train"`` puts the whole trainable encoder in training mode as the
  official ``encoder_bn_train=True``). The official code picks it per category (eval for toothbrush,
  leather, grid, tile, wood, screw; train otherwise) from test results.
- ``select``: the official code reports test-selected checkpoints ("best"); we never look at the test
  split. ``"last"`` (default) keeps the last epoch (the official "last" numbers); ``"validation"`` keeps
  the epoch whose validation AUROC (held-out normal images vs. synthetic anomalies, image score = map
  maximum) is best.
- ``steps`` (the paper's unit: 2000 optimizer steps at batch 16, whatever the set's size) or, when it is
  null, ``epochs``: the generic loop runs whole epochs, so ``steps`` trains ⌈steps / steps per epoch⌉ of
  them (``plan_epochs``), up to one epoch's steps more than asked; the α ramp covers ``ramp`` × ``steps``
  (or × epochs × steps per epoch) iterations, counted from the loop's ``begin_epoch`` hook. A fixed epoch
  count starves small sets: 4 epochs of a 54-image fit split are 14 steps.
- ``bottleneck_blocks`` (3) and ``decoder_blocks`` ((3, 4, 6), deep → shallow) are WRN-50's block counts
  as in the official code; smaller values only for CPU budgets.
- Image sizes that are not a multiple of the deepest stride × 2 give odd feature maps; the bottleneck and
  decoder then resize (bilinear) to the encoder's sizes where a strided/transposed convolution is off by
  one. At multiples (e.g. 256) nothing is resized.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.backbones import BackboneError, FeatureExtractor
from components.methods.base import AnomalyMethod, EpochReport, Prediction, evaluating
from components.metrics import validation_auroc

ENCODER_BN = ("eval", "train")
SELECT = ("last", "validation")


# --- building blocks ---------------------------------------------------------------------------------
def _bn_relu(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


def _fit(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` resized (bilinear) to ``size`` when an odd input size made a stride off by one."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ResBlock(nn.Module):
    """ResNet bottleneck block (1×1 → 3×3 → 1×1, residual) as torchvision/RD4AD build it.

    ``down > 1``: the 3×3 convolution and the 1×1 shortcut are strided (encoder style, the OCBE stage);
    ``up > 1``: a ``up×up`` transposed convolution replaces the 3×3 one and the shortcut (RD4AD decoder).
    """

    def __init__(self, cin: int, width: int, cout: int, down: int = 1, up: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        if up > 1:
            self.conv2: nn.Module = nn.ConvTranspose2d(width, width, up, stride=up, bias=False)
        else:
            self.conv2 = nn.Conv2d(width, width, 3, stride=down, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if up > 1:
            self.shortcut = nn.Sequential(
                nn.ConvTranspose2d(cin, cout, up, stride=up, bias=False), nn.BatchNorm2d(cout)
            )
        elif down > 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=down, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


def _init(module: nn.Module) -> None:
    """The official initialisation: Kaiming (fan_out) for Conv2d, BatchNorm weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _halvings(ratio: int, what: str) -> int:
    steps = round(math.log2(ratio)) if ratio >= 1 else -1
    if steps < 1 or 2**steps != ratio:
        raise BackboneError(f"recontrast: {what}: stride ratio {ratio} is not a power of two ≥ 2")
    return steps


class Bottleneck(nn.Module):
    """RD4AD's OCBE: shallower scales → deepest resolution (strided 3×3 convs), concat, downsampling stage."""

    def __init__(self, channels: Sequence[int], reductions: Sequence[int], blocks: int = 3) -> None:
        super().__init__()
        *shallow, deepest = range(len(channels))
        by_reduction = dict(zip(reductions, channels, strict=True))
        self.align = nn.ModuleList()
        for i in shallow:
            steps = _halvings(reductions[-1] // reductions[i], f"level {i} → deepest")
            convs, cin, r = [], channels[i], reductions[i]
            for _ in range(steps):  # WRN-50: 256 → 512 → 1024 and 512 → 1024, as the official BN_layer
                r *= 2
                cout = by_reduction.get(r, channels[deepest])
                convs.append(_bn_relu(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), cout))
                cin = cout
            self.align.append(nn.Sequential(*convs))
        fused = len(channels) * channels[deepest]  # every chain ends at the deepest scale's channels
        self.out_channels = 2 * channels[deepest]
        width = channels[deepest]  # WRN-50-2: 3072 → (1024) → 2048
        stage = [ResBlock(fused, width, self.out_channels, down=2)]
        stage += [ResBlock(self.out_channels, width, self.out_channels) for _ in range(blocks - 1)]
        self.stage = nn.Sequential(*stage)
        _init(self)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[-1].shape[-2:]
        aligned = [_fit(conv(f), size) for conv, f in zip(self.align, feats[:-1], strict=True)]
        return self.stage(torch.cat([*aligned, feats[-1]], dim=1)).contiguous()


class Decoder(nn.Module):
    """RD4AD reverse decoder: one upsampling residual stage per scale (deep → shallow), two 1×1 heads each."""

    def __init__(
        self, in_channels: int, channels: Sequence[int], reductions: Sequence[int], blocks: Sequence[int]
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        cin, r_in = in_channels, 2 * reductions[-1]
        for level, n in zip(reversed(range(len(channels))), blocks, strict=True):
            cout, r = channels[level], reductions[level]
            up = 2 ** _halvings(r_in // r, f"decoder → level {level}")
            width = max(cout // 2, 1)  # WRN-50-2: 2048 → (512) → 1024, 1024 → (256) → 512, 512 → (128) → 256
            stage = [ResBlock(cin, width, cout, up=up)] + [ResBlock(cout, width, cout) for _ in range(n - 1)]
            self.stages.append(nn.Sequential(*stage))
            cin, r_in = cout, r
        # heads[h][level]: head 0 reconstructs the frozen features, head 1 the trainable ones
        self.heads = nn.ModuleList(nn.ModuleList(nn.Conv2d(c, c, 1) for c in channels) for _ in range(2))
        _init(self)

    def forward(self, x: torch.Tensor, sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """(2B, C, h, w) bottleneck output → per level (shallow → deep) the decoded (2B, C_l, h_l, w_l)."""
        out: list[torch.Tensor] = []
        for stage, size in zip(self.stages, reversed(sizes), strict=True):
            x = _fit(stage(x), size)
            out.append(x)
        return out[::-1]


class ReContrastNet(nn.Module):
    """Trainable encoder + frozen copy + shared bottleneck + decoder; one forward does a whole step."""

    def __init__(
        self,
        encoder: FeatureExtractor,
        frozen: FeatureExtractor,
        bottleneck: Bottleneck,
        decoder: Decoder,
        encoder_bn_train: bool = False,
    ) -> None:
        super().__init__()
        self.encoder, self.frozen, self.bottleneck, self.decoder = encoder, frozen, bottleneck, decoder
        self.encoder_bn_train = encoder_bn_train

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
        """(trainable features, frozen features, reconstruction of frozen, reconstruction of trainable)."""
        en = self.encoder(images)
        with torch.no_grad():
            fr = self.frozen(images)
        b = len(images)
        sizes = [tuple(f.shape[-2:]) for f in en]
        decoded = self.decoder(
            self.bottleneck([torch.cat([e, f]) for e, f in zip(en, fr, strict=True)]), sizes
        )
        of_frozen = [head(d[:b]) for head, d in zip(self.decoder.heads[0], decoded, strict=True)]
        of_trainable = [head(d[b:]) for head, d in zip(self.decoder.heads[1], decoded, strict=True)]
        return en, fr, of_frozen, of_trainable

    def train(self, mode: bool = True) -> ReContrastNet:
        """Bottleneck and decoder follow ``mode``; the frozen copy is always eval; the encoder per knob."""
        self.training = mode
        self.encoder.train(mode and self.encoder_bn_train)
        self.frozen.train(False)
        self.bottleneck.train(mode)
        self.decoder.train(mode)
        return self


# --- the loss ----------------------------------------------------------------------------------------
def hard_mining_alpha(
    iteration: int, total: int, start: float = -3.0, end: float = 1.0, ramp: float = 0.1
) -> float:
    """α at ``iteration`` (0-based) of ``total``: linear from ``start`` to ``end`` over ``ramp`` × total."""
    span = ramp * total
    if span <= 0:
        return end
    return min(start + (end - start) * iteration / span, end)


def global_cosine_hm(
    targets: Sequence[torch.Tensor], recons: Sequence[torch.Tensor], alpha: float, factor: float = 0.0
) -> torch.Tensor:
    """Σ over scales of the batch mean of 1 − cos(flattened target, flattened reconstruction), hard-mined.

    Targets are detached. Where a point's (1 − cos) distance over channels is below mean + α·std of that
    scale's distances in the batch, the reconstruction's gradient is multiplied by ``factor``.
    """
    loss = torch.zeros((), device=recons[0].device)
    for a, b in zip(targets, recons, strict=True):
        a = a.detach().float()
        b = b.float()
        with torch.no_grad():
            dist = 1 - F.cosine_similarity(a, b, dim=1)  # (B, h, w)
            thresh = dist.mean() + alpha * dist.reshape(-1).std()
            scale = torch.where(dist < thresh, factor, 1.0).to(b.dtype)[:, None]
        loss = loss + (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)).mean()
        if b.requires_grad:
            b.register_hook(lambda g, s=scale: g * s)
    return loss


def _check(ok: bool, knob: str, value: Any, need: str) -> None:
    if not ok:
        raise ValueError(f"recontrast {knob}={value!r}: {need}")


# --- the method --------------------------------------------------------------------------------------
class ReContrast(AnomalyMethod):
    """Trainable encoder + frozen copy, bottleneck, two-headed decoder, global cosine with hard mining."""

    name = "recontrast"
    default_levels = (1, 2, 3)

    def __init__(
        self,
        extractor: FeatureExtractor,
        image_size: int,
        epochs: int = 160,
        steps: int | None = None,
        lr: float = 2e-3,
        encoder_lr: float = 1e-5,
        weight_decay: float = 1e-5,
        betas: Sequence[float] = (0.9, 0.999),
        max_grad_norm: float | None = None,
        encoder_bn: str = "eval",
        alpha_start: float = -3.0,
        alpha_end: float = 1.0,
        ramp: float = 0.1,
        factor: float = 0.0,
        select: str = "last",
        bottleneck_blocks: int = 3,
        decoder_blocks: Sequence[int] = (3, 4, 6),
        **kwargs: Any,
    ) -> None:
        super().__init__(extractor, image_size, **kwargs)
        _check(isinstance(epochs, int) and epochs >= 1, "epochs", epochs, "must be an integer ≥ 1")
        _check(
            steps is None or (isinstance(steps, int) and steps >= 1),
            "steps",
            steps,
            "must be an integer ≥ 1 or null",
        )
        _check(lr > 0, "lr", lr, "must be > 0")
        _check(encoder_lr >= 0, "encoder_lr", encoder_lr, "must be ≥ 0")
        _check(weight_decay >= 0, "weight_decay", weight_decay, "must be ≥ 0")
        _check(
            isinstance(betas, Sequence)
            and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas),
            "betas",
            betas,
            "must be two numbers in [0, 1)",
        )
        _check(
            max_grad_norm is None or max_grad_norm > 0, "max_grad_norm", max_grad_norm, "must be > 0 or null"
        )
        _check(encoder_bn in ENCODER_BN, "encoder_bn", encoder_bn, f"choose from {', '.join(ENCODER_BN)}")
        _check(alpha_start <= alpha_end, "alpha_start", alpha_start, f"must be ≤ alpha_end={alpha_end}")
        _check(0 <= ramp <= 1, "ramp", ramp, "must be a fraction of the iterations in [0, 1]")
        _check(0 <= factor <= 1, "factor", factor, "must be in [0, 1] (0 drops the easy points' gradient)")
        _check(select in SELECT, "select", select, f"choose from {', '.join(SELECT)}")
        _check(
            isinstance(bottleneck_blocks, int) and bottleneck_blocks >= 1,
            "bottleneck_blocks",
            bottleneck_blocks,
            "must be an integer ≥ 1",
        )
        _check(
            isinstance(decoder_blocks, Sequence)
            and len(decoder_blocks) == 3
            and all(isinstance(n, int) and n >= 1 for n in decoder_blocks),
            "decoder_blocks",
            decoder_blocks,
            "must be three integers ≥ 1 (deep → shallow)",
        )
        _check(
            len(extractor.levels) == 3,
            "levels",
            list(extractor.levels),
            "ReContrast needs three feature stages",
        )
        self.epochs, self.lr, self.encoder_lr, self.weight_decay = epochs, lr, encoder_lr, weight_decay
        self.steps = steps
        self.betas = (float(betas[0]), float(betas[1]))
        self.max_grad_norm = max_grad_norm
        self.encoder_bn, self.select = encoder_bn, select
        self.alpha_start, self.alpha_end, self.ramp, self.factor = alpha_start, alpha_end, ramp, factor

        channels, reductions = list(extractor.channels), list(extractor.reductions)
        if any(b <= a for a, b in itertools.pairwise(reductions)):
            raise BackboneError(
                f"recontrast: levels {extractor.levels} must have growing strides ({reductions})"
            )
        device = self.device
        self.encoder_params = self._used_parameters(extractor)
        self.frozen = copy.deepcopy(extractor).eval()
        self.frozen.requires_grad_(False)
        self.bottleneck = Bottleneck(channels, reductions, bottleneck_blocks).to(device)
        self.decoder = Decoder(self.bottleneck.out_channels, channels, reductions, list(decoder_blocks)).to(
            device
        )
        self.net = ReContrastNet(extractor, self.frozen, self.bottleneck, self.decoder, encoder_bn == "train")
        # training state (checkpointed)
        self.iteration, self.total_steps = 0, 0
        self.best: dict[str, Any] = {"auroc": -1.0, "epoch": 0}
        self.best_weights: dict[str, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _used_parameters(extractor: FeatureExtractor) -> list[nn.Parameter]:
        """Mark the feature model's parameters the three stages use as trainable, the rest frozen."""
        params = list(extractor.model.parameters())
        for p in params:
            p.requires_grad_(True)
        size = 2 * max(extractor.reductions)
        device = params[0].device
        with evaluating(extractor), torch.enable_grad():
            feats = extractor(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device))
            total = sum(f.float().sum() for f in feats)
            grads = torch.autograd.grad(total, params, allow_unused=True)
        used = []
        for p, g in zip(params, grads, strict=True):
            p.requires_grad_(g is not None)
            if g is not None:
                used.append(p)
        return used

    # --- modules ---------------------------------------------------------------------------------------
    def trainable(self) -> nn.Module:
        return self.net

    def networks(self) -> dict[str, nn.Module]:
        return {
            "backbone": self.extractor.model,
            "frozen": self.frozen.model,
            "bottleneck": self.bottleneck,
            "decoder": self.decoder,
        }

    def param_groups(self) -> list[dict[str, Any]]:
        return [
            {
                "params": [*self.decoder.parameters(), *self.bottleneck.parameters()],
                "lr": self.lr,
                "weight_decay": self.weight_decay,
            },
            {"params": list(self.encoder_params), "lr": self.encoder_lr, "weight_decay": self.weight_decay},
        ]

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.param_groups(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )

    # --- training protocol -------------------------------------------------------------------------------
    def begin_training(self, train: Iterable[dict], validation: Iterable[dict]) -> dict[str, str]:
        self.iteration, self.total_steps = 0, 0
        self.best, self.best_weights = {"auroc": -1.0, "epoch": 0}, {}
        frozen_params = sum(p.numel() for p in self.extractor.model.parameters() if not p.requires_grad)
        return {
            "recontrast.encoder_bn": self.encoder_bn,
            "recontrast.select": self.select,
            "recontrast.encoder_params": str(sum(p.numel() for p in self.encoder_params)),
            "recontrast.unused_encoder_params": str(frozen_params),
            "recontrast.decoder_params": str(
                sum(p.numel() for m in (self.bottleneck, self.decoder) for p in m.parameters())
            ),
        }

    def plan_epochs(self, steps_per_epoch: int) -> None:
        """With ``steps`` set (the paper's unit: 2000 at batch 16, whatever the set's size), train the whole
        epochs that hold them: ⌈steps / steps_per_epoch⌉."""
        if self.steps is not None:
            self.epochs = max(1, math.ceil(self.steps / max(steps_per_epoch, 1)))

    def begin_epoch(self, epoch: int, steps: int) -> None:
        """Know the schedule: ``steps`` iterations in all when set, else ``epochs`` × ``steps`` (this epoch's
        steps); ``epoch`` (1-based) starts now."""
        self.total_steps = self.steps if self.steps is not None else self.epochs * steps
        self.iteration = (epoch - 1) * steps

    @property
    def alpha(self) -> float:
        """The hard-mining α of the current iteration."""
        if self.total_steps <= 0:
            raise RuntimeError("recontrast: begin_epoch(epoch, steps) must be called before training steps")
        return hard_mining_alpha(
            self.iteration, self.total_steps, self.alpha_start, self.alpha_end, self.ramp
        )

    def train_mode(self) -> None:
        self.net.train()

    def training_loss(self, batch: dict, model: nn.Module) -> torch.Tensor:
        alpha = self.alpha
        en, fr, of_frozen, of_trainable = model(batch["image"].to(self.device, non_blocking=True))
        loss = (
            global_cosine_hm(fr, of_frozen, alpha, self.factor) / 2
            + global_cosine_hm(en, of_trainable, alpha, self.factor) / 2
        )
        self.iteration += 1
        return loss

    @torch.inference_mode()
    def _outputs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Eval-mode (targets, reconstructions): frozen vs head 0, then trainable vs head 1 (six pairs)."""
        self.net.eval()
        en, fr, of_frozen, of_trainable = self.net(images.to(self.device, non_blocking=True))
        return [*fr, *en], [*of_frozen, *of_trainable]

    @staticmethod
    def _image_losses(targets: list[torch.Tensor], recons: list[torch.Tensor]) -> torch.Tensor:
        """(B,) the unmined training loss per image: ½ Σ over the six pairs of the global cosine distance."""
        d = [
            1 - F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1)
            for a, b in zip(targets, recons, strict=True)
        ]
        return torch.stack(d).sum(0) / 2

    def _raw_maps(self, targets: list[torch.Tensor], recons: list[torch.Tensor]) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        total = None
        for a, b in zip(targets, recons, strict=True):
            d = 1 - F.cosine_similarity(a.float(), b.float(), dim=1)
            d = F.interpolate(d[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
            total = d if total is None else total + d
        assert total is not None
        return total

    def reconstruction_loss(self, images: torch.Tensor) -> float:
        """Mean over ``images`` of the (unmined) cross-reconstruction loss, networks in eval mode."""
        targets, recons = self._outputs(images)
        return float(self._image_losses(targets, recons).mean())

    def end_epoch(self, epoch: int, validation: Iterable[dict]) -> EpochReport:
        scores, labels, normal_losses = [], [], []
        for batch in validation:
            targets, recons = self._outputs(batch["image"])
            maps = self.to_maps(self._raw_maps(targets, recons))
            scores.append(maps.reshape(len(maps), -1).max(1))
            y = torch.as_tensor(batch["label"]).cpu().numpy()
            labels.append(y)
            normal_losses.append(self._image_losses(targets, recons).cpu().numpy()[y == 0])
        y = np.concatenate(labels) if labels else np.zeros(0)
        metrics: dict[str, float] = {"alpha": self.alpha if self.total_steps else float(self.alpha_end)}
        losses = np.concatenate(normal_losses) if normal_losses else np.zeros(0)
        if len(losses):
            metrics["val_normal_loss"] = float(losses.mean())
        if len(np.unique(y)) == 2:
            metrics["val_auroc"] = validation_auroc(y, np.concatenate(scores))
        elif self.select == "validation":
            raise ValueError(
                "recontrast select=validation: the validation slice needs normal and synthetic images"
            )
        if self.select == "validation":
            if metrics["val_auroc"] > self.best["auroc"]:
                self.best = {"auroc": metrics["val_auroc"], "epoch": epoch}
                self.best_weights = {
                    name: {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                    for name, module in self._selected().items()
                }
            metrics |= {"best_val_auroc": self.best["auroc"], "best_epoch": float(self.best["epoch"])}
        return EpochReport(metrics=metrics)

    def _selected(self) -> dict[str, nn.Module]:
        """The networks that training changes (the frozen copy never does)."""
        return {k: v for k, v in self.networks().items() if k != "frozen"}

    epoch0_candidate = False  # before the first step the decoder is untrained: not a model to keep

    @property
    def selection_signal(self) -> str | None:  # type: ignore[override]
        return "val_auroc" if self.select == "validation" else None

    def kept_epoch(self, last: int) -> int:
        return int(self.best["epoch"]) if self.select == "validation" and self.best_weights else last

    def end_training(self) -> None:
        """Keep the last epoch (``select="last"``) or the best validation epoch's weights."""
        if self.select == "validation" and self.best_weights:
            for name, module in self._selected().items():
                module.load_state_dict(self.best_weights[name], strict=True)
        self.net.eval()

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "total_steps": self.total_steps,
            "best": dict(self.best),
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration, self.total_steps = int(state["iteration"]), int(state["total_steps"])
        self.best, self.best_weights = dict(state["best"]), state["best_weights"]

    # --- scoring -------------------------------------------------------------------------------------------
    def fit(self, loader: Iterable[dict]) -> None:
        """Nothing to build: ReContrast scores by reconstruction, without a memory of training features."""
        self.net.eval()

    def save_memory(self, directory: Path) -> None:
        """No memory (the networks hold everything)."""

    def load_memory(self, directory: Path) -> None:
        """No memory to read."""

    def predict(self, images: torch.Tensor) -> Prediction:
        targets, recons = self._outputs(images)
        maps = self.to_maps(self._raw_maps(targets, recons))
        return Prediction(scores=maps.reshape(len(maps), -1).max(1), maps=maps)
