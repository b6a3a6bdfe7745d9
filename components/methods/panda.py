"""PANDA (Reiss et al., CVPR 2021): adapt pretrained features with a compactness loss, without collapse.

- Feature f(x): the globally average-pooled last stage of the backbone.
- Compactness loss: mean over the batch of ||f(x) − c||² / d, with c the mean of the *initial*
  (pretrained) features of the training images, computed once and fixed.
- Only the last ``trainable_stages`` stages train; earlier stages stay frozen and every BatchNorm stays in
  eval mode (ImageNet running statistics). SGD (lr 1e-2, momentum 0.9, weight decay 5e-5) with
  gradient-norm clipping at 1e-3, as the official code.
- Against collapse, either early stopping or EWC (``ewc=True``): λ/2 · Σ F ⊙ (θ₀ − θ)² with a diagonal
  Fisher F. The paper's F comes from the ImageNet task; offline, F is read from ``fisher`` (a safetensors
  file in the backbone's parameter names) or estimated as the expected Fisher of the pretrained
  classifier's own predictive distribution on ``fisher_images`` available (training) images — a label is
  sampled from the model's softmax and the squared gradient of its log-likelihood is averaged. The run
  tags say which.
- Early stopping (deviation: the paper stops at a fixed epoch; we have no test labels): after every epoch
  the validation slice — held-out normal images and synthetic anomalies made from them — is scored by kNN
  against a fixed reference subset of the training images; the epoch with the best validation AUROC is
  kept (epoch 0 = the pretrained weights) and training stops after ``patience`` epochs without progress.
- Scoring: image score = sum of squared L2 distances to the k=2 nearest training images' adapted features
  (DN2 on adapted features); pixel maps SPADE-style on the adapted feature maps (see knn.DN2).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.backbones import BackboneError, classifier
from components.methods.base import EpochReport, Prediction, evaluating, pooled, train_with_frozen_batchnorm
from components.methods.knn import DN2
from components.metrics import validation_auroc


def frozen_end(extractor: nn.Module, trainable_stages: int) -> str:
    """The ``feature_info`` module ending the last frozen stage when the last ``trainable_stages`` train."""
    stages = [info["module"] for info in extractor.model.feature_info.info]
    if not 1 <= trainable_stages < len(stages):
        raise ValueError(f"panda trainable_stages={trainable_stages}: must be in 1..{len(stages) - 1}")
    return stages[-trainable_stages - 1]


def stage_boundary(extractor: nn.Module, trainable_stages: int) -> list[str]:
    """Names of the parameters of the last ``trainable_stages`` backbone stages (in forward order)."""
    model = extractor.model
    frozen_end_ = frozen_end(extractor, trainable_stages)
    names = [n for n, _ in model.named_parameters()]
    candidates = {frozen_end_, frozen_end_.replace(".", "_")}
    last_frozen = max(
        (i for i, n in enumerate(names) if any(n.startswith(c + ".") for c in candidates)), default=None
    )
    if last_frozen is None:
        raise BackboneError(
            f"panda: cannot locate stage module {frozen_end_!r} among the backbone's parameters"
        )
    return names[last_frozen + 1 :]


def _match(name: str, source: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """``source``'s tensor for a features_only parameter name (FeatureListNet writes ``a.b`` as ``a_b``)."""
    if name in source:
        return source[name]
    head, _, rest = name.partition(".")
    return source.get(f"{head.replace('_', '.')}.{rest}")


def _checked_auroc(labels: np.ndarray, scores: np.ndarray, name: str) -> float:
    """Validation AUROC (NaN for a diverged model); an error when the slice lacks a class."""
    if len(np.unique(labels)) < 2:
        raise ValueError(f"{name}: the validation slice needs normal images and synthetic anomalies")
    return validation_auroc(labels, scores)


