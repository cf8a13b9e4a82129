r"""Arithmetic on ``Params`` (dicts of tensors) viewed as one vector.

Every function is pure and works under ``torch.func.vmap``. Multi-tensor ``torch._foreach_*`` kernels are
avoided on purpose: they do not compose with ``vmap``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel.types import Params


def add(a: Params, b: Params) -> Params:
    """a + b."""
    return {k: a[k] + b[k] for k in a}


def sub(a: Params, b: Params) -> Params:
    """a − b."""
    return {k: a[k] - b[k] for k in a}


def scale(a: Params, s: float | Tensor) -> Params:
    """s·a."""
    return {k: s * v for k, v in a.items()}


def axpy(alpha: float | Tensor, x: Params, y: Params) -> Params:
    """y + α·x."""
    return {k: y[k] + alpha * x[k] for k in y}


def dot(a: Params, b: Params) -> Tensor:
    """⟨a, b⟩ = Σ_k Σ_i a_k[i]·b_k[i] (a 0-d tensor)."""
    if len(a) == 1:
        k = next(iter(a))
        return torch.vdot(a[k].reshape(-1), b[k].reshape(-1))
    return torch.stack([torch.vdot(a[k].reshape(-1), b[k].reshape(-1)) for k in a]).sum() if a else torch.zeros(())


def sq_norm(a: Params) -> Tensor:
    """‖a‖²."""
    return dot(a, a)


def norm(a: Params) -> Tensor:
    """‖a‖₂ over all entries."""
    return sq_norm(a).sqrt()


def nonfinite_keys(a: Params) -> list[str]:
    """The names of floating-point entries holding NaN or inf (one host sync per entry)."""
    return [k for k, v in a.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def zeros_like(a: Params) -> Params:
    """0 with the names, shapes, dtypes and devices of ``a``."""
    return {k: torch.zeros_like(v) for k, v in a.items()}


def detach(a: Params) -> Params:
    """Copies of ``a`` cut from any autograd graph."""
    return {k: v.detach() for k, v in a.items()}


def clone(a: Params) -> Params:
    """Independent copies of ``a``."""
    return {k: v.detach().clone() for k, v in a.items()}


def size(a: Params) -> int:
    """Total number of entries."""
    return sum(v.numel() for v in a.values())


def flatten(a: Params) -> Tensor:
    """Concatenate all entries (in key order) into one 1-D tensor (a view, not a copy, for a single entry)."""
    if len(a) == 1:
        return next(iter(a.values())).reshape(-1)
    return torch.cat([v.reshape(-1) for v in a.values()])


def unflatten(flat: Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten`: split ``flat`` into tensors shaped like ``like``."""
    out: Params = {}
    offset = 0
    for k, v in like.items():
        n = v.numel()
        out[k] = flat[offset : offset + n].reshape(v.shape)
        offset += n
    return out


def unflatten_batched(flat: Tensor, like: Params) -> Params:
    """:func:`unflatten` for a batch of flat vectors ``(B, P)``: tensors shaped ``(B, *like[k].shape)``."""
    out: Params = {}
    offset = 0
    for k, v in like.items():
        n = v.numel()
        out[k] = flat[:, offset : offset + n].reshape(flat.shape[0], *v.shape)
        offset += n
    return out


def floating_dtype(a: Params) -> torch.dtype:
    """The dtype of the first floating-point entry (the working precision), or torch's default."""
    return next((v.dtype for v in a.values() if v.is_floating_point()), torch.get_default_dtype())


def cast(a: Params, dtype: torch.dtype) -> Params:
    """Floating-point entries converted to ``dtype`` (others unchanged)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in a.items()}


def cast_batch(batch: Any, dtype: torch.dtype) -> Any:
    """A data batch (tensor, or tuples / lists / dicts of them) with its floating-point tensors in ``dtype``."""
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: cast_batch(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        items = [cast_batch(v, dtype) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch
