"""MINRES for symmetric indefinite systems (Paige & Saunders 1975).

Oracles: dense LU (``torch.linalg.solve``) on random symmetric indefinite and SPD systems, the true residual
‖b − Ax‖ for the recursive one, CG on SPD systems, the ridge closed form, and the dense ``exact`` solve on a
small network whose inner Hessian is indefinite (where ``cg`` refuses to run).
"""

import functools

import pytest
import torch
from test_hypergrad import rel_err, ridge_setup
from test_linsolve import spd_system, symmetric_system

import bilevel
from bilevel import BilevelError, tree
from bilevel.hypergrad import implicit_hypergrad
from bilevel.linsolve import cg, exact, minres
from bilevel.problems.ridge import ridge_hypergrad


def indefinite_system(n: int = 60, n_negative: int = 15, seed: int = 0):
    """(A, b, Params b, matvec): eigenvalues −3..−0.1 (n_negative of them) and 0.1..10, as Params of two tensors."""
    eig = torch.cat([-torch.logspace(-1, 0.5, n_negative, dtype=torch.float64),
                     torch.logspace(-1, 1, n - n_negative, dtype=torch.float64)])
    return symmetric_system(eig, u_shape=(4, 5), seed=seed)


def test_minres_solves_indefinite_systems_with_exact_residuals():
    """Dense LU to 1e-10; the recursive residual equals the true ‖b − Ax‖/‖b‖ to 1e-12 at every K and never grows."""
    a, b, params, matvec = indefinite_system()
    result = minres(matvec, params, rtol=1e-12, maxiter=500)
    assert rel_err(tree.flatten(result.x), torch.linalg.solve(a, b)) <= 1e-10
    previous = float("inf")
    for k in range(1, 25):
        r = minres(matvec, params, rtol=0.0, maxiter=k)
        true = float(torch.linalg.vector_norm(b - a @ tree.flatten(r.x)) / b.norm())
        assert abs(float(r.residual) - true) <= 1e-12
        assert true <= previous + 1e-14
        previous = true


def test_minres_matches_cg_on_spd_and_warm_starts():
    a, b, params, matvec = spd_system(n=200, cond=50.0)
    reference = torch.linalg.solve(a, b)
    for x in (minres(matvec, params, rtol=1e-12, maxiter=200).x, cg(matvec, params, rtol=1e-12, maxiter=200).x):
        assert rel_err(tree.flatten(x), reference) <= 1e-10
    x0 = tree.unflatten(reference + 1e-3 * torch.ones_like(reference), params)
    cold = minres(matvec, params, rtol=1e-10, maxiter=200)
    warm = minres(matvec, params, x0=x0, rtol=1e-10, maxiter=200)
    assert rel_err(tree.flatten(warm.x), reference) <= 1e-9
    assert warm.iterations < cold.iterations  # with the extra product for the initial residual: 54 against 65


def test_minres_hypergradient_matches_ridge_closed_form():
    problem, train, val, lam, w = ridge_setup(torch.float64)
    hg = implicit_hypergrad(problem, lam, w, inner_batch=train, outer_batch=val,
                            solve=functools.partial(minres, maxiter=50, rtol=1e-12))
    assert rel_err(hg.hypergrad["value"], ridge_hypergrad(train, val, lam["value"])) <= 1e-6


def _indefinite_network_problem():
    """A 6-8-1 tanh network at its (random) initial weights: its inner Hessian is indefinite (checked below)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(40, 1, generator=gen, dtype=torch.float64)
    lam = {k: torch.full_like(p, -3.0).requires_grad_(True) for k, p in module.named_parameters()}

    def inner_loss(lam_, view, batch):
        xb, yb = batch
        return ((view(xb) - yb) ** 2).mean() + 0.5 * sum((lam_[k].exp() * view[k] ** 2).sum() for k in lam_)

    def outer_loss(lam_, view, batch):
        xb, yb = batch
        return ((view(xb) - yb) ** 2).mean()

    return bilevel.Problem(outer=lam, inner=module, inner_loss=inner_loss, outer_loss=outer_loss,
                           inner_data=(x[:30], y[:30]), outer_data=(x[30:], y[30:]))


def test_minres_hypergradient_on_an_indefinite_hessian_matches_the_dense_solve():
    """Where CG refuses (negative curvature), MINRES converges to the dense solve's hypergradient to 1e-8."""
    problem = _indefinite_network_problem()
    outer, inner = dict(problem.outer_init), dict(problem.inner_init)
    batch, val = problem.inner_data, problem.outer_data
    reference = implicit_hypergrad(problem, outer, inner, inner_batch=batch, outer_batch=val, solve=exact)
    assert float(reference.linsolve.residual) < 1e-10
    with pytest.raises(BilevelError, match="non-positive curvature"):
        implicit_hypergrad(problem, outer, inner, inner_batch=batch, outer_batch=val,
                           solve=functools.partial(cg, maxiter=200, rtol=1e-12))
    hg = implicit_hypergrad(problem, outer, inner, inner_batch=batch, outer_batch=val,
                            solve=functools.partial(minres, maxiter=400, rtol=1e-13))
    assert rel_err(tree.flatten(hg.hypergrad), tree.flatten(reference.hypergrad)) <= 1e-8


def test_solve_minres_follows_cg_on_a_convex_problem():
    """Ten outer steps of method="minres" on the ridge stay within 1e-7 of method="cg" (both solve to 1e-10)."""
    problem, *_ = ridge_setup(torch.float64)
    runs = [bilevel.solve(problem, method, maxiter=10, seed=0, inner_steps=50, inner_lr=0.01, cg_rtol=1e-10)
            for method in ("cg", "minres")]
    assert rel_err(runs[1].outer, runs[0].outer) <= 1e-7


def test_minres_errors():
    _, _, params, matvec = indefinite_system()
    with pytest.raises(BilevelError, match="maxiter must be >= 0"):
        minres(matvec, params, maxiter=-1)
    with pytest.raises(BilevelError, match="not finite"):
        minres(lambda p: tree.scale(p, float("nan")), params)
    with pytest.raises(BilevelError, match="has no option"):
        bilevel.solve(ridge_setup(torch.float64)[0], "minres", maxiter=1, linsolve="cg")
