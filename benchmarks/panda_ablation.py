"""PANDA on Fashion-MNIST at the paper's protocol, and an ablation of what moves it (issue 19, item 2).

Trains the last two stages of tf_efficientnet_lite0 with PANDA's compactness loss for a fixed number of
epochs on every train image of one normal class (as the official code: no held-out slice, no early
stopping) and reports the test image AUROC of DN2 (k = 2, faiss-free exact kNN) on the loss's feature
after selected epochs. The frozen stages run once per image (their outputs are cached: BatchNorm is in
eval mode and there is no augmentation, so this is exact). Test labels are read only to print the table
— this is an ablation that explains, not a selection rule.

Variants (``--variants``), each a change from ``paper``:
  paper   feature = pooled conv_head output (the classifier's input, 1280-d), conv_head + bn2 + the last
          two stages train; SGD lr 1e-2, momentum 0.9, weight decay 5e-5, clip 1e-3, batch 32
  stage   feature = pooled last feature stage (320-d; what adaptad's PANDA used before)
  nowd    weight decay 0 (SGD adds it after clipping: at clip 1e-3 the decay dominates each step)
  noclip  no gradient clipping, lr 1e-3
  nomom   momentum 0
  bs16    batch 16
  lr1e-1  lr 0.1
  stage1  only the last stage (and the head) trains
Variants compose with ``+``: ``stage+nowd`` is ``stage`` with weight decay 0.

    .venv/bin/python benchmarks/panda_ablation.py --classes shirt t_shirt_top pullover --variants paper stage
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from components.backbones import create_model
from components.data import ImageDataset, oneclass_category
from components.methods.base import train_with_frozen_batchnorm

VARIANTS: dict[str, dict] = {
    "paper": {},
    "stage": {"feature": "stage"},
    "nowd": {"weight_decay": 0.0},
    "noclip": {"clip": None, "lr": 1e-3},
    "nomom": {"momentum": 0.0},
    "bs16": {"batch": 16},
    "lr1e-1": {"lr": 0.1},
    "stage1": {"trainable_blocks": 2},
}
BASE = dict(feature="head", lr=1e-2, momentum=0.9, weight_decay=5e-5, clip=1e-3, batch=32, trainable_blocks=4)


class Net(nn.Module):
    """tf_efficientnet_lite0 split into a frozen prefix (stem + first blocks) and a trainable suffix."""

    def __init__(self, trainable_blocks: int, feature: str) -> None:
        super().__init__()
        self.model = create_model("tf_efficientnet_lite0", "pypi", features_only=False)
        self.model.eval()
        self.split = len(self.model.blocks) - trainable_blocks
        self.feature = feature
        for p in self.model.parameters():
            p.requires_grad_(False)
        trained = list(self.model.blocks[self.split :].parameters())
        if feature == "head":
            trained += list(self.model.conv_head.parameters()) + list(self.model.bn2.parameters())
        for p in trained:
            p.requires_grad_(True)
        self.trained = trained
        mean = torch.tensor(self.model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(self.model.pretrained_cfg["std"]).view(1, 3, 1, 1)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @torch.no_grad()
    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images.float() / 255 - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        x = self.model.bn1(self.model.conv_stem(x))
        return self.model.blocks[: self.split](x)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.model.blocks[self.split :](h)
        if self.feature == "head":
            x = self.model.bn2(self.model.conv_head(x))
        return x.mean(dim=(2, 3))


def images_of(samples, size: int) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(ImageDataset(samples, size), batch_size=256)
    return torch.cat([b["image"] for b in loader])


def embed(net: Net, h: torch.Tensor, bs: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(chunk) for chunk in h.split(bs)])


def knn_auroc(train: torch.Tensor, test: torch.Tensor, labels: np.ndarray, k: int = 2) -> float:
    d2 = torch.cdist(test.double(), train.double()).pow(2)
    return float(roc_auc_score(labels, d2.topk(k, largest=False).values.sum(1).numpy()))


def run(cls: str, variant: str, args) -> dict:
    cfg = dict(BASE)
    for part in variant.split("+"):
        cfg |= VARIANTS[part]
    torch.manual_seed(0)
    samples = oneclass_category("fashion_mnist", args.root, cls, limit_test=args.limit_test)
    train = [s for s in samples if s.split == "train"][: args.limit_train]
    test = [s for s in samples if s.split == "test"]
    labels = np.array([s.label for s in test])
    net = Net(cfg["trainable_blocks"], cfg["feature"])
    t0 = time.perf_counter()
    h_train = torch.cat([net.prefix(c) for c in images_of(train, args.size).split(256)])
    h_test = torch.cat([net.prefix(c) for c in images_of(test, args.size).split(256)])
    prep = time.perf_counter() - t0
    f0 = embed(net, h_train)
    center = f0.mean(0)
    curve = {0: knn_auroc(f0, embed(net, h_test), labels)}
    opt = torch.optim.SGD(
        net.trained, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
    )
    g = torch.Generator().manual_seed(0)
    losses, t_train = [], 0.0
    for epoch in range(1, args.epochs + 1):
        t = time.perf_counter()
        train_with_frozen_batchnorm(net)
        total = 0.0
        order = torch.randperm(len(h_train), generator=g)
        for idx in order.split(cfg["batch"]):
            f = net(h_train[idx])
            loss = ((f - center) ** 2).sum(1).mean() / f.shape[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["clip"] is not None:
                nn.utils.clip_grad_norm_(net.trained, cfg["clip"])
            opt.step()
            total += float(loss.detach())
        net.eval()
        t_train += time.perf_counter() - t
        losses.append(total / len(order.split(cfg["batch"])))
        if epoch in args.eval_epochs:
            curve[epoch] = knn_auroc(embed(net, h_train), embed(net, h_test), labels)
        if not np.isfinite(losses[-1]):
            break
    row = {
        "class": cls,
        "variant": variant,
        "cfg": cfg,
        "auroc": curve,
        "loss": losses,
        "prefix_seconds": prep,
        "train_seconds": t_train,
        "train_images": len(train),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--classes", nargs="+", default=["shirt", "t_shirt_top", "pullover"])
    p.add_argument("--variants", nargs="+", default=["paper", "stage"], help=f"of {sorted(VARIANTS)}, or a+b")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--eval-epochs", type=int, nargs="+", default=[1, 3, 7, 15])
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None, help="test images per class (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", type=Path, default=None, help="append JSON lines here")
    args = p.parse_args()
    unknown = {part for v in args.variants for part in v.split("+")} - VARIANTS.keys()
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; known: {sorted(VARIANTS)}")
    torch.set_num_threads(args.threads)
    for cls in args.classes:
        for variant in args.variants:
            row = run(cls, variant, args)
            if args.output:
                with args.output.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
