r"""Step sizes that adapt: what ``"auto"`` (the default of the solvers' step-size settings) computes.

An explicit number is used as given. ``"auto"`` derives the step from the problem itself:

* **inner steps** from the curvature of the inner loss: L̂ ≈ λ_max(∇²_ww L_T) by power iteration on one
  linearization (20 Hessian-vector products the first time, 5 from the last eigenvector estimate afterwards), and
  η = 1/L̂ (gradient descent converges for η < 2/L). The estimate is refreshed every ``REFRESH_EVERY`` outer steps,
  and at the next step whenever a full-batch inner loss rose during training (then L̂ is at least doubled: the
  curvature grew faster than the estimate followed); a refresh lowers L̂ by at most half (5 iterations from the old
  eigenvector can miss a new top direction). The Neumann step α of ``ift`` is the same 1/L̂. With it,
  ``inner_momentum="auto"`` is heavy-ball momentum 0.9 (SGD only).
* **outer steps**: Adam and RMSprop move each coordinate by about their step, so ``"auto"`` is
  ``OUTER_STEP``·max(1, rms(λ₀)) — a tenth of the scale of the hyperparameters, put them on an O(1) scale
  (log-parameterize positive ones); plain gradient steps (F2SA, LV-HBA) are normalised by the first direction's size
  instead, η = ``OUTER_STEP``·max(1, rms(λ₀)) / rms(d₀), so the first step moves λ by that much whatever the scale of
  the losses.
* F2SA and LV-HBA also scale their penalty-side steps with the curvature of the outer loss in w, L̂_V (see the
  solvers).

Every estimate's oracle calls are counted in the history like any other (``calls_hvp``, ``calls_grad_inner``), and its
value is recorded as the ``curvature`` metric. Rescaling both losses by any factor leaves the iterates of ``"auto"``
unchanged (up to rounding): every step is a ratio of quantities that scale alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from bilevel import oracles, tree
from bilevel.errors import BilevelError
from bilevel.linsolve import power_method
from bilevel.problem import Problem, check_finite
from bilevel.types import Batch, Params

Auto = Literal["auto"]
"""The value of a step-size setting that asks for the adaptive rule of this module."""

AUTO_MOMENTUM = 0.9
"""Heavy-ball momentum of ``inner_momentum="auto"`` with ``inner_lr="auto"`` (SGD): stable for η = 1/L̂ (heavy ball
needs η < 2(1 + μ)/L) and far faster than plain gradient steps on the ill-conditioned inner problems that per-weight
hyperparameters create (measured on the quick-start ridge in tests/test_defaults.py)."""

OUTER_STEP = 0.1
"""The first outer move, relative to the scale max(1, rms(λ₀)) of the outer variables."""
FIRST_ITERATIONS = 20
REFRESH_ITERATIONS = 5
REFRESH_EVERY = 10


@dataclasses.dataclass(frozen=True)
class Curvature:
    """L̂ ≈ λ_max of a Hessian, the unit vector it was measured along (warm start of the next estimate), the outer
    step at which it was measured, and whether a rising loss asks for a refresh at the next step."""

    value: float
    vector: Params
    step: int
    stale: bool = False

    def due(self, step: int) -> bool:
        """Whether to measure again at outer step ``step``."""
        return self.stale or step - self.step >= REFRESH_EVERY

    def flag(self) -> Curvature:
        """This estimate, marked for a refresh (a loss rose under its step)."""
        return dataclasses.replace(self, stale=True)


def measure(
    fn: Callable[[Params, Params], Tensor], outer: Params, inner: Params, step: int, previous: Curvature | None,
    what: str, *, may_vanish: bool = False,
) -> Curvature:
    """L̂ of ∇²_ww fn(λ, w) at (``outer``, ``inner``): a fresh estimate, or a refresh from ``previous``.
    ``may_vanish``: a zero curvature is an answer (the outer loss can be flat in w), not an error."""
    lin = oracles.Linearization.of(fn, outer, inner, name=what.replace(" ", "_"))
    check_finite(f"Problem: {what.replace(' ', '_')}", lin.loss, step)
    if previous is None:
        gen = torch.Generator().manual_seed(0)  # a private generator: the global ones are not drawn from
        start = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device) for k, v in inner.items()}
        value, vector = power_method(lin.hvp, start, maxiter=FIRST_ITERATIONS)
    else:
        value, vector = power_method(lin.hvp, previous.vector, maxiter=REFRESH_ITERATIONS)
        # A few iterations from the old eigenvector underestimate λ_max when the eigenvector has turned (the
        # hyperparameters moved): let the estimate fall by at most half per refresh, and at least double it after a
        # rise of the loss (the step was too long).
        value = max(value, 2.0 * previous.value if previous.stale else 0.5 * previous.value)
    if not (math.isfinite(value) and (value > 0 or may_vanish)):
        raise BilevelError(
            f"steps: the curvature of the {what} in the inner variables is {value:.3g} at outer step {step} (power "
            "iteration), so no step size can be derived from it; pass the step sizes explicitly (e.g. inner_lr=0.1)."
        )
    return Curvature(value, tree.detach(vector), step)


def inner_curvature(problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None, step: int,
                    previous: Curvature | None = None) -> Curvature:
    """L̂_T ≈ λ_max(∇²_ww L_T(λ, w; batch))."""
    return measure(lambda lam, w: problem.inner_objective(lam, w, batch, buffers), outer, inner, step, previous,
                   "inner loss")


def outer_curvature(problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None, step: int,
                    previous: Curvature | None = None) -> Curvature:
    """L̂_V ≈ λ_max(∇²_ww L_V(λ, w; batch)) (F2SA's and LV-HBA's penalty-side steps)."""
    return measure(lambda lam, w: problem.outer_objective(lam, w, batch, buffers), outer, inner, step, previous,
                   "outer loss", may_vanish=True)


def inner_momentum(setting: float | str, inner_lr: float | str, optimizer: str) -> float:
    """The heavy-ball momentum in use: ``setting``, or for ``"auto"`` ``AUTO_MOMENTUM`` when the step is ``"auto"``
    too and the optimizer is SGD, else 0 (an explicit step keeps plain gradient steps, as before)."""
    if setting != "auto":
        return float(setting)
    return AUTO_MOMENTUM if inner_lr == "auto" and optimizer == "sgd" else 0.0


def constraint_norm(problem: Problem, outer: Params, inner: Params, buffers: Params | None, n_constraints: int,
                    samples: int = 4) -> float:
    """‖∂_w g(λ, w)‖_F, the size of the constraints' Jacobian in w, by Hutchinson's estimate E‖(∂_w g)ᵀu‖² with
    ``samples`` Rademacher vectors u from a private generator (``samples`` constraint VJPs): what bounds the coupling
    of w and the multipliers in a primal-dual step (LV-HBA's (θ, μ) step)."""
    gen = torch.Generator().manual_seed(0)
    like = next(iter(outer.values()))
    total = 0.0
    for _ in range(samples):
        u = (torch.randint(0, 2, (n_constraints,), generator=gen) * 2 - 1).to(dtype=like.dtype, device=like.device)
        _, _, vjp_w = oracles.constraint_vjp(problem, outer, inner, u, buffers)
        total += float(tree.sq_norm(vjp_w))
    return math.sqrt(total / samples)


def outer_scale(outer: Params) -> float:
    """max(1, rms(λ)): the scale the outer steps are relative to."""
    size = tree.size(outer)
    rms = float(tree.norm(outer)) / math.sqrt(size) if size else 0.0
    return max(1.0, rms)


def adaptive_outer_lr(setting: float | str, outer: Params) -> float:
    """An Adam/RMSprop outer step: ``setting``, or for ``"auto"`` ``OUTER_STEP``·max(1, rms(λ₀))."""
    return float(setting) if setting != "auto" else OUTER_STEP * outer_scale(outer)


def normalized_outer_lr(setting: float | str, outer: Params, direction: Params) -> float | None:
    """A plain gradient outer step: ``setting``, or for ``"auto"`` the step that moves λ by ``OUTER_STEP``·
    max(1, rms(λ₀)) (in rms) along ``direction``, the first step's direction; None while that direction is zero
    (no step to scale: λ stays, and the next direction decides)."""
    if setting != "auto":
        return float(setting)
    size = tree.size(direction)
    rms = float(tree.norm(direction)) / math.sqrt(size) if size else 0.0
    if not math.isfinite(rms):
        raise BilevelError(f"steps: the first outer direction is not finite ({rms}); check the losses and the data.")
    return OUTER_STEP * outer_scale(outer) / rms if rms > 0 else None


def outer_lr_for(optimizer: str, setting: float | str, outer: Params, direction: Params | None) -> float | None:
    """The outer step for ``optimizer``: :func:`adaptive_outer_lr` for Adam and RMSprop; for SGD
    :func:`normalized_outer_lr` along the first non-zero ``direction`` (None until it is known)."""
    if optimizer in ("adam", "rmsprop") or setting != "auto":
        return adaptive_outer_lr(setting, outer)
    return None if direction is None else normalized_outer_lr(setting, outer, direction)


def losses_rose(losses: list[Any]) -> bool:
    """Whether a sequence of (full-batch) training losses rose from one step to the next by more than 0.1% (one host
    sync; smaller moves are rounding near convergence, or noise)."""
    if len(losses) < 2:
        return False
    values = torch.stack([torch.as_tensor(v).detach().reshape(()) for v in losses])
    return bool((values[1:] > values[:-1] + 1e-3 * values[:-1].abs()).any())
