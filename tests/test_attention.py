"""The attention module against an independent reference: per-head loops over the canonical
tensors, where a frozen head's q/k/v come from the detached input and detached weights."""

import copy
import math

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

from vitcae_ray.model.attention import Attention, HeadProjection

D, H, HD, B, T = 16, 4, 4, 3, 5


def _layer(fused=True, frozen=(), dtype=torch.float64, dim=D, heads=H, seed=0) -> Attention:
    """A layer with non-trivial weights: sharp attention, tau and factor away from 1."""
    torch.manual_seed(seed)
    attn = Attention(dim, heads, fused=fused)
    with torch.no_grad():
        for head in attn.heads:
            head.weight.normal_(0, 0.5)
            head.bias.normal_(0, 0.2)
            head.tau.uniform_(0.5, 2.0)
        attn.tau_factor.uniform_(0.3, 1.5)
        attn.proj.bias.normal_(0, 0.2)
    attn.set_frozen(list(frozen))
    return attn.to(dtype)


def _canonical(attn: Attention) -> dict[str, torch.Tensor]:
    """The layer's tensors in canonical layout, as fresh leaves that require grad."""
    t = {
        "w": attn.qkv_weight,
        "b": attn.qkv_bias,
        "tau": attn.tau,
        "pw": attn.proj_weight,
        "pb": attn.proj.bias.detach().clone(),
    }
    return {k: v.clone().requires_grad_() for k, v in t.items()}


def reference(x, w, b, tau, factor, pw, pb, frozen=(), detach_frozen=True):
    """Multi-head attention with explicit per-head loops: (y (B, T, D), weights (B, H, T, T))."""
    heads, hd = w.shape[1], w.shape[2]
    outs, weights = [], []
    for h in range(heads):
        xh, wh, bh, th = x, w[:, h], b[:, h], tau[h]
        if h in frozen and detach_frozen:
            xh, wh, bh, th = x.detach(), wh.detach(), bh.detach(), th.detach()
        q, k, v = (xh @ wh[i].T + bh[i] for i in range(3))
        a = torch.softmax(th * factor[h] * (q @ k.transpose(-1, -2)) / math.sqrt(hd), dim=-1)
        outs.append(a @ v)
        weights.append(a)
    return torch.cat(outs, -1) @ pw.T + pb, torch.stack(weights, 1)


def _ref(attn, x, frozen=None, **kw):
    c = _canonical(attn)
    frozen = attn.frozen_heads if frozen is None else frozen
    y, a = reference(x, c["w"], c["b"], c["tau"], attn.tau_factor, c["pw"], c["pb"], frozen, **kw)
    return y, a, c


def _grad(t):
    return torch.zeros(()) if t is None else t


def _assert_head_grads(attn, c, grads=None, atol=1e-8):
    """The module's per-head gradients (``grads`` by name, else ``.grad``) equal the reference
    leaves' for active heads; frozen heads get none."""
    grads = grads if grads is not None else {n: p.grad for n, p in attn.named_parameters()}
    for h in range(attn.num_heads):
        got = [grads[f"heads.{h}.{n}"] for n in ("weight", "bias", "tau")]
        if h in attn.frozen_heads:
            assert got == [None, None, None], h
            continue
        want = [c["w"].grad[:, h].reshape(got[0].shape), c["b"].grad[:, h].reshape(-1), c["tau"].grad[h]]
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=atol)
    torch.testing.assert_close(grads["proj.weight"], c["pw"].grad, rtol=1e-6, atol=atol)
    torch.testing.assert_close(grads["proj.bias"], c["pb"].grad, rtol=1e-6, atol=atol)


FROZEN_SETS = [(), (1,), (0, 2), (0, 1, 2, 3)]


