r"""``check_hypergradient``: compare a method's hypergradient with central finite differences on the user's problem."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from bilevel import tree
from bilevel.data import DataStreams
from bilevel.errors import BilevelError
from bilevel.inner import solve_inner
from bilevel.problem import Problem
from bilevel.registry import make_solver
from bilevel.types import Params


@dataclasses.dataclass(frozen=True)
class HypergradCheck:
    """Directional derivatives ⟨dF/dλ, d⟩ from the method (``analytic``) and from central differences
    (``numeric``) along ``n_directions`` random unit directions, and their worst relative error."""

    analytic: list[float]
    numeric: list[float]
    rel_error: float
    hypergrad: Params

    def __str__(self) -> str:
        pairs = ", ".join(f"{a:.6g} vs {n:.6g}" for a, n in zip(self.analytic, self.numeric))
        return f"HypergradCheck(rel_error={self.rel_error:.3g}; analytic vs finite difference: {pairs})"


def check_hypergradient(
    problem: Problem,
    method: str | Any = "cg",
    *,
    outer: Params | None = None,
    eps: float = 1e-4,
    n_directions: int = 3,
    seed: int = 0,
    inner_maxiter: int = 500,
    **options: Any,
) -> HypergradCheck:
    r"""Check ``method``'s hypergradient at ``outer`` (default: the problem's initial λ) against

    .. math:: \frac{F(\lambda + \epsilon d) - F(\lambda - \epsilon d)}{2\epsilon},\quad
              F(\lambda) = L_V(\lambda, w(\lambda)),

    where w(λ) is what the method differentiates: the exact inner solution (L-BFGS, full batch) for implicit
    methods, and the same T unrolled steps from the problem's initial w for ``unrolled``. Needs full-batch data.
    Use float64: in float32 the central difference itself is only accurate to ~1e-3.
    """
    solver = make_solver(method, **options)
    data = DataStreams(problem.inner_data, problem.outer_data)
    if data.stochastic:
        raise BilevelError("check_hypergradient: needs full-batch inner_data and outer_data (fixed tensors or tuples).")
    lam = tree.clone(problem.outer_init if outer is None else outer)
    unrolled = hasattr(solver, "inner_optimizer") and callable(solver.inner_optimizer)

    def response(at: Params) -> tuple[Params, Params]:
        if unrolled:
            hg = solver.hypergradient(problem, at, problem.inner_init, data, problem.buffers_init)
            return hg.inner, hg.buffers or problem.buffers_init
        w = solve_inner(problem, at, problem.inner_init, data.inner(), maxiter=inner_maxiter)
        return w, problem.buffers_init

    def value(at: Params) -> float:
        w, buffers = response(at)
        with torch.no_grad():
            return float(problem.outer_objective(at, w, data.outer(), buffers))

    if unrolled:
        hypergrad = solver.hypergradient(problem, lam, problem.inner_init, data, problem.buffers_init).hypergrad
    else:
        w_star, buffers = response(lam)
        hypergrad = solver.hypergradient(problem, lam, w_star, data, buffers).hypergrad
    gen = torch.Generator().manual_seed(seed)
    analytic, numeric = [], []
    for _ in range(n_directions):
        d = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device) for k, v in lam.items()}
        d = tree.scale(d, 1.0 / tree.norm(d))
        plus, minus = value(tree.axpy(eps, d, lam)), value(tree.axpy(-eps, d, lam))
        numeric.append((plus - minus) / (2 * eps))
        analytic.append(float(tree.dot(hypergrad, d)))
    scale = max(max(abs(x) for x in numeric), 1e-12)
    rel = max(abs(a - n) for a, n in zip(analytic, numeric)) / scale
    return HypergradCheck(analytic=analytic, numeric=numeric, rel_error=rel, hypergrad=hypergrad)
