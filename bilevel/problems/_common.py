"""Helpers shared by the ready-made problems: reading a solution out of a Result or a solver state, dtypes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel.errors import BilevelError
from bilevel.problem import LONE_KEY
from bilevel.types import Params


def outer_of(solution: Any) -> Any:
    """The outer variables λ of ``solution``: a :class:`bilevel.Result` (``outer``), a solver state (``outer``,
    a dict with the lone key ``"value"`` for a tensor) or λ itself (a tensor or a dict of tensors)."""
    return _unwrap(_pick(solution, "outer"))


def inner_of(solution: Any) -> Any:
    """The inner variables w of ``solution``: a :class:`bilevel.Result`, a solver state or w itself."""
    return _unwrap(_pick(solution, "inner"))


def _pick(solution: Any, level: str) -> Any:
    if isinstance(solution, (Tensor, dict)):
        return solution
    for attr in (f"{level}_params", level):
        value = getattr(solution, attr, None)
        if value is not None:
            return value
    raise BilevelError(
        f"evaluate: cannot read the {level} variables from a {type(solution).__name__}; pass a bilevel.Result, "
        f"a solver state, or the {level} variables themselves."
    )


def _unwrap(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {LONE_KEY}:
        return value[LONE_KEY]
    return value


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` from ``torch.float32``, ``"float32"`` or ``"torch.float32"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise BilevelError(f"problems: dtype must be a floating-point torch dtype such as 'float32', got {dtype!r}.")
    return value


def detach_params(params: Params) -> Params:
    return {k: v.detach() for k, v in params.items()}
