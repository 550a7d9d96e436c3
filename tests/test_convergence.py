"""Diagnostics against references, and the controller's schedule, freeze rule, replay and state."""

import json
import math

import numpy as np
import pytest
from scipy.stats import wasserstein_distance_nd

from vitcae_ray.config import FreezeConfig, TemperatureConfig
from vitcae_ray.convergence import (
    HeadController,
    HeadDecision,
    drift_w1,
    drift_w1_heads,
    grid_cost,
    kappa,
    kappa_heads,
    patch_coords,
    relative_change,
)

# --- diagnostics -----------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [2, 3, 4])
def test_w1_equals_scipy_wasserstein_nd(grid):
    rng = np.random.default_rng(grid)
    coords = patch_coords(grid)
    cost = grid_cost(grid)
    for _ in range(3):
        p, q = rng.random(grid * grid), rng.random(grid * grid)
        expected = wasserstein_distance_nd(coords, coords, p, q)
        assert drift_w1(p, q, cost) == pytest.approx(expected, abs=1e-6)
        assert drift_w1(q, p, cost) == pytest.approx(drift_w1(p, q, cost), abs=1e-12)
        assert drift_w1(3.0 * p, q, cost) == pytest.approx(expected, abs=1e-6)  # normalised
        assert drift_w1(p, p, cost) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("g", [2, 3, 5, 8])
def test_w1_of_a_point_mass_moved_one_patch(g):
    cost = grid_cost(g)
    p, right, down = np.zeros(g * g), np.zeros(g * g), np.zeros(g * g)
    p[0], right[1], down[g] = 1.0, 1.0, 1.0
    assert drift_w1(p, right, cost) == pytest.approx(1 / (g - 1))
    assert drift_w1(p, down, cost) == pytest.approx(1 / (g - 1))
    corner = np.zeros(g * g)
    corner[-1] = 1.0
    assert drift_w1(p, corner, cost) == pytest.approx(math.sqrt(2))  # the largest possible


def test_grid_cost_is_cached_read_only_and_row_major():
    c = grid_cost(4)
    assert c is grid_cost(4) and c.shape == (16, 16) and c.dtype == np.float64
    assert not c.flags.writeable
    assert c[0, 3] == pytest.approx(1.0) and c[0, 4] == pytest.approx(1 / 3)  # (0,3) vs (1,0)
    assert np.allclose(c, c.T) and np.allclose(np.diag(c), 0)
    assert grid_cost(1).shape == (1, 1)


def test_drift_heads_matches_the_single_head_function():
    rng = np.random.default_rng(0)
    prev, cur = rng.random((2, 3, 9)), rng.random((2, 3, 9))
    d = drift_w1_heads(prev, cur, 3)
    assert d.shape == (2, 3)
    assert d[1, 2] == pytest.approx(drift_w1(prev[1, 2], cur[1, 2], grid_cost(3)))


def _blocks(c: int, n: int, rng, leak: float = 1e-3) -> np.ndarray:
    """Row-stochastic matrix with c blocks: weight 1 within a block, ~leak between blocks."""
    labels = np.arange(n) % c
    a = (labels[:, None] == labels[None, :]) * 1.0 + leak + rng.random((n, n)) * leak
    return a / a.sum(1, keepdims=True)


@pytest.mark.parametrize("c", [1, 2, 3, 4, 5])
def test_kappa_recovers_block_cluster_counts(c):
    rng = np.random.default_rng(c)
    assert kappa(_blocks(c, 20, rng), top_k=8) == c
    assert kappa(_blocks(c, 16, rng, leak=1e-2), top_k=8) == c
    # a softmax over block-structured logits (strictly positive, eigenvalue 1 simple)
    labels = rng.permutation(np.arange(16) % c)
    logits = 6.0 * (labels[:, None] == labels[None, :]) + rng.normal(0, 0.1, (16, 16))
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert kappa(soft, top_k=8) == c
    assert kappa(5.0 * soft, top_k=8) == c  # rows renormalised


