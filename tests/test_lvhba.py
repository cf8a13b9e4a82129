"""LV-HBA (Yao et al., 2024): the paper's toy with a coupled lower-level constraint, and closed forms without one."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bilevel import BilevelError, Problem, projections, solve

# ----- the paper's toy (n = 10) -----------------------------------------------------------------------------------
# min_{x ∈ Rⁿ, y ∈ R²ⁿ} ½‖x − y₂‖² + ½‖y₁ − 1‖²  s.t.  y ∈ argmin_y {½‖y₁‖² − xᵀy₁ + 1ᵀy₂ : 1ᵀx + 1ᵀy = 0},
# (x, y) ∈ C = {1ᵀx + 1ᵀy = 0}. The lower-level solutions are y₁ = x + 1 and any y₂ with 1ᵀy₂ = −2·1ᵀx − n (not
# unique); the upper level then picks x* = −0.3·1, y₁* = 0.7·1, y₂* = −0.4·1 (minimize ½n(3a + 1)² + ½na² over x = a1).
N = 10


def toy_problem(device="cpu", dtype=torch.float64):
    def upper(x, y, batch):
        return 0.5 * ((x - y[N:]) ** 2).sum() + 0.5 * ((y[:N] - 1.0) ** 2).sum()

    def lower(x, y, batch):
        return 0.5 * (y[:N] ** 2).sum() - x @ y[:N] + y[N:].sum()

    def constraint(x, y):  # the equality 1ᵀx + 1ᵀy = 0 as the pair (h, −h) ≤ 0
        h = x.sum() + y.sum()
        return torch.stack([h, -h])

    c_set = projections.joint(projections.affine(torch.ones(3 * N, dtype=dtype, device=device), 0.0))
    return Problem(
        outer=torch.full((N,), 10.0, dtype=dtype, device=device, requires_grad=True),
        inner=torch.full((2 * N,), 10.0, dtype=dtype, device=device),
        inner_loss=lower, outer_loss=upper, inner_constraints=constraint, joint_projection=c_set, name="lvhba_toy",
    )


TOY = dict(lr=0.05, prox_lr=0.05, z_lr=0.2, gamma1=2.0, gamma2=1.0, penalty0=5.0, penalty_power=0.45)


def test_toy_reaches_known_optimum(device):
    """x → −0.3·1, y₁ → 0.7·1, y₂ → −0.4·1 within 1% (max relative error per block; measured ≈0.3%) after 1500
    steps with c_k = 5(k+1)^0.45; (x, y) stays in C; 6 oracle calls per step (2 ∇_y f, 1 ∇_x f, 1 ∇F, 2 VJPs of g)."""
    steps = 1500
    result = solve(toy_problem(device), "lvhba", maxiter=steps, **TOY)
    x, y = result.outer, result.inner
    assert float((x + 0.3).abs().max()) / 0.3 < 0.01
    assert float((y[:N] - 0.7).abs().max()) / 0.7 < 0.01
    assert float((y[N:] + 0.4).abs().max()) / 0.4 < 0.01
    assert abs(float(x.sum() + y.sum())) < 1e-9
    assert result.oracle_calls == {"grad_inner": 2 * steps, "grad_outer": steps, "grad_inner_outer": steps,
                                   "constraint_vjp": 2 * steps}
    assert result.history["oracle_calls"][-1] == 6 * steps
    mu = result.state.mu
    assert mu.shape == (2,) and bool((mu >= 0).all()) and mu.device.type == torch.device(device).type
    assert {"outer_loss", "hypergrad_norm", "penalty", "inner_loss", "max_constraint"} <= set(result.history)


def test_toy_without_joint_projection_does_not_converge():
    """C is part of the method: with only the multiplier enforcing 1ᵀx + 1ᵀy = 0, the iterates run off (the
    lower-level objective is unbounded along y₂ outside C). Guards against the joint projection being skipped."""
    problem = toy_problem()
    free = Problem(outer=problem.outer, inner=problem.inner, inner_loss=problem.inner_loss,
                   outer_loss=problem.outer_loss, inner_constraints=problem.inner_constraints)
    result = solve(free, "lvhba", maxiter=300, **TOY)
    assert float(result.outer.abs().max()) > 1e6  # grows geometrically (measured ~1e13 after 300 steps)


# ----- without constraints: closed form --------------------------------------------------------------------------
# g = ½‖y − Ax‖², F = ½‖y − b‖² + ρ/2‖x‖². The Moreau envelope of g is v_γ = ½‖y − Ax‖²/(1 + γ₁), so with a fixed
# c the penalized problem F/c + g − v_γ is F2SA's penalty function with λ = c·γ₁/(1 + γ₁), whose minimizer in x is
# x*_λ = (κAᵀA + ρI)⁻¹κAᵀb, κ = λ/(1 + λ).
M, NX, RHO = 8, 5, 0.1


def quadratic(noise_loader=None):
    gen = torch.Generator().manual_seed(0)  # A with singular values in [0.8, 1.2]
    u, _ = torch.linalg.qr(torch.randn(M, NX, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(NX, NX, generator=gen, dtype=torch.float64))
    a = u @ torch.diag(torch.linspace(0.8, 1.2, NX, dtype=torch.float64)) @ v.T
    b = torch.randn(M, generator=gen, dtype=torch.float64)

    def inner_loss(x, y, batch):
        extra = batch[0].mean(0) @ y if noise_loader is not None else 0.0
        return 0.5 * ((y - a @ x) ** 2).sum() + extra

    def outer_loss(x, y, batch):
        return 0.5 * ((y - b) ** 2).sum() + 0.5 * RHO * (x**2).sum()

    problem = Problem(outer=torch.zeros(NX, dtype=torch.float64, requires_grad=True),
                      inner=torch.zeros(M, dtype=torch.float64), inner_loss=inner_loss, outer_loss=outer_loss,
                      inner_data=noise_loader)
    return problem, a, b


def penalty_minimizer(a, b, lam):
    k = lam / (1.0 + lam)
    return torch.linalg.solve(k * a.T @ a + RHO * torch.eye(NX, dtype=a.dtype), k * a.T @ b)


@pytest.mark.parametrize("c,gamma1", [(1.0, 1.0), (3.0, 10.0)])
def test_unconstrained_fixed_penalty_matches_closed_form(c, gamma1):
    """No inner_constraints: runs with μ empty (no constraint oracle, 4 calls per step) and with c_k ≡ c
    (penalty_power = 0) converges to x*_λ, λ = cγ₁/(1 + γ₁) (closed form, ≤1e-8)."""
    problem, a, b = quadratic()
    steps = 600
    result = solve(problem, "lvhba", maxiter=steps, lr=0.3, prox_lr=0.8, gamma1=gamma1, penalty0=c, penalty_power=0.0,
                   outer_lr=None)
    torch.testing.assert_close(result.outer, penalty_minimizer(a, b, c * gamma1 / (1 + gamma1)), rtol=0, atol=1e-8)
    assert result.state.mu.numel() == 0 and result.state.z.numel() == 0
    assert result.history["oracle_calls"][-1] == 4 * steps and "calls_constraint_vjp" not in result.history


def test_unconstrained_growing_penalty_beats_fixed():
    """c_k = 3(k+1)^0.3 reaches the bilevel solution x* = (AᵀA + ρI)⁻¹Aᵀb closer than the fixed c = 3 can
    (whose limit is x*_λ at λ = 3·10/11, closed form), after 1000 steps."""
    problem, a, b = quadratic()
    x_star = torch.linalg.solve(a.T @ a + RHO * torch.eye(NX, dtype=torch.float64), a.T @ b)
    fixed_limit_error = float((penalty_minimizer(a, b, 30.0 / 11.0) - x_star).norm())
    result = solve(problem, "lvhba", maxiter=1000, lr=0.6, prox_lr=0.8, gamma1=10.0, penalty0=3.0, penalty_power=0.3,
                   outer_lr=None)
    error = float((result.outer - x_star).norm())
    assert error < 0.5 * fixed_limit_error, (error, fixed_limit_error)


def test_stochastic_dataloader():
    """Inner data from a shuffled DataLoader of noise samples (batch 8, σ = 0.3): ∇_y L_T gets zero-mean noise.
    With fixed c = 1 the iterates reach a noise ball around the closed form x*_λ (λ = 0.5): ‖x − x*_λ‖ < 0.1,
    ≥ 15× below the start ‖x*_λ‖ ≈ 1.7 (loose: constant step sizes; measured 0.02–0.05 over 5 seeds)."""
    gen = torch.Generator().manual_seed(0)
    noise = TensorDataset(0.3 * torch.randn(512, M, generator=gen, dtype=torch.float64))
    loader = DataLoader(noise, batch_size=8, shuffle=True, generator=gen)
    problem, a, b = quadratic(loader)
    target = penalty_minimizer(a, b, 0.5)
    result = solve(problem, "lvhba", maxiter=400, lr=0.3, prox_lr=0.5, gamma1=1.0, penalty0=1.0, penalty_power=0.0,
                   outer_lr=None)
    assert float((result.outer - target).norm()) < 0.1 < float(target.norm()) / 15


# ----- settings and errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options,match",
    [
        (dict(penalty_power=0.5), r"penalty_power=0.5 is not valid; expected a finite number >= 0 and < 0.5"),
        (dict(lr=0.0), r"lr=0.0 is not valid; expected a finite number > 0"),
        (dict(gamma1=-1.0), r"gamma1=-1.0 is not valid"),
        (dict(z_max=0.0), r"z_max=0.0 is not valid"),
        (dict(inner_steps=3), "has no option"),
    ],
)
def test_bad_settings_raise(options, match):
    with pytest.raises(BilevelError, match=match):
        solve(toy_problem(), "lvhba", maxiter=1, **options)


def test_bad_joint_projection_raises():
    problem = toy_problem()
    for bad, match in [(lambda x, y: x, "must return a pair"),
                       (lambda x, y: (x[:3], y), r"joint_projection \(outer\) changed the tensor from \(10,\)")]:
        broken = Problem(outer=problem.outer, inner=problem.inner, inner_loss=problem.inner_loss,
                         outer_loss=problem.outer_loss, inner_constraints=problem.inner_constraints, joint_projection=bad)
        with pytest.raises(BilevelError, match=match):
            solve(broken, "lvhba", maxiter=1)
    with pytest.raises(BilevelError, match="joint_projection must be None or a callable"):
        Problem(outer=problem.outer, inner=problem.inner, inner_loss=problem.inner_loss,
                outer_loss=problem.outer_loss, joint_projection=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """Same toy run on CUDA and CPU (float64): iterates equal up to 1e-9."""
    cpu = solve(toy_problem("cpu"), "lvhba", maxiter=50, **TOY)
    gpu = solve(toy_problem("cuda"), "lvhba", maxiter=50, **TOY)
    torch.testing.assert_close(gpu.outer.cpu(), cpu.outer, rtol=0, atol=1e-9)
    torch.testing.assert_close(gpu.inner.cpu(), cpu.inner, rtol=0, atol=1e-9)


def test_outer_lr_gives_x_its_own_step():
    """Two steps from a point away from the solution, against the update rule written out here with plain autograd
    (f = L_T, F = L_V, no constraints or projections; float64, 1e-12):
    θ ← θ − η(∇_y f(x, θ) + (θ − y)/γ₁), c_k = c̲(k+1)^p,
    x ← x − outer_lr·(∇_x F/c_k + ∇_x f(x, y) − ∇_x f(x, θ)), y ← y − α(∇_y F/c_k + ∇_y f(x, y) − (y − θ)/γ₁).
    Step 1's y does not depend on outer_lr (equal to the run without it); its x does, by more than 0.05 (measured
    0.14 = (0.4 − 0.1)·‖d_x‖)."""
    base, a, b = quadratic()
    x0 = torch.linspace(-1.0, 1.0, NX, dtype=torch.float64)
    y0 = torch.linspace(0.5, -0.5, M, dtype=torch.float64)
    problem = Problem(outer=x0.clone().requires_grad_(True), inner=y0.clone(), inner_loss=base.inner_loss,
                      outer_loss=base.outer_loss)
    settings = dict(lr=0.1, prox_lr=0.2, gamma1=2.0, penalty0=3.0, penalty_power=0.3, gamma2=10.0)
    outer_lr = 0.4

    def grad(fn, x, y):
        x, y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        return torch.autograd.grad(fn(x, y, None), (x, y))

    x, y, theta = x0.clone(), y0.clone(), y0.clone()
    expected = []
    for k in range(2):
        theta = theta - settings["prox_lr"] * (grad(base.inner_loss, x, theta)[1] + (theta - y) / settings["gamma1"])
        c_k = settings["penalty0"] * (k + 1) ** settings["penalty_power"]
        big_fx, big_fy = grad(base.outer_loss, x, y)
        fx, fy = grad(base.inner_loss, x, y)
        d_x = big_fx / c_k + fx - grad(base.inner_loss, x, theta)[0]
        d_y = big_fy / c_k + fy - (y - theta) / settings["gamma1"]
        x, y = x - outer_lr * d_x, y - settings["lr"] * d_y
        expected.append((x, y, theta))

    states, plain = [], []
    solve(problem, "lvhba", maxiter=2, outer_lr=outer_lr, callbacks=[lambda info: states.append(info.state)], **settings)
    solve(problem, "lvhba", maxiter=1, outer_lr=None, callbacks=[lambda info: plain.append(info.state)], **settings)
    for state, (x, y, theta) in zip(states, expected, strict=True):
        torch.testing.assert_close(state.outer, {"value": x}, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state.inner, {"value": y}, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state.theta, {"value": theta}, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(plain[0].inner, states[0].inner, rtol=1e-12, atol=1e-14)
    assert float((plain[0].outer["value"] - states[0].outer["value"]).norm()) > 0.05
