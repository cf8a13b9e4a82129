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
from bilevel.solvers.common import outer_update
from bilevel.types import Params


@dataclasses.dataclass(frozen=True)
class UnrolledState:
    """λ, w (start of the next unroll), buffers and the outer optimizer's state."""

    outer: Params
    inner: Params
    buffers: Params
    outer_opt: Any


@register("unrolled")
@dataclasses.dataclass(frozen=True)
class Unrolled(Options):
    """Reverse-mode through ``inner_steps`` steps of SGD (with optional momentum) on the inner loss."""

    differentiates: ClassVar[str | None] = "unrolled"

    inner_steps: NonNegativeInt = 10
    inner_lr: PositiveFloat = 0.1
    inner_momentum: Momentum = 0.0
    outer_lr: PositiveFloat = 1e-2
    outer_optimizer: OptimizerName = "adam"
    reset_inner: bool = False
    first_order: bool = False

    def inner_optimizer(self) -> Optimizer:
        return make_optimizer("sgd", self.inner_lr, momentum=self.inner_momentum)

    def make_outer_optimizer(self) -> Optimizer:
        return make_optimizer(self.outer_optimizer, self.outer_lr)

    def hypergradient(
        self, problem: Problem, outer: Params, inner: Params, data: DataStreams, buffers: Params | None = None
    ) -> Hypergradient:
        """d/dλ L_V(λ, w_T(λ)) through ``inner_steps`` steps started at ``inner``."""
        return unrolled_hypergrad(
            problem, outer, inner,
            inner_batches=[data.inner() for _ in range(self.inner_steps)], outer_batch=data.outer(),
            optimizer=self.inner_optimizer(), buffers=buffers, first_order=self.first_order,
        )

    def init(self, problem: Problem) -> UnrolledState:
        outer = problem.project_outer(tree.clone(problem.outer_init))
        opt = self.make_outer_optimizer()
        return UnrolledState(outer, tree.clone(problem.inner_init), tree.clone(problem.buffers_init), opt.init(outer))

    def step(self, problem: Problem, state: UnrolledState, data: DataStreams) -> tuple[UnrolledState, dict[str, Any]]:
        start = problem.inner_init if self.reset_inner else state.inner
        buffers = problem.buffers_init if self.reset_inner else state.buffers
        hg = self.hypergradient(problem, state.outer, start, data, buffers)
        outer, outer_state = outer_update(problem, state.outer, hg.hypergrad, self.make_outer_optimizer(), state.outer_opt)
        metrics = {"outer_loss": hg.outer_loss, "hypergrad_norm": tree.norm(hg.hypergrad)}
        inner = problem.project_inner(hg.inner)
        return UnrolledState(outer, inner, hg.buffers or {}, outer_state), metrics