def test_kappa_of_uniform_attention_and_small_windows():
    assert kappa(np.ones((16, 16)), top_k=8) == 1
    assert kappa(_blocks(3, 16, np.random.default_rng(0)), top_k=1) == 1  # no gap to examine
    assert kappa(np.ones((1, 1)), top_k=8) == 1
    rng = np.random.default_rng(1)
    stack = np.stack([np.stack([_blocks(c, 16, rng) for c in (1, 2, 3)])] * 2)  # (2, 3, 16, 16)
    k = kappa_heads(stack, top_k=8)
    assert k.dtype == np.int64 and k.tolist() == [[1, 2, 3], [1, 2, 3]]


# --- controller ------------------------------------------------------------------------------

L, H, G = 2, 2, 3  # layers, heads, patch grid (N = 9)
ALPHA, RATIO = 2.0, 1.0
T, D = G * G + 1, 4  # tokens and width of the block outputs
_EVEN = np.random.default_rng(7).random((L, H, G * G)) + 0.5
HALVES = np.stack([_EVEN, _EVEN + 0.1 * np.random.default_rng(8).random((L, H, G * G))])  # even, odd
FLOOR = drift_w1_heads(HALVES[0], HALVES[1], G)  # the noise floor of every epoch in the script
THRESHOLD = RATIO * FLOOR  # (L, H) drift threshold


def _script(n: int, seed: int = 0, kappa_change_at: int | None = None):
    """Epoch statistics ``(cls, patch, cls_halves, block_maps)`` where head (0, 0) stabilises
    from epoch 2 on (drift ~1e-4, below its threshold, from epoch 3 on) while every other head
    keeps moving; the noise floor is FLOOR throughout. From ``kappa_change_at`` on, head
    (0, 0)'s patch attention has 3 blocks instead of 2. The block outputs change a lot
    between epochs (no block converges)."""
    rng = np.random.default_rng(seed)
    base = rng.random(G * G) + 0.5
    two, three = _blocks(2, G * G, rng), _blocks(3, G * G, rng)
    out = []
    for epoch in range(n):
        cls = rng.random((L, H, G * G)) + 0.2
        if epoch >= 2:
            cls[0, 0] = base + 1e-3 * rng.random(G * G)
        patch = np.broadcast_to(two, (L, H, G * G, G * G)).copy()
        if kappa_change_at is not None and epoch >= kappa_change_at:
            patch[0, 0] = three
        whole = rng.random((L, T, D)) + 1.0
        out.append((cls, patch, HALVES, np.stack([whole, whole * 1.001, whole * 0.999])))
    return out


def _controller(min_epoch: int = 3, temperature: dict | None = None, **freeze) -> HeadController:
    """The rules at work in every layer at once: ``bottom_up`` off unless a test turns it on."""
    fz = FreezeConfig(
        **{"drift_ratio": RATIO, "patience": 2, "kappa_window": 2, "bottom_up": False, **freeze}
    )
    return HeadController(
        L, H, G, TemperatureConfig(**{"alpha": ALPHA, **(temperature or {})}), fz, min_epoch
    )


def _run(c: HeadController, data) -> list[HeadDecision]:
    return [c.update(e, *stats) for e, stats in enumerate(data)]


def _others(d: HeadDecision) -> list[bool]:
    return [d.frozen[l][h] for l in range(L) for h in range(H) if (l, h) != (0, 0)]


def test_the_script_has_the_drifts_the_rule_reasons_about():
    ds = _run(_controller(), _script(8))
    assert math.isnan(ds[0].drift[0][0]) and ds[0].mean_drift is None
    assert all(d.drift[0][0] >= THRESHOLD[0, 0] for d in ds[1:3])
    assert all(0 < d.drift[0][0] < THRESHOLD[0, 0] for d in ds[3:])
    assert all(
        d.drift[l][h] >= THRESHOLD[l, h]
        for d in ds[1:]
        for l in range(L)
        for h in range(H)
        if (l, h) != (0, 0)
    )
    assert all(d.kappa == [[2, 2], [2, 2]] for d in ds)
    assert all(np.allclose(d.floor, FLOOR) for d in ds) and 1e-3 < FLOOR.min()
    assert all(d.frozen_blocks == 0 for d in ds)


