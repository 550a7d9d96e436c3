"""Frozen heads skip real work and leave the optimizer; trainable gradients stay exact."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitcae_ray.config import build_config
from vitcae_ray.freezing import (
    apply_frozen,
    flop_counter,
    frozen_heads,
    grad_elements,
    rebuild_optimizer,
    train_step_flops,
)
from vitcae_ray.losses import vitcae_loss
from vitcae_ray.model import Attention, build_model
from vitcae_ray.optim import build_lr_schedule, build_optimizer

CFG = build_config(
    {
        "model.depth": 3,
        "model.num_heads": 4,
        "model.embed_dim": 32,
        "model.dec_dim": 32,
        "model.dec_depth": 1,
        "data.image_size": 16,
        "model.patch_size": 2,
    }
)
FROZEN = [[1], [], [0, 3]]


def _model():
    torch.manual_seed(0)
    return build_model(CFG.model, 16, 1)


def _loss(model, x, seed=1):
    torch.manual_seed(seed)
    return vitcae_loss(model(x), x, 0, CFG.loss)["loss"]


def _rows_of(grad: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """The rows of an unfrozen model's grouped gradient (canonical head order) that belong to
    ``heads``, in that order."""
    per_head = grad.view(CFG.model.num_heads, -1, *grad.shape[1:])
    return per_head[heads].reshape(-1, *grad.shape[1:])


@pytest.mark.parametrize("mode,out_proj", [("weights", False), ("weights", True), ("detach", False)])
def test_active_rows_get_the_unfrozen_gradient_and_frozen_rows_none(mode, out_proj):
    x = torch.rand(4, 1, 16, 16)
    full, frozen = _model(), _model()
    apply_frozen(frozen, FROZEN, mode, out_proj=out_proj)
    assert frozen_heads(frozen) == FROZEN
    _loss(full, x).backward()
    _loss(frozen, x).backward()
    ref = dict(full.named_parameters())
    checked = 0
    for name, p in frozen.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            assert not name.startswith("blocks.") or name.endswith("_frozen"), name
            continue
        upstream = ("patch_embed.", "cls_token", "pos_embed", "blocks.0.", "blocks.1.", "blocks.2.norm1.")
        if mode == "detach" and name.startswith(upstream):
            continue  # below layer 2, no gradient flows back through its frozen heads' q/k/v
        if name.endswith("_active"):
            attn = frozen.get_submodule(name.rsplit(".", 1)[0])
            grouped = name.rsplit(".", 1)[1].removesuffix("_active")
            expected = _rows_of(ref[name].grad, attn.heads_in(grouped))
        else:
            expected = ref[name].grad
        # float32 summation order differs between the grouped and the plain matmuls
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
        checked += 1
    assert checked > (10 if mode == "detach" else 20)
    proj = frozen.blocks[2].attn.proj_weight_frozen
    assert proj.shape == ((2 * 8, 32) if out_proj else (0, 32)) and not proj.requires_grad


def test_frozen_weights_stay_bit_identical_and_leave_the_optimizer():
    model = _model()
    opt = build_optimizer(model, CFG.optim)
    sched = build_lr_schedule(opt, CFG.optim, 2, 10)
    x = torch.rand(4, 1, 16, 16)
    for _ in range(2):  # some AdamW state before freezing
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()
        sched.step()
    old_state = {
        n: opt.state[p]["exp_avg"].clone()
        for n, p in model.named_parameters()
        if n == "blocks.2.attn.qkv_weight_active"
    }
    carried = apply_frozen(model, FROZEN, "weights", opt)
    opt, sched = rebuild_optimizer(model, opt, sched, CFG, 10, carried)
    attn = model.blocks[2].attn
    # surviving heads 1, 2 keep their AdamW moments
    torch.testing.assert_close(
        opt.state[attn.qkv_weight_active]["exp_avg"],
        _rows_of(old_state["blocks.2.attn.qkv_weight_active"], [1, 2]),
    )
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen_params = [p for p in model.parameters() if not p.requires_grad]
    assert frozen_params and all(id(p) not in optimized and p not in opt.state for p in frozen_params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()
        sched.step()
    for name, p in model.named_parameters():
        if name.endswith("_frozen"):
            assert torch.equal(p, before[name]), name
    assert not torch.equal(attn.qkv_weight_active, before["blocks.2.attn.qkv_weight_active"])
    # the full per-head view puts the frozen heads back in place, unchanged
    frozen_rows = before["blocks.2.attn.qkv_weight_frozen"].view(2, 3, 8, 32).transpose(0, 1)
    assert torch.equal(attn.qkv_weight[:, [0, 3]], frozen_rows)


@pytest.mark.parametrize("variant", ["vitcae", "vitvae"])
def test_flops_detach_lt_weights_lt_unfrozen_and_fewer_grad_elements(variant):
    cfg = build_config({**CFG.to_dict(), "model": {**CFG.to_dict()["model"], "variant": variant}})
    x = torch.rand(8, 1, 16, 16)
    every = [[0, 1, 2, 3]] * 3
    counts, elements = {}, {}
    for mode in ("none", "weights", "detach"):
        torch.manual_seed(0)
        model = build_model(cfg.model, 16, 1)
        if mode != "none":
            apply_frozen(model, every, mode)
        counts[mode] = train_step_flops(model, x, cfg, 0)
        elements[mode] = grad_elements(model)
    assert counts["detach"] < counts["weights"] < counts["none"]
    assert elements["weights"] == elements["detach"] < elements["none"]


@pytest.mark.parametrize("mode", ["weights", "detach"])
def test_state_dict_is_the_full_per_head_layout_whatever_is_frozen(mode):
    model = _model()
    apply_frozen(model, FROZEN, mode)
    plain = _model()
    assert model.state_dict().keys() == plain.state_dict().keys()
    fresh = build_model(CFG.model, 16, 1)
    fresh.load_state_dict(model.state_dict())
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(fresh(x, sample=False).recon, model(x, sample=False).recon)
    regrouped = build_model(CFG.model, 16, 1)
    apply_frozen(regrouped, [[0], [2], []], "weights")
    regrouped.load_state_dict(model.state_dict())
    torch.testing.assert_close(regrouped(x, sample=False).recon, model(x, sample=False).recon)


def test_detach_mode_blocks_gradient_through_frozen_heads_only():
    model = _model()
    apply_frozen(model, [[0, 1, 2, 3], [], []], "detach")
    x = torch.rand(2, 1, 16, 16)
    _loss(model, x).backward()
    # layer 0's attention contributes no gradient, but the residual path still reaches the embedding
    assert model.blocks[0].attn.qkv_weight_frozen.grad is None
    assert model.patch_embed.weight.grad is not None and model.patch_embed.weight.grad.abs().sum() > 0


class _OpCounter(TorchDispatchMode):
    """Counts the operators dispatched (forward, backward and optimizer kernels alike)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(frac: float, mode: str, out_proj: bool) -> int:
    model = _model()
    k = round(frac * CFG.model.num_heads)
    apply_frozen(model, [list(range(k))] * CFG.model.depth, mode, out_proj=out_proj)
    opt = build_optimizer(model, CFG.optim)
    x = torch.rand(4, 1, 16, 16)
    model.set_readout(True)

    def step():
        opt.zero_grad(set_to_none=True)
        _loss(model, x).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()

    step()  # AdamW creates its state on the first step
    with _OpCounter() as counter:
        step()
    return counter.count


