"""Ready-made problems: each factory returns ``(problem, evaluate)``; ``evaluate(result)`` gives test metrics.

``PROBLEMS`` maps a name to its factory (keyword options such as ``seed``, ``dtype``, ``device``, ``p``);
``problem_options(name)`` lists a factory's options with their defaults (what the CLI exposes).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from bilevel.errors import BilevelError
from bilevel.problem import Problem
from bilevel.problems.datasets import DatasetUnavailable
from bilevel.problems.fewshot import fewshot_problem
from bilevel.problems.hypercleaning import hypercleaning_data, hypercleaning_problem, hypercleaning_small
from bilevel.problems.logreg_l2 import logreg_l2_problem, logreg_l2_spam
from bilevel.problems.quadratic import Quadratic, quadratic_data, quadratic_problem
from bilevel.problems.ridge import ridge_data, ridge_hypergrad, ridge_problem, ridge_solution, ridge_val_loss
from bilevel.problems.sinusoid import sinusoid_problem

Evaluate = Callable[[Any], dict[str, float]]

PROBLEMS: dict[str, Callable[..., tuple[Problem, Evaluate]]] = {
    "quadratic": quadratic_problem,
    "logreg_l2": logreg_l2_problem,
    "logreg_l2_spam": logreg_l2_spam,
    "hypercleaning": hypercleaning_problem,
    "hypercleaning_small": hypercleaning_small,
    "sinusoid": sinusoid_problem,
    "fewshot_fashion_mnist": fewshot_problem,
}
"""Problem factories by name: ``problem, evaluate = PROBLEMS["quadratic"](seed=0)``."""

_QUAD = {"inner_lr": 1.0, "inner_steps": 10, "outer_lr": 0.1}
_LOGREG = {"inner_lr": 0.5, "inner_steps": 20, "outer_lr": 0.1}
_CLEANING = {"inner_steps": 5, "inner_lr": 0.5, "inner_momentum": 0.9, "cg_maxiter": 5, "outer_lr": 0.1}

SUGGESTED_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "quadratic": {m: _QUAD for m in ("ift", "cg", "exact", "unrolled")},
    "logreg_l2": {m: _LOGREG for m in ("ift", "cg", "exact")},
    "logreg_l2_spam": {m: _LOGREG for m in ("ift", "cg", "exact")},
    "hypercleaning": {"cg": _CLEANING, "ift": {**_CLEANING, "neumann_terms": 10, "neumann_alpha": 0.2}},
    "hypercleaning_small": {"cg": _CLEANING, "ift": {**_CLEANING, "neumann_terms": 10, "neumann_alpha": 0.2}},
    "sinusoid": {"maml": {"inner_steps": 1, "inner_lr": 0.01, "outer_lr": 3e-3}},
    "fewshot_fashion_mnist": {"maml": {"inner_steps": 1, "inner_lr": 0.4, "outer_lr": 2e-3}},
}
"""Solver settings measured to work on each problem (problem -> method -> options); the CLI starts from these.
Quadratic: A's largest eigenvalue is 1, so an inner step of 1 is 1/L. Hyper-cleaning: heavy-ball momentum on w
and 5 warm-started CG iterations reach the clean-only oracle's test accuracy in ~50 outer steps (Fashion-MNIST,
p = 0.5); later steps keep lowering the validation loss but overfit the 5k validation examples."""


def suggested_options(problem: str, method: str) -> dict[str, Any]:
    """Measured solver settings for ``method`` on ``problem`` (empty when none are recorded)."""
    return dict(SUGGESTED_OPTIONS.get(problem, {}).get(method, {}))


_NOT_OPTIONS = ("data", "splits")  # arguments that take objects, not settings


def problem_options(name: str) -> dict[str, Any]:
    """Keyword options of the problem ``name`` with their defaults (objects such as ``data=`` left out)."""
    factory = get_problem(name)
    return {p.name: p.default for p in inspect.signature(factory).parameters.values()
            if p.name not in _NOT_OPTIONS and p.default is not inspect.Parameter.empty}


def get_problem(name: str) -> Callable[..., tuple[Problem, Evaluate]]:
    """The factory registered as ``name``; a :class:`BilevelError` listing the valid names otherwise."""
    if name not in PROBLEMS:
        raise BilevelError(f"problems: unknown problem {name!r}; valid problems are {', '.join(sorted(PROBLEMS))}.")
    return PROBLEMS[name]


def make_problem(name: str, **options: Any) -> tuple[Problem, Evaluate]:
    """``PROBLEMS[name](**options)`` with unknown options reported by name."""
    valid = problem_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise BilevelError(
            f"problems: problem {name!r} has no option(s) {unknown}; its options are {', '.join(sorted(valid))}."
        )
    return get_problem(name)(**options)


__all__ = [
    "PROBLEMS",
    "SUGGESTED_OPTIONS",
    "DatasetUnavailable",
    "Evaluate",
    "Quadratic",
    "fewshot_problem",
    "get_problem",
    "hypercleaning_data",
    "hypercleaning_problem",
    "hypercleaning_small",
    "logreg_l2_problem",
    "logreg_l2_spam",
    "make_problem",
    "problem_options",
    "quadratic_data",
    "quadratic_problem",
    "ridge_data",
    "ridge_hypergrad",
    "ridge_problem",
    "ridge_solution",
    "ridge_val_loss",
    "sinusoid_problem",
    "suggested_options",
]
