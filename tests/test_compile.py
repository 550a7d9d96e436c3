"""``train.compile``: torch.compile gives the eager results, compiles once per frozen set, and
runs through the trainer. Compiling on 2 CPU cores takes minutes: marker ``slow``, run with
``python -m pytest -m slow``."""

import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from vitcae_ray.config import build_config
from vitcae_ray.freezing import apply_frozen
from vitcae_ray.losses import vitcae_loss
from vitcae_ray.model import build_model
from vitcae_ray.optim import build_optimizer
from vitcae_ray.train import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg(tiny_config):
    return build_config(tiny_config)


def _steps(cfg, model, forward, n: int, seed: int = 0):
    """n training steps with the readout on; (losses, readout sums) of every step."""
    torch.manual_seed(seed)
    opt = build_optimizer(model, cfg.optim)
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    losses, readouts = [], []
    for _ in range(n):
        model.set_readout(True)
        opt.zero_grad(set_to_none=True)
        loss = vitcae_loss(forward(x, sample=False), x, 10, cfg.loss)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
        readouts.append(model.cls_attention()[0])
    return losses, readouts


def test_compiled_steps_match_eager_and_compile_once_per_frozen_set(cfg):
    torch._dynamo.reset()
    counters.clear()
    for frozen in ([[], []], [[0], [0, 1]]):
        torch.manual_seed(0)
        eager = build_model(cfg.model, 16, 1)
        apply_frozen(eager, frozen)
        compiled = build_model(cfg.model, 16, 1)
        compiled.load_state_dict(eager.state_dict())
        apply_frozen(compiled, frozen)
        torch._dynamo.reset()
        graphs = counters["stats"]["unique_graphs"]
        want_loss, want_readout = _steps(cfg, eager, eager, 4)
        got_loss, got_readout = _steps(cfg, compiled, torch.compile(compiled), 4)
        assert got_loss == pytest.approx(want_loss, rel=1e-4)
        for got, want in zip(got_readout, want_readout):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # one graph for the training step, however many steps (no per-step recompiles)
        assert counters["stats"]["unique_graphs"] - graphs == 1


@pytest.mark.ray  # Ray Train's local mode
def test_training_with_compile_freezes_mid_run(tmp_path, tiny_config):
    out = tmp_path / "run"
    freeze = {
        "freeze.min_epoch": 1,
        "freeze.patience": 1,
        "freeze.kappa_window": 1,
        "freeze.drift_ratio": 1e6,
        "freeze.max_frozen_frac": 0.5,
    }
    cfg = build_config(
        {
            **tiny_config,
            **freeze,
            "train.compile": True,
            "train.num_workers": 0,
            "train.cpus_per_worker": 1.0,
            "train.log_images": False,
            "train.eval_every": 0,
            "train.epochs": 3,
            "train.output": str(out),
        }
    )
    run(cfg, verbose=False)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["heads/frozen"] for m in history] == [0, 0, 2]
    assert history[2]["flops/train_step"] < history[1]["flops/train_step"]
    assert all(m["train/loss"] == m["train/loss"] for m in history)  # finite, not NaN
