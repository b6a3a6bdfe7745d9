"""Topology-preserving transfer learning (TPTL; Pattern Recognition Letters 170, 2023).

The method as the paper defines it:

- Weakly-supervised fine-tuning of an ImageNet classifier (WideResNet-50-2) on a target dataset whose
  only labels are its categories (e.g. BTAD's 3 products, CIFAR's classes): the classifier is extended
  from the ImageNet classes to ImageNet + target classes; the old ImageNet rows are frozen, the new rows
  train, and the loss is the cross-entropy of each target image against its own (new) class.
- Against feature-space collapse, a topology loss on a batch of anchor images from the source domain
  (5 herding-selected ImageNet images per class, iCaRL herding): with F the penultimate (pre-logits)
  features of the anchors, G = F Fᵀ from the frozen pretrained reference model and from the current
  model, loss = mean over rows i of (1 − Pearson(G_ref[i], G_cur[i])). Total = CE + λ·topology, λ = 1.
- SGD lr 5e-6, momentum 0.9, weight decay 5e-4, 50 epochs, batch 32, every BatchNorm frozen.
- Detection and segmentation SPADE-style: retrieve the k = 5 nearest train images on pooled features;
  per pixel the minimum L2 distance to all feature locations of those neighbours on three mid-level
  stages; upsample, average, Gaussian blur σ = 4; image score = the map's maximum.

How it is realised here, and every deviation (each one a knob where it can be one):

- One training job per dataset (``scope = "dataset"``); the class list is the sorted set of categories
  the training loader yields (``begin_training``), each rank sees the same one.
- The trainable network is timm's full classifier with the same weights source as the backbone
  (:func:`~components.backbones.create_model`, ``features_only=False``); its ImageNet rows are moved into
  frozen buffers of :class:`ExtendedHead`, next to ``len(classes)`` trainable rows. The features_only
  extractor that scoring uses *shares* the classifier's trunk: its parameters and buffers are tied by name
  (:func:`~components.methods.panda._match`) to the very tensors that train, so checkpoints of
  ``networks()["backbone"]`` are always current. What only the classifier has (EfficientNet's
  ``conv_head``/``bn2``, blocks past the extractor's last level) and the new rows are the network
  ``"head"`` (present once the classifier is built, i.e. after ``begin_training`` or ``load_state_dict``);
  a fresh method for scoring declares and needs only ``"backbone"``.
- Offline, the backbone is EfficientNet-Lite / MobileNetV2 (no WRN weights here); penultimate features
  are timm's pre-logits (after ``conv_head``/``bn2`` and global pooling for EfficientNet).
- The classifier (``classifier``): ``"cosine"`` (default) is the official code's split cosine classifier
  (LUCIR's ``SplitCosineLinear``, ``sigma=False``): logits are cosines of the penultimate feature and
  each row, without scale or bias; the old rows are the ImageNet weights, frozen. ``"linear"`` is the
  paper's text: a linear layer whose ImageNet rows keep their bias.
- Rehearsal (``rehearsal``, default on, as the official code): anchor images also enter the
  cross-entropy, labelled with their source class. The official code appends all anchors to the shuffled
  training set; here the step's anchors (those the topology loss sees) join the step's CE batch (a
  deviation in how often each anchor is rehearsed). Without ImageNet labels offline, an anchor's source
  class is the pretrained classifier's top class. Only folder anchors are rehearsed: the fallback's
  anchors are target images, which carry their own category (tag ``topology.rehearsal``).
- Initialisation of the new rows (the paper does not say): ``new_rows="random"`` (default) is the
  layer's own initialisation (cosine: LUCIR's uniform ±1/√D, as the official code; linear: torch's
  default); ``"imprint"`` sets row c to the unit mean pretrained penultimate feature of class c (cosine:
  the mean of the unit features, LUCIR's imprinting; linear: scaled so that its mean logit on class c's
  images equals their mean top ImageNet logit, bias 0 — a calibrated imprinting: the target class starts
  on a par with the best ImageNet class; imprinting at the ImageNet rows' norm would start at CE ≈ 0 and
  leave the weak supervision nothing to do). ``head_lr`` (default: ``lr``, as the paper) may give the
  new rows their own learning rate.
- Anchors: ``anchors`` names a folder of source-domain images whose sub-folders are classes
  (:func:`~components.data.scan_image_folder`, e.g. an ImageNet subset); ``anchors_per_class`` (5)
  images per class are chosen by :func:`herding` on the L2-normalised pretrained penultimate features.
  They are kept as paths and decoded when drawn. Without a folder (no ImageNet offline) the fallback is
  ``anchors_per_class`` herding-selected *target training images* per target category, kept as uint8
  images: the loss then preserves the pretrained relational structure among target images instead of
  source images (a deviation; the run tag ``topology.anchors`` says which).
- One forward of the trainable network per step: the target batch and ``anchor_batch`` (32) anchors,
  drawn without replacement deterministically from (``seed``, step number; the same on every DDP
  rank), go through it as one batch (all anchors when there are fewer). The reference model is a
  frozen copy (``requires_grad`` False, eval mode) of the classifier as built from the weights source
  (rebuilt, never stored); since it never changes, its penultimate features of the anchors are
  computed once (``begin_training`` / ``load_state_dict``) and indexed.
- ``trainable_stages`` (default None: every stage, as the paper) may freeze the early backbone stages
  (:func:`~components.methods.panda.stage_boundary`); the head part always trains. Every BatchNorm stays
  in eval mode (``freeze_batchnorm``, default True, as the paper); its affine parameters train.
- The training batch size (paper: 32) is the training loop's ``train.batch_size``, not a knob here.
- No early stopping (the paper trains a fixed number of epochs); each epoch reports the mean CE and
  topology loss and, on the held-out normal images, the classification CE and accuracy.
- Scoring (:class:`~components.methods.knn.DN2`'s alignment): levels = map stages, then the pooled stage
  last (default (1, 2, 3) + 4: reductions 4, 8, 16 and 32); retrieval uses the pooled last *backbone*
  stage — for EfficientNet that is before ``conv_head``, not the classifier's penultimate feature (for a
  ResNet the two coincide). ``k`` (5) neighbours are retrieved and are the gallery; the image score is the
  maximum of the blurred map.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.backbones import BackboneError, create_model
from components.data import ImageDataset, Sample, scan_image_folder
from components.methods.base import EpochReport, Prediction, evaluating, train_with_frozen_batchnorm
from components.methods.knn import DN2
from components.methods.panda import _match, stage_boundary

NEW_ROWS = ("imprint", "random")
CLASSIFIERS = ("cosine", "linear")


def herding(features: torch.Tensor, m: int) -> list[int]:
    """iCaRL herding: ``m`` row indices (in selection order) whose running mean best approximates the mean.

    Rows are L2-normalised first; at step k the row x minimising ‖μ − (φ(x) + Σ_{j<k} φ(p_j)) / k‖ is
    picked among those not yet picked. Returns every row when ``m`` exceeds their number.
    """
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"herding: need a non-empty (n, D) matrix, got shape {tuple(features.shape)}")
    phi = F.normalize(features.detach().double().cpu(), dim=1)
    mu = phi.mean(0)
    running = torch.zeros_like(mu)
    free = torch.ones(len(phi), dtype=torch.bool)
    chosen: list[int] = []
    for k in range(1, min(m, len(phi)) + 1):
        dist = (mu[None] - (running[None] + phi) / k).norm(dim=1)
        dist[~free] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        free[i] = False
        running += phi[i]
    return chosen


def topology_loss(reference: torch.Tensor, current: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over rows i of 1 − Pearson(G_ref[i], G_cur[i]), with G = F Fᵀ of (n, D) features (n >= 2)."""
    if reference.shape != current.shape or reference.ndim != 2 or len(reference) < 2:
        raise ValueError(
            f"topology_loss: need two (n>=2, D) feature matrices of one shape, got "
            f"{tuple(reference.shape)} and {tuple(current.shape)}"
        )
    g_ref = reference.float() @ reference.float().T
    g_cur = current.float() @ current.float().T
    g_ref = g_ref - g_ref.mean(1, keepdim=True)
    g_cur = g_cur - g_cur.mean(1, keepdim=True)
    return (1 - F.cosine_similarity(g_ref, g_cur, dim=1, eps=eps)).mean()


