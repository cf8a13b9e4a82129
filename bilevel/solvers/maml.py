r"""Meta-learning solvers over a batch of tasks: ``maml`` (unrolled, first or second order) and ``imaml`` (implicit).

Both minimise the meta-objective (see :mod:`bilevel.meta`)

.. math:: \Phi(\theta) = \frac1M \sum_{i=1}^M L^{q}_i(\theta, \phi_i(\theta))

with Adam (by default) on the mean of the per-task hypergradients. The per-task inner solves and hypergradients
are one ``torch.func.vmap`` over the task dimension of the support and query batches (``vectorize=False`` loops
over the tasks instead, as a reference). The inner loops and linear solves run a fixed number of iterations with
no host synchronisation, which is what ``vmap`` needs.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

from bilevel import oracles, tree
from bilevel.data import DataStreams
from bilevel.errors import BilevelError, BilevelWarning
from bilevel.hypergrad import Hypergradient
from bilevel.linsolve import cg
from bilevel.meta import as_task_data, check_no_running_stats, map_tasks, n_tasks, task_slice
from bilevel.optim import make_optimizer
from bilevel.options import NonNegativeInt, OptimizerName, Options, PositiveFloat, PositiveInt, check_value, owner_name
from bilevel.problem import Problem
from bilevel.registry import register
from bilevel.solvers.common import outer_update
from bilevel.types import Batch, Params

FALLBACK_RESIDUAL = 1.0
"""iMAML's CG counts as failed for a task when ‖b − Ax‖/‖b‖ exceeds this (x = 0 would do better)."""

TaskResult = tuple[Tensor, Tensor, Params, Tensor]
"""(query loss L^q_i, support loss after adaptation, hypergradient dL^q_i/dθ, linear-solve residual) of one task."""


@dataclasses.dataclass(frozen=True)
class MetaState:
    """State of the meta-learning solvers.

    Attributes:
        outer: the meta-parameters θ.
        inner: θ as well: every task's adaptation starts there (the adapted φ_i are per batch and not kept).
        buffers: module buffers (passed to every task unchanged).
        outer_opt: the outer optimizer's state.
        inner_uses_outer: whether the task loss L_T depends on θ directly (decided on the first step; iMAML then
            adds the mixed term −(∂²_{φθ}L_T)ᵀx/λ).
    """

    outer: Params
    inner: Params
    buffers: Params
    outer_opt: Any
    inner_uses_outer: bool | None = None