# --- 1. forward ----------------------------------------------------------------------------
@pytest.mark.parametrize("frozen", FROZEN_SETS)
@pytest.mark.parametrize("fused", [True, False])
def test_forward_and_weights_equal_the_reference(frozen, fused):
    attn = _layer(fused, frozen, torch.float32)
    x = torch.randn(B, T, D)
    want_y, want_a, _ = _ref(attn, x)
    torch.testing.assert_close(attn(x), want_y, rtol=1e-5, atol=1e-5)
    y, a = attn(x, return_attn=True)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, want_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.sum(-1), torch.ones(B, H, T))
    # the weights are not near uniform, and differ per head: the order is really tested
    assert (a - 1 / T).abs().max() > 0.2 and (a[:, 0] - a[:, 1]).abs().max() > 0.1


def test_freezing_leaves_the_forward_unchanged_and_the_factor_matters():
    attn = _layer(frozen=())
    x = torch.randn(B, T, D, dtype=torch.float64)
    before = attn(x)
    attn.set_frozen([0, 3])
    torch.testing.assert_close(attn(x), before)
    with torch.no_grad():
        attn.tau_factor.fill_(1.0)
    assert (attn(x) - before).abs().max() > 1e-2
    torch.testing.assert_close(attn.effective_tau(), attn.tau)


def test_heads_are_addressable_in_the_canonical_views():
    attn = _layer(frozen=(2,))
    assert attn.qkv_weight.shape == (3, H, HD, D) and attn.qkv_bias.shape == (3, H, HD)
    assert attn.tau.shape == (H,) and attn.proj_weight.shape == (D, D)
    w = attn.heads[2].weight
    torch.testing.assert_close(attn.qkv_weight[1, 2], w[HD : 2 * HD])  # head 2's k rows
    torch.testing.assert_close(attn.tau[2], attn.heads[2].tau.detach())
    for view in (attn.qkv_weight, attn.qkv_bias, attn.tau, attn.proj_weight):
        assert not view.requires_grad
    attn.proj_weight.zero_()  # a copy: the module is untouched
    assert attn.proj.weight.abs().sum() > 0


def test_construction_and_init():
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, 3)
    attn = Attention(D, H)
    assert (attn.dim, attn.num_heads, attn.head_dim, attn.fused) == (D, H, HD, True)
    assert all(isinstance(h, HeadProjection) for h in attn.heads) and len(attn.heads) == H
    head = attn.heads[0]
    assert head.weight.shape == (3 * HD, D) and head.bias.shape == (3 * HD,) and head.tau.shape == ()
    assert head.tau.item() == 1.0 and head.bias.abs().sum() == 0
    assert 0.017 < torch.stack([h.weight for h in attn.heads]).std() < 0.023  # trunc_normal_(std=0.02)
    assert torch.equal(attn.tau_factor, torch.ones(H))
    assert (attn.frozen_heads, attn.active_heads) == ([], list(range(H)))
    attn.init_proj_(torch.nn.init.ones_)
    assert torch.equal(attn.proj.weight, torch.ones(D, D)) and attn.proj.bias.abs().sum() == 0


# --- 2. gradients --------------------------------------------------------------------------
@pytest.mark.parametrize("frozen", FROZEN_SETS)
@pytest.mark.parametrize("fused", [True, False])
def test_gradients_equal_the_reference_and_frozen_heads_get_none(frozen, fused):
    attn = _layer(fused, frozen)
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(B, T, D, dtype=torch.float64)
    ga = torch.randn(B, H, T, T, dtype=torch.float64)
    if fused:
        loss = (attn(x) * g).sum()
        want_y, _, c = _ref(attn, x_ref)
        want = (want_y * g).sum()
    else:  # the returned weights carry gradient too, in canonical order
        y, a = attn(x, return_attn=True)
        loss = (y * g).sum() + (a * ga).sum()
        want_y, want_a, c = _ref(attn, x_ref)
        want = (want_y * g).sum() + (want_a * ga).sum()
    loss.backward()
    want.backward()
    torch.testing.assert_close(_grad(x.grad), _grad(x_ref.grad), rtol=1e-6, atol=1e-8)
    _assert_head_grads(attn, c)
    if len(frozen) == H:  # no path from the input through this layer at all
        assert x.grad is None


