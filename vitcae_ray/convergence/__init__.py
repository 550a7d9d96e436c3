"""Head convergence: pure diagnostics (W1 drift, kappa), the controller that turns them into
temperature factors and freeze decisions, and (``actor.py``, the only Ray import) its actor."""

from .controller import HeadController, HeadDecision, controller_args
from .diagnostics import (
    drift_w1,
    drift_w1_heads,
    grid_cost,
    kappa,
    kappa_heads,
    patch_coords,
    relative_change,
)

__all__ = [
    "HeadController",
    "HeadDecision",
    "controller_args",
    "drift_w1",
    "drift_w1_heads",
    "grid_cost",
    "kappa",
    "kappa_heads",
    "patch_coords",
    "relative_change",
]
