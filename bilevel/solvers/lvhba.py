r"""LV-HBA: proximal Lagrangian value function, Hessian-free bilevel algorithm for a constrained lower level
(Yao, Yu, Zeng & Zhang, 2024, "Constrained Bi-Level Optimization: Proximal Lagrangian Value Function Approach and
Hessian-free Algorithm", ICLR).

With F = ``outer_loss``, f = ``inner_loss``, g = ``inner_constraints`` (feasible where g ≤ 0), x = outer, y = inner:

.. math::
    \min_{(x, y) \in C} F(x, y) \quad\text{s.t.}\quad y \in \arg\min_{y} \{ f(x, y) : g(x, y) \le 0 \},

reformulated with the proximal Lagrangian value function

.. math::
    v_\gamma(x, y, z) = \min_\theta \max_{\mu \ge 0}\; f(x, \theta) + \mu^\top g(x, \theta)
        + \tfrac{1}{2\gamma_1}\|\theta - y\|^2 - \tfrac{1}{2\gamma_2}\|\mu - z\|^2

as min F s.t. f(x, y) − v_γ(x, y, z) ≤ 0, and solved by a single loop with penalty c_k = c̲ (k + 1)^p, p ∈ (0, ½):

.. math::
    (\theta, \mu) &\leftarrow \mathrm{Proj}_{W \times \mathbb R_+}\big[(\theta, \mu) - \eta\,(d_\theta, d_\mu)\big],\quad
        d_\theta = \nabla_y f(x, \theta) + \mu^\top \nabla_y g(x, \theta) + (\theta - y)/\gamma_1,\quad
        d_\mu = -g(x, \theta) + (\mu - z)/\gamma_2 \\
    (x, y) &\leftarrow \mathrm{Proj}_C\big[(x, y) - \alpha\,(d_x, d_y)\big],\quad
        d_x = \nabla_x F/c_k + \nabla_x f(x, y) - \nabla_x f(x, \theta) - \mu^\top \nabla_x g(x, \theta),\quad
        d_y = \nabla_y F/c_k + \nabla_y f(x, y) - (y - \theta)/\gamma_1 \\
    z &\leftarrow \mathrm{Proj}_{[0, r]^m}\big[z + \beta(\mu - z)/\gamma_2\big]

(d_x and d_y use the new θ and μ; ``outer_lr`` optionally gives x its own step in place of α). Proj_C is
``problem.project_joint``: the problem's ``joint_projection`` when the set couples x and y (e.g. {1ᵀx + 1ᵀy = 0},
built with :func:`bilevel.projections.joint`), else the product of ``outer_projection`` and ``inner_projection``;
θ is projected with ``inner_projection`` (W). ``hypergrad_norm`` in the history is ‖d_x‖.

Equality constraints h(x, y) = 0 are written as the pair g = (h, −h) ≤ 0.

**Without** ``inner_constraints`` the method runs unconstrained: μ and z are empty, v_γ is the Moreau envelope
min_θ f(x, θ) + ‖θ − y‖²/(2γ₁) and the updates above lose their μ terms (a penalized Moreau-envelope method).

Cost per step: 4 gradients (∇_y f at θ, ∇_x f at the new θ, ∇F and ∇f at (x, y)) plus 2 constraint VJPs when
constrained; no Hessians. ``state.inner`` is y, the lower-level solution selected by F; θ is its proximal partner.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from bilevel import oracles, tree
from bilevel.data import DataStreams
from bilevel.options import Options, PositiveFloat, Range
from bilevel.problem import Problem
from bilevel.registry import register
from bilevel.solvers.common import power_schedule
from bilevel.types import Params


@dataclasses.dataclass(frozen=True)
class LVHBAState:
    """State of :class:`LVHBA`.

    Attributes:
        outer: x. inner: y (the lower-level solution estimate). theta: θ, the proximal lower-level point.
        mu: μ ≥ 0, multipliers of g at θ (shape (m,); empty without constraints). z: prox centre of μ, in [0, r]^m.
        buffers: module buffers (held fixed). k: steps taken.
    """

    outer: Params
    inner: Params
    theta: Params
    mu: Tensor
    z: Tensor
    buffers: Params
    k: int = 0


@register("lvhba")
@dataclasses.dataclass(frozen=True)
class LVHBA(Options):
    r"""Single-loop, Hessian-free method for bilevel problems with a constrained lower level (Yao et al., 2024).

    Settings (the paper's symbols): ``lr`` α (step on (x, y)), ``outer_lr`` a separate step on x (default α, as in
    the paper; a different one rescales x, e.g. when ∇_x is O(1/n) per coordinate), ``prox_lr`` η (step on (θ, μ)), ``z_lr`` β,
    ``gamma1``/``gamma2`` γ₁/γ₂ (proximal parameters), ``penalty0`` c̲ and ``penalty_power`` p of c_k = c̲(k+1)^p,
    ``z_max`` r (Z = [0, r]^m). The paper's toy uses α 0.008, β 0.02, η 0.01, γ₁ = γ₂ = 10 and c̲ = 0.025, which
    converges slowly; c̲ between 1 and 10 is much faster (hence the default 1).
    """

    problem_inputs: ClassVar[frozenset[str]] = frozenset({"inner_constraints", "joint_projection", "inner_projection"})
    no_hypergradient: ClassVar[str] = (
        "lvhba steps along the gradient of a penalized value-function reformulation (d_x mixes ∇F/c_k with a value-"
        "function gap), which is no estimate of dF/dλ at a point"
    )

    lr: PositiveFloat = 0.01
    outer_lr: PositiveFloat | None = None
    prox_lr: PositiveFloat = 0.01
    z_lr: PositiveFloat = 0.02
    gamma1: PositiveFloat = 10.0
    gamma2: PositiveFloat = 10.0
    penalty0: PositiveFloat = 1.0
    penalty_power: Annotated[float, Range(0.0, 0.5, high_open=True)] = 0.3
    z_max: PositiveFloat = 1000.0

    def penalty(self, k: int) -> float:
        """c_k = c̲ (k + 1)^p."""
        return power_schedule(self.penalty0, k, self.penalty_power, 1.0)

    # ----- protocol -----------------------------------------------------------------------------------------
    def init(self, problem: Problem) -> LVHBAState:
        outer, inner = problem.project_joint(tree.clone(problem.outer_init), tree.clone(problem.inner_init))
        buffers = tree.clone(problem.buffers_init)
        ref = next(iter(outer.values()))
        n_constraints = 0
        if problem.has_constraints:
            with torch.no_grad():
                n_constraints = problem.constraints(outer, inner, buffers).numel()
        mu = torch.zeros(n_constraints, dtype=ref.dtype, device=ref.device)
        theta = problem.project_inner(tree.clone(inner))
        return LVHBAState(outer, inner, theta, mu, mu.clone(), buffers)

    def step(self, problem: Problem, state: LVHBAState, data: DataStreams) -> tuple[LVHBAState, dict[str, Any]]:
        x, y, theta, mu, z, buffers = state.outer, state.inner, state.theta, state.mu, state.z, state.buffers
        inner_batch, outer_batch = data.inner(), data.outer()  # one sample for every f term, as differences of f
        constrained = mu.numel() > 0
        metrics: dict[str, Any] = {}

        # (θ, μ) step at the old point
        d_theta = oracles.grad_inner(problem, x, theta, inner_batch, buffers)
        d_theta = tree.axpy(1.0 / self.gamma1, tree.sub(theta, y), d_theta)
        if constrained:
            g_val, _, mu_g_w = oracles.constraint_vjp(problem, x, theta, mu, buffers)
            d_theta = tree.add(d_theta, mu_g_w)
            d_mu = -g_val + (mu - z) / self.gamma2
            mu = (mu - self.prox_lr * d_mu).clamp(min=0.0).detach()
            metrics["max_constraint"] = g_val.max()
        theta = problem.project_inner(tree.detach(tree.axpy(-self.prox_lr, d_theta, theta)))

        # (x, y) step with the new θ, μ
        c_k = self.penalty(state.k)
        outer_loss, big_f_x, big_f_y = oracles.grad_outer(problem, x, y, outer_batch, buffers)
        inner_loss, f_x, f_y = oracles.grad_inner_both(problem, x, y, inner_batch, buffers)
        f_theta_x = oracles.grad_inner_wrt_outer(problem, x, theta, inner_batch, buffers)
        d_x = tree.axpy(1.0 / c_k, big_f_x, tree.sub(f_x, f_theta_x))
        if constrained:
            _, mu_g_x, _ = oracles.constraint_vjp(problem, x, theta, mu, buffers)
            d_x = tree.sub(d_x, mu_g_x)
        d_y = tree.axpy(1.0 / c_k, big_f_y, tree.axpy(-1.0 / self.gamma1, tree.sub(y, theta), f_y))
        outer_lr = self.lr if self.outer_lr is None else self.outer_lr
        x, y = problem.project_joint(tree.detach(tree.axpy(-outer_lr, d_x, x)), tree.detach(tree.axpy(-self.lr, d_y, y)))

        # z step
        if constrained:
            z = (z + self.z_lr * (mu - z) / self.gamma2).clamp(0.0, self.z_max).detach()

        metrics.update({"outer_loss": outer_loss, "hypergrad_norm": tree.norm(d_x), "penalty": c_k,
                        "inner_loss": inner_loss})
        return LVHBAState(x, y, theta, mu, z, buffers, state.k + 1), metrics
