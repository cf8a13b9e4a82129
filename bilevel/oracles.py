r"""Every derivative a solver needs, computed here and nowhere else.

Two layers:

* **function-level oracles** of a plain ``fn(outer, inner) -> scalar`` on dicts of tensors: :func:`value_and_grad`,
  :func:`hvp_of`, :func:`mixed_vjp_of`, :func:`jvp_of`, :func:`linearize`, :func:`unused_outer` and
  :class:`Linearization` (``Linearization.of(fn, ...)``) — what an implicit-function rule for any solver
  (``custom_root``) or a replayed training run needs, with no :class:`~bilevel.Problem` in sight;
* the **Problem oracles**, thin wrappers that bind the problem's losses to a batch and buffers and count the call
  by kind: ``grad_inner``, ``value_and_grad_inner``, ``grad_inner_wrt_outer``, ``grad_inner_both``, ``grad_outer``,
  ``hvp``, ``mixed_vjp``, ``jvp_inner``, ``linearize_grad_inner``, ``constraint_vjp``, ``inner_uses_outer``.

Outside ``torch.func`` transforms the first-order oracles use plain reverse mode (less overhead); inside, the
``torch.func`` path, so every oracle composes with ``vmap`` (over tasks, right-hand sides or perturbations).
* :class:`Linearization`: the graph of ``∇_w L_T`` at one point built once, then Hessian-vector products and
  mixed VJPs as backward passes over the retained graph. Repeated products at a fixed point (Neumann, CG) are
  several times cheaper this way than ``jvp(grad(.))`` (both timed side by side by the profile of
  ``benchmarks/hypergrad_peers.py``; docs/peer_costs.md), so the implicit hypergradient uses it;
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

from bilevel.errors import BilevelError
from bilevel.functional import in_transform
from bilevel.problem import Problem, check_finite
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
# Outside any torch.func transform, plain reverse mode (torch.autograd.grad) gives the same numbers with less
# per-call overhead (measured: 0.14 ms vs 0.36 ms for a small outer gradient, benchmarks/hypergrad_peers.py);
# under vmap/grad/jvp (meta-learning over tasks) the torch.func path is taken, which composes with them.


Objective = Callable[[Params, Params], Tensor]
"""``fn(outer, inner) -> scalar``: a loss with its data bound, e.g. ``lambda lam, w: problem.inner_objective(lam, w,
batch)``."""


# ----- function-level oracles -----------------------------------------------------------------------------------
def value_and_grad(
    fn: Objective, outer: Params, inner: Params, *, wrt_outer: bool = False, wrt_inner: bool = True,
    name: str = "the function",
) -> tuple[Tensor, Params, Params]:
    """(fn(λ, w), ∇_λ fn or {}, ∇_w fn or {}) by one reverse pass; zeros for unused entries. ``name``: what errors
    call ``fn`` (a value with no graph to w is an error when ``wrt_inner``)."""
    if in_transform():
        argnums = tuple(i for i, on in ((0, wrt_outer), (1, wrt_inner)) if on)
        grads, value = grad_and_value(fn, argnums=argnums)(outer, inner)
        it = iter(grads)
        return value, (next(it) if wrt_outer else {}), (next(it) if wrt_inner else {})
    lam = {k: v.detach().requires_grad_(wrt_outer) for k, v in outer.items()}
    w = {k: v.detach().requires_grad_(wrt_inner) for k, v in inner.items()}
    with torch.enable_grad():
        value = fn(lam, w)
        leaves = (list(lam.values()) if wrt_outer else []) + (list(w.values()) if wrt_inner else [])
        if wrt_inner:
            require_graph(value, name)
        grads = torch.autograd.grad(value, leaves, materialize_grads=True) if value.requires_grad else [
            torch.zeros_like(t) for t in leaves
        ]
    n = len(lam) if wrt_outer else 0
    g_outer = dict(zip(lam, grads[:n])) if wrt_outer else {}
    g_inner = dict(zip(w, grads[n:])) if wrt_inner else {}
    return value.detach(), g_outer, g_inner


def hvp_of(fn: Objective, outer: Params, inner: Params, v: Params) -> Params:
    r"""∇²_ww fn(λ, w) v by forward-over-reverse (``jvp`` of ``grad``); ``vmap`` over ``v`` batches it."""
    return jvp(grad(lambda w: fn(outer, w)), (inner,), (v,))[1]


def mixed_vjp_of(fn: Objective, outer: Params, inner: Params, v: Params) -> Params:
    r"""(∂²_{wλ} fn)ᵀ v = ∇_λ ⟨∇_w fn(λ, w), v⟩ (one VJP of ∇_w fn with respect to λ)."""
    _, pullback = vjp(lambda lam: grad(lambda w: fn(lam, w))(inner), outer)
    return pullback(v)[0]


def jvp_of(fn: Objective, outer: Params, inner: Params, v: Params) -> tuple[Tensor, Tensor]:
    r"""(fn(λ, w), ⟨∇_w fn, v⟩) by one forward-mode pass."""
    return jvp(lambda w: fn(outer, w), (inner,), (v,))


def linearize(fn: Objective, outer: Params, inner: Params) -> tuple[Params, Callable[[Params], tuple[Params, Params]]]:
    r"""(∇_w fn(λ, w), v ↦ ((∂²_{wλ} fn)ᵀ v, ∇²_ww fn v)): the gradient and its pullback, built once.

    One forward and backward pass computes ∇_w fn and keeps its graph inside a ``vjp`` closure; each call of the
    returned pullback is one backward pass over that graph (double backward) giving the mixed product and the
    Hessian-vector product together, and may be repeated. The pure ``torch.func`` counterpart of
    :class:`Linearization`: it composes with ``vmap`` (over tasks), where the retained graph does not.
    """
    g, pullback = vjp(lambda lam, w: grad(lambda w_: fn(lam, w_))(w), outer, inner)
    return g, lambda v: pullback(v)


def unused_outer(fn: Objective, outer: Params, inner: Params) -> list[str]:
    r"""The outer variables that do not reach fn(λ, w) at all (structurally, in the autograd graph): those whose
    ∂²_{wλ} fn vanishes identically. One forward and backward pass."""
    lam = {k: v.detach().requires_grad_(True) for k, v in outer.items()}
    with torch.enable_grad():
        value = fn(lam, {k: v.detach() for k, v in inner.items()})
        if not value.requires_grad:
            return list(lam)
        grads = torch.autograd.grad(value, list(lam.values()), allow_unused=True)
    return [k for k, g in zip(lam, grads) if g is None]


def _inner_fn(problem: Problem, batch: Batch, buffers: Params | None) -> Objective:
    return lambda lam, w: problem.inner_objective(lam, w, batch, buffers)


def _outer_fn(problem: Problem, batch: Batch, buffers: Params | None) -> Objective:
    return lambda lam, w: problem.outer_objective(lam, w, batch, buffers)


# ----- Problem oracles (counted) ------------------------------------------------------------------------------------
def require_graph(value: Tensor, name: str) -> None:
    """A loss differentiated for the inner variables must depend on them (carry an autograd graph)."""
    if not value.requires_grad:
        raise BilevelError(
            f"Problem: {name} returned a tensor that does not depend on the inner variables (no autograd graph): was "
            "it detached, computed under torch.no_grad(), or rebuilt from .item()? Return the loss as a differentiable "
            "function of its inputs."
        )


def grad_inner(problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None) -> Params:
    r"""∇_w L_T(λ, w; batch)."""
    _tick("grad_inner")
    return value_and_grad(_inner_fn(problem, batch, buffers), outer, inner, name="inner_loss")[2]


def value_and_grad_inner(
    problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None
) -> tuple[Tensor, Params, Params]:
    r"""(L_T, ∇_w L_T, buffers after the forward pass): what one training step of w needs."""
    _tick("grad_inner")
    if in_transform():

        def f_aux(w: Params) -> tuple[Tensor, tuple[Tensor, Params]]:
            loss, updated = problem.inner_objective_and_buffers(outer, w, batch, buffers)
            return loss, (loss.detach(), updated)

        g, (loss, updated) = grad(f_aux, has_aux=True)(inner)
        return loss, g, updated
    new_buffers: list[Params] = []

    def f(lam: Params, w: Params) -> Tensor:
        loss, updated = problem.inner_objective_and_buffers(lam, w, batch, buffers)
        new_buffers.append(updated)
        return loss

    loss, _, g = value_and_grad(f, outer, inner, name="inner_loss")
    return loss.detach(), g, new_buffers[-1]


def grad_inner_wrt_outer(
    problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None
) -> Params:
    r"""∇_λ L_T(λ, w; batch) (F2SA's ∇_x g)."""
    _tick("grad_inner_outer")
    return value_and_grad(_inner_fn(problem, batch, buffers), outer, inner, wrt_outer=True, wrt_inner=False)[1]


def grad_inner_both(
    problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None
) -> tuple[Tensor, Params, Params]:
    r"""(L_T, ∇_λ L_T, ∇_w L_T) from one backward pass."""
    _tick("grad_inner")
    return value_and_grad(_inner_fn(problem, batch, buffers), outer, inner, wrt_outer=True, name="inner_loss")


def grad_outer(
    problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None
) -> tuple[Tensor, Params, Params]:
    r"""(L_V, ∂_λ L_V, ∂_w L_V) from one backward pass."""
    _tick("grad_outer")
    return value_and_grad(_outer_fn(problem, batch, buffers), outer, inner, wrt_outer=True, name="outer_loss")


# ----- second order, pure -------------------------------------------------------------------------------
def hvp(problem: Problem, outer: Params, inner: Params, batch: Batch, v: Params, buffers: Params | None = None) -> Params:
    r"""∇²_ww L_T(λ, w) v by forward-over-reverse (``jvp`` of ``grad``); ``vmap`` over ``v`` batches it."""
    _tick("hvp")
    return hvp_of(_inner_fn(problem, batch, buffers), outer, inner, v)


def mixed_vjp(
    problem: Problem, outer: Params, inner: Params, batch: Batch, v: Params, buffers: Params | None = None
) -> Params:
    r"""(∂²_{wλ} L_T)ᵀ v = ∇_λ ⟨∇_w L_T(λ, w), v⟩ (one VJP of ∇_w L_T with respect to λ)."""
    _tick("mixed_vjp")
    return mixed_vjp_of(_inner_fn(problem, batch, buffers), outer, inner, v)


def jvp_inner(
    problem: Problem, outer: Params, inner: Params, batch: Batch, v: Params, buffers: Params | None = None
) -> tuple[Tensor, Tensor]:
    r"""(L_T, ⟨∇_w L_T, v⟩) by one forward-mode pass."""
    _tick("jvp")
    return jvp_of(_inner_fn(problem, batch, buffers), outer, inner, v)


def constraint_vjp(
    problem: Problem, outer: Params, inner: Params, mu: Tensor, buffers: Params | None = None
) -> tuple[Tensor, Params, Params]:
    r"""(g(λ, w), μᵀ∂_λ g, μᵀ∂_w g): the constraint values and one VJP, as LV-HBA needs."""
    _tick("constraint_vjp")
    g, pullback = vjp(lambda lam, w: problem.constraints(lam, w, buffers), outer, inner)
    if not in_transform():
        check_finite("Problem: inner_constraints", g.detach())
    if mu.shape != g.shape:
        raise BilevelError(
            f"Problem: inner_constraints returned {g.numel()} values, but {mu.numel()} the first time (one multiplier "
            "each); the number of constraints must stay fixed."
        )
    g_outer, g_inner = pullback(mu)
    return g, g_outer, g_inner


def linearize_grad_inner(
    problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None
) -> tuple[Params, Callable[[Params], tuple[Params, Params]]]:
    r"""(∇_w L_T(λ, w), v ↦ ((∂²_{wλ} L_T)ᵀ v, ∇²_ww L_T v)): :func:`linearize` of the inner loss, each product
    counted as one HVP (used by MAML/iMAML under ``vmap``; the mixed product is zero when L_T ignores λ)."""
    _tick("grad_inner")
    g, pullback = linearize(_inner_fn(problem, batch, buffers), outer, inner)

    def products(v: Params) -> tuple[Params, Params]:
        _tick("hvp")
        return pullback(v)

    return g, products


def projection_vjp(problem: Problem, inner: Params) -> tuple[Params, Callable[[Params], Params]]:
    r"""(P(w), u ↦ (∂P/∂w)ᵀ u) for the problem's ``inner_projection`` P: what a reverse sweep through a projected
    step needs (``vmap``-able when P is)."""
    _tick("projection_vjp")
    projected, pullback = vjp(problem.project_inner, inner)
    return projected, lambda u: pullback(u)[0]


def inner_uses_outer(problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None) -> bool:
    r"""Whether λ reaches L_T(λ, w; batch) at all, i.e. whether ∂²_{wλ} L_T can be non-zero (:func:`unused_outer`).
    Lets a method skip mixed products that are known to vanish."""
    _tick("grad_inner_outer")
    return len(unused_outer(_inner_fn(problem, batch, buffers), outer, inner)) < len(outer)


# ----- second order, retained graph ---------------------------------------------------------------------
class Linearization:
    r"""∇_w L_T(λ, w; batch) with its graph kept, for many products at one point.

    ``hvp(v) = ∇²_ww L_T v`` and ``mixed_vjp(v) = (∂²_{wλ} L_T)ᵀ v`` are each one backward pass over the
    retained graph of the gradient (double backward). Pass ``v`` with a leading batch dimension and
    ``batched=True`` to solve for many right-hand sides at once. :meth:`of` linearizes any function
    ``f(outer, inner) -> scalar`` the same way (the problem's inner loss is one such function).
    """

    def __init__(self, problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None):
        self._build(_inner_fn(problem, batch, buffers), outer, inner, "inner_loss")

    @classmethod
    def of(cls, fn: Callable[[Params, Params], Tensor], outer: Params, inner: Params, *, name: str = "the function"
           ) -> Linearization:
        """The linearization of ∇_w fn(λ, w) at (``outer``, ``inner``) for a plain function ``fn`` (``name``: what
        errors call it)."""
        self = cls.__new__(cls)
        self._build(fn, outer, inner, name)
        return self

    def _build(self, fn: Callable[[Params, Params], Tensor], outer: Params, inner: Params, name: str) -> None:
        _tick("grad_inner")
        self.outer = {k: v.detach().requires_grad_(True) for k, v in outer.items()}
        self.inner = {k: v.detach().requires_grad_(True) for k, v in inner.items()}
        with torch.enable_grad():
            loss = fn(self.outer, self.inner)
            require_graph(loss, name)
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
        require_graph(loss, "inner_loss")
        grads = torch.autograd.grad(loss, list(inner.values()), create_graph=create_graph, materialize_grads=True)
    return loss.detach(), dict(zip(inner, grads)), new_buffers


def backprop(value: Tensor, wrt: Params, name: str = "outer_loss") -> Params:
    r"""∇_{wrt} value through the whole recorded graph (reverse mode; zeros for unused entries); ``name``: what
    errors call ``value``."""
    _tick("backprop")
    require_graph(value, name)
    grads = torch.autograd.grad(value, list(wrt.values()), materialize_grads=True)
    return dict(zip(wrt, grads))
