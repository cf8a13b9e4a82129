r"""Optimality conditions F(x, θ) = 0 for :func:`bilevel.implicit.custom_root`, ready-made.

Each builder returns ``F(x, *theta)`` with the structure of ``x`` (a tensor or a structure of tensors):

* :func:`stationarity` — ∇_x f(x, θ) = 0 (an unconstrained smooth minimum);
* :func:`projected_gradient` — x = P_C(x − η∇_x f(x, θ)) (a minimum over a convex set C: box, nonnegative orthant,
  simplex, ℓ2 ball from :mod:`bilevel.projections`);
* :func:`proximal_gradient` — x = prox_{ηg}(x − η∇_x f(x, θ)) (a composite minimum f + g: ℓ1 / Lasso, elastic net,
  group lasso with the proximal maps below);
* :func:`kkt` — the Karush–Kuhn–Tucker conditions of min f s.t. h = 0, g ≤ 0 in (x, ν, μ).

The fixed-point conditions hold for any step η > 0; η only changes how A = ∂_x F is conditioned (a step near 1/L
keeps it well conditioned). Proximal maps (Parikh & Boyd, 2014, "Proximal Algorithms"):

.. math::
    \mathrm{prox}_{\eta\lambda\|\cdot\|_1}(y) = \mathrm{sign}(y)\max(|y| - \eta\lambda, 0),\qquad
    \mathrm{prox}_{\eta(\lambda\|\cdot\|_1 + \frac{\mu}{2}\|\cdot\|^2)}(y)
        = \frac{\mathrm{prox}_{\eta\lambda\|\cdot\|_1}(y)}{1 + \eta\mu},\qquad
    \mathrm{prox}_{\eta\lambda\|\cdot\|_{2,1}}(y)_G = \max\Big(1 - \frac{\eta\lambda}{\|y_G\|}, 0\Big) y_G.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad
from torch.utils import _pytree as pytree


def stationarity(f: Callable[..., Tensor]) -> Callable[..., Any]:
    r"""F(x, θ) = ∇_x f(x, θ) for a smooth scalar objective ``f(x, *theta)``."""

    def optimality(x: Any, *theta: Any) -> Any:
        return grad(f)(x, *theta)

    return optimality


def projected_gradient(f: Callable[..., Tensor], projection: Callable[[Any], Any], step: float = 1.0
                       ) -> Callable[..., Any]:
    r"""F(x, θ) = P_C(x − η∇_x f(x, θ)) − x: x minimises f(·, θ) over the convex set C that ``projection`` projects
    onto (e.g. ``bilevel.projections.box(0, 1)``, ``simplex()``, ``l2_ball(r)``)."""

    def optimality(x: Any, *theta: Any) -> Any:
        g = grad(f)(x, *theta)
        moved = pytree.tree_map(lambda a, b: a - step * b, x, g)
        return pytree.tree_map(lambda p, a: p - a, projection(moved), x)

    return optimality


def proximal_gradient(f: Callable[..., Tensor], prox: Callable[..., Any], step: float = 1.0) -> Callable[..., Any]:
    r"""F(x, θ) = prox(x − η∇_x f(x, θ), η, θ) − x: x minimises f(·, θ) + g(·, θ) with ``prox(y, step, *theta)`` the
    proximal map of step·g (:func:`prox_l1`, :func:`prox_elastic_net`, :func:`prox_group_lasso`)."""

    def optimality(x: Any, *theta: Any) -> Any:
        g = grad(f)(x, *theta)
        moved = pytree.tree_map(lambda a, b: a - step * b, x, g)
        return pytree.tree_map(lambda p, a: p - a, prox(moved, step, *theta), x)

    return optimality


def prox_l1(y: Tensor, step: float, lam: Tensor | float) -> Tensor:
    """prox of step·λ‖·‖₁: soft thresholding sign(y)·max(|y| − step·λ, 0)."""
    return torch.sign(y) * torch.clamp(y.abs() - step * lam, min=0.0)


def prox_elastic_net(y: Tensor, step: float, lam: Tensor | float, mu: Tensor | float) -> Tensor:
    """prox of step·(λ‖·‖₁ + μ/2‖·‖²): soft thresholding, then shrinking by 1/(1 + step·μ)."""
    return prox_l1(y, step, lam) / (1.0 + step * mu)


def prox_group_lasso(y: Tensor, step: float, lam: Tensor | float, groups: Tensor) -> Tensor:
    r"""prox of step·λ Σ_G ‖y_G‖₂ (``groups``: an integer group id per entry): each group scaled by
    max(1 − step·λ/‖y_G‖, 0)."""
    n_groups = int(groups.max()) + 1
    sq = torch.zeros(n_groups, dtype=y.dtype, device=y.device).index_add(0, groups, y * y)
    norms = sq.clamp_min(torch.finfo(y.dtype).tiny).sqrt()
    return y * torch.clamp(1.0 - step * lam / norms, min=0.0)[groups]


def kkt(f: Callable[..., Tensor], eq: Callable[..., Tensor] | None = None, ineq: Callable[..., Tensor] | None = None
        ) -> Callable[..., Any]:
    r"""The KKT conditions of min_x f(x, θ) s.t. h(x, θ) = 0 (``eq``), g(x, θ) ≤ 0 (``ineq``), in the primal-dual
    variable (x, ν, μ) (pass the solver's output as that triple; ν or μ an empty tensor when absent):

    .. math::
        F = \big(\nabla_x f + J_h^\top \nu + J_g^\top \mu,\; h(x, \theta),\; \mu \odot g(x, \theta)\big),

    the Lagrangian's stationarity, primal feasibility of the equalities and complementary slackness (which, with
    μ ≥ 0 and g ≤ 0, makes F = 0 exactly the KKT point; strict complementarity makes ∂F invertible). ``x`` is a
    tensor."""

    def lagrangian(x: Tensor, nu: Tensor, mu: Tensor, *theta: Any) -> Tensor:
        value = f(x, *theta)
        if eq is not None:
            value = value + (nu * eq(x, *theta)).sum()
        if ineq is not None:
            value = value + (mu * ineq(x, *theta)).sum()
        return value

    def optimality(z: tuple[Tensor, Tensor, Tensor], *theta: Any) -> tuple[Tensor, Tensor, Tensor]:
        x, nu, mu = z
        stationary = grad(lagrangian)(x, nu, mu, *theta)
        primal = eq(x, *theta) if eq is not None else nu * 0
        slack = mu * ineq(x, *theta) if ineq is not None else mu * 0
        return stationary, primal, slack

    return optimality


__all__ = ["kkt", "projected_gradient", "prox_elastic_net", "prox_group_lasso", "prox_l1", "proximal_gradient",
           "stationarity"]
