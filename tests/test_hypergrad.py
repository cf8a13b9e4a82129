"""Hypergradient rules against closed forms (per-weight ridge; linear unrolled map) and oracles against dense autograd."""

import functools

import pytest
import torch

from bilevel import tree
from bilevel.hypergrad import implicit_hypergrad, unrolled_hypergrad
from bilevel.inner import solve_inner
from bilevel.linsolve import cg, exact, neumann
from bilevel.optim import sgd
from bilevel.oracles import Linearization, hvp, jvp_inner, mixed_vjp
from bilevel.problem import Problem
from bilevel.problems.ridge import ridge_data, ridge_hypergrad, ridge_problem


def ridge_setup(dtype=torch.float64, device="cpu", dim=8):
    train, val = ridge_data(dim=dim, dtype=dtype, device=device)
    problem = ridge_problem(train, val)
    lam = {"value": torch.linspace(-1.0, 1.0, dim, dtype=dtype, device=device)}
    w = solve_inner(problem, lam, problem.inner_init, train) if dtype == torch.float64 else None
    if w is None:  # float32: solve in float64, cast (L-BFGS in float32 stalls around 1e-6)
        p64 = ridge_problem(*ridge_data(dim=dim, dtype=torch.float64, device=device))
        w = {"value": solve_inner(p64, {"value": lam["value"].double()}, p64.inner_init, p64.inner_data)["value"].to(dtype)}
    return problem, train, val, lam, w


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 2e-3)])
def test_cg_and_exact_match_ridge_closed_form(dtype, tol, device):
    """Closed form dL_V/dλ_j = −e^{λ_j} w*_j (H⁻¹X_vᵀ(X_v w* − y_v))_j; ≤1e-6 relative in float64."""
    problem, train, val, lam, w = ridge_setup(dtype, device)
    reference = ridge_hypergrad(train, val, lam["value"])
    for solve in (functools.partial(cg, maxiter=50, rtol=1e-12), exact):
        hg = implicit_hypergrad(problem, lam, w, inner_batch=train, outer_batch=val, solve=solve)
        assert rel_err(hg.hypergrad["value"], reference) <= tol
        assert float(hg.linsolve.residual) <= (1e-9 if dtype == torch.float64 else 1e-3)


def test_neumann_error_falls_with_terms():
    """Neumann with α = 1/λ_max(H): the error against the closed form falls monotonically with the number of terms."""
    problem, train, val, lam, w = ridge_setup()
    reference = ridge_hypergrad(train, val, lam["value"])
    x = train[0]
    h = x.T @ x + torch.diag(lam["value"].exp())
    alpha = float(1.0 / torch.linalg.eigvalsh(h).max())
    errors = []
    for terms in (0, 1, 5, 20, 200):
        hg = implicit_hypergrad(problem, lam, w, inner_batch=train, outer_batch=val,
                                solve=functools.partial(neumann, alpha=alpha, maxiter=terms))
        errors.append(rel_err(hg.hypergrad["value"], reference))
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-6, errors


def test_unrolled_matches_linear_closed_form():
    """L_T = ½wᵀAw − wᵀBλ: T GD steps give w_T = M^T w_0 + Σ_{t<T} M^t η B λ with M = I − ηA (linear in λ);
    for L_V = ½‖w_T − c‖², dL_V/dλ = (Σ_t M^t η B)ᵀ (w_T − c). Oracle: that closed form, ≤1e-10."""
    torch.manual_seed(0)
    d, m, steps, lr = 6, 3, 7, 0.1
    q = torch.randn(d, d, dtype=torch.float64)
    a = q @ q.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, m, dtype=torch.float64)
    c = torch.randn(d, dtype=torch.float64)
    w0 = torch.randn(d, dtype=torch.float64)
    lam0 = torch.randn(m, dtype=torch.float64, requires_grad=True)
    problem = Problem(
        outer=lam0, inner=w0,
        inner_loss=lambda lam, w, _: 0.5 * w @ a @ w - w @ (b @ lam),
        outer_loss=lambda lam, w, _: 0.5 * ((w - c) ** 2).sum(),
    )
    lam = {"value": lam0.detach()}
    hg = unrolled_hypergrad(problem, lam, {"value": w0}, inner_batches=[None] * steps, outer_batch=None, optimizer=sgd(lr))
    mm = torch.eye(d, dtype=torch.float64) - lr * a
    jac = sum(torch.linalg.matrix_power(mm, t) @ (lr * b) for t in range(steps))
    w_t = torch.linalg.matrix_power(mm, steps) @ w0 + jac @ lam["value"]
    torch.testing.assert_close(hg.inner["value"], w_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hg.hypergrad["value"], jac.T @ (w_t - c), rtol=1e-10, atol=1e-12)