class ExtendedHead(nn.Module):
    """Logits over the ImageNet classes (frozen rows, buffers) followed by trainable target-class rows.

    ``cosine`` (the official code: LUCIR's ``SplitCosineLinear`` with ``sigma=False``): every logit is the
    cosine of the feature and its row, without scale or bias; the new rows start uniform in ±1/√D. Else a
    linear layer (the paper's text): the old rows keep their bias, the new rows torch's default init.
    """

    def __init__(self, old_weight: torch.Tensor, old_bias: torch.Tensor, n_new: int, cosine: bool = False):
        super().__init__()
        self.cosine = cosine
        self.register_buffer("old_weight", old_weight.detach().clone())
        self.register_buffer("old_bias", old_bias.detach().clone())
        init = nn.Linear(old_weight.shape[1], n_new, device=old_weight.device)  # torch's default init
        if cosine:
            bound = 1.0 / np.sqrt(old_weight.shape[1])
            self.new_weight = nn.Parameter(torch.empty_like(init.weight).uniform_(-bound, bound))
            self.new_bias = None
        else:
            self.new_weight = nn.Parameter(init.weight.detach().to(old_weight.dtype))
            self.new_bias = nn.Parameter(init.bias.detach().to(old_weight.dtype))

    @property
    def n_old(self) -> int:
        return len(self.old_weight)

    def rows(self) -> list[nn.Parameter]:
        """The trainable (new) rows."""
        return [self.new_weight] if self.new_bias is None else [self.new_weight, self.new_bias]

    def old_logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.cosine:
            return F.linear(F.normalize(features, dim=1), F.normalize(self.old_weight, dim=1))
        return F.linear(features, self.old_weight, self.old_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.cosine:
            new = F.linear(F.normalize(features, dim=1), F.normalize(self.new_weight, dim=1))
        else:
            new = F.linear(features, self.new_weight, self.new_bias)
        return torch.cat([self.old_logits(features), new], dim=1)


class TPTLNet(nn.Module):
    """The trainable network: uint8 images → (logits over ImageNet + target classes, penultimate features)."""

    def __init__(self, body: nn.Module, head: ExtendedHead, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.body, self.head = body, head  # body: timm classifier whose own classifier is Identity
        self.register_buffer("mean", mean.clone(), persistent=False)
        self.register_buffer("std", std.clone(), persistent=False)

    def penultimate(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        return self.body((x - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.penultimate(images)
        return self.head(features), features


class SharedTensors(nn.Module):
    """Holds (not copies) given parameters, buffers and modules under flat names, for saving/loading."""

    def __init__(
        self, params: dict[str, nn.Parameter], buffers: dict[str, torch.Tensor], modules: dict[str, nn.Module]
    ) -> None:
        super().__init__()
        for name, p in params.items():
            self.register_parameter(name.replace(".", "__"), p)
        for name, b in buffers.items():
            self.register_buffer(name.replace(".", "__"), b)
        for name, m in modules.items():
            self.add_module(name, m)


def _owner(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = dotted.rpartition(".")
    return (root.get_submodule(prefix) if prefix else root), leaf


def _bad(knob: str, value: Any, why: str) -> ValueError:
    return ValueError(f"topology {knob}={value!r}: {why}")


class Topology(DN2):
    """Weakly-supervised fine-tuning over a dataset's categories with a topology-preserving loss."""

    name = "topology"
    scope = "dataset"
    default_levels = (1, 2, 3, 4)  # three mid-level map stages, then the pooled (retrieval) stage

    def __init__(
        self,
        extractor,
        image_size,
        k: int = 5,
        epochs: int = 50,
        lr: float = 5e-6,
        head_lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lam: float = 1.0,
        anchors: str | None = None,
        anchors_per_class: int = 5,
        anchor_batch: int = 32,
        trainable_stages: int | None = None,
        freeze_batchnorm: bool = True,
        new_rows: str = "random",
        classifier: str = "cosine",
        rehearsal: bool = True,
        seed: int = 0,
        **kwargs,
    ):
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: Any) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and np.isfinite(x)

        checks = [
            ("k", k, is_int(k) and k >= 1, "must be an int >= 1"),
            ("epochs", epochs, is_int(epochs) and epochs >= 0, "must be an int >= 0"),
            ("lr", lr, is_num(lr) and lr > 0, "must be a number > 0"),
            ("head_lr", head_lr, head_lr is None or (is_num(head_lr) and head_lr > 0), "must be > 0 or null"),
            ("momentum", momentum, is_num(momentum) and 0 <= momentum < 1, "must be in [0, 1)"),
            ("weight_decay", weight_decay, is_num(weight_decay) and weight_decay >= 0, "must be >= 0"),
            ("lam", lam, is_num(lam) and lam >= 0, "must be a number >= 0"),
            ("anchors_per_class", anchors_per_class, is_int(anchors_per_class) and anchors_per_class >= 1,
             "must be an int >= 1"),
            ("anchor_batch", anchor_batch, is_int(anchor_batch) and anchor_batch >= 3, "must be an int >= 3"),
            ("freeze_batchnorm", freeze_batchnorm, isinstance(freeze_batchnorm, bool), "must be a bool"),
            ("new_rows", new_rows, new_rows in NEW_ROWS, f"must be one of {', '.join(NEW_ROWS)}"),
            ("classifier", classifier, classifier in CLASSIFIERS, f"must be one of {', '.join(CLASSIFIERS)}"),
            ("rehearsal", rehearsal, isinstance(rehearsal, bool), "must be a bool"),
            ("seed", seed, is_int(seed), "must be an int"),
        ]  # fmt: skip
        for knob, value, ok, why in checks:
            if not ok:
                raise _bad(knob, value, why)
        # the folder itself is checked where it is read (begin_training; flows check params up front):
        # a saved model must load where the anchor folder does not exist
        if anchors is not None and not isinstance(anchors, str):
            raise _bad("anchors", anchors, "a folder path (sub-folders = classes) — or leave it unset")
        n_stages = len(extractor.model.feature_info.info)
        stages_ok = is_int(trainable_stages) and 1 <= trainable_stages < n_stages
        if trainable_stages is not None and not stages_ok:
            raise _bad("trainable_stages", trainable_stages, f"must be in 1..{n_stages - 1} or null (all)")
        super().__init__(extractor, image_size, k=k, **kwargs)
        self.epochs, self.lr, self.head_lr, self.momentum = epochs, lr, head_lr, momentum
        self.weight_decay, self.lam, self.new_rows, self.seed = weight_decay, lam, new_rows, seed
        self.anchors, self.anchors_per_class, self.anchor_batch = anchors, anchors_per_class, anchor_batch
        self.trainable_stages, self.freeze_batchnorm = trainable_stages, freeze_batchnorm
        self.classifier, self.rehearsal = classifier, rehearsal
        # built by begin_training / load_state_dict
        self.net: TPTLNet | None = None
        self.reference: nn.Module | None = None  # frozen pretrained body (penultimate features)
        self._head: SharedTensors | None = None  # what only the classifier has + the new rows
        self.classes: list[str] = []
        self.anchor_images = torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)  # fallback
        self.anchor_paths: list[str] = []  # folder anchors
        self.anchor_reference: torch.Tensor | None = None  # (n_anchors, D) reference features
        self.anchor_labels: torch.Tensor | None = None  # rehearsal: the pretrained classifier's class
        self.steps_done = 0
        self._sums = {"ce": 0.0, "topology": 0.0, "steps": 0}

    # --- building the classifier and tying the extractor to it ------------------------------------
    @property
    def trains(self) -> bool:
        return self.epochs > 0

    def _build(self, n_classes: int) -> None:
        """The classifier from the weights source, its head, the tie to the extractor, the reference."""
        fx = self.extractor
        body = create_model(fx.name, fx.weights, features_only=False).to(self.device)
        linear = body.get_classifier()
        if not isinstance(linear, nn.Linear):
            raise BackboneError(f"topology: {fx.name}'s classifier is {type(linear).__name__}, not a Linear")
        bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        old_weight, old_bias = linear.weight.detach().clone(), bias.detach().clone().to(self.device)
        body.reset_classifier(0)  # body(x) = pre-logits features
        self.reference = copy.deepcopy(body).eval().requires_grad_(False)
        head = ExtendedHead(old_weight, old_bias, n_classes, cosine=self.classifier == "cosine")
        self.net = TPTLNet(body, head, fx.mean, fx.std).to(self.device)
        tied = self._tie()
        rest_p = {n: p for n, p in body.named_parameters() if id(p) not in tied}
        rest_b = {n: b for n, b in body.named_buffers() if id(b) not in tied}
        self._head = SharedTensors(rest_p, rest_b, {"rows": head})
        body.requires_grad_(True)
        if self.trainable_stages is not None:
            train_names = set(stage_boundary(fx, self.trainable_stages))
            for n, p in fx.model.named_parameters():
                p.requires_grad_(n in train_names)

    def _tie(self) -> set[int]:
        """Point every extractor parameter/buffer at the classifier's tensor of the same name; their ids."""
        assert self.net is not None
        body = self.net.body
        tied: set[int] = set()
        for kind, source, named in (
            ("_parameters", dict(body.named_parameters()), self.extractor.model.named_parameters),
            ("_buffers", dict(body.named_buffers()), self.extractor.model.named_buffers),
        ):
            for name, own in list(named()):
                shared = _match(name, source)
                if shared is None or shared.shape != own.shape:
                    raise BackboneError(f"topology: the classifier has no tensor {name} {tuple(own.shape)}")
                module, leaf = _owner(self.extractor.model, name)
                getattr(module, kind)[leaf] = shared
                tied.add(id(shared))
        return tied

    def tied(self) -> bool:
        """Whether every extractor parameter is the classifier's tensor (not a copy)."""
        if self.net is None:
            return False
        source = dict(self.net.body.named_parameters())
        return all(_match(n, source) is p for n, p in self.extractor.model.named_parameters())

    def _require_built(self) -> TPTLNet:
        if self.net is None:
            raise RuntimeError("topology: call begin_training() or load_state_dict() first")
        return self.net

    # --- training protocol ---------------------------------------------------------------------------
    def trainable(self) -> nn.Module:
        return self._require_built()

    def networks(self) -> dict[str, nn.Module]:
        nets: dict[str, nn.Module] = {"backbone": self.extractor.model}
        if self._head is not None:
            nets["head"] = self._head
        return nets

    def param_groups(self) -> list[dict[str, Any]]:
        if self.net is None or self.epochs == 0:
            return []
        trunk = [p for p in self.net.body.parameters() if p.requires_grad]
        rows = self.net.head.rows()
        return [
            {"params": trunk, "lr": self.lr, "weight_decay": self.weight_decay},
            {"params": rows, "lr": self.head_lr or self.lr, "weight_decay": self.weight_decay},
        ]

    def make_optimizer(self) -> torch.optim.Optimizer:
        self._require_built()
        return torch.optim.SGD(self.param_groups(), lr=self.lr, momentum=self.momentum)

    def train_mode(self) -> None:
        net = self._require_built()
        if self.freeze_batchnorm:
            train_with_frozen_batchnorm(net)
        else:
            net.train()
        if self.reference is not None:
            self.reference.eval()

    @torch.no_grad()
    def _reference_features(self, images: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        assert self.reference is not None and self.net is not None
        out = []
        for part in images.split(chunk):
            x = self.extractor.normalize(part.to(self.device))
            out.append(self.reference(x).float())
        return torch.cat(out)

    def begin_training(self, train: Iterable[dict], validation: Iterable[dict]) -> dict[str, str]:
        self._build(1)  # the body first: its pretrained features give the class rows and the anchors
        feats, cats = [], []
        for batch in train:
            feats.append(self._reference_features(batch["image"]).cpu())
            cats.extend(batch["category"])
        if not cats:
            raise ValueError("topology: the training loader yields no images")
        classes = sorted(set(cats))
        features, labels = torch.cat(feats), torch.tensor([classes.index(c) for c in cats])
        self._set_classes(classes)
        if self.new_rows == "imprint":
            self._imprint(features, labels)
        if self.anchors is None:
            positions = []
            for c in range(len(classes)):
                members = torch.nonzero(labels == c)[:, 0]
                positions += members[herding(features[members], self.anchors_per_class)].tolist()
            positions.sort()
            self.anchor_images, self.anchor_paths = self._gather(train, positions), []
            how = f"train-fallback:{len(positions)}"
        else:
            self.anchor_paths = self._herd_folder(self.anchors)
            self.anchor_images = self.anchor_images[:0]
            how = f"folder:{self.anchors}:{len(self.anchor_paths)}"
        if self.n_anchors < 3:
            raise ValueError(f"topology: {self.n_anchors} anchor images; the topology loss needs at least 3")
        self.anchor_reference = self._anchor_reference()
        self.anchor_labels = self._anchor_labels()
        with torch.no_grad():
            logits = self.net.head(features.to(self.device))
            ce0 = F.cross_entropy(logits, labels.to(self.device) + self.net.head.n_old)
        return {
            "topology.classes": ",".join(classes),
            "topology.anchors": how,
            "topology.new_rows": self.new_rows,
            "topology.classifier": self.classifier,
            "topology.rehearsal": "on" if self.anchor_labels is not None else "off",
            "topology.ce_pretrained": f"{float(ce0):.4f}",
        }

    def _set_classes(self, classes: Sequence[str]) -> None:
        """(Re)build the head with one new row per class (the body is kept)."""
        assert self.net is not None and self._head is not None
        old = self.net.head
        head = ExtendedHead(old.old_weight, old.old_bias, len(classes), old.cosine).to(self.device)
        self.net.head = head
        self._head.rows = head
        self.classes = list(classes)
        self._class_index = {c: i for i, c in enumerate(self.classes)}

    @torch.no_grad()
    def _imprint(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        assert self.net is not None
        head = self.net.head
        for c in range(len(self.classes)):
            f = features[labels == c].to(head.new_weight)
            if head.cosine:  # a cosine row has no scale: the class's mean unit feature (LUCIR's imprint)
                head.new_weight[c] = F.normalize(F.normalize(f, dim=1).mean(0), dim=0)
                continue
            direction = F.normalize(f.mean(0), dim=0)
            top = F.linear(f, head.old_weight, head.old_bias).max(1).values.mean()
            head.new_weight[c] = direction * (top / (f @ direction).mean()).clamp(min=0)
        if head.new_bias is not None:
            head.new_bias.zero_()

    @staticmethod
    def _gather(loader: Iterable[dict], positions: Sequence[int]) -> torch.Tensor:
        """uint8 images at ``positions`` (sorted) of the (unshuffled) loader's images."""
        wanted, out, seen = set(positions), [], 0
        for batch in loader:
            images = batch["image"]
            out.extend(images[i - seen].clone() for i in range(seen, seen + len(images)) if i in wanted)
            seen += len(images)
        if len(out) != len(positions):
            raise ValueError("topology: the training loader changed between two passes (is it shuffled?)")
        return torch.stack(out)

    def _folder_dataset(self, paths: Sequence[str]) -> ImageDataset:
        return ImageDataset([Sample(p, "", "train", 0, "good") for p in paths], self.image_size)

    def _herd_folder(self, folder: str) -> list[str]:
        samples = scan_image_folder(folder, "topology anchors")
        data = torch.utils.data.DataLoader(self._folder_dataset([s.path for s in samples]), batch_size=32)
        features = torch.cat([self._reference_features(b["image"]).cpu() for b in data])
        chosen: list[str] = []
        for group in sorted({s.category for s in samples}):
            members = [i for i, s in enumerate(samples) if s.category == group]
            chosen += [samples[members[j]].path for j in herding(features[members], self.anchors_per_class)]
        return chosen

    @property
    def n_anchors(self) -> int:
        return len(self.anchor_paths) or len(self.anchor_images)

    def anchor_batch_images(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 anchor images (A, 3, S, S) at ``indices``."""
        if self.anchor_paths:
            data = self._folder_dataset([self.anchor_paths[i] for i in indices.tolist()])
            return torch.stack([data[i]["image"] for i in range(len(data))])
        return self.anchor_images[indices]

    def _anchor_reference(self) -> torch.Tensor:
        every = torch.arange(self.n_anchors)
        return torch.cat([self._reference_features(self.anchor_batch_images(c)) for c in every.split(64)])

    @torch.no_grad()
    def _anchor_labels(self) -> torch.Tensor | None:
        """Source labels of folder anchors for the rehearsal: the pretrained classifier's top class (no
        ImageNet label list offline; for real ImageNet images mostly their label). None — no rehearsal —
        when ``rehearsal`` is off or the anchors are target train images (the fallback): those already carry
        their own category, and an ImageNet label would contradict it."""
        if not self.rehearsal or not self.anchor_paths:
            return None
        assert self.net is not None and self.anchor_reference is not None
        return self.net.head.old_logits(self.anchor_reference.to(self.device)).argmax(1).cpu()

    def draw_anchors(self, step: int) -> torch.Tensor:
        """Anchor indices of step ``step``: all of them, or ``anchor_batch`` drawn seeded by (seed, step)."""
        n = self.n_anchors
        if n <= self.anchor_batch:
            return torch.arange(n)
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, step]).generate_state(1)[0]))
        return torch.randperm(n, generator=g)[: self.anchor_batch].sort().values

    def _targets(self, categories: Sequence[str]) -> torch.Tensor:
        unknown = sorted(set(categories) - set(self._class_index))
        if unknown:
            raise ValueError(f"topology: categories {unknown} are not among the classes {self.classes}")
        assert self.net is not None
        return torch.tensor([self._class_index[c] for c in categories]) + self.net.head.n_old

    def loss_terms(self, batch: dict, model: nn.Module, step: int | None = None) -> dict[str, torch.Tensor]:
        """Cross-entropy and topology loss of one step, from ONE forward of ``model``."""
        assert self.anchor_reference is not None, "begin_training() first"
        images = batch["image"]
        indices = self.draw_anchors(self.steps_done if step is None else step)
        x = torch.cat([images, self.anchor_batch_images(indices).to(images.device)]).to(self.device)
        logits, features = model(x)
        b = len(images)
        targets = self._targets(batch["category"])
        if self.anchor_labels is not None:  # rehearsal: the step's anchors join the CE with source labels
            targets, b_ce = torch.cat([targets, self.anchor_labels[indices]]), len(x)
        else:
            b_ce = b
        ce = F.cross_entropy(logits[:b_ce].float(), targets.to(logits.device))
        topo = topology_loss(self.anchor_reference[indices.to(self.anchor_reference.device)], features[b:])
        return {"ce": ce, "topology": topo}

    def training_loss(self, batch: dict, model: nn.Module) -> torch.Tensor:
        terms = self.loss_terms(batch, model)
        self.steps_done += 1
        self._sums["ce"] += float(terms["ce"].detach())
        self._sums["topology"] += float(terms["topology"].detach())
        self._sums["steps"] += 1
        return terms["ce"] + self.lam * terms["topology"]

    def begin_epoch(self, epoch: int, steps: int) -> None:
        self._sums = {"ce": 0.0, "topology": 0.0, "steps": 0}

    @torch.no_grad()
    def end_epoch(self, epoch: int, validation: Iterable[dict]) -> EpochReport:
        net = self._require_built()
        steps = max(self._sums["steps"], 1)
        metrics = {"ce": self._sums["ce"] / steps, "topology": self._sums["topology"] / steps}
        losses, hits, seen = 0.0, 0, 0
        with evaluating(net), torch.no_grad():
            for batch in validation:
                keep = [
                    i
                    for i, (c, y) in enumerate(zip(batch["category"], batch["label"], strict=True))
                    if int(y) == 0 and c in self._class_index
                ]
                if not keep:
                    continue
                logits, _ = net(batch["image"][keep].to(self.device))
                target = self._targets([batch["category"][i] for i in keep]).to(logits.device)
                losses += float(F.cross_entropy(logits, target, reduction="sum"))
                hits += int((logits.argmax(1) == target).sum())
                seen += len(keep)
        if seen:
            metrics |= {"val_ce": losses / seen, "val_accuracy": hits / seen}
        return EpochReport(metrics=metrics, stop=False)

    def end_training(self) -> None:
        if self.net is not None:
            if not self.tied():  # e.g. a device move replaced tensors: the classifier is the trained one
                self._tie()
            self.net.eval()
        self.extractor.eval()

    def state_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "anchor_images": self.anchor_images.cpu(),
            "anchor_paths": list(self.anchor_paths),
            "steps_done": self.steps_done,
            "sums": dict(self._sums),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild classifier, head (sized by the classes), tie and reference; before the networks load."""
        if not state.get("classes"):
            raise ValueError("topology: state without classes (not a topology checkpoint?)")
        self._build(1)
        self._set_classes(state["classes"])
        self.anchor_images = state["anchor_images"].to(torch.uint8).cpu()
        self.anchor_paths = list(state["anchor_paths"])
        self.steps_done = int(state["steps_done"])
        self._sums = dict(state["sums"])
        self.anchor_reference = self._anchor_reference()
        self.anchor_labels = self._anchor_labels()

    # --- scoring ---------------------------------------------------------------------------------
    def predict(self, images: torch.Tensor) -> Prediction:
        """DN2/SPADE alignment against the k nearest train images; image score = the map's maximum."""
        maps = super().predict(images).maps
        return Prediction(scores=maps.reshape(len(maps), -1).max(1).astype(np.float32), maps=maps)
