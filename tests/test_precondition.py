"""Preconditioned CG and the L-BFGS preconditioner recycled from an earlier solve's curvature pairs.

Oracles: the sequential dense BFGS inverse update (Nocedal & Wright, eq. 6.17) for the compact form, the secant
equations, dense LU solves, the ridge closed form, the unpreconditioned run of the same solver, and for the pairs'
storage the tuple recipe (old + new)[-m:] on plain (s, y) pairs, a Gram matrix formed from scratch and the float64
product of the cast pairs.
"""

import functools
from unittest import mock

import pytest
import torch
from test_hypergrad import rel_err, ridge_setup
from test_linsolve import spd_system, symmetric_system

import bilevel
from bilevel import BilevelError, precondition, tree
from bilevel.data import DataStreams
from bilevel.hypergrad import implicit_hypergrad
from bilevel.linsolve import cg
from bilevel.precondition import CurvaturePairs, LBFGSPreconditioner, lbfgs_preconditioner, recycle_pairs
from bilevel.problems.ridge import ridge_hypergrad
from bilevel.registry import make_solver


def outlier_system(n: int = 120, n_large: int = 8, seed: int = 0, device: str = "cpu", high: float = 500.0):
    """(A, b as Params, matvec): eigenvalues in [1, 2] plus ``n_large`` outliers in [50, ``high``] (κ = ``high``),
    the spectrum a preconditioner from a few curvature pairs can fix (the few large eigenvalues CG resolves first)."""
    eig = torch.cat([torch.linspace(1.0, 2.0, n - n_large, dtype=torch.float64),
                     torch.logspace(torch.log10(torch.tensor(50.0)), torch.log10(torch.tensor(high)), n_large,
                                    dtype=torch.float64)])
    a, _, params, matvec = symmetric_system(eig, u_shape=(4, 10), device=device, seed=seed)
    return a, params, matvec


def dense(op, like, n):
    """The matrix of a linear map on Params, column by column."""
    return torch.stack([tree.flatten(op(tree.unflatten(e, like))) for e in torch.eye(n, dtype=torch.float64)], dim=1)


def storages(pairs) -> set[int]:
    """The storages (data pointers) behind every s and y of ``pairs``."""
    return {t.untyped_storage().data_ptr() for s, y in pairs for t in (*s.values(), *y.values())}


def snapshot(pairs) -> list[torch.Tensor]:
    """Copies of the pairs' values, flattened: s_1, y_1, s_2, ..."""
    return [tree.flatten(v).clone() for pair in pairs for v in pair]


