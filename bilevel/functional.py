"""Modules as pure functions: parameters and buffers as dicts of tensors, train/eval mode explicit.

``ModuleView(module, params, buffers, training)`` is what a loss receives as ``inner`` when the inner variables
are an ``nn.Module``: calling it runs ``torch.func.functional_call`` with those tensors, and indexing it
(``view["fc.weight"]``, ``view.values()``) reads the parameters, e.g. for a weight-decay term.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bilevel.types import Params


def in_transform() -> bool:
    """Whether the code runs inside a ``torch.func`` transform (``grad``, ``vjp``, ``vmap``, ...), where tensors are
    wrapped and their values cannot be read on the host."""
    return torch._C._functorch.maybe_current_level() is not None


def split_module(module: nn.Module) -> tuple[Params, Params]:
    """Detached copies of ``(parameters, buffers)`` of ``module``, keyed by their dotted names."""
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
    return params, buffers


@contextlib.contextmanager
def module_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Temporarily put every submodule in train (``True``) or eval (``False``) mode."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, was_training in saved:
            m.training = was_training


class ModuleView(Mapping[str, Tensor]):
    """``module`` evaluated at ``params`` and ``buffers`` in a fixed mode, without touching the module's own state.

    BatchNorm-like layers update the running statistics held in ``buffers`` in place when ``training`` is True;
    the oracles pass fresh copies so derivative evaluations never change the statistics, and the training step
    keeps the copy it used (one update per real step).
    """

    def __init__(self, module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], training: bool):
        self.module = module
        self.params = params
        self.buffers = buffers
        self.training = training

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with module_mode(self.module, self.training):
            return functional_call(self.module, (dict(self.params), dict(self.buffers)), args, kwargs, strict=False)

    def __getitem__(self, key: str) -> Tensor:
        return self.params[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def __repr__(self) -> str:
        mode = "train" if self.training else "eval"
        return f"ModuleView({type(self.module).__name__}, {len(self.params)} params, {mode})"


def load_into(module: nn.Module, params: Params, buffers: Params) -> nn.Module:
    """Copy ``params`` and ``buffers`` into ``module`` in place and return it."""
    with torch.no_grad():
        for k, v in module.named_parameters():
            if k in params:
                v.copy_(params[k])
        for k, v in module.named_buffers():
            if k in buffers:
                v.copy_(buffers[k])
    return module
