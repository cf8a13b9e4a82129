"""solve(): convergence to a grid-search optimum, history and oracle counts, callbacks, seeds, resuming."""

import math

import pytest
import torch

import bilevel
from bilevel import Problem, solve
from bilevel.problems.ridge import ridge_data


def scalar_ridge(dtype=torch.float64):
    """Ridge with one shared log-penalty λ: F(λ) = ½‖X_v w*(λ) − y_v‖², w*(λ) = (X_tᵀX_t + e^λ I)⁻¹X_tᵀy_t."""
    (xt, yt), (xv, yv) = ridge_data(n_train=30, n_val=30, dim=10, noise=1.0, seed=3, dtype=dtype)

    def response(lam: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(xt.T @ xt + lam.exp() * torch.eye(10, dtype=dtype), xt.T @ yt)

    problem = Problem(
        outer=torch.zeros(1, dtype=dtype, requires_grad=True), inner=torch.zeros(10, dtype=dtype),
        inner_loss=lambda lam, w, b: 0.5 * ((b[0] @ w - b[1]) ** 2).sum() + 0.5 * lam.exp() * (w**2).sum(),
        outer_loss=lambda lam, w, b: 0.5 * ((b[0] @ w - b[1]) ** 2).sum(),
        inner_data=(xt, yt), outer_data=(xv, yv),
    )
    return problem, lambda lam: float(0.5 * ((xv @ response(lam) - yv) ** 2).sum())


def test_ift_reaches_the_grid_search_optimum():
    """Oracle: a 1-D grid search of the closed-form F(λ) on [−4, 6] with spacing 0.005."""
    problem, value = scalar_ridge()
    grid = torch.arange(-4.0, 6.0, 0.005, dtype=torch.float64)
    best = float(grid[torch.tensor([value(g.reshape(1)) for g in grid]).argmin()])
    assert -3.9 < best < 5.9  # an interior optimum, so the test is meaningful
    result = solve(problem, "ift", maxiter=300, inner_steps=20, inner_lr=0.01, neumann_terms=20, outer_lr=0.05)
    assert abs(float(result.outer) - best) < 0.02
    assert result.history["outer_loss"][-1] <= value(torch.tensor([best], dtype=torch.float64)) + 1e-4


def test_history_timings_and_oracle_counts():
    problem, _ = scalar_ridge()
    result = solve(problem, "ift", maxiter=4, inner_steps=3, neumann_terms=5, inner_lr=0.01)
    h = result.history
    assert h["step"] == [0.0, 1.0, 2.0, 3.0] and result.n_steps == 4 and result.stop_reason == "maxiter"
    for key in ("outer_loss", "hypergrad_norm", "inner_loss", "linsolve_residual", "step_time", "elapsed"):
        assert len(h[key]) == 4 and all(math.isfinite(v) for v in h[key])
    # per step: 3 inner gradients + 1 for the retained graph, 1 outer gradient, 5 HVPs, 1 mixed VJP; once, at the
    # first step, the curvature estimate that checks the Neumann step: 1 gradient + 20 power-iteration HVPs
    assert result.oracle_calls == {"grad_inner": 17, "grad_outer": 4, "hvp": 40, "mixed_vjp": 4}
    assert h["calls_hvp"] == [25.0, 30.0, 35.0, 40.0] and h["oracle_calls"][-1] == 65.0
    assert len(h["curvature"]) == 4 and h["curvature"][0] > 0
    assert all(b >= a for a, b in zip(h["elapsed"], h["elapsed"][1:]))


def test_callbacks_stop_and_early_stopping():
    problem, _ = scalar_ridge()
    seen = []
    result = solve(problem, "cg", maxiter=50, inner_lr=0.01, callbacks=[lambda info: seen.append(info.step) or info.step == 2])
    assert seen == [0, 1, 2] and result.stop_reason == "callback" and result.n_steps == 3
    result = solve(problem, "cg", maxiter=500, inner_lr=0.01, outer_lr=1e-6,
                   callbacks=[bilevel.EarlyStopping(patience=3, min_delta=1e-3)])
    assert result.stop_reason == "callback" and result.n_steps < 20
    result = solve(problem, "cg", maxiter=10_000, inner_lr=0.01, time_limit=0.2)
    assert result.stop_reason == "time_limit"


def test_seed_makes_stochastic_runs_reproducible_and_resume_continues():
    (xt, yt), (xv, yv) = ridge_data(n_train=200, dim=5, dtype=torch.float64)

    def sampler():
        idx = torch.randint(0, 200, (16,))
        return xt[idx], yt[idx]

    problem = Problem(
        outer=torch.zeros(5, dtype=torch.float64, requires_grad=True), inner=torch.zeros(5, dtype=torch.float64),
        inner_loss=lambda lam, w, b: 0.5 * ((b[0] @ w - b[1]) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum() / 200,
        outer_loss=lambda lam, w, b: 0.5 * ((b[0] @ w - b[1]) ** 2).mean(),
        inner_data=sampler, outer_data=(xv, yv),
    )
    a = solve(problem, "cg", maxiter=5, seed=7, inner_lr=0.05)
    b = solve(problem, "cg", maxiter=5, seed=7, inner_lr=0.05)
    c = solve(problem, "cg", maxiter=5, seed=8, inner_lr=0.05)
    assert a.history["outer_loss"] == b.history["outer_loss"] != c.history["outer_loss"]
    resumed = solve(problem, "cg", maxiter=3, seed=9, inner_lr=0.05, state=a.state)
    assert resumed.n_steps == 3 and not torch.equal(resumed.outer, a.outer)


@pytest.mark.parametrize("method", ["ift", "cg", "exact", "unrolled"])
def test_every_method_lowers_the_validation_loss(method):
    problem, value = scalar_ridge()
    options = {"inner_lr": 0.01, "outer_lr": 0.1}
    result = solve(problem, method, maxiter=40, **options)
    assert value(result.outer.reshape(1)) < value(torch.zeros(1, dtype=torch.float64)) - 1e-3


def test_solver_instance_and_available_methods():
    problem, _ = scalar_ridge()
    assert {"ift", "cg", "exact", "unrolled"} <= set(bilevel.available_methods())
    assert bilevel.solver_options("ift")["neumann_terms"] == 5
    result = solve(problem, bilevel.solvers.CG(inner_lr=0.01), maxiter=2)
    assert result.method == "cg" and result.n_steps == 2


def test_hypergrad_tol_stops_at_the_first_step_below_it():
    """``hypergrad_tol`` ends the run after the first step whose ``hypergrad_norm`` is ≤ tol, not before, with
    ``stop_reason == "hypergrad_tol"``. Oracle: a run without it in the same test (full batch, so the same steps):
    from step 3 on plain SGD on λ shrinks the norm ~2.3× per step (0.1, 0.046, 0.0195, 0.0086, 0.0038, ...), and the
    tol is the geometric mean of step 8's norm and the smallest before it, about 1.5× from either."""
    problem, _ = scalar_ridge()
    options = {"inner_steps": 50, "inner_lr": 0.01, "outer_optimizer": "sgd", "outer_lr": 1.0}
    reference = solve(problem, "cg", maxiter=12, **options).history["hypergrad_norm"]
    k = 8
    assert min(reference[:k]) > 2 * reference[k]  # the reference leaves room on both sides of the tol
    tol = math.sqrt(min(reference[:k]) * reference[k])

    result = solve(problem, "cg", maxiter=50, hypergrad_tol=tol, **options)
    assert result.stop_reason == "hypergrad_tol" and result.n_steps == k + 1
    norms = result.history["hypergrad_norm"]
    assert norms == pytest.approx(reference[: k + 1], rel=1e-9)
    assert norms[-1] <= tol < min(norms[:-1])

    never = solve(problem, "cg", maxiter=5, hypergrad_tol=1e-3 * min(reference[:5]), **options)
    assert never.stop_reason == "maxiter" and never.n_steps == 5