def test_compact_form_equals_sequential_bfgs_updates():
    """For arbitrary pairs with sᵀy > 0 (not conjugate), the compact representation equals m sequential BFGS
    inverse updates H ← (I − ρsyᵀ) H (I − ρysᵀ) + ρssᵀ from H₀ = γI, to 1e-12 relative (float64)."""
    n, m = 15, 6
    gen = torch.Generator().manual_seed(3)
    spd = torch.randn(n, n, generator=gen, dtype=torch.float64)
    spd = spd @ spd.T + torch.eye(n, dtype=torch.float64)
    pairs = []
    for _ in range(m):
        s = torch.randn(n, generator=gen, dtype=torch.float64)
        y = spd @ s + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)  # not an exact A s: a generic pair
        assert float(s @ y) > 0
        pairs.append(({"x": s}, {"x": y}))
    s_m, y_m = pairs[-1][0]["x"], pairs[-1][1]["x"]
    h = float(s_m @ y_m / (y_m @ y_m)) * torch.eye(n, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    for s, y in pairs:
        s, y = s["x"], y["x"]
        rho = 1.0 / float(s @ y)
        h = (eye - rho * torch.outer(s, y)) @ h @ (eye - rho * torch.outer(y, s)) + rho * torch.outer(s, s)
    compact = dense(LBFGSPreconditioner(pairs), {"x": torch.zeros(n, dtype=torch.float64)}, n)
    assert rel_err(compact, h) <= 1e-12
    torch.testing.assert_close(compact, compact.T, rtol=1e-12, atol=1e-12)
    assert float(torch.linalg.eigvalsh(0.5 * (compact + compact.T)).min()) > 0


def test_cg_pairs_are_conjugate_so_every_secant_equation_holds():
    """CG's pairs (p_k, A p_k) are A-conjugate: the L-BFGS matrix then satisfies H y_i = s_i for every pair (not only
    the last), to 1e-8. Measured 7e-14 to 1.4e-11 over BLAS thread counts and instruction sets (the pairs' conjugacy
    is lost at the rounding level, amplified by κ = 500); pairs (s, As) from random, non-conjugate s miss every secant
    equation but the last by 0.27 or more (checked here > 1e-2), so 1e-8 still tells the two apart."""
    a, b, matvec = outlier_system()
    result = cg(matvec, b, rtol=1e-12, maxiter=200, record_pairs=10)
    assert len(result.pairs) == 10
    precond = lbfgs_preconditioner(result.pairs)
    assert precond is not None and precond.size == 10
    for s, y in result.pairs:
        assert rel_err(tree.flatten(precond(y)), tree.flatten(s)) <= 1e-8
    gen = torch.Generator().manual_seed(5)
    directions = [tree.unflatten(torch.randn(a.shape[0], generator=gen, dtype=torch.float64), b) for _ in range(10)]
    generic = lbfgs_preconditioner([(s, matvec(s)) for s in directions])
    assert rel_err(tree.flatten(generic(matvec(directions[0]))), tree.flatten(directions[0])) > 1e-2


def test_cg_records_pairs_in_one_matrix_that_the_preconditioner_reads_in_place():
    """record_pairs=m: the pairs are copies of CG's (p, Ap) (y = A s exactly) in one storage of 2m rows of P entries,
    and the preconditioner built from them reads that storage (no second copy of the pairs)."""
    a, b, matvec = outlier_system()
    pairs = cg(matvec, b, rtol=1e-12, maxiter=200, record_pairs=10).pairs
    assert isinstance(pairs, CurvaturePairs) and len(pairs) == 10
    (pointer,) = storages(pairs)
    assert pairs[0][0]["u"].untyped_storage().nbytes() == 2 * 10 * a.shape[0] * 8
    for s, y in pairs:
        torch.testing.assert_close(tree.flatten(y), a @ tree.flatten(s), rtol=1e-14, atol=0.0)
    precond = lbfgs_preconditioner(pairs)
    assert precond._basis.untyped_storage().data_ptr() == pointer


def test_recycle_pairs_tops_up_the_new_matrix_and_extends_the_gram_matrix():
    """recycle_pairs(old, new) with 4 new pairs and memory 10: the same pairs as the tuple recipe (old + new)[-10:]
    (equal values), in new's matrix (its free rows), old's values untouched; the Gram matrix is extended by products
    of the 4 new pairs' rows only and equals one formed from scratch to 1e-12, the preconditioner the one from plain
    tuples to 1e-12 (dense, relative)."""
    a, b, matvec = outlier_system()
    old = cg(matvec, b, rtol=0.0, maxiter=10, record_pairs=10).pairs
    lbfgs_preconditioner(old)  # forms old's Gram matrix, as the solver's previous step did
    old_values = snapshot(old)
    b2 = tree.unflatten(torch.randn(a.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64), b)
    new = cg(matvec, b2, rtol=0.0, maxiter=4, record_pairs=10).pairs
    rows, original = [], precondition._products

    def products(left, right):
        rows.append(left.shape[0])
        return original(left, right)

    with mock.patch.object(precondition, "_products", products):
        kept = recycle_pairs(old, new, memory=10)
    assert rows and max(rows) <= 2 * len(new), rows
    expected = (tuple(old) + tuple(new))[-10:]
    assert len(kept) == 10
    for got, want in zip(snapshot(kept), snapshot(expected)):
        assert torch.equal(got, want)
    assert storages(kept) == storages(new)
    assert all(torch.equal(x, y) for x, y in zip(snapshot(old), old_values))
    fresh = CurvaturePairs.from_pairs([(tree.clone(s), tree.clone(y)) for s, y in expected])
    assert rel_err(torch.from_numpy(kept.gram), torch.from_numpy(fresh.gram)) <= 1e-12
    n = a.shape[0]
    reference = dense(LBFGSPreconditioner([(tree.clone(s), tree.clone(y)) for s, y in expected]), b, n)
    assert rel_err(dense(lbfgs_preconditioner(kept), b, n), reference) <= 1e-12


def test_recycling_the_same_new_pairs_twice_keeps_both_results():
    """Two recycles of one solve's pairs with different old ones (a benchmark retrying a step from the same state):
    the second finds new's free rows taken and copies into a matrix of its own; each result equals its tuple recipe."""
    a, b, matvec = outlier_system()
    old_a = cg(matvec, b, rtol=0.0, maxiter=10, record_pairs=10).pairs
    old_b = cg(matvec, tree.scale(b, -2.0), rtol=0.0, maxiter=10, record_pairs=10).pairs
    new = cg(matvec, tree.unflatten(torch.linspace(-1, 1, a.shape[0], dtype=torch.float64), b), rtol=0.0, maxiter=3,
             record_pairs=10).pairs
    first = recycle_pairs(old_a, new, memory=10)
    second = recycle_pairs(old_b, new, memory=10)
    assert storages(first) == storages(new) and not storages(second) & storages(new)
    for kept, old in ((first, old_a), (second, old_b)):
        for got, want in zip(snapshot(kept), snapshot((tuple(old) + tuple(new))[-10:]), strict=True):
            assert torch.equal(got, want)


def test_gram_matrix_of_float32_pairs_is_the_float64_product():
    """float32 pairs of P = 10 000 entries (the Gram matrix formed in blocks of columns): equal to the float64 product
    of the pairs cast to float64 to 1e-13 relative."""
    gen = torch.Generator().manual_seed(2)
    pairs = [({"x": torch.randn(10_000, generator=gen)}, {"x": torch.randn(10_000, generator=gen)}) for _ in range(10)]
    rows = torch.stack([tree.flatten(v).double() for v in [s for s, _ in pairs] + [y for _, y in pairs]])
    gram = CurvaturePairs.from_pairs(pairs).gram
    assert rel_err(torch.from_numpy(gram), rows @ rows.T) <= 1e-13


def test_cg_solver_holds_its_pairs_in_one_matrix_and_leaves_the_state_it_steps_from():
    """After steps of ``cg`` (memory 10, solves of 3 to 8 iterations, so pairs are topped up): the state's 10 pairs
    live in one storage of 2·10 rows of P entries; two steps from one state agree exactly and leave its pairs as
    they were (a step writes no row that an earlier state's pairs use)."""
    problem, *_ = ridge_setup(torch.float64)
    solver = make_solver("cg", inner_steps=50, inner_lr=0.01, cg_rtol=1e-10)
    data = DataStreams(problem.inner_data, problem.outer_data)
    state = solver.init(problem)
    for _ in range(4):
        state, _ = solver.step(problem, state, data)
    pairs = state.pairs
    assert len(pairs) == 10 and len(storages(pairs)) == 1
    assert pairs[0][0]["value"].untyped_storage().nbytes() == 2 * 10 * 8 * 8
    before = snapshot(pairs)
    first, second = (solver.step(problem, state, data)[0] for _ in range(2))
    assert torch.equal(first.outer["value"], second.outer["value"])
    assert all(torch.equal(x, y) for x, y in zip(snapshot(pairs), before))


def test_recycled_preconditioner_cuts_iterations_on_a_nearby_system(device):
    """Pairs from solving A x = b precondition A' x' = b' with A' = A + diag(δ), δ_i ∈ [0, 0.1] (as the next outer
    step's Hessian, whose weight decay moved) and a new right-hand side: CG needs at most half the iterations of the
    unpreconditioned run in the same test to the same 1e-10 residual, and both match the dense solve to 1e-8.

    Outliers up to 5000 (κ ≈ 5000), where the pairs matter: measured 13 against 39–44 iterations over 1–3 BLAS
    threads and SSE4.2/AVX2/AVX-512 kernels (the plain count moves with rounding, the preconditioned one did not).
    With outliers only up to 500 the cut is 23 against 32–34, too close to any fixed ratio to assert."""
    a, b, matvec = outlier_system(device=device, high=5000.0)
    first = cg(matvec, b, rtol=1e-10, maxiter=500, record_pairs=10)
    gen = torch.Generator().manual_seed(9)
    a2 = a + torch.diag(0.1 * torch.rand(a.shape[0], generator=gen, dtype=torch.float64)).to(device)
    b2 = tree.unflatten(torch.randn(a.shape[0], generator=gen, dtype=torch.float64).to(device), b)

    def matvec2(p):
        return tree.unflatten(a2 @ tree.flatten(p), p)

    x_star = torch.linalg.solve(a2, tree.flatten(b2))
    plain = cg(matvec2, b2, rtol=1e-10, maxiter=500)
    pre = cg(matvec2, b2, rtol=1e-10, maxiter=500, preconditioner=lbfgs_preconditioner(first.pairs))
    assert pre.iterations <= 0.5 * plain.iterations, (pre.iterations, plain.iterations)
    for result in (plain, pre):
        assert rel_err(tree.flatten(result.x), x_star) <= 1e-8
        true_residual = torch.linalg.vector_norm(tree.flatten(b2) - a2 @ tree.flatten(result.x)) / tree.norm(b2)
        assert float(true_residual) <= 2e-10  # ``residual`` and rtol mean the unpreconditioned ‖b − Ax‖/‖b‖


def test_unchecked_pcg_takes_the_same_steps_as_checked(device):
    """check=False (vmap-able, no host syncs) runs the same preconditioned iteration: equal after 15 steps to 1e-10."""
    _, b, matvec = outlier_system(device=device)
    precond = lbfgs_preconditioner(cg(matvec, b, maxiter=10, record_pairs=10).pairs)
    checked = cg(matvec, b, rtol=0.0, maxiter=15, preconditioner=precond)
    unchecked = cg(matvec, b, maxiter=15, check=False, preconditioner=precond)
    assert rel_err(tree.flatten(unchecked.x), tree.flatten(checked.x)) <= 1e-10
    assert float(unchecked.residual) == pytest.approx(float(checked.residual), rel=1e-8, abs=1e-14)


def test_preconditioned_cg_batches_over_right_hand_sides_with_vmap():
    """vmap of the unchecked preconditioned CG over 3 right-hand sides (one shared M) equals a Python loop to 1e-7
    (batched and single products round differently and 15 steps at κ = 500 amplify it: measured 5e-11 to 1.4e-10
    over BLAS thread counts and instruction sets; a wrongly batched M or step would be off by O(1))."""
    a, b, matvec = outlier_system()
    precond = lbfgs_preconditioner(cg(matvec, b, maxiter=10, record_pairs=10).pairs)
    rhs = torch.randn(3, a.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def solve_one(flat):
        return tree.flatten(cg(matvec, tree.unflatten(flat, b), maxiter=15, check=False, preconditioner=precond).x)

    batched = torch.func.vmap(solve_one)(rhs)
    loop = torch.stack([solve_one(x) for x in rhs])
    assert rel_err(batched, loop) <= 1e-7


def test_warm_start_and_mixed_precision_compose_with_the_preconditioner():
    """x0 + preconditioner + float32 products with reliable updates still reach the float64 dense solve to 1e-9
    (measured 7.5e-12; κ·rtol = 5e-9 bounds it; the float32 products without the reliable updates stop at 4e-6 to
    6e-6 depending on the BLAS kernels)."""
    a, b, matvec = outlier_system()
    x_star = torch.linalg.solve(a, tree.flatten(b))
    precond = lbfgs_preconditioner(cg(matvec, b, maxiter=10, record_pairs=10).pairs)
    gen = torch.Generator().manual_seed(6)
    x0 = tree.unflatten(x_star + 1e-2 * torch.randn(x_star.shape, generator=gen, dtype=torch.float64), b)

    def cheap(p):
        return tree.unflatten((a.float() @ tree.flatten(p).float()).double(), p)

    result = cg(cheap, b, x0=x0, rtol=1e-11, maxiter=200, preconditioner=precond, precise_matvec=matvec)
    assert rel_err(tree.flatten(result.x), x_star) <= 1e-9


def test_ridge_hypergradient_with_preconditioned_cg_matches_closed_form():
    """implicit_hypergrad with a recycled preconditioner (pairs from the same point's first solve): ≤ 1e-6 (float64)."""
    problem, train, val, lam, w = ridge_setup(torch.float64)
    reference = ridge_hypergrad(train, val, lam["value"])
    first = implicit_hypergrad(problem, lam, w, inner_batch=train, outer_batch=val,
                               solve=functools.partial(cg, maxiter=3, rtol=0.0, record_pairs=3))
    assert len(first.linsolve.pairs) == 3
    solve = functools.partial(cg, maxiter=50, rtol=1e-12, preconditioner=lbfgs_preconditioner(first.linsolve.pairs))
    hg = implicit_hypergrad(problem, lam, w, inner_batch=train, outer_batch=val, solve=solve)
    assert rel_err(hg.hypergrad["value"], reference) <= 1e-6


def test_solve_cg_with_lbfgs_preconditioner_follows_the_plain_run_with_fewer_iterations():
    """Twenty outer steps of ``cg`` on the ridge with its default cg_preconditioner="lbfgs" stay within 1e-7 of the
    unpreconditioned run (both solve to 1e-10) and spend fewer CG iterations in total (measured: 91 against 179)."""
    problem, *_ = ridge_setup(torch.float64)
    runs = [bilevel.solve(problem, "cg", maxiter=20, seed=0, inner_steps=50, inner_lr=0.01, cg_rtol=1e-10, **extra)
            for extra in ({"cg_preconditioner": None}, {})]
    assert rel_err(runs[1].outer, runs[0].outer) <= 1e-7
    iterations = [sum(int(i) for i in run.history["linsolve_iterations"]) for run in runs]
    assert iterations[1] < 0.7 * iterations[0], iterations


def test_preconditioner_errors():
    _, _, b, matvec = spd_system()
    with pytest.raises(BilevelError, match="record_pairs needs check=True"):
        cg(matvec, b, check=False, record_pairs=5)
    with pytest.raises(BilevelError, match="record_pairs must be >= 0"):
        cg(matvec, b, record_pairs=-1)
    with pytest.raises(BilevelError, match="preconditioner is not positive definite"):
        cg(matvec, b, preconditioner=lambda r: tree.scale(r, -1.0))
    with pytest.raises(BilevelError, match="residual is not finite"):
        cg(matvec, tree.scale(b, float("inf")), preconditioner=lambda r: r)
    with pytest.raises(BilevelError, match="needs at least one curvature pair"):
        LBFGSPreconditioner([])
    s = {"x": torch.ones(3, dtype=torch.float64)}
    with pytest.raises(BilevelError, match="pair 0 has sᵀy=-3 ≤ 0"):
        LBFGSPreconditioner([(s, tree.scale(s, -1.0))])
    with pytest.raises(BilevelError, match="memory must be >= 1"):
        lbfgs_preconditioner([(s, s)], memory=0)
    with pytest.raises(BilevelError, match="recycle_pairs: memory must be >= 1"):
        recycle_pairs((), [(s, s)], memory=0)
    # pairs without positive curvature are dropped; none left -> no preconditioner (plain CG)
    assert lbfgs_preconditioner([(s, tree.scale(s, -1.0))]) is None
    assert lbfgs_preconditioner([(s, tree.scale(s, -1.0)), (s, s)]).size == 1
    problem, *_ = ridge_setup(torch.float64)
    with pytest.raises(BilevelError, match="cg_preconditioner needs linsolve='cg'"):
        bilevel.solve(problem, "ift", maxiter=1, cg_preconditioner="lbfgs")
    with pytest.raises(BilevelError, match="cg_preconditioner=.* is not valid; expected .lbfgs. or None"):
        bilevel.solve(problem, "cg", maxiter=1, cg_preconditioner="jacobi")
    with pytest.raises(BilevelError, match="cg_preconditioner_memory=0 is not valid; expected an integer >= 1"):
        bilevel.solve(problem, "cg", maxiter=1, cg_preconditioner="lbfgs", cg_preconditioner_memory=0)