@dataclasses.dataclass(frozen=True)
class MetaLearner(Options):
    """Settings and machinery shared by :class:`MAML` and :class:`IMAML` (not registered itself).

    Attributes:
        inner_steps: adaptation steps T per task (gradient descent with ``inner_lr``).
        inner_lr: adaptation step size α (iMAML: None, its default, picks a step from the curvature per task).
        outer_lr / outer_optimizer: the meta-update of θ with the mean hypergradient over the meta-batch.
        vectorize: ``vmap`` over tasks (True) or a Python loop over tasks (False; same numbers, slower).
        task_chunk_size: with ``vectorize``, process this many tasks per batched call (bounds memory); None: all.
    """

    inner_steps: NonNegativeInt = 5
    inner_lr: PositiveFloat | None = 0.01
    outer_lr: PositiveFloat = 1e-3
    outer_optimizer: OptimizerName = "adam"
    vectorize: bool = True
    task_chunk_size: PositiveInt | None = None

    def check(self) -> None:
        if self.inner_lr is None and not self._auto_inner_lr:
            raise BilevelError(f"{owner_name(self)}: inner_lr=None is not valid; expected a float > 0. "
                               "For example inner_lr=0.01.")

    # ----- per task (pure; vmapped over tasks) ----------------------------------------------------------------
    def adaptation_grad(self, problem: Problem, outer: Params, inner: Params, support: Batch, buffers: Params) -> Params:
        r"""Gradient of the adaptation objective of one task at φ (MAML: ∇_φ L_T(θ, φ))."""
        return oracles.grad_inner(problem, outer, inner, support, buffers)

    def adapt_task(self, problem: Problem, outer: Params, support: Batch, buffers: Params, n_steps: int) -> Params:
        r"""φ_0 = θ, φ_{t+1} = Proj(φ_t − α ∇(adaptation objective)(φ_t)): ``n_steps`` steps on one task (Proj the
        problem's ``inner_projection``, the identity without one)."""
        inner = dict(outer)
        for _ in range(n_steps):
            step = tree.axpy(-self.inner_lr, self.adaptation_grad(problem, outer, inner, support, buffers), inner)
            inner = problem.project_inner(step)
        return inner

    def task_hypergradient(
        self, problem: Problem, outer: Params, support: Batch, query: Batch, buffers: Params, uses_outer: bool
    ) -> TaskResult:
        raise NotImplementedError

    # ----- over a batch of tasks ------------------------------------------------------------------------------
    def task_hypergradients(
        self, problem: Problem, outer: Params, support: Any, query: Any, buffers: Params | None = None,
        *, uses_outer: bool | None = None,
    ) -> TaskResult:
        """Per-task (query loss, support loss, hypergradient dL^q_i/dθ, residual), stacked along dimension 0.

        ``support`` / ``query`` are :class:`bilevel.meta.TaskBatch` es (or raw task-batched data) of the same tasks.
        ``uses_outer`` (whether L_T depends on θ directly) is detected when not given.
        """
        owner = type(self).__name__.lower()
        support = as_task_data(support, owner, "the support batch (inner_data)")
        query = as_task_data(query, owner, "the query batch (outer_data)")
        n_support, n_query = n_tasks(support), n_tasks(query)
        if n_support != n_query:
            raise BilevelError(
                f"{owner}: the support batch has {n_support} tasks but the query batch has {n_query}; inner_data and "
                "outer_data must yield the same tasks (use bilevel.meta.EpisodeStream or meta_problem)."
            )
        _check_structure(owner, problem, outer)
        buffers = problem.buffers_init if buffers is None else buffers
        if uses_outer is None:
            uses_outer = self._uses_outer(problem, outer, support, buffers)

        def one(theta: Params, s: Batch, q: Batch) -> TaskResult:
            return self.task_hypergradient(problem, theta, s, q, buffers, uses_outer)

        return map_tasks(one, outer, support, query, vectorize=self.vectorize, chunk_size=self.task_chunk_size)

    def meta_gradient(
        self, problem: Problem, outer: Params, support: Any, query: Any, buffers: Params | None = None,
        *, uses_outer: bool | None = None,
    ) -> Hypergradient:
        r"""∇Φ(θ) = (1/M) Σ_i dL^q_i/dθ over the meta-batch, with the mean query loss."""
        query_loss, _, hypergrads, residual = self.task_hypergradients(
            problem, outer, support, query, buffers, uses_outer=uses_outer
        )
        return Hypergradient(hypergrad={k: v.mean(0) for k, v in hypergrads.items()}, outer_loss=query_loss.mean())

    def adapt(
        self, problem: Problem, outer: Params, support: Any, buffers: Params | None = None, *, n_steps: int | None = None
    ) -> Params:
        """Per-task adapted parameters φ_i (leading task dimension) after ``n_steps`` (default ``inner_steps``)."""
        owner = type(self).__name__.lower()
        support = as_task_data(support, owner, "the support batch")
        _check_structure(owner, problem, outer)
        steps = self.inner_steps if n_steps is None else n_steps
        check_value(f"{owner}.adapt", "n_steps", steps, NonNegativeInt)
        buffers = problem.buffers_init if buffers is None else buffers

        def one(theta: Params, s: Batch) -> Params:
            return self.adapt_task(problem, theta, s, buffers, steps)

        with torch.no_grad():
            return map_tasks(one, tree.detach(outer), support, vectorize=self.vectorize, chunk_size=self.task_chunk_size)

    def evaluate(
        self, problem: Problem, outer: Params, support: Any, query: Any, buffers: Params | None = None,
        *, n_steps: int | None = None,
    ) -> Tensor:
        """Query loss of every task after adapting θ on its support set (``n_steps`` steps): shape ``(n_tasks,)``."""
        owner = type(self).__name__.lower()
        adapted = self.adapt(problem, outer, support, buffers, n_steps=n_steps)
        query = as_task_data(query, owner, "the query batch")
        buffers = problem.buffers_init if buffers is None else buffers

        def one(theta: Params, phi: Params, q: Batch) -> Tensor:
            return problem.outer_objective(theta, phi, q, buffers)

        with torch.no_grad():
            return map_tasks(one, tree.detach(outer), adapted, query, vectorize=self.vectorize, chunk_size=self.task_chunk_size)

    def _uses_outer(self, problem: Problem, outer: Params, support: Batch, buffers: Params) -> bool:
        return oracles.inner_uses_outer(problem, outer, dict(outer), task_slice(support, 0), buffers)

    # ----- protocol -------------------------------------------------------------------------------------------
    def init(self, problem: Problem) -> MetaState:
        owner = type(self).__name__.lower()
        _check_structure(owner, problem, problem.outer_init)
        check_no_running_stats(owner, problem.module)
        outer = problem.project_outer(tree.clone(problem.outer_init))
        opt = make_optimizer(self.outer_optimizer, self.outer_lr)
        return MetaState(outer, tree.clone(outer), tree.clone(problem.buffers_init), opt.init(outer))

    def step(self, problem: Problem, state: MetaState, data: DataStreams) -> tuple[MetaState, dict[str, Any]]:
        support, query = data.inner(), data.outer()
        uses_outer = state.inner_uses_outer
        if uses_outer is None:
            owner = type(self).__name__.lower()
            uses_outer = self._uses_outer(problem, state.outer, as_task_data(support, owner, "inner_data"), state.buffers)
        query_loss, support_loss, hypergrads, residual = self.task_hypergradients(
            problem, state.outer, support, query, state.buffers, uses_outer=uses_outer
        )
        hypergrad = {k: v.mean(0) for k, v in hypergrads.items()}
        opt = make_optimizer(self.outer_optimizer, self.outer_lr)
        outer, outer_state = outer_update(problem, state.outer, hypergrad, opt, state.outer_opt)
        metrics = {
            "outer_loss": query_loss.mean(),
            "inner_loss": support_loss.mean(),
            "hypergrad_norm": tree.norm(hypergrad),
            "n_tasks": float(query_loss.shape[0]),
        }
        if self._reports_residual:
            metrics["linsolve_residual"] = residual.mean()
            failed = ~(residual <= FALLBACK_RESIDUAL)
            metrics["linsolve_fallback"] = failed.to(residual.dtype).mean()
            if self._falls_back and bool(failed.any()):
                warnings.warn(BilevelWarning(  # one text: shown once per run, the per-step count is in the history
                    f"{owner_name(self)}: CG did not solve (I + H/λ)x = b for some tasks (residual above ‖b‖: H has "
                    "eigenvalues below −λ); their hypergradient fell back to the first-order one x = b "
                    "(cg_fallback=True). Raise lam or cg_maxiter, or set cg_fallback=False to keep the CG answer; the "
                    "history's linsolve_fallback is the fraction of such tasks at each step."
                ), stacklevel=2)
        new_state = dataclasses.replace(state, outer=outer, inner=tree.clone(outer), outer_opt=outer_state,
                                        inner_uses_outer=uses_outer)
        return new_state, metrics

    _reports_residual = False
    _falls_back = False
    _auto_inner_lr = False  # whether inner_lr=None (a step size chosen per task) is supported


