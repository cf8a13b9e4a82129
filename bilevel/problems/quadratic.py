r"""A synthetic quadratic bilevel problem whose hypergradient and optimum are known in closed form.

.. math::
    G(\lambda, w) = \tfrac12 w^\top A w - w^\top (B\lambda + c),\qquad
    F(\lambda, w) = \tfrac12 (w - t)^\top P (w - t) + \tfrac{\rho}{2}\|\lambda\|^2,

with A ≻ 0 (eigenvalues log-spaced in [1/cond, 1]), P ⪰ 0, ρ > 0; inner dim 100, outer dim 10 by default
(docs/test_problems.md). The inner solution, the hypergradient and the optimum are

.. math::
    w^*(\lambda) = A^{-1}(B\lambda + c),\quad J = A^{-1}B,\quad
    \nabla F(\lambda) = J^\top P (w^*(\lambda) - t) + \rho\lambda,\quad
    \lambda^* = -(J^\top P J + \rho I)^{-1} J^\top P (A^{-1}c - t),

so ``F`` is a strongly convex quadratic of λ: every method's hypergradient error and distance to the optimum can
be measured exactly. The inner Hessian is A, so an inner step size of 1 (= 1/L) is safe and κ(A) = ``cond``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel.errors import BilevelError
from bilevel.problem import Problem
from bilevel.problems._common import as_dtype, outer_of


@dataclasses.dataclass(frozen=True)
class Quadratic:
    """The matrices of the quadratic bilevel problem and its closed forms (see the module docstring).

    Attributes:
        A: inner Hessian (n × n, SPD). B: coupling (n × m). c: inner linear term (n).
        P: outer metric (n × n, PSD). target: t (n). rho: outer ridge ρ on λ.
    """

    A: Tensor
    B: Tensor
    c: Tensor
    P: Tensor
    target: Tensor
    rho: float

    @property
    def inner_dim(self) -> int:
        return int(self.A.shape[0])

    @property
    def outer_dim(self) -> int:
        return int(self.B.shape[1])

    def inner_solution(self, lam: Tensor) -> Tensor:
        """w*(λ) = A⁻¹(Bλ + c)."""
        return torch.linalg.solve(self.A, self.B @ lam.detach() + self.c)

    def value(self, lam: Tensor) -> Tensor:
        """F(λ) = ½(w*(λ) − t)ᵀP(w*(λ) − t) + ½ρ‖λ‖²."""
        lam = lam.detach()
        r = self.inner_solution(lam) - self.target
        return 0.5 * r @ (self.P @ r) + 0.5 * self.rho * lam @ lam

    def hypergrad(self, lam: Tensor) -> Tensor:
        """∇F(λ) = (A⁻¹B)ᵀP(w*(λ) − t) + ρλ."""
        lam = lam.detach()
        r = self.inner_solution(lam) - self.target
        return self.B.T @ torch.linalg.solve(self.A, self.P @ r) + self.rho * lam

    def optimum(self) -> tuple[Tensor, Tensor]:
        """(λ*, F(λ*)) with λ* = −(JᵀPJ + ρI)⁻¹JᵀP(A⁻¹c − t), J = A⁻¹B."""
        j = torch.linalg.solve(self.A, self.B)
        w0 = torch.linalg.solve(self.A, self.c)
        hess = j.T @ self.P @ j + self.rho * torch.eye(self.outer_dim, dtype=j.dtype, device=j.device)
        lam = -torch.linalg.solve(hess, j.T @ (self.P @ (w0 - self.target)))
        return lam, self.value(lam)

    def inner_batch(self) -> dict[str, Tensor]:
        return {"A": self.A, "B": self.B, "c": self.c}

    def outer_batch(self) -> dict[str, Tensor]:
        return {"P": self.P, "target": self.target}


def quadratic_data(
    inner_dim: int = 100, outer_dim: int = 10, *, cond: float = 10.0, rho: float = 0.1, seed: int = 0,
    dtype: torch.dtype | str = torch.float64, device: str | torch.device = "cpu",
) -> Quadratic:
    r"""A random instance: A = Q diag(s) Qᵀ with s log-spaced in [1/cond, 1], B and P = MᵀM/(2n) Gaussian,
    t = w*(λ_true) + noise for λ_true ~ N(0, I) (so λ* lies near λ_true, at distance ~√m from λ = 0).

    Generated in float64 from ``seed`` and then cast, so every dtype and device sees the same instance.
    """
    if inner_dim < 1 or outer_dim < 1:
        raise BilevelError(f"quadratic_data: dimensions must be >= 1, got inner_dim={inner_dim}, outer_dim={outer_dim}.")
    if not cond >= 1:
        raise BilevelError(f"quadratic_data: cond must be >= 1 (the condition number of A), got {cond}.")
    if not rho > 0:
        raise BilevelError(f"quadratic_data: rho must be positive (it makes F strongly convex), got {rho}.")
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    q, _ = torch.linalg.qr(torch.randn(inner_dim, inner_dim, generator=gen, dtype=f64))
    spectrum = torch.logspace(0.0, -math.log10(cond), inner_dim, dtype=f64)
    a = (q * spectrum) @ q.T
    a = 0.5 * (a + a.T)
    b = torch.randn(inner_dim, outer_dim, generator=gen, dtype=f64) / inner_dim**0.5
    c = torch.randn(inner_dim, generator=gen, dtype=f64) / inner_dim**0.5
    m = torch.randn(2 * inner_dim, inner_dim, generator=gen, dtype=f64)
    p = m.T @ m / (2 * inner_dim)
    lam_true = torch.randn(outer_dim, generator=gen, dtype=f64)
    target = torch.linalg.solve(a, b @ lam_true + c) + 0.1 * torch.randn(inner_dim, generator=gen, dtype=f64)
    dt = as_dtype(dtype)
    cast = [x.to(dtype=dt, device=device) for x in (a, b, c, p, target)]
    return Quadratic(*cast, rho=float(rho))


def quadratic_problem(
    data: Quadratic | None = None, *, inner_dim: int = 100, outer_dim: int = 10, cond: float = 10.0,
    rho: float = 0.1, seed: int = 0, dtype: torch.dtype | str = torch.float64, device: str | torch.device = "cpu",
) -> tuple[Problem, Callable[[Any], dict[str, float]]]:
    """Synthetic quadratic bilevel problem with closed-form hypergradient and optimum. Returns (problem, evaluate);
    λ and w start at zero.

    ``evaluate(result_or_outer)`` (a :class:`bilevel.Result`, a solver state or λ) returns ``dist_to_opt``
    ‖λ − λ*‖, ``rel_dist`` ‖λ − λ*‖/‖λ*‖ and ``F_gap`` F(λ) − F(λ*) (exact inner solution, closed form).
    """
    q = data or quadratic_data(inner_dim, outer_dim, cond=cond, rho=rho, seed=seed, dtype=dtype, device=device)
    dt, dev = q.A.dtype, q.A.device
    rho_ = q.rho

    def inner_loss(lam: Tensor, w: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return 0.5 * w @ (batch["A"] @ w) - w @ (batch["B"] @ lam + batch["c"])

    def outer_loss(lam: Tensor, w: Tensor, batch: dict[str, Tensor]) -> Tensor:
        r = w - batch["target"]
        return 0.5 * r @ (batch["P"] @ r) + 0.5 * rho_ * lam @ lam

    problem = Problem(
        outer=torch.zeros(q.outer_dim, dtype=dt, device=dev, requires_grad=True),
        inner=torch.zeros(q.inner_dim, dtype=dt, device=dev),
        inner_loss=inner_loss, outer_loss=outer_loss,
        inner_data=q.inner_batch(), outer_data=q.outer_batch(), name="quadratic",
    )
    lam_star, f_star = q.optimum()

    def evaluate(solution: Any) -> dict[str, float]:
        lam = outer_of(solution).detach().to(dtype=dt, device=dev)
        dist = float(torch.linalg.vector_norm(lam - lam_star))
        return {
            "dist_to_opt": dist,
            "rel_dist": dist / max(float(torch.linalg.vector_norm(lam_star)), 1e-30),
            "F_gap": float(q.value(lam) - f_star),
        }

    return problem, evaluate