def test_a_reference_that_lets_gradient_through_frozen_heads_gives_another_input_gradient():
    attn = _layer(frozen=(1, 2))
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, T, D, dtype=torch.float64)
    (gx,) = torch.autograd.grad((attn(x) * g).sum(), x)
    right = x.detach().clone().requires_grad_()
    wrong = x.detach().clone().requires_grad_()
    (_ref(attn, right)[0] * g).sum().backward()
    (_ref(attn, wrong, detach_frozen=False)[0] * g).sum().backward()
    torch.testing.assert_close(gx, right.grad)
    assert (gx - wrong.grad).abs().max() > 1e-2


# --- 3. double backward --------------------------------------------------------------------
def test_gradcheck_and_gradgradcheck_through_the_manual_path_with_a_frozen_head():
    attn = _layer(fused=False, frozen=(1,), dim=8, heads=2)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w0 = attn.heads[0].weight.detach().clone().requires_grad_()
    tau0 = attn.heads[0].tau.detach().clone().requires_grad_()

    def weights_only(w, tau):  # the frozen head's path is live in y and in the weights
        return torch.func.functional_call(
            attn, {"heads.0.weight": w, "heads.0.tau": tau}, (x.detach(),), {"return_attn": True}
        )

    assert torch.autograd.gradcheck(weights_only, (w0, tau0), fast_mode=True)
    assert torch.autograd.gradgradcheck(weights_only, (w0, tau0), fast_mode=True)

    def with_input(x, w):
        return torch.func.functional_call(attn, {"heads.0.weight": w}, (x,))

    # the frozen head passes no gradient to x: the numerical Jacobian sees its path
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(with_input, (x, w0), fast_mode=True)
    # without its share of the output projection, the analytical gradient is exact
    with torch.no_grad():
        attn.proj.weight[:, 4:] = 0
    assert torch.autograd.gradcheck(with_input, (x, w0), fast_mode=True)
    assert torch.autograd.gradgradcheck(with_input, (x, w0), fast_mode=True)


# --- 4. state dict -------------------------------------------------------------------------
def _natural_keys(heads=H):
    keys = {"proj.weight", "proj.bias", "tau_factor"}
    return keys | {f"heads.{h}.{n}" for h in range(heads) for n in ("weight", "bias", "tau")}


@pytest.mark.parametrize("meta", [False, True])
def test_load_state_dict_assign_gives_the_same_outputs_with_the_assigned_tensors(meta):
    src = _layer(frozen=(0, 2))
    assert set(src.state_dict()) == _natural_keys()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    if meta:
        with torch.device("meta"):
            dst = Attention(D, H)
    else:
        dst = Attention(D, H)
    dst.set_frozen([0, 2])
    assert not dst.load_state_dict(sd, assign=True).missing_keys
    for name, p in dst.named_parameters():
        assert p.data_ptr() == sd[name].data_ptr() and isinstance(p, torch.nn.Parameter)
        assert p.requires_grad == (name.startswith(("proj.", "heads.1.", "heads.3.")))
    assert dst.tau_factor is sd["tau_factor"]
    x = torch.randn(B, T, D, dtype=torch.float64)
    torch.testing.assert_close(dst(x, return_attn=True), src(x, return_attn=True), rtol=0, atol=1e-12)
    # backward reaches the assigned tensors
    dst(x).sum().backward()
    assert dst.heads[1].weight.grad is not None and dst.heads[0].weight.grad is None


def test_strict_loading_of_the_natural_keys():
    src = _layer(frozen=(3,))
    dst = Attention(D, H).double()
    result = dst.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(B, T, D, dtype=torch.float64)
    torch.testing.assert_close(dst(x), src(x))
    torch.testing.assert_close(dst.tau_factor, src.tau_factor)
    sd = src.state_dict()
    with pytest.raises(RuntimeError, match="Missing"):
        dst.load_state_dict({k: v for k, v in sd.items() if k != "heads.2.tau"})
    with pytest.raises(RuntimeError, match="Unexpected"):
        dst.load_state_dict({**sd, "qkv_weight": src.qkv_weight})


