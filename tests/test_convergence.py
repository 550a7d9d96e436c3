"""Diagnostics against references, and the controller's freeze rule, replay and state."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance_nd

from vitcae_ray.config import FreezeConfig, SchedulerConfig
from vitcae_ray.convergence import HeadController, drift_w1, grid_cost, kappa, patch_coords


@pytest.mark.parametrize("grid", [2, 3, 4])
def test_w1_equals_scipy_wasserstein_nd(grid):
    rng = np.random.default_rng(grid)
    coords = patch_coords(grid)
    for _ in range(3):
        p, q = rng.random(grid * grid), rng.random(grid * grid)
        expected = wasserstein_distance_nd(coords, coords, p / p.sum(), q / q.sum())
        assert drift_w1(p, q, grid_cost(grid)) == pytest.approx(expected, abs=1e-6)
        assert drift_w1(q, p, grid_cost(grid)) == pytest.approx(expected, abs=1e-6)
    assert drift_w1(p, p, grid_cost(grid)) == pytest.approx(0.0, abs=1e-12)


def test_w1_of_a_point_mass_moved_one_patch():
    g = 5
    p, q = np.zeros(g * g), np.zeros(g * g)
    p[7], q[8] = 1.0, 1.0  # one column to the right
    assert drift_w1(p, q, grid_cost(g)) == pytest.approx(1 / (g - 1))


def _blocks(c: int, n: int, rng) -> np.ndarray:
    labels = np.arange(n) % c
    a = (labels[:, None] == labels[None, :]) * 1.0 + 1e-3 + rng.random((n, n)) * 1e-3
    return a / a.sum(1, keepdims=True)


@pytest.mark.parametrize("c", [1, 2, 3, 4, 5])
def test_kappa_recovers_block_cluster_counts(c):
    rng = np.random.default_rng(c)
    assert kappa(_blocks(c, 20, rng), top_k=8) == c
    # a softmax over block-structured logits (strictly positive, eigenvalue 1 simple)
    labels = np.arange(16) % c
    logits = 6.0 * (labels[:, None] == labels[None, :]) + rng.normal(0, 0.1, (16, 16))
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert kappa(soft, top_k=8) == c


def _controller(**freeze):
    base = dict(drift_threshold=0.05, patience=2, kappa_window=2)
    return HeadController(2, 2, 3, SchedulerConfig(alpha=2.0), FreezeConfig(**{**base, **freeze}),
                          min_epoch=3)


def _epochs(n: int):
    """Head (0, 0) is still from epoch 0 on; every other head keeps moving."""
    rng = np.random.default_rng(0)
    still = rng.random(9)
    patch = np.broadcast_to(_blocks(2, 9, rng), (2, 2, 9, 9)).copy()
    for _ in range(n):
        cls = rng.random((2, 2, 9)) + 0.2
        cls[0, 0] = still
        yield cls, patch


def test_freezes_exactly_when_the_rule_says_and_stays_frozen():
    c = _controller()
    decisions = [c.update(e, cls, patch) for e, (cls, patch) in enumerate(_epochs(6))]
    # (0, 0) has zero drift from epoch 1 and a constant kappa: patience 2 is met at epoch 2,
    # but min_epoch is 3, so it freezes at 3 and only then
    assert [d.frozen[0][0] for d in decisions] == [False, False, False, True, True, True]
    assert decisions[3].newly_frozen == [(0, 0)] and decisions[3].frozen_epoch[0][0] == 3
    assert all(not any(d.frozen[l][h] for l in range(2) for h in range(2) if (l, h) != (0, 0))
               for d in decisions)
    # tau factor: 1 / (1 + alpha d) for moving heads; frozen heads keep the factor they froze with
    d4 = decisions[4]
    assert d4.tau_factor[1][1] == pytest.approx(1 / (1 + 2.0 * d4.drift[1][1]))
    assert decisions[5].tau_factor[0][0] == decisions[3].tau_factor[0][0] == pytest.approx(1.0)
    assert math.isnan(decisions[0].drift[0][0]) and decisions[0].tau_factor == [[1.0, 1.0]] * 2
    # frozen stays frozen even when the head's attention moves again
    cls, patch = next(_epochs(1))
    cls[0, 0] = np.linspace(1, 9, 9)
    assert c.update(6, cls, patch).frozen[0][0]


def test_switches_and_cap():
    off = HeadController(2, 2, 3, SchedulerConfig(enabled=False), FreezeConfig(enabled=False), 0)
    for e, (cls, patch) in enumerate(_epochs(5)):
        d = off.update(e, cls, patch)
    assert d.tau_factor == [[1.0, 1.0]] * 2 and d.num_frozen == 0
    # everything converges (threshold above any drift); the cap allows one head per layer,
    # the lower-drift one
    capped = _controller(drift_threshold=10.0, max_frozen_frac=0.5)
    for e, (cls, patch) in enumerate(_epochs(5)):
        d = capped.update(e, cls, patch)
    assert [sum(row) for row in d.frozen] == [1, 1]
    assert d.frozen[0][0]  # drift 0 beats head (0, 1)


def test_replay_is_idempotent_and_epochs_must_be_contiguous():
    c = _controller()
    data = list(_epochs(5))
    first = []
    for e in range(5):
        first.append(c.update(e, *data[e]))
        if e == 2:
            saved = c.state_dict()  # what the checkpoint of epoch 2 holds
    again = c.update(4, *data[4])  # the latest epoch replayed in place
    assert again.to_dict() == first[4].to_dict() and c.last_epoch == 4
    # a worker-group restart from epoch 2's checkpoint pushes that state, then replays 3 and 4
    c.load_state_dict(saved)
    assert c.last_epoch == 2
    assert c.update(3, *data[3]).to_dict() == first[3].to_dict()
    assert c.update(4, *data[4]).to_dict() == first[4].to_dict()
    with pytest.raises(ValueError, match="does not follow"):
        c.update(6, *data[4])


def test_state_round_trips_through_json_and_a_checkpoint(tmp_path):
    c = _controller()
    data = list(_epochs(6))
    for e in range(4):
        c.update(e, *data[e])
    state = json.loads(json.dumps(c.state_dict()))
    torch.save({"heads": state}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)["heads"]
    fresh = _controller()
    fresh.load_state_dict(loaded)
    assert fresh.decision(3).to_dict() == c.decision(3).to_dict()
    assert fresh.update(4, *data[4]).to_dict() == c.update(4, *data[4]).to_dict()
    assert fresh.update(5, *data[5]).to_dict() == c.update(5, *data[5]).to_dict()
