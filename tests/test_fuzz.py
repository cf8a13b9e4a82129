"""Property-based fuzz of the public API (hypothesis): bad and borderline input to every registered method.

For every generated example the contract is:

- the only exception out of ``bilevel.Problem(...)``, ``bilevel.solve`` and ``bilevel.check_hypergradient`` is a
  ``BilevelError``, and its message names the offending argument or option (word match);
- input that is wrong (a value of another type than the option's annotation, NaN, a negative size, an unknown
  name, momentum outside [0, 1), a loss, sampler or projection that returned something unusable, an input the
  method would ignore: an inner projection not applied at every inner step, a joint projection or constraint not
  used every outer step) is refused with that error; input that is only unusual (0, inf, 1e300, float16 variables,
  huge step sizes) may run, or stop with any ``BilevelError``;
- when a call returns, its numbers are finite (``Result.outer``, ``Result.inner``, ``history["outer_loss"]``) and
  keep the problem's names and shapes;
- no example runs longer than ``HANG_SECONDS`` (every run is a few outer steps on a problem with d <= 6).

Oracle: the contract itself; the Neumann example compares with the closed-form hypergradient of a diagonal
quadratic (relative tolerance ``NEUMANN_RTOL``).

CI runs a derandomized profile of ~3,100 examples over 81 tests (about 40 s of CPU on 2 cores when all pass; no
shrinking). ``BILEVEL_FUZZ_EXAMPLES=N`` runs N random examples per test instead (with shrinking and hypothesis'
example database); ``BILEVEL_FUZZ_REPORT=path.jsonl`` appends every verdict to that file instead of failing at the
first bad one (what a to-do list of fixes is built from).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import signal
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, note, settings
from hypothesis import strategies as st
from torch import nn

import bilevel
from bilevel import BilevelError, Problem
from bilevel.hypergrad import implicit_hypergrad
from bilevel.linsolve import neumann
from bilevel.meta import TaskBatch, per_task
from bilevel.optim import OPTIMIZERS
from bilevel.registry import solver_class
from bilevel.stn import HyperParam, HyperSpace, StnLinear

EXAMPLES = int(os.environ.get("BILEVEL_FUZZ_EXAMPLES", "0"))
REPORT = os.environ.get("BILEVEL_FUZZ_REPORT")
HANG_SECONDS = 30.0
NEUMANN_RTOL = 0.05

settings.register_profile(
    "bilevel-fuzz-ci", derandomize=True, database=None, deadline=timedelta(seconds=10), print_blob=False,
    phases=(Phase.explicit, Phase.generate),
)
settings.register_profile("bilevel-fuzz-deep", derandomize=False, deadline=timedelta(seconds=10))
PROFILE = settings.get_profile("bilevel-fuzz-deep" if EXAMPLES else "bilevel-fuzz-ci")


def fuzz(ci_examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The test's hypothesis settings: ``ci_examples`` examples in CI, ``BILEVEL_FUZZ_EXAMPLES`` when set."""
    return settings(PROFILE, max_examples=EXAMPLES or ci_examples)


METHODS = bilevel.available_methods()
FAMILY = {m: "stn" if m == "stn" else "meta" if m in ("maml", "imaml") else "ridge" for m in METHODS}
HYPERGRADIENT_METHODS = [m for m in METHODS if getattr(solver_class(m), "differentiates", None) is not None]


# ----- small problems: a ridge-like problem (tensor or dict), a meta-learning one, a self-tuning network ------------
def batch(family: str, side: str, *, d: int, dtype: torch.dtype, rows: int = 8, extra: int = 0) -> Any:
    """One batch of ``family``'s data for ``side`` ("inner"/"outer"); ``extra`` adds feature columns (wrong shape)."""
    gen = torch.Generator().manual_seed(0 if side == "inner" else 1)
    if family == "ridge":
        return (torch.randn(rows, d + extra, generator=gen, dtype=torch.float64).to(dtype),
                torch.randn(rows, generator=gen, dtype=torch.float64).to(dtype))
    if family == "meta":
        return TaskBatch((torch.randn(3, rows, d + extra, generator=gen, dtype=torch.float64).to(dtype),
                          torch.randn(3, rows, 1, generator=gen, dtype=torch.float64).to(dtype)))
    return torch.ones(rows, 1 + extra, dtype=dtype)  # stn: the constant input of a linear best response


