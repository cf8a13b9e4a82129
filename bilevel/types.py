"""Type aliases shared across bilevel (one vocabulary, one place)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

Params = dict[str, Tensor]
"""Named tensors: the outer variables λ, the inner parameters w, buffers, or a vector in their space."""

Batch = Any
"""Whatever the user's loss takes as data: a tensor, a tuple of tensors, a dict, ..."""

LossFn = Callable[[Mapping[str, Tensor], Any, Batch], Tensor]
"""``loss(outer, inner, batch) -> scalar``; ``inner`` is a dict of tensors or a :class:`bilevel.functional.ModuleView`."""

MatVec = Callable[[Params], Params]
"""A linear map ``v -> A v`` on ``Params`` (e.g. a Hessian-vector product)."""

ConstraintFn = Callable[[Mapping[str, Tensor], Any], Tensor]
"""``g(outer, inner) -> Tensor`` of shape ``(m,)``; feasible where ``g <= 0``."""

ProjectionFn = Callable[[Params], Params]
"""``Proj(params) -> params`` onto a feasible set, same names and shapes."""
