"""What the ``cg`` solver carries from one outer step to the next: the warm start (``state.v``, the previous
inverse-HVP solution, as the next solve's x0) and the recycled curvature pairs (``state.pairs``, the next solve's
L-BFGS preconditioner).

Oracles: the ridge's closed-form Hessian H = X_tᵀX_t + diag(e^λ) and outer gradient X_vᵀ(X_v w − y_v) for the
residual a warm start begins with; a cold run in the same test (``warm_start=False``) for the iterations a warm start
saves; a hand-built solve (the previous state's pairs through ``lbfgs_preconditioner`` into ``implicit_hypergrad``)
for the preconditioner the solver's next solve used.
"""

import functools

import pytest
import torch
from test_hypergrad import rel_err

import bilevel
from bilevel.hypergrad import implicit_hypergrad
from bilevel.linsolve import cg
from bilevel.precondition import lbfgs_preconditioner, recycle_pairs
from bilevel.problems.ridge import ridge_data, ridge_problem, ridge_solution


@pytest.fixture(scope="module")
def ridge():
    """A per-weight ridge with 60 weights and 200 training examples (κ(H) ≈ 10: CG needs ~27 iterations to 1e-8,
    far fewer than the dimension, so what a warm start or a preconditioner saves is visible), its inner variables
    starting at w*(λ = 0) so that a few inner steps per outer step keep w near w*(λ)."""
    train, val = ridge_data(n_train=200, n_val=100, dim=60, seed=0)
    base = ridge_problem(train, val)
    lam0 = torch.zeros(60, dtype=torch.float64)
    problem = bilevel.Problem(outer=lam0.clone().requires_grad_(True), inner=ridge_solution(train, lam0),
                              inner_loss=base.inner_loss, outer_loss=base.outer_loss, inner_data=train, outer_data=val)
    return problem, train, val


INNER = {"inner_steps": 5, "inner_lr": 1 / 470}  # 1/L of L_T at λ = 0 (λ_max(X_tᵀX_t) ≈ 465)
SLOW_OUTER = {"outer_optimizer": "sgd", "outer_lr": 1e-3}  # λ moves little per step: consecutive systems are close


