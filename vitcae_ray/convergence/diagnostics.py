"""Convergence diagnostics of attention heads: pure functions of arrays.

- ``drift_w1``: d = W1(p, q), the exact 1-Wasserstein distance between two distributions over
  the patch grid, ground metric the Euclidean distance between patch centres with coordinates
  scaled to [0, 1] (so d lies in [0, sqrt 2] at any resolution); solved exactly by POT.
- ``kappa``: the number of clusters of a row-stochastic attention matrix A: with eigenvalue
  magnitudes sorted |l_1| = 1 >= |l_2| >= ..., the k whose gap |l_k| - |l_(k+1)| is the
  largest among the top ``top_k``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import ot
import scipy.linalg


@lru_cache(maxsize=16)
def grid_cost(grid: int) -> np.ndarray:
    """(N, N) distances between patch centres, N = grid**2, row-major (i = row * grid + col)."""
    coords = patch_coords(grid)
    cost = np.sqrt(((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1))
    cost.setflags(write=False)
    return cost


def patch_coords(grid: int) -> np.ndarray:
    """(N, 2) patch-centre coordinates in [0, 1]."""
    r, c = np.divmod(np.arange(grid * grid), grid)
    return np.stack([r, c], axis=1).astype(np.float64) / max(grid - 1, 1)


def _normalise(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    s = p.sum()
    if not np.isfinite(s) or s <= 0:
        raise ValueError("a distribution needs a positive, finite total mass")
    return p / s


def drift_w1(p: np.ndarray, q: np.ndarray, cost: np.ndarray) -> float:
    """W1(p, q) = min over couplings pi of sum_ij pi_ij cost_ij (exact network simplex)."""
    return float(ot.emd2(_normalise(p), _normalise(q), cost))


def drift_w1_heads(prev: np.ndarray, cur: np.ndarray, grid: int) -> np.ndarray:
    """(L, H, N) x (L, H, N) -> (L, H) drifts."""
    cost = grid_cost(grid)
    L, H = cur.shape[:2]
    return np.array([[drift_w1(prev[l, h], cur[l, h], cost) for h in range(H)] for l in range(L)])


def kappa(attn: np.ndarray, top_k: int) -> int:
    """Cluster count of a row-stochastic matrix from the largest gap among its top eigenvalue
    magnitudes (1 when the matrix has no gap, e.g. uniform attention)."""
    a = np.asarray(attn, dtype=np.float64)
    a = a / a.sum(axis=1, keepdims=True)
    mags = np.sort(np.abs(scipy.linalg.eigvals(a)))[::-1][: max(2, min(top_k, a.shape[0]))]
    gaps = mags[:-1] - mags[1:]
    return int(np.argmax(gaps)) + 1


def kappa_heads(attn: np.ndarray, top_k: int) -> np.ndarray:
    """(L, H, N, N) -> (L, H) cluster counts."""
    L, H = attn.shape[:2]
    return np.array([[kappa(attn[l, h], top_k) for h in range(H)] for l in range(L)], dtype=np.int64)
