"""Tune search algorithms whose concurrency limit is the sweep's live trial capacity.

Tune saves ``max_concurrent_trials`` (and the search algorithm's own limit) with the
experiment, so a value computed at start would hold forever: on an autoscaling cluster that
starts with no GPU nodes, one trial at a time, even after ``--resume``. Here the limit is a
property that asks :func:`capacity` (set by :func:`vitcae_ray.tune.run_sweep` to a
:class:`vitcae_ray.cluster.TrialCapacity`) each time Tune wants another trial; restored state
cannot overwrite a property.
"""

from __future__ import annotations

from collections.abc import Callable

from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

_capacity: Callable[[], int] = lambda: 1  # noqa: E731


def set_capacity(fn: Callable[[], int]) -> None:
    global _capacity
    _capacity = fn


def capacity() -> int:
    return _capacity()


_live = property(lambda self: capacity(), lambda self, value: None)


class LiveVariantGenerator(BasicVariantGenerator):
    """Random and grid search (Tune's default generator) with the live limit."""

    max_concurrent = _live


class LiveConcurrencyLimiter(ConcurrencyLimiter):
    """A searcher (Optuna, HyperOpt) with the live limit."""

    max_concurrent = _live
