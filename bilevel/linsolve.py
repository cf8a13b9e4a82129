r"""Solvers for ``A x = b`` with ``A`` given only as a matrix-vector product (``A = ∇²_ww L_T`` here).

Every solver has the signature ``solve(matvec, b, *, ...) -> LinSolveResult`` (like jaxopt's ``linear_solve``),
so Neumann, CG and the exact dense solve are interchangeable in :func:`bilevel.hypergrad.implicit_hypergrad`.
With ``check=False`` they run a fixed number of iterations with no host synchronisation and no data-dependent
control flow, which is what ``torch.func.vmap`` (over tasks or right-hand sides) requires.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bilevel import tree
from bilevel.errors import BilevelError
from bilevel.precondition import CurvaturePairs, _Storage
from bilevel.types import MatVec, Params


@dataclasses.dataclass(frozen=True)
class LinSolveResult:
    """x ≈ A⁻¹b with diagnostics.

    Attributes:
        x: the solution estimate.
        iterations: matrix-vector products spent.
        residual: ‖b − A x‖ / ‖b‖ (see each solver for how it is obtained; a 0-d tensor).
        pairs: curvature pairs (p, A p) met on the way (``cg(..., record_pairs=m)``: a
            :class:`~bilevel.precondition.CurvaturePairs`, one matrix with room for m pairs; ``()`` otherwise).
    """

    x: Params
    iterations: int
    residual: Tensor
    pairs: Sequence[tuple[Params, Params]] = ()


LinearSolver = Callable[..., LinSolveResult]


class NeumannDivergenceError(BilevelError):
    """The Neumann series grew instead of shrinking: the step size exceeds 2/λ_max(A) or A is not PSD."""


def neumann(
    matvec: MatVec,
    b: Params,
    *,
    alpha: float = 0.1,
    maxiter: int = 10,
    divergence_factor: float = 1.0,
    check: bool = True,
    lipschitz: float | None = None,
    power_iterations: int = 20,
) -> LinSolveResult:
    r"""Truncated Neumann series, Lorraine, Vicol & Duvenaud, 2020, "Optimizing Millions of Hyperparameters by
    Implicit Differentiation", AISTATS.

    .. math::
        A^{-1} b \approx \alpha \sum_{j=0}^{i} (I - \alpha A)^j b,\qquad i = \text{maxiter},

    which converges for ``0 < alpha < 2/λ_max(A)`` and PSD ``A``; with ``i`` terms it equals unrolling ``i`` steps
    of gradient descent from the optimum. Costs ``maxiter`` matvecs.

    ``residual`` is ‖(I − αA)^i b‖/‖b‖ = ‖b − A x_{i−1}‖/‖b‖, the residual of the series one term shorter: an
    upper bound on the returned ``x``'s residual whenever the series contracts, obtained without an extra matvec.

    Divergence: for PSD A and 0 < α < 2/λ_max every eigencomponent of v_i = (I − αA)^i b shrinks, so ‖v_i‖ ≤ ‖b‖;
    ‖v_i‖ above ``divergence_factor``·‖b‖ (beyond rounding; checked once, after the last term) proves α ≥ 2/λ_max
    or an indefinite A, and raises :class:`NeumannDivergenceError` with a step size that would converge (estimated
    by power iteration). A divergent component too small to lift the whole norm within ``maxiter`` terms is not
    caught by the growth alone, so with ``check`` α is also held against λ_max: ``lipschitz`` when given (the ``ift``
    solver passes its curvature estimate), else a power-iteration estimate from ``power_iterations`` extra matvecs;
    α·λ_max ≥ 2 raises before the series runs.
    A cheap product that carries a ``precise`` attribute (mixed precision, see :func:`cg`) is replaced by the
    precise one: the series has no residual to correct, so it would keep the low precision's error.
    """
    matvec = getattr(matvec, "precise", None) or matvec
    if not (math.isfinite(alpha) and alpha > 0):
        raise BilevelError(f"neumann: alpha must be a finite number > 0, got {alpha}.")
    if maxiter < 0:
        raise BilevelError(f"neumann: maxiter must be >= 0, got {maxiter}.")
    if check:
        estimate = lipschitz if lipschitz is not None else power_iteration(matvec, b, maxiter=power_iterations)
        if alpha * estimate >= 2.0:
            raise NeumannDivergenceError(f"neumann: the series would diverge: {step_advice(alpha, estimate)}")
    v = b
    p = b
    for _ in range(maxiter):
        v = tree.axpy(-alpha, matvec(v), v)
        p = tree.add(p, v)
    b_norm = tree.norm(b)
    v_norm = tree.norm(v)
    tiny = torch.finfo(b_norm.dtype).tiny
    if check:  # one host sync for the whole series
        growth = v_norm / b_norm.clamp_min(tiny)
        slack = max(1e-4, 10 * (maxiter + 1) * torch.finfo(b_norm.dtype).eps)
        if not bool(torch.isfinite(growth) & (growth <= divergence_factor * (1 + slack))):
            _raise_divergence(matvec, b, alpha, maxiter, float(growth))
    residual = v_norm / b_norm.clamp_min(tiny)
    return LinSolveResult(x=tree.scale(p, alpha), iterations=maxiter, residual=residual)


def _raise_divergence(matvec: MatVec, b: Params, alpha: float, term: int, growth: float) -> None:
    lipschitz = power_iteration(matvec, b, maxiter=50)
    raise NeumannDivergenceError(f"neumann: series diverged (|v| grew {growth:.3g}x over {term} terms); "
                                 f"{step_advice(alpha, lipschitz)}")


def step_advice(alpha: float, lipschitz: float) -> str:
    """What to do about a Neumann step ``alpha`` too large for the curvature estimate ``lipschitz`` ≈ λ_max."""
    if math.isfinite(lipschitz) and lipschitz > 0:
        bound = 2.0 / lipschitz
        return (f"alpha={alpha:g} exceeds 2/L≈{bound:.3g} (L≈{lipschitz:.3g} by power iteration); "
                f"pass neumann_alpha={0.5 * bound:.3g} (≈1/L) or use method='cg'.")
    return "the Hessian looks indefinite or non-finite; lower the step size or use method='cg' with more inner steps."


def power_iteration(matvec: MatVec, v0: Params, *, maxiter: int = 20) -> float:
    r"""Estimate of the largest-magnitude eigenvalue |λ|_max(A) of symmetric ``A`` (see :func:`power_method`)."""
    return power_method(matvec, v0, maxiter=maxiter)[0]


def power_method(matvec: MatVec, v0: Params, *, maxiter: int = 20) -> tuple[float, Params]:
    r"""(|vᵀAv|, v) after ``maxiter`` power iterations v ← Av/‖Av‖ from ``v0``: the Rayleigh quotient, a lower
    bound on |λ|_max(A) of symmetric ``A``, and the unit vector it was taken at (the top eigenvector's estimate, a
    warm start for the next estimate). Two host syncs per iteration."""
    v = tree.scale(v0, 1.0 / tree.norm(v0).clamp_min(1e-30))
    estimate = float("nan")
    for _ in range(maxiter):
        av = matvec(v)
        estimate = abs(float(tree.dot(v, av)))
        n = tree.norm(av)
        if not math.isfinite(float(n)) or float(n) == 0.0:
            break
        v = tree.scale(av, 1.0 / n)
    return estimate, v


def cg(
    matvec: MatVec,
    b: Params,
    *,
    x0: Params | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int = 50,
    check: bool = True,
    preconditioner: MatVec | None = None,
    record_pairs: int = 0,
    precise_matvec: MatVec | None = None,
    reliable_delta: float = 0.1,
) -> LinSolveResult:
    r"""Preconditioned conjugate gradient for symmetric positive-definite ``A`` (Hestenes & Stiefel, 1952), with
    ``M`` = ``preconditioner`` ≈ A⁻¹ (SPD; identity when None):

    .. math::
        r_0 = b - A x_0,\ z_0 = M r_0,\ p_0 = z_0;\quad \alpha_k = \frac{r_k^\top z_k}{p_k^\top A p_k},\
        x_{k+1} = x_k + \alpha_k p_k,\ r_{k+1} = r_k - \alpha_k A p_k,\ z_{k+1} = M r_{k+1},\
        p_{k+1} = z_{k+1} + \frac{r_{k+1}^\top z_{k+1}}{r_k^\top z_k} p_k.

    Stops when ‖r‖ ≤ max(rtol·‖b‖, atol) or after ``maxiter`` matvecs (one more when ``x0`` is given).
    ``residual`` is the recursively updated ‖r‖/‖b‖ (the unpreconditioned residual, so ``rtol`` means the same
    with and without ``M``). With ``check=True``, non-positive curvature pᵀAp ≤ 0 (A not PD) raises; with
    ``check=False`` the loop runs ``maxiter`` (preconditioned) CG steps with no host synchronisation
    (``vmap``-able, e.g. over right-hand sides with one shared ``M``), taking negative-curvature steps as standard CG
    does and skipping only exactly-zero curvature (a converged direction).

    ``record_pairs=m`` keeps the first m curvature pairs (p_k, A p_k) in ``LinSolveResult.pairs`` (needs
    ``check=True``, which guarantees pᵀAp > 0): :func:`bilevel.precondition.lbfgs_preconditioner` turns them into
    a preconditioner for the next, similar system at no extra matvec (Morales & Nocedal, 2000). They are copied
    into the rows of one (2m, P) matrix, allocated at the first pair (a
    :class:`~bilevel.precondition.CurvaturePairs`; :func:`~bilevel.precondition.recycle_pairs` fills its free rows).

    Mixed precision: when ``precise_matvec`` is given (or ``matvec.precise`` exists), ``matvec`` is taken as a
    cheap, inexact product (e.g. Hessian-vector products in bfloat16) and ``precise_matvec`` as the exact one. The
    iteration runs on the cheap products; whenever the recursive residual has fallen by ``reliable_delta`` since
    the last correction, or meets the tolerance, it is replaced by the true residual r = b − A x from one precise
    product ("reliable updates": Sleijpen & van der Vorst, 1996, Computing 56; in mixed precision as in Clark et al.,
    2010, "Solving lattice QCD systems of equations using mixed precision solvers on GPUs", CPC 181). The drift
    between recursive and true residual is then reset before it can matter, so a converged answer reaches the
    working precision's accuracy while most products are cheap; the stopping test is made on a true residual.
    Convergence follows the cheap operator, slower where κ(A)·u_cheap is not small. Costs
    ``maxiter`` cheap products plus about log(‖b‖/‖r‖)/log(1/reliable_delta) precise ones; needs ``check=True``.
    """
    if maxiter < 0:
        raise BilevelError(f"cg: maxiter must be >= 0, got {maxiter}.")
    precise = precise_matvec if precise_matvec is not None else getattr(matvec, "precise", None)
    if precise is not None:
        if not check:
            raise BilevelError(
                "cg: mixed precision (a precise_matvec next to the cheap matvec) needs check=True: the reliable "
                "updates decide on the host when to correct the residual. Use full-precision products under vmap."
            )
        if not 0.0 < reliable_delta < 1.0:
            raise BilevelError(f"cg: reliable_delta must be in (0, 1), got {reliable_delta}.")
    if record_pairs < 0:
        raise BilevelError(f"cg: record_pairs must be >= 0, got {record_pairs}.")
    if record_pairs and not check:
        raise BilevelError(
            "cg: record_pairs needs check=True: only checked CG guarantees the positive curvature pᵀAp > 0 that a "
            "preconditioner built from the pairs needs."
        )
    iterations = 0
    if x0 is None:
        x = tree.zeros_like(b)
        r = b
    else:
        x = x0
        r = tree.sub(b, (precise or matvec)(x0))
        iterations += 1
    b_norm = tree.norm(b)
    if check:
        rs = float(tree.sq_norm(r))
        reliable = None if precise is None else _ReliableUpdate(precise, b, reliable_delta, rs)
        return _cg_checked(matvec, x, r, rs, float(b_norm), rtol, atol, maxiter, iterations, reliable,
                           preconditioner, record_pairs)
    z = r if preconditioner is None else preconditioner(r)
    p = z
    rz = tree.dot(r, z)
    tiny = torch.finfo(rz.dtype).tiny
    for _ in range(maxiter):
        ap = matvec(p)
        iterations += 1
        curvature = tree.dot(p, ap)
        nonzero = curvature != 0
        step = torch.where(nonzero, rz / torch.where(nonzero, curvature, torch.ones_like(curvature)), torch.zeros_like(rz))
        x = tree.axpy(step, p, x)
        r = tree.axpy(-step, ap, r)
        z = r if preconditioner is None else preconditioner(r)
        rz_new = tree.dot(r, z)
        p = tree.axpy(rz_new / rz.clamp_min(tiny), p, z)
        rz = rz_new
    residual = tree.norm(r) / b_norm.clamp_min(tiny)
    return LinSolveResult(x=x, iterations=iterations, residual=residual)


class _ReliableUpdate:
    """Residual replacement for mixed-precision CG: r ← b − A x by a precise product once ‖r‖² has fallen by
    δ² since the last replacement (or below the stopping threshold)."""

    def __init__(self, precise: MatVec, b: Params, delta: float, rs: float):
        self.precise, self.b, self.delta_sq, self.rs_at_last = precise, b, delta * delta, rs

    def due(self, rs: float, threshold: float) -> bool:
        return rs <= self.delta_sq * self.rs_at_last or rs <= threshold

    def replace(self, x: Params) -> tuple[Params, float]:
        r = tree.sub(self.b, self.precise(x))
        rs = float(tree.sq_norm(r))
        self.rs_at_last = rs
        return r, rs


def _cg_checked(
    matvec: MatVec, x: Params, r: Params, rs: float, b_norm: float, rtol: float, atol: float, maxiter: int,
    iterations: int, reliable: _ReliableUpdate | None, preconditioner: MatVec | None, record_pairs: int,
) -> LinSolveResult:
    """CG with convergence and curvature checks: the scalars live on the host (one sync per iteration, as the
    checks need anyway), so each iteration launches only the matvec, the preconditioner and a few vector kernels."""
    threshold = max(rtol * b_norm, atol) ** 2
    z, rs, rz = _precondition(preconditioner, r)
    p = z
    recorded = _Storage(record_pairs) if record_pairs else None
    for _ in range(maxiter):
        if rs <= threshold:
            break
        ap = matvec(p)
        iterations += 1
        curvature = float(tree.dot(p, ap))
        if not math.isfinite(curvature):
            raise BilevelError(
                f"cg: the Hessian-vector product is not finite at iteration {iterations}: the inner variables or the "
                "inner loss hold NaN/inf (diverged inner steps?); lower inner_lr or check the data."
            )
        if not curvature > 0:
            raise BilevelError(
                f"cg: non-positive curvature pᵀAp={curvature:.3g} at iteration {iterations}: the inner Hessian is "
                "not positive definite here. Use method='minres' (linsolve='minres': MINRES handles symmetric "
                "indefinite Hessians), add inner regularisation, or run more inner steps."
            )
        if recorded is not None and recorded.used < record_pairs:
            recorded.append(p, ap)
        step = rz / curvature
        x = tree.axpy(step, p, x)
        r = tree.axpy(-step, ap, r)
        z, rs, rz_new = _precondition(preconditioner, r)
        if reliable is not None and reliable.due(rs, threshold):
            r, rs = reliable.replace(x)
            iterations += 1
            z, rs, rz_new = _precondition(preconditioner, r)
        p = tree.axpy(rz_new / rz if rz > 0 else 0.0, p, z)
        rz = rz_new
    dtype = tree.floating_dtype(x)
    residual = torch.tensor(math.sqrt(rs) / max(b_norm, 1e-300), dtype=dtype)
    pairs = CurvaturePairs(recorded, range(recorded.used)) if recorded is not None and recorded.used else ()
    return LinSolveResult(x=x, iterations=iterations, residual=residual, pairs=pairs)


def _precondition(preconditioner: MatVec | None, r: Params) -> tuple[Params, float, float]:
    """(z = M r, ‖r‖², rᵀz) with one host synchronisation, checking that M is positive definite along r;
    (r, ‖r‖², ‖r‖²) without M."""
    if preconditioner is None:
        rs = rz = float(tree.sq_norm(r))
        z = r
    else:
        z = preconditioner(r)
        rs, rz = torch.stack([tree.sq_norm(r), tree.dot(r, z)]).tolist()
    if not (math.isfinite(rs) and math.isfinite(rz)):
        raise BilevelError(
            f"cg: the residual is not finite (‖r‖²={rs:.3g}, rᵀMr={rz:.3g}): the inner variables or the inner loss "
            "hold NaN/inf (diverged inner steps?); lower inner_lr or check the data."
        )
    if not (rz > 0 or rs == 0.0):
        raise BilevelError(
            f"cg: the preconditioner is not positive definite (rᵀMr={rz:.3g} for ‖r‖²={rs:.3g}); M must approximate "
            "A⁻¹ by a symmetric positive-definite map."
        )
    return z, rs, rz


def minres(
    matvec: MatVec, b: Params, *, x0: Params | None = None, rtol: float = 1e-6, atol: float = 0.0, maxiter: int = 100,
) -> LinSolveResult:
    r"""MINRES for symmetric, possibly indefinite ``A`` (Paige & Saunders, 1975, "Solution of sparse indefinite
    systems of linear equations", SIAM J. Numer. Anal. 12): x_k = x_0 + V_k y_k minimises ‖b − A x‖ over the Krylov
    space K_k(A, r_0). What a trained network's inner Hessian needs, where CG has no guarantee (it is indefinite).

    Lanczos builds the orthonormal basis V_k and the tridiagonal T_k (diagonal α_j, off-diagonal β_j):

    .. math::
        \beta_{j+1} v_{j+1} = A v_j - \alpha_j v_j - \beta_j v_{j-1},\qquad \alpha_j = v_j^\top A v_j,

    and y_k solves min ‖β₁e₁ − T̄_k y‖ by a QR factorisation of T̄_k updated with one Givens rotation per step. With
    the rotated column (ε_j, δ_j, γ_j) of R and the rotated right-hand side (τ_j, φ̄_j), the iterate moves along
    d_j = (v_j − δ_j d_{j−1} − ε_j d_{j−2}) / γ_j by τ_j, and |φ̄_j| = ‖b − A x_j‖ exactly (in exact arithmetic), so
    the residual falls monotonically. Stops when it is ≤ max(rtol·‖b‖, atol) or after ``maxiter`` matvecs (one more
    when ``x0`` is given); ``residual`` is that recursive ‖r‖/‖b‖. Scalars live on the host (two syncs per step).
    """
    if maxiter < 0:
        raise BilevelError(f"minres: maxiter must be >= 0, got {maxiter}.")
    iterations = 0
    if x0 is None:
        x, r = tree.zeros_like(b), b
    else:
        x, r = x0, tree.sub(b, matvec(x0))
        iterations += 1
    b_norm = float(tree.norm(b))
    beta = float(tree.norm(r))  # β₁, then β_{j+1}
    threshold = max(rtol * b_norm, atol)
    phi_bar = beta  # φ̄_j, with |φ̄_j| = ‖r_j‖
    v_prev, v = tree.zeros_like(b), tree.scale(r, 1.0 / beta) if beta > 0 else r
    d_prev2 = d_prev = tree.zeros_like(b)
    beta_j = 0.0  # the off-diagonal above α_j in column j of T̄ (none for j = 1)
    c_prev2, s_prev2, c_prev, s_prev = 1.0, 0.0, 1.0, 0.0  # rotations G_{j−2}, G_{j−1}
    for _ in range(maxiter):
        if abs(phi_bar) <= threshold:
            break
        av = matvec(v)
        iterations += 1
        p = tree.axpy(-beta_j, v_prev, av)
        alpha = float(tree.dot(v, p))
        p = tree.axpy(-alpha, v, p)
        beta_next = float(tree.norm(p))
        if not (math.isfinite(alpha) and math.isfinite(beta_next)):
            raise BilevelError(
                f"minres: the Hessian-vector product is not finite at iteration {iterations}: the inner variables or "
                "the inner loss hold NaN/inf (diverged inner steps?); lower inner_lr or check the data."
            )
        # column j of T̄: (β_j, α_j, β_{j+1}) at rows j−1, j, j+1; apply G_{j−2}, G_{j−1}, then build G_j
        epsilon, delta_bar = s_prev2 * beta_j, c_prev2 * beta_j
        delta, gamma_bar = c_prev * delta_bar + s_prev * alpha, -s_prev * delta_bar + c_prev * alpha
        gamma = math.hypot(gamma_bar, beta_next)
        if gamma == 0.0:  # T̄ singular in this direction: nothing more to gain from the Krylov space
            break
        c, s = gamma_bar / gamma, beta_next / gamma
        tau, phi_bar = c * phi_bar, -s * phi_bar
        d = tree.scale(tree.axpy(-epsilon, d_prev2, tree.axpy(-delta, d_prev, v)), 1.0 / gamma)
        x = tree.axpy(tau, d, x)
        if beta_next == 0.0:  # invariant subspace: x is exact
            phi_bar = 0.0
            break
        v_prev, v = v, tree.scale(p, 1.0 / beta_next)
        d_prev2, d_prev = d_prev, d
        beta_j = beta_next
        c_prev2, s_prev2, c_prev, s_prev = c_prev, s_prev, c, s
    residual = torch.tensor(abs(phi_bar) / max(b_norm, 1e-300), dtype=tree.floating_dtype(x))
    return LinSolveResult(x=x, iterations=iterations, residual=residual)


def exact(
    matvec: MatVec, b: Params, *, max_size: int = 10_000, batched_matvec: MatVec | None = None, symmetric: bool = True,
) -> LinSolveResult:
    r"""Dense solve: build A from its columns A e_i and call ``torch.linalg.solve``.

    The columns come from ``batched_matvec`` (``v`` with a leading batch dimension; also read from a
    ``matvec.batched`` attribute) when given, else from
    ``vmap(matvec)``, else one matvec per column. Costs P matvecs (batched) and O(P²) memory for P unknowns;
    meant for small problems and as a reference. float16 and bfloat16 systems are solved in float32. ``symmetric``:
    A is symmetric (a Hessian) and its symmetric part is solved; pass False for a general A.
    ``residual`` is the true ‖b − A x‖/‖b‖ of the dense system.
    """
    n = tree.size(b)
    if n > max_size:
        raise BilevelError(
            f"exact: {n} unknowns exceed max_size={max_size} (a dense {n}x{n} matrix); use method='cg' or raise max_size."
        )
    flat_b = tree.flatten(b)
    eye = torch.eye(n, dtype=flat_b.dtype, device=flat_b.device)

    def column(e: Tensor) -> Tensor:
        return tree.flatten(matvec(tree.unflatten(e, b)))

    batched_matvec = batched_matvec or getattr(matvec, "batched", None)
    if batched_matvec is not None:
        cols = batched_matvec(tree.unflatten_batched(eye, b))
        a = torch.cat([c.reshape(n, -1) for c in cols.values()], dim=1).T
    else:
        try:
            a = torch.func.vmap(column)(eye).T
        except RuntimeError:  # a matvec that does not compose with vmap: one column at a time
            a = torch.stack([column(e) for e in eye], dim=1)
    if symmetric:  # a Hessian: take the exact symmetric part (rounding makes the columns slightly asymmetric)
        a = 0.5 * (a + a.T)
    # torch.linalg.solve has no float16/bfloat16 kernels (and they would lose the answer): solve in float32
    work = torch.float32 if flat_b.dtype in (torch.float16, torch.bfloat16) else flat_b.dtype
    a_w, b_w = a.to(work), flat_b.to(work)
    x = torch.linalg.solve(a_w, b_w)
    residual = torch.linalg.vector_norm(b_w - a_w @ x) / torch.linalg.vector_norm(b_w).clamp_min(torch.finfo(work).tiny)
    return LinSolveResult(x=tree.unflatten(x.to(flat_b.dtype), b), iterations=n, residual=residual.to(flat_b.dtype))