# --- 5. functional_call --------------------------------------------------------------------
def test_functional_call_equals_a_module_holding_the_parameters_and_its_gradient_is_right():
    attn = _layer(frozen=(1,))
    torch.manual_seed(1)
    params = {
        n: (p.detach() + 0.1 * torch.randn_like(p)).requires_grad_() for n, p in attn.named_parameters()
    }
    buffers = {"tau_factor": torch.rand(H, dtype=torch.float64) + 0.5}
    x = torch.randn(B, T, D, dtype=torch.float64)
    y = torch.func.functional_call(attn, {**params, **buffers}, (x,))
    holder = _layer(frozen=(1,), seed=7)
    holder.load_state_dict({**{n: p.detach() for n, p in params.items()}, **buffers})
    torch.testing.assert_close(y, holder(x))
    assert (y - attn(x)).abs().max() > 1e-3  # the passed tensors were used, not the module's
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), list(params.values()), allow_unused=True)
    want_y, _, c = _ref(holder, x)
    (want_y * g).sum().backward()
    _assert_head_grads(holder, c, dict(zip(params, grads)))


# --- 6. dtype moves and copies -------------------------------------------------------------
@pytest.mark.parametrize("move", ["to", "double"])
def test_moving_to_float64_keeps_the_frozen_heads_and_the_gradients(move):
    attn = _layer(frozen=(0, 3), dtype=torch.float32)
    before = [p for p in attn.parameters()]
    attn = attn.to(torch.float64) if move == "to" else attn.double()
    assert [p for p in attn.parameters()] == before and all(p.dtype == torch.float64 for p in before)
    assert attn.tau_factor.dtype == torch.float64
    assert [attn.heads[h].weight.requires_grad for h in range(H)] == [False, True, True, False]
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = attn(x)
    want_y, _, c = _ref(attn, x_ref)
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-12)
    y.pow(2).sum().backward()
    want_y.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    _assert_head_grads(attn, c)


def test_deepcopy_keeps_the_frozen_set_and_the_outputs():
    attn = _layer(frozen=(1, 2))
    dup = copy.deepcopy(attn)
    assert dup.frozen_heads == [1, 2] and dup.active_heads == [0, 3]
    assert [p.requires_grad for p in dup.parameters()] == [p.requires_grad for p in attn.parameters()]
    x = torch.randn(B, T, D, dtype=torch.float64)
    torch.testing.assert_close(dup(x, return_attn=True), attn(x, return_attn=True), rtol=0, atol=0)
    dup.set_frozen([])
    assert attn.frozen_heads == [1, 2] and not attn.heads[1].weight.requires_grad
    with torch.no_grad():
        dup.heads[0].weight.zero_()
    assert attn.heads[0].weight.abs().sum() > 0


# --- 7. set_frozen -------------------------------------------------------------------------
def test_set_frozen_flips_requires_grad_and_keeps_the_parameters():
    attn = _layer()
    params = dict(attn.named_parameters())
    attn.set_frozen([3, 1])
    assert (attn.frozen_heads, attn.active_heads) == ([1, 3], [0, 2])
    assert dict(attn.named_parameters()) == params
    assert all(a is b for a, b in zip(attn.parameters(), params.values()))
    for name, p in params.items():
        frozen = name.startswith(("heads.1.", "heads.3."))
        assert p.requires_grad != frozen, name
    attn.set_frozen(range(H))
    assert [n for n, p in attn.named_parameters() if p.requires_grad] == ["proj.weight", "proj.bias"]
    attn.set_frozen([])
    assert all(p.requires_grad for p in attn.parameters()) and attn.active_heads == list(range(H))
    assert all(a is b for a, b in zip(attn.parameters(), params.values()))


