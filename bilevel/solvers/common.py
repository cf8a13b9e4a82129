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
) -> tuple[Params, Params, Any, list[Tensor]]:
    r"""``n_steps`` of ``optimizer`` on L_T(λ, ·): w ← Proj_W(Φ(w, ∇_w L_T(λ, w; B_t))).

    Returns the new (inner, buffers, optimizer state, the inner loss before each step).
    """
    losses = []
    for _ in range(n_steps):
        inner, buffers, opt_state, loss = inner_step(problem, outer, inner, buffers, optimizer, opt_state, data.inner())
        losses.append(loss)
    return inner, buffers, opt_state, losses


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
    """The inner optimizer by name; ``momentum`` is heavy-ball momentum of ``"sgd"`` (see
    :func:`check_momentum_applies`)."""
    return make_optimizer(name, lr, **({"momentum": momentum} if name == "sgd" else {}))


def check_momentum_applies(owner: str, optimizer: str, momentum: float) -> None:
    """Refuse a momentum for an optimizer that has none of its own (it would be ignored)."""
    if momentum and optimizer != "sgd":
        raise BilevelError(
            f"{owner}: inner_momentum={momentum} applies to inner_optimizer='sgd' only, but inner_optimizer="
            f"{optimizer!r} (which keeps its own moment estimates); pass inner_momentum=0.0 or inner_optimizer='sgd'."
        )


def outer_update(
    problem: Problem, outer: Params, hypergrad: Params, optimizer: Optimizer, opt_state: Any
) -> tuple[Params, Any]:
    r"""λ ← Proj_Λ(Φ(λ, dF/dλ))."""
    outer, opt_state = optimizer.update(outer, hypergrad, opt_state)
    return problem.project_outer(tree.detach(outer)), opt_state


def outer_step(
    problem: Problem, outer: Params, hypergrad: Params, optimizer: str, lr: float | None, opt_state: Any
) -> tuple[Params, Any]:
    r""":func:`outer_update` with the optimizer named ``optimizer`` at step ``lr``; λ (and the optimizer's state)
    stay while ``lr`` is None (an ``"auto"`` step still waiting for a non-zero direction to scale by)."""
    if lr is None:
        return outer, opt_state
    return outer_update(problem, outer, hypergrad, make_optimizer(optimizer, lr), opt_state)


def power_schedule(base: float, k: int, power: float, offset: float = 1.0) -> float:
    r"""``base · ((k + offset) / offset)^power``: equals ``base`` at k = 0 and grows (power > 0) or decays
    (power < 0) polynomially — the step-size and penalty schedules of F2SA and LV-HBA."""
    return base * ((k + offset) / offset) ** power
