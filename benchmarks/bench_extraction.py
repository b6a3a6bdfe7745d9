"""Feature extraction end to end (decode, resize, forward) vs the bare model forward on the same images.

    .venv/bin/python benchmarks/bench_extraction.py [--category magnetic_tile --images 256 --workers 1]
Target (issue 2): end to end ≥ 85 % of the bare forward throughput.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from components.backbones import FeatureExtractor
from components.data import ImageDataset, scan_mvtec
from components.evaluation import loader

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "industrial"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-root", type=Path, default=ROOT)
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--levels", default="2,3")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    samples = [s for s in scan_mvtec(args.data_root, args.category) if s.split == "train"][: args.images]
    fx = FeatureExtractor(args.backbone, "pypi", tuple(int(x) for x in args.levels.split(",")))
    ds = ImageDataset(samples, args.image_size)
    batches = [
        torch.stack([ds[i]["image"] for i in range(s, min(s + args.batch_size, len(ds)))])
        for s in range(0, len(ds), args.batch_size)
    ]
    with torch.inference_mode():
        fx(batches[0])  # warm-up
        t = time.perf_counter()
        for b in batches:
            fx(b)
        bare = len(samples) / (time.perf_counter() - t)
        t = time.perf_counter()
        for b in loader(samples, args.image_size, args.batch_size, args.workers):
            fx(b["image"])
        e2e = len(samples) / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    decode = (time.perf_counter() - t) / len(ds) * 1000
    print(
        f"{args.backbone} @ {args.image_size}px, batch {args.batch_size}, "
        f"{len(samples)} {args.category} images, "
        f"{args.workers} loader worker(s), {torch.get_num_threads()} torch threads"
    )
    print(f"bare forward     {bare:7.1f} img/s")
    print(f"end to end       {e2e:7.1f} img/s  ({e2e / bare:.0%} of bare; target >= 85%)")
    print(f"decode+resize    {decode:7.2f} ms/img in one process")


if __name__ == "__main__":
    main()