def ridge_losses(kind: str) -> tuple[Callable, Callable]:
    """L_T = ½ mean (Xw − y)² + ½ Σ e^λ w², L_V = ½ mean (X_v w − y_v)² with λ, w tensors or {"log_lam"}, {"w"}."""
    def unpack(lam: Any, w: Any) -> tuple[Any, Any]:
        return (lam, w) if kind == "tensor" else (lam["log_lam"], w["w"])

    def inner_loss(lam, w, b):
        lam, w = unpack(lam, w)
        return 0.5 * ((b[0] @ w - b[1]) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(lam, w, b):
        _, w = unpack(lam, w)
        return 0.5 * ((b[0] @ w - b[1]) ** 2).mean()

    return inner_loss, outer_loss


def meta_losses() -> tuple[Callable, Callable]:
    """One task's mean squared error of a linear model on its support / query set (``per_task``)."""
    @per_task
    def inner_loss(theta, net, b):
        return F.mse_loss(net(b[0]), b[1])

    @per_task
    def outer_loss(theta, net, b):
        return F.mse_loss(net(b[0]), b[1])

    return inner_loss, outer_loss


def stn_losses(space: HyperSpace) -> tuple[Callable, Callable]:
    """tests/test_stn.py's toy: L_T = ½‖ŵ(λ) − λ·1‖², L_V = ½‖ŵ(λ) − 2·1‖² with ŵ an StnLinear at input 1."""
    def weights(hp, net, x):
        return net(x, space.features(hp).reshape(-1, 1))

    def inner_loss(hp, net, x):
        return 0.5 * ((weights(hp, net, x) - hp["lam"].reshape(-1, 1)) ** 2).sum(-1).mean()

    def outer_loss(hp, net, x):
        return 0.5 * ((weights(hp, net, x) - 2.0) ** 2).sum(-1).mean()

    return inner_loss, outer_loss


def make_problem(
    method: str, *, d: int = 4, kind: str = "tensor", dtype: torch.dtype = torch.float64,
    inner_data: Any = None, outer_data: Any = None, wrap: Callable[[str, Callable], Callable] | None = None,
    **problem_kwargs: Any,
) -> Problem:
    """The small problem ``method`` runs on; ``wrap(side, loss)`` replaces a loss, ``*_data`` the default batches."""
    family = FAMILY[method]
    defaults: dict[str, Any] = {}
    if family == "ridge":
        outer = torch.zeros(d, dtype=dtype, requires_grad=True)
        inner = torch.zeros(d, dtype=dtype)
        if kind == "dict":
            outer, inner = {"log_lam": outer}, {"w": inner}
        inner_loss, outer_loss = ridge_losses(kind)
    elif family == "meta":
        outer = inner = nn.Linear(d, 1).to(dtype)
        inner_loss, outer_loss = meta_losses()
        defaults = {"outer_mode": "train", "check_dependencies": False}
    else:
        outer = HyperSpace([HyperParam("lam", "identity", 0.0)], dtype=dtype)
        inner = StnLinear(1, d, outer.n_features).to(dtype)
        inner_loss, outer_loss = stn_losses(outer)
    if wrap is not None:
        inner_loss, outer_loss = wrap("inner", inner_loss), wrap("outer", outer_loss)
    return Problem(
        outer=outer, inner=inner, inner_loss=inner_loss, outer_loss=outer_loss,
        inner_data=batch(family, "inner", d=d, dtype=dtype) if inner_data is None else inner_data,
        outer_data=batch(family, "outer", d=d, dtype=dtype) if outer_data is None else outer_data,
        **{**defaults, **problem_kwargs},
    )


def params_of(x: Any) -> dict[str, torch.Tensor]:
    """A projection's or constraint's argument as a dict: a tensor, a dict or a ModuleView."""
    if isinstance(x, torch.Tensor):
        return {"value": x}
    return dict(x.params) if isinstance(x, bilevel.functional.ModuleView) else dict(x)


def like(x: Any, new: dict[str, torch.Tensor]) -> Any:
    """``new`` in the form of ``x`` (a lone tensor stays a tensor; a dict or ModuleView becomes a dict)."""
    return new["value"] if isinstance(x, torch.Tensor) else new


def constraint(outer: Any, inner: Any) -> torch.Tensor:
    """A valid g(λ, w) ≤ 0: every inner entry ≤ 1 (1-D)."""
    return torch.cat([v.reshape(-1) for v in params_of(inner).values()]) - 1.0


# ----- bad and borderline values ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Bad:
    """A generated value: ``refuse`` when it must be refused with a BilevelError naming the argument."""

    value: Any
    label: str
    refuse: bool

    def __repr__(self) -> str:
        return f"{self.value!r} ({self.label})"


def tagged(strategy: st.SearchStrategy, label: str, refuse: bool) -> st.SearchStrategy[Bad]:
    return strategy.map(lambda v: Bad(v, label, refuse))


AUTO = typing.Literal["auto"]


def split_optional(hint: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None``, else (X, False); ``Annotated[X, ...]`` (a range, say) is read as X, and the
    ``"auto"`` arm of a step size (``X | Literal["auto"]``) is dropped (its wrong spellings are drawn separately)."""
    if typing.get_origin(hint) is typing.Annotated:
        return split_optional(typing.get_args(hint)[0])
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(hint) if a is not type(None) and a != AUTO]
        (rest,) = arms  # the settings' unions are X | None and X | "auto" (| None)
        return split_optional(rest)[0], type(None) in typing.get_args(hint)
    return hint, False


def has_auto(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and AUTO in typing.get_args(hint)


def option_values(name: str, hint: Any) -> st.SearchStrategy[Bad]:
    """Wrong-typed, out-of-range and borderline values for an option annotated ``hint``."""
    base, optional = split_optional(hint)
    out = []
    if base is bool:
        out += [tagged(st.sampled_from(["False", "True", "no", ""]), "str for bool", True),
                tagged(st.integers(0, 1), "int for bool", True)]
    elif base is int:
        out += [tagged(st.integers(-1000, -1), "negative int", True),
                tagged(st.floats(0.0, 20.0), "float for int", True),
                tagged(st.booleans(), "bool for int", True),
                tagged(st.integers(0, 20).map(str), "str for int", True),
                tagged(st.just(0), "zero", False)]
    elif base is float:
        out += [tagged(st.just(math.nan), "nan", True),
                tagged(st.floats(-1e300, -1e-300) | st.just(-math.inf), "negative", True),
                tagged(st.floats(1e-3, 10.0).map(repr), "str for float", True),
                tagged(st.floats(1e-3, 10.0).map(lambda v: [v]), "list for float", True),
                tagged(st.booleans(), "bool for float", True),
                tagged(st.just(0.0), "zero", False),
                tagged(st.just(math.inf), "inf", False),
                tagged(st.floats(1e6, 1e300), "huge", False),
                tagged(st.floats(1e-300, 1e-200), "tiny", False)]
        if "momentum" in name:
            out.append(tagged(st.floats(1.0, 10.0), "momentum >= 1", True))
    elif typing.get_origin(base) is typing.Literal:
        allowed = typing.get_args(base)
        unknown = st.sampled_from(["bogus", "", *(a.upper() for a in allowed)]) | st.text(max_size=6)
        out += [tagged(unknown.filter(lambda s: s not in allowed), "unknown literal", True),
                tagged(st.integers(0, 3), "int for literal", True)]
        if "bfloat16" in allowed:
            out.append(tagged(st.just(torch.bfloat16), "torch.dtype for literal", True))
    elif base is str:
        unknown = st.sampled_from(["bogus", "", "SGD", "Adam"]) | st.text(max_size=6)
        out += [tagged(unknown.filter(lambda s: s not in OPTIMIZERS), "unknown name", True),
                tagged(st.integers(0, 3), "int for str", True)]
    else:
        raise AssertionError(f"test_fuzz has no bad values for option {name!r} annotated {hint!r}; add them")
    if not optional:
        out.append(tagged(st.none(), "None", True))
    if has_auto(hint):
        out.append(tagged(st.sampled_from(["AUTO", "Auto", "automatic", "auto "]), "misspelt auto", True))
    return st.one_of(out)


def option_fields(method: str) -> dict[str, Any]:
    """{option: annotation} of ``method``'s settings dataclass (init fields only)."""
    cls = solver_class(method)
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


# ----- running one example ------------------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by the alarm when an example runs past ``HANG_SECONDS`` (BaseException: no ``except Exception`` eats it)."""


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    if not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Seed 0 inside, every global generator restored after (solve(seed=...) reseeds them)."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@dataclasses.dataclass
class Case:
    """One call of the API and what it must do.

    ``names``: a BilevelError must name one of them (word match; empty: any BilevelError will do, for values that
    are unusual rather than wrong). ``refuse``: it must raise (a callable is asked after
    the call, e.g. "the bad value was actually returned to bilevel"). ``expect(out)``: extra check of a returned value,
    a message when wrong.
    """

    klass: str
    method: str
    what: str
    call: Callable[[], Any]
    names: tuple[str, ...]
    refuse: bool | Callable[[], bool] = False
    expect: Callable[[Any], str | None] | None = None


def names_any(message: str, names: tuple[str, ...]) -> bool:
    return not names or any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message) for n in names)


