"""The frozen prefix's output, kept per training image, so its forward runs once per image
instead of once per epoch (Egeria's activation cache).

Once encoder blocks ``0..k-1`` are frozen whole (``ViTCAE.set_frozen_blocks``), what they
output for a training image depends on the image alone: the encoder has no dropout, the
training images come from a map-style dataset without random augmentation, the frozen
parameters do not move, and the scheduler keeps a frozen head's temperature factor. The
cache stores, per row of the train split, the prefix's output tokens and its layers' CLS
readout rows. On a hit the step starts at block ``k`` and the stored rows are added to the
readout in batch order, so the convergence scheduler sees what it would see without the
cache. A change of the prefix empties it; nothing of it is checkpointed (a resumed run
refills it in its first epoch).

Memory, on the training device: ``rows x (1 + N) x D`` token values plus ``rows x k x H x
(1 + N)`` readout values, fp32 counted, and a flag per row. A train split that does not fit
``freeze.cache_mb`` runs the prefix every step, as does a streamed one (Ray Data shards carry
no row index).

Validation keeps a second cache of its own, over each rank's validation images and without
readout rows (validation runs with the readout off): its prefix then runs once per image,
not at every epoch's validation.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .model import ViTCAE


class Indexed(Dataset):
    """``dataset``'s items with their index appended: ``(x, y, i)``, the cache's key."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return (*self.dataset[i], i)


def cache_bytes(model: ViTCAE, rows: int, depth: int, readout: bool = True) -> int:
    """Bytes the cache of a ``depth``-block prefix holds for ``rows`` images, fp32 counted,
    with a one-byte flag per row; ``readout`` False: without the readout rows."""
    tokens = model.num_patches + 1
    per_row = tokens * model.cfg.embed_dim + readout * depth * model.cfg.num_heads * tokens
    return rows * (4 * per_row + 1)


class PrefixCache:
    """Args:
    rows: the split's length (the loader yields each image's index in it): the train split,
        or a rank's share of the validation split.
    limit_mb: the most memory the cache may take, MiB; 0 turns it off.
    readout: keep the prefix layers' CLS readout rows (training); False for validation, which
        runs with the readout off.
    """

    def __init__(self, rows: int, limit_mb: float, readout: bool = True) -> None:
        self.rows, self.limit, self.keeps_readout = rows, limit_mb * 2**20, readout
        self.depth = 0
        self.tokens: torch.Tensor | None = None  # (rows, 1 + N, D)
        self.readout: torch.Tensor | None = None  # (rows, depth, H, 1 + N)
        self.valid: torch.Tensor | None = None  # (rows,) bool
        self.computed = 0  # images whose prefix ran, since the last take_computed()

    def serves(self, model: ViTCAE) -> bool:
        """Whether steps of ``model`` (its current prefix) read their prefix from the cache."""
        k = model.frozen_blocks
        return k > 0 and self.limit > 0 and cache_bytes(model, self.rows, k, self.keeps_readout) <= self.limit

    def nbytes(self) -> int:
        """Bytes the cache holds now."""
        held = (self.tokens, self.readout, self.valid)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def take_computed(self) -> int:
        """Images whose prefix the cache ran since the last call (a FLOP count's input)."""
        n, self.computed = self.computed, 0
        return n

    def prefix(self, model: ViTCAE, x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor | None:
        """The prefix's output for the batch ``x`` of train rows ``index`` (B,), running the
        prefix for the rows not cached yet, and their readout added to the prefix layers'
        sums; None when the cache does not serve (no prefix, no index, over the limit): the
        model then runs the prefix itself."""
        if index is None or not self.serves(model):
            return None
        if model.frozen_blocks != self.depth:
            self.depth, self.tokens, self.readout, self.valid = model.frozen_blocks, None, None, None
        index = index.to(x.device)
        miss = torch.ones_like(index, dtype=torch.bool) if self.valid is None else ~self.valid[index]
        if bool(miss.any()):
            if self.keeps_readout:
                tokens, rows = model.forward_prefix(x[miss], with_rows=True)
            else:
                tokens, rows = model.forward_prefix(x[miss]), None
            if self.valid is None:
                self.tokens = tokens.new_empty(self.rows, *tokens.shape[1:])
                self.readout = None if rows is None else rows.new_empty(self.rows, *rows.shape[1:])
                self.valid = torch.zeros(self.rows, dtype=torch.bool, device=x.device)
            self.tokens[index[miss]] = tokens
            if rows is not None:
                self.readout[index[miss]] = rows
            self.valid[index[miss]] = True
            self.computed += int(miss.sum())
        if self.readout is not None:
            model.record_prefix_readout(self.readout[index])
        return self.tokens[index]
