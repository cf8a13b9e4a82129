r"""Every derivative a solver needs, computed here and nowhere else.

Two families:

* pure functions built on ``torch.func`` (``grad``, ``jvp``, ``vjp``): ``grad_inner``, ``grad_outer``, ``hvp``,
  ``mixed_vjp``, ``constraint_vjp``, ``jvp_inner``. They compose with ``vmap`` (over tasks, right-hand sides or
  perturbations) and with each other.
* :class:`Linearization`: the graph of ``∇_w L_T`` at one point built once, then Hessian-vector products and
  mixed VJPs as backward passes over the retained graph. Repeated products at a fixed point (Neumann, CG) are
  2–7× cheaper this way than ``jvp(grad(.))`` (measured, see PERFORMANCE.md), so the implicit hypergradient uses it;
  batched right-hand sides go through ``is_grads_batched`` (autograd's own ``vmap``).

Oracle calls are counted by kind inside :func:`count_oracle_calls` (a batched call counts once).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp

from bilevel.problem import Problem
from bilevel.types import Batch, Params

_COUNTER: contextvars.ContextVar[Counter | None] = contextvars.ContextVar("bilevel_oracle_counter", default=None)


@contextlib.contextmanager
def count_oracle_calls() -> Iterator[Counter]:
    """Count oracle calls made inside the block, by kind (``grad_inner``, ``hvp``, ...)."""
    counter: Counter = Counter()
    token = _COUNTER.set(counter)
    try:
        yield counter
    finally:
        _COUNTER.reset(token)
        parent = _COUNTER.get()
        if parent is not None:
            parent.update(counter)


def _tick(kind: str, n: int = 1) -> None:
    counter = _COUNTER.get()
    if counter is not None:
        counter[kind] += n


# ----- first order --------------------------------------------------------------------------------------
def grad_inner(problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None) -> Params:
    r"""∇_w L_T(λ, w; batch)."""
    _tick("grad_inner")
    return grad(lambda w: problem.inner_objective(outer, w, batch, buffers))(inner)


def value_and_grad_inner(
    problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None
) -> tuple[Tensor, Params, Params]:
    r"""(L_T, ∇_w L_T, buffers after the forward pass): what one training step of w needs."""
    _tick("grad_inner")

    def f(w: Params) -> tuple[Tensor, tuple[Tensor, Params]]:
        loss, new_buffers = problem.inner_objective_and_buffers(outer, w, batch, buffers)
        return loss, (loss.detach(), new_buffers)

    g, (loss, new_buffers) = grad(f, has_aux=True)(inner)
    return loss, g, new_buffers


def grad_inner_wrt_outer(
    problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None
) -> Params:
    r"""∇_λ L_T(λ, w; batch) (F2SA's ∇_x g)."""
    _tick("grad_inner_outer")
    return grad(lambda lam: problem.inner_objective(lam, inner, batch, buffers))(outer)


def grad_inner_both(
    problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None
) -> tuple[Tensor, Params, Params]:
    r"""(L_T, ∇_λ L_T, ∇_w L_T) from one backward pass."""
    _tick("grad_inner")
    (g_outer, g_inner), value = grad_and_value(
        lambda lam, w: problem.inner_objective(lam, w, batch, buffers), argnums=(0, 1)
    )(outer, inner)
    return value, g_outer, g_inner


def grad_outer(
    problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None
) -> tuple[Tensor, Params, Params]:
    r"""(L_V, ∂_λ L_V, ∂_w L_V) from one backward pass."""
    _tick("grad_outer")
    (g_outer, g_inner), value = grad_and_value(
        lambda lam, w: problem.outer_objective(lam, w, batch, buffers), argnums=(0, 1)
    )(outer, inner)
    return value, g_outer, g_inner


# ----- second order, pure -------------------------------------------------------------------------------
def hvp(problem: Problem, outer: Params, inner: Params, batch: Batch, v: Params, buffers: Params | None = None) -> Params:
    r"""∇²_ww L_T(λ, w) v by forward-over-reverse (``jvp`` of ``grad``); ``vmap`` over ``v`` batches it."""
    _tick("hvp")
    g = grad(lambda w: problem.inner_objective(outer, w, batch, buffers))
    return jvp(g, (inner,), (v,))[1]


def mixed_vjp(
    problem: Problem, outer: Params, inner: Params, batch: Batch, v: Params, buffers: Params | None = None
) -> Params:
    r"""(∂²_{wλ} L_T)ᵀ v = ∇_λ ⟨∇_w L_T(λ, w), v⟩ (one VJP of ∇_w L_T with respect to λ)."""
    _tick("mixed_vjp")
    _, pullback = vjp(lambda lam: grad(lambda w: problem.inner_objective(lam, w, batch, buffers))(inner), outer)
    return pullback(v)[0]


def jvp_inner(
    problem: Problem, outer: Params, inner: Params, batch: Batch, v: Params, buffers: Params | None = None
) -> tuple[Tensor, Tensor]:
    r"""(L_T, ⟨∇_w L_T, v⟩) by one forward-mode pass."""
    _tick("jvp")
    return jvp(lambda w: problem.inner_objective(outer, w, batch, buffers), (inner,), (v,))


def constraint_vjp(
    problem: Problem, outer: Params, inner: Params, mu: Tensor, buffers: Params | None = None
) -> tuple[Tensor, Params, Params]:
    r"""(g(λ, w), μᵀ∂_λ g, μᵀ∂_w g): the constraint values and one VJP, as LV-HBA needs."""
    _tick("constraint_vjp")
    g, pullback = vjp(lambda lam, w: problem.constraints(lam, w, buffers), outer, inner)
    if mu.shape != g.shape:
        raise ValueError(f"constraint_vjp: multiplier shape {tuple(mu.shape)} does not match g's {tuple(g.shape)}.")
    g_outer, g_inner = pullback(mu)
    return g, g_outer, g_inner


def linearize_grad_inner(
    problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None
) -> tuple[Params, Callable[[Params], tuple[Params, Params]]]:
    r"""(∇_w L_T(λ, w), v ↦ ((∂²_{wλ} L_T)ᵀ v, ∇²_ww L_T v)): the gradient and its pullback, built once.

    The pure ``torch.func`` counterpart of :class:`Linearization`: one forward and backward pass computes
    ∇_w L_T and keeps its graph inside a ``vjp`` closure; each call of the returned pullback is one backward pass
    over that graph (double backward) giving the mixed product and the Hessian-vector product together, and may be
    repeated (CG on one point, or the reverse sweep of an unrolled inner loop). It composes with ``vmap`` (over
    tasks), where the retained-graph :class:`Linearization` does not; the mixed product is zero when L_T ignores λ.
    """
    _tick("grad_inner")
    g, pullback = vjp(lambda lam, w: grad(lambda w_: problem.inner_objective(lam, w_, batch, buffers))(w), outer, inner)

    def products(v: Params) -> tuple[Params, Params]:
        _tick("hvp")
        mixed, hv = pullback(v)
        return mixed, hv

    return g, products


def inner_uses_outer(problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None) -> bool:
    r"""Whether λ reaches L_T(λ, w; batch) at all (structurally, in the autograd graph), i.e. whether ∂²_{wλ} L_T
    can be non-zero; one forward and backward pass. Lets a method skip mixed products that are known to vanish."""
    _tick("grad_inner_outer")
    lam = {k: v.detach().requires_grad_(True) for k, v in outer.items()}
    with torch.enable_grad():
        loss = problem.inner_objective(lam, {k: v.detach() for k, v in inner.items()}, batch, buffers)
        if not loss.requires_grad:
            return False
        grads = torch.autograd.grad(loss, list(lam.values()), allow_unused=True)
    return any(g is not None for g in grads)


# ----- second order, retained graph ---------------------------------------------------------------------
class Linearization:
    r"""∇_w L_T(λ, w; batch) with its graph kept, for many products at one point.

    ``hvp(v) = ∇²_ww L_T v`` and ``mixed_vjp(v) = (∂²_{wλ} L_T)ᵀ v`` are each one backward pass over the
    retained graph of the gradient (double backward). Pass ``v`` with a leading batch dimension and
    ``batched=True`` to solve for many right-hand sides at once.
    """

    def __init__(self, problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None):
        _tick("grad_inner")
        self.outer = {k: v.detach().requires_grad_(True) for k, v in outer.items()}
        self.inner = {k: v.detach().requires_grad_(True) for k, v in inner.items()}
        with torch.enable_grad():
            loss = problem.inner_objective(self.outer, self.inner, batch, buffers)
            grads = torch.autograd.grad(loss, list(self.inner.values()), create_graph=True, materialize_grads=True)
        self.loss = loss.detach()
        self.grad = dict(zip(self.inner, grads))

    def hvp(self, v: Params, *, batched: bool = False) -> Params:
        """∇²_ww L_T v (``v`` of shape ``(B, *w.shape)`` per tensor when ``batched``)."""
        _tick("hvp")
        return self._backward(v, self.inner, batched)

    def mixed_vjp(self, v: Params, *, batched: bool = False) -> Params:
        """(∂²_{wλ} L_T)ᵀ v."""
        _tick("mixed_vjp")
        return self._backward(v, self.outer, batched)

    def _backward(self, v: Params, wrt: Params, batched: bool) -> Params:
        grads = torch.autograd.grad(
            list(self.grad.values()),
            list(wrt.values()),
            grad_outputs=[v[k] for k in self.grad],
            retain_graph=True,
            materialize_grads=True,
            is_grads_batched=batched,
        )
        return {k: g.detach() for k, g in zip(wrt, grads)}


# ----- reverse mode through a computation ---------------------------------------------------------------
def differentiable_grad_inner(
    problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None,
    *, create_graph: bool = True,
) -> tuple[Tensor, Params, Params]:
    r"""(L_T, ∇_w L_T, buffers) with the gradient kept differentiable in (λ, w) (``create_graph``), for unrolling.

    ``outer`` and ``inner`` must be part of an autograd graph (leaves with ``requires_grad`` or results of ops on them).
    """
    _tick("grad_inner")
    with torch.enable_grad():
        loss, new_buffers = problem.inner_objective_and_buffers(outer, inner, batch, buffers)
        grads = torch.autograd.grad(loss, list(inner.values()), create_graph=create_graph, materialize_grads=True)
    return loss.detach(), dict(zip(inner, grads)), new_buffers


def backprop(value: Tensor, wrt: Params) -> Params:
    r"""∇_{wrt} value through the whole recorded graph (reverse mode; zeros for unused entries)."""
    _tick("backprop")
    grads = torch.autograd.grad(value, list(wrt.values()), materialize_grads=True)
    return dict(zip(wrt, grads))
