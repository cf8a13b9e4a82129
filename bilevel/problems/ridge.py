r"""Per-weight ridge regression: the analytic test problem of implicit differentiation.

.. math::
    L_T(\lambda, w) = \tfrac12\|X_t w - y_t\|^2 + \tfrac12 \sum_j e^{\lambda_j} w_j^2,\qquad
    L_V(w) = \tfrac12\|X_v w - y_v\|^2.

With H = X_tᵀX_t + diag(e^λ): w* = H⁻¹X_tᵀy_t and
dL_V/dλ_j = −e^{λ_j} w*_j (H⁻¹X_vᵀ(X_v w* − y_v))_j (Lorraine et al., 2020, App.; docs/test_problems.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bilevel.problem import Problem


def ridge_data(
    n_train: int = 40, n_val: int = 40, dim: int = 8, *, noise: float = 0.5, seed: int = 0,
    dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Synthetic linear-regression data ``((X_t, y_t), (X_v, y_v))`` with a sparse true weight vector."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64  # drawn in float64 and cast, so every dtype sees the same data
    w_true = torch.zeros(dim, dtype=f64)
    w_true[: max(1, dim // 2)] = torch.randn(max(1, dim // 2), generator=gen, dtype=f64)
    xt = torch.randn(n_train, dim, generator=gen, dtype=f64)
    xv = torch.randn(n_val, dim, generator=gen, dtype=f64)
    yt = xt @ w_true + noise * torch.randn(n_train, generator=gen, dtype=f64)
    yv = xv @ w_true + noise * torch.randn(n_val, generator=gen, dtype=f64)
    return tuple((x.to(device, dtype), y.to(device, dtype)) for x, y in ((xt, yt), (xv, yv)))  # type: ignore[return-value]


def ridge_problem(
    train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], log_lam: Tensor | None = None
) -> Problem:
    """The per-weight ridge :class:`Problem` (``outer`` = log-penalties λ ∈ R^d, ``inner`` = w ∈ R^d)."""
    xt = train[0]
    dim = xt.shape[1]
    if log_lam is None:
        log_lam = torch.zeros(dim, dtype=xt.dtype, device=xt.device, requires_grad=True)

    def inner_loss(lam: Tensor, w: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return 0.5 * ((x @ w - y) ** 2).sum() + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(lam: Tensor, w: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return 0.5 * ((x @ w - y) ** 2).sum()

    return Problem(
        outer=log_lam, inner=torch.zeros(dim, dtype=xt.dtype, device=xt.device),
        inner_loss=inner_loss, outer_loss=outer_loss, inner_data=train, outer_data=val, name="ridge",
    )


def ridge_solution(train: tuple[Tensor, Tensor], log_lam: Tensor) -> Tensor:
    """w*(λ) = (X_tᵀX_t + diag(e^λ))⁻¹ X_tᵀ y_t."""
    x, y = train
    h = x.T @ x + torch.diag(log_lam.exp())
    return torch.linalg.solve(h, x.T @ y)


def ridge_hypergrad(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], log_lam: Tensor) -> Tensor:
    """Closed-form dL_V/dλ_j = −e^{λ_j} w*_j (H⁻¹ X_vᵀ(X_v w* − y_v))_j."""
    x, _ = train
    xv, yv = val
    lam = log_lam.detach()
    h = x.T @ x + torch.diag(lam.exp())
    w = ridge_solution(train, lam)
    v = torch.linalg.solve(h, xv.T @ (xv @ w - yv))
    return -lam.exp() * w * v


def ridge_val_loss(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], log_lam: Tensor) -> Tensor:
    """F(λ) = L_V(w*(λ)) in closed form (for grid searches)."""
    xv, yv = val
    w = ridge_solution(train, log_lam)
    return 0.5 * ((xv @ w - yv) ** 2).sum()
