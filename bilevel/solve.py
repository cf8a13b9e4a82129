"""``solve()``: one loop for every method — steps, history, timings, oracle counts, callbacks, stopping."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bilevel import checkpoint as checkpoint_io
from bilevel import rng, tree
from bilevel.callbacks import StepInfo
from bilevel.checkpoint import RunState
from bilevel.data import DataStreams
from bilevel.errors import BilevelError
from bilevel.functional import load_into
from bilevel.history import History
from bilevel.options import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Seed, check_arguments, owner_name
from bilevel.oracles import count_oracle_calls
from bilevel.problem import LONE_KEY, Problem, check_finite
from bilevel.registry import check_problem_inputs, make_solver
from bilevel.rng import seed_everything
from bilevel.types import Params


@dataclasses.dataclass
class Result:
    """The outcome of :func:`solve`.

    Attributes:
        outer / inner: the solution in the form the problem was given (a tensor or a dict of tensors; a dict of
            parameters for a module — see :meth:`inner_module`).
        outer_params / inner_params / buffers: the same as dicts of tensors.
        history: per-step scalars (:class:`bilevel.history.History`).
        method: the solver's name; ``solver`` its settings; ``state`` its final state (to resume).
        n_steps: outer steps taken; ``wall_time`` seconds in total; ``stop_reason`` why the loop ended.
        oracle_calls: oracle calls by kind over the run.
        run_state: everything needed to continue exactly (:class:`bilevel.checkpoint.RunState`; pass the Result
            as ``solve(..., state=result)``), or None when the data came from a one-shot iterator.
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
    run_state: RunState | None = dataclasses.field(default=None, repr=False)

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


def solve(
    problem: Problem,
    method: str | Any = "ift",
    *,
    maxiter: NonNegativeInt = 100,
    callbacks: Sequence[Callable[..., Any]] = (),
    seed: Seed | None = None,
    time_limit: PositiveFloat | None = None,
    hypergrad_tol: NonNegativeFloat | None = None,
    state: Any = None,
    validate: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: PositiveInt | None = None,
    **options: Any,
) -> Result:
    r"""Run ``method`` on ``problem`` until ``maxiter`` outer steps have been taken in all.

    Args:
        problem: the :class:`Problem`.
        method: a registered name (see :func:`bilevel.available_methods`) or a solver instance.
        maxiter: the total number of outer steps (a resumed run counts the steps it resumes from).
        callbacks: a list of callables ``f(StepInfo) -> bool | None``; ``True`` stops the run (progress bars,
            pruning). A callback with ``state_dict()``/``load_state_dict()`` is checkpointed too.
        seed: seeds Python, NumPy and torch before ``init`` (data order, perturbations, initialisations).
        time_limit: stop after this many seconds.
        hypergrad_tol: stop once the step's ``hypergrad_norm`` falls to this.
        state: where to continue from: a :class:`Result` (or its ``run_state``) resumes exactly, data streams and
            random generators included (see :mod:`bilevel.checkpoint`); a bare solver state (``Result.state``)
            continues from those variables with fresh data streams and a new history.
        validate: evaluate both losses once first and raise on wrong shapes, NaN/inf or unused outer variables.
        checkpoint: a file path: the run is saved there every ``checkpoint_every`` steps (default 10) and at the end,
            atomically; if the file exists, the run resumes from it (same method, settings and problem, else an
            error), bit-identically to a run that was never interrupted.
        **options: the solver's settings (fields of its dataclass), e.g. ``inner_steps=20``.

    Every argument is checked against its annotation; every failure inside a step is a :class:`BilevelError`
    naming the method and the step; NaN/inf in a step's losses or hypergradient, or in the variables returned,
    is an error, never a result.
    """
    check_arguments("solve", solve, {"maxiter": maxiter, "callbacks": callbacks, "seed": seed, "time_limit": time_limit,
                                     "hypergrad_tol": hypergrad_tol, "validate": validate, "checkpoint": checkpoint,
                                     "checkpoint_every": checkpoint_every})
    if not isinstance(problem, Problem):
        raise BilevelError(f"solve: problem must be a bilevel.Problem, got {type(problem).__name__}.")
    if checkpoint_every is not None and checkpoint is None:
        raise BilevelError("solve: checkpoint_every is set but checkpoint is None; pass checkpoint='run.pt' too.")
    if checkpoint is not None and state is not None:
        raise BilevelError("solve: pass either checkpoint= (resumes from the file when it exists) or state=, not both.")
    solver = make_solver(method, **options)
    name = method if isinstance(method, str) else owner_name(solver)
    check_problem_inputs(name, solver, problem)
    if seed is not None:
        seed_everything(seed)
    data = DataStreams(problem.inner_data, problem.outer_data)
    if validate:
        problem.validate(data.inner(), data.outer())
        data = data.restarted()
    if checkpoint is not None:
        data.state_dict()  # refuses one-shot iterators now rather than at the first save
    fresh = solver.init(problem)
    settings = _settings(solver)
    signature = checkpoint_io.problem_signature(fresh.outer, fresh.inner)
    run = _resume_point(state, checkpoint, fresh, name, settings, signature)
    history = History()
    total_calls: Counter = Counter()
    first_step, spent = 0, 0.0
    if isinstance(run, RunState):
        state, first_step, spent = run.solver_state, run.step, run.elapsed
        history.update({k: list(v) for k, v in run.history.items()})
        total_calls.update(run.oracle_calls)
        data.load_state_dict(run.data)
        rng.set_global_state(run.rng)  # last: restoring an iterable's position moved torch's generator
        _load_callbacks(callbacks, run.callbacks)
    else:
        state = fresh if run is None else run
    every = checkpoint_every or 10

    def snapshot(steps: int, elapsed: float) -> RunState:
        return RunState(method=name, options=settings, problem=signature, step=steps, solver_state=state,
                        history={k: list(v) for k, v in history.items()}, oracle_calls=dict(total_calls),
                        elapsed=elapsed, rng=rng.global_state(), data=data.state_dict(),
                        callbacks=[_callback_state(c) for c in callbacks])

    stop_reason = "maxiter"
    start = time.perf_counter() - spent
    step = first_step - 1
    for step in range(first_step, maxiter):
        t0 = time.perf_counter()
        with count_oracle_calls() as calls:
            metrics = None
            try:
                state, metrics = solver.step(problem, state, data)
            except BilevelError as e:
                raise type(e)(f"{e} [{name}, outer step {step}]") from e
            except (MemoryError, torch.OutOfMemoryError):
                raise
            except Exception as e:  # noqa: BLE001 - a raw error from the user's functions or data, given context
                raise BilevelError(
                    f"{name}, outer step {step}: {type(e).__name__}: {e}. It was raised while evaluating the problem's "
                    "functions (losses, constraints, projections, data); the traceback above shows where."
                ) from e
        scalars = {k: _scalar(v) for k, v in metrics.items() if v is not None}  # None: nothing to record yet
        step_time = time.perf_counter() - t0
        total_calls.update(calls)
        for key in ("outer_loss", "inner_loss", "hypergrad_norm"):
            if key in scalars and not math.isfinite(scalars[key]):
                check_finite(f"{name}: {key}", torch.as_tensor(scalars[key]), step)
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
        elif hypergrad_tol is not None and scalars.get("hypergrad_norm", math.inf) <= hypergrad_tol:
            stop_reason = "hypergrad_tol"
        elif time_limit is not None and elapsed >= time_limit:
            stop_reason = "time_limit"
        finished = stop_reason != "maxiter" or step + 1 == maxiter
        if checkpoint is not None and ((step + 1) % every == 0 or finished):
            checkpoint_io.save(snapshot(step + 1, elapsed), checkpoint)
        if finished:
            break
    for callback in callbacks:
        close = getattr(callback, "close", None)
        if callable(close):
            close()
    _check_finite_variables(name, state, step)
    wall = time.perf_counter() - start
    try:
        run_state: RunState | None = snapshot(step + 1, wall)
    except BilevelError:  # a one-shot iterator cannot be resumed exactly
        run_state = None
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
        wall_time=wall,
        stop_reason=stop_reason,
        oracle_calls=dict(total_calls),
        problem=problem,
        run_state=run_state,
    )