@register("maml")
@dataclasses.dataclass(frozen=True)
class MAML(MetaLearner):
    r"""Model-agnostic meta-learning, Finn, Abbeel & Levine, 2017, "Model-Agnostic Meta-Learning for Fast Adaptation
    of Deep Networks", ICML.

    Per task: φ_0 = θ, φ_{t+1} = φ_t − α g_t with g_t = ∇_φ L_T(θ, φ_t; support), then
    dL^q/dθ by reverse mode through the T steps, written out as its adjoint recursion:

    .. math::
        a_T = \partial_\phi L^q(\theta, \phi_T),\quad d = \partial_\theta L^q(\theta, \phi_T);\qquad
        t = T-1, \dots, 0:\ d \leftarrow d - \alpha (\partial^2_{\phi\theta} L_T(\phi_t))^\top a_{t+1},\
        a_t = a_{t+1} - \alpha \nabla^2_{\phi\phi} L_T(\phi_t)\, a_{t+1};\qquad \frac{dL^q}{d\theta} = d + a_0.

    With an ``inner_projection`` P the steps are φ_{t+1} = P(φ_t − α g_t) and the reverse sweep applies P's
    Jacobian transpose (one VJP of P per step) before each step's products; the first-order variant applies P and
    passes the adjoint through unchanged.

    Each step's gradient is built with :func:`bilevel.oracles.linearize_grad_inner`, whose pullback gives both
    products of the reverse sweep in one backward pass over the kept graph (time ≈ 2× first order, memory O(T·graph),
    like autograd through the loop). ``first_order=True`` (FOMAML) drops the second-order terms:
    dL^q/dθ ≈ ∂_θ L^q + ∂_φ L^q at φ_T (no graphs kept).
    """

    differentiates: ClassVar[str | None] = "adapted"

    first_order: bool = False

    def task_hypergradient(
        self, problem: Problem, outer: Params, support: Batch, query: Batch, buffers: Params, uses_outer: bool
    ) -> TaskResult:
        inner = dict(outer)
        pullbacks = []
        projections = []
        project = problem.inner_projection is not None
        for _ in range(self.inner_steps):
            if self.first_order:
                g = oracles.grad_inner(problem, outer, inner, support, buffers)
            else:
                g, products = oracles.linearize_grad_inner(problem, outer, inner, support, buffers)
                pullbacks.append(products)
            inner = tree.axpy(-self.inner_lr, g, inner)
            if project and not self.first_order:
                inner, projection_pullback = oracles.projection_vjp(problem, inner)
                projections.append(projection_pullback)
            elif project:
                inner = problem.project_inner(inner)
        support_loss = problem.inner_objective(outer, inner, support, buffers).detach()
        query_loss, d_outer, adjoint = oracles.grad_outer(problem, outer, inner, query, buffers)
        for t in reversed(range(len(pullbacks))):
            if projections:
                adjoint = projections[t](adjoint)
            mixed, hv = pullbacks[t](adjoint)
            if uses_outer:
                d_outer = tree.axpy(-self.inner_lr, mixed, d_outer)
            adjoint = tree.axpy(-self.inner_lr, hv, adjoint)
        hypergrad = tree.add(d_outer, adjoint)
        return query_loss.detach(), support_loss, tree.detach(hypergrad), torch.zeros_like(query_loss)


