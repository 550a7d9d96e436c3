"""The trainer's periodic evaluation (rank 0, every ``train.eval_every`` epochs)."""

from __future__ import annotations

import numpy as np
import torch

from .. import metrics as M
from ..cls_mixture import fit_cls_mixture
from .features import feature_net
from .generation import draw_samples, fid_kid
from .interp import task_interp
from .loading import stack_split
from .probe import linear_probe, representations


def holdout_probe(model, xtr, ytr, xv, yv) -> float:
    """Validation accuracy of :func:`~.probe.linear_probe` fitted on the training split's
    ``representation(x)``: the cheap per-epoch probe (``evaluate`` cross-validates)."""

    def rep(x: torch.Tensor) -> np.ndarray:
        return next(iter(representations(model, x).values()))  # representation(x)'s vector

    return float((linear_probe().fit(rep(xtr), ytr).predict(rep(xv)) == yv).mean())


class EpochEvaluator:
    """``val/probe_acc`` (hold-out probe), ``val/fid`` and ``val/kid`` of samples (z_cls from
    the mixture fitted here) against the training split in the dataset's cached feature
    space, with fixed data, seed and sample count (the validation split's size, at most
    ``max_val``), so epochs and trials compare; and the inpainting and interpolation grids.

    Holds at most ``max_train`` training and ``max_val`` validation images; the feature
    classifier is loaded from its cache, or trained and cached once, here."""

    def __init__(
        self,
        train_set,
        val_set,
        dataset: str = "data",
        seed: int = 0,
        max_train: int = 5000,
        max_val: int = 1000,
        log=print,
        recon_weight: float = 10.0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.xtr, self.ytr = stack_split(train_set, max_train, rng)
        self.xv, self.yv = stack_split(val_set, max_val, rng)
        self.seed, self.recon_weight = seed, recon_weight
        self.net, _ = feature_net(dataset, self.xtr, self.ytr, self.xv, self.yv, log=log)
        self.ref = self.net.features(self.xtr)

    @torch.no_grad()
    def __call__(self, model, device, epoch: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """-> (metrics, {name: grid image (C, H, W)}); ``model`` is the unwrapped model. A
        model with z_cls gets a mixture fitted on the training images' posterior means
        (``model.cls_mixture``, fitted at ``epoch``), which the samples (and every later
        ``generate``) draw z_cls from."""
        from ..outputs import grid_image
        from .inpaint import masked_inputs

        was_training = model.training
        model.eval()
        acc = holdout_probe(model, self.xtr, self.ytr, self.xv, self.yv)
        if model.has_z_cls:
            model.cls_mixture = fit_cls_mixture(model, self.xtr, device, self.seed)
            model.cls_mixture_epoch = epoch
        samples = draw_samples(model, len(self.xv), self.seed, device)
        fid, kid, _ = fid_kid(self.ref, self.net.features(samples), self.seed)
        k = min(8, len(self.xv))
        x, mean_image = self.xv[:k], self.xtr.mean(0, keepdim=True)
        mask, _, hidden, seen = masked_inputs(model, x, mean_image, "center25", self.seed)
        filled = M.inpaint(model, seen, mask, paste=hidden, recon_weight=self.recon_weight).cpu()
        _, strips, steps = task_interp(model, self.xv, self.yv, self.seed, pairs=2)
        model.train(was_training)
        grey = torch.where(hidden, torch.full_like(x, 0.5), x)
        images = {
            "inpainting": grid_image(torch.cat([grey, filled, x]), k),
            "interpolation": grid_image(strips, steps),
        }
        return {"val/probe_acc": acc, "val/fid": fid, "val/kid": kid}, images
