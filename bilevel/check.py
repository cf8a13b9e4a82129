r"""A method's hypergradient at a point (:func:`hypergradient`) and its check against central finite differences
(:func:`check_hypergradient`), on the user's own problem.

What is differentiated depends on the method (its ``differentiates`` attribute):

* ``"solution"`` (``ift``, ``cg``, ``minres``, ``exact``): F(λ) = L_V(λ, w*(λ)), w* solved to tolerance;
* ``"penalty"`` (``f2sa``): the same F, estimated through the penalty function, O(1/penalty) from dF/dλ;
* ``"unrolled"`` (``unrolled``): F(λ) = L_V(λ, w_T(λ)), T inner steps from the problem's initial w;
* ``"adapted"`` (``maml``): the mean query loss after each task's T adaptation steps from θ;
* ``"proximal"`` (``imaml``): the mean query loss at each task's proximal solution argmin L_T + λ/2‖φ − θ‖².

``lvhba`` and ``stn`` compute no hypergradient of F at a point; they are refused with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from bilevel import tree
from bilevel.data import DataStreams
from bilevel.errors import BilevelError
from bilevel.hypergrad import Hypergradient
from bilevel.inner import solve_inner
from bilevel.options import PositiveFloat, PositiveInt, Seed, check_arguments, owner_name
from bilevel.problem import Problem
from bilevel.registry import check_problem_inputs, make_solver
from bilevel.types import Params


@dataclasses.dataclass(frozen=True)
class HypergradCheck:
    """Directional derivatives ⟨dF/dλ, d⟩ from the method (``analytic``) and from central differences
    (``numeric``) along ``n_directions`` random unit directions, their worst relative error, the step ``eps`` used
    and a ``note`` on what the method estimates (e.g. F2SA's penalty bias)."""

    analytic: list[float]
    numeric: list[float]
    rel_error: float
    hypergrad: Params
    eps: float = 0.0
    note: str = ""

    def __str__(self) -> str:
        pairs = ", ".join(f"{a:.6g} vs {n:.6g}" for a, n in zip(self.analytic, self.numeric))
        note = f"; {self.note}" if self.note else ""
        return f"HypergradCheck(rel_error={self.rel_error:.3g}; analytic vs finite difference: {pairs}{note})"


def hypergradient(
    problem: Problem, method: str | Any = "cg", *, outer: Any = None, inner: Any = None, inner_maxiter: PositiveInt = 500,
    **options: Any,
) -> Hypergradient:
    r"""``method``'s hypergradient dF/dλ at ``outer`` (default: the problem's initial λ), in the user's form.

    ``inner`` is the inner point to use: for the implicit methods and ``f2sa`` the inner solution (solved to
    tolerance by L-BFGS + Newton–CG on the full batch when None), for ``unrolled`` the start of the T steps
    (default: the problem's initial w); meta-learning methods adapt every task from θ themselves. Draws one batch
    from each data stream. The result's ``hypergrad`` has the form of ``problem.outer`` (a tensor or a dict) and
    ``inner`` that of ``problem.inner``.
    """
    check_arguments("hypergradient", hypergradient, {"inner_maxiter": inner_maxiter})
    _check_problem("hypergradient", problem)
    solver = make_solver(method, **options)
    kind = _kind(solver)
    _check_inputs("hypergradient", solver, kind, problem)
    data = DataStreams(problem.inner_data, problem.outer_data)
    lam = problem.outer_params(outer) if outer is not None else tree.clone(problem.outer_init)
    w = None if inner is None else problem.inner_params(inner)
    hg = _hypergradient(problem, solver, kind, data, lam, w, inner_maxiter)
    return dataclasses.replace(
        hg, hypergrad=problem.outer_to_user(hg.hypergrad),
        inner=None if hg.inner is None else problem.inner_to_user(hg.inner),
    )


def check_hypergradient(
    problem: Problem,
    method: str | Any = "cg",
    *,
    outer: Any = None,
    eps: PositiveFloat | None = None,
    n_directions: PositiveInt = 3,
    seed: Seed = 0,
    inner_maxiter: PositiveInt = 500,
    **options: Any,
) -> HypergradCheck:
    r"""Check ``method``'s hypergradient at ``outer`` (default: the problem's initial λ) against

    .. math:: \frac{F(\lambda + \epsilon d) - F(\lambda - \epsilon d)}{2\epsilon}

    along ``n_directions`` random unit directions d, with F what the method differentiates (module docstring).
    Needs full-batch data (the same F at every evaluation); meta-learning methods use one meta-batch drawn from
    each stream. ``eps`` defaults to u^{1/3}·max(1, ‖λ‖_∞) (u the
    unit roundoff of λ's dtype), which balances the difference's truncation and rounding errors: about 1e-10
    relative in float64, 1e-4 in float32 on smooth problems (use float64 to check to 1e-6).
    """
    check_arguments("check_hypergradient", check_hypergradient,
                    {"eps": eps, "n_directions": n_directions, "seed": seed, "inner_maxiter": inner_maxiter})
    _check_problem("check_hypergradient", problem)
    solver = make_solver(method, **options)
    kind = _kind(solver)
    _check_inputs("check_hypergradient", solver, kind, problem)
    data = DataStreams(problem.inner_data, problem.outer_data)
    if kind in ("adapted", "proximal"):  # one meta-batch, drawn once, for every evaluation
        data = DataStreams(data.inner(), data.outer())
    elif data.stochastic:
        raise BilevelError(
            "check_hypergradient: needs full-batch inner_data and outer_data (fixed tensors or tuples), so that every "
            "evaluation of F sees the same data; pass one fixed batch of each."
        )
    lam = problem.outer_params(outer) if outer is not None else tree.clone(problem.outer_init)
    value = _objective(solver, kind, problem, data, inner_maxiter)
    hg = _hypergradient(problem, solver, kind, data, lam, None, inner_maxiter)
    hypergrad = hg.hypergrad
    if eps is None:
        scale = max(1.0, max(float(v.abs().max()) for v in lam.values()))
        eps = torch.finfo(tree.floating_dtype(lam)).eps ** (1 / 3) * scale
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
    note = ""
    if kind == "penalty":
        lam_pen = hg.details["penalty"]
        note = (f"{owner_name(solver)} estimates the gradient of its penalty function at penalty {lam_pen:g}, which "
                f"differs from dF/dλ by O(1/penalty); raise penalty0 to see the gap shrink")
    elif getattr(solver, "first_order", False):
        note = (f"{owner_name(solver)} with first_order=True drops the second-order terms: an approximation of the "
                "derivative checked here, not equal to it")
    return HypergradCheck(analytic=analytic, numeric=numeric, rel_error=rel, hypergrad=problem.outer_to_user(hypergrad),
                          eps=eps, note=note)


def _hypergradient(problem: Problem, solver: Any, kind: str, data: DataStreams, lam: Params, inner: Params | None,
                   inner_maxiter: int) -> Hypergradient:
    buffers = problem.buffers_init
    if kind in ("adapted", "proximal"):
        return solver.meta_gradient(problem, lam, data.inner(), data.outer())
    if inner is None and kind == "unrolled":
        inner = problem.inner_init
    elif inner is None:
        batch = data.inner()
        inner = problem.run_inner_solver(lam, problem.inner_init, batch) if problem.inner_solver is not None else \
            solve_inner(problem, lam, problem.inner_init, batch, buffers=buffers, maxiter=inner_maxiter)
        data = DataStreams(batch, data.outer())  # the hypergradient at the batch w* solves
    return solver.hypergradient(problem, lam, inner, data, buffers)


def _check_problem(owner: str, problem: Any) -> None:
    if not isinstance(problem, Problem):
        raise BilevelError(f"{owner}: problem must be a bilevel.Problem, got {type(problem).__name__}.")


def _check_inputs(owner: str, solver: Any, kind: str, problem: Problem) -> None:
    """Refuse problem inputs the method, or the reference F it is checked against, would ignore."""
    check_problem_inputs(owner_name(solver), solver, problem, owner)
    if problem.inner_projection is not None and kind in ("solution", "penalty"):
        raise BilevelError(
            f"{owner}: the exact inner solution w*(λ) that {owner_name(solver)}'s hypergradient assumes is unconstrained, "
            "so it would ignore Problem(inner_projection=...); check with method='unrolled' (which differentiates "
            "through the projection) or drop inner_projection."
        )


def _kind(solver: Any) -> str:
    kind = getattr(solver, "differentiates", None)
    if kind is None:
        reason = getattr(solver, "no_hypergradient", "") or "it has no hypergradient rule to check"
        raise BilevelError(
            f"check_hypergradient: {reason}; check the problem's hypergradient with method='cg' (or 'exact') instead."
        )
    return kind


def _objective(solver: Any, kind: str, problem: Problem, data: DataStreams, inner_maxiter: int) -> Callable[[Params], float]:
    """F(λ) as the method differentiates it."""
    inner_batch, outer_batch = data.inner(), data.outer()
    buffers = problem.buffers_init

    def value(at: Params) -> float:
        if kind in ("adapted", "proximal"):
            n_steps = solver.inner_steps if kind == "adapted" else inner_maxiter
            with torch.no_grad():
                return float(solver.evaluate(problem, at, inner_batch, outer_batch, n_steps=n_steps).mean())
        if kind == "unrolled":
            fixed = DataStreams(inner_batch, outer_batch)
            hg = solver.hypergradient(problem, at, problem.inner_init, fixed, buffers)
            w, after = hg.inner, hg.buffers or buffers
        else:
            w = solve_inner(problem, at, problem.inner_init, inner_batch, buffers=buffers, maxiter=inner_maxiter)
            after = buffers
        with torch.no_grad():
            return float(problem.outer_objective(at, w, outer_batch, after))

    return value
