"""Single-core timing of the MVTec AD metrics on synthetic data.

Usage: python benchmarks/bench_metrics.py [--images 500] [--size 256] [--repeats 1]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.metrics import aupro, evaluate, f1_max, pixel_auroc  # noqa: E402


def make_data(n_images: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Blob masks (random ellipses on about half the images) and smooth correlated float32 maps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    masks = np.zeros((n_images, size, size), dtype=bool)
    maps = np.empty((n_images, size, size), dtype=np.float32)
    labels = rng.random(n_images) < 0.5
    for i in range(n_images):
        if labels[i]:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.uniform(0.1, 0.9, 2) * size
                ay, ax = rng.uniform(0.02, 0.12, 2) * size
                theta = rng.uniform(0, np.pi)
                c, s = np.cos(theta), np.sin(theta)
                u = (xx - cx) * c + (yy - cy) * s
                v = -(xx - cx) * s + (yy - cy) * c
                masks[i] |= (u / ax) ** 2 + (v / ay) ** 2 <= 1.0
        noise = ndimage.gaussian_filter(rng.normal(size=(size, size)).astype(np.float32), sigma=3)
        maps[i] = ndimage.gaussian_filter(masks[i].astype(np.float32), sigma=3) + 4.0 * noise
    labels = masks.reshape(n_images, -1).any(axis=1)
    image_scores = maps.reshape(n_images, -1).max(axis=1)
    return maps, masks, image_scores, labels.astype(int)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time over ``repeats`` runs and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fpr-limit", type=float, default=0.3)
    args = parser.parse_args()

    maps, masks, image_scores, labels = make_data(args.images, args.size, args.seed)
    print(
        f"{maps.size / 1e6:.1f}M pixels, {masks.mean() * 100:.2f}% anomalous, "
        f"{labels.sum()}/{labels.size} anomalous images, cores: "
        f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}"
    )
    rows = [
        ("aupro", lambda: aupro(maps, masks, fpr_limit=args.fpr_limit)),
        ("pixel_auroc", lambda: pixel_auroc(maps, masks)),
        ("pixel_f1_max", lambda: f1_max(maps.ravel(), masks.ravel())),
        ("evaluate", lambda: evaluate(image_scores, labels, maps, masks, fpr_limit=args.fpr_limit)),
    ]
    print(f"{'metric':<14}{'seconds':>9}  value")
    for name, fn in rows:
        seconds, value = timed(fn, args.repeats)
        shown = (
            ", ".join(f"{k}={v:.4f}" for k, v in value.items()) if isinstance(value, dict) else f"{value:.6f}"
        )
        print(f"{name:<14}{seconds:>9.3f}  {shown}")


if __name__ == "__main__":
    main()
