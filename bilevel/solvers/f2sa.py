r"""F2SA: fully first-order stochastic approximation for bilevel problems (Kwon, Kwon, Wright & Nowak, 2023,
"A Fully First-Order Method for Stochastic Bilevel Optimization", ICML).

With f = ``outer_loss`` (L_V), g = ``inner_loss`` (L_T), x = outer, the method minimizes the penalty function

.. math::
    \mathcal L_\lambda(x, y) = f(x, y) + \lambda\,\big(g(x, y) - \min_z g(x, z)\big),\qquad
    \nabla \mathcal L^*_\lambda(x) = \nabla_x f(x, y_\lambda) + \lambda\big(\nabla_x g(x, y_\lambda) - \nabla_x g(x, z^*)\big),

whose minimizer is O(1/λ) from the bilevel solution, with a growing penalty λ_k and only gradients (no Hessians).
Per outer step k (``inner_steps`` = T):

.. math::
    &\text{repeat } T:\quad z \leftarrow \mathrm{Proj}_W\big(z - \gamma_k \nabla_y g(x, z)\big),\quad
        y \leftarrow \mathrm{Proj}_W\big(y - \alpha_k [\nabla_y f(x, y) + \lambda_k \nabla_y g(x, y)]\big)\\
    &x \leftarrow \mathrm{Proj}_X\big(x - \xi\alpha_k\, [\nabla_x f(x, y) + \lambda_k(\nabla_x g(x, y) - \nabla_x g(x, z))]\big)

with the paper's polynomial schedules, written relative to their values at k = 0 (s_k = (k + k₀)/k₀):
λ_k = min(λ₀ s_k^{a−c}, ``penalty_max``), γ_k = γ₀ s_k^{−c}, α_k = α₀ (λ₀/λ_k) s_k^{−c} and
ξα_k = ``outer_lr``·(λ₀/λ_k) s_k^{−c} — that is α_k = α₀ s_k^{−a} while λ_k grows, and λ_k α_k ∝ γ_k (the paper's
coupling λ_k ∝ γ_k/α_k, which keeps y's contraction matched to z's) also once λ_k reaches the cap —
with (a, c) = (1/3, 0) deterministic, (3/5, 2/5) noise in the upper level only, (5/7, 4/7) noise in both levels.
Cost: 3T + 3 gradients per outer step, no HVPs, two copies of w.

Sampling: each inner step draws one ``inner_data`` batch for both z and y, and the two ∇_x g terms share one batch,
so the noise cancels in λ(∇_x g(x, y) − ∇_x g(x, z)) instead of being multiplied by λ (on the test quadratic with
noisy oracles, independent batches left ‖x − x*‖ ≈ 1–8 after 300 steps, shared ones 0.02–0.04).

``momentum=True`` is the momentum-assisted variant: one inner step per outer step (T = 1) and every oracle —
∇g(x, z), ∇g(x, y), ∇f(x, y), each with its x and w parts — replaced by a STORM estimator (Cutkosky & Orabona,
2019, "Momentum-Based Variance Reduction in Non-Convex SGD", NeurIPS)

.. math::
    d_k = \nabla\ell(p_k; \xi_k) + (1 - \eta_k)\big(d_{k-1} - \nabla\ell(p_{k-1}; \xi_k)\big),\qquad
    \eta_k = \min(1, \eta_0\, s_k^{-2a})

(η_k ∝ α_k² as in STORM), then z, y and x take one step each from the current point along the estimators.
Cost: 6 gradients per outer step (3 at the current point, 3 at the previous one on the same batches).

``state.inner`` is **z**, the tracker of argmin_w L_T(x, w): the lower-level solution a user expects;
``state.penalty_inner`` is y, the tracker of argmin_w L_V + λ L_T.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch

from bilevel import oracles, tree
from bilevel.data import DataStreams
from bilevel.errors import BilevelError
from bilevel.hypergrad import Hypergradient
from bilevel.inner import minimize
from bilevel.optim import sgd
from bilevel.options import Options, PositiveFloat, PositiveInt, UnitInterval, owner_name
from bilevel.problem import Problem, check_finite
from bilevel.registry import register
from bilevel.solvers.common import inner_step, power_schedule
from bilevel.steps import Auto, Curvature, inner_curvature, losses_rose, normalized_outer_lr, outer_curvature
from bilevel.types import Params

ScheduleName = Literal["auto", "deterministic", "upper_noise", "both_noise"]

SCHEDULES: dict[str, tuple[float, float]] = {
    "deterministic": (1 / 3, 0.0),
    "upper_noise": (3 / 5, 2 / 5),
    "both_noise": (5 / 7, 4 / 7),
}
"""(a, c): α_k ∝ (k + k₀)^{−a}, γ_k ∝ (k + k₀)^{−c}, λ_k ∝ (k + k₀)^{a−c} (Kwon et al., 2023)."""


@dataclasses.dataclass(frozen=True)
class F2SAState:
    """State of :class:`F2SA`.

    Attributes:
        outer: x. inner: z, the tracker of the lower-level solution argmin_w L_T(x, w).
        penalty_inner: y, the tracker of argmin_w L_V(x, w) + λ L_T(x, w).
        buffers: module buffers (updated along z, the lower-level training sequence).
        k: outer steps taken.
        prev: (x, y, z) of the previous step (momentum variant only).
        estimators: the STORM estimators by oracle (momentum variant only): ``gz_x``, ``gz_w`` (∇g at z),
            ``gy_x``, ``gy_w`` (∇g at y), ``f_x``, ``f_w`` (∇f at y).
        base: the step sizes and penalty at k = 0 the schedules start from (``"auto"`` ones resolved), or None before
            the first step. curvature / outer_curvature: L̂_g, L̂_f behind the ``"auto"`` settings (or None).
    """

    outer: Params
    inner: Params
    penalty_inner: Params
    buffers: Params
    k: int = 0
    prev: tuple[Params, Params, Params] | None = None
    estimators: dict[str, Params] | None = None
    base: dict[str, float] | None = None
    curvature: Curvature | None = None
    outer_curvature: Curvature | None = None


@register("f2sa")
@dataclasses.dataclass(frozen=True)
class F2SA(Options):
    r"""Fully first-order bilevel method with a growing penalty (Kwon et al., 2023).

    Settings:
        inner_steps: T, steps on z and y per outer step (default 5; must be 1 with ``momentum``, whose default it is).
        inner_lr: γ₀, the step on z (the lower-level learning rate; < 2/L of L_T); ``"auto"``: 1/L̂_g, L̂_g ≈
            λ_max(∇²_ww L_T) (:mod:`bilevel.steps`).
        penalty_inner_lr: α₀, the step on y; ``"auto"``: γ₀L̂_g/(L̂_f + λ₀L̂_g), L̂_f ≈ λ_max(∇²_ww L_V), so y's
            contraction 1 − α₀(L_f + λ₀L_g) matches z's 1 − γ₀L_g and their errors cancel in λ(∇_x g(x, y) − ∇_x g(x,
            z)) (with γ₀ = 1/L̂_g: the inverse smoothness of f + λ₀g); None: γ₀/(1 + λ₀), the same for L_f = L_g.
        outer_lr: ξα₀, the step on x at k = 0; ``"auto"``: moves x by a tenth of max(1, rms(x₀)) along the first
            direction.
        penalty0: λ₀; ``"auto"``: 10·max(1, L̂_f/L̂_g), so the penalty dominates f's curvature whatever the two
            losses' scales. penalty_max: cap on λ_k (``penalty_max=penalty0`` keeps λ fixed).
        The curvature estimates are refreshed every 10 outer steps and after a rise of a full-batch inner loss
        (γ₀, α₀ follow; the outer step and λ₀ stay as first resolved).
        schedule: ``"deterministic"``, ``"upper_noise"``, ``"both_noise"``, or ``"auto"``: chosen from the data
            (full batches at both levels → deterministic; a stream only for ``outer_data`` → upper_noise; else
            both_noise).
        schedule_offset: k₀ of s_k = (k + k₀)/k₀.
        momentum: the STORM variant (see the module docstring); momentum_weight: η₀.
    """

    differentiates: ClassVar[str | None] = "penalty"

    inner_steps: PositiveInt | None = None
    inner_lr: PositiveFloat | Auto = "auto"
    penalty_inner_lr: PositiveFloat | Auto | None = "auto"
    outer_lr: PositiveFloat | Auto = "auto"
    penalty0: PositiveFloat | Auto = "auto"
    penalty_max: PositiveFloat | None = None
    schedule: ScheduleName = "auto"
    schedule_offset: PositiveFloat = 10.0
    momentum: bool = False
    momentum_weight: UnitInterval = 0.5

    def check(self) -> None:
        if self.momentum and self.inner_steps not in (None, 1):
            raise BilevelError(
                f"{owner_name(self)}: the momentum variant takes exactly one inner step per outer step, got "
                f"inner_steps={self.inner_steps}; leave inner_steps unset or pass 1."
            )
        if self.penalty_max is not None and self.penalty0 != "auto" and not self.penalty_max >= self.penalty0:
            raise BilevelError(
                f"{owner_name(self)}: penalty_max ({self.penalty_max}) must be >= penalty0 ({self.penalty0}); "
                "pass penalty_max=penalty0 for a fixed penalty or None for no cap."
            )

    # ----- schedules --------------------------------------------------------------------------------------------
    @property
    def n_inner_steps(self) -> int:
        """T: the configured ``inner_steps``, or its default (5; 1 with momentum)."""
        if self.inner_steps is not None:
            return self.inner_steps
        return 1 if self.momentum else 5

    def exponents(self, data: DataStreams | None = None) -> tuple[float, float]:
        """(a, c) of the configured schedule; ``"auto"`` reads which levels of ``data`` are streams."""
        name = self.schedule
        if name == "auto":
            if data is None or not data.inner_stream.is_full_batch:
                name = "both_noise" if data is not None else "deterministic"
            elif not data.outer_stream.is_full_batch:
                name = "upper_noise"
            else:
                name = "deterministic"
        return SCHEDULES[name]

    def step_sizes(self, k: int, data: DataStreams | None, base: dict[str, float]) -> dict[str, float]:
        """γ_k (``inner_lr``), α_k (``penalty_inner_lr``), ξα_k (``outer_lr``), λ_k (``penalty``), η_k
        (``momentum_weight``) from their values at k = 0 in ``base`` (see :meth:`base_steps`)."""
        a, c = self.exponents(data)
        k0 = self.schedule_offset
        penalty = power_schedule(base["penalty0"], k, a - c, k0)
        if self.penalty_max is not None:
            penalty = min(penalty, max(self.penalty_max, base["penalty0"]))
        # α_k = α₀ (λ₀/λ_k) s_k^{-c} = α₀ s_k^{-a} while λ_k grows freely; λ_k α_k ∝ γ_k also once λ_k is capped.
        ratio = power_schedule(base["penalty0"] / penalty, k, -c, k0)
        return {
            "inner_lr": power_schedule(base["inner_lr"], k, -c, k0),
            "penalty_inner_lr": base["penalty_inner_lr"] * ratio,
            "outer_lr": base.get("outer_lr", 0.0) * ratio,  # 0 until "auto" has a direction to scale by
            "penalty": penalty,
            "momentum_weight": min(1.0, power_schedule(self.momentum_weight, k, -2 * a, k0)),
        }

    @property
    def _needs_curvature(self) -> tuple[bool, bool]:
        """(L̂_g needed, L̂_f needed) by the ``"auto"`` settings."""
        penalty_side = self.penalty_inner_lr == "auto" or self.penalty0 == "auto"
        return self.inner_lr == "auto" or penalty_side, penalty_side

    def base_steps(self, g_curvature: float | None, f_curvature: float | None, outer_lr: float | None) -> dict[str, float]:
        """γ₀, α₀, λ₀ (and ξα₀ when known) with the ``"auto"`` settings resolved from L̂_g and L̂_f."""
        penalty0 = 10.0 * max(1.0, f_curvature / g_curvature) if self.penalty0 == "auto" else float(self.penalty0)
        gamma0 = 1.0 / g_curvature if self.inner_lr == "auto" else float(self.inner_lr)
        if self.penalty_inner_lr == "auto":  # y contracts like z: 1 − α₀(L_f + λ₀L_g) = 1 − γ₀L_g
            alpha0 = gamma0 * g_curvature / (f_curvature + penalty0 * g_curvature)
        else:
            alpha0 = gamma0 / (1.0 + penalty0) if self.penalty_inner_lr is None else float(self.penalty_inner_lr)
        base = {"inner_lr": gamma0, "penalty_inner_lr": alpha0, "penalty0": penalty0}
        if outer_lr is not None:
            base["outer_lr"] = outer_lr
        return base

    def _measure(self, problem: Problem, state: F2SAState, inner_batch: Any, outer_batch: Any) -> F2SAState:
        """The curvature estimates the ``"auto"`` settings need, measured at (x, z) when missing or due."""
        need_g, need_f = self._needs_curvature
        g, f = state.curvature, state.outer_curvature
        if need_g and (g is None or g.due(state.k)):
            g = inner_curvature(problem, state.outer, state.inner, inner_batch, state.buffers, state.k, g)
        if need_f and (f is None or f.due(state.k)):
            f = outer_curvature(problem, state.outer, state.inner, outer_batch, state.buffers, state.k, f)
        outer_lr = None if state.base is None else state.base.get("outer_lr")
        base = self.base_steps(g and g.value, f and f.value, outer_lr)
        if state.base is not None:  # λ₀ is fixed once resolved (the penalty schedule must not jump)
            base["penalty0"] = state.base["penalty0"]
        return dataclasses.replace(state, curvature=g, outer_curvature=f, base=base)

    def hypergradient(
        self, problem: Problem, outer: Params, inner: Params, data: DataStreams, buffers: Params | None = None,
        *, penalty: float | None = None, maxiter: int = 500,
    ) -> Hypergradient:
        r"""F2SA's estimate of dF/dλ at x with ``inner`` = w*(x): ∇_x f(x, y_λ) + λ(∇_x g(x, y_λ) − ∇_x g(x, w*)),
        y_λ = argmin_y f(x, y) + λ g(x, y) solved to tolerance (L-BFGS + Newton–CG, full batch). It is the gradient
        of the penalty function L*_λ, O(1/λ) from dF/dλ (Kwon et al., 2023, Lemma 3.1); λ = ``penalty`` or
        ``penalty_max`` or ``penalty0``."""
        inner_batch, outer_batch = data.inner(), data.outer()
        if penalty is None and self.penalty_max is None and self.penalty0 == "auto":
            g = inner_curvature(problem, outer, inner, inner_batch, buffers, 0)
            f = outer_curvature(problem, outer, inner, outer_batch, buffers, 0)
            penalty = self.base_steps(g.value, f.value, None)["penalty0"]
        lam = penalty if penalty is not None else (self.penalty_max or self.penalty0)
        y = minimize(lambda x, w: problem.outer_objective(x, w, outer_batch, buffers)
                     + lam * problem.inner_objective(x, w, inner_batch, buffers), outer, inner, maxiter=maxiter,
                     what="f2sa.hypergradient (y_λ)")
        with torch.no_grad():
            outer_loss = problem.outer_objective(outer, inner, outer_batch, buffers)  # F at w*, what is reported
        _, f_x, _ = oracles.grad_outer(problem, outer, y, outer_batch, buffers)
        gy_x = oracles.grad_inner_wrt_outer(problem, outer, y, inner_batch, buffers)
        gz_x = oracles.grad_inner_wrt_outer(problem, outer, inner, inner_batch, buffers)
        return Hypergradient(hypergrad=_outer_direction(f_x, gy_x, gz_x, lam), outer_loss=outer_loss, inner=inner,
                             buffers=buffers, details={"penalty": float(lam)})

    # ----- protocol -----------------------------------------------------------------------------------------
    def init(self, problem: Problem) -> F2SAState:
        outer = problem.project_outer(tree.clone(problem.outer_init))
        inner = problem.project_inner(tree.clone(problem.inner_init))
        return F2SAState(outer, inner, tree.clone(inner), tree.clone(problem.buffers_init))

    def step(self, problem: Problem, state: F2SAState, data: DataStreams) -> tuple[F2SAState, dict[str, Any]]:
        if any(self._needs_curvature) or state.base is None:
            state = self._measure(problem, state, data.inner(), data.outer())
        lr = self.step_sizes(state.k, data, state.base)
        if self.momentum:
            state, direction, metrics = self._momentum_step(problem, state, data, lr)
        else:
            state, direction, metrics = self._plain_step(problem, state, data, lr)
        check_finite("outer_loss", metrics["penalty_outer_loss"])  # before it would poison the first "auto" step
        if "outer_lr" not in state.base:  # outer_lr="auto": normalised by the first non-zero direction
            first = normalized_outer_lr(self.outer_lr, state.outer, direction)
            if first is not None:
                state = dataclasses.replace(state, base={**state.base, "outer_lr": first})
            lr = self.step_sizes(state.k, data, state.base)
        x = problem.project_outer(tree.detach(tree.axpy(-lr["outer_lr"], direction, state.outer)))
        with torch.no_grad():  # L_V at the returned inner variables z (what every method reports as outer_loss)
            metrics["outer_loss"] = problem.outer_objective(x, state.inner, metrics.pop("outer_batch"), state.buffers)
        metrics.update({"hypergrad_norm": tree.norm(direction), "penalty": lr["penalty"], "inner_lr": lr["inner_lr"],
                        "penalty_inner_lr": lr["penalty_inner_lr"], "outer_lr": lr["outer_lr"]})
        if state.curvature is not None:
            metrics["curvature"] = state.curvature.value
        if state.outer_curvature is not None:
            metrics["outer_curvature"] = state.outer_curvature.value
        return dataclasses.replace(state, outer=x, k=state.k + 1), metrics

    def _plain_step(
        self, problem: Problem, state: F2SAState, data: DataStreams, lr: dict[str, float]
    ) -> tuple[F2SAState, Params, dict[str, Any]]:
        """T steps on z and y, then the outer direction (x itself moves in :meth:`step`)."""
        x, y, z, buffers = state.outer, state.penalty_inner, state.inner, state.buffers
        z_opt = sgd(lr["inner_lr"])
        losses = []
        for _ in range(self.n_inner_steps):
            batch = data.inner()  # one sample for z and y: their noise then cancels in λ(∇_x g(x, y) − ∇_x g(x, z))
            z, buffers, _, loss = inner_step(problem, x, z, buffers, z_opt, None, batch)
            losses.append(loss)
            y = _penalty_step(problem, x, y, buffers, batch, data.outer(), lr)
        outer_batch = data.outer()
        penalty_outer_loss, f_x, _ = oracles.grad_outer(problem, x, y, outer_batch, buffers)
        inner_batch = data.inner()  # one sample for both ∇_x g terms, as in the paper
        gy_x = oracles.grad_inner_wrt_outer(problem, x, y, inner_batch, buffers)
        gz_x = oracles.grad_inner_wrt_outer(problem, x, z, inner_batch, buffers)
        direction = _outer_direction(f_x, gy_x, gz_x, lr["penalty"])
        curvature = state.curvature
        if curvature is not None and data.inner_stream.is_full_batch and losses_rose(losses):
            curvature = curvature.flag()
        metrics = {"penalty_outer_loss": penalty_outer_loss, "inner_loss": losses[-1], "outer_batch": outer_batch}
        return dataclasses.replace(state, inner=z, penalty_inner=y, buffers=buffers, curvature=curvature), direction, \
            metrics

    def _momentum_step(
        self, problem: Problem, state: F2SAState, data: DataStreams, lr: dict[str, float]
    ) -> tuple[F2SAState, Params, dict[str, Any]]:
        x, y, z, buffers = state.outer, state.penalty_inner, state.inner, state.buffers
        inner_batch, outer_batch = data.inner(), data.outer()
        inner_loss, raw = _all_oracles(problem, x, y, z, buffers, inner_batch, outer_batch)
        penalty_outer_loss = raw.pop("f_value")
        if state.prev is None or state.estimators is None:
            est = raw
        else:
            _, old = _all_oracles(problem, *state.prev, buffers, inner_batch, outer_batch)
            old.pop("f_value")
            keep = 1.0 - lr["momentum_weight"]
            est = {key: tree.add(raw[key], tree.scale(tree.sub(state.estimators[key], old[key]), keep)) for key in raw}
        new_z = problem.project_inner(tree.detach(tree.axpy(-lr["inner_lr"], est["gz_w"], z)))
        y_direction = tree.axpy(lr["penalty"], est["gy_w"], est["f_w"])
        new_y = problem.project_inner(tree.detach(tree.axpy(-lr["penalty_inner_lr"], y_direction, y)))
        direction = _outer_direction(est["f_x"], est["gy_x"], est["gz_x"], lr["penalty"])
        metrics = {"penalty_outer_loss": penalty_outer_loss, "inner_loss": inner_loss, "outer_batch": outer_batch}
        new_state = dataclasses.replace(state, inner=new_z, penalty_inner=new_y, prev=(x, y, z), estimators=est)
        return new_state, direction, metrics


def _penalty_step(
    problem: Problem, x: Params, y: Params, buffers: Params, inner_batch: Any, outer_batch: Any, lr: dict[str, float]
) -> Params:
    r"""y ← Proj_W(y − α_k[∇_y f(x, y) + λ_k ∇_y g(x, y)])."""
    _, _, f_w = oracles.grad_outer(problem, x, y, outer_batch, buffers)
    g_w = oracles.grad_inner(problem, x, y, inner_batch, buffers)
    direction = tree.axpy(lr["penalty"], g_w, f_w)
    return problem.project_inner(tree.detach(tree.axpy(-lr["penalty_inner_lr"], direction, y)))


def _outer_direction(f_x: Params, gy_x: Params, gz_x: Params, penalty: float) -> Params:
    r"""∇_x f(x, y) + λ(∇_x g(x, y) − ∇_x g(x, z)): the gradient of the penalty function in x."""
    return tree.axpy(penalty, tree.sub(gy_x, gz_x), f_x)


def _all_oracles(
    problem: Problem, x: Params, y: Params, z: Params, buffers: Params, inner_batch: Any, outer_batch: Any
) -> tuple[Any, dict[str, Any]]:
    """g(x, z) and the six gradient blocks the momentum variant tracks (3 oracle calls)."""
    g_value, gz_x, gz_w = oracles.grad_inner_both(problem, x, z, inner_batch, buffers)
    _, gy_x, gy_w = oracles.grad_inner_both(problem, x, y, inner_batch, buffers)
    f_value, f_x, f_w = oracles.grad_outer(problem, x, y, outer_batch, buffers)
    return g_value, {"gz_x": gz_x, "gz_w": gz_w, "gy_x": gy_x, "gy_w": gy_w, "f_x": f_x, "f_w": f_w,
                     "f_value": f_value}
