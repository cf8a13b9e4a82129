"""The ``unrolled`` solver's settings ``reset_inner`` and ``first_order``.

Oracles: on L_T = ½wᵀAw − wᵀBλ, L_V = ½‖w − c‖², T SGD steps are linear, w_T = M^T w_s + Jλ with M = I − ηA and
J = Σ_{t<T} M^t ηB, so dL_V(w_T)/dλ = Jᵀ(w_T − c), and with plain SGD on λ every outer step has a closed form
(float64, 1e-10). For ``first_order`` a plain-autograd reference that differentiates through T SGD steps with the inner
gradients detached (and, for contrast, the full one with ``create_graph=True``), and its closed form ∂_λ L_V.
"""

import pytest
import torch
import torch.nn.functional as F

import bilevel
from bilevel import Problem
from bilevel.data import DataStreams
from bilevel.solvers.unrolled import Unrolled

D, M_OUT, T, ETA = 6, 3, 5, 0.1


def linear_case():
    """(problem, A, B, c, w0, λ0): the linear-quadratic problem of the module docstring."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(D, D, generator=gen, dtype=torch.float64)
    a = q @ q.T / D + torch.eye(D, dtype=torch.float64)
    b = torch.randn(D, M_OUT, generator=gen, dtype=torch.float64)
    c = torch.randn(D, generator=gen, dtype=torch.float64)
    w0 = torch.randn(D, generator=gen, dtype=torch.float64)
    lam0 = torch.randn(M_OUT, generator=gen, dtype=torch.float64)
    problem = Problem(outer=lam0.clone().requires_grad_(True), inner=w0.clone(),
                      inner_loss=lambda lam, w, _: 0.5 * w @ a @ w - w @ (b @ lam),
                      outer_loss=lambda lam, w, _: 0.5 * ((w - c) ** 2).sum())
    return problem, a, b, c, w0, lam0


def closed_form_run(a, b, c, w0, lam0, steps, outer_lr, reset):
    """λ after ``steps`` outer steps of SGD on λ, w after the last unroll, and each step's ‖dL_V/dλ‖."""
    mm = torch.eye(D, dtype=torch.float64) - ETA * a
    jac = sum(torch.linalg.matrix_power(mm, t) @ (ETA * b) for t in range(T))
    lam, w, norms = lam0.clone(), w0.clone(), []
    for _ in range(steps):
        start = w0 if reset else w
        w = torch.linalg.matrix_power(mm, T) @ start + jac @ lam
        g = jac.T @ (w - c)
        norms.append(float(g.norm()))
        lam = lam - outer_lr * g
    return lam, w, norms


@pytest.mark.parametrize("reset", [True, False])
def test_reset_inner_unrolls_every_step_from_the_initial_w(reset):
    """With ``reset_inner`` every outer step unrolls from the problem's initial w; without it from the previous
    step's w_T (truncated back-propagation). Both runs equal their closed form (λ, w and each step's hypergradient
    norm to 1e-10), and the two closed forms are far apart (> 0.1), so each run tells them apart."""
    problem, a, b, c, w0, lam0 = linear_case()
    steps, outer_lr = 4, 0.5
    result = bilevel.solve(problem, "unrolled", maxiter=steps, inner_steps=T, inner_lr=ETA, outer_optimizer="sgd",
                           outer_lr=outer_lr, reset_inner=reset)
    lam, w, norms = closed_form_run(a, b, c, w0, lam0, steps, outer_lr, reset)
    torch.testing.assert_close(result.outer, lam, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.inner, w, rtol=1e-10, atol=1e-12)
    assert result.history["hypergrad_norm"] == pytest.approx(norms, rel=1e-10)
    other_lam, other_w, _ = closed_form_run(a, b, c, w0, lam0, steps, outer_lr, not reset)
    assert float((other_lam - lam).norm()) > 0.1 and float((other_w - w).norm()) > 0.1


# ----- first_order ------------------------------------------------------------------------------------------------
RHO = 0.1  # weight of the hyperprior ½ρ‖λ‖² in L_V: the part of dF/dλ that first order keeps


def logistic_case():
    """Logistic regression with per-weight L2 penalties e^λ (L_T) and a validation loss with a hyperprior on λ (L_V)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(60, 5, generator=gen, dtype=torch.float64)
    y = torch.sign(x @ torch.randn(5, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(60, generator=gen,
                                                                                              dtype=torch.float64))
    train, val = (x[:30], y[:30]), (x[30:], y[30:])
    lam0 = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    w0 = 0.1 * torch.ones(5, dtype=torch.float64)

    def inner_loss(lam, w, batch):
        xb, yb = batch
        return F.softplus(-yb * (xb @ w)).mean() + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(lam, w, batch):
        xb, yb = batch
        return F.softplus(-yb * (xb @ w)).mean() + 0.5 * RHO * (lam**2).sum()

    problem = Problem(outer=lam0.clone().requires_grad_(True), inner=w0.clone(), inner_loss=inner_loss,
                      outer_loss=outer_loss, inner_data=train, outer_data=val)
    return problem, train, val, lam0, w0


def autograd_reference(problem, train, val, lam0, w0, lr, steps, detach):
    """dL_V(λ, w_T)/dλ through ``steps`` SGD steps written with torch.autograd; ``detach``: the inner gradients are
    constants (no graph through them)."""
    lam = lam0.clone().requires_grad_(True)
    w = w0.clone().requires_grad_(True)
    for _ in range(steps):
        (g,) = torch.autograd.grad(problem.inner_loss(lam, w, train), w, create_graph=not detach)
        w = w - lr * g
    return torch.autograd.grad(problem.outer_loss(lam, w, val), lam)[0]


def test_first_order_drops_the_second_order_terms():
    """``first_order=True`` equals plain autograd with the inner gradients detached (1e-12), which here is ∂_λL_V = ρλ
    in closed form; the full hypergradient equals autograd through the graph (1e-10) and differs from the first-order
    one by more than 10% of its norm (measured 33%). Through ``solve`` with SGD on λ, one step moves λ by
    −η·(that gradient)."""
    problem, train, val, lam0, w0 = logistic_case()
    lr, steps = 0.5, 6
    data = DataStreams(train, val)
    ours = {fo: Unrolled(inner_steps=steps, inner_lr=lr, first_order=fo).hypergradient(
        problem, {"value": lam0}, {"value": w0}, data).hypergrad["value"] for fo in (True, False)}
    detached = autograd_reference(problem, train, val, lam0, w0, lr, steps, detach=True)
    full = autograd_reference(problem, train, val, lam0, w0, lr, steps, detach=False)
    torch.testing.assert_close(detached, RHO * lam0, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours[True], detached, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours[False], full, rtol=1e-10, atol=1e-13)
    assert float((full - detached).norm()) > 0.1 * float(full.norm())

    outer_lr = 0.3
    for fo, expected in ((True, detached), (False, full)):
        result = bilevel.solve(problem, "unrolled", maxiter=1, inner_steps=steps, inner_lr=lr, first_order=fo,
                               outer_optimizer="sgd", outer_lr=outer_lr)
        torch.testing.assert_close(result.outer, lam0 - outer_lr * expected, rtol=1e-12, atol=1e-14)
