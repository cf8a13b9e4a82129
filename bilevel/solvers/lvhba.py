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
from bilevel.steps import Auto, Curvature, constraint_norm, inner_curvature, normalized_outer_lr, outer_curvature
from bilevel.types import Params


@dataclasses.dataclass(frozen=True)
class LVHBAState:
    """State of :class:`LVHBA`.

    Attributes:
        outer: x. inner: y (the lower-level solution estimate). theta: θ, the proximal lower-level point.
        mu: μ ≥ 0, multipliers of g at θ (shape (m,); empty without constraints). z: prox centre of μ, in [0, r]^m.
        buffers: module buffers (held fixed). k: steps taken.
        base: the step sizes in use (``"auto"`` ones resolved), or None before the first step.
        curvature / outer_curvature: L̂_f, L̂_F behind the ``"auto"`` settings (or None).
    """

    outer: Params
    inner: Params
    theta: Params
    mu: Tensor
    z: Tensor
    buffers: Params
    k: int = 0
    base: dict[str, float] | None = None
    curvature: Curvature | None = None
    outer_curvature: Curvature | None = None


@register("lvhba")
@dataclasses.dataclass(frozen=True)
class LVHBA(Options):
    r"""Single-loop, Hessian-free method for bilevel problems with a constrained lower level (Yao et al., 2024).

    Settings (the paper's symbols): ``lr`` α (step on (x, y)), ``outer_lr`` a separate step on x (None: α, as in
    the paper; a different one rescales x, e.g. when ∇_x is O(1/n) per coordinate), ``prox_lr`` η (step on (θ, μ)),
    ``z_lr`` β, ``gamma1``/``gamma2`` γ₁/γ₂ (proximal parameters), ``penalty0`` c̲ and ``penalty_power`` p of
    c_k = c̲(k+1)^p, ``z_max`` r (Z = [0, r]^m). The paper's toy uses α 0.008, β 0.02, η 0.01, γ₁ = γ₂ = 10 and
    c̲ = 0.025, which converges slowly; c̲ between 1 and 10 is much faster (hence the default 1).

    ``"auto"`` (the default of ``lr``, ``outer_lr``, ``prox_lr``, ``gamma1`` and ``gamma2``; :mod:`bilevel.steps`)
    scales them to the curvatures L̂_f ≈ λ_max(∇²_yy f) and L̂_F ≈ λ_max(∇²_yy F), refreshed every 10 steps:

    * γ₁ = 10/L̂_f (the paper's γ₁ = 10 for L = 1), η = 1/(L̂_f + 1/γ₁) (the θ-step's smoothness) and
      α = 1/(L̂_F/c̲ + L̂_f + 1/γ₁) (the y-step's);
    * with constraints, ‖∂_y g‖_F (Hutchinson, 4 constraint VJPs, once) joins both sums, γ₂ = 1/‖∂_y g‖_F and 1/γ₂
      joins η's: the (θ, μ) step is a gradient descent-ascent step whose coupling is the constraints' Jacobian, stable
      when the multipliers' curvature 1/γ₂ matches it (the reformulation is exact for every γ₁, γ₂ > 0);
    * x moves by a tenth of max(1, rms(x₀)) along the first non-zero d_x without constraints, and by α with them
      (the paper's choice, which ``outer_lr=None`` always makes; a longer x-step destabilised the primal-dual
      dynamics on the paper's toy). Both are scale-free: d_x scales with the losses as 1/α does.
    """

    problem_inputs: ClassVar[frozenset[str]] = frozenset({"inner_constraints", "joint_projection", "inner_projection"})
    no_hypergradient: ClassVar[str] = (
        "lvhba steps along the gradient of a penalized value-function reformulation (d_x mixes ∇F/c_k with a value-"
        "function gap), which is no estimate of dF/dλ at a point"
    )

    lr: PositiveFloat | Auto = "auto"
    outer_lr: PositiveFloat | Auto | None = "auto"
    prox_lr: PositiveFloat | Auto = "auto"
    z_lr: PositiveFloat = 0.02
    gamma1: PositiveFloat | Auto = "auto"
    gamma2: PositiveFloat | Auto = "auto"
    penalty0: PositiveFloat = 1.0
    penalty_power: Annotated[float, Range(0.0, 0.5, high_open=True)] = 0.3
    z_max: PositiveFloat = 1000.0

    def penalty(self, k: int) -> float:
        """c_k = c̲ (k + 1)^p."""
        return power_schedule(self.penalty0, k, self.penalty_power, 1.0)

    def base_steps(self, f_curvature: float | None, big_f_curvature: float | None, coupling: float = 0.0
                   ) -> dict[str, float]:
        """γ₁, η (``prox_lr``) and α (``lr``) with ``"auto"`` resolved from L̂_f, L̂_F and the constraints' Jacobian
        size ‖∂_y g‖ (``coupling``; see the class)."""
        gamma1 = 10.0 / f_curvature if self.gamma1 == "auto" else float(self.gamma1)
        # γ₂ = 1/‖∂_y g‖: the multipliers' curvature 1/γ₂ then matches the coupling, which a gradient
        # descent-ascent step on (θ, μ) needs to be stable at a step of order 1/‖∂_y g‖
        gamma2 = (1.0 / coupling if coupling else 10.0) if self.gamma2 == "auto" else float(self.gamma2)
        f_side = (f_curvature or 0.0) + 1.0 / gamma1 + coupling
        prox_lr = 1.0 / (f_side + (1.0 / gamma2 if coupling else 0.0)) if self.prox_lr == "auto" else \
            float(self.prox_lr)
        lr = 1.0 / ((big_f_curvature or 0.0) / self.penalty0 + f_side) if self.lr == "auto" else float(self.lr)
        return {"gamma1": gamma1, "gamma2": gamma2, "prox_lr": prox_lr, "lr": lr}

    def _measure(self, problem: Problem, state: LVHBAState, inner_batch: Any, outer_batch: Any) -> LVHBAState:
        """L̂_f (and L̂_F) at (x, y) when an ``"auto"`` setting needs them and they are missing or due."""
        need_f = "auto" in (self.gamma1, self.prox_lr, self.lr)
        f, big_f = state.curvature, state.outer_curvature
        if need_f and (f is None or f.due(state.k)):
            f = inner_curvature(problem, state.outer, state.inner, inner_batch, state.buffers, state.k, f)
        if self.lr == "auto" and (big_f is None or big_f.due(state.k)):
            big_f = outer_curvature(problem, state.outer, state.inner, outer_batch, state.buffers, state.k, big_f)
        coupling = state.base.get("coupling") if state.base is not None else None
        if coupling is None:  # constraints: the (θ, μ) step couples w and μ through ∂_y g (measured once, if needed)
            m = state.mu.numel() if "auto" in (self.gamma2, self.prox_lr, self.lr) else 0
            coupling = constraint_norm(problem, state.outer, state.inner, state.buffers, m) if m else 0.0
        base = {**self.base_steps(f and f.value, big_f and big_f.value, coupling), "coupling": coupling}
        if state.base is not None and "outer_lr" in state.base:
            base["outer_lr"] = state.base["outer_lr"]
        return dataclasses.replace(state, curvature=f, outer_curvature=big_f, base=base)

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
        inner_batch, outer_batch = data.inner(), data.outer()  # one sample for every f term, as differences of f
        if state.base is None or "auto" in (self.gamma1, self.gamma2, self.prox_lr, self.lr):
            state = self._measure(problem, state, inner_batch, outer_batch)
        steps = state.base
        gamma1, gamma2, prox_lr, lr = steps["gamma1"], steps["gamma2"], steps["prox_lr"], steps["lr"]
        x, y, theta, mu, z, buffers = state.outer, state.inner, state.theta, state.mu, state.z, state.buffers
        constrained = mu.numel() > 0
        metrics: dict[str, Any] = {}

        # (θ, μ) step at the old point
        d_theta = oracles.grad_inner(problem, x, theta, inner_batch, buffers)
        d_theta = tree.axpy(1.0 / gamma1, tree.sub(theta, y), d_theta)
        if constrained:
            g_val, _, mu_g_w = oracles.constraint_vjp(problem, x, theta, mu, buffers)
            d_theta = tree.add(d_theta, mu_g_w)
            d_mu = -g_val + (mu - z) / gamma2
            mu = (mu - prox_lr * d_mu).clamp(min=0.0).detach()
            metrics["max_constraint"] = g_val.max()
        theta = problem.project_inner(tree.detach(tree.axpy(-prox_lr, d_theta, theta)))

        # (x, y) step with the new θ, μ
        c_k = self.penalty(state.k)
        _, big_f_x, big_f_y = oracles.grad_outer(problem, x, y, outer_batch, buffers)
        inner_loss, f_x, f_y = oracles.grad_inner_both(problem, x, y, inner_batch, buffers)
        f_theta_x = oracles.grad_inner_wrt_outer(problem, x, theta, inner_batch, buffers)
        d_x = tree.axpy(1.0 / c_k, big_f_x, tree.sub(f_x, f_theta_x))
        if constrained:
            _, mu_g_x, _ = oracles.constraint_vjp(problem, x, theta, mu, buffers)
            d_x = tree.sub(d_x, mu_g_x)
        d_y = tree.axpy(1.0 / c_k, big_f_y, tree.axpy(-1.0 / gamma1, tree.sub(y, theta), f_y))
        if "outer_lr" not in steps:  # "auto": scaled by the first non-zero d_x (at the start y = θ, so d_x = ∇_x F/c)
            use_alpha = self.outer_lr is None or (self.outer_lr == "auto" and constrained)
            outer_lr = lr if use_alpha else normalized_outer_lr(self.outer_lr, x, d_x)
            if outer_lr is not None:
                steps = {**steps, "outer_lr": outer_lr}
        x, y = problem.project_joint(tree.detach(tree.axpy(-steps.get("outer_lr", 0.0), d_x, x)),
                                     tree.detach(tree.axpy(-lr, d_y, y)))

        # z step
        if constrained:
            z = (z + self.z_lr * (mu - z) / gamma2).clamp(0.0, self.z_max).detach()

        with torch.no_grad():  # L_V at the variables returned (what every method reports as outer_loss)
            outer_loss = problem.outer_objective(x, y, outer_batch, buffers)
        metrics.update({"outer_loss": outer_loss, "hypergrad_norm": tree.norm(d_x), "penalty": c_k,
                        "inner_loss": inner_loss, "outer_lr": steps.get("outer_lr", 0.0), **steps})
        if state.curvature is not None:
            metrics["curvature"] = state.curvature.value
        if state.outer_curvature is not None:
            metrics["outer_curvature"] = state.outer_curvature.value
        new_state = dataclasses.replace(state, outer=x, inner=y, theta=theta, mu=mu, z=z, k=state.k + 1, base=steps)
        return new_state, metrics
