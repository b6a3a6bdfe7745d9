"""Greedy k-center coreset (PatchCore, Roth et al. 2022) with a Johnson-Lindenstrauss projection.

The selection rule of PatchCore's (and anomalib's) greedy sampler: start from a random point, then
repeatedly take the point farthest from the chosen set, measured in a random 128-d projection. Each
iteration is one (N × 128) matrix-vector product on precomputed squared norms, in place, with no
(N × 128) temporaries.
"""

from __future__ import annotations

import numpy as np
import torch


def random_projection(features: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """Gaussian JL projection of (n, d) features to ``dim`` columns (identity when d ≤ dim)."""
    if features.shape[1] <= dim:
        return np.ascontiguousarray(features, dtype=np.float32)
    rng = np.random.default_rng(seed)
    proj = (rng.standard_normal((features.shape[1], dim)) / np.sqrt(dim)).astype(np.float32)
    return np.ascontiguousarray(features.astype(np.float32, copy=False) @ proj)


@torch.inference_mode()
def greedy_coreset(features: np.ndarray, n_select: int, proj_dim: int = 128, seed: int = 0) -> np.ndarray:
    """Indices of ``n_select`` rows chosen by greedy k-center selection (first point random)."""
    n = len(features)
    if not 1 <= n_select <= n:
        raise ValueError(f"coreset size {n_select} must be between 1 and the number of features {n}")
    if n_select == n:
        return np.arange(n)
    z = torch.from_numpy(random_projection(features, proj_dim, seed))
    sq = (z * z).sum(1)
    selected = np.empty(n_select, np.int64)
    current = int(np.random.default_rng(seed).integers(n))
    mindist = torch.full((n,), float("inf"))  # squared distance to the nearest chosen point
    d = torch.empty(n)
    for it in range(n_select):
        selected[it] = current
        torch.mv(z, z[current], out=d)
        d.mul_(-2.0).add_(sq).add_(sq[current])
        torch.minimum(mindist, d, out=mindist)
        mindist[current] = -1.0  # chosen: never again (guards float round-off)
        current = int(torch.argmax(mindist))
    return selected
