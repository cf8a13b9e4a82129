"""Solving the inner problem to high accuracy (references, finite differences, warm starts)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bilevel import tree
from bilevel.errors import BilevelError
from bilevel.linsolve import cg
from bilevel.oracles import Linearization
from bilevel.problem import Problem
from bilevel.types import Batch, Params


def solve_inner(
    problem: Problem,
    outer: Params,
    inner: Params,
    batch: Batch,
    *,
    buffers: Params | None = None,
    maxiter: int = 500,
    gtol: float = 1e-10,
    newton_steps: int = 3,
) -> Params:
    r"""w*(λ) = argmin_w L_T(λ, w; batch), by :func:`minimize` from ``inner`` (full batch)."""
    return minimize(lambda lam, w: problem.inner_objective(lam, w, batch, buffers), outer, inner,
                    maxiter=maxiter, gtol=gtol, newton_steps=newton_steps, what="solve_inner")


def minimize(
    fn: Callable[[Params, Params], torch.Tensor],
    outer: Params,
    inner: Params,
    *,
    maxiter: int = 500,
    gtol: float = 1e-10,
    newton_steps: int = 3,
    what: str = "minimize",
) -> Params:
    r"""argmin_w fn(λ, w) by L-BFGS with strong-Wolfe line search from ``inner``, then ``newton_steps`` Newton–CG
    polishing steps w ← w − H⁻¹∇_w fn (HVPs by the oracle layer's :class:`~bilevel.oracles.Linearization`).

    For smooth strongly convex problems in float64 this reaches ‖∇_w fn‖ near machine precision; raises if the
    gradient norm stays above √gtol (no accurate solution: the finite differences built on it would be noise).
    """
    outer = tree.detach(outer)
    w = {k: v.detach().clone().requires_grad_(True) for k, v in inner.items()}
    leaves = list(w.values())
    opt = torch.optim.LBFGS(leaves, lr=1, max_iter=maxiter, tolerance_grad=gtol, tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = fn(outer, w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = tree.detach(w)
    for _ in range(newton_steps):
        lin = Linearization.of(fn, outer, w)
        try:
            step = cg(lin.hvp, tree.detach(lin.grad), maxiter=100, rtol=1e-12).x
        except BilevelError:  # not locally convex: keep the L-BFGS point
            break
        w = tree.sub(w, step)
    g_norm = float(tree.norm(tree.detach(Linearization.of(fn, outer, w).grad)))
    if not g_norm <= max(gtol**0.5, 1e-5):
        raise BilevelError(
            f"{what}: L-BFGS stopped with |grad| = {g_norm:.3g} after {maxiter} iterations; the inner problem "
            "may be non-smooth, unbounded or badly conditioned. Raise maxiter or use float64."
        )
    return tree.detach(w)
