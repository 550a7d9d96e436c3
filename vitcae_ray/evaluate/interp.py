"""``interp``: decoded paths between validation images of different classes."""

from __future__ import annotations

import numpy as np
import torch

from .. import metrics as M


@torch.no_grad()
def task_interp(model, xv, yv, seed: int, pairs: int = 8, steps: int = 10):
    """Pairs of validation images of different classes where possible: z_cls by slerp,
    z_patch linearly. -> (metrics, strips, steps)."""
    rng = np.random.default_rng(seed)
    strips = []
    for _ in range(min(pairs, len(xv) // 2)):
        i = int(rng.integers(len(xv)))
        other = np.flatnonzero(yv != yv[i])
        j = int(rng.choice(other)) if len(other) else int((i + 1) % len(xv))
        strips.append(M.interpolate(model, xv[i], xv[j], steps))
    change, ratio = M.interpolation_smoothness(strips)
    return {"interp/step_change": change, "interp/smoothness": ratio}, torch.cat(strips), steps
