r"""Functional, differentiable optimizers on ``Params`` (in the spirit of optax).

An :class:`Optimizer` is a pair of pure functions ``init(params) -> state`` and
``update(params, grads, state) -> (params, state)``; no in-place ops, so unrolled differentiation can
backpropagate through them and ``vmap`` can batch them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from bilevel.errors import BilevelError
from bilevel.types import Params


class Optimizer(NamedTuple):
    """``init(params) -> state``; ``update(params, grads, state) -> (new_params, new_state)``."""

    init: Callable[[Params], Any]
    update: Callable[[Params, Params, Any], tuple[Params, Any]]


class MomentumState(NamedTuple):
    velocity: Params  # same shapes as params


class AdamState(NamedTuple):
    count: int
    mu: Params  # first moment, same shapes as params
    nu: Params  # second moment, same shapes as params


def _check_lr(name: str, lr: float) -> None:
    if not lr > 0:
        raise BilevelError(f"{name}: learning rate must be positive, got {lr}.")


def sgd(lr: float, momentum: float = 0.0, nesterov: bool = False) -> Optimizer:
    r"""SGD with optional heavy-ball momentum: v ← μv + g;  w ← w − η(g + μv if nesterov else v)."""
    _check_lr("sgd", lr)

    def init(params: Params) -> MomentumState | None:
        if momentum == 0.0:
            return None
        return MomentumState({k: torch.zeros_like(v) for k, v in params.items()})

    def update(params: Params, grads: Params, state: MomentumState | None) -> tuple[Params, MomentumState | None]:
        if state is None:
            return {k: params[k] - lr * grads[k] for k in params}, None
        velocity = {k: momentum * state.velocity[k] + grads[k] for k in params}
        direction = {k: grads[k] + momentum * velocity[k] for k in params} if nesterov else velocity
        return {k: params[k] - lr * direction[k] for k in params}, MomentumState(velocity)

    return Optimizer(init, update)


def _working(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is float16/bfloat16: moment estimates and ε (1e-8 rounds to 0 in float16) need the
    range; the update is cast back to the parameter's dtype."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    r"""Adam (Kingma & Ba, 2015): m ← b1 m + (1−b1) g;  v ← b2 v + (1−b2) g²;
    w ← w − η m̂ / (√v̂ + ε) with bias-corrected m̂ = m/(1−b1ᵗ), v̂ = v/(1−b2ᵗ).
    For float16/bfloat16 parameters the moments are kept, and the step computed, in float32."""
    _check_lr("adam", lr)

    def init(params: Params) -> AdamState:
        zeros = {k: _working(torch.zeros_like(v)) for k, v in params.items()}
        return AdamState(0, zeros, dict(zeros))

    def update(params: Params, grads: Params, state: AdamState) -> tuple[Params, AdamState]:
        t = state.count + 1
        mu = {k: b1 * state.mu[k] + (1 - b1) * _working(grads[k]) for k in params}
        nu = {k: b2 * state.nu[k] + (1 - b2) * _working(grads[k]) ** 2 for k in params}
        c1, c2 = 1 - b1**t, 1 - b2**t
        new = {k: params[k] - (lr * (mu[k] / c1) / ((nu[k] / c2).sqrt() + eps)).to(params[k].dtype) for k in params}
        return new, AdamState(t, mu, nu)

    return Optimizer(init, update)


def rmsprop(lr: float, decay: float = 0.99, eps: float = 1e-8) -> Optimizer:
    r"""RMSprop: s ← ρ s + (1−ρ) g²;  w ← w − η g / (√s + ε) (s kept in float32 for float16/bfloat16)."""
    _check_lr("rmsprop", lr)

    def init(params: Params) -> Params:
        return {k: _working(torch.zeros_like(v)) for k, v in params.items()}

    def update(params: Params, grads: Params, state: Params) -> tuple[Params, Params]:
        s = {k: decay * state[k] + (1 - decay) * _working(grads[k]) ** 2 for k in params}
        return {k: params[k] - (lr * _working(grads[k]) / (s[k].sqrt() + eps)).to(params[k].dtype) for k in params}, s

    return Optimizer(init, update)


OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {"sgd": sgd, "adam": adam, "rmsprop": rmsprop}


def make_optimizer(name: str, lr: float, **kwargs: Any) -> Optimizer:
    """Optimizer by name (``"sgd"``, ``"adam"``, ``"rmsprop"``)."""
    if name not in OPTIMIZERS:
        raise BilevelError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}.")
    return OPTIMIZERS[name](lr, **kwargs)
