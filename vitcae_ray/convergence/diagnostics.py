"""Convergence diagnostics of attention heads: pure functions of arrays.

Patches are indexed row-major on a ``grid x grid`` patch grid (patch i = row * grid + col);
their centres have coordinates x_i = (row, col) / max(grid - 1, 1) in [0, 1]^2.

- Drift: d = W1(p, q) = min_{pi in Pi(p, q)} sum_ij pi_ij ||x_i - x_j||_2, the exact
  1-Wasserstein distance between two distributions p, q over the patches (Pi(p, q): couplings
  with marginals p and q), solved by POT's network simplex. d lies in [0, sqrt(2)] at any
  resolution; a point mass moved by one patch has d = 1 / (grid - 1).
- Cluster count: for a row-stochastic attention matrix A (N x N) with eigenvalue magnitudes
  m_1 >= m_2 >= ... >= m_N (m_1 = 1), kappa(A) = argmax_{1 <= k < K} (m_k - m_{k+1}) with
  K = min(top_k, N): the number of eigenvalues near 1 before the largest drop. A softmax
  matrix is strictly positive, so eigenvalue 1 is simple and the count must come from the gap.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import ot
import scipy.linalg

__all__ = [
    "drift_w1",
    "drift_w1_heads",
    "grid_cost",
    "kappa",
    "kappa_heads",
    "patch_coords",
    "relative_change",
]


def patch_coords(grid: int) -> np.ndarray:
    """(N, 2) patch-centre coordinates x_i = (row, col) / max(grid - 1, 1), row-major."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    row, col = np.divmod(np.arange(grid * grid), grid)
    return np.stack([row, col], axis=1).astype(np.float64) / max(grid - 1, 1)


@lru_cache(maxsize=16)
def grid_cost(grid: int) -> np.ndarray:
    """(N, N) read-only ground metric C_ij = ||x_i - x_j||_2 between patch centres, N = grid**2."""
    x = patch_coords(grid)
    cost = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    cost.setflags(write=False)
    return cost


def _distribution(p: np.ndarray) -> np.ndarray:
    """p / sum(p) in float64 (tiny negative rounding errors clipped to 0)."""
    p = np.clip(np.asarray(p, dtype=np.float64).ravel(), 0.0, None)
    total = p.sum()
    if not np.isfinite(total) or total <= 0.0:
        raise ValueError("a distribution needs a positive, finite total mass")
    return p / total


def drift_w1(p: np.ndarray, q: np.ndarray, cost: np.ndarray) -> float:
    """d = W1(p, q) = min_{pi in Pi(p, q)} <pi, cost>, p and q normalised to sum 1 first."""
    p, q = _distribution(p), _distribution(q)
    if cost.shape != (p.size, q.size):
        raise ValueError(f"cost has shape {cost.shape}, expected ({p.size}, {q.size})")
    return float(ot.emd2(p, q, cost, numItermax=1_000_000))


def drift_w1_heads(prev: np.ndarray, cur: np.ndarray, grid: int) -> np.ndarray:
    """d_{l,h} = W1(prev_{l,h}, cur_{l,h}) for (L, H, N) arrays; returns an (L, H) float64 array."""
    prev, cur = np.asarray(prev), np.asarray(cur)
    if prev.shape != cur.shape or prev.ndim != 3:
        raise ValueError(f"expected two (L, H, N) arrays, got {prev.shape} and {cur.shape}")
    cost = grid_cost(grid)
    L, H = cur.shape[:2]
    return np.array(
        [[drift_w1(prev[l, h], cur[l, h], cost) for h in range(H)] for l in range(L)], dtype=np.float64
    ).reshape(L, H)


def kappa(attn: np.ndarray, top_k: int) -> int:
    """kappa(A) = argmax_{1 <= k < K} (m_k - m_{k+1}), K = min(top_k, N), m the eigenvalue
    magnitudes of A (rows renormalised to sum 1) in descending order; the smallest k wins a
    tie, and 1 is returned when K < 2 (no gap to examine)."""
    a = np.asarray(attn, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected a square (N, N) matrix, got {a.shape}")
    a = a / a.sum(axis=1, keepdims=True)
    mags = np.sort(np.abs(scipy.linalg.eigvals(a)))[::-1][: min(top_k, a.shape[0])]
    if mags.size < 2:
        return 1
    return int(np.argmax(mags[:-1] - mags[1:])) + 1


def kappa_heads(attn: np.ndarray, top_k: int) -> np.ndarray:
    """kappa per head of an (L, H, N, N) array; returns an (L, H) int64 array."""
    attn = np.asarray(attn)
    if attn.ndim != 4:
        raise ValueError(f"expected an (L, H, N, N) array, got {attn.shape}")
    L, H = attn.shape[:2]
    return np.array([[kappa(attn[l, h], top_k) for h in range(H)] for l in range(L)], dtype=np.int64).reshape(
        L, H
    )


def relative_change(prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """r_l = ||cur_l - prev_l||_F / ||cur_l||_F for (L, ...) arrays; returns an (L,) float64
    array (inf where ``cur_l`` is all zero and differs from ``prev_l``, 0 where both are)."""
    prev, cur = np.asarray(prev, dtype=np.float64), np.asarray(cur, dtype=np.float64)
    if prev.shape != cur.shape or prev.ndim < 1:
        raise ValueError(f"expected two (L, ...) arrays of one shape, got {prev.shape} and {cur.shape}")
    L = cur.shape[0]
    diff = np.linalg.norm((cur - prev).reshape(L, -1), axis=1)
    norm = np.linalg.norm(cur.reshape(L, -1), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(diff == 0, 0.0, diff / norm)
