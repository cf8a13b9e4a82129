r"""Preconditioners for :func:`bilevel.linsolve.cg`: maps ``r ↦ M r`` with ``M ≈ A⁻¹`` symmetric positive definite.

:func:`lbfgs_preconditioner` recycles curvature from an earlier solve. Along a hyperparameter run the inner Hessian
changes little from one outer step to the next, so the pairs (p_k, A p_k) one CG solve met are a nearly free
approximation of the next solve's operator: no Hessian-vector product is spent on building it (Morales & Nocedal,
2000, "Automatic Preconditioning by Limited Memory Quasi-Newton Updating", SIAM J. Optim. 10(4)).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from bilevel import tree
from bilevel.errors import BilevelError
from bilevel.types import Params

CurvaturePair = tuple[Params, Params]
"""(s, y) with y = A s: a direction and the operator applied to it."""


class LBFGSPreconditioner:
    r"""The limited-memory BFGS inverse approximation H ≈ A⁻¹ built from curvature pairs (s_i, y_i = A s_i),
    i = 1..m, starting from H₀ = γI with γ = s_mᵀy_m / y_mᵀy_m, applied in the compact form of Byrd, Nocedal &
    Schnabel, 1994, "Representations of quasi-Newton matrices and their use in limited memory methods", Math.
    Program. 63 (their eq. 3.1 for the inverse):

    .. math::
        H = \gamma I + \begin{bmatrix} S & \gamma Y \end{bmatrix}
        \begin{bmatrix} R^{-\top}(D + \gamma Y^\top Y) R^{-1} & -R^{-\top} \\ -R^{-1} & 0 \end{bmatrix}
        \begin{bmatrix} S^\top \\ \gamma Y^\top \end{bmatrix},

    with S = [s_1 … s_m], Y = [y_1 … y_m], R the upper triangle of SᵀY and D its diagonal. H is symmetric positive
    definite when every s_iᵀy_i > 0, and satisfies the secant equation H y_m = s_m (all H y_i = s_i when the pairs
    are A-conjugate, as CG's are). One application costs two products with the m × P matrix [S; Y] and a 2m × 2m
    one, the same as the two-loop recursion's 4m dot products but as two matrix-vector calls.
    """

    def __init__(self, pairs: Sequence[CurvaturePair]):
        if not pairs:
            raise BilevelError("LBFGSPreconditioner: needs at least one curvature pair (s, y = A s).")
        basis = _flat_pairs(pairs)
        self._build(basis, _gram(basis))

    @classmethod
    def _from_basis(cls, basis: Tensor, gram: np.ndarray) -> LBFGSPreconditioner:
        self = cls.__new__(cls)
        self._build(basis, gram)
        return self

    def _build(self, basis: Tensor, gram: np.ndarray) -> None:
        """From ``basis`` = [S; Y] as rows, (2m, P), and its Gram matrix (which holds SᵀY and YᵀY). The 2m × 2m
        algebra runs on the host in float64 numpy: for such small matrices per-op overhead, not flops, is the cost."""
        m = basis.shape[0] // 2
        sy, yy = gram[:m, m:], gram[m:, m:]  # (SᵀY)_ij = s_iᵀ y_j
        curvature = np.diag(sy)
        if not (curvature > 0).all():
            bad = int(np.flatnonzero(curvature <= 0)[0])
            raise BilevelError(
                f"LBFGSPreconditioner: pair {bad} has sᵀy={curvature[bad]:.3g} ≤ 0; every pair needs positive "
                "curvature (a positive-definite A along s). Drop such pairs (lbfgs_preconditioner does)."
            )
        gamma = float(curvature[-1] / yy[-1, -1])
        r_inv = np.linalg.inv(np.triu(sy))
        kernel = np.zeros((2 * m, 2 * m))
        kernel[:m, :m] = r_inv.T @ (np.diag(curvature) + gamma * yy) @ r_inv
        kernel[:m, m:] = -gamma * r_inv.T
        kernel[m:, :m] = -gamma * r_inv
        self._basis = basis
        self._basis_t = basis.T
        self._kernel = torch.from_numpy(kernel).to(device=basis.device, dtype=basis.dtype)
        self.gamma = gamma
        self.size = m

    def __call__(self, r: Params) -> Params:
        """H r = γ r + [S γY] K [S γY]ᵀ r (the γ of γY is folded into the kernel)."""
        flat = tree.flatten(r)
        coefficients = self._kernel @ (self._basis @ flat)
        return tree.unflatten(torch.addmv(flat, self._basis_t, coefficients, beta=self.gamma), r)


def lbfgs_preconditioner(pairs: Sequence[CurvaturePair], *, memory: int = 10) -> LBFGSPreconditioner | None:
    r"""M = H_LBFGS ≈ A⁻¹ from the first ``memory`` pairs with positive curvature sᵀy > 0, or None if there are none.

    Meant for the pairs :func:`bilevel.linsolve.cg` records (``record_pairs``), which are its first ones: CG's first
    directions resolve the largest eigenvalues of A, which is what a preconditioner has to take out. Measured on the
    logistic-regression run of ``benchmarks/hypergrad_trajectory.py`` (pairs from a 30-iteration solve at the previous
    outer step, iterations to a 1e-3 hypergradient): the first 10 pairs 11–15, the last 10 pairs 14–18, warm start
    alone 16–21. Morales & Nocedal, 2000, "Automatic Preconditioning by Limited Memory Quasi-Newton Updating",
    SIAM J. Optim. 10(4).
    """
    if memory < 1:
        raise BilevelError(f"lbfgs_preconditioner: memory must be >= 1, got {memory}.")
    if not pairs:
        return None
    basis = _flat_pairs(pairs)
    gram = _gram(basis)
    m = len(pairs)
    keep = np.flatnonzero(np.diag(gram[:m, m:]) > 0)[:memory]
    if keep.size == 0:
        return None
    if keep.size < m:
        rows = np.concatenate([keep, keep + m])
        basis, gram = basis[torch.as_tensor(rows, device=basis.device)], gram[np.ix_(rows, rows)]
    return LBFGSPreconditioner._from_basis(basis, gram)


def _flat_pairs(pairs: Sequence[CurvaturePair]) -> Tensor:
    """[S; Y] as rows, (2m, P): the pairs' s then their y, each flattened."""
    return torch.stack([tree.flatten(s) for s, _ in pairs] + [tree.flatten(y) for _, y in pairs])


def _gram(basis: Tensor) -> np.ndarray:
    """[S; Y][S; Y]ᵀ in float64 (whatever the working precision: R⁻¹ below amplifies rounding), on the host."""
    wide = basis.to(torch.float64)
    return (wide @ wide.T).cpu().numpy()


def recycle_pairs(
    old: Sequence[CurvaturePair], new: Sequence[CurvaturePair], *, memory: int = 10
) -> tuple[CurvaturePair, ...]:
    """The ``memory`` most recent pairs of ``old`` followed by ``new``, oldest first (the order the BFGS updates take).

    A preconditioned solve that converges in a few iterations records only a few new pairs; topping them up with the
    previous solve's keeps the next preconditioner from losing what the last one knew (measured over 30 outer steps
    of ``cg`` at rtol 1e-8: 126 CG iterations instead of 172 on the ridge, 202 instead of 222 on breast-cancer
    logistic regression, 235 instead of 249 on spambase, against 245, 363 and 375 unpreconditioned).
    """
    return tuple(tuple(old) + tuple(new))[-memory:]