def _settings(solver: Any) -> dict[str, Any]:
    """The solver's settings as plain data (what a resumed run must match)."""
    if not dataclasses.is_dataclass(solver):
        return {}
    return {f.name: repr(checkpoint_io.encode(getattr(solver, f.name))) for f in dataclasses.fields(solver) if f.init}


def _resume_point(state: Any, checkpoint: Any, fresh: Any, name: str, settings: dict[str, Any],
                  signature: dict[str, Any]) -> Any:
    """A :class:`RunState` to resume from, a bare solver state to continue from, or None for a new run."""
    if checkpoint is not None:
        if not os.path.exists(checkpoint):
            return None
        run = checkpoint_io.load(checkpoint, fresh)
        checkpoint_io.check_compatible(run, name, settings, signature, f"solve: checkpoint {os.fspath(checkpoint)!r}")
        return run
    if state is None:
        return None
    if isinstance(state, Result):
        if state.run_state is None:
            raise BilevelError(
                "solve: state= is a Result whose run cannot be resumed exactly (its data came from a one-shot "
                "iterator); pass state=result.state to continue from its variables with fresh data."
            )
        state = state.run_state
    if isinstance(state, RunState):
        checkpoint_io.check_compatible(state, name, settings, signature, "solve: state=")
        return state
    if type(state) is not type(fresh):
        raise BilevelError(
            f"solve: state= is a {type(state).__name__}, but method {name!r} keeps a {type(fresh).__name__}; pass the "
            "Result (or Result.state) of a run of the same method."
        )
    got = checkpoint_io.problem_signature(state.outer, state.inner)
    if got != signature:
        raise BilevelError(
            f"solve: state= holds variables {got}, but this problem has {signature}; pass a state of this problem."
        )
    return state


def _check_finite_variables(name: str, state: Any, step: int) -> None:
    """NaN/inf in the variables a run returns is an error (one host sync)."""
    for level in ("outer", "inner"):
        params = getattr(state, level)
        bad = tree.nonfinite_keys(params)
        if bad:
            names = "the tensor" if bad == [LONE_KEY] else ", ".join(map(repr, bad))
            raise BilevelError(
                f"{name}: the {level} variables ({names}) hold NaN/inf after outer step {step}: the last update "
                "diverged. Lower the step sizes (inner_lr, outer_lr), check the data, or bound the outer variables "
                "with outer_bounds."
            )


def _callback_state(callback: Any) -> Any:
    get = getattr(callback, "state_dict", None)
    return get() if callable(get) else None


def _load_callbacks(callbacks: Sequence[Any], states: list[Any]) -> None:
    if len(states) != len(callbacks):
        return  # callbacks are the caller's to choose on a resume; only matching ones get their state back
    for callback, saved in zip(callbacks, states):
        load = getattr(callback, "load_state_dict", None)
        if saved is not None and callable(load):
            load(saved)


def _scalar(value: Any) -> float:
    if isinstance(value, Tensor):
        return float(value.detach())
    return float(value)
