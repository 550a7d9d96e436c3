"""Frozen heads and blocks skip real work and leave the optimizer; what trains stays exact.

The attention layer's own gradients are checked against plain PyTorch in test_attention.py;
here, the whole model: frozen parameters get no gradient and never move, everything above
the frozen parts gets the unfrozen model's gradient, FLOPs fall with what is frozen, and the
optimizer state follows parameter names across a changed frozen set."""

import pytest
import torch

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
from vitcae_ray.optim import build_lr_schedule, build_optimizer, load_optimizer_state, optimizer_state

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
ABOVE_ENCODER = ("norm.", "to_z_cls.", "to_z_patch.", "prior.", "dec_")


def _model():
    torch.manual_seed(0)
    return build_model(CFG.model, 16, 1)


def _loss(model, x, seed=1):
    torch.manual_seed(seed)
    return vitcae_loss(model(x), x, 0, CFG.loss)["loss"]


def _grads(model, x) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    _loss(model, x).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("blocks", [0, 1, 3])
def test_frozen_parts_get_no_gradient_and_the_rest_the_unfrozen_gradient(blocks):
    x = torch.rand(4, 1, 16, 16)
    full, frozen = _model(), _model()
    heads = [list(range(4)) if i < blocks else h for i, h in enumerate(FROZEN)]
    assert apply_frozen(frozen, heads, blocks)
    assert frozen_heads(frozen) == heads and frozen.frozen_blocks == blocks
    ref, got = _grads(full, x), _grads(frozen, x)
    head_params = {
        f"blocks.{l}.attn.heads.{h}.{p}"
        for l, hs in enumerate(heads)
        for h in hs
        for p in ("weight", "bias", "tau")
    }
    prefix = ("patch_embed.", "cls_token", "pos_embed", *(f"blocks.{i}." for i in range(blocks)))
    checked = 0
    for name, p in frozen.named_parameters():
        if name in head_params or (blocks and name.startswith(prefix)):
            assert not p.requires_grad and got[name] is None, name
        else:
            assert p.requires_grad and got[name] is not None, name
        if name.startswith(ABOVE_ENCODER):  # the backward reaches these before any frozen part
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked > 10
    # the forward is unchanged by freezing
    torch.testing.assert_close(frozen(x, sample=False).recon, full(x, sample=False).recon)
    # a deliberately broken freeze (the heads' own flag left on) is caught by the flags above
    assert any(p.requires_grad for p in full.blocks[2].attn.heads[0].parameters())


def test_the_frozen_prefix_runs_without_autograd():
    model = _model()
    apply_frozen(model, [list(range(4))] * 2 + [[]], 2)
    seen = {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.requires_grad))
    model(torch.rand(2, 1, 16, 16))
    assert seen == {0: False, 1: False, 2: True}
    with pytest.raises(ValueError, match="frozen blocks"):
        model.set_frozen_blocks(4)


def test_frozen_weights_stay_bit_identical_and_the_rest_keep_their_adamw_state():
    model = _model()
    opt = build_optimizer(model, CFG.optim)
    sched = build_lr_schedule(opt, CFG.optim, 2, 10)
    x = torch.rand(4, 1, 16, 16)
    for _ in range(2):  # some AdamW state before freezing
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()
        sched.step()
    kept = model.blocks[2].attn.heads[1].weight
    moment = opt.state[kept]["exp_avg"].clone()
    lr = opt.param_groups[0]["lr"]
    apply_frozen(model, FROZEN, 1)
    opt, sched = rebuild_optimizer(model, opt, sched, CFG, 10)
    assert torch.equal(opt.state[kept]["exp_avg"], moment) and opt.param_groups[0]["lr"] == lr
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
        assert torch.equal(p, before[name]) == (not p.requires_grad), name


def test_optimizer_state_follows_names_across_a_changed_frozen_set():
    model = _model()
    apply_frozen(model, FROZEN, 0)
    opt = build_optimizer(model, CFG.optim)
    opt.zero_grad()
    _loss(model, torch.rand(2, 1, 16, 16)).backward()
    opt.step()
    saved = optimizer_state(model, opt)
    assert "blocks.2.attn.heads.1.weight" in saved["state"]
    assert "blocks.2.attn.heads.0.weight" not in saved["state"]  # frozen: never trained
    # resume with another frozen set: shared names carry their state, the rest start fresh
    other = _model()
    other.load_state_dict(model.state_dict())
    apply_frozen(other, [[], [2], []], 0)
    new_opt = build_optimizer(other, CFG.optim)
    load_optimizer_state(other, new_opt, saved)
    w1 = other.blocks[2].attn.heads[1].weight
    torch.testing.assert_close(
        new_opt.state[w1]["exp_avg"], saved["state"]["blocks.2.attn.heads.1.weight"]["exp_avg"]
    )
    assert other.blocks[2].attn.heads[0].weight not in new_opt.state  # trains now, fresh
    assert other.blocks[1].attn.heads[2].weight not in new_opt.state  # frozen now: dropped
    new_opt.zero_grad()
    _loss(other, torch.rand(2, 1, 16, 16)).backward()
    new_opt.step()  # a fresh parameter's state is created, a carried one goes on