class PANDA(DN2):
    """Compactness-loss fine-tuning with early stopping or EWC; DN2/SPADE scoring on adapted features."""

    name = "panda"
    default_levels = (1, 2, 3, 4)  # SPADE-style map stages ..., global (pooled) stage last

    def __init__(
        self,
        extractor,
        image_size,
        k: int = 2,
        gallery: int = 10,
        epochs: int = 15,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 5e-5,
        max_grad_norm: float | None = 1e-3,
        trainable_stages: int = 2,
        ewc: bool = False,
        ewc_lambda: float = 1e4,
        fisher: str = "estimate",
        fisher_images: int = 64,
        early_stopping: bool = True,
        patience: int = 3,
        reference_images: int = 64,
        cache_frozen: bool = True,
        **kwargs,
    ):
        super().__init__(extractor, image_size, k=k, gallery=gallery, **kwargs)
        if epochs < 0 or lr <= 0 or patience < 1 or reference_images < k or fisher_images < 1:
            raise ValueError(
                f"panda: need epochs >= 0, lr > 0, patience >= 1, reference_images >= k, fisher_images >= 1 "
                f"(got epochs={epochs}, lr={lr}, patience={patience}, reference_images={reference_images}, "
                f"fisher_images={fisher_images})"
            )
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.max_grad_norm = max_grad_norm
        self.ewc, self.ewc_lambda, self.fisher_source, self.fisher_images = (
            ewc,
            ewc_lambda,
            fisher,
            fisher_images,
        )
        self.early_stopping, self.patience, self.reference_images = early_stopping, patience, reference_images
        self.trainable_names = stage_boundary(extractor, trainable_stages)
        self.frozen_end, self.cache_frozen = frozen_end(extractor, trainable_stages), cache_frozen
        params = dict(extractor.model.named_parameters())
        for name, p in params.items():
            p.requires_grad_(name in self.trainable_names)
        self._params = {n: params[n] for n in self.trainable_names}
        # training state (checkpointed)
        self.center: torch.Tensor | None = None
        self.reference: torch.Tensor | None = None  # uint8 images of a fixed train subset
        self.theta0: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.best: dict[str, Any] = {"auroc": -1.0, "epoch": 0, "bad_epochs": 0}
        self.best_weights: dict[str, torch.Tensor] = {}

    # --- training protocol -----------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        if self.epochs == 0:
            return []
        return [{"params": list(self._params.values()), "lr": self.lr, "weight_decay": self.weight_decay}]

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.param_groups(), lr=self.lr, momentum=self.momentum)

    def train_mode(self) -> None:
        train_with_frozen_batchnorm(self.extractor)

    def _cache_frozen_stages(self) -> str:
        """Run the frozen stages once per image (exact: frozen, BatchNorm in eval, no augmentation)."""
        if not self.cache_frozen:
            return "off: cache_frozen=False"
        return self.extractor.cache_prefix(self.frozen_end)

    def begin_training(self, train: Iterable[dict], validation: Iterable[dict]) -> dict[str, str]:
        prefix_cache = self._cache_frozen_stages()
        feats, reference = [], []
        kept = 0
        for batch in train:
            feats.append(self.monitor_features(batch["image"]).cpu())
            if kept < self.reference_images:
                take = batch["image"][: self.reference_images - kept]
                reference.append(take.cpu())
                kept += len(take)
        self.center = torch.cat(feats).mean(0)
        self.reference = torch.cat(reference)
        self.theta0 = {n: p.detach().cpu().clone() for n, p in self._params.items()}
        tags = {
            "panda.center_images": str(sum(len(f) for f in feats)),
            "panda.regulariser": "+".join(
                name for name, on in (("ewc", self.ewc), ("early_stopping", self.early_stopping)) if on
            )
            or f"fixed_epochs:{self.epochs}",
            "panda.prefix_cache": prefix_cache,
        }
        if self.ewc:
            self.fisher, how = self._load_or_estimate_fisher(train)
            tags["panda.fisher"] = how
        auroc = self.validation_auroc(validation)
        self.best = {"auroc": auroc, "epoch": 0, "bad_epochs": 0}
        self.best_weights = {n: t.clone() for n, t in self.theta0.items()}
        self.pretrained_signal = auroc
        tags["panda.val_auroc_pretrained"] = f"{auroc:.4f}"
        return tags

    def _load_or_estimate_fisher(self, train: Iterable[dict]) -> tuple[dict[str, torch.Tensor], str]:
        if self.fisher_source != "estimate":
            from safetensors.torch import load_file

            path = Path(self.fisher_source)
            if not path.is_file():
                raise ValueError(f"panda fisher={self.fisher_source}: file not found")
            source = load_file(str(path))
            fisher = {n: _match(n, source) for n in self.trainable_names}
            missing = [n for n, f in fisher.items() if f is None or f.shape != self._params[n].shape]
            if missing:
                raise ValueError(f"panda fisher={path}: no tensor of the right shape for {missing[:3]}")
            return {n: f.float() for n, f in fisher.items()}, f"file:{path}"
        return self.estimate_fisher(train), f"estimated:pretrained-predictive:{self.fisher_images}-images"

    def estimate_fisher(self, train: Iterable[dict]) -> dict[str, torch.Tensor]:
        """Expected diagonal Fisher of the pretrained classifier's own predictive distribution."""
        assert self.spec is not None, "estimate_fisher needs the MethodSpec (build_method)"
        model, mean, std = classifier(self.spec.backbone, self.spec.weights)
        model = model.to(self.device).eval()
        mean, std = mean.to(self.device), std.to(self.device)
        source = dict(model.named_parameters())
        targets = {n: _match(n, source) for n in self.trainable_names}
        if any(t is None for t in targets.values()):
            raise BackboneError(
                f"panda: classifier parameters do not match the backbone's ({self.spec.backbone})"
            )
        fisher = {n: torch.zeros_like(t) for n, t in targets.items()}
        generator = torch.Generator().manual_seed(0)
        seen = 0
        for batch in train:
            for image in batch["image"]:
                if seen >= self.fisher_images:
                    break
                x = (image[None].to(self.device).float() / 255.0 - mean) / std
                log_p = torch.log_softmax(model(x), dim=1)[0]
                y = torch.multinomial(log_p.detach().exp().cpu(), 1, generator=generator).item()
                model.zero_grad(set_to_none=True)
                log_p[y].backward()
                for n, t in targets.items():
                    fisher[n] += t.grad.detach() ** 2
                seen += 1
            if seen >= self.fisher_images:
                break
        return {n: (f / max(seen, 1)).cpu() for n, f in fisher.items()}

    def training_loss(self, batch: dict, model: nn.Module) -> torch.Tensor:
        assert self.center is not None, "begin_training() first"
        f = pooled(model(batch["image"].to(self.device))[-1]).float()
        center = self.center.to(f.device)
        loss = ((f - center) ** 2).sum(1).mean() / f.shape[1]
        if self.ewc:
            penalty = sum(
                (self.fisher[n].to(p.device) * (self.theta0[n].to(p.device) - p) ** 2).sum()
                for n, p in self._params.items()
            )
            loss = loss + self.ewc_lambda / 2 * penalty
        return loss

    def validation_auroc(self, validation: Iterable[dict]) -> float:
        """AUROC of synthetic anomalies vs held-out normal images, kNN to the reference train subset."""
        assert self.reference is not None
        ref = torch.cat([self.monitor_features(chunk) for chunk in self.reference.split(32)])
        scores, labels = [], []
        for batch in validation:
            d2 = torch.cdist(self.monitor_features(batch["image"]), ref).pow(2)
            scores.append(d2.topk(self.k, largest=False).values.sum(1).cpu())
            labels.append(torch.as_tensor(batch["label"]))
        return _checked_auroc(torch.cat(labels).numpy(), torch.cat(scores).numpy(), self.name)

    def end_epoch(self, epoch: int, validation: Iterable[dict]) -> EpochReport:
        auroc = self.validation_auroc(validation)
        drift = sum(((p.detach().cpu() - self.theta0[n]) ** 2).sum() for n, p in self._params.items())
        if auroc > self.best["auroc"]:
            self.best = {"auroc": auroc, "epoch": epoch, "bad_epochs": 0}
            self.best_weights = {n: p.detach().cpu().clone() for n, p in self._params.items()}
        else:
            self.best["bad_epochs"] += 1
        stop = self.early_stopping and self.best["bad_epochs"] >= self.patience
        metrics = {
            "val_auroc": auroc,
            "best_val_auroc": self.best["auroc"],
            "best_epoch": float(self.best["epoch"]),
            "weight_drift": float(drift) ** 0.5,
        }
        return EpochReport(metrics=metrics, stop=stop)

    selection_signal = "val_auroc"

    def kept_epoch(self, last: int) -> int:
        return int(self.best["epoch"]) if self.early_stopping and self.best_weights else last

    def end_training(self) -> None:
        """Keep the selected epoch's weights (early stopping) or the last ones (EWC without stopping)."""
        if self.early_stopping and self.best_weights:
            with torch.no_grad():
                for n, p in self._params.items():
                    p.copy_(self.best_weights[n].to(p.device))
        self.extractor.drop_prefix_cache()
        self.extractor.eval()

    def state_dict(self) -> dict[str, Any]:
        return {
            "center": self.center,
            "reference": self.reference,
            "theta0": self.theta0,
            "fisher": self.fisher,
            "best": dict(self.best),
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._cache_frozen_stages()
        self.center, self.reference = state["center"], state["reference"]
        self.theta0, self.fisher = state["theta0"], state["fisher"]
        self.best, self.best_weights = dict(state["best"]), state["best_weights"]


class _ScoredBackbone(nn.Module):
    """Backbone + a 1-unit head on its pooled last stage: one forward gives the outlier-exposure logit."""

    def __init__(self, extractor: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.extractor, self.head = extractor, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(pooled(self.extractor(images)[-1]).float())[:, 0]


HEAD_INITS = ("probe", "random")


class PANDAOE(PANDA):
    """PANDA with outlier exposure: a 1-unit head, BCE of normal (0) vs outlier (1) images.

    The outlier set is a folder of images (``outliers``, any layout: it is searched recursively) — the
    paper uses ImageNet-30 / 80M Tiny Images; here any images unlike the normal class, e.g. other
    categories. Each step feeds the normal batch and as many outlier images through the backbone at once.
    The official code (talreiss/PANDA ``outlier_exposure.py``): SGD lr 1e-2, momentum 0.9, gradient norm
    clipped to 1e-3, BatchNorm in eval, the last two stages + a new head train, 75 epochs. Image score =
    the head's logit (monotone in the paper's sigmoid(logit), without float saturation ties); pixel maps
    SPADE-style on the adapted features (not in the paper). Deviations, each a knob:

    - ``head_init="probe"``: the head starts as a logistic regression of the frozen pooled features (the
      fit split's normal images vs as many outliers), then fine-tunes with the backbone (linear probing,
      then fine-tuning). The official head starts random and moves through 75 epochs of clipped steps
      (≈ 11 700 on a CIFAR-10 class); the CPU budget's few hundred clipped steps leave a random head where
      it started (measured: validation AUROC 0.38 after 2 epochs). ``"random"``: the official start.
    - Early stopping (as PANDA's): the epoch whose head AUROC of synthetic anomalies vs held-out normal
      images is best is kept; ``early_stopping=False`` keeps the last epoch, as the paper.
    """

    name = "panda_oe"
    probe_outliers = 1024  # outlier images the probe head is fitted on (decoding them is its cost)

    def __init__(
        self,
        extractor,
        image_size,
        outliers: str | None = None,
        epochs: int = 75,
        lr: float = 1e-2,
        max_grad_norm: float | None = 1e-3,
        early_stopping: bool = True,
        head_init: str = "probe",
        seed: int = 0,
        **kwargs,
    ):
        if head_init not in HEAD_INITS:
            raise ValueError(f"panda_oe head_init={head_init!r}: must be one of {', '.join(HEAD_INITS)}")
        if kwargs.get("ewc"):
            raise ValueError("panda_oe ewc=True: outlier exposure is regularised by its outliers, not EWC")
        if epochs > 0 and not outliers:
            raise ValueError("panda_oe outliers: set it to a folder of outlier images (or epochs=0)")
        super().__init__(
            extractor,
            image_size,
            epochs=epochs,
            lr=lr,
            max_grad_norm=max_grad_norm,
            early_stopping=early_stopping,
            **kwargs,
        )
        self.outliers, self.seed, self.head_init = outliers, seed, head_init
        self.head = nn.Linear(extractor.channels[-1], 1).to(self.device)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self._params |= {f"head.{n}": p for n, p in self.head.named_parameters()}
        self._scored = _ScoredBackbone(extractor, self.head)
        self._outlier_batches: Iterator[dict] | None = None
        self.outlier_count = 0

    def trainable(self) -> nn.Module:
        return self._scored

    def networks(self) -> dict[str, nn.Module]:
        return super().networks() | {"head": self.head}

    def _outlier_stream(self) -> Iterator[dict]:
        """Endless shuffled batches of outlier images (seeded: the same order on every run)."""
        from components.data import ImageDataset, scan_image_folder

        samples = scan_image_folder(self.outliers, "panda_oe outliers")
        self.outlier_count = len(samples)
        generator = torch.Generator().manual_seed(self.seed)
        data = ImageDataset(samples, self.image_size)
        while True:
            yield from torch.utils.data.DataLoader(
                data, batch_size=32, shuffle=True, generator=generator, drop_last=False
            )

    def _take_outliers(self, n: int) -> torch.Tensor:
        assert self._outlier_batches is not None, "begin_training() first"
        out, have = [], 0
        while have < n:
            images = next(self._outlier_batches)["image"][: n - have]
            out.append(images)
            have += len(images)
        return torch.cat(out)

    def begin_training(self, train: Iterable[dict], validation: Iterable[dict]) -> dict[str, str]:
        prefix_cache = self._cache_frozen_stages()
        self._outlier_batches = self._outlier_stream()
        self._take_outliers(1)  # fail now on a bad folder, not in the first step
        probe = self._probe_head(train) if self.head_init == "probe" else None
        self.theta0 = {n: p.detach().cpu().clone() for n, p in self._params.items()}
        auroc = self.validation_auroc(validation)
        self.best = {"auroc": auroc, "epoch": 0, "bad_epochs": 0}
        self.best_weights = {n: t.clone() for n, t in self.theta0.items()}
        self.pretrained_signal = auroc
        return {
            "panda_oe.outliers": f"{self.outliers} ({self.outlier_count} images)",
            "panda.regulariser": "outlier_exposure",
            "panda.val_auroc_pretrained": f"{auroc:.4f}",
            "panda.prefix_cache": prefix_cache,
            "panda_oe.head_init": self.head_init if probe is None else f"probe (train accuracy {probe:.3f})",
        }

    @torch.no_grad()
    def _probe_head(self, train: Iterable[dict]) -> float:
        """Set the head to a logistic regression of the frozen pooled features: the fit split's normal
        images (0) vs up to ``probe_outliers`` outliers (1, as many as normal images if fewer; classes
        weighted equally), drawn from a fresh seeded stream (the training stream is left as it was).
        Returns the probe's training accuracy."""
        from sklearn.linear_model import LogisticRegression

        normal = torch.cat([self.monitor_features(b["image"]).cpu() for b in train])
        stream, self._outlier_batches = self._outlier_batches, self._outlier_stream()
        try:
            outliers = torch.cat(
                [
                    self.monitor_features(chunk).cpu()
                    for chunk in self._take_outliers(min(len(normal), self.probe_outliers)).split(64)
                ]
            )
        finally:
            self._outlier_batches = stream
        x = torch.cat([normal, outliers]).double().numpy()
        y = np.r_[np.zeros(len(normal)), np.ones(len(outliers))]
        mean, std = x.mean(0), x.std(0) + 1e-6
        probe = LogisticRegression(max_iter=2000, class_weight="balanced").fit((x - mean) / std, y)
        w = probe.coef_[0] / std  # the standardisation folded into the head
        b = probe.intercept_[0] - float(w @ mean)
        self.head.weight.copy_(torch.as_tensor(w, dtype=self.head.weight.dtype)[None])
        self.head.bias.fill_(b)
        return float(probe.score((x - mean) / std, y))

    def training_loss(self, batch: dict, model: nn.Module) -> torch.Tensor:
        normal = batch["image"]
        images = torch.cat([normal, self._take_outliers(len(normal))]).to(self.device)
        target = torch.cat([torch.zeros(len(normal)), torch.ones(len(images) - len(normal))]).to(self.device)
        return nn.functional.binary_cross_entropy_with_logits(model(images), target)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with evaluating(self._scored):
            return self._scored(images.to(self.device)).float().cpu()

    def validation_auroc(self, validation: Iterable[dict]) -> float:
        scores, labels = [], []
        for batch in validation:
            scores.append(self.logits(batch["image"]))
            labels.append(torch.as_tensor(batch["label"]))
        return _checked_auroc(torch.cat(labels).numpy(), torch.cat(scores).numpy(), self.name)

    def predict(self, images: torch.Tensor) -> Prediction:
        assert self.bank is not None, "fit() first"
        feats = self.features(images)
        g = pooled(feats[-1]).float()
        _, ids = self.bank.search(g.cpu().numpy(), self.gallery)
        with torch.inference_mode():
            scores = self.head(g)[:, 0].float().cpu().numpy()
        return Prediction(scores=scores.astype(np.float32), maps=self.gallery_maps(feats, ids))

    def state_dict(self) -> dict[str, Any]:
        return {"theta0": self.theta0, "best": dict(self.best), "best_weights": self.best_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._cache_frozen_stages()
        self.theta0, self.best = state["theta0"], dict(state["best"])
        self.best_weights = state["best_weights"]
        self._outlier_batches = self._outlier_stream()
