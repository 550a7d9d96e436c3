"""The frozen prefix cache: a step it serves is the step without it (outputs, gradients,
the scheduler's readout), its FLOPs are counted as run, it respects its memory limit, and
training with it trains the same weights as training without it."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from vitcae_ray.config import build_config
from vitcae_ray.engine import init_model, seed_everything, train_one_epoch
from vitcae_ray.freezing import FlopAccount, apply_frozen, prefix_image_flops, train_step_flops
from vitcae_ray.losses import vitcae_loss
from vitcae_ray.optim import build_lr_schedule, build_optimizer
from vitcae_ray.prefix_cache import Indexed, PrefixCache, cache_bytes

CPU = torch.device("cpu")
SMALL = {"data.image_size": 16, "loss.kl_warmup_epochs": 0}


def _model(blocks: int = 2):
    """The quickstart model at 16x16 with blocks 0..blocks-1 frozen whole and one more head."""
    cfg = build_config(SMALL)
    model = init_model(cfg, 1, CPU)
    L, H = cfg.model.depth, cfg.model.num_heads
    apply_frozen(model, [list(range(H))] * blocks + [[0]] + [[]] * (L - blocks - 1), blocks)
    return cfg, model


def _readout(model):
    return [(a.cls_attn_sum.clone(), a.cls_attn_odd.clone()) for a in model.attention_layers]


def test_a_served_step_equals_the_uncached_one_outputs_gradients_and_readout():
    cfg, model = _model()
    x = torch.rand(8, 1, 16, 16)
    index = torch.tensor([11, 3, 7, 0, 5, 2, 9, 14])

    def step(prefix=None, cache=None):
        model.zero_grad(set_to_none=True)
        model.set_readout(True)
        if cache is not None:
            prefix = cache.prefix(model, x, index)
        out = model(x, sample=False, decode_prior=True, prefix=prefix)
        torch.manual_seed(0)  # the MMD's prior draws
        vitcae_loss(out, x, 5, cfg.loss)["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.recon.detach(), grads, _readout(model)

    ref_recon, ref_grads, ref_readout = step()
    cache = PrefixCache(16, 64)
    cache.prefix(model, x[:3], index[:3])  # a partial fill first: the batch mixes hits and misses
    assert cache.computed == 3
    for _ in range(2):  # then the rest of the batch misses, then all of it hits
        recon, grads, readout = step(cache=cache)
        assert torch.equal(recon, ref_recon)
        assert grads.keys() == ref_grads.keys() and "blocks.0.norm1.weight" not in grads
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=0, atol=0)
        # the readout rows land in batch order: the sums over all and over the odd samples
        assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(readout, ref_readout))
    assert cache.computed == 8


def test_the_cache_serves_what_it_stored_and_refills_when_the_prefix_grows():
    _, model = _model()
    x, index = torch.rand(4, 1, 16, 16), torch.arange(4)
    cache = PrefixCache(4, 64)
    fresh = model.forward_prefix(x)
    assert torch.equal(cache.prefix(model, x, index), fresh)
    # a deliberately wrong key serves another image's tokens
    assert not torch.equal(cache.prefix(model, x, index.flip(0)), fresh)
    # the cache does not rerun the prefix: a weight moved under it shows as a stale entry,
    # which is why only a frozen prefix is cached
    with torch.no_grad():
        model.blocks[0].mlp[0].weight.add_(0.1)
    assert not torch.equal(cache.prefix(model, x, index), model.forward_prefix(x))
    # a longer prefix empties it and fills it anew
    cache.take_computed()
    apply_frozen(model, [[0, 1, 2, 3]] * 3 + [[]], 3)
    assert torch.equal(cache.prefix(model, x, index), model.forward_prefix(x))
    assert cache.take_computed() == 4 and cache.depth == 3


def test_the_memory_limit_turns_the_cache_off_and_what_it_holds_is_measured():
    _, model = _model()
    rows, need = 10, cache_bytes(model, 10, 2)
    # (1 + 16 tokens) x (64 + 2 layers x 4 heads) fp32 values per row, and its flag
    assert need == rows * (4 * 17 * (64 + 2 * 4) + 1)
    x, index = torch.rand(2, 1, 16, 16), torch.tensor([4, 9])
    tight = PrefixCache(rows, (need - 1) / 2**20)
    assert not tight.serves(model) and tight.prefix(model, x, index) is None and tight.nbytes() == 0
    roomy = PrefixCache(rows, need / 2**20)
    assert roomy.serves(model) and roomy.prefix(model, x, None) is None  # no row index: no cache
    roomy.prefix(model, x, index)
    assert roomy.nbytes() == need
    assert not PrefixCache(rows, 0).serves(model)
    apply_frozen(model, [[]] * 4, 0)
    assert not roomy.serves(model)  # nothing frozen whole: nothing to cache


def test_flops_of_a_served_step_plus_its_fills_are_the_uncached_step():
    cfg, model = _model()
    x = torch.rand(4, 1, 16, 16)
    served = train_step_flops(model, x, cfg, 5, readout=True, cached=True)
    full = train_step_flops(model, x, cfg, 5, readout=True)
    fill = prefix_image_flops(model, x)
    assert served + 4 * fill == full
    # an independent count of a fill: torch's own counter on the embedding and the two blocks
    # (it counts CPU attention as 0), plus per layer the attention's two matmuls, 4 B H T^2 d,
    # and the readout rows', 2 B H T d
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        t = model.embed(x)
        for blk in model.blocks[:2]:
            t = blk(t)
    B, H, T, d = 4, 4, 17, 16
    assert fill * B == counter.get_total_flops() + 2 * (4 * B * H * T * T * d + 2 * B * H * T * d)
    cache = PrefixCache(100, 64)
    account = FlopAccount(model, x, cfg, x[:2], cache)
    plain = FlopAccount(model, x, cfg, x[:2], None)
    assert account.prefix_image == fill and plain.prefix_image == 0.0
    spent = account.epoch_metrics(5, 25, [], prefix_images=100)["flops/epoch"]
    assert spent == plain.epoch_metrics(5, 25, [])["flops/epoch"]  # every image filled once
    assert account.epoch_metrics(5, 25, [], prefix_images=0)["flops/epoch"] == spent - 100 * fill


def test_training_with_the_cache_trains_the_same_weights_as_without():
    images = torch.rand(24, 1, 16, 16)
    results = []
    for cached in (False, True):
        cfg, model = _model()
        data = TensorDataset(images, torch.zeros(24))
        loader = DataLoader(Indexed(data) if cached else data, batch_size=8, shuffle=True)
        opt = build_optimizer(model, cfg.optim)
        sched = build_lr_schedule(opt, cfg.optim, 2, len(loader))
        cache = PrefixCache(24, 64) if cached else None
        computed = []
        for epoch in range(2):
            seed_everything(0, epoch, 0)
            model.set_readout(True)
            metrics = train_one_epoch(model, loader, opt, sched, epoch, cfg, CPU, cache=cache)
            computed.append(cache.take_computed() if cached else 0)
        results.append((model.state_dict(), metrics, _readout(model), computed))
    (plain, m0, r0, _), (served, m1, r1, computed) = results
    assert computed == [24, 0]  # every image's prefix ran once, in the first epoch
    for name, value in plain.items():
        torch.testing.assert_close(served[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert m1["train/loss"] == pytest.approx(m0["train/loss"], rel=1e-5)
    for (a, c), (b, d) in zip(r1, r0):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, d)


def test_validation_with_the_cache_gives_the_uncached_metrics():
    """The validation rows' cache: val/elbo, val/mse and every other term as without it, in
    the first epoch (filled) and the next (served), with the prefix run once per image."""
    from vitcae_ray.engine import evaluate

    images = torch.rand(20, 1, 16, 16)
    data = TensorDataset(images, torch.zeros(20))
    cfg, model = _model(blocks=4)
    plain = evaluate(model, DataLoader(data, batch_size=8), 5, cfg, CPU)
    cache = PrefixCache(20, 64, readout=False)
    indexed = DataLoader(Indexed(data), batch_size=8)
    for computed in (20, 0):
        assert evaluate(model, indexed, 5, cfg, CPU, cache=cache) == plain
        assert cache.take_computed() == computed
    # a wrong key (another image's tokens) moves the metrics: the comparison can fail
    with torch.no_grad():
        cache.tokens[:10] = cache.tokens[10:].clone()
    assert evaluate(model, indexed, 5, cfg, CPU, cache=cache)["val/mse"] != plain["val/mse"]
    # it holds the tokens alone: validation runs with the readout off
    assert cache.readout is None and cache.nbytes() == cache_bytes(model, 20, 4, readout=False)
    assert cache_bytes(model, 20, 4, readout=False) < cache_bytes(model, 20, 4)


def test_the_probe_pass_is_reused_only_once_the_whole_encoder_is_frozen():
    from vitcae_ray.engine import head_statistics

    probe = torch.rand(6, 1, 16, 16)
    odd = torch.arange(6) % 2 == 1
    x = torch.rand(4, 1, 16, 16)

    def stats(model, memo):
        model.set_readout(True)
        model(x)
        return head_statistics(model, probe, odd, memo)

    cfg, model = _model(blocks=2)
    memo = {}
    first = stats(model, memo)
    assert first.probe_ran and not memo  # a prefix of 2 of 4 blocks: the pass runs
    apply_frozen(model, [list(range(cfg.model.num_heads))] * 4, 4)
    fresh = stats(model, memo)
    assert fresh.probe_ran and "probe_pass" in memo
    again = stats(model, memo)
    assert not again.probe_ran
    # the reused maps are the ones a fresh pass computes now
    now = stats(model, None)
    for a, b in ((again.patch, now.patch), (again.block_maps, now.block_maps)):
        assert torch.equal(a, b)
    # and the epoch that reused them is charged no probe pass; the run without freezing is
    account = FlopAccount(model, x, cfg, probe)
    ran = account.epoch_metrics(5, 10, [])
    reused = account.epoch_metrics(5, 10, [], probe_ran=False)
    assert account.probe > 0
    assert reused["flops/epoch"] == ran["flops/epoch"] - account.probe
    assert reused["flops/epoch_unfrozen"] == ran["flops/epoch_unfrozen"]
