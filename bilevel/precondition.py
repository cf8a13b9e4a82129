r"""Preconditioners for :func:`bilevel.linsolve.cg`: maps ``r ↦ M r`` with ``M ≈ A⁻¹`` symmetric positive definite.

:func:`lbfgs_preconditioner` recycles curvature from an earlier solve. Along a hyperparameter run the inner Hessian
changes little from one outer step to the next, so the pairs (p_k, A p_k) one CG solve met are a nearly free
approximation of the next solve's operator: no Hessian-vector product is spent on building it (Morales & Nocedal,
2000, "Automatic Preconditioning by Limited Memory Quasi-Newton Updating", SIAM J. Optim. 10(4)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bilevel import tree
from bilevel.problem import BilevelError
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
        self._build(_flat_pairs(pairs))

    @classmethod
    def _from_basis(cls, basis: Tensor) -> LBFGSPreconditioner:
        self = cls.__new__(cls)
        self._build(basis)
        return self

    def _build(self, basis: Tensor) -> None:
        """From ``basis`` = [S; Y] as rows, (2m, P)."""
        m = basis.shape[0] // 2
        # one product gives SᵀY, YᵀY (and SᵀS); the 2m × 2m algebra is done on the host in float64
        gram = (basis @ basis.T).to("cpu", torch.float64)
        sy, yy = gram[:m, m:], gram[m:, m:]  # (SᵀY)_ij = s_iᵀ y_j
        curvature = sy.diagonal()
        if not bool((curvature > 0).all()):
            bad = int((curvature <= 0).nonzero()[0])
            raise BilevelError(
                f"LBFGSPreconditioner: pair {bad} has sᵀy={float(curvature[bad]):.3g} ≤ 0; every pair needs positive "
                "curvature (a positive-definite A along s). Drop such pairs (lbfgs_preconditioner does)."
            )
        gamma = float(curvature[-1] / yy[-1, -1])
        r_inv = torch.linalg.inv(sy.triu())
        kernel = torch.zeros(2 * m, 2 * m, dtype=torch.float64)
        kernel[:m, :m] = r_inv.T @ (torch.diag(curvature) + gamma * yy) @ r_inv
        kernel[:m, m:] = -gamma * r_inv.T
        kernel[m:, :m] = -gamma * r_inv
        self._basis = basis
        self._basis_t = basis.T
        self._kernel = kernel.to(device=basis.device, dtype=basis.dtype)
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
    m = len(pairs)
    keep = ((basis[:m] * basis[m:]).sum(dim=1) > 0).nonzero().flatten()[:memory]  # one host sync for all pairs
    if keep.numel() == 0:
        return None
    return LBFGSPreconditioner._from_basis(torch.cat([basis[:m][keep], basis[m:][keep]]))


def _flat_pairs(pairs: Sequence[CurvaturePair]) -> Tensor:
    """[S; Y] as rows, (2m, P): the pairs' s then their y, each flattened."""
    return torch.stack([tree.flatten(s) for s, _ in pairs] + [tree.flatten(y) for _, y in pairs])


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