@register("imaml")
@dataclasses.dataclass(frozen=True)
class IMAML(MetaLearner):
    r"""Implicit MAML, Rajeswaran, Finn, Kakade & Levine, 2019, "Meta-Learning with Implicit Gradients", NeurIPS.

    Per task the inner problem is proximal, φ*(θ) = argmin_φ L_T(θ, φ) + (λ/2)‖φ − θ‖², approximated by
    ``inner_steps`` gradient steps from θ. Differentiating the optimality condition
    ∇_φ L_T(θ, φ*) + λ(φ* − θ) = 0 gives (H + λI) dφ*/dθ = λI − ∂²_{φθ} L_T with H = ∇²_{φφ} L_T, so

    .. math::
        \frac{dL^q}{d\theta} = \partial_\theta L^q + x - \tfrac1\lambda (\partial^2_{\phi\theta} L_T)^\top x,\qquad
        x = (I + H/\lambda)^{-1} \partial_\phi L^q(\theta, \phi^*),

    x by ``cg_maxiter`` conjugate-gradient iterations (fixed count, ``check=False``: ``vmap``-able) on the operator
    v ↦ v + Hv/λ, SPD when λ exceeds −λ_min(H) (always for convex L_T). The last term vanishes, and is skipped, when
    L_T does not depend on θ directly (the usual case). Memory is O(1) in T: no graph of the inner loop is kept.

    With a non-convex L_T (neural networks), H can have eigenvalues below −λ; CG may then return an x far larger
    than b (residual ‖b − Ax‖/‖b‖ > 1). With ``cg_fallback`` such tasks use x = ∂_φ L^q instead (the first-order
    approximation, (I + H/λ)⁻¹ ≈ I), decided per task without a host sync; the ``linsolve_fallback`` metric is the
    fraction of tasks that needed it. Choose λ on the scale of the Hessian (λ ≈ 1/α relates it to MAML's step α).

    Step size of the inner gradient descent: ``inner_lr`` when given; by default (``inner_lr=None``) per task
    η = 1/(λ + 1.5·L̂), L̂ ≈ |λ|_max(H(θ)) from ``power_iterations`` power iterations started at ∇_φ L_T(θ) (fixed
    count, no host sync). The implicit gradient does not see the inner optimizer, so nothing stops meta-training from
    sharpening the task losses until a fixed step diverges; the curvature-scaled step keeps the descent on the
    proximal objective (curvature λ + H) stable.
    """

    problem_inputs: ClassVar[frozenset[str]] = frozenset()  # a projected inner problem changes the implicit gradient
    differentiates: ClassVar[str | None] = "proximal"

    inner_steps: NonNegativeInt = 10
    inner_lr: PositiveFloat | None = None
    lam: PositiveFloat = 1.0
    cg_maxiter: NonNegativeInt = 5
    cg_fallback: bool = True
    power_iterations: PositiveInt = 5

    _reports_residual = True
    _auto_inner_lr = True

    @property
    def _falls_back(self) -> bool:  # type: ignore[override]
        return self.cg_fallback

    def adaptation_grad(self, problem: Problem, outer: Params, inner: Params, support: Batch, buffers: Params) -> Params:
        r"""∇_φ [L_T(θ, φ) + (λ/2)‖φ − θ‖²] = ∇_φ L_T + λ(φ − θ)."""
        g = oracles.grad_inner(problem, outer, inner, support, buffers)
        return tree.axpy(self.lam, tree.sub(inner, outer), g)

    def adapt_task(self, problem: Problem, outer: Params, support: Batch, buffers: Params, n_steps: int) -> Params:
        r"""φ_0 = θ, φ_{t+1} = φ_t − η (∇_φ L_T(φ_t) + λ(φ_t − θ)), η = ``inner_lr`` or 1/(λ + 1.5 L̂) (see the class)."""
        if self.inner_lr is not None or n_steps == 0:
            return super().adapt_task(problem, outer, support, buffers, n_steps)
        g0, products = oracles.linearize_grad_inner(problem, outer, dict(outer), support, buffers)
        v = tree.scale(g0, 1.0 / tree.norm(g0).clamp_min(torch.finfo(g0[next(iter(g0))].dtype).tiny))
        estimate = tree.norm(v)
        for _ in range(self.power_iterations):
            hv = products(v)[1]
            estimate = tree.norm(hv)
            v = tree.scale(hv, 1.0 / estimate.clamp_min(torch.finfo(estimate.dtype).tiny))
        lr = 1.0 / (self.lam + 1.5 * estimate)
        inner = tree.axpy(-lr, g0, dict(outer))  # the proximal term vanishes at φ_0 = θ
        for _ in range(n_steps - 1):
            inner = tree.axpy(-lr, self.adaptation_grad(problem, outer, inner, support, buffers), inner)
        return inner

    def task_hypergradient(
        self, problem: Problem, outer: Params, support: Batch, query: Batch, buffers: Params, uses_outer: bool
    ) -> TaskResult:
        inner = self.adapt_task(problem, outer, support, buffers, self.inner_steps)
        query_loss, d_outer, d_inner = oracles.grad_outer(problem, outer, inner, query, buffers)
        _, products = oracles.linearize_grad_inner(problem, outer, inner, support, buffers)
        support_loss = problem.inner_objective(outer, inner, support, buffers).detach()

        def matvec(v: Params) -> Params:
            return tree.axpy(1.0 / self.lam, products(v)[1], v)

        result = cg(matvec, d_inner, maxiter=self.cg_maxiter, check=False)
        x = result.x
        if self.cg_fallback:  # a failed solve (residual above ‖b‖, or NaN): the first-order answer x = b instead
            failed = ~(result.residual <= FALLBACK_RESIDUAL)
            x = {k: torch.where(failed, d_inner[k], v) for k, v in x.items()}
        hypergrad = tree.add(d_outer, x)
        if uses_outer:
            hypergrad = tree.axpy(-1.0 / self.lam, products(x)[0], hypergrad)
        return query_loss.detach(), support_loss, tree.detach(hypergrad), result.residual.detach()


def _check_structure(owner: str, problem: Problem, outer: Params) -> None:
    inner = problem.inner_init
    if set(inner) != set(outer) or any(inner[k].shape != outer[k].shape for k in inner):
        got = {k: tuple(v.shape) for k, v in inner.items()}
        want = {k: tuple(v.shape) for k, v in outer.items()}
        raise BilevelError(
            f"{owner}: every task's inner variables start at the outer ones (φ_0 = θ), so they need the same names "
            f"and shapes; got inner {got} and outer {want}. Pass the same module (or dict) as outer and inner, "
            "e.g. with bilevel.meta.meta_problem."
        )


__all__ = ["IMAML", "MAML", "MetaLearner", "MetaState"]