def nonfinite(out: Any) -> str | None:
    """What in a returned value is not finite or lost the problem's structure (None when all is well)."""
    if isinstance(out, bilevel.Result):
        problem = out.problem
        for level, got, want in (("outer", out.outer_params, problem.outer_init), ("inner", out.inner_params,
                                                                                   problem.inner_init)):
            if set(got) != set(want) or any(got[k].shape != want[k].shape for k in want):
                return f"Result.{level} has names/shapes {_shapes(got)}, the problem {_shapes(want)}"
            bad = [k for k, v in got.items() if not bool(torch.isfinite(v).all())]
            if bad:
                return f"Result.{level} not finite in {bad}: {[got[k].flatten()[:3].tolist() for k in bad]}"
        losses = out.history.get("outer_loss", [])
        if not all(math.isfinite(x) for x in losses):
            return f"history['outer_loss'] not finite: {losses}"
    elif isinstance(out, bilevel.check.HypergradCheck):
        values = [*out.analytic, *out.numeric, out.rel_error]
        if not all(math.isfinite(x) for x in values) or nonfinite(out.hypergrad):
            return f"HypergradCheck not finite: {out}"
    elif isinstance(out, bilevel.hypergrad.Hypergradient):
        return nonfinite(out.hypergrad)
    elif isinstance(out, dict):
        bad = [k for k, v in out.items() if not bool(torch.isfinite(v).all())]
        return f"not finite in {bad}" if bad else None
    return None


def _shapes(p: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in p.items()}