@pytest.mark.parametrize("mode,out_proj", [("weights", False), ("detach", False), ("weights", True)])
def test_freezing_never_adds_operators_to_a_training_step(mode, out_proj):
    """The CPU check for GPU step time: kernel launches per step must not grow with freezing."""
    counts = {frac: _ops_per_step(frac, mode, out_proj) for frac in (0.0, 0.5, 1.0)}
    assert counts[0.5] <= counts[0.0] and counts[1.0] <= counts[0.0], counts


def test_sdpa_flops_are_counted_like_the_manual_path():
    torch.manual_seed(0)
    fused, manual = Attention(32, 4, fused=True), Attention(32, 4, fused=False)
    manual.load_state_dict(fused.state_dict())
    x = torch.randn(3, 17, 32)
    counts = {}
    for name, attn in (("fused", fused), ("manual", manual)):
        with flop_counter() as fwd:
            y = attn(x.clone().requires_grad_())
        with flop_counter() as bwd:
            y.square().sum().backward()
        counts[name] = fwd.get_total_flops(), bwd.get_total_flops()
    assert counts["fused"][0] == counts["manual"][0] > 0
    # the fused backward recomputes the scores, one (B, H, T, T) matmul the manual path keeps
    recompute = 2 * 3 * 4 * 17 * 17 * 8
    assert counts["fused"][1] == counts["manual"][1] + recompute


@pytest.mark.parametrize("out_proj", [False, True])
def test_state_dict_round_trips_across_any_grouping(out_proj):
    gen = torch.Generator().manual_seed(0)
    model = _model()
    x = torch.rand(3, 1, 16, 16)
    expected = model(x, sample=False).recon
    for _ in range(4):
        groups = [
            sorted(torch.randperm(4, generator=gen)[: int(torch.randint(0, 5, (1,), generator=gen))].tolist())
            for _ in range(CFG.model.depth)
        ]
        other = build_model(CFG.model, 16, 1)
        apply_frozen(other, groups, "weights", out_proj=out_proj)
        other.load_state_dict(model.state_dict())
        torch.testing.assert_close(other(x, sample=False).recon, expected)
        model = other  # the next grouping loads from this one's state dict
    assert model.state_dict().keys() == _model().state_dict().keys()


def test_grouped_matmuls_under_bf16_autocast_match_the_unfrozen_gradients():
    x = torch.rand(4, 1, 16, 16)
    full, frozen = _model(), _model()
    apply_frozen(frozen, FROZEN, "weights", out_proj=True)
    for m in (full, frozen):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, sample=False)
        vitcae_loss(out, x, 0, CFG.loss)["loss"].backward()
    attn, ref = frozen.blocks[2].attn, full.blocks[2].attn
    for name in ("qkv_weight", "qkv_bias", "tau", "proj_weight"):
        got = getattr(attn, f"{name}_active").grad
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        expected = _rows_of(getattr(ref, f"{name}_active").grad, attn.heads_in(name))
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.02 * float(expected.abs().max()))