@pytest.mark.parametrize("min_epoch, expected", [(3, 4), (0, 4), (6, 6)])
def test_freezes_exactly_when_the_rule_says(min_epoch, expected):
    # drift of (0, 0) is below the threshold at epochs 3, 4, ...; with patience 2 the window
    # 3..4 is the first that qualifies (kappa is constant), so it freezes at max(4, min_epoch)
    ds = _run(_controller(min_epoch), _script(8))
    assert [d.frozen[0][0] for d in ds] == [e >= expected for e in range(8)]
    assert [d.newly_frozen for d in ds] == [[(0, 0)] if e == expected else [] for e in range(8)]
    assert all(d.frozen_epoch[0][0] == (expected if e >= expected else None) for e, d in enumerate(ds))
    assert not any(any(_others(d)) for d in ds)
    assert ds[-1].num_frozen == 1 and ds[-1].num_heads_total == L * H


def test_kappa_must_hold_one_value_over_its_window():
    # kappa of (0, 0) goes 2 -> 3 at epoch 4: window 3..4 holds {2, 3}, window 4..5 holds {3}
    ds = _run(_controller(), _script(7, kappa_change_at=4))
    assert ds[3].kappa[0][0] == 2 and ds[4].kappa[0][0] == 3
    assert [d.frozen_epoch[0][0] for d in ds][-1] == 5 and not ds[4].frozen[0][0]
    # without patch attention kappa is unavailable (-1) and nothing can freeze
    c = _controller()
    ds = [c.update(e, cls, None, halves) for e, (cls, _, halves, _) in enumerate(_script(7))]
    assert ds[-1].kappa == [[-1, -1], [-1, -1]] and ds[-1].num_frozen == 0
    # without the readout's halves the noise floor is unknown and nothing can freeze
    c = _controller()
    ds = [c.update(e, cls, patch) for e, (cls, patch, _, _) in enumerate(_script(7))]
    assert np.isnan(ds[-1].floor).all() and ds[-1].num_frozen == 0
    # batches of one sample leave the odd half empty: no floor, no freeze, no error
    c = _controller()
    empty = np.stack([HALVES[0], np.zeros_like(HALVES[1])])
    ds = [c.update(e, cls, patch, empty) for e, (cls, patch, _, _) in enumerate(_script(7))]
    assert np.isnan(ds[-1].floor).all() and ds[-1].num_frozen == 0


def test_the_threshold_is_relative_to_the_noise_floor():
    # a larger floor makes the same drifts converged; a smaller one keeps (0, 0) training
    data = _script(8)
    wide = [(c, p, np.stack([HALVES[0], HALVES[0] + 3 * (HALVES[1] - HALVES[0])]), b) for c, p, _, b in data]
    ds = _run(_controller(), wide)
    assert (np.array(ds[-1].floor) > FLOOR).all() and ds[-1].num_frozen >= 1
    narrow = [
        (c, p, np.stack([HALVES[0], HALVES[0] + 1e-4 * (HALVES[1] - HALVES[0])]), b) for c, p, _, b in data
    ]
    assert _run(_controller(), narrow)[-1].num_frozen == 0
    assert _run(_controller(drift_ratio=1e-4), data)[-1].num_frozen == 0