def verdict(case: Case) -> tuple[str, str]:
    """("ok", ...) or (failure kind, detail): raw / unnamed / accepted / nonfinite / wrong / hang."""
    try:
        with isolated_rng(), warnings.catch_warnings(), time_bound(HANG_SECONDS):
            warnings.simplefilter("ignore")
            out = case.call()
    except BilevelError as e:
        if names_any(str(e), case.names):
            return "ok", f"refused: {e}"
        return "unnamed", f"BilevelError not naming any of {list(case.names)}: {e}"
    except Hang as e:
        return "hang", str(e)
    except Exception as e:  # noqa: BLE001 - the point of the test: nothing but BilevelError may escape
        return "raw", f"{type(e).__name__}: {e}"
    if case.refuse() if callable(case.refuse) else case.refuse:
        return "accepted", f"returned {type(out).__name__} instead of a BilevelError naming {list(case.names)}"
    problem = nonfinite(out)
    if problem:
        return "nonfinite", problem
    wrong = case.expect(out) if case.expect is not None else None
    if wrong:
        return "wrong", wrong
    return "ok", "returned"


def check(case: Case) -> None:
    note(f"[{case.klass}] {case.what}")
    kind, detail = verdict(case)
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps({"klass": case.klass, "method": case.method, "what": case.what, "kind": kind,
                                "detail": detail[:600]}) + "\n")
        return
    assert kind == "ok", f"{kind}: {case.what}\n  -> {detail}"


class Flag:
    """Set by a bad function / sampler when it hands its bad value to bilevel (so the value was used); ``calls``
    counts the calls of a wrapped function."""

    def __init__(self) -> None:
        self.fired = False
        self.calls = 0

    def __call__(self) -> bool:
        return self.fired


def inner_steps_per_outer_step(method: str) -> int:
    """Inner updates per outer step with the method's default settings (1 for single-loop methods)."""
    solver = solver_class(method)()
    for attr in ("n_inner_steps", "inner_steps", "train_steps"):
        value = getattr(solver, attr, None)
        if isinstance(value, int):
            return value
    return 1


def ignored(which: str, method: str, maxiter: int, flag: Flag, entry: str = "solve") -> Callable[[], bool]:
    """Whether the input ``which`` was ignored: an inner projection must be applied at every inner step, a joint
    projection or constraint at every outer step (check_hypergradient: at least once); fewer calls mean the
    method does not use it, and then it must be refused instead."""
    if entry != "solve":
        needed = 1
    elif which == "inner_projection":
        needed = inner_steps_per_outer_step(method) * maxiter
    else:
        needed = maxiter
    return lambda: flag.calls < needed


def solve_call(problem: Callable[[], Problem], method: Any, **kwargs: Any) -> Callable[[], Any]:
    return lambda: bilevel.solve(problem(), method, **kwargs)


def describe(method: str, d: int, kind: str, **kwargs: Any) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    where = f"{FAMILY[method]}{'[' + kind + ']' if FAMILY[method] == 'ridge' else ''}(d={d})"
    return f"solve({where}, {method!r}, {args})"


shapes = st.fixed_dictionaries({"d": st.integers(3, 6), "kind": st.sampled_from(["tensor", "dict"])})
maxiters = st.integers(1, 3)


# ----- (1) solver options of the wrong type / out of range -------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@fuzz(80)
@given(data=st.data())
def test_solver_options(method, data):
    fields = option_fields(method)
    name = data.draw(st.sampled_from(sorted(fields)), label="option")
    bad = data.draw(option_values(name, fields[name]), label="value")
    shape, maxiter = data.draw(shapes), data.draw(maxiters)
    names = (name,) if bad.refuse else ()
    problem = functools.partial(make_problem, method, **shape)
    check(Case("solver options", method, describe(method, **shape, maxiter=maxiter, **{name: bad}),
               solve_call(problem, method, maxiter=maxiter, **{name: bad.value}), names, bad.refuse))


# ----- (2) solve() and check_hypergradient() arguments --------------------------------------------------------------
def _counting_callback() -> Callable[[Any], None]:
    def callback(info: Any) -> None:
        callback.calls += 1

    callback.calls = 0
    return callback


def _state_from(method: str, **problem_kwargs: Any) -> Any:
    with isolated_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bilevel.solve(make_problem(method, **problem_kwargs), method, maxiter=1).state


