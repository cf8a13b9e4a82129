r"""Euclidean projections onto simple convex sets, in closed form, to pass as ``Problem(outer_projection=...,
inner_projection=..., joint_projection=...)``.

Each constructor returns a callable ``proj(v) -> v`` that takes what the problem's losses receive — a tensor or a
dict of tensors (a :class:`bilevel.functional.ModuleView` counts as a dict of its parameters) — and returns the same form.
A dict is treated as ONE vector: its tensors concatenated in key order (what matters for the affine sets).

.. math::
    \mathrm{Proj}_{[l,u]}(v) = \min(\max(v, l), u),\qquad
    \mathrm{Proj}_{\{a^\top v = b\}}(v) = v - \frac{a^\top v - b}{\|a\|^2}\,a,\qquad
    \mathrm{Proj}_{\{Av = b\}}(v) = v - A^{+}(Av - b),

with A⁺ the pseudo-inverse (A⁺ = Aᵀ(AAᵀ)⁻¹ for full row rank). Building blocks:

* :func:`box`, :func:`nonnegative`, :func:`simplex`, :func:`l2_ball`, :func:`affine` — the sets;
* :func:`compose` — apply several in turn (the projection onto an intersection only when the sets act on
  separate coordinates, e.g. a box on one key and an affine set on another);
* :func:`on_keys` — apply a projection to some entries of a dict and leave the others;
* :func:`joint` — lift a projection of the stacked vector (outer, inner) to ``Problem(joint_projection=...)``,
  for sets that couple both levels such as {(x, y) : 1ᵀx + 1ᵀy = 0} (LV-HBA's C).

Any callable with the same contract works: these are conveniences, not a required interface.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel.errors import BilevelError

Projection = Callable[[Any], Any]
"""``proj(v) -> v`` for a tensor or a dict of tensors (same names, shapes, dtype and device)."""

JointProjection = Callable[[Any, Any], tuple[Any, Any]]
"""``proj(outer, inner) -> (outer, inner)``: the projection onto a set that couples both levels."""


# ----- vector view of a tensor or a dict ----------------------------------------------------------------------
def _flatten(v: Any) -> tuple[Tensor, Callable[[Tensor], Any]]:
    """(one flat vector, a function that rebuilds ``v``'s form from such a vector)."""
    if isinstance(v, Tensor):
        shape = v.shape
        return v.reshape(-1), lambda flat: flat.reshape(shape)
    if isinstance(v, Mapping):
        keys = list(v.keys())
        shapes = [v[k].shape for k in keys]
        sizes = [v[k].numel() for k in keys]
        flat = torch.cat([v[k].reshape(-1) for k in keys]) if keys else torch.zeros(0)

        def rebuild(x: Tensor) -> dict[str, Tensor]:
            parts = torch.split(x, sizes)
            return {k: p.reshape(s) for k, p, s in zip(keys, parts, shapes)}

        return flat, rebuild
    raise BilevelError(f"projections: expected a tensor or a dict of tensors, got {type(v).__name__}.")


def _map(v: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply an elementwise ``fn`` to a tensor or to every tensor of a dict."""
    if isinstance(v, Tensor):
        return fn(v)
    if isinstance(v, Mapping):
        return {k: fn(t) for k, t in v.items()}
    raise BilevelError(f"projections: expected a tensor or a dict of tensors, got {type(v).__name__}.")


# ----- sets -----------------------------------------------------------------------------------------------------
def box(low: float | Tensor | None = None, high: float | Tensor | None = None) -> Projection:
    r"""Proj onto the box {v : low ≤ v ≤ high} (either bound may be None): v ↦ min(max(v, low), high).

    Tensor bounds broadcast against each tensor they are applied to (use :func:`on_keys` for per-key bounds).
    """
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high:
        raise BilevelError(f"projections.box: low {low} exceeds high {high}; pass low <= high.")
    if isinstance(low, Tensor) and isinstance(high, Tensor) and bool((low > high).any()):
        raise BilevelError("projections.box: some entries of low exceed high; pass low <= high elementwise.")

    def clamp(t: Tensor) -> Tensor:
        lo = low.to(t) if isinstance(low, Tensor) else low
        hi = high.to(t) if isinstance(high, Tensor) else high
        if lo is not None:
            t = torch.maximum(t, lo) if isinstance(lo, Tensor) else t.clamp(min=lo)
        if hi is not None:
            t = torch.minimum(t, hi) if isinstance(hi, Tensor) else t.clamp(max=hi)
        return t

    def proj(v: Any) -> Any:
        return _map(v, clamp)

    return proj


def nonnegative() -> Projection:
    r"""Proj onto the nonnegative orthant: v ↦ max(v, 0)."""
    return box(0.0, None)


def simplex(radius: float = 1.0) -> Projection:
    r"""Proj onto the simplex {v : v ≥ 0, Σv = radius} (a tensor, or a dict flattened in key order): with u the
    entries sorted decreasingly and ρ the largest k such that u_k > (Σ_{j≤k} u_j − radius)/k,
    v ↦ max(v − τ, 0), τ = (Σ_{j≤ρ} u_j − radius)/ρ (Held, Wolfe & Crowder, 1974; Duchi et al., 2008)."""
    if not (isinstance(radius, (int, float)) and radius > 0 and math.isfinite(radius)):
        raise BilevelError(f"projections.simplex: radius must be a finite number > 0, got {radius!r}.")

    def proj(v: Any) -> Any:
        flat, rebuild = _flatten(v)
        u, _ = torch.sort(flat, descending=True)
        k = torch.arange(1, flat.numel() + 1, dtype=flat.dtype, device=flat.device)
        cumulative = torch.cumsum(u, 0) - radius
        rho = int((u > cumulative / k).nonzero().max()) + 1
        tau = cumulative[rho - 1] / rho
        return rebuild(torch.clamp(flat - tau, min=0.0))

    return proj


def l2_ball(radius: float = 1.0) -> Projection:
    r"""Proj onto the ball {v : ‖v‖₂ ≤ radius} (a dict is one vector): v ↦ v·min(1, radius/‖v‖)."""
    if not (isinstance(radius, (int, float)) and radius > 0 and math.isfinite(radius)):
        raise BilevelError(f"projections.l2_ball: radius must be a finite number > 0, got {radius!r}.")

    def proj(v: Any) -> Any:
        flat, rebuild = _flatten(v)
        norm = torch.linalg.vector_norm(flat)
        return rebuild(flat * torch.clamp(radius / norm.clamp_min(torch.finfo(flat.dtype).tiny), max=1.0))

    return proj


def affine(a: Tensor, b: float | Tensor = 0.0) -> Projection:
    r"""Proj onto the affine set {v : a·v = b} (``a`` a vector) or {v : Av = b} (``a`` a matrix, b a vector).

    .. math::
        v \mapsto v - \frac{a^\top v - b}{\|a\|^2} a \quad\text{or}\quad v \mapsto v - A^{+}(Av - b),

    A⁺ the Moore–Penrose pseudo-inverse, computed once in float64 (so a rank-deficient A projects onto the
    least-squares solution set of Av = b; a consistent system gives exactly {Av = b}). ``v`` is the tensor or
    the dict flattened in key order; its size must equal ``a``'s last dimension.
    """
    if not isinstance(a, Tensor) or a.dim() not in (1, 2):
        raise BilevelError("projections.affine: a must be a 1-D tensor (hyperplane a·v = b) or a 2-D matrix A (Av = b).")
    a64 = a.detach().to(torch.float64)
    if a.dim() == 1:
        sq = float((a64 * a64).sum())
        if sq == 0.0:
            raise BilevelError("projections.affine: a is zero, so {v : a·v = b} is empty or everything; pass a nonzero a.")
        pinv = (a64 / sq).reshape(-1, 1)  # A⁺ of the 1 × n matrix aᵀ
        mat = a64.reshape(1, -1)
    else:
        mat = a64
        pinv = torch.linalg.pinv(a64)
    b64 = torch.as_tensor(b, dtype=torch.float64).reshape(-1).to(a.device)
    if b64.numel() not in (1, mat.shape[0]):
        raise BilevelError(
            f"projections.affine: b has {b64.numel()} entries but A has {mat.shape[0]} rows; pass one per row."
        )
    cache: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor, Tensor]] = {}

    def proj(v: Any) -> Any:
        flat, rebuild = _flatten(v)
        if flat.numel() != mat.shape[1]:
            raise BilevelError(
                f"projections.affine: the variables have {flat.numel()} entries but a has {mat.shape[1]}; "
                "a dict is flattened in key order, so a must match the total size."
            )
        key = (flat.dtype, flat.device)
        if key not in cache:
            cache[key] = (mat.to(flat), pinv.to(flat), b64.to(flat))
        m, p, rhs = cache[key]
        return rebuild(flat - p @ (m @ flat - rhs))

    return proj


# ----- combinators -------------------------------------------------------------------------------------------
def compose(*projections: Projection | None) -> Projection:
    """Apply the projections in order (None entries are skipped)."""
    steps = [p for p in projections if p is not None]
    bad = [type(p).__name__ for p in steps if not callable(p)]
    if bad:
        raise BilevelError(f"projections.compose: every projection must be callable, got {bad}.")

    def proj(v: Any) -> Any:
        for p in steps:
            v = p(v)
        return v

    return proj


def on_keys(keys: str | Iterable[str], projection: Projection) -> Projection:
    """Apply ``projection`` to the sub-dict ``{k: v[k] for k in keys}`` and keep the other entries as they are."""
    names = [keys] if isinstance(keys, str) else list(keys)

    def proj(v: Any) -> Any:
        if not isinstance(v, Mapping):
            raise BilevelError(f"projections.on_keys: needs a dict of tensors, got {type(v).__name__}.")
        missing = [k for k in names if k not in v]
        if missing:
            raise BilevelError(f"projections.on_keys: keys {missing} not among the variables {sorted(v.keys())}.")
        out = dict(v)
        projected = projection({k: v[k] for k in names})
        out.update(projected)
        return out

    return proj


def joint(projection: Projection) -> JointProjection:
    r"""Lift a projection of the stacked vector [outer; inner] to ``Problem(joint_projection=...)``.

    ``joint(affine(torch.ones(3 * n)))`` is the projection onto {(x, y) : 1ᵀx + 1ᵀy = 0} for x ∈ Rⁿ, y ∈ R²ⁿ.
    """

    def proj(outer: Any, inner: Any) -> tuple[Any, Any]:
        flat_o, rebuild_o = _flatten(outer)
        flat_i, rebuild_i = _flatten(inner)
        stacked = projection(torch.cat([flat_o, flat_i.to(flat_o)]))
        n = flat_o.numel()
        return rebuild_o(stacked[:n]), rebuild_i(stacked[n:].to(flat_i))

    return proj


def product(outer: Projection | None = None, inner: Projection | None = None) -> JointProjection:
    """The joint projection onto a product set X × Y: ``(Proj_X(outer), Proj_Y(inner))``."""

    def proj(o: Any, i: Any) -> tuple[Any, Any]:
        return (outer(o) if outer is not None else o), (inner(i) if inner is not None else i)

    return proj


# ----- the outer box of Problem(outer_bounds=...) --------------------------------------------------------------
def check_bounds(bounds: Any) -> None:
    """``outer_bounds``: None or a pair (low, high) of numbers or None, low <= high."""
    if bounds is None:
        return
    ok = isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(
        b is None or (isinstance(b, (int, float)) and not isinstance(b, bool) and not math.isnan(b)) for b in bounds)
    if not ok:
        raise BilevelError(
            f"Problem: outer_bounds must be None or a pair (low, high) of numbers or None, got {bounds!r}; "
            "e.g. outer_bounds=(-5.0, 5.0) or (0.0, None)."
        )
    lo, hi = bounds
    if lo is not None and hi is not None and lo > hi:
        raise BilevelError(f"Problem: outer_bounds low {lo} exceeds high {hi}; pass (low, high) with low <= high.")


def clamp(params: dict[str, Tensor], bounds: tuple[float | None, float | None] | None) -> dict[str, Tensor]:
    """Every tensor of ``params`` clamped to ``bounds`` = (low, high) (either may be None; None: unchanged)."""
    if bounds is None or all(b is None for b in bounds):
        return params
    low, high = bounds
    return {k: v.clamp(min=low, max=high) for k, v in params.items()}
