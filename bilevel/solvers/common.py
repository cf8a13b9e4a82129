"""Pieces shared by the solvers: inner training steps, the outer update, validation of settings."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from bilevel import oracles, tree
from bilevel.data import DataStreams
from bilevel.errors import BilevelError
from bilevel.optim import Optimizer, make_optimizer
from bilevel.problem import Problem
from bilevel.types import Params


def train_inner(
    problem: Problem,
    outer: Params,
    inner: Params,
    buffers: Params,
    optimizer: Optimizer,
    opt_state: Any,
    data: DataStreams,
    n_steps: int,
) -> tuple[Params, Params, Any, float | None]:
    r"""``n_steps`` of ``optimizer`` on L_T(λ, ·): w ← Proj_W(Φ(w, ∇_w L_T(λ, w; B_t))).

    Returns the new (inner, buffers, optimizer state, last inner loss or None when ``n_steps == 0``).
    """
    loss = None
    for _ in range(n_steps):
        inner, buffers, opt_state, loss = inner_step(problem, outer, inner, buffers, optimizer, opt_state, data.inner())
    return inner, buffers, opt_state, loss


def inner_step(
    problem: Problem, outer: Params, inner: Params, buffers: Params, optimizer: Optimizer, opt_state: Any, batch: Any
) -> tuple[Params, Params, Any, Tensor]:
    r"""One training step on a given batch: w ← Proj_W(Φ(w, ∇_w L_T(λ, w; B))).

    Returns the new (inner, buffers, optimizer state, inner loss before the step).
    """
    loss, g, buffers = oracles.value_and_grad_inner(problem, outer, inner, batch, buffers)
    inner, opt_state = optimizer.update(inner, g, opt_state)
    return problem.project_inner(tree.detach(inner)), buffers, opt_state, loss


def make_inner_optimizer(name: str, lr: float, momentum: float = 0.0) -> Optimizer:
    """The inner optimizer by name; ``momentum`` applies to ``"sgd"`` (heavy ball) and is ignored by the others."""
    return make_optimizer(name, lr, **({"momentum": momentum} if name == "sgd" else {}))


def outer_update(
    problem: Problem, outer: Params, hypergrad: Params, optimizer: Optimizer, opt_state: Any
) -> tuple[Params, Any]:
    r"""λ ← Proj_Λ(Φ(λ, dF/dλ))."""
    outer, opt_state = optimizer.update(outer, hypergrad, opt_state)
    return problem.project_outer(tree.detach(outer)), opt_state


def require_positive(owner: str, **values: float) -> None:
    """Raise naming the first setting that is not > 0."""
    for name, value in values.items():
        if not value > 0:
            raise BilevelError(f"{owner}: {name} must be positive, got {value}.")


def require_nonnegative_int(owner: str, **values: int) -> None:
    """Raise naming the first setting that is not an integer ≥ 0."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 0:
            raise BilevelError(f"{owner}: {name} must be an integer >= 0, got {value!r}.")


def power_schedule(base: float, k: int, power: float, offset: float = 1.0) -> float:
    r"""``base · ((k + offset) / offset)^power``: equals ``base`` at k = 0 and grows (power > 0) or decays
    (power < 0) polynomially — the step-size and penalty schedules of F2SA and LV-HBA."""
    return base * ((k + offset) / offset) ** power