SOLVE_ARGS: dict[str, st.SearchStrategy[Bad]] = {
    "maxiter": st.one_of(tagged(st.integers(-100, -1), "negative", True), tagged(st.floats(0, 3), "float", True),
                         tagged(st.booleans(), "bool", True), tagged(st.sampled_from(["2", None]), "str/None", True),
                         tagged(st.just(0), "zero", False)),
    "seed": st.one_of(tagged(st.floats(-3, 3), "float", True), tagged(st.sampled_from(["0", "seed"]), "str", True),
                      tagged(st.booleans(), "bool", True), tagged(st.integers(-2**70, -1), "negative", False),
                      tagged(st.integers(2**64, 2**70), "huge", False)),
    "callbacks": st.one_of(tagged(st.sampled_from([[1], ["stop"], "abc", 3, [None], [[]]]), "not callables", True),
                           tagged(st.builds(_counting_callback), "single callable", False),
                           tagged(st.just(None), "None", False)),
    "time_limit": st.one_of(tagged(st.floats(-1e9, -1e-9) | st.just(-math.inf), "negative", True),
                            tagged(st.sampled_from([math.nan, "1", [1.0]]), "nan/str/list", True),
                            tagged(st.sampled_from([0.0, 1e-12, math.inf]), "zero/tiny/inf", False)),
    "hypergrad_tol": st.one_of(tagged(st.floats(-1e9, -1e-9) | st.just(-math.inf), "negative", True),
                               tagged(st.sampled_from([math.nan, "1e-3", [1e-3]]), "nan/str/list", True),
                               tagged(st.sampled_from([0.0, math.inf]), "zero/inf", False)),
    "validate": tagged(st.sampled_from(["False", "True", "no", 0, 1, None, [False]]), "non-bool", True),
    "method": st.one_of(tagged(st.sampled_from([None, "bogus", "", "IFT", " cg", 3, object()]), "unknown", True),
                        tagged(st.sampled_from(METHODS).map(solver_class), "a class, not an instance", True)),
    "state": st.one_of(tagged(st.sampled_from(METHODS).map(lambda m: ("other method", m)), "another method's state",
                              False),
                       tagged(st.just(("other shapes", None)), "a state of other shapes", True),
                       tagged(st.sampled_from(["bogus", {}, 3]).map(lambda v: ("not a state", v)), "not a state", True)),
}

CHECK_ARGS: dict[str, st.SearchStrategy[Bad]] = {
    "eps": st.one_of(tagged(st.sampled_from([0.0, math.nan, math.inf, "1e-4"]), "bad eps", True),
                     tagged(st.floats(1e-12, 1e3) | st.floats(-1e-2, -1e-6), "tiny/huge/negative eps", False)),
    "n_directions": tagged(st.sampled_from([0, -1, 1.5, "3", None, True]), "bad n_directions", True),
    "inner_maxiter": st.one_of(tagged(st.sampled_from([-1, 2.5, "10", None]), "bad inner_maxiter", True),
                               tagged(st.sampled_from([0, 1]), "zero/one", False)),
    "outer": tagged(st.sampled_from(["x", {"other": torch.zeros(2)}, torch.zeros(7, dtype=torch.float64)]),
                    "other names/shapes", True),
}


@pytest.mark.parametrize("method", METHODS)
@fuzz(50)
@given(data=st.data())
def test_solve_arguments(method, data):
    entry = data.draw(st.sampled_from(["solve", "check_hypergradient"]), label="entry")
    args = SOLVE_ARGS if entry == "solve" else CHECK_ARGS
    name = data.draw(st.sampled_from(sorted(args)), label="argument")
    bad = data.draw(args[name], label="value")
    shape = data.draw(shapes)
    problem = functools.partial(make_problem, method, **shape)
    names: tuple[str, ...] = (name,) if bad.refuse else ()
    expect = None
    if entry == "check_hypergradient":
        if FAMILY[method] == "meta":  # full-batch task data (a TaskBatch is a stream, which the check refuses)
            problem = functools.partial(problem, **{f"{s}_data": batch("meta", s, d=shape["d"], dtype=torch.float64).data
                                                    for s in ("inner", "outer")})
        if method not in HYPERGRADIENT_METHODS:  # no hypergradient rule to check: refused, naming the method
            name, bad, names = "method", Bad(method, "a method without hypergradient()", True), ("method", method)
        kwargs = {} if name == "method" else {name: bad.value}
        call = lambda: bilevel.check_hypergradient(problem(), method, **kwargs)  # noqa: E731
        what = f"check_hypergradient({FAMILY[method]}(d={shape['d']}), {method!r}, {kwargs})"
    elif name == "state":
        how, other = bad.value
        state = (_state_from(other, **shape) if how == "other method"
                 else _state_from(method, d=shape["d"] + 1, kind=shape["kind"]) if how == "other shapes" else other)
        call = solve_call(problem, method, maxiter=2, state=state)
        what = describe(method, **shape, maxiter=2, state=bad)
    elif name == "method":
        call = solve_call(problem, bad.value, maxiter=2)
        what = f"solve({FAMILY[method]}(d={shape['d']}), method={bad.value!r}, maxiter=2)"
    else:
        kwargs = {"maxiter": 2, name: bad.value}
        call = solve_call(problem, method, **kwargs)
        what = describe(method, **shape, **{**kwargs, name: bad})
        if name == "callbacks" and callable(bad.value):
            expect = lambda out: None if bad.value.calls == out.n_steps else (  # noqa: E731
                f"a lone callback was accepted but called {bad.value.calls} times in {out.n_steps} steps")
    check(Case("solve arguments", method, what, call, names, bad.refuse, expect))


# ----- (3) data: empty batches, a shape change at call k, an exhausted generator, wrong types --------------------------
def changing_sampler(good: Any, bad: Any, after: int, flag: Flag) -> Callable[[], Any]:
    """A sampler returning ``good`` ``after`` times, then ``bad``."""
    calls = [0]

    def sample() -> Any:
        calls[0] += 1
        if calls[0] > after:
            flag.fired = True
            return bad
        return good

    return sample


