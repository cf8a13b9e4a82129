"""Linear solvers against torch.linalg.solve on random SPD systems (oracle: dense LU), dtype and batching."""

import functools
import math
import re

import pytest
import torch

from bilevel import BilevelError, tree
from bilevel.linsolve import NeumannDivergenceError, cg, exact, neumann


def symmetric_system(eig: torch.Tensor, *, u_shape: tuple[int, ...], dtype: torch.dtype = torch.float64,
                     device: str = "cpu", seed: int = 0):
    """(A, b, b as Params, matvec) with A = Q diag(eig) Qᵀ for a random orthogonal Q and a random b (drawn in that
    order from ``seed``, in float64); the Params split b into "u" of ``u_shape`` and the rest "v"."""
    n = eig.numel()
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = (q * eig.to(torch.float64)) @ q.T
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    a, b = a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device)
    split = math.prod(u_shape)
    params = {"u": b[:split].reshape(u_shape), "v": b[split:]}

    def matvec(p):
        return tree.unflatten(a @ tree.flatten(p), p)

    return a, b, params, matvec


def spd_system(n: int = 12, cond: float = 4.0, dtype: torch.dtype = torch.float64, device: str = "cpu", seed: int = 0):
    """Eigenvalues evenly spaced in [1, cond]."""
    eig = torch.linspace(1.0, cond, n, dtype=torch.float64)
    return symmetric_system(eig, u_shape=(n // 3, 1), dtype=dtype, device=device, seed=seed)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_cg_and_exact_match_dense_solve(dtype, rtol, device):
    a, b, params, matvec = spd_system(dtype=dtype, device=device)
    reference = torch.linalg.solve(a, b)
    for result in (cg(matvec, params, rtol=1e-12 if dtype == torch.float64 else 1e-7, maxiter=100), exact(matvec, params)):
        torch.testing.assert_close(tree.flatten(result.x), reference, rtol=rtol, atol=rtol)
        assert float(result.residual) < 10 * rtol


def test_neumann_error_falls_geometrically_and_residual_bounds_it():
    a, b, params, matvec = spd_system(cond=4.0)
    reference = torch.linalg.solve(a, b)
    alpha = 1.0 / 4.0  # 1/L
    errors, residuals = [], []
    for k in (0, 1, 5, 20, 60):
        result = neumann(matvec, params, alpha=alpha, maxiter=k)
        x = tree.flatten(result.x)
        errors.append(float((x - reference).norm() / reference.norm()))
        true_residual = float((b - a @ x).norm() / b.norm())
        assert true_residual <= float(result.residual) + 1e-12  # reported residual bounds the true one (PSD, α < 2/L)
        residuals.append(float(result.residual))
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < 1e-6  # contraction factor 1 − α·λ_min = 0.75: 0.75^61 ≈ 2e-8


def test_neumann_divergence_names_a_converging_step_size():
    _, _, params, matvec = spd_system(cond=4.0)  # λ_max = 4, so α must be < 0.5
    with pytest.raises(NeumannDivergenceError, match=r"alpha=0.9 exceeds 2/L≈0\.5\d*") as info:
        neumann(matvec, params, alpha=0.9, maxiter=50)
    suggested = float(re.search(r"neumann_alpha=([0-9.e-]+)", str(info.value)).group(1))
    assert 0.2 < suggested < 0.5
    neumann(matvec, params, alpha=suggested, maxiter=200)  # the advice converges: no error


def test_cg_warm_start_and_negative_curvature():
    """A start 1e-6 from the solution (initial residual ≈ 3e-5·‖b‖) has five of the ten decades to 1e-10 already
    done: at most 75% of the cold run's iterations in the same test (measured 33 against 66, the extra product for
    the initial residual included), and both reach the dense solve (κ·rtol = 5e-9 bounds the error; checked 1e-8).
    On a system small enough for CG to terminate in n steps (n = 12) a warm start cannot save anything measurable."""
    a, b, params, matvec = spd_system(n=200, cond=50.0)
    reference = torch.linalg.solve(a, b)
    x0 = tree.unflatten(reference + 1e-6, params)
    warm = cg(matvec, params, x0=x0, rtol=1e-10, maxiter=500)
    cold = cg(matvec, params, rtol=1e-10, maxiter=500)
    assert warm.iterations <= 0.75 * cold.iterations, (warm.iterations, cold.iterations)
    for result in (warm, cold):
        assert float((tree.flatten(result.x) - reference).norm() / reference.norm()) <= 1e-8
    with pytest.raises(BilevelError, match="non-positive curvature"):
        cg(lambda p: tree.scale(matvec(p), -1.0), params)


def test_solvers_vmap_over_right_hand_sides():
    """check=False solvers run under torch.func.vmap: 5 right-hand sides at once equal 5 separate solves."""
    a, _, params, matvec = spd_system()
    rhs = torch.randn(5, a.shape[0], dtype=a.dtype)
    batched_params = tree.unflatten_batched(rhs, params)
    solvers = (functools.partial(cg, maxiter=30, check=False), functools.partial(neumann, alpha=0.25, maxiter=30, check=False))
    for solver in solvers:
        batched = torch.func.vmap(lambda p, s=solver: s(matvec, p).x)(batched_params)
        for i in range(5):
            single = solver(matvec, tree.unflatten(rhs[i], params)).x
            for k in single:
                torch.testing.assert_close(batched[k][i], single[k], rtol=1e-10, atol=1e-12)


def test_exact_refuses_huge_systems():
    _, _, params, matvec = spd_system()
    with pytest.raises(BilevelError, match="exceed max_size=5"):
        exact(matvec, params, max_size=5)


def test_unchecked_cg_is_standard_cg_on_indefinite_systems():
    """Symmetric indefinite, nonsingular A (eigenvalues ±1..±3): n steps of plain CG solve it exactly (Hestenes–Stiefel
    termination, no breakdown here); oracle: torch.linalg.solve, 1e-8. The checked solver refuses the same system."""
    gen = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    a = (q * torch.tensor([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0], dtype=torch.float64)) @ q.T
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    params = {"x": b}
    result = cg(lambda p: {"x": a @ p["x"]}, params, maxiter=6, check=False)
    torch.testing.assert_close(result.x["x"], torch.linalg.solve(a, b), rtol=1e-8, atol=1e-8)
    with pytest.raises(BilevelError, match="non-positive curvature"):
        cg(lambda p: {"x": a @ p["x"]}, params, maxiter=6)
