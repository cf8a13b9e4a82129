r"""Implicit differentiation solvers: ``ift`` (Neumann), ``cg``, ``minres`` and ``exact`` inverse-HVP.

Lorraine, Vicol & Duvenaud, 2020, "Optimizing Millions of Hyperparameters by Implicit Differentiation", AISTATS:
per outer step, ``inner_steps`` optimizer steps on w, then one hyperstep

.. math::
    \lambda \leftarrow \mathrm{Proj}\big(\lambda - \eta\,[\partial_\lambda L_V - (\partial^2_{w\lambda}L_T)^\top
    H^{-1}\partial_w L_V]\big),

with H⁻¹ by a truncated Neumann series (``ift``), conjugate gradient (``cg``), MINRES (``minres``, for indefinite H)
or a dense solve (``exact``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Literal

import torch

from bilevel import tree
from bilevel.data import DataStreams
from bilevel.errors import BilevelError
from bilevel.hypergrad import Hypergradient, implicit_hypergrad
from bilevel.linsolve import NeumannDivergenceError, cg, exact, minres, neumann, step_advice
from bilevel.optim import Optimizer, make_optimizer
from bilevel.options import (
    Momentum,
    NonNegativeFloat,
    NonNegativeInt,
    OptimizerName,
    Options,
    PositiveFloat,
    PositiveInt,
    owner_name,
)
from bilevel.precondition import CurvaturePairs, lbfgs_preconditioner, recycle_pairs
from bilevel.problem import Problem
from bilevel.registry import register
from bilevel.solvers.common import check_momentum_applies, make_inner_optimizer, outer_step, train_inner
from bilevel.steps import Auto, Curvature, inner_curvature, losses_rose, outer_lr_for
from bilevel.steps import inner_momentum as steps_inner_momentum
from bilevel.types import Params

LinSolveName = Literal["neumann", "cg", "minres", "exact"]
HvpDtype = Literal["bfloat16", "float16", "float32"]
PreconditionerName = Literal["lbfgs"]


@dataclasses.dataclass(frozen=True)
class ImplicitState:
    """State of the implicit solvers.

    Attributes:
        outer, inner, buffers: current λ, w and module buffers.
        inner_opt, outer_opt: optimizer states.
        v: last inverse-HVP solution H⁻¹∂_w L_V (warm start for CG), or None.
        pairs: the latest curvature pairs (p, Hp) of the CG solves (recycled into the preconditioner; one (2m, P)
            matrix, see :class:`~bilevel.precondition.CurvaturePairs`), or ().
        curvature: L̂ ≈ λ_max(∇²_ww L_T) by power iteration (see :mod:`bilevel.steps`), or None when no step size
            needs it. outer_lr: the outer step in use. k: outer steps taken.
    """

    outer: Params
    inner: Params
    buffers: Params
    inner_opt: Any
    outer_opt: Any
    v: Params | None = None
    pairs: CurvaturePairs | tuple[()] = ()
    curvature: Curvature | None = None
    outer_lr: float | None = None
    k: int = 0


@register("ift")
@dataclasses.dataclass(frozen=True)
class IFT(Options):
    r"""Implicit-function-theorem hypergradients with a truncated Neumann series for H⁻¹ (Lorraine et al., 2020).

    Cost per outer step: ``inner_steps`` gradients + about ``2 + k`` gradient-equivalents for the hypergradient
    (k = ``neumann_terms``, or the CG / MINRES iterations bounded by ``cg_maxiter`` and ``cg_rtol``).
    Step sizes default to ``"auto"`` (:mod:`bilevel.steps`): ``inner_lr`` = ``neumann_alpha`` = 1/L̂ with L̂ ≈
    λ_max(∇²_ww L_T) by power iteration (20 HVPs once, 5 every 10 outer steps or after a rise of the full-batch inner
    loss), ``outer_lr`` a tenth of the scale of λ for Adam; a number is used as given. ``neumann_alpha=None`` makes
    α = ``inner_lr`` (the series then equals unrolling k SGD steps from the optimum); α must be below 2/λ_max(H),
    which the first estimate checks. ``hvp_dtype`` (CG only, e.g. "bfloat16" for a float32 problem) runs CG's
    Hessian-vector products in a lower precision with reliable residual updates in the working one (see
    :func:`bilevel.hypergrad.implicit_hypergrad`). ``cg_preconditioner="lbfgs"`` preconditions each CG solve with the L-BFGS
    matrix of the latest ``cg_preconditioner_memory`` curvature pairs the previous solves met (Morales & Nocedal,
    2000; :mod:`bilevel.precondition`): no extra Hessian-vector products; with m = ``cg_preconditioner_memory`` it
    holds 2m vectors of the inner size between outer steps and, at the peak of a step, 4m + 1 more than plain CG
    (``benchmarks/preconditioner_memory.py``); with the warm start it takes most of the work off the solve when the
    Hessian moves slowly between outer steps.
    """

    differentiates: ClassVar[str | None] = "solution"
    problem_inputs: ClassVar[frozenset[str]] = frozenset({"inner_projection", "inner_solver"})

    inner_steps: NonNegativeInt = 10
    inner_lr: PositiveFloat | Auto = "auto"
    inner_optimizer: OptimizerName = "sgd"
    inner_momentum: Momentum | Auto = "auto"
    outer_lr: PositiveFloat | Auto = "auto"
    outer_optimizer: OptimizerName = "adam"
    linsolve: LinSolveName = "neumann"
    neumann_terms: NonNegativeInt = 5
    neumann_alpha: PositiveFloat | Auto | None = "auto"
    cg_maxiter: NonNegativeInt = 20
    cg_rtol: NonNegativeFloat = 1e-6
    warm_start: bool = True
    hvp_dtype: HvpDtype | None = None
    cg_preconditioner: PreconditionerName | None = None
    cg_preconditioner_memory: PositiveInt = 10

    def check(self) -> None:
        owner = owner_name(self)
        if self.hvp_dtype is not None and self.linsolve != "cg":
            raise BilevelError(f"{owner}: hvp_dtype (mixed-precision Hessian-vector products) needs linsolve='cg' "
                               f"(its reliable updates keep the accuracy); got linsolve={self.linsolve!r}.")
        if self.cg_preconditioner is not None and self.linsolve != "cg":
            raise BilevelError(f"{owner}: cg_preconditioner needs linsolve='cg', got linsolve={self.linsolve!r}.")
        if self.inner_momentum != "auto":
            check_momentum_applies(owner, self.inner_optimizer, self.inner_momentum)

    # ----- pieces -------------------------------------------------------------------------------------------
    def _inner_optimizer(self, inner_lr: float) -> Optimizer:
        momentum = steps_inner_momentum(self.inner_momentum, self.inner_lr, self.inner_optimizer)
        return make_inner_optimizer(self.inner_optimizer, inner_lr, momentum)


    def _needs_curvature(self, problem: Problem) -> bool:
        """Whether a step size comes from the curvature estimate (or Neumann's α is checked against it)."""
        return (self.inner_lr == "auto" and problem.inner_solver is None) or self.linsolve == "neumann"

    def step_sizes(self, curvature: float | None) -> dict[str, float]:
        """``inner_lr`` and Neumann's ``alpha``: 1/L̂ for ``"auto"`` (:mod:`bilevel.steps`); ``alpha`` = inner_lr when
        None (the series then equals unrolling the inner steps from the optimum)."""
        auto = 1.0 / curvature if curvature else math.nan
        inner_lr = auto if self.inner_lr == "auto" else float(self.inner_lr)
        alpha = inner_lr if self.neumann_alpha is None else auto if self.neumann_alpha == "auto" else self.neumann_alpha
        return {"inner_lr": inner_lr, "neumann_alpha": float(alpha)}

    def linear_solver(self, pairs: CurvaturePairs | tuple[()] = (), alpha: float | None = None,
                      curvature: float | None = None) -> Any:
        """The configured ``solve(matvec, b, [x0]) -> LinSolveResult``; ``pairs``: the previous CG solve's
        curvature pairs, for the recycled preconditioner; ``alpha``: Neumann's step, checked against ``curvature``."""
        if self.linsolve == "neumann":
            return functools.partial(neumann, alpha=alpha, maxiter=self.neumann_terms, lipschitz=curvature)
        if self.linsolve == "cg":
            if self.cg_preconditioner is None:
                return functools.partial(cg, maxiter=self.cg_maxiter, rtol=self.cg_rtol)
            memory = self.cg_preconditioner_memory
            return functools.partial(cg, maxiter=self.cg_maxiter, rtol=self.cg_rtol, record_pairs=memory,
                                     preconditioner=lbfgs_preconditioner(pairs, memory=memory))
        if self.linsolve == "minres":
            return functools.partial(minres, maxiter=self.cg_maxiter, rtol=self.cg_rtol)
        return exact

    def hypergradient(
        self, problem: Problem, outer: Params, inner: Params, data: DataStreams,
        buffers: Params | None = None, x0: Params | None = None, pairs: CurvaturePairs | tuple[()] = (),
        alpha: float | None = None, curvature: float | None = None,
    ) -> Hypergradient:
        """dF/dλ at (λ, w) by the implicit rule with this solver's linear solver (``x0``, ``pairs``: the previous
        solve's solution and curvature pairs, used when warm starts / the preconditioner are on; ``alpha``: Neumann's
        step, measured at (λ, w) when not given and not set)."""
        use_x0 = x0 if (self.linsolve in ("cg", "minres") and self.warm_start) else None
        inner_batch = data.inner()
        if self.linsolve == "neumann" and alpha is None:  # a call outside solve(): measure here (neumann checks α)
            curvature = inner_curvature(problem, outer, inner, inner_batch, buffers, 0).value
            alpha = self.step_sizes(curvature)["neumann_alpha"]
        return implicit_hypergrad(
            problem, outer, inner, inner_batch=inner_batch, outer_batch=data.outer(),
            buffers=buffers, solve=self.linear_solver(pairs, alpha, curvature), x0=use_x0,
            hvp_dtype=None if self.hvp_dtype is None else getattr(torch, self.hvp_dtype),
        )

    # ----- protocol -----------------------------------------------------------------------------------------
    def init(self, problem: Problem) -> ImplicitState:
        outer = problem.project_outer(tree.clone(problem.outer_init))
        inner = tree.clone(problem.inner_init)
        outer_lr = outer_lr_for(self.outer_optimizer, self.outer_lr, outer, None)
        inner_state = self._inner_optimizer(1.0).init(inner)  # optimizer states do not depend on the step size
        outer_state = make_optimizer(self.outer_optimizer, 1.0).init(outer)
        return ImplicitState(outer, inner, tree.clone(problem.buffers_init), inner_state, outer_state, outer_lr=outer_lr)

    def step(self, problem: Problem, state: ImplicitState, data: DataStreams) -> tuple[ImplicitState, dict[str, Any]]:
        curvature = state.curvature
        if self._needs_curvature(problem) and (curvature is None or curvature.due(state.k)):
            curvature = inner_curvature(problem, state.outer, state.inner, data.inner(), state.buffers, state.k,
                                        curvature)
        steps = self.step_sizes(curvature.value if curvature else None)
        if self.linsolve == "neumann" and steps["neumann_alpha"] * curvature.value >= 2.0:
            # A series that diverges along a direction b barely touches can stay small over a few terms (and
            # return a wrong answer): an α the curvature estimate says diverges is refused outright.
            raise NeumannDivergenceError(f"{owner_name(self)}: the Neumann series would diverge: "
                                         f"{step_advice(steps['neumann_alpha'], curvature.value)}")
        if problem.inner_solver is not None:  # the user's solver replaces the inner steps
            inner, buffers, inner_state, losses = (problem.run_inner_solver(state.outer, state.inner, data.inner()),
                                                   state.buffers, state.inner_opt, [])
        else:
            inner, buffers, inner_state, losses = train_inner(problem, state.outer, state.inner, state.buffers,
                                                              self._inner_optimizer(steps["inner_lr"]),
                                                              state.inner_opt, data, self.inner_steps)
        if curvature is not None and self.inner_lr == "auto" and data.inner_stream.is_full_batch and losses_rose(losses):
            curvature = curvature.flag()  # the step was too long for the curvature now: measure again next step
        try:
            hg = self.hypergradient(problem, state.outer, inner, data, buffers, x0=state.v, pairs=state.pairs,
                                    alpha=steps["neumann_alpha"], curvature=curvature and curvature.value)
        except NeumannDivergenceError:
            if self.neumann_alpha != "auto":
                raise
            # the curvature grew past the estimate since it was measured: measure again (at least doubled), retry once
            curvature = inner_curvature(problem, state.outer, inner, data.inner(), buffers, state.k, curvature.flag())
            steps = self.step_sizes(curvature.value)
            hg = self.hypergradient(problem, state.outer, inner, data, buffers, x0=state.v, pairs=state.pairs,
                                    alpha=steps["neumann_alpha"], curvature=curvature and curvature.value)
        outer_lr = state.outer_lr or outer_lr_for(self.outer_optimizer, self.outer_lr, state.outer, hg.hypergrad)
        outer, outer_state = outer_step(problem, state.outer, hg.hypergrad, self.outer_optimizer, outer_lr,
                                        state.outer_opt)
        metrics = {
            "outer_loss": hg.outer_loss,
            "hypergrad_norm": tree.norm(hg.hypergrad),
            "linsolve_residual": hg.linsolve.residual,
            "linsolve_iterations": hg.linsolve.iterations,
            "inner_lr": None if problem.inner_solver is not None else steps["inner_lr"],
            "outer_lr": outer_lr,
        }
        if losses:
            metrics["inner_loss"] = losses[-1]
        if curvature is not None:
            metrics["curvature"] = curvature.value
        if self.linsolve == "neumann":
            metrics["neumann_alpha"] = steps["neumann_alpha"]
        pairs = recycle_pairs(state.pairs, hg.linsolve.pairs, memory=self.cg_preconditioner_memory)
        new_state = dataclasses.replace(state, outer=outer, inner=inner, buffers=buffers, inner_opt=inner_state,
                                        outer_opt=outer_state, v=hg.linsolve.x, pairs=pairs, curvature=curvature,
                                        outer_lr=outer_lr, k=state.k + 1)
        return new_state, metrics


@register("cg")
@dataclasses.dataclass(frozen=True)
class CG(IFT):
    """:class:`IFT` with conjugate gradient for H⁻¹ (wants a positive-definite inner Hessian; ~√κ·log(1/ε) HVPs),
    warm-started from the previous outer step's solution and preconditioned by the curvature its solves met
    (``cg_preconditioner="lbfgs"``; ``None`` turns it off and saves its memory: 2m vectors of the inner size between
    outer steps and 4m + 1 at the peak of a step, m = ``cg_preconditioner_memory``;
    ``benchmarks/preconditioner_memory.py``)."""

    linsolve: LinSolveName = dataclasses.field(default="cg", init=False)  # the method itself: not an option
    cg_preconditioner: PreconditionerName | None = "lbfgs"


@register("minres")
@dataclasses.dataclass(frozen=True)
class Minres(IFT):
    """:class:`IFT` with MINRES for H⁻¹ (Paige & Saunders, 1975): for symmetric indefinite inner Hessians (trained
    networks), where CG has no guarantee; warm-started across steps; ``cg_maxiter`` and ``cg_rtol`` bound it."""

    linsolve: LinSolveName = dataclasses.field(default="minres", init=False)  # the method itself: not an option


@register("exact")
@dataclasses.dataclass(frozen=True)
class Exact(IFT):
    """:class:`IFT` with a dense solve of H (small problems; the reference the others are checked against)."""

    linsolve: LinSolveName = dataclasses.field(default="exact", init=False)  # the method itself: not an option