def test_oracles_match_dense_autograd_hessian():
    """HVP (torch.func and retained graph, single and batched), mixed VJP and JVP against torch.autograd.functional."""
    torch.manual_seed(1)
    problem, train, val, lam, w = ridge_setup(dim=5)
    weight = torch.randn(5, dtype=torch.float64)

    def lt(lam_, w_):
        return problem.inner_objective({"value": lam_}, {"value": w_}, train) + (weight * w_.sin() * lam_.cos()).sum()

    nonquadratic = Problem(outer=lam["value"].clone().requires_grad_(), inner=w["value"].clone(),
                           inner_loss=lambda l_, w_, b: lt(l_, w_), outer_loss=lambda l_, w_, b: (w_**2).sum())
    h = torch.autograd.functional.hessian(lt, (lam["value"], w["value"]))
    h_ww, h_lw = h[1][1], h[0][1]  # ∂²/∂w∂w and ∂²/∂λ∂w
    v = torch.randn(5, dtype=torch.float64)
    vs = torch.randn(3, 5, dtype=torch.float64)
    lin = Linearization(nonquadratic, lam, w, None)
    torch.testing.assert_close(hvp(nonquadratic, lam, w, None, {"value": v})["value"], h_ww @ v)
    torch.testing.assert_close(lin.hvp({"value": v})["value"], h_ww @ v)
    torch.testing.assert_close(lin.hvp({"value": vs}, batched=True)["value"], vs @ h_ww.T)
    torch.testing.assert_close(mixed_vjp(nonquadratic, lam, w, None, {"value": v})["value"], h_lw @ v)
    torch.testing.assert_close(lin.mixed_vjp({"value": v})["value"], h_lw @ v)
    value, directional = jvp_inner(nonquadratic, lam, w, None, {"value": v})
    grad_w = torch.autograd.functional.jacobian(lambda w_: lt(lam["value"], w_), w["value"])
    torch.testing.assert_close(value, lt(lam["value"], w["value"]))
    torch.testing.assert_close(directional, grad_w @ v)
    batched = torch.func.vmap(lambda vv: hvp(nonquadratic, lam, w, None, {"value": vv})["value"])(vs)
    torch.testing.assert_close(batched, vs @ h_ww.T)


def test_parameters_unused_by_a_loss_get_zero_gradients():
    """An inner tensor that neither loss touches: zeros, not a crash (oracle: it cannot move the losses)."""
    train, val = ridge_data(dim=4)
    base = ridge_problem(train, val)
    problem = Problem(
        outer=torch.zeros(4, dtype=torch.float64, requires_grad=True),
        inner={"w": torch.zeros(4, dtype=torch.float64), "unused": torch.ones(3, dtype=torch.float64)},
        inner_loss=lambda lam, p, batch: base.inner_loss(lam, p["w"], batch) + 0.5 * (p["unused"] ** 2).sum(),
        outer_loss=lambda lam, p, batch: base.outer_loss(lam, p["w"], batch),
        inner_data=train, outer_data=val,
    )
    lam = {"value": torch.zeros(4, dtype=torch.float64)}
    w = solve_inner(problem, lam, problem.inner_init, train)
    hg = implicit_hypergrad(problem, lam, w, inner_batch=train, outer_batch=val, solve=exact)
    torch.testing.assert_close(hg.hypergrad["value"], ridge_hypergrad(train, val, lam["value"]), rtol=1e-6, atol=1e-9)
    assert tree.norm({"u": hg.linsolve.x["unused"]}) < 1e-12


def test_function_level_oracles_need_no_problem():
    """The oracles of a plain f(λ, w) (what custom implicit rules build on) against torch.autograd.functional on a
    non-quadratic function, float64, 1e-10; and the structural dependency test."""
    from bilevel import oracles

    gen = torch.Generator().manual_seed(3)
    lam = {"a": torch.randn(3, generator=gen, dtype=torch.float64), "b": torch.randn(2, generator=gen, dtype=torch.float64)}
    w = {"x": torch.randn(3, generator=gen, dtype=torch.float64)}
    v = {"x": torch.randn(3, generator=gen, dtype=torch.float64)}

    def f(lam, w):
        return (w["x"].sin() * lam["a"]).sum() + 0.5 * (lam["a"].exp() * w["x"] ** 2).sum()  # λ_b unused

    def flat(a, x):
        return f({"a": a, "b": lam["b"]}, {"x": x})

    h = torch.autograd.functional.hessian(flat, (lam["a"], w["x"]))
    h_ww, h_aw = h[1][1], h[0][1]
    torch.testing.assert_close(oracles.hvp_of(f, lam, w, v)["x"], h_ww @ v["x"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(oracles.mixed_vjp_of(f, lam, w, v)["a"], h_aw @ v["x"], rtol=1e-10, atol=1e-12)
    g, products = oracles.linearize(f, lam, w)
    mixed, hv = products(v)
    torch.testing.assert_close(hv["x"], h_ww @ v["x"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mixed["a"], h_aw @ v["x"], rtol=1e-10, atol=1e-12)
    value, g_outer, g_inner = oracles.value_and_grad(f, lam, w, wrt_outer=True)
    torch.testing.assert_close(g_inner["x"], g["x"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_outer["b"], torch.zeros(2, dtype=torch.float64))  # unused: zero, not missing
    assert oracles.unused_outer(f, lam, w) == ["b"]
    assert float(oracles.jvp_of(f, lam, w, v)[1]) == pytest.approx(float(g["x"] @ v["x"]), rel=1e-12)