def test_tau_factors_follow_the_drift_and_stay_fixed_once_frozen():
    c = _controller()
    data = _script(7)
    ds = _run(c, data)
    assert ds[0].tau_factor == [[1.0, 1.0], [1.0, 1.0]]
    for d in ds[1:]:
        for l, h in [(0, 1), (1, 0), (1, 1)]:
            assert d.tau_factor[l][h] == pytest.approx(1 / (1 + ALPHA * d.drift[l][h]), rel=1e-12)
    # (0, 0) freezes at 4 and keeps the factor it used during epoch 4, set by epoch 3's drift
    used = 1 / (1 + ALPHA * ds[3].drift[0][0])
    assert ds[3].tau_factor[0][0] == pytest.approx(used, rel=1e-12)
    assert ds[4].drift[0][0] != ds[3].drift[0][0]
    assert [d.tau_factor[0][0] for d in ds[4:]] == [ds[3].tau_factor[0][0]] * 3
    # frozen stays frozen (with its factor) when the head's attention moves again
    cls, patch, halves, blocks = data[0]
    cls = cls.copy()
    cls[0, 0] = np.linspace(1, 9, G * G)
    d7 = c.update(7, cls, patch, halves, blocks)
    assert d7.drift[0][0] > 10 * THRESHOLD[0, 0] and d7.frozen[0][0] and d7.frozen_epoch[0][0] == 4
    assert d7.tau_factor[0][0] == ds[3].tau_factor[0][0]


def test_switches_turn_the_schedule_and_freezing_off():
    data = _script(7)
    ds = _run(_controller(temperature={"enabled": False}), data)
    assert all(d.tau_factor == [[1.0, 1.0], [1.0, 1.0]] for d in ds)
    assert ds[-1].frozen_epoch[0][0] == 4  # freezing still works
    ds = _run(_controller(enabled=False), data)
    assert all(d.num_frozen == 0 for d in ds)
    assert ds[-1].tau_factor[0][0] == pytest.approx(1 / (1 + ALPHA * ds[-1].drift[0][0]))


def test_per_layer_cap_freezes_the_lowest_drift_heads_first():
    rng = np.random.default_rng(3)
    base = rng.random((2, 3, G * G)) + 0.5
    amp = np.array(
        [
            [0.5, 0.0, 0.0],  # layer 0: heads 1 and 2 tie at drift 0 -> head 1
            [0.5, 0.05, 0.2],
        ]
    )  # layer 1: head 1 drifts least
    data = [base + amp[..., None] * rng.random((2, 3, G * G)) for _ in range(6)]
    patch = np.broadcast_to(np.ones((G * G, G * G)), (2, 3, G * G, G * G))
    halves = np.stack([base, base[..., ::-1]])

    def run(frac: float) -> list[HeadDecision]:
        fz = FreezeConfig(drift_ratio=1e3, patience=2, kappa_window=2, max_frozen_frac=frac, bottom_up=False)
        c = HeadController(2, 3, G, TemperatureConfig(alpha=ALPHA), fz, min_epoch=3)
        return [c.update(e, cls, patch, halves) for e, cls in enumerate(data)]

    ds = run(0.5)  # floor(0.5 * 3) = 1 head per layer; every head qualifies at epoch 3
    assert ds[3].newly_frozen == [(0, 1), (1, 1)]
    mean = np.mean([ds[2].drift[1], ds[3].drift[1]], axis=0)
    assert int(np.argmin(mean)) == 1
    assert all([sum(row) for row in d.frozen] == [1, 1] for d in ds[3:])
    assert run(1.0)[3].num_frozen == 6 and run(0.3)[-1].num_frozen == 0