@pytest.mark.parametrize("variant", ["vitcae", "vitvae"])
def test_flops_and_grad_elements_fall_with_what_is_frozen(variant):
    cfg = build_config({**CFG.to_dict(), "model": {**CFG.to_dict()["model"], "variant": variant}})
    x = torch.rand(8, 1, 16, 16)
    every = [list(range(4))] * 3
    settings = [([[]] * 3, 0), (FROZEN, 0), (every, 0), (every, 1), (every, 2), (every, 3)]
    counts, elements = [], []
    for heads, blocks in settings:
        torch.manual_seed(0)
        model = build_model(cfg.model, 16, 1)
        apply_frozen(model, heads, blocks)
        counts.append(train_step_flops(model, x, cfg, 0))
        elements.append(grad_elements(model))
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == len(counts), counts
    assert elements == sorted(elements, reverse=True) and len(set(elements)) == len(elements), elements


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


def test_state_dict_loads_across_any_frozen_set():
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
        apply_frozen(other, groups, 0)
        other.load_state_dict(model.state_dict())
        torch.testing.assert_close(other(x, sample=False).recon, expected)
        model = other  # the next frozen set loads from this one's state dict
    assert model.state_dict().keys() == _model().state_dict().keys()


def test_frozen_heads_under_bf16_autocast_match_the_fp32_gradients():
    x = torch.rand(4, 1, 16, 16)
    ref, bf16 = _model(), _model()
    for m in (ref, bf16):
        apply_frozen(m, FROZEN, 0)
    g32 = _grads(ref, x)
    bf16.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bf16(x, sample=False)
    torch.manual_seed(1)
    vitcae_loss(out, x, 0, CFG.loss)["loss"].backward()
    torch.manual_seed(1)
    ref.zero_grad(set_to_none=True)
    vitcae_loss(ref(x, sample=False), x, 0, CFG.loss)["loss"].backward()
    for h in (1, 2):
        got, want = bf16.blocks[2].attn.heads[h].weight.grad, ref.blocks[2].attn.heads[h].weight.grad
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0.1, atol=0.05 * float(want.abs().max()))
    assert g32["blocks.2.attn.heads.0.weight"] is None


@pytest.mark.parametrize("blocks", [0, 2])
def test_masked_step_flops_are_a_quadratic_in_the_encoder_tokens(blocks):
    """Three counted steps fix the polynomial; it must give every other kept-patch count's
    FLOPs exactly, as the counter measures them, and the epoch's account adds them."""
    from vitcae_ray.freezing import FlopAccount, masked_flops, masked_step_flops_by_phase

    model = _model()
    apply_frozen(model, [[0, 1, 2, 3]] * blocks + [[]] * (3 - blocks), blocks)
    x = torch.rand(4, 1, 16, 16)
    coef = masked_step_flops_by_phase(model, x, CFG)
    for phase, epoch in ((False, 0), (True, CFG.loss.kl_warmup_epochs)):
        for kept in (5, 17, 40, 63):
            t = 1 + kept
            want = train_step_flops(model, x, CFG, epoch, kept=kept)
            assert masked_flops(coef[phase], 1, t, t * t) == want, (phase, kept)
    # fewer tokens cost less; the full step (readout on) costs more than any masked one
    full = train_step_flops(model, x, CFG, 0, readout=True)
    assert train_step_flops(model, x, CFG, 0, kept=10) < train_step_flops(model, x, CFG, 0, kept=50) < full
    masking = build_config({**CFG.to_dict(), "loss": {**CFG.to_dict()["loss"], "mask_prob": 0.5}})
    account = FlopAccount(model, x, masking, probe=torch.zeros(0, 1, 16, 16))
    plain = account.epoch_metrics(0, 10, [])
    mixed = account.epoch_metrics(0, 10, [], masked=(2, 18 + 34, 18 * 18 + 34 * 34))
    steps = [train_step_flops(model, x, CFG, 0, kept=k) for k in (17, 33)]
    assert mixed["flops/epoch"] == plain["flops/epoch"] - 2 * account.step[False] + sum(steps)
