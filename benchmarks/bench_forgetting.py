"""A fine-tuned method's label-free epoch selection vs hindsight: which epoch did it choose, which epoch
would have been best on the test set (read only after training, for the report), and what the collapse
monitor saw on the way (selection regret, issue 20).

Per data set (``--data industrial:<set>`` or ``fashion_mnist:<class>``): the method (``--method``:
gaussian_ft, panda or panda_oe, params.yaml's knobs changed by ``--set knob=value``) trains for
``--epochs`` epochs in this process (one worker, the method's own protocol), never stopping, so every
epoch can be scored. After each epoch the method's own validation signal (gaussian_ft: held-out normal
images vs their mixup / cutmix / cutpaste versions; PANDA / PANDA-OE: synthetic anomalies vs held-out
normal images) and the collapse monitor's signals (params.yaml's ``train.collapse`` thresholds) are
recorded, and the test split is evaluated with that epoch's weights (image AUROC, and pixel AUROC / AUPRO
where there are masks). Epoch 0 is the pretrained backbone. The selection is then replayed from the
signal with the method's ``patience`` / ``min_delta`` (gaussian_ft; PANDA: patience, no min_delta): the
epoch it keeps and the epoch at which it stops, and the first epoch the monitor would have stopped.

    .venv/bin/python benchmarks/bench_forgetting.py --data fashion_mnist:trouser --image-size 64 \
        --epochs 4 --set gaussian_images=1024 --out /tmp/forgetting.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from components.data import (  # noqa: E402
    ImageDataset,
    oneclass_category,
    scan_mvtec,
    split_validation,
    synthetic_anomalies,
)
from components.evaluation import fit_and_evaluate, loader  # noqa: E402
from components.methods import MethodSpec, build_method  # noqa: E402
from components.monitor import CollapseMonitor, CollapseThresholds  # noqa: E402

#: method → (the pretrained value's tag, the per-epoch metric) of its label-free selection signal
SIGNALS = {
    "gaussian_ft": ("gaussian_ft.val_separation_pretrained", "val_separation"),
    "panda": ("panda.val_auroc_pretrained", "val_auroc"),
    "panda_oe": ("panda.val_auroc_pretrained", "val_auroc"),
}


def detector_choice(separations: list[float], patience: int, min_delta: float) -> tuple[int, int]:
    """(kept epoch, stop epoch) of the rule "stop after ``patience`` epochs without a gain > min_delta"."""
    best, kept, bad = separations[0], 0, 0
    for epoch, value in enumerate(separations[1:], start=1):
        if value > best + min_delta:
            best, kept, bad = value, epoch, 0
        else:
            bad += 1
            if bad >= patience:
                return kept, epoch
    return kept, len(separations) - 1


def samples_of(data: str, fashion_root: str, industrial_root: str):
    """(train, test, has_masks) of ``fashion_mnist:<class>`` or ``industrial:<set>``."""
    kind, _, category = data.partition(":")
    if kind == "fashion_mnist":
        samples, masks = oneclass_category("fashion_mnist", fashion_root, category), False
    elif kind == "industrial":
        samples, masks = scan_mvtec(industrial_root, category), True
    else:
        raise SystemExit(f"--data {data!r}: must be fashion_mnist:<class> or industrial:<set>")
    return [s for s in samples if s.split == "train"], [s for s in samples if s.split == "test"], masks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sets = ["industrial:kolektorsdd", "industrial:magnetic_tile", "industrial:deeppcb"]
    parser.add_argument("--data", nargs="+", default=sets, help="industrial:<set> | fashion_mnist:<class>")
    parser.add_argument("--industrial-root", default=str(REPO.parent / "shared" / "data" / "industrial"))
    parser.add_argument("--fashion-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--method", choices=sorted(SIGNALS), default="gaussian_ft")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KNOB=VALUE", help="the method's knob overrides"
    )
    parser.add_argument(
        "--train-batch",
        type=int,
        default=None,
        help="images per step (default: the grid's ranks x batch_size)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per epoch here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    size = args.image_size or params["image_size"]
    knobs = dict(params["methods"][args.method])
    for item in args.set:
        key, _, value = item.partition("=")
        knobs[key] = yaml.safe_load(value)
    patience, min_delta = knobs.pop("patience", 3), knobs.pop("min_delta", 0.0)
    knobs |= {"epochs": args.epochs, "patience": args.epochs + 1}
    if args.method != "gaussian_ft":
        knobs["early_stopping"] = False  # every epoch trains; the rule is replayed below
    collapse = {k: v for k, v in params["train"]["collapse"].items() if k != "enabled"}
    thresholds = CollapseThresholds(**collapse)
    bs = params["train"]["batch_size"]
    train_bs = args.train_batch or bs * params["train"]["num_workers"]  # DDP averages the ranks' batches
    print(
        f"{args.method} {knobs} | {params['backbone']} @ {size} px | selection patience {patience}",
        flush=True,
    )
    summary = []
    for data in args.data:
        torch.manual_seed(params["seed"])
        train, test, has_masks = samples_of(data, args.fashion_root, args.industrial_root)
        fit, held = split_validation(train, params["train"]["val_fraction"], seed=params["seed"])
        validation = held + synthetic_anomalies(held, params["train"]["synthetic"])
        spec = MethodSpec(args.method, params["backbone"], params["weights"], None, size, knobs)
        m = build_method(spec, progress=False)
        monitor = CollapseMonitor(thresholds)
        val = loader(validation, size, bs, 1)
        t0 = time.perf_counter()
        with m.sharing_monitor_features():
            tags = m.begin_training(loader(fit, size, bs, 1), val)
            monitor.begin(m.monitor_features, loader(fit, size, bs, 1), val)
        tag, metric = SIGNALS[args.method]
        separations = [float(tags[tag])]
        signals: dict = {}
        rows = []
        optimizer = m.make_optimizer()
        params_ = [p for g in optimizer.param_groups for p in g["params"]]
        train_seconds = time.perf_counter() - t0
        first_collapse = None
        for epoch in range(args.epochs + 1):
            if epoch > 0:
                t1 = time.perf_counter()
                m.begin_epoch(epoch, -(-len(fit) // train_bs))
                m.train_mode()
                batches = torch.utils.data.DataLoader(
                    ImageDataset(fit, size), batch_size=train_bs, shuffle=True
                )
                losses = []
                for batch in batches:
                    loss = m.training_loss(batch, m.trainable())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if m.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params_, m.max_grad_norm)
                    optimizer.step()
                    losses.append(float(loss.detach()))
                with m.sharing_monitor_features():
                    report = m.end_epoch(epoch, val)
                    verdict = monitor.measure(m.monitor_features, val)
                separations.append(report.metrics[metric])
                signals = verdict.metrics
                if verdict.collapsed and first_collapse is None:
                    first_collapse = (epoch, verdict.reason)
                train_seconds += time.perf_counter() - t1
            m.extractor.eval()
            r = fit_and_evaluate(m, train, test, bs, 1, has_masks).metrics
            row = {
                "data": data,
                "knobs": args.set,
                "epoch": epoch,
                "method": args.method,
                "val_signal": separations[-1],
                "loss": (sum(losses) / len(losses)) if epoch else None,
                **{f"monitor/{k}": v for k, v in signals.items()},
                **{k: r[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
                "train_seconds": train_seconds,
            }
            rows.append(row)
            if args.out:
                with args.out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
            print(
                f"{data} epoch {epoch}: val signal {separations[-1]:.3f} | monitor rank "
                f"{signals.get('rank_ratio', 1.0):.2f} knn {signals.get('knn_overlap', 1.0):.2f} sep "
                f"{signals.get('separation', float('nan')):.3f} | test image AUROC {r['image_auroc']:.3f} "
                f"pixel {r['pixel_auroc']:.3f} AUPRO {r['aupro']:.3f}",
                flush=True,
            )
        kept, stop = detector_choice(separations, patience, min_delta)
        best_test = max(range(len(rows)), key=lambda e: rows[e]["image_auroc"])
        summary.append((data, rows, kept, stop, best_test, first_collapse, train_seconds))
    print(
        f"\n| data | epoch 0 (pretrained) | {args.method}, selected epoch | selection kept / stopped | "
        "monitor stops | test-best epoch (hindsight) | training s |"
    )
    print("|---|---|---|---|---|---|---|")
    for data, rows, kept, stop, best_test, first_collapse, seconds in summary:
        f = lambda r: f"{r['image_auroc']:.3f} / {r['pixel_auroc']:.3f} / {r['aupro']:.3f}"  # noqa: E731
        mon = f"epoch {first_collapse[0]} ({first_collapse[1]})" if first_collapse else "never"
        print(
            f"| {data} | {f(rows[0])} | {f(rows[kept])} | {kept} / {stop} | {mon} | {best_test} "
            f"({rows[best_test]['image_auroc']:.3f}) | {seconds:.0f} |"
        )
    print("(metrics: image AUROC / pixel AUROC / AUPRO; nan where the data set has no masks)")


if __name__ == "__main__":
    main()