def test_replay_overwrites_and_epochs_must_be_contiguous():
    data = _script(7)
    c = _controller()
    first = _run(c, data[:6])
    again = c.update(3, *data[3])  # after 3, 4 and 5: truncates 4 and 5
    assert again.to_dict() == first[3].to_dict() and c.last_epoch == 3
    with pytest.raises(KeyError):
        c.decision(4)
    assert c.update(4, *data[4]).to_dict() == first[4].to_dict()
    assert c.update(5, *data[5]).to_dict() == first[5].to_dict()
    assert c.update(5, *data[5]).to_dict() == first[5].to_dict()
    assert c.decision(4).to_dict() == first[4].to_dict()
    with pytest.raises(ValueError, match="does not follow"):
        c.update(7, *data[6])
    assert c.last_epoch == 5  # a failed update changes nothing
    # the first epoch a controller sees may be any epoch
    late = _controller()
    assert math.isnan(late.update(5, *data[5]).drift[0][0])
    # replays reach back replay_window epochs
    short = HeadController(L, H, G, TemperatureConfig(), FreezeConfig(), 3, replay_window=2)
    _run(short, data[:6])
    with pytest.raises(ValueError, match="replay window"):
        short.update(3, *data[3])
    assert short.last_epoch == 5
    short.update(4, *data[4])


def test_state_round_trips_through_json_and_a_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    data = _script(8)
    c = _controller()
    _run(c, data[:4])
    state = json.loads(json.dumps(c.state_dict()))  # plain types only
    torch.save({"heads": state}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)["heads"]
    for s in (state, loaded):
        fresh = _controller()
        fresh.load_state_dict(s)
        assert fresh.last_epoch == 3 and fresh.decision(3).to_dict() == c.decision(3).to_dict()
        for e in (4, 5):  # (0, 0) freezes at 4 in both
            assert fresh.update(e, *data[e]).to_dict() == c.update(e, *data[e]).to_dict()
    # a restart from epoch 3's checkpoint replays 4.. identically
    later = [c.update(e, *data[e]).to_dict() for e in (6, 7)]
    c.load_state_dict(state)
    assert c.last_epoch == 3
    assert [c.update(e, *data[e]).to_dict() for e in (4, 5, 6, 7)][2:] == later
    # an empty state, and a state for another model, are handled
    empty = _controller()
    empty.load_state_dict(_controller().state_dict())
    assert empty.last_epoch is None and empty.update(2, *data[2]).epoch == 2
    with pytest.raises(ValueError, match="cannot load"):
        HeadController(3, H, G, TemperatureConfig(), FreezeConfig(), 3).load_state_dict(state)


def _block_script(n: int, settle: list[int]):
    """Statistics in which every head is still (drift 0, floor FLOOR) from epoch 0, and block
    l's output stops changing from epoch ``settle[l]`` on (its floor: 1% of its size)."""
    rng = np.random.default_rng(5)
    cls = rng.random((L, H, G * G)) + 0.5
    patch = np.broadcast_to(_blocks(2, G * G, rng), (L, H, G * G, G * G))
    fixed = rng.random((L, T, D)) + 1.0
    out = []
    for epoch in range(n):
        whole = np.stack([fixed[l] if epoch >= settle[l] else rng.random((T, D)) + 1.0 for l in range(L)])
        out.append((cls, patch, HALVES, np.stack([whole, whole * 1.01, whole * 0.99])))
    return out


def test_the_frozen_prefix_grows_from_the_bottom_when_a_block_converges():
    # heads freeze at epoch 2 (patience 2 from epoch 1, the first with a drift); block 0's
    # output settles at epoch 4 (changes 0 at 5 and 6), block 1's at 2
    ds = _run(_controller(min_epoch=0), _block_script(9, settle=[4, 2]))
    assert ds[2].num_frozen == L * H
    # the change spans the patience window (2): block 1 (settled at 2) reads 0 from epoch 4 on
    assert ds[3].block_change[1] > 0 and ds[4].block_change[1] == 0
    assert ds[3].block_floor[1] == pytest.approx(0.02 / 1.0, rel=1e-6)
    # block 1 has converged at epoch 4, but waits for block 0: both join at 6
    assert [d.frozen_blocks for d in ds] == [0, 0, 0, 0, 0, 0, 2, 2, 2]
    assert ds[-1].block_frozen_epoch == [6, 6]
    ds = _run(_controller(min_epoch=0), _block_script(9, settle=[2, 5]))
    assert [d.frozen_blocks for d in ds] == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert ds[-1].block_frozen_epoch == [4, 7]
    # without freeze.blocks (or without the block statistics) no block freezes
    assert _run(_controller(min_epoch=0, blocks=False), _block_script(9, [2, 2]))[-1].frozen_blocks == 0
    c = _controller(min_epoch=0)
    assert [c.update(e, *s[:3]) for e, s in enumerate(_block_script(9, [2, 2]))][-1].frozen_blocks == 0
    # a block whose heads are not all frozen stays trained: patience 9 keeps the heads training
    assert _run(_controller(min_epoch=0, patience=9), _block_script(9, [2, 2]))[-1].frozen_blocks == 0


