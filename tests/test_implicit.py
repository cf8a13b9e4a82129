"""custom_root / custom_fixed_point and the ready-made optimality conditions.

Oracles: closed forms in float64 (ridge, Lasso on its support, a box-constrained QP on its free set, the simplex
projection's Jacobian, an equality-constrained QP through its KKT matrix), central finite differences (an
inequality-constrained problem, the pre-training/fine-tuning composition), and loops of single calls (vmap, jacrev).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jacrev, vjp, vmap

from bilevel import BilevelError
from bilevel.implicit import custom_fixed_point, custom_root
from bilevel.optimality import (
    kkt,
    projected_gradient,
    prox_elastic_net,
    prox_group_lasso,
    prox_l1,
    proximal_gradient,
    stationarity,
)
from bilevel.projections import box, simplex

D = torch.float64
GEN = torch.Generator().manual_seed(0)
A = torch.randn(30, 6, generator=GEN, dtype=D)
B = torch.randn(30, generator=GEN, dtype=D)
Q = A.T @ A / 30 + 0.1 * torch.eye(6, dtype=D)


def ridge_objective(x, lam):
    return 0.5 * ((A @ x - B) ** 2).sum() + 0.5 * lam * (x**2).sum()


@custom_root(stationarity(ridge_objective), solve="cg")
def ridge(init, lam):
    return torch.linalg.solve(A.T @ A + lam * torch.eye(6, dtype=D), A.T @ B)


def ridge_jacobian(lam):
    h = A.T @ A + lam * torch.eye(6, dtype=D)
    return -torch.linalg.solve(h, torch.linalg.solve(h, A.T @ B))


def test_ridge_matches_closed_form_through_autograd_and_torch_func():
    lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    x = ridge(None, lam)
    (g,) = torch.autograd.grad(x.sum(), lam)
    torch.testing.assert_close(g, ridge_jacobian(0.7).sum(), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(jacrev(lambda t: ridge(None, t))(lam.detach()), ridge_jacobian(0.7), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(grad(lambda t: ridge(None, t).sum())(lam.detach()), ridge_jacobian(0.7).sum(),
                               rtol=1e-8, atol=1e-12)


def test_vmap_over_eight_thetas_equals_a_loop_and_jacrev_equals_stacked_vjps():
    lams = torch.linspace(0.1, 3.0, 8, dtype=D)
    batched = vmap(grad(lambda t: (ridge(None, t) ** 2).sum()))(lams)
    looped = torch.stack([grad(lambda t: (ridge(None, t) ** 2).sum())(t) for t in lams])
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-14)
    vec = torch.linspace(0.5, 1.5, 6, dtype=D)
    lam = torch.tensor([0.3, 2.0], dtype=D)

    @custom_root(stationarity(lambda x, t: 0.5 * ((A @ x - B) ** 2).sum() + 0.5 * (t[0] * vec + t[1]) @ (x**2)))
    def two(init, t):
        return torch.linalg.solve(A.T @ A + torch.diag(t[0] * vec + t[1]), A.T @ B)

    jac = jacrev(lambda t: two(None, t))(lam)
    _, pullback = vjp(lambda t: two(None, t), lam)
    rows = torch.stack([pullback(e)[0] for e in torch.eye(6, dtype=D)])
    torch.testing.assert_close(jac, rows, rtol=1e-10, atol=1e-14)


def ista(x0, lam, step, iters=5000):
    x = x0.clone()
    for _ in range(iters):
        x = prox_l1(x - step * (A.T @ (A @ x - B)), step, lam)
    return x


def test_lasso_hypergradient_on_its_support():
    """x_S = (A_SᵀA_S)⁻¹(A_Sᵀb − λ s) on the support S with signs s, so dx_S/dλ = −(A_SᵀA_S)⁻¹ s and 0 off S
    (1e-6, float64). ISTA to convergence is the solver; the fixed point of the proximal gradient step the condition."""
    step = 1.0 / float(torch.linalg.matrix_norm(A, 2)) ** 2
    lam = 0.3 * (A.T @ B).abs().max()  # between 0 and λ_max = ‖Aᵀb‖_∞: some coordinates in the support, some out

    def f(x, t):
        return 0.5 * ((A @ x - B) ** 2).sum()

    @custom_root(proximal_gradient(f, prox_l1, step=step), solve="exact")
    def lasso(init, t):
        return ista(init, t, step)

    x = lasso(torch.zeros(6, dtype=D), lam)
    support = x.abs() > 1e-8
    assert 0 < int(support.sum()) < 6  # a genuine support: some coordinates at zero
    a_s = A[:, support]
    expected = torch.zeros(6, dtype=D)
    expected[support] = -torch.linalg.solve(a_s.T @ a_s, torch.sign(x[support]))
    jac = jacrev(lambda t: lasso(torch.zeros(6, dtype=D), t))(lam)
    torch.testing.assert_close(jac, expected, rtol=1e-6, atol=1e-9)


def test_box_constrained_qp_on_its_free_set():
    """min ½xᵀQx − θᵀx over [0, 1]⁶: on the free set F, x_F = Q_FF⁻¹(θ_F − Q_FA x_A), so ∂x_F/∂θ_F = Q_FF⁻¹ and the
    active coordinates do not move (1e-8). Projected gradient descent is the solver."""
    theta = torch.tensor([0.5, -0.4, 0.05, 2.0, 0.02, -0.03], dtype=D)
    step = 1.0 / float(torch.linalg.eigvalsh(Q).max())

    def f(x, t):
        return 0.5 * x @ Q @ x - t @ x

    project = box(0.0, 1.0)

    @custom_root(projected_gradient(f, project, step=step), solve="exact")
    def qp(init, t):
        x = init.clone()
        for _ in range(20000):
            x = project(x - step * (Q @ x - t))
        return x

    x = qp(torch.zeros(6, dtype=D), theta)
    free = (x > 1e-9) & (x < 1 - 1e-9)
    assert 0 < int(free.sum()) < 6
    jac = jacrev(lambda t: qp(torch.zeros(6, dtype=D), t))(theta)
    expected = torch.zeros(6, 6, dtype=D)
    idx = free.nonzero().flatten()
    expected[idx.unsqueeze(1), idx] = torch.linalg.inv(Q[idx][:, idx])
    torch.testing.assert_close(jac, expected, rtol=1e-8, atol=1e-10)


def test_simplex_projection_jacobian():
    """x = argmin ½‖x − θ‖² over the simplex is P(θ), whose Jacobian on the support S is I − 11ᵀ/|S| (0 elsewhere)."""
    theta = torch.tensor([0.9, 0.3, -0.5, 0.6, 0.0], dtype=D)
    project = simplex()

    @custom_fixed_point(lambda x, t: project(x - (x - t)), solve="exact")  # the projected gradient step, η = 1
    def nearest(init, t):
        return project(t)

    x = nearest(None, theta)
    support = (x > 0).nonzero().flatten()
    jac = jacrev(lambda t: nearest(None, t))(theta)
    expected = torch.zeros(5, 5, dtype=D)
    k = len(support)
    expected[support.unsqueeze(1), support] = torch.eye(k, dtype=D) - 1.0 / k
    torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.sum(), torch.tensor(1.0, dtype=D))


def test_kkt_equality_constrained_qp_matches_the_kkt_matrix():
    """min ½xᵀQx − θᵀx s.t. Cx = d: [Q Cᵀ; C 0][x; ν] = [θ; d], so ∂x/∂θ is the top-left block of the inverse."""
    c = torch.randn(2, 6, generator=GEN, dtype=D)
    d = torch.randn(2, generator=GEN, dtype=D)
    kkt_matrix = torch.cat([torch.cat([Q, c.T], 1), torch.cat([c, torch.zeros(2, 2, dtype=D)], 1)])
    theta = torch.randn(6, generator=GEN, dtype=D)

    @custom_root(kkt(lambda x, t: 0.5 * x @ Q @ x - t @ x, eq=lambda x, t: c @ x - d), solve="exact")
    def qp(init, t):
        z = torch.linalg.solve(kkt_matrix, torch.cat([t, d]))
        return z[:6], z[6:], torch.zeros(0, dtype=D)

    jac = jacrev(lambda t: qp(None, t)[0])(theta)
    torch.testing.assert_close(jac, torch.linalg.inv(kkt_matrix)[:6, :6], rtol=1e-9, atol=1e-12)


def test_kkt_inequality_constraints_against_finite_differences():
    """min ½‖x − θ‖² s.t. Σx ≤ 1 and x₀ ≥ 0.2 (two inequalities, the first active): the KKT implicit gradient of
    L(x) = ‖x‖² equals central finite differences of the same solver (float64, 1e-6)."""
    def solver(init, t):
        x = t - (t.sum() - 1.0).clamp(min=0) / 3  # projection on the half-space, then the bound if needed
        mu1 = (t.sum() - 1.0).clamp(min=0) / 3
        assert float(x[0]) > 0.2
        return x, torch.zeros(0, dtype=D), torch.stack([mu1, torch.zeros((), dtype=D)])

    condition = kkt(lambda x, t: 0.5 * ((x - t) ** 2).sum(),
                    ineq=lambda x, t: torch.stack([x.sum() - 1.0, 0.2 - x[0]]))
    root = custom_root(condition, solve="exact")(solver)
    theta = torch.tensor([0.9, 0.6, 0.3], dtype=D)
    analytic = grad(lambda t: (root(None, t)[0] ** 2).sum())(theta)
    eps = 1e-6
    numeric = torch.stack([((solver(None, theta + eps * e)[0] ** 2).sum() - (solver(None, theta - eps * e)[0] ** 2).sum())
                           / (2 * eps) for e in torch.eye(3, dtype=D)])
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_structures_and_the_other_proximal_maps():
    """θ and x as dicts; elastic net and group lasso conditions hold at their solvers' outputs and give the
    closed-form derivative of their scaling."""
    y = torch.tensor([3.0, -0.2, 1.5, 0.1], dtype=D)
    groups = torch.tensor([0, 0, 1, 1])

    @custom_fixed_point(lambda x, p: {"v": prox_elastic_net(y, 1.0, p["lam"], p["mu"])}, solve="exact")
    def enet(init, p):
        return {"v": prox_elastic_net(y, 1.0, p["lam"], p["mu"])}

    params = {"lam": torch.tensor(0.5, dtype=D), "mu": torch.tensor(1.0, dtype=D)}
    out = enet(None, params)
    g = grad(lambda p: enet(None, p)["v"].sum())(params)
    soft = torch.sign(y) * (y.abs() - 0.5).clamp(min=0)
    torch.testing.assert_close(g["mu"], -(soft.sum()) / 4.0, rtol=1e-10, atol=1e-12)  # d/dμ of soft/(1 + μ) at μ = 1
    torch.testing.assert_close(out["v"], soft / 2.0)
    shrunk = prox_group_lasso(y, 1.0, 1.0, groups)
    norm0 = float(y[:2].norm())
    torch.testing.assert_close(shrunk[:2], y[:2] * (1 - 1 / norm0))


def test_errors_name_the_problem():
    lam = torch.tensor(0.7, dtype=D)
    sloppy = custom_root(stationarity(ridge_objective))(lambda init, t: torch.zeros(6, dtype=D))
    with pytest.raises(BilevelError, match="does not satisfy the optimality condition"):
        sloppy(None, lam)
    wrong_shape = custom_root(lambda x, t: x[:3])(lambda init, t: torch.zeros(6, dtype=D))
    with pytest.raises(BilevelError, match=r"must return the structure and shapes of x \(\[\(6,\)\]\), got \[\(3,\)\]"):
        wrong_shape(None, lam)
    ignores_theta = custom_root(lambda x, t: x - 1.0)(lambda init, t: torch.ones(6, dtype=D) * t / t)
    with pytest.raises(BilevelError, match=r"optimality_fn does not depend on theta leaf/leaves \[0\]"):
        ignores_theta(None, lam)
    with pytest.raises(BilevelError, match="every leaf of theta must be a floating-point tensor"):
        ridge(None, 3)
    with pytest.raises(BilevelError, match=r"solve='qr' is not valid; expected one of 'normal_cg'"):
        custom_root(stationarity(ridge_objective), solve="qr")


def test_pretraining_composed_with_unrolled_fine_tuning_against_finite_differences():
    """Raghu et al.: w_pre(θ) = argmin Σ_i θ_i L_i(w) + ½‖w‖² (implicit, custom_root), then K gradient steps on a
    target loss from w_pre (unrolled by autograd), then a validation loss: its gradient in the task weights θ
    equals central finite differences of the same pipeline (float64, 1e-6)."""
    tasks = [(torch.randn(15, 6, generator=GEN, dtype=D), torch.randn(15, generator=GEN, dtype=D)) for _ in range(3)]
    target, val = (A[:15], B[:15]), (A[15:], B[15:])

    def pretrain_objective(w, weights):
        return sum(wt * 0.5 * ((x @ w - y) ** 2).mean() for wt, (x, y) in zip(weights, tasks)) + 0.5 * (w**2).sum()

    @custom_root(stationarity(pretrain_objective), solve="cg")
    def pretrain(init, weights):
        h = sum(wt * x.T @ x / len(y) for wt, (x, y) in zip(weights, tasks)) + torch.eye(6, dtype=D)
        return torch.linalg.solve(h, sum(wt * x.T @ y / len(y) for wt, (x, y) in zip(weights, tasks)))

    def pipeline(weights, implicit=True):
        w = pretrain(None, weights) if implicit else pretrain.__wrapped__(None, weights)
        for _ in range(5):  # fine-tuning, differentiated through
            w = w - 0.05 * target[0].T @ (target[0] @ w - target[1]) / 15
        return 0.5 * ((val[0] @ w - val[1]) ** 2).mean()

    weights = torch.tensor([1.0, 0.5, 2.0], dtype=D)
    analytic = grad(pipeline)(weights)
    eps = 1e-6
    numeric = torch.stack([(pipeline(weights + eps * e, False) - pipeline(weights - eps * e, False)) / (2 * eps)
                           for e in torch.eye(3, dtype=D)])
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_problem_with_its_own_inner_solver_runs_in_solve():
    """Problem(inner_solver=...): the implicit methods call the user's solver (here the closed form) instead of their
    inner steps; the first hypergradient is then the closed form's (1e-8), λ follows the same path as runs whose
    inner steps converge, and a method that cannot use it refuses it."""
    import bilevel
    from bilevel.problems.ridge import ridge_data, ridge_hypergrad, ridge_problem

    train, val = ridge_data(dim=5)
    base = ridge_problem(train, val)
    calls = []

    def closed_form(log_lam, w, batch):
        x, y = batch
        calls.append(1)
        return torch.linalg.solve(x.T @ x + torch.diag(log_lam.exp()), x.T @ y)

    problem = bilevel.Problem(outer=base.outer, inner=base.inner, inner_loss=base.inner_loss,
                              outer_loss=base.outer_loss, inner_data=train, outer_data=val, inner_solver=closed_form)
    result = bilevel.solve(problem, "cg", maxiter=5, outer_optimizer="sgd", outer_lr=1.0, cg_rtol=1e-12, cg_maxiter=50)
    assert len(calls) == 5 and "inner_lr" not in result.history
    lam0 = torch.zeros(5, dtype=D)
    one = bilevel.solve(problem, "exact", maxiter=1, outer_optimizer="sgd", outer_lr=1.0)
    torch.testing.assert_close(lam0 - one.outer, ridge_hypergrad(train, val, lam0), rtol=1e-8, atol=1e-12)
    with pytest.raises(BilevelError, match=r"method 'unrolled' cannot honour Problem\(inner_solver=...\).*cg"):
        bilevel.solve(problem, "unrolled", maxiter=1)
    wrong = bilevel.Problem(outer=base.outer, inner=base.inner, inner_loss=base.inner_loss, outer_loss=base.outer_loss,
                            inner_data=train, outer_data=val, inner_solver=lambda lam, w, b: w[:3])
    with pytest.raises(BilevelError, match=r"inner_solver: the inner tensor is \(3,\) float64 on cpu, but the problem's is"):
        bilevel.solve(wrong, "cg", maxiter=1)
