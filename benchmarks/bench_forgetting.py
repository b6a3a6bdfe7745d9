"""Gaussian fine-tuning's forgetting detector vs hindsight: which epoch did it choose, and which epoch would
have been best on the test set (read only after training, for the report)?

Per shared industrial data set: gaussian_ft (the repo's params.yaml knobs, Lite0 @ params image size)
trains for ``--epochs`` epochs in this process (one worker, the method's own protocol), never stopping, so
every epoch can be scored. After each epoch the validation separation (held-out normal images vs their
mixup / cutmix / cutpaste versions) is recorded and the test split is evaluated with that epoch's weights
(Gaussians fitted on all train images, then image AUROC, pixel AUROC, AUPRO). Epoch 0 is the pretrained
backbone, i.e. frozen Gaussian AD. The detector's choice is then replayed from the separations with the
configured ``patience`` / ``min_delta``: the epoch it keeps and the epoch at which it stops.

Usage: .venv/bin/python benchmarks/bench_forgetting.py [--epochs 6] [--categories ...] [--image-size N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from components.data import ImageDataset, scan_mvtec, split_validation, synthetic_anomalies  # noqa: E402
from components.evaluation import fit_and_evaluate, loader  # noqa: E402
from components.methods import MethodSpec, build_method  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "industrial")
    parser.add_argument("--categories", nargs="+", default=["kolektorsdd", "magnetic_tile", "deeppcb"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=None)
    args = parser.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    size = args.image_size or params["image_size"]
    knobs = dict(params["methods"]["gaussian_ft"])
    patience, min_delta = knobs.pop("patience"), knobs.pop("min_delta")
    knobs |= {"epochs": args.epochs, "patience": args.epochs + 1}
    torch.manual_seed(params["seed"])
    bs = params["train"]["batch_size"]
    print(f"gaussian_ft {knobs} | {params['backbone']} @ {size} px | detector patience {patience}")
    summary = []
    for category in args.categories:
        samples = scan_mvtec(args.root, category)
        train = [s for s in samples if s.split == "train"]
        test = [s for s in samples if s.split == "test"]
        fit, held = split_validation(train, params["train"]["val_fraction"], seed=params["seed"])
        validation = held + synthetic_anomalies(held, params["train"]["synthetic"])
        spec = MethodSpec("gaussian_ft", params["backbone"], params["weights"], None, size, knobs)
        m = build_method(spec, progress=False)
        t0 = time.perf_counter()
        tags = m.begin_training(loader(fit, size, bs, 1), loader(validation, size, bs, 1))
        separations = [float(tags["gaussian_ft.val_separation_pretrained"])]
        rows = []
        optimizer = m.make_optimizer()
        params_ = [p for g in optimizer.param_groups for p in g["params"]]
        train_seconds = time.perf_counter() - t0
        for epoch in range(args.epochs + 1):
            if epoch > 0:
                t1 = time.perf_counter()
                m.begin_epoch(epoch, -(-len(fit) // bs))
                m.train_mode()
                batches = torch.utils.data.DataLoader(ImageDataset(fit, size), batch_size=bs, shuffle=True)
                for batch in batches:
                    loss = m.training_loss(batch, m.extractor)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if m.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params_, m.max_grad_norm)
                    optimizer.step()
                report = m.end_epoch(epoch, loader(validation, size, bs, 1))
                separations.append(report.metrics["val_separation"])
                train_seconds += time.perf_counter() - t1
            m.extractor.eval()
            result = fit_and_evaluate(m, train, test, bs, 1, True)
            r = result.metrics
            rows.append((epoch, separations[-1], r["image_auroc"], r["pixel_auroc"], r["aupro"]))
            print(
                f"{category} epoch {epoch}: val separation {separations[-1]:.3f} | test image AUROC "
                f"{r['image_auroc']:.3f} pixel {r['pixel_auroc']:.3f} AUPRO {r['aupro']:.3f}",
                flush=True,
            )
        kept, stop = detector_choice(separations, patience, min_delta)
        best_test = max(rows, key=lambda row: row[2])[0]
        summary.append((category, rows, kept, stop, best_test, train_seconds))
    print(
        "\n| data set | frozen Gaussian AD (epoch 0) | gaussian_ft, detector's epoch | "
        "detector kept / stopped | test-best epoch (hindsight) | training s |"
    )
    print("|---|---|---|---|---|---|")
    for category, rows, kept, stop, best_test, seconds in summary:
        f = lambda r: f"{r[2]:.3f} / {r[3]:.3f} / {r[4]:.3f}"  # noqa: E731
        print(
            f"| {category} | {f(rows[0])} | {f(rows[kept])} | {kept} / {stop} | {best_test} "
            f"({rows[best_test][2]:.3f}) | {seconds:.0f} |"
        )
    print("(metrics: image AUROC / pixel AUROC / AUPRO)")


if __name__ == "__main__":
    main()