def test_bottom_up_freezes_heads_only_in_the_lowest_block_still_trained():
    # every head is still from epoch 0: without bottom_up all four freeze at epoch 2
    free = _run(_controller(min_epoch=0), _block_script(9, [6, 0]))
    assert [d.num_frozen for d in free[:3]] == [0, 0, 4]
    # with it, block 1's heads wait for block 0 (settled at 6, frozen at 8 once its
    # change over the window reads 0) and are still training at the end
    ds = _run(_controller(min_epoch=0, bottom_up=True), _block_script(9, [6, 0]))
    assert [d.num_frozen for d in ds] == [0, 0, 2, 2, 2, 2, 2, 2, 2]
    assert [d.frozen_blocks for d in ds] == [0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert ds[-1].frozen == [[True, True], [False, False]]
    # both blocks settled: one block an epoch, and a full prefix leaves no block above it
    ds = _run(_controller(min_epoch=0, bottom_up=True), _block_script(9, [0, 0]))
    assert [d.frozen_blocks for d in ds] == [0, 0, 1, 2, 2, 2, 2, 2, 2]
    assert [d.num_frozen for d in ds] == [0, 0, 2, 4, 4, 4, 4, 4, 4]
    # without freeze.blocks, or with a cap below H heads, the prefix never grows: bottom_up
    # does not hold the heads back
    plain = _run(_controller(min_epoch=0, bottom_up=True, blocks=False), _block_script(9, [0, 0]))
    assert plain[-1].num_frozen == 4 and plain[-1].frozen_blocks == 0
    capped = _run(_controller(min_epoch=0, bottom_up=True, max_frozen_frac=0.5), _block_script(9, [0, 0]))
    assert capped[-1].frozen == [[True, False], [True, False]] and capped[-1].frozen_blocks == 0


def test_a_steady_drift_under_the_floor_each_epoch_still_keeps_a_block_training():
    # block outputs 1% apart between the probe's halves (floor 0.02 relative); each epoch
    # moves them by 0.6 of the floor. Moving back and forth, the window's change is 0 and the
    # blocks freeze; moving steadily one way, it is 1.2x the floor and they keep training.
    base = _block_script(9, settle=[0, 0])
    fixed = base[0][3][0]
    step = 0.6 * 0.02 * np.linalg.norm(fixed.reshape(L, -1), axis=1)[:, None, None]
    unit = np.ones((T, D)) / np.sqrt(T * D)

    def script(sign):
        out = []
        for e, (cls, patch, halves, _) in enumerate(base):
            whole = fixed + sign(e) * step * unit
            out.append((cls, patch, halves, np.stack([whole, whole * 1.01, whole * 0.99])))
        return out

    jitter = _run(_controller(min_epoch=0), script(lambda e: e % 2))
    assert jitter[-1].frozen_blocks == L
    steady = _run(_controller(min_epoch=0), script(lambda e: e))
    assert steady[-1].frozen_blocks == 0
    assert all(1.0 < d.block_change[0] / d.block_floor[0] < 1.3 for d in steady[2:])


def _lagging(script, moving: list[tuple[int, int]], seed: int = 11):
    """``script`` with the heads in ``moving`` drifting far above their floor every epoch."""
    rng = np.random.default_rng(seed)
    out = []
    for cls, patch, halves, blocks in script:
        cls = cls.copy()
        for l, h in moving:
            cls[l, h] = rng.random(G * G) + 0.2
        out.append((cls, patch, halves, blocks))
    return out


def test_a_converged_block_freezes_with_its_lagging_heads_once_enough_heads_are_frozen():
    # head (l, 1) of each block never settles; head (l, 0) freezes at 2; the outputs settle at 2
    script = _lagging(_block_script(9, settle=[2, 2]), moving=[(0, 1), (1, 1)])
    every = _run(_controller(min_epoch=0, block_min_heads=1.0), script)
    assert every[-1].frozen == [[True, False], [True, False]] and every[-1].frozen_blocks == 0
    ds = _run(_controller(min_epoch=0, block_min_heads=0.5), script)  # 1 of 2 heads suffices
    assert [d.frozen_blocks for d in ds] == [0, 0, 0, 0, 2, 2, 2, 2, 2]
    # the lagging heads freeze with their block, keep the factor they had, and are reported
    assert ds[4].frozen == [[True, True], [True, True]]
    assert ds[4].frozen_epoch == [[2, 4], [2, 4]] and ds[4].newly_frozen == [(0, 1), (1, 1)]
    assert ds[5].tau_factor == ds[4].tau_factor and ds[5].newly_frozen == []
    assert (
        ds[4].tau_factor[0][1] == ds[3].tau_factor[0][1] == pytest.approx(1 / (1 + ALPHA * ds[3].drift[0][1]))
    )
    # the prefix still grows from the bottom: block 1 has a lagging head, block 0 none frozen
    none0 = _lagging(_block_script(9, settle=[2, 2]), moving=[(0, 0), (0, 1), (1, 1)])
    assert _run(_controller(min_epoch=0, block_min_heads=0.5), none0)[-1].frozen_blocks == 0
    # with a cap below every head of a layer, no block freezes
    capped = _run(_controller(min_epoch=0, block_min_heads=0.5, max_frozen_frac=0.5), script)
    assert capped[-1].frozen_blocks == 0 and capped[-1].num_frozen == 2
    # a restored controller decides alike after a block freeze with lagging heads
    c = _controller(min_epoch=0, block_min_heads=0.5)
    _run(c, script[:5])
    fresh = _controller(min_epoch=0, block_min_heads=0.5)
    fresh.load_state_dict(c.state_dict())
    assert [fresh.update(e, *script[e]).to_dict() for e in (5, 6)] == [d.to_dict() for d in ds[5:7]]


def test_relative_change_matches_numpy_and_handles_zero():
    a, b = np.arange(12.0).reshape(2, 6), np.arange(12.0).reshape(2, 6) + 1
    assert relative_change(a, b).tolist() == pytest.approx(
        [np.linalg.norm(b[i] - a[i]) / np.linalg.norm(b[i]) for i in range(2)]
    )
    assert relative_change(np.zeros((1, 3)), np.zeros((1, 3))).tolist() == [0.0]
    with pytest.raises(ValueError):
        relative_change(a, b[:1])


def test_decision_dict_round_trip():
    d = _run(_controller(), _script(5))[-1]
    plain = json.loads(json.dumps(d.to_dict()))
    back = HeadDecision.from_dict(plain)
    assert back.to_dict() == d.to_dict() and back.newly_frozen == [(0, 0)]
    first = _run(_controller(), _script(1))[0]
    first = HeadDecision.from_dict(json.loads(json.dumps(first.to_dict())))
    assert first.to_dict()["drift"] == [[None, None], [None, None]]
    assert math.isnan(first.drift[1][1])
    assert d.mean_drift == pytest.approx(float(np.mean(d.drift)))
    assert d.mean_floor == pytest.approx(float(np.mean(FLOOR)))
    no_halves = _controller().update(0, *_script(1)[0][:2])  # no readout halves: floor unknown
    assert math.isnan(no_halves.floor[0][0]) and no_halves.mean_floor is None
