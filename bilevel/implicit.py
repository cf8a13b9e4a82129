r"""Implicit differentiation of any solver: :func:`custom_root` and :func:`custom_fixed_point`.

Blondel, Berthet, Cuturi, Frostig, Hoyer, Llinares-López, Pedregosa & Vert, 2022, "Efficient and Modular Implicit
Differentiation", NeurIPS. A solver ``x* = solver(init, *θ)`` is known only through an optimality condition it
satisfies, F(x*, θ) = 0 (a gradient that vanishes, a fixed point of a projected or proximal step, KKT conditions:
:mod:`bilevel.optimality`). Where A = ∂_x F is invertible, the implicit function theorem gives

.. math::
    \frac{\partial x^*}{\partial \theta} = -A^{-1} B,\qquad B = \partial_\theta F(x^*, \theta),\qquad
    \bar\theta = -B^\top w,\quad A^\top w = \bar x,

so the backward pass of ``x*`` needs one linear solve with Aᵀ, matrix-free: Aᵀw and Av are one VJP and one JVP of F
(``torch.func``). The solver itself is never differentiated: any loop, ``torch.optim.LBFGS``, a closed form or
SciPy through tensors.

The decorated function works with ``torch.autograd`` (``backward``, ``torch.autograd.grad``) and ``torch.func``
(``grad``, ``vjp``, ``jacrev``, ``vmap`` over θ): it is a ``torch.autograd.Function`` whose ``vmap`` rule solves one
θ at a time (the solver may hold any Python control flow), and whose backward solve is a second function with the
same rule (so ``jacrev``, which ``vmap``s the VJP over output directions, works with checked iterative solvers).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import jvp, vjp
from torch.utils import _pytree as pytree

from bilevel import tree
from bilevel.errors import BilevelError, BilevelWarning
from bilevel.linsolve import cg, exact, minres
from bilevel.options import NonNegativeFloat, PositiveFloat, PositiveInt, check_value

LinearSolve = Literal["normal_cg", "cg", "minres", "exact"]
"""How Aᵀw = x̄ is solved: CG on the normal equations A Aᵀ w = A x̄ (any invertible A; the default, as jaxopt's),
CG (A symmetric positive definite: stationarity of a strongly convex objective), MINRES (A symmetric), or a dense
solve (small x; the reference)."""


@dataclasses.dataclass
class _Config:
    """What the autograd functions need besides tensors (passed through as one non-tensor argument)."""

    solver: Callable[..., Any]
    optimality_fn: Callable[..., Any]
    init_leaves: list[Any]
    init_spec: Any
    theta_spec: Any
    solve: str
    maxiter: int
    rtol: float
    residual_tol: float
    x_spec: Any = None
    x_count: int = 0


def custom_root(
    optimality_fn: Callable[..., Any], *, solve: LinearSolve = "normal_cg", maxiter: PositiveInt = 100,
    rtol: PositiveFloat = 1e-8, residual_tol: NonNegativeFloat = 1e-4,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    r"""Decorator: make ``solver(init, *theta) -> x`` differentiable in ``theta`` through ``optimality_fn(x, *theta)
    == 0`` (see the module docstring).

    ``x``, ``init`` and each θ may be a tensor or a (nested) tuple/list/dict of tensors; ``optimality_fn`` returns
    the same structure as ``x``. ``solve``, ``maxiter``, ``rtol``: the backward linear solve (a relative residual
    above max(1e-3, 10·rtol) after ``maxiter`` iterations warns with a :class:`~bilevel.BilevelWarning`).
    ``residual_tol``: the forward pass refuses an ``x`` with ‖F(x, θ)‖ > residual_tol·max(1, ‖F(init, θ)‖) (or
    max(1, ‖x‖) when ``init`` is not of x's form) — the implicit gradient is only the gradient of a solution.
    """
    check_value("custom_root", "solve", solve, LinearSolve, "normal_cg")
    check_value("custom_root", "maxiter", maxiter, PositiveInt, 100)
    check_value("custom_root", "rtol", rtol, PositiveFloat, 1e-8)
    check_value("custom_root", "residual_tol", residual_tol, NonNegativeFloat, 1e-4)
    if not callable(optimality_fn):
        raise BilevelError(f"custom_root: optimality_fn must be a callable F(x, *theta), got {type(optimality_fn).__name__}.")

    def decorate(solver: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(solver):
            raise BilevelError(f"custom_root: decorate a solver(init, *theta) -> x, got {type(solver).__name__}.")

        @functools.wraps(solver)
        def wrapped(init: Any, *theta: Any) -> Any:
            leaves, spec = pytree.tree_flatten(theta)
            for i, leaf in enumerate(leaves):
                if not (isinstance(leaf, Tensor) and leaf.is_floating_point()):
                    raise BilevelError(
                        f"custom_root: every leaf of theta must be a floating-point tensor (leaf {i} is "
                        f"{type(leaf).__name__ if not isinstance(leaf, Tensor) else leaf.dtype}); pass constants "
                        "through a closure instead."
                    )
            init_leaves, init_spec = pytree.tree_flatten(init)
            # tensors of init travel as (undifferentiated) inputs, so that torch.func unwraps them like θ
            tensors = [v for v in init_leaves if isinstance(v, Tensor)]
            config = _Config(solver, optimality_fn, init_leaves, init_spec, spec, solve, maxiter, rtol, residual_tol)
            out = _Root.apply(config, len(tensors), *tensors, *leaves)
            return pytree.tree_unflatten(list(out), config.x_spec)

        return wrapped

    return decorate


def custom_fixed_point(fixed_point_fn: Callable[..., Any], **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    r"""Decorator: make ``solver(init, *theta) -> x`` differentiable through the fixed point x = T(x, θ) of
    ``fixed_point_fn`` = T, i.e. :func:`custom_root` with F(x, θ) = T(x, θ) − x (same options)."""
    if not callable(fixed_point_fn):
        raise BilevelError(f"custom_fixed_point: fixed_point_fn must be a callable T(x, *theta), got "
                           f"{type(fixed_point_fn).__name__}.")

    def optimality(x: Any, *theta: Any) -> Any:
        return pytree.tree_map(lambda t, v: t - v, fixed_point_fn(x, *theta), x)

    return custom_root(optimality, **options)


# ----- the two autograd functions ---------------------------------------------------------------------------------
class _Root(torch.autograd.Function):
    """x* = solver(init, *θ) forward; θ̄ = −Bᵀ A⁻ᵀ x̄ backward (through :class:`_ImplicitVJP`)."""

    @staticmethod
    def forward(config: _Config, n_init: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        init_tensors, theta_leaves = iter(tensors[:n_init]), tensors[n_init:]
        init = pytree.tree_unflatten([next(init_tensors) if isinstance(v, Tensor) else v for v in config.init_leaves],
                                     config.init_spec)
        theta = pytree.tree_unflatten([t.detach() for t in theta_leaves], config.theta_spec)
        with torch.no_grad():
            x = config.solver(init, *theta)
        x_leaves, x_spec = pytree.tree_flatten(x)
        bad = [i for i, leaf in enumerate(x_leaves) if not (isinstance(leaf, Tensor) and leaf.is_floating_point())]
        if bad or not x_leaves:
            raise BilevelError(
                f"custom_root: the solver must return a floating-point tensor or a structure of them; leaf "
                f"{bad[0] if bad else '(none)'} is not."
            )
        config.x_spec, config.x_count = x_spec, len(x_leaves)
        _check_solution(config, [leaf.detach() for leaf in x_leaves], list(theta_leaves), init)
        return tuple(leaf.detach().clone() for leaf in x_leaves)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.config, ctx.n_init = inputs[0], inputs[1]
        ctx.save_for_backward(*output, *inputs[2 + inputs[1]:])

    @staticmethod
    def backward(ctx: Any, *x_bar: Tensor) -> tuple[Any, ...]:
        config: _Config = ctx.config
        saved = ctx.saved_tensors
        x, theta = saved[: config.x_count], saved[config.x_count:]
        x_bar = tuple(torch.zeros_like(v) if g is None else g for v, g in zip(x, x_bar))
        return (None, None, *([None] * ctx.n_init), *_ImplicitVJP.apply(config, *x, *theta, *x_bar))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], config: _Config, n_init: int, *tensors: Tensor) -> tuple[Any, Any]:
        return _one_at_a_time(_Root, info, (config, n_init), tensors, in_dims[2:])


class _ImplicitVJP(torch.autograd.Function):
    """(x*, θ, x̄) ↦ θ̄ = −(∂_θ F)ᵀ w with (∂_x F)ᵀ w = x̄ (once differentiable)."""

    @staticmethod
    def forward(config: _Config, *tensors: Tensor) -> tuple[Tensor, ...]:
        n_x, n_theta = config.x_count, len(tensors) - 2 * config.x_count
        x = _as_params(tensors[:n_x])
        theta = list(tensors[n_x: n_x + n_theta])
        x_bar = _as_params(tensors[n_x + n_theta:])
        w = _solve_transposed(config, x, theta, x_bar)
        _, pullback = vjp(lambda *t: _residual(config, x, list(t)), *theta)
        return tuple(-g for g in pullback(w))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        raise BilevelError("custom_root: the implicit gradient is differentiable once; second derivatives through it "
                           "are not supported.")

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], config: _Config, *tensors: Tensor) -> tuple[Any, Any]:
        return _one_at_a_time(_ImplicitVJP, info, (config,), tensors, in_dims[1:])


def _one_at_a_time(fn: Any, info: Any, leading: tuple[Any, ...], tensors: tuple[Tensor, ...], dims: tuple[Any, ...]
                   ) -> tuple[Any, Any]:
    """A ``vmap`` rule: ``fn(*leading, *slice)`` for each slice of the batched ``tensors`` (batched along ``dims``,
    None: not batched), outputs stacked along a new dimension 0."""
    outputs = []
    for b in range(info.batch_size):
        one = [t if d is None else t.select(d, b) for t, d in zip(tensors, dims)]
        outputs.append(fn.apply(*leading, *one))
    stacked = tuple(torch.stack([o[i] for o in outputs]) for i in range(len(outputs[0])))
    return stacked, tuple(0 for _ in stacked)


# ----- the pieces ----------------------------------------------------------------------------------------------------
def _as_params(leaves: tuple[Tensor, ...] | list[Tensor]) -> dict[str, Tensor]:
    return {str(i): leaf for i, leaf in enumerate(leaves)}


def _residual(config: _Config, x: dict[str, Tensor], theta: list[Tensor]) -> dict[str, Tensor]:
    """F(x, θ) as a dict of tensors shaped like x (checked)."""
    x_tree = pytree.tree_unflatten([x[str(i)] for i in range(len(x))], config.x_spec)
    value = config.optimality_fn(x_tree, *pytree.tree_unflatten(theta, config.theta_spec))
    leaves, spec = pytree.tree_flatten(value)
    if spec != config.x_spec or any(not isinstance(v, Tensor) or v.shape != x[str(i)].shape for i, v in enumerate(leaves)):
        got = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in leaves]
        want = [tuple(x[str(i)].shape) for i in range(len(x))]
        raise BilevelError(
            f"custom_root: optimality_fn(x, *theta) must return the structure and shapes of x ({want}), got {got}."
        )
    return _as_params(leaves)


def _check_solution(config: _Config, x_leaves: list[Tensor], theta_leaves: list[Tensor], init: Any) -> None:
    """Refuse an x that does not satisfy F(x, θ) = 0, and a θ that F does not depend on (its gradient would be a
    silent zero)."""
    theta = [t.detach().requires_grad_(True) for t in theta_leaves]
    with torch.enable_grad():
        residual = _residual(config, _as_params(x_leaves), theta)
        size = float(tree.norm(tree.detach(residual)))
        total = sum(v.sum() for v in residual.values())
        grads = torch.autograd.grad(total, theta, allow_unused=True) if total.requires_grad else [None] * len(theta)
    init_leaves, init_spec = pytree.tree_flatten(init)
    if init_spec == config.x_spec and all(isinstance(v, Tensor) for v in init_leaves):
        with torch.no_grad():
            reference = float(tree.norm(_residual(config, _as_params(init_leaves), [t.detach() for t in theta_leaves])))
        against = "F(init, θ)"
    else:
        reference = float(tree.norm(_as_params(x_leaves)))
        against = "x"
    if not math.isfinite(size) or size > config.residual_tol * max(1.0, reference):
        raise BilevelError(
            f"custom_root: the solver's output does not satisfy the optimality condition: ‖F(x, θ)‖ = {size:.3g}, "
            f"above residual_tol·max(1, ‖{against}‖) = {config.residual_tol * max(1.0, reference):.3g}. The implicit "
            "gradient is the gradient of a solution: solve more accurately (more iterations, a tighter tolerance), "
            "check that optimality_fn describes what the solver solves, or raise residual_tol."
        )
    unused = [i for i, g in enumerate(grads) if g is None]
    if unused:
        raise BilevelError(
            f"custom_root: optimality_fn does not depend on theta leaf/leaves {unused}, so the implicit gradient with "
            "respect to them would be zero whatever the solver does with them; pass them to optimality_fn as they "
            "enter the problem, or keep them out of theta."
        )


def _solve_transposed(config: _Config, x: dict[str, Tensor], theta: list[Tensor], x_bar: dict[str, Tensor]
                      ) -> dict[str, Tensor]:
    """w with (∂_x F)ᵀ w = x̄, matrix-free (Aᵀ w: a VJP of F; A v: a JVP)."""
    def f(z: dict[str, Tensor]) -> dict[str, Tensor]:
        return _residual(config, z, theta)

    _, pullback = vjp(f, x)

    def a_t(w: dict[str, Tensor]) -> dict[str, Tensor]:
        return pullback(w)[0]

    def a(v: dict[str, Tensor]) -> dict[str, Tensor]:
        return jvp(f, (x,), (v,))[1]

    if config.solve == "exact":
        result = exact(a_t, x_bar, symmetric=False)
    elif config.solve == "cg":
        result = cg(a_t, x_bar, maxiter=config.maxiter, rtol=config.rtol)
    elif config.solve == "minres":
        result = minres(a_t, x_bar, maxiter=config.maxiter, rtol=config.rtol)
    else:  # normal equations: A Aᵀ w = A x̄ (A Aᵀ is symmetric positive definite for invertible A)
        result = cg(lambda w: a(a_t(w)), a(x_bar), maxiter=config.maxiter, rtol=config.rtol)
    residual = float(tree.norm(tree.sub(a_t(result.x), x_bar))) / max(float(tree.norm(x_bar)), 1e-300)
    if residual > max(1e-3, 10 * config.rtol):  # missed its own target by far
        warnings.warn(BilevelWarning(
            f"custom_root: the backward linear solve ({config.solve}) stopped at a relative residual {residual:.2g} "
            f"after {result.iterations} products: raise maxiter, or use solve='exact' for small x (a singular ∂_x F "
            "has no implicit gradient)."
        ), stacklevel=3)
    return result.x