def _residual_from(v, lam, w, train, val):
    """‖b − H v‖ / ‖b‖ for the ridge at (λ, w), in closed form: H = X_tᵀX_t + diag(e^λ), b = X_vᵀ(X_v w − y_v)."""
    (xt, _), (xv, yv) = train, val
    h = xt.T @ xt + torch.diag(lam.exp())
    b = xv.T @ (xv @ w - yv)
    return float(torch.linalg.vector_norm(b - h @ v) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("preconditioner", [None, "lbfgs"])
def test_next_solve_starts_from_the_previous_solution(ridge, preconditioner):
    """Resume a 2-step run for one more step with ``cg_maxiter=0``: CG then returns its start unchanged. With the
    warm start that start is the previous step's solution ``state.v`` (kept bit for bit; 1 product spent on the
    initial residual, which equals the closed-form ‖b − H v‖/‖b‖ at the new point to 1e-7 relative: ~1e-11 of
    rounding in a residual 1.5e-5 of ‖b‖); with ``warm_start=False`` it is zero (residual exactly 1, no product)."""
    problem, train, val = ridge
    options = dict(INNER, **SLOW_OUTER, cg_rtol=1e-10, cg_maxiter=200, cg_preconditioner=preconditioner)
    first = bilevel.solve(problem, "cg", maxiter=2, seed=0, **options)
    v = first.state.v["value"]
    assert float(v.norm()) > 0

    warm = bilevel.solve(problem, "cg", maxiter=1, state=first.state, validate=False, **{**options, "cg_maxiter": 0})
    assert torch.equal(warm.state.v["value"], v)
    assert warm.history["linsolve_iterations"] == [1.0]
    # the step trained w, then solved at (λ before the step's update, new w): that is the system x0 = v meets
    expected = _residual_from(v, first.state.outer["value"], warm.state.inner["value"], train, val)
    assert warm.history["linsolve_residual"][0] == pytest.approx(expected, rel=1e-7)
    assert expected < 1e-3  # the previous solution is a good start (measured 1.5e-5; a cold start has residual 1)

    cold = bilevel.solve(problem, "cg", maxiter=1, state=first.state, validate=False,
                         **{**options, "cg_maxiter": 0, "warm_start": False})
    assert float(cold.state.v["value"].abs().max()) == 0.0
    assert cold.history["linsolve_iterations"] == [0.0]
    assert cold.history["linsolve_residual"] == [1.0]


def test_warm_start_saves_iterations_over_a_run_and_changes_nothing_else(ridge):
    """Ten outer steps (no preconditioner, to isolate the warm start), both runs solved to 1e-8: the warm run needs
    at most 75% of the cold run's CG iterations in the same test (measured 143 against 270: 12–13 per solve after
    the first instead of 27), and ends at the same λ (1e-6 relative; measured 6e-9)."""
    problem, *_ = ridge
    options = dict(INNER, **SLOW_OUTER, cg_rtol=1e-8, cg_maxiter=200, cg_preconditioner=None)
    warm, cold = (bilevel.solve(problem, "cg", maxiter=10, seed=0, warm_start=w, **options) for w in (True, False))
    iterations = [sum(run.history["linsolve_iterations"]) for run in (warm, cold)]
    assert iterations[0] <= 0.75 * iterations[1], iterations
    assert max(warm.history["linsolve_residual"] + cold.history["linsolve_residual"]) <= 1e-8
    assert rel_err(warm.outer, cold.outer) <= 1e-6
    assert float((cold.outer - problem.outer_init["value"]).norm()) > 1e-3  # λ moved: the runs had something to agree on


# ----- recycled curvature pairs -----------------------------------------------------------------------------------
def _tagged_pairs(tags):
    """Pairs whose s is filled with its tag (to tell them apart; y = 2s)."""
    return tuple(({"x": torch.full((2,), float(t))}, {"x": torch.full((2,), 2.0 * t)}) for t in tags)


def test_recycle_pairs_keeps_the_latest_memory_pairs_oldest_first():
    """recycle_pairs(old, new, memory) holds the pairs of (old + new)[-memory:], in BFGS update order (copied into one
    matrix: compared by value)."""
    old, new = _tagged_pairs([1, 2, 3, 4]), _tagged_pairs([5, 6, 7])

    def tags(pairs):
        return [(float(s["x"][0]), float(y["x"][0])) for s, y in pairs]

    assert tags(recycle_pairs(old, new, memory=5)) == tags(old[2:] + new) and tags(old[2:] + new)[0][0] == 3.0
    assert tags(recycle_pairs(old, new, memory=10)) == tags(old + new)
    assert tags(recycle_pairs(old, (), memory=3)) == tags(old[1:])  # a solve that recorded nothing keeps the old pairs
    assert tags(recycle_pairs((), new, memory=2)) == tags(new[1:])
    assert tags(recycle_pairs(old, new, memory=2)) == tags(new[1:])


SHORT = dict(INNER, **SLOW_OUTER, cg_maxiter=4, cg_rtol=0.0, cg_preconditioner_memory=10, warm_start=False)
"""Four CG iterations per solve (rtol 0: always four, so always four new pairs), room for ten pairs, and cold starts
(four iterations from zero are a truncated solve, whose iterate shows which preconditioner it ran with)."""


def same_pair(a, b) -> bool:
    return all(torch.equal(a[i][k], b[i][k]) for i in (0, 1) for k in a[i])


def _states(problem, steps, **options):
    """The solver state after each of ``steps`` outer steps of ``cg``."""
    states = []
    bilevel.solve(problem, "cg", maxiter=steps, seed=0, callbacks=[lambda info: states.append(info.state)], **options)
    return states


def test_state_carries_the_previous_steps_pairs_after_the_new_ones(ridge):
    """After step k the state holds (pairs after step k−1 + the 4 pairs step k's solve met)[-10:]: 4, 8, then 10
    pairs, the older ones exactly the previous state's (copied, bit for bit). The new ones are curvature pairs (s, Hs) of step
    k's system: H at (λ before the step's update, the step's trained w), in closed form, to 1e-10."""
    problem, train, _ = ridge
    states = _states(problem, 3, **SHORT)
    assert [len(s.pairs) for s in states] == [4, 8, 10]
    for previous, current in zip(states, states[1:]):
        kept = len(current.pairs) - 4
        assert kept > 0
        assert all(same_pair(a, b) for a, b in zip(current.pairs[:kept], previous.pairs[-kept:]))
    assert all(same_pair(a, b) for a, b in zip(states[2].pairs[:2], states[0].pairs[2:]))  # step 0's newest survive 2 steps
    xt = train[0]
    for k in (1, 2):
        lam = states[k - 1].outer["value"]
        h = xt.T @ xt + torch.diag(lam.exp())
        for s, y in states[k].pairs[-4:]:
            assert rel_err(h @ s["value"], y["value"]) <= 1e-10


def test_next_solve_uses_the_preconditioner_of_the_recycled_pairs(ridge):
    """Step 2's solve, rebuilt by hand from the state after step 1 (its 8 pairs through lbfgs_preconditioner, the w
    step 2 trained), gives step 2's v to 1e-12 relative (the same computation). Four CG iterations from zero depend
    on M: built from only step 1's own 4 pairs (no recycling) or with no M the iterate is off by more than 1e-6
    (measured 1.7e-4 and 8e-2: differences of the algorithm, not of rounding)."""
    problem, train, val = ridge
    states = _states(problem, 3, **SHORT)
    before, after = states[1], states[2]

    def rebuilt(preconditioner):
        solve = functools.partial(cg, maxiter=4, rtol=0.0, record_pairs=10, preconditioner=preconditioner)
        return implicit_hypergrad(problem, before.outer, after.inner, inner_batch=train, outer_batch=val,
                                  solve=solve).linsolve.x["value"]

    assert rel_err(rebuilt(lbfgs_preconditioner(before.pairs, memory=10)), after.v["value"]) <= 1e-12
    assert rel_err(rebuilt(lbfgs_preconditioner(before.pairs[-4:], memory=10)), after.v["value"]) > 1e-6
    assert rel_err(rebuilt(None), after.v["value"]) > 1e-6