def one_shot(good: Any, n: int, flag: Flag) -> Iterator[Any]:
    """A generator object of ``n`` batches (cannot be restarted); the flag is set when it runs out."""
    yield from [good] * n
    flag.fired = True


@pytest.mark.parametrize("method", METHODS)
@fuzz(40)
@given(data=st.data())
def test_data(method, data):
    side = data.draw(st.sampled_from(["inner", "outer"]), label="side")
    how = data.draw(st.sampled_from(["empty", "empty later", "reshaped later", "generator", "wrong type"]), label="how")
    shape, after, maxiter = data.draw(shapes), data.draw(st.integers(1, 4), label="after"), data.draw(maxiters)
    family, d = FAMILY[method], shape["d"]
    good = batch(family, side, d=d, dtype=torch.float64)
    flag = Flag()
    refuse: bool | Flag = flag
    if how == "empty":
        value, refuse = batch(family, side, d=d, dtype=torch.float64, rows=0), True
    elif how == "empty later":
        value = changing_sampler(good, batch(family, side, d=d, dtype=torch.float64, rows=0), after, flag)
    elif how == "reshaped later":
        value = changing_sampler(good, batch(family, side, d=d, dtype=torch.float64, extra=1), after, flag)
    elif how == "generator":
        value = one_shot(good, after, flag)
    else:
        value, refuse = data.draw(st.sampled_from([3, 2.5, object(), "abc", b"xy"]), label="value"), True
    names = (f"{side}_data", f"{side}_loss") + (("not finite",) if "empty" in how else ())
    problem = functools.partial(make_problem, method, **shape, **{f"{side}_data": value})
    what = describe(method, **shape, maxiter=maxiter) + f" with {side}_data: {how} (after {after})"
    check(Case("data", method, what, solve_call(problem, method, maxiter=maxiter), names, refuse))


# ----- (4) losses that change behaviour after the first call (after validation) --------------------------------------
BAD_RETURNS: dict[str, Callable[[torch.Tensor], Any]] = {
    "None": lambda v: None,
    "a tuple": lambda v: (v, {"aux": 1}),
    "a vector": lambda v: v * torch.ones(2, dtype=v.dtype),
    "a Python float": lambda v: float(v),
    "a tensor without graph (.detach())": lambda v: v.detach(),
    "NaN": lambda v: v * math.nan,
}
BAD_CONSTRAINTS: dict[str, Callable[[torch.Tensor], Any]] = {
    "None": lambda g: None, "a Python float": lambda g: float(g.sum()), "a longer vector": lambda g: torch.cat([g, g]),
    "a tuple": lambda g: (g,), "NaN": lambda g: g * math.nan, "a tensor without graph (.detach())": lambda g: g.detach(),
}


def turning_bad(fn: Callable, bad: Callable[[Any], Any], after: int, flag: Flag) -> Callable:
    """``fn`` for ``after`` calls, then ``bad(fn(...))``."""
    calls = [0]

    @functools.wraps(fn)
    def wrapped(*args: Any) -> Any:
        calls[0] += 1
        flag.calls += 1
        value = fn(*args)
        if calls[0] > after:
            flag.fired = True
            return bad(value)
        return value

    return wrapped


@pytest.mark.parametrize("method", METHODS)
@fuzz(50)
@given(data=st.data())
def test_losses_turning_bad(method, data):
    side = data.draw(st.sampled_from(["inner", "outer", "constraints"] if method == "lvhba" else ["inner", "outer"]))
    table = BAD_CONSTRAINTS if side == "constraints" else BAD_RETURNS
    how = data.draw(st.sampled_from(sorted(table)), label="returns")
    shape, after, maxiter = data.draw(shapes), data.draw(st.integers(1, 5), label="after"), data.draw(maxiters)
    flag = Flag()
    if side == "constraints":
        problem = functools.partial(make_problem, method, **shape,
                                    inner_constraints=turning_bad(constraint, table[how], after, flag))
        names: tuple[str, ...] = ("inner_constraints",)
    else:
        def wrap(s: str, loss: Callable) -> Callable:
            return turning_bad(loss, table[how], after, flag) if s == side else loss

        problem = functools.partial(make_problem, method, **shape, wrap=wrap)
        names = (f"{side}_loss",)
    detached = how.startswith("a tensor without graph")
    names += ("not finite",) if how == "NaN" or detached else ()
    what = describe(method, **shape, maxiter=maxiter) + f" with {side} returning {how} after {after} calls"
    refuse = (lambda: False) if detached else flag  # no graph may run (zero gradient) or be refused
    check(Case("losses", method, what, solve_call(problem, method, maxiter=maxiter), names, refuse))


