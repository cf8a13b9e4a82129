"""Pieces shared by the solvers: inner training steps, the outer update, validation of settings."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel import oracles, tree
from bilevel.data import DataStreams
from bilevel.errors import BilevelError
from bilevel.linsolve import power_iteration
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


def estimate_curvature(
    problem: Problem, outer: Params, inner: Params, batch: Any, buffers: Params | None, iterations: int = 20
) -> float:
    r"""L̂ ≈ λ_max(∇²_ww L_T(λ, w; batch)) by ``iterations`` power iterations on one linearization (1 gradient +
    ``iterations`` HVPs, counted like every oracle call). The start vector comes from a private generator with a
    fixed seed, so the estimate draws nothing from the global random generators (runs stay reproducible)."""
    lin = oracles.Linearization(problem, outer, inner, batch, buffers)
    gen = torch.Generator().manual_seed(0)
    start = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device) for k, v in inner.items()}
    return power_iteration(lin.hvp, start, maxiter=iterations)


def power_schedule(base: float, k: int, power: float, offset: float = 1.0) -> float:
    r"""``base · ((k + offset) / offset)^power``: equals ``base`` at k = 0 and grows (power > 0) or decays
    (power < 0) polynomially — the step-size and penalty schedules of F2SA and LV-HBA."""
    return base * ((k + offset) / offset) ** power
