"""bilevel: bilevel and gradient-based hyperparameter optimization in PyTorch.

Public API: describe the task as a :class:`Problem`, call :func:`solve`, read the :class:`Result`.
"""

from bilevel import problems, solvers  # solvers: registers the built-in methods
from bilevel.callbacks import EarlyStopping, ProgressBar, StepInfo
from bilevel.check import HypergradCheck, check_hypergradient, hypergradient
from bilevel.errors import BilevelError, BilevelWarning
from bilevel.functional import ModuleView
from bilevel.history import History
from bilevel.hypergrad import Hypergradient, implicit_hypergrad, unrolled_hypergrad
from bilevel.linsolve import LinSolveResult, NeumannDivergenceError, cg, exact, minres, neumann
from bilevel.precondition import lbfgs_preconditioner
from bilevel.problem import Problem
from bilevel.registry import available_methods, register, solver_options
from bilevel.solve import Result, solve

__version__ = "0.1.0"

__all__ = [
    "BilevelError",
    "BilevelWarning",
    "EarlyStopping",
    "History",
    "HypergradCheck",
    "Hypergradient",
    "LinSolveResult",
    "ModuleView",
    "NeumannDivergenceError",
    "Problem",
    "ProgressBar",
    "Result",
    "StepInfo",
    "available_methods",
    "cg",
    "check_hypergradient",
    "hypergradient",
    "exact",
    "implicit_hypergrad",
    "lbfgs_preconditioner",
    "minres",
    "neumann",
    "problems",
    "register",
    "solve",
    "solver_options",
    "solvers",
    "unrolled_hypergrad",
]