# ----- (5) projections returning the wrong thing; outer_bounds of the wrong type ------------------------------------
BAD_PROJECTIONS: dict[str, Callable[[Any], Any]] = {
    "a list": lambda x: list(params_of(x).values()),
    "None": lambda x: None,
    "another shape": lambda x: like(x, {k: torch.cat([v.reshape(-1), v.reshape(-1)[:1]]) for k, v in params_of(x).items()}),
    "other names": lambda x: {f"{k}_renamed": v for k, v in params_of(x).items()},
    "NaN": lambda x: like(x, {k: v * math.nan for k, v in params_of(x).items()}),
    "integers": lambda x: like(x, {k: v.round().long() for k, v in params_of(x).items()}),
}
BAD_JOINT: dict[str, Callable[[tuple[Any, Any]], Any]] = {  # of the pair (outer, inner) a joint projection returns
    "a list": lambda p: list(p), "None": lambda p: None, "a triple": lambda p: (*p, p[0]),
    "another shape": lambda p: (BAD_PROJECTIONS["another shape"](p[0]), p[1]),
    "NaN": lambda p: (p[0], BAD_PROJECTIONS["NaN"](p[1])),
}
BOUNDS = st.one_of(
    tagged(st.sampled_from(["a", (1,), (2, 1), ("0", "1"), (math.nan, 1.0), (0.0, math.nan), (1, 2, 3), 5, {0: 1},
                            (math.inf, None), (None, -math.inf)]), "wrong outer_bounds", True),
    tagged(st.sampled_from([[-1.0, 1.0], (None, None), (0.0, math.inf), (-math.inf, math.inf), (-0.5, None),
                            (0.0, 0.0)]), "unusual outer_bounds", False),
)


def within(bounds: Any) -> Callable[[Any], str | None]:
    lo, hi = bounds

    def expect(out: Any) -> str | None:
        flat = torch.cat([v.reshape(-1) for v in out.outer_params.values()])
        if (lo is not None and bool((flat < lo).any())) or (hi is not None and bool((flat > hi).any())):
            return f"outer {flat.tolist()} outside outer_bounds {bounds}"
        return None

    return expect


@pytest.mark.parametrize("method", METHODS)
@fuzz(40)
@given(data=st.data())
def test_projections(method, data):
    which = data.draw(st.sampled_from(["outer_projection", "inner_projection", "joint_projection", "outer_bounds"]))
    shape, after, maxiter = data.draw(shapes), data.draw(st.integers(1, 4), label="after"), data.draw(maxiters)
    flag = Flag()
    expect = None
    if which == "outer_bounds":
        bad = data.draw(BOUNDS, label="bounds")
        value, refuse, how = bad.value, bad.refuse, repr(bad)
        if not refuse and isinstance(value, (tuple, list)):
            expect = within(value)
    else:
        table = BAD_JOINT if which == "joint_projection" else BAD_PROJECTIONS
        how = data.draw(st.sampled_from(sorted(table)), label="returns")
        identity = (lambda o, i: (o, i)) if which == "joint_projection" else (lambda x: x)
        value = turning_bad(identity, table[how], after, flag)
        unused = ignored(which, method, maxiter, flag)
        refuse = lambda: flag.fired or unused()  # noqa: E731
        how = f"returning {how} after {after} calls"
    names = (which, "not finite") if "NaN" in how else (which,)
    problem = functools.partial(make_problem, method, **shape, **{which: value})
    what = describe(method, **shape, maxiter=maxiter) + f" with {which} {how}"
    check(Case("projections", method, what, solve_call(problem, method, maxiter=maxiter), names, refuse, expect))


# ----- (6) low-precision variables -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@fuzz(10)
@given(data=st.data())
def test_low_precision(method, data):
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16]), label="dtype")
    optimizers = [{}] + ([{"outer_optimizer": "adam"}, {"outer_optimizer": "sgd"}]
                         if "outer_optimizer" in option_fields(method) else [])
    options = data.draw(st.sampled_from(optimizers), label="options")
    shape, maxiter = data.draw(shapes), data.draw(maxiters)
    problem = functools.partial(make_problem, method, **shape, dtype=dtype)
    names = ()  # variables of a valid dtype: any BilevelError will do, or a finite result
    what = describe(method, **shape, maxiter=maxiter, **options) + f" in {dtype}"
    check(Case("low precision", method, what, solve_call(problem, method, maxiter=maxiter, **options), names))


# ----- (7) huge step sizes: the iterates blow up, possibly at the last step -------------------------------------------
def step_size_options(method: str) -> list[str]:
    return sorted(n for n, h in option_fields(method).items()
                  if split_optional(h)[0] is float and re.search(r"(^|_)lr$|alpha|penalty0", n))


@pytest.mark.parametrize("method", METHODS)
@fuzz(25)
@given(data=st.data())
def test_huge_steps(method, data):
    name = data.draw(st.sampled_from(step_size_options(method)), label="option")
    value = 10.0 ** data.draw(st.floats(1.0, 300.0), label="log10 value")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    sgd = "outer_optimizer" in option_fields(method) and data.draw(st.booleans(), label="outer sgd")
    options = {name: value, **({"outer_optimizer": "sgd"} if sgd else {})}
    shape, maxiter = data.draw(shapes), data.draw(maxiters)
    problem = functools.partial(make_problem, method, **shape, dtype=dtype)
    names = ()  # a valid step size: any BilevelError will do, or a finite result
    what = describe(method, **shape, maxiter=maxiter, **options) + f" in {dtype}"
    check(Case("huge steps", method, what, solve_call(problem, method, maxiter=maxiter, **options), names))


