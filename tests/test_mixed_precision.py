"""Mixed-precision CG (cheap products + reliable residual updates) and ``hvp_dtype`` in the implicit hypergradient.

Oracles: dense LU solves and the ridge closed form. The cheap product is either an explicitly perturbed matrix
(A + E, ‖E‖/‖A‖ = 3e-3, about bfloat16's unit roundoff) or the real Hessian in a lower dtype.
"""

import collections
import functools

import pytest
import torch
from test_hypergrad import rel_err, ridge_setup
from test_linsolve import spd_system

import bilevel
from bilevel import BilevelError, tree
from bilevel.hypergrad import implicit_hypergrad
from bilevel.linsolve import cg, exact, neumann
from bilevel.problems.ridge import ridge_hypergrad


def perturbed_system(n: int = 60, cond: float = 30.0, noise: float = 3e-3):
    """(A, b, x*, precise, cheap): cheap(v) = (A + E) v with a fixed symmetric E, ‖E‖₂ = noise·‖A‖₂."""
    a, b, params, precise = spd_system(n=n, cond=cond)
    gen = torch.Generator().manual_seed(1)
    e = torch.randn(n, n, generator=gen, dtype=torch.float64)
    e = e + e.T
    e *= noise * torch.linalg.matrix_norm(a, 2) / torch.linalg.matrix_norm(e, 2)

    def cheap(p):
        return tree.unflatten((a + e) @ tree.flatten(p), p)

    return a, params, torch.linalg.solve(a, b), precise, cheap


def test_reliable_updates_reach_working_precision_where_plain_inexact_cg_stalls():
    """Plain CG on A + E converges to (A + E)⁻¹b: error ≈ κ·3e-3 ≫ 1e-6. With the precise product attached the
    answer is A⁻¹b to 1e-10, from mostly cheap products (precise ones ≤ 1 per decade of residual, + slack)."""
    a, b, x_star, precise, cheap = perturbed_system()
    plain = cg(cheap, b, rtol=1e-12, maxiter=300)
    assert rel_err(tree.flatten(plain.x), x_star) > 1e-3

    calls = collections.Counter()

    def counted(kind, fn):
        def run(p):
            calls[kind] += 1
            return fn(p)
        return run

    mixed = cg(counted("cheap", cheap), b, rtol=1e-12, maxiter=300, precise_matvec=counted("precise", precise))
    assert rel_err(tree.flatten(mixed.x), x_star) <= 1e-10
    true_residual = torch.linalg.vector_norm(tree.flatten(b) - a @ tree.flatten(mixed.x)) / tree.norm(b)
    assert float(true_residual) <= 1e-11  # the stopping test was made on a true residual
    assert calls["precise"] <= 12 + 3  # 12 decades at reliable_delta = 0.1, plus final checks
    assert calls["cheap"] > 3 * calls["precise"]
    assert mixed.iterations == calls["cheap"] + calls["precise"]


def test_precise_attribute_is_used_and_warm_start_residual_is_precise():
    a, b, x_star, precise, cheap = perturbed_system()

    class Operator:
        def __call__(self, p):
            return cheap(p)

    op = Operator()
    op.precise = precise
    x0 = tree.unflatten(x_star + 1e-3 * torch.ones_like(x_star), b)
    result = cg(op, b, x0=x0, rtol=1e-12, maxiter=300)
    assert rel_err(tree.flatten(result.x), x_star) <= 1e-10
    # Neumann has no residual to correct: it uses the precise product (same numbers as without the cheap one)
    alpha = 1.0 / float(torch.linalg.matrix_norm(a, 2))
    assert torch.equal(tree.flatten(neumann(op, b, alpha=alpha, maxiter=7).x),
                       tree.flatten(neumann(precise, b, alpha=alpha, maxiter=7).x))


def test_mixed_precision_cg_errors():
    _, b, _, precise, cheap = perturbed_system()
    with pytest.raises(BilevelError, match="needs check=True"):
        cg(cheap, b, precise_matvec=precise, check=False)
    with pytest.raises(BilevelError, match=r"reliable_delta must be in \(0, 1\)"):
        cg(cheap, b, precise_matvec=precise, reliable_delta=1.5)


@pytest.mark.parametrize("dtype,hvp_dtype,tol", [(torch.float64, torch.float32, 1e-8), (torch.float32, torch.bfloat16, 2e-3)])
def test_hvp_dtype_hypergradient_matches_ridge_closed_form(dtype, hvp_dtype, tol, device):
    """Same tolerance as the working-precision solve: float64 with float32 products to 1e-8 (closed form),
    float32 with bfloat16 products to 2e-3 (test_hypergrad's float32 tolerance)."""
    problem, train, val, lam, w = ridge_setup(dtype, device)
    reference = ridge_hypergrad(train, val, lam["value"])
    solve = functools.partial(cg, maxiter=200, rtol=1e-12 if dtype == torch.float64 else 1e-5)
    hg = implicit_hypergrad(problem, lam, w, inner_batch=train, outer_batch=val, solve=solve, hvp_dtype=hvp_dtype)
    assert hg.hypergrad["value"].dtype == dtype
    assert rel_err(hg.hypergrad["value"], reference) <= tol
    # exact uses the working-precision operator: identical to the call without hvp_dtype
    plain = implicit_hypergrad(problem, lam, w, inner_batch=train, outer_batch=val, solve=exact)
    mixed = implicit_hypergrad(problem, lam, w, inner_batch=train, outer_batch=val, solve=exact, hvp_dtype=hvp_dtype)
    assert torch.equal(plain.hypergrad["value"], mixed.hypergrad["value"])


def test_hvp_dtype_errors():
    problem, train, val, lam, w = ridge_setup(torch.float32)
    with pytest.raises(BilevelError, match="lower precision than the inner variables' torch.float32"):
        implicit_hypergrad(problem, lam, w, inner_batch=train, outer_batch=val, hvp_dtype=torch.float64)
    with pytest.raises(BilevelError, match="needs linsolve='cg'"):
        bilevel.solve(problem, "ift", maxiter=1, hvp_dtype="bfloat16")
    with pytest.raises(BilevelError, match="hvp_dtype=.* is not valid; expected one of"):
        bilevel.solve(problem, "cg", maxiter=1, hvp_dtype="int8")


def test_solve_cg_with_hvp_dtype_follows_the_full_precision_run():
    """Ten outer steps of ``cg`` on a float64 ridge with float32 products stay within 1e-7 of the float64 run."""
    problem, *_ = ridge_setup(torch.float64)
    runs = [bilevel.solve(problem, "cg", maxiter=10, seed=0, inner_steps=50, inner_lr=0.01, cg_rtol=1e-10, **extra)
            for extra in ({}, {"hvp_dtype": "float32"})]
    assert rel_err(runs[1].outer, runs[0].outer) <= 1e-7
    extra_linearizations = runs[1].history.last("calls_grad_inner") - runs[0].history.last("calls_grad_inner")
    assert extra_linearizations == 10  # one float32 linearization per outer step: the mixed path ran


def test_cast_batch_keeps_structure_and_integer_tensors():
    pair = collections.namedtuple("pair", "x y")
    batch = {"a": pair(torch.ones(2), torch.arange(2)), "b": [torch.zeros(1, dtype=torch.float64), "tag"]}
    out = tree.cast_batch(batch, torch.bfloat16)
    assert isinstance(out["a"], pair) and out["a"].x.dtype == torch.bfloat16 and out["a"].y.dtype == torch.int64
    assert out["b"][0].dtype == torch.bfloat16 and out["b"][1] == "tag"
