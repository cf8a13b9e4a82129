r"""Hyperparameters in unconstrained space: declared transforms, constrained values and the STN input vector.

Self-Tuning Networks (MacKay, Vicol, Lorraine, Duvenaud & Grosse, 2019, "Self-Tuning Networks: Bilevel
Optimization of Hyperparameters using Structured Best-Response Functions", ICLR) optimise every hyperparameter
as an unconstrained real u and perturb it with Gaussian noise, u + σ·ε; a declared transform maps u to the value
the model uses:

=============  ==========================================================  ==================================
transform      constrained value v(u)                                      use
=============  ==========================================================  ==================================
``identity``   v = u                                                       log-penalties, offsets
``exp``        v = eᵘ                                                      positive scales (log-space)
``softplus``   v = log(1 + eᵘ)                                             positive scales (weight decay)
``logit``      v = low + (high − low)·sigmoid(u)                           rates, e.g. dropout ≤ ``high=0.9``
``floor``      v = min(⌊low + (high − low + 1)·sigmoid(u)⌋, high)           integers in {low, …, high}
=============  ==========================================================  ==================================

``floor`` has zero derivative, which is fine: the STN training step never differentiates L_T with respect to the
hyperparameters, and the validation step reaches u through the best-response network's input (the features below),
not through v. The initial u of a ``floor`` parameter sits in the middle of the bin of its integer ``init``.

The network sees the *features* f(u) = u − u₀ (one entry per hyperparameter, u₀ the initial unconstrained value):
centred, so the hypernetwork input starts at 0 and stays O(1) while a hyperparameter moves by a few e-folds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from bilevel.errors import BilevelError

Transform = Literal["identity", "exp", "softplus", "logit", "floor"]
TRANSFORMS: tuple[str, ...] = ("identity", "exp", "softplus", "logit", "floor")


@dataclasses.dataclass(frozen=True)
class HyperParam:
    r"""One scalar hyperparameter: its ``name``, ``transform`` (see the module table) and constrained ``init``.

    ``low`` / ``high`` bound ``logit`` (default 0 and 1; pass ``high=0.9`` for a dropout rate) and ``floor``
    (required: the integer range). Examples::

        HyperParam("dropout", "logit", 0.1, high=0.9)
        HyperParam("weight_decay", "softplus", 1e-4)
        HyperParam("cutout", "floor", 4, low=0, high=16)
    """

    name: str
    transform: Transform
    init: float
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        owner = f"HyperParam({self.name!r})"
        if not isinstance(self.name, str) or not self.name:
            raise BilevelError(f"HyperParam: name must be a non-empty string, got {self.name!r}.")
        if self.transform not in TRANSFORMS:
            raise BilevelError(f"{owner}: transform must be one of {', '.join(TRANSFORMS)}; got {self.transform!r}.")
        if self.transform in ("identity", "exp", "softplus") and (self.low is not None or self.high is not None):
            raise BilevelError(f"{owner}: low/high apply to 'logit' and 'floor' only; drop them for {self.transform!r}.")
        if self.transform == "floor":
            if self.low is None or self.high is None:
                raise BilevelError(f"{owner}: a 'floor' hyperparameter needs its integer range, e.g. low=0, high=16.")
            if self.low != int(self.low) or self.high != int(self.high) or self.init != int(self.init):
                raise BilevelError(
                    f"{owner}: 'floor' takes integers; got low={self.low}, high={self.high}, init={self.init}."
                )
        low, high = self.bounds
        if not low < high:
            raise BilevelError(f"{owner}: low must be below high, got low={low}, high={high}.")
        init = float(self.init)
        if not math.isfinite(init):
            raise BilevelError(f"{owner}: init must be finite, got {self.init}.")
        if self.transform in ("exp", "softplus") and not init > 0:
            raise BilevelError(f"{owner}: a {self.transform!r} hyperparameter is positive; got init={init}.")
        if self.transform == "logit" and not low < init < high:
            raise BilevelError(
                f"{owner}: a 'logit' hyperparameter lies strictly inside (low, high) = ({low}, {high}); got init={init}."
            )
        if self.transform == "floor" and not low <= init <= high:
            raise BilevelError(f"{owner}: init={init} lies outside the integer range [{low}, {high}].")

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high) of the constrained value (±inf where unbounded)."""
        if self.transform in ("logit", "floor"):
            return (0.0 if self.low is None else float(self.low), 1.0 if self.high is None else float(self.high))
        if self.transform == "identity":
            return (-math.inf, math.inf)
        return (0.0, math.inf)

    def constrain(self, u: Tensor) -> Tensor:
        """v(u), elementwise (any shape)."""
        low, high = self.bounds
        if self.transform == "identity":
            return u
        if self.transform == "exp":
            return u.exp()
        if self.transform == "softplus":
            return torch.nn.functional.softplus(u)
        if self.transform == "logit":
            return low + (high - low) * torch.sigmoid(u)
        continuous = low + (high - low + 1.0) * torch.sigmoid(u)
        return torch.clamp(torch.floor(continuous), max=high)

    def unconstrain(self, v: float | Tensor) -> Tensor:
        """u with v(u) = v (for ``floor``: the middle of v's bin); raises on values outside the range."""
        v = torch.as_tensor(v, dtype=torch.get_default_dtype()) if not isinstance(v, Tensor) else v
        low, high = self.bounds
        bad = ~((v > low) & (v < high)) if self.transform in ("exp", "softplus", "logit") else None
        if self.transform == "floor":
            bad = (v < low) | (v > high) | (v != torch.floor(v))
        if bad is not None and bool(bad.any()):
            raise BilevelError(
                f"HyperParam({self.name!r}).unconstrain: value {v.flatten()[:4].tolist()} is outside the range of a "
                f"{self.transform!r} hyperparameter ({low}, {high}){' (integers)' if self.transform == 'floor' else ''}."
            )
        if self.transform == "identity":
            return v
        if self.transform == "exp":
            return v.log()
        if self.transform == "softplus":
            return v + torch.log(-torch.expm1(-v))  # log(e^v − 1), stable for small and large v
        if self.transform == "logit":
            return torch.logit((v - low) / (high - low))
        return torch.logit((v + 0.5 - low) / (high - low + 1.0))


