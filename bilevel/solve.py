"""``solve()``: one loop for every method — steps, history, timings, oracle counts, callbacks, stopping."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bilevel.callbacks import StepInfo
from bilevel.data import DataStreams
from bilevel.errors import BilevelError
from bilevel.functional import load_into
from bilevel.history import History
from bilevel.oracles import count_oracle_calls
from bilevel.problem import Problem, check_finite
from bilevel.registry import make_solver
from bilevel.types import Params


@dataclasses.dataclass
class Result:
    """The outcome of :func:`solve`.

    Attributes:
        outer / inner: the solution in the form the problem was given (a tensor or a dict of tensors; a dict of
            parameters for a module — see :meth:`inner_module`).
        outer_params / inner_params / buffers: the same as dicts of tensors.
        history: per-step scalars (:class:`bilevel.History`).
        method: the solver's name; ``solver`` its settings; ``state`` its final state (to resume).
        n_steps: outer steps taken; ``wall_time`` seconds in total; ``stop_reason`` why the loop ended.
        oracle_calls: oracle calls by kind over the run.
    """

    outer: Any
    inner: Any
    outer_params: Params
    inner_params: Params
    buffers: Params
    history: History
    method: str
    solver: Any
    state: Any
    n_steps: int
    wall_time: float
    stop_reason: str
    oracle_calls: dict[str, int]
    problem: Problem = dataclasses.field(repr=False)

    def inner_module(self) -> nn.Module:
        """A copy of the problem's inner module holding the solution's parameters and buffers."""
        if self.problem.module is None:
            raise BilevelError("Result.inner_module: the problem's inner variables are tensors, not a module.")
        return load_into(copy.deepcopy(self.problem.module), self.inner_params, self.buffers)

    def outer_loss(self, batch: Any = None) -> float:
        """L_V at the solution on ``batch`` (default: the problem's outer data when it is a full batch)."""
        batch = self.problem.outer_data if batch is None else batch
        with torch.no_grad():
            return float(self.problem.outer_objective(self.outer_params, self.inner_params, batch, self.buffers))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def solve(
    problem: Problem,
    method: str | Any = "ift",
    *,
    maxiter: int = 100,
    callbacks: Sequence[Any] = (),
    seed: int | None = None,
    time_limit: float | None = None,
    hypergrad_tol: float | None = None,
    state: Any = None,
    validate: bool = True,
    **options: Any,
) -> Result:
    r"""Run ``method`` on ``problem`` for up to ``maxiter`` outer steps.

    Args:
        problem: the :class:`Problem`.
        method: a registered name (see :func:`bilevel.available_methods`) or a solver instance.
        maxiter: outer steps.
        callbacks: callables ``f(StepInfo) -> bool | None``; ``True`` stops the run (progress bars, pruning).
        seed: seeds Python, NumPy and torch before ``init`` (data order, perturbations, initialisations).
        time_limit: stop after this many seconds.
        hypergrad_tol: stop once the step's ``hypergrad_norm`` falls below this.
        state: a solver state to resume from (``Result.state`` of an earlier run).
        validate: evaluate both losses once first and raise on wrong shapes, NaN/inf or unused outer variables.
        **options: the solver's settings (fields of its dataclass), e.g. ``inner_steps=20``.
    """
    if maxiter < 0:
        raise BilevelError(f"solve: maxiter must be >= 0, got {maxiter}.")
    solver = make_solver(method, **options)
    name = method if isinstance(method, str) else type(method).__name__.lower()
    if seed is not None:
        seed_everything(seed)
    data = DataStreams(problem.inner_data, problem.outer_data)
    if validate:
        problem.validate(data.inner(), data.outer())
        data = DataStreams(problem.inner_data, problem.outer_data)
    if state is None:
        state = solver.init(problem)
    history = History()
    total_calls: Counter = Counter()
    stop_reason = "maxiter"
    start = time.perf_counter()
    step = -1
    for step in range(maxiter):
        t0 = time.perf_counter()
        with count_oracle_calls() as calls:
            try:
                state, metrics = solver.step(problem, state, data)
            except BilevelError as e:
                raise type(e)(f"{e} [{name}, outer step {step}]") from e
        scalars = {k: _scalar(v) for k, v in metrics.items()}
        step_time = time.perf_counter() - t0
        total_calls.update(calls)
        for key in ("outer_loss", "inner_loss"):
            if key in metrics:
                check_finite(f"{name}: {key}", torch.as_tensor(metrics[key]), step)
        elapsed = time.perf_counter() - start
        record = {"step": float(step), **scalars, "oracle_calls": float(sum(total_calls.values())),
                  **{f"calls_{kind}": float(n) for kind, n in total_calls.items()},
                  "step_time": step_time, "elapsed": elapsed}
        history.append(record)
        info = StepInfo(step=step, maxiter=maxiter, metrics=record, state=state, history=history, elapsed=elapsed)
        stop = False
        for callback in callbacks:
            stop = bool(callback(info)) or stop
        if stop:
            stop_reason = "callback"
            break
        if hypergrad_tol is not None and scalars.get("hypergrad_norm", math.inf) <= hypergrad_tol:
            stop_reason = "hypergrad_tol"
            break
        if time_limit is not None and elapsed >= time_limit:
            stop_reason = "time_limit"
            break
    for callback in callbacks:
        close = getattr(callback, "close", None)
        if callable(close):
            close()
    return Result(
        outer=problem.outer_to_user(state.outer),
        inner=problem.inner_to_user(state.inner),
        outer_params=state.outer,
        inner_params=state.inner,
        buffers=getattr(state, "buffers", None) or {},
        history=history,
        method=name,
        solver=solver,
        state=state,
        n_steps=step + 1,
        wall_time=time.perf_counter() - start,
        stop_reason=stop_reason,
        oracle_calls=dict(total_calls),
        problem=problem,
    )


def _scalar(value: Any) -> float:
    if isinstance(value, Tensor):
        return float(value.detach())
    return float(value)
