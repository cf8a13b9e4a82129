"""bilevel: bilevel and gradient-based hyperparameter optimization in PyTorch.

Describe the task as a :class:`Problem`, call :func:`solve`, read the :class:`Result`. Everything else is reached
through its module, as jaxopt does: ``bilevel.linsolve.cg``, ``bilevel.hypergrad.implicit_hypergrad``,
``bilevel.problems.ridge_data``, ``bilevel.projections.box``, ``bilevel.steps``, ``bilevel.checkpoint``.
"""

from bilevel import problems, solvers  # noqa: F401  (solvers: registers the built-in methods)
from bilevel.callbacks import EarlyStopping, ProgressBar, StepInfo
from bilevel.check import check_hypergradient, hypergradient
from bilevel.errors import BilevelError, BilevelWarning
from bilevel.implicit import custom_fixed_point, custom_root
from bilevel.problem import Problem
from bilevel.registry import available_methods, register, solver_options
from bilevel.solve import Result, solve

__version__ = "0.1.0"

__all__ = [
    "BilevelError",
    "BilevelWarning",
    "EarlyStopping",
    "Problem",
    "ProgressBar",
    "Result",
    "StepInfo",
    "available_methods",
    "check_hypergradient",
    "custom_fixed_point",
    "custom_root",
    "hypergradient",
    "problems",
    "register",
    "solve",
    "solver_options",
]