class HyperSpace(Mapping[str, Tensor]):
    r"""A declarative set of scalar hyperparameters; also the mapping name → initial unconstrained u₀.

    Being a mapping of leaf tensors with ``requires_grad=True``, a space is passed directly as the outer variables
    of a :class:`bilevel.Problem` (``Problem(outer=space, ...)``); the ``stn`` solver then records the constrained
    values in the history. Inside the losses, ``outer`` is a dict of unconstrained values, each of shape ``()`` or
    ``(batch,)`` (per-example perturbations): :meth:`constrained` gives the values the model uses and
    :meth:`features` the ``(..., H)`` vector the STN layers take.

    Args:
        params: the hyperparameters (unique names).
        dtype / device: of the unconstrained tensors.
    """

    def __init__(self, params: Sequence[HyperParam], *, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu"):
        params = tuple(params)
        if not params:
            raise BilevelError("HyperSpace: give at least one HyperParam.")
        bad = [p for p in params if not isinstance(p, HyperParam)]
        if bad:
            raise BilevelError(f"HyperSpace: expected HyperParam entries, got {type(bad[0]).__name__}.")
        names = [p.name for p in params]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise BilevelError(f"HyperSpace: hyperparameter names must be unique; {dupes} repeat.")
        dtype = dtype or torch.get_default_dtype()
        self.params: dict[str, HyperParam] = {p.name: p for p in params}
        self._init: dict[str, Tensor] = {
            p.name: p.unconstrain(torch.tensor(float(p.init), dtype=torch.float64)).to(dtype=dtype, device=device)
            .requires_grad_(True)
            for p in params
        }

    # ----- Mapping: name -> initial unconstrained value --------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self._init[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._init)

    def __len__(self) -> int:
        return len(self._init)

    def __repr__(self) -> str:
        inner = ", ".join(f"{p.name}: {p.transform}={p.init:g}" for p in self.params.values())
        return f"HyperSpace({inner})"

    @property
    def n_features(self) -> int:
        """H, the length of the feature vector (one entry per hyperparameter)."""
        return len(self.params)

    # ----- maps ---------------------------------------------------------------------------------------
    def constrained(self, outer: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{name: v(u)} for unconstrained ``outer`` (entries of shape ``()`` or ``(batch,)``)."""
        self._check(outer, "constrained")
        return {k: p.constrain(outer[k]) for k, p in self.params.items()}

    def features(self, outer: Mapping[str, Tensor]) -> Tensor:
        """f(u) = u − u₀ stacked on the last axis: ``(H,)`` or ``(batch, H)``, the STN layers' hyperparameter input."""
        self._check(outer, "features")
        return torch.stack([outer[k] - self._init[k].detach() for k in self.params], dim=-1)

    def unconstrained(self, values: Mapping[str, float | Tensor]) -> dict[str, Tensor]:
        """{name: u} with v(u) = ``values[name]`` (the inverse of :meth:`constrained`), as detached tensors."""
        self._check(values, "unconstrained")
        like = next(iter(self._init.values()))
        return {k: p.unconstrain(torch.as_tensor(values[k], dtype=torch.float64)).to(like.dtype).to(like.device)
                for k, p in self.params.items()}

    def _check(self, outer: Mapping[str, object], call: str) -> None:
        if not isinstance(outer, Mapping):
            raise BilevelError(
                f"HyperSpace.{call}: expected a dict name -> tensor (the outer variables), got {type(outer).__name__}."
            )
        if set(outer) != set(self.params):
            raise BilevelError(
                f"HyperSpace.{call}: got names {sorted(outer)}, expected {sorted(self.params)}; pass the outer "
                "variables the losses receive (Problem(outer=space, ...))."
            )
        for k, v in outer.items():
            if isinstance(v, Tensor) and v.dim() > 1:
                raise BilevelError(
                    f"HyperSpace.{call}: {k!r} has shape {tuple(v.shape)}; hyperparameters are scalars, "
                    "shape () or (batch,) for per-example perturbations."
                )
