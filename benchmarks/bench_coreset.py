"""Greedy coreset on real PatchCore features: the lazy exact selection vs the textbook loop.

    .venv/bin/python benchmarks/bench_coreset.py [--category magnetic_tile --image-size 256 --ratio 0.01]
Extracts the locally aware patch features (tf_efficientnet_lite0 stages 2+3) of every train image of
a shared industrial category, then selects ``ratio`` of them with components.coreset.greedy_coreset and
with the one-mat-vec-per-point loop it replaces (timed on its first ``--naive-points`` points and
extrapolated linearly, as every iteration costs the same). Prints seconds, points per second and whether
the two sequences agree.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from components.backbones import FeatureExtractor
from components.coreset import greedy_coreset, random_projection
from components.data import scan_mvtec
from components.evaluation import loader
from components.methods.base import aligned, flat_locations

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "industrial"


@torch.inference_mode()
def textbook(features: np.ndarray, n_select: int, proj_dim: int = 128, seed: int = 0) -> np.ndarray:
    """One (N × d) mat-vec per chosen point (the loop greedy_coreset replaces)."""
    z = torch.from_numpy(random_projection(features, proj_dim, seed))
    sq = (z * z).sum(1)
    n = len(z)
    selected = np.empty(n_select, np.int64)
    current = int(np.random.default_rng(seed).integers(n))
    mindist = torch.full((n,), float("inf"))
    d = torch.empty(n)
    for it in range(n_select):
        selected[it] = current
        torch.mv(z, z[current], out=d)
        d.mul_(-2.0).add_(sq).add_(sq[current])
        torch.minimum(mindist, d, out=mindist)
        mindist[current] = -1.0
        current = int(torch.argmax(mindist))
    return selected


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--naive-points", type=int, default=500)
    p.add_argument("--candidates", type=int, nargs="+", default=[4096])
    args = p.parse_args()
    train = [s for s in scan_mvtec(ROOT, args.category) if s.split == "train"]
    fx = FeatureExtractor("tf_efficientnet_lite0", "pypi", (2, 3))
    t = time.perf_counter()
    with torch.inference_mode():
        x = np.concatenate(
            [flat_locations(aligned(fx(b["image"]), local=3)) for b in loader(train, args.image_size, 16, 1)]
        )
    t_x = time.perf_counter() - t
    n_select = max(1, round(args.ratio * len(x)))
    print(
        f"{args.category}: {len(train)} images -> {x.shape} patch features in {t_x:.1f} s "
        f"({len(train) / t_x:.1f} img/s); coreset {n_select} points, {torch.get_num_threads()} threads"
    )
    k = min(args.naive_points, n_select)
    t = time.perf_counter()
    ref = textbook(x, k)
    t_ref = (time.perf_counter() - t) * n_select / k
    print(f"textbook loop         {t_ref:8.1f} s (extrapolated from {k} points)")
    for m in args.candidates:
        t = time.perf_counter()
        sel = greedy_coreset(x, n_select, candidates=m)
        t_sel = time.perf_counter() - t
        agree = np.mean(sel[:k] == ref)
        print(
            f"lazy, {m:6d} candidates {t_sel:8.1f} s  {t_ref / t_sel:5.1f}x  first {k} points agree: "
            f"{agree:.3f}"
        )


if __name__ == "__main__":
    main()