# ----- (8) a mildly diverging Neumann series ---------------------------------------------------------------------------
def diagonal_quadratic(h: torch.Tensor, lam0: torch.Tensor, target: torch.Tensor) -> Problem:
    """L_T = ½ Σ h_i (w_i − λ_i)², L_V = ½‖w − t‖²: w*(λ) = λ, dF/dλ = λ − t, H = diag(h)."""
    return Problem(outer=lam0.clone().requires_grad_(True), inner=lam0.clone(),
                   inner_loss=lambda lam, w, b: 0.5 * (h * (w - lam) ** 2).sum(),
                   outer_loss=lambda lam, w, b: 0.5 * ((w - target) ** 2).sum())


def close_to(closed: torch.Tensor, get: Callable[[Any], torch.Tensor]) -> Callable[[Any], str | None]:
    def expect(out: Any) -> str | None:
        got = get(out)
        err = float((got - closed).norm() / closed.norm())
        if err <= NEUMANN_RTOL:
            return None
        return f"hypergradient {got.tolist()} vs closed form {closed.tolist()}: rel err {err:.3g}"

    return expect


@fuzz(100)
@given(ratio=st.floats(2.05, 3.5), h_max=st.floats(0.5, 20.0), terms=st.integers(1, 6),
       entry=st.sampled_from(["implicit_hypergrad", "solve"]),
       lam0=st.lists(st.floats(-2, 2), min_size=2, max_size=2),
       gap=st.lists(st.floats(0.1, 2) | st.floats(-2, -0.1), min_size=2, max_size=2))
def test_neumann_divergence(ratio, h_max, terms, entry, lam0, gap):
    """α·λ_max = ``ratio`` ∈ (2, 3.5]: diverging, by |1 − ratio|^K ≤ 2.5^6, mostly under neumann's 100× growth check;
    α·λ_min = 1 makes the other direction exact after one term. The answer must be a BilevelError or within
    ``NEUMANN_RTOL`` of the closed form λ − t."""
    alpha = ratio / h_max
    h = torch.tensor([1.0 / alpha, h_max], dtype=torch.float64)
    lam0_t, closed = torch.tensor(lam0, dtype=torch.float64), torch.tensor(gap, dtype=torch.float64)
    target_t = lam0_t - closed
    problem = lambda: diagonal_quadratic(h, lam0_t, target_t)  # noqa: E731
    options = {"neumann_alpha": alpha, "neumann_terms": terms}
    if entry == "implicit_hypergrad":
        def call() -> Any:
            p = problem()
            solver = functools.partial(neumann, alpha=alpha, maxiter=terms)
            return implicit_hypergrad(p, p.outer_init, p.inner_init, inner_batch=None, outer_batch=None, solve=solver)

        expect = close_to(closed, lambda out: next(iter(out.hypergrad.values())))  # the lone tensor's entry
    else:  # one SGD step of size 1 from w* = λ: hypergradient = λ0 − λ1
        call = solve_call(problem, "ift", maxiter=1, inner_steps=0, outer_optimizer="sgd", outer_lr=1.0, **options)
        expect = close_to(closed, lambda out: lam0_t - out.outer)
    what = f"{entry} on diag({h.tolist()}) with ift {options} (α·λ_max = {ratio:.3g})"
    check(Case("neumann", "ift", what, call, ("neumann_alpha", "alpha", "diverged"), False, expect))


# ----- (9) inputs a method would ignore -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@fuzz(12)
@given(data=st.data())
def test_ignored_inputs(method, data):
    """inner_constraints, joint_projection and inner_projection (valid ones) are used by the method — called every
    step (see ``ignored``) — or refused naming them; so is check_hypergradient with them."""
    which = data.draw(st.sampled_from(["inner_constraints", "joint_projection", "inner_projection"]), label="input")
    entry = data.draw(st.sampled_from(["solve", "check_hypergradient"] if method in HYPERGRADIENT_METHODS
                                      else ["solve"]), label="entry")
    shape, maxiter = data.draw(shapes), data.draw(maxiters)
    valid = {"inner_constraints": constraint, "joint_projection": lambda o, i: (o, i), "inner_projection": lambda x: x}
    flag = Flag()
    value = turning_bad(valid[which], lambda v: v, 10**9, flag)  # counts the calls, never turns bad
    problem = functools.partial(make_problem, method, **shape, **{which: value})
    if entry == "solve":
        call, what = solve_call(problem, method, maxiter=maxiter), describe(method, **shape, maxiter=maxiter)
    else:
        call = lambda: bilevel.check_hypergradient(problem(), method)  # noqa: E731
        what = f"check_hypergradient({FAMILY[method]}(d={shape['d']}), {method!r})"
    check(Case("ignored inputs", method, what + f" with {which}", call, (which,), ignored(which, method, maxiter, flag, entry)))
