r"""Unrolled reverse-mode hypergradients (Franceschi, Donini, Frasconi & Pontil, 2017, "Forward and Reverse
Gradient-Based Hyperparameter Optimization", ICML).

Per outer step: T differentiable optimizer steps from the current w, then

.. math:: \lambda \leftarrow \mathrm{Proj}(\lambda - \eta\, \tfrac{d}{d\lambda} L_V(\lambda, w_T(\lambda))),

and w continues from w_T (truncated back-propagation across outer steps), or restarts from the initial w when
``reset_inner`` is set. Time O(T), memory O(T·P).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from bilevel import tree
from bilevel.data import DataStreams
from bilevel.hypergrad import Hypergradient, unrolled_hypergrad
from bilevel.optim import Optimizer, make_optimizer
from bilevel.options import Momentum, NonNegativeInt, OptimizerName, Options, PositiveFloat
from bilevel.problem import Problem
from bilevel.registry import register
from bilevel.solvers.common import outer_step
from bilevel.steps import Auto, Curvature, inner_curvature, outer_lr_for
from bilevel.steps import inner_momentum as steps_inner_momentum
from bilevel.types import Params


@dataclasses.dataclass(frozen=True)
class UnrolledState:
    """λ, w (start of the next unroll), buffers, the outer optimizer's state, the curvature estimate behind
    ``inner_lr="auto"`` (or None), the outer step in use and the outer steps taken ``k``."""

    outer: Params
    inner: Params
    buffers: Params
    outer_opt: Any
    curvature: Curvature | None = None
    outer_lr: float | None = None
    k: int = 0


@register("unrolled")
@dataclasses.dataclass(frozen=True)
class Unrolled(Options):
    """Reverse-mode through ``inner_steps`` steps of SGD (with optional momentum) on the inner loss.

    Step sizes default to ``"auto"`` (:mod:`bilevel.steps`): ``inner_lr`` = 1/L̂ with L̂ ≈ λ_max(∇²_ww L_T) by power
    iteration (refreshed every 10 outer steps), ``outer_lr`` a tenth of the scale of λ for Adam. The inner step is a
    constant of the unrolled map (not differentiated)."""

    differentiates: ClassVar[str | None] = "unrolled"

    inner_steps: NonNegativeInt = 10
    inner_lr: PositiveFloat | Auto = "auto"
    inner_momentum: Momentum | Auto = "auto"
    outer_lr: PositiveFloat | Auto = "auto"
    outer_optimizer: OptimizerName = "adam"
    reset_inner: bool = False
    first_order: bool = False

    def inner_optimizer(self, inner_lr: float) -> Optimizer:
        return make_optimizer("sgd", inner_lr, momentum=steps_inner_momentum(self.inner_momentum, self.inner_lr, "sgd"))

    def hypergradient(
        self, problem: Problem, outer: Params, inner: Params, data: DataStreams, buffers: Params | None = None,
        inner_lr: float | None = None,
    ) -> Hypergradient:
        """d/dλ L_V(λ, w_T(λ)) through ``inner_steps`` steps started at ``inner`` (``inner_lr``: the step in use;
        when None, the setting, or 1/L̂ measured at the start point)."""
        batches = [data.inner() for _ in range(self.inner_steps)]
        if inner_lr is None:
            inner_lr = float(self.inner_lr) if self.inner_lr != "auto" else \
                1.0 / inner_curvature(problem, outer, inner, batches[0] if batches else data.inner(), buffers, 0).value
        return unrolled_hypergrad(
            problem, outer, inner, inner_batches=batches, outer_batch=data.outer(),
            optimizer=self.inner_optimizer(inner_lr), buffers=buffers, first_order=self.first_order,
        )

    def init(self, problem: Problem) -> UnrolledState:
        outer = problem.project_outer(tree.clone(problem.outer_init))
        opt = make_optimizer(self.outer_optimizer, 1.0)  # its state does not depend on the step size
        return UnrolledState(outer, tree.clone(problem.inner_init), tree.clone(problem.buffers_init), opt.init(outer),
                             outer_lr=outer_lr_for(self.outer_optimizer, self.outer_lr, outer, None))

    def step(self, problem: Problem, state: UnrolledState, data: DataStreams) -> tuple[UnrolledState, dict[str, Any]]:
        start = problem.inner_init if self.reset_inner else state.inner
        buffers = problem.buffers_init if self.reset_inner else state.buffers
        curvature = state.curvature
        if self.inner_lr == "auto" and (curvature is None or curvature.due(state.k)):
            curvature = inner_curvature(problem, state.outer, start, data.inner(), buffers, state.k, curvature)
        inner_lr = 1.0 / curvature.value if curvature is not None else float(self.inner_lr)
        hg = self.hypergradient(problem, state.outer, start, data, buffers, inner_lr=inner_lr)
        outer_lr = state.outer_lr or outer_lr_for(self.outer_optimizer, self.outer_lr, state.outer, hg.hypergrad)
        outer, outer_state = outer_step(problem, state.outer, hg.hypergrad, self.outer_optimizer, outer_lr,
                                        state.outer_opt)
        metrics = {"outer_loss": hg.outer_loss, "hypergrad_norm": tree.norm(hg.hypergrad), "inner_lr": inner_lr,
                   "outer_lr": outer_lr}
        if curvature is not None:
            metrics["curvature"] = curvature.value
        new_state = dataclasses.replace(state, outer=outer, inner=problem.project_inner(hg.inner), buffers=hg.buffers or {},
                                        outer_opt=outer_state, curvature=curvature, outer_lr=outer_lr, k=state.k + 1)
        return new_state, metrics
