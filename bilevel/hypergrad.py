r"""Hypergradient rules: pure functions of the problem, the point and a linear solver.

Implicit (IFT), at an inner solution w* with ∇_w L_T(λ, w*) = 0:

.. math::
    \frac{dF}{d\lambda} = \partial_\lambda L_V - (\partial^2_{w\lambda} L_T)^\top H^{-1} \partial_w L_V,
    \qquad H = \partial^2_{ww} L_T,

costing one outer gradient, one inner gradient kept as a graph, ``k`` Hessian-vector products (the linear
solver's matvecs) and one mixed VJP — about ``2 + k`` gradient-equivalents with double backward.

Unrolled (Franceschi et al., 2017/2018, "Forward and Reverse Gradient-Based Hyperparameter Optimization"):
reverse-mode through T inner optimizer steps w_t = Φ(w_{t−1}, λ); O(T) time and O(T·P) memory.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bilevel import oracles, tree
from bilevel.errors import BilevelError
from bilevel.linsolve import LinSolveResult, cg
from bilevel.optim import Optimizer
from bilevel.problem import Problem, check_finite
from bilevel.types import Batch, Params


@dataclasses.dataclass(frozen=True)
class Hypergradient:
    """dF/dλ with what was computed on the way.

    Attributes:
        hypergrad: dF/dλ, same names and shapes as the outer variables.
        outer_loss: L_V at the point used (0-d, detached).
        linsolve: the inverse-HVP solve (implicit rules) or None.
        inner: the inner variables at the end of the rule (unrolled: after the T steps), detached.
        buffers: buffers after the rule (unrolled: running statistics after the T steps).
        details: numbers a rule used that a reader needs to judge the result (e.g. F2SA's ``penalty``).
    """

    hypergrad: Params
    outer_loss: Tensor
    linsolve: LinSolveResult | None = None
    inner: Params | None = None
    buffers: Params | None = None
    details: dict[str, float] = dataclasses.field(default_factory=dict)


class _HessianOperator:
    """w ↦ ∇²_ww L_T w, with a ``batched`` variant for a leading batch dimension (used by ``exact``)."""

    def __init__(self, lin: oracles.Linearization):
        self._lin = lin

    def __call__(self, v: Params) -> Params:
        return self._lin.hvp(v)

    def batched(self, v: Params) -> Params:
        return self._lin.hvp(v, batched=True)


class _LowPrecisionHessian:
    """w ↦ ∇²_ww L_T w computed in a lower precision (v rounded down, the product cast back up).

    ``precise`` is the working-precision operator: :func:`~bilevel.linsolve.cg` corrects its residual with it
    (reliable updates); ``neumann`` and ``exact`` use it instead of the cheap product.
    """

    def __init__(self, low: oracles.Linearization, precise: _HessianOperator, low_dtype: torch.dtype):
        self._low, self.precise, self._low_dtype = low, precise, low_dtype
        self.batched = precise.batched

    def __call__(self, v: Params) -> Params:
        product = self._low.hvp(tree.cast(v, self._low_dtype))
        return {k: product[k].to(v[k].dtype) for k in v}


def _hessian_operator(
    problem: Problem, outer: Params, inner: Params, batch: Batch, buffers: Params | None, hvp_dtype: torch.dtype | None,
) -> tuple[oracles.Linearization, _HessianOperator | _LowPrecisionHessian]:
    """The working-precision linearization and the operator handed to the linear solver."""
    lin = oracles.Linearization(problem, outer, inner, batch, buffers)
    working = tree.floating_dtype(inner)
    if hvp_dtype is None or hvp_dtype == working:
        return lin, _HessianOperator(lin)
    if not hvp_dtype.is_floating_point or torch.finfo(hvp_dtype).bits >= torch.finfo(working).bits:
        raise BilevelError(
            f"hvp_dtype={hvp_dtype} must be a floating type of lower precision than the inner variables' {working}."
        )
    try:
        low = oracles.Linearization(
            problem, tree.cast(outer, hvp_dtype), tree.cast(inner, hvp_dtype), tree.cast_batch(batch, hvp_dtype),
            None if buffers is None else tree.cast(buffers, hvp_dtype),
        )
    except RuntimeError as err:
        raise BilevelError(
            f"hvp_dtype={hvp_dtype}: the inner loss failed with its variables and data cast to {hvp_dtype} ({err}). "
            "Data held in other containers than tensors, tuples, lists or dicts is not cast; drop hvp_dtype or "
            "make the loss cast its inputs."
        ) from err
    return lin, _LowPrecisionHessian(low, _HessianOperator(lin), hvp_dtype)


def implicit_hypergrad(
    problem: Problem,
    outer: Params,
    inner: Params,
    *,
    inner_batch: Batch,
    outer_batch: Batch,
    buffers: Params | None = None,
    solve: Callable[..., LinSolveResult] | None = None,
    x0: Params | None = None,
    hvp_dtype: torch.dtype | None = None,
) -> Hypergradient:
    r"""Implicit-function-theorem hypergradient at (λ, w), w assumed (near) optimal for L_T(λ, ·).

    ``solve(matvec, b, [x0=...]) -> LinSolveResult`` approximates H⁻¹b; pass ``functools.partial(neumann,
    alpha=..., maxiter=...)``, ``functools.partial(cg, ...)`` or :func:`bilevel.linsolve.exact`. ``x0`` warm-starts
    solvers that accept it (CG). Default: CG with ``maxiter=50``.

    ``hvp_dtype`` (e.g. ``torch.bfloat16`` for a float32 problem, ``torch.float32`` for float64) builds a second
    linearization of ∇_w L_T in that precision and hands the solver its cheaper Hessian-vector products, with
    the working-precision ones attached: :func:`~bilevel.linsolve.cg` corrects its residual with them (mixed
    precision with reliable updates), the other solvers use only the precise ones. The outer gradient and the
    mixed VJP stay in working precision. A converged solve reaches the working precision's accuracy; a truncated
    one (few iterations, residual never down tenfold) is plain low-precision CG and can move by about κ(H)·u
    (measured: 2e-8 for float32 products in a float64 ridge, 20% for bfloat16 on an ill-conditioned MLP at 10
    iterations). Costs one extra gradient in ``hvp_dtype``; pays where low-precision matrix products are fast
    (tensor cores, AMX) and dominate the hypergradient.
    """
    solve = solve or functools.partial(cg, maxiter=50)
    outer_loss, d_outer, d_inner = oracles.grad_outer(problem, outer, inner, outer_batch, buffers)
    check_finite("outer_loss", outer_loss)  # one sync; a NaN here would surface as a NaN residual inside the solve
    lin, hessian = _hessian_operator(problem, outer, inner, inner_batch, buffers, hvp_dtype)
    result = solve(hessian, d_inner) if x0 is None else solve(hessian, d_inner, x0=x0)
    indirect = lin.mixed_vjp(result.x)
    return Hypergradient(
        hypergrad=tree.sub(d_outer, indirect),
        outer_loss=outer_loss.detach(),
        linsolve=result,
        inner=inner,
        buffers=buffers,
    )


def unrolled_hypergrad(
    problem: Problem,
    outer: Params,
    inner: Params,
    *,
    inner_batches: Sequence[Batch],
    outer_batch: Batch,
    optimizer: Optimizer,
    buffers: Params | None = None,
    first_order: bool = False,
) -> Hypergradient:
    r"""Reverse-mode hypergradient through ``len(inner_batches)`` steps of ``optimizer`` on L_T, started at ``inner``.

    .. math::
        w_0 = w,\ w_t = P(\Phi(w_{t-1}, \nabla_w L_T(\lambda, w_{t-1}; B_t))),\quad
        \frac{dF}{d\lambda} = \frac{d}{d\lambda} L_V(\lambda, w_T).

    P is the problem's ``inner_projection`` (the identity without one), differentiated through like every step.
    ``first_order=True`` drops the second-order terms (the inner gradients are treated as constants of λ, as in
    first-order MAML): the result is then only ∂_λ L_V plus whatever λ reaches through Φ directly.
    """
    lam = {k: v.detach().requires_grad_(True) for k, v in outer.items()}
    w = {k: v.detach().requires_grad_(True) for k, v in inner.items()}
    state = optimizer.init(w)
    for batch in inner_batches:
        _, g, buffers = oracles.differentiable_grad_inner(
            problem, lam, w, batch, buffers, create_graph=not first_order
        )
        w, state = optimizer.update(w, g, state)
        w = problem.project_inner(w)  # differentiated through (the identity without inner_projection)
    outer_loss = problem.outer_objective(lam, w, outer_batch, buffers)
    hypergrad = oracles.backprop(outer_loss, lam)
    return Hypergradient(
        hypergrad=hypergrad, outer_loss=outer_loss.detach(), inner=tree.detach(w), buffers=buffers
    )
