"""Greedy k-center coreset (PatchCore, Roth et al. 2022) with a Johnson-Lindenstrauss projection.

The selection rule of PatchCore's (and anomalib's) greedy sampler: start from a random point, then
repeatedly take the point farthest from the chosen set, measured in a random 128-d projection.

The textbook loop reads all N projected rows once per chosen point (a memory-bound matrix-vector
product). Here the same sequence is chosen lazily: after a full pass, only the ``candidates`` rows with
the largest distance to the chosen set are kept up to date, point by point. Every other row's distance is
at most the threshold τ (the next largest value at that pass) and distances only shrink, so while the best
candidate is ≥ τ it is the true farthest point. When it falls below τ, one full pass applies all points
chosen since the last pass at once, as a blocked matrix product (compute-bound), and the candidates are
refreshed. The chosen sequence is the greedy one up to float round-off in near-ties.
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


def _apply(z: torch.Tensor, sq: torch.Tensor, mindist: torch.Tensor, chosen: list[int], block: int) -> None:
    """mindist ← min(mindist, squared distance to each of ``chosen``), in row blocks of ``block``."""
    p = z[chosen]
    sq_p = sq[chosen]
    for start in range(0, len(z), block):
        rows = slice(start, start + block)
        d = torch.addmm(sq_p[None, :], z[rows], p.T, alpha=-2.0).add_(sq[rows, None])
        torch.minimum(mindist[rows], d.amin(1), out=mindist[rows])


@torch.inference_mode()
def greedy_coreset(
    features: np.ndarray,
    n_select: int,
    proj_dim: int = 128,
    seed: int = 0,
    candidates: int = 4096,
    block: int = 16384,
) -> np.ndarray:
    """Indices of ``n_select`` rows chosen by greedy k-center selection (first point random).

    ``candidates`` and ``block`` change speed only, never the chosen sequence (see module docstring).
    """
    n = len(features)
    if not 1 <= n_select <= n:
        raise ValueError(f"coreset size {n_select} must be between 1 and the number of features {n}")
    if n_select == n:
        return np.arange(n)
    z = torch.from_numpy(random_projection(features, proj_dim, seed))
    sq = (z * z).sum(1)
    m = min(candidates, n - 1)
    selected = [int(np.random.default_rng(seed).integers(n))]
    pending = list(selected)  # chosen since the last full pass
    mindist = torch.full((n,), float("inf"))  # squared distance to the nearest chosen point
    while len(selected) < n_select:
        _apply(z, sq, mindist, pending, block)
        mindist[selected] = -1.0  # chosen: never again (guards float round-off)
        pending = []
        top, cand_ids = torch.topk(mindist, m + 1)
        tau = float(top[m])  # bound on every non-candidate row, now and later
        cand, cand_ids = top[:m].clone(), cand_ids[:m]
        z_c, sq_c = z[cand_ids], sq[cand_ids]
        while len(selected) < n_select:
            j = int(torch.argmax(cand))
            if float(cand[j]) < tau:
                break  # a non-candidate may now be the farthest: full pass
            current = int(cand_ids[j])
            selected.append(current)
            pending.append(current)
            d = torch.mv(z_c, z[current]).mul_(-2.0).add_(sq_c).add_(sq[current])
            torch.minimum(cand, d, out=cand)
            cand[j] = -1.0
    return np.asarray(selected, np.int64)