@pytest.mark.parametrize(
    "heads,match",
    [([4], "out of range"), ([-1], "out of range"), ([1, 1], "twice"), ([1.5], "int"), ([True], "int")],
)
def test_set_frozen_rejects_bad_indices(heads, match):
    attn = _layer(frozen=(2,))
    with pytest.raises(ValueError, match=match):
        attn.set_frozen(heads)
    assert attn.frozen_heads == [2] and not attn.heads[2].weight.requires_grad  # unchanged


# --- 8. CLS readout and diagnostics --------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_cls_readout_uses_tau_alone_covers_every_head_and_splits_odd_samples(fused):
    attn = _layer(fused, frozen=(1, 2))
    assert torch.all((attn.tau_factor - 1).abs() > 1e-3)
    x = torch.randn(5, T, D, dtype=torch.float64)
    c = _canonical(attn)
    _, plain = reference(x, c["w"], c["b"], c["tau"], torch.ones(H), c["pw"], c["pb"])
    rows = plain[:, :, 0].float()  # (B, H, T): CLS rows with factor 1
    attn.record_cls = True
    assert attn.readout_count() == 0
    attn(x)
    assert attn.cls_attn_sum.dtype == torch.float32 and attn.cls_attn_sum.shape == (H, T)
    torch.testing.assert_close(attn.cls_attn_sum, rows.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn.cls_attn_odd, rows[1::2].sum(0), rtol=1e-5, atol=1e-6)
    assert attn.readout_count() == 5
    # the factor is left out: the forward's own CLS rows differ
    _, used = attn(x, return_attn=True)
    assert (used[:, :, 0].float() - rows).abs().max() > 1e-2
    assert attn.readout_count() == 10  # the return_attn forward recorded too
    kept, kept_value = attn.cls_attn_sum, attn.cls_attn_sum.clone()
    attn(x)  # each step replaces the sums, never edits them in place
    assert torch.equal(kept, kept_value) and attn.cls_attn_sum is not kept
    torch.testing.assert_close(attn.cls_attn_sum, 3 * rows.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn.cls_attn_odd, 3 * rows[1::2].sum(0), rtol=1e-5, atol=1e-5)
    assert attn.readout_count() == 15
    attn.reset_readout()
    assert attn.cls_attn_sum is None and attn.cls_attn_odd is None and attn.readout_count() == 0
    attn.record_cls = False
    attn(x)
    assert attn.cls_attn_sum is None


def test_diagnostic_attention_uses_tau_alone_in_fp32():
    attn = _layer(frozen=(0,))
    x = torch.randn(B, T, D, dtype=torch.float64)
    c = _canonical(attn)
    _, want = reference(x, c["w"], c["b"], c["tau"], torch.ones(H), c["pw"], c["pb"])
    got = attn.diagnostic_attention(x)
    assert got.dtype == torch.float32 and got.shape == (B, H, T, T) and not got.requires_grad
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)


# --- autocast and compile ------------------------------------------------------------------
def test_autocast_keeps_canonical_order_and_an_fp32_readout():
    attn = _layer(fused=False, frozen=(0, 3), dtype=torch.float32)
    x = torch.randn(B, T, D)
    want_y, want_a, _ = _ref(attn, x)
    attn.record_cls = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, a = attn(x, return_attn=True)
    assert y.dtype == torch.bfloat16 and attn.cls_attn_sum.dtype == torch.float32
    torch.testing.assert_close(a.float(), want_a, rtol=0, atol=0.05)
    torch.testing.assert_close(y.float(), want_y, rtol=0, atol=0.15)


def test_compiles_without_graph_breaks_and_matches_eager():
    attn = _layer(frozen=(1,), dtype=torch.float32)
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    x = torch.randn(B, T, D, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, attn(x))
    y.sum().backward()
    assert attn.heads[1].weight.grad is None and attn.heads[0].weight.grad is not None
    attn.set_frozen([0, 2])  # the frozen set changes between steps: a recompile, still right
    torch.testing.assert_close(compiled(x), _ref(attn, x)[0], rtol=1e-5, atol=1e-5)
