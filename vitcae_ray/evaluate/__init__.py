"""The paper's tasks on a trained model, each beside its baselines: one module per task
(``recon``, ``inpaint``, ``generation``, ``interp``, ``probe``), the baselines
(``baselines``), the feature space of the generation metrics (``features``), loading
(``loading``), the trainer's periodic evaluation (``epoch``) and the CLI (``cli``,
``python -m vitcae_ray.evaluate``)."""

from .cli import TASKS, build_parser, main, run
from .epoch import EpochEvaluator
from .loading import EvalError, load_data, load_model, stack_split

__all__ = [
    "TASKS",
    "EpochEvaluator",
    "EvalError",
    "build_parser",
    "load_data",
    "load_model",
    "main",
    "run",
    "stack_split",
]
