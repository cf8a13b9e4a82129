r"""Settings validated from their type annotations, in one place.

A solver is a frozen dataclass of its settings (see :class:`Options`); each field's annotation says what it accepts,
and :func:`check_value` enforces it when the solver is built, so a bad option fails at once with a
:class:`~bilevel.errors.BilevelError` naming the option, the value, what was expected and a value that works:

* ``bool`` accepts only ``True``/``False`` (``"False"`` is refused, not read as true);
* ``int`` accepts integers, not bools or floats; ``float`` accepts finite ints and floats, never NaN, inf or bools;
* ``Literal[...]`` accepts exactly its choices; ``X | None`` accepts None too;
* ``Annotated[T, Range(...)]`` adds bounds: :data:`PositiveFloat` (> 0), :data:`NonNegativeInt` (≥ 0),
  :data:`Momentum` ([0, 1)), ...

``solve()`` checks its own keyword arguments with the same function, from its signature's annotations.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from bilevel.errors import BilevelError


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds on a number: ``low ≤ x`` (``low < x`` when ``low_open``) and ``x ≤ high`` (``<`` when ``high_open``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return not (self.high is not None and (x >= self.high if self.high_open else x > self.high))

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_number(self.high)}")
        return " and ".join(parts)


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


PositiveFloat = Annotated[float, Range(0.0, low_open=True)]
"""A finite float > 0 (step sizes, tolerances, penalties)."""
NonNegativeFloat = Annotated[float, Range(0.0)]
"""A finite float ≥ 0."""
PositiveInt = Annotated[int, Range(1)]
"""An integer ≥ 1."""
NonNegativeInt = Annotated[int, Range(0)]
"""An integer ≥ 0 (step and iteration counts)."""
Momentum = Annotated[float, Range(0.0, 1.0, high_open=True)]
"""A momentum or decay coefficient in [0, 1)."""
UnitInterval = Annotated[float, Range(0.0, 1.0, low_open=True)]
"""A weight in (0, 1]."""
Seed = Annotated[int, Range(0, 2**63, high_open=True)]
"""A random seed: an integer that every generator accepts (0 ≤ seed < 2⁶³)."""
OptimizerName = Literal["sgd", "adam", "rmsprop"]
"""The functional optimizers of :mod:`bilevel.optim`."""


# ----- checking one value against an annotation -----------------------------------------------------------------
def accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` satisfies the annotation ``hint`` (see the module docstring for the rules)."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *extras = typing.get_args(hint)
        return accepts(base, value) and all(r.contains(value) for r in extras if isinstance(r, Range))
    if origin in (typing.Union, types.UnionType):
        return any(accepts(arm, value) for arm in typing.get_args(hint))
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin in (collections.abc.Callable,) or hint is Callable:
        return callable(value)
    if origin in (collections.abc.Sequence, list, tuple):
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(accepts(args[0], v) for v in value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this checker does not interpret (documented as such)


def describe(hint: Any) -> str:
    """``hint`` in words, e.g. ``"a float > 0 or None"``."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *extras = typing.get_args(hint)
        bounds = " and ".join(r.describe() for r in extras if isinstance(r, Range))
        return f"{describe(base)} {bounds}".strip()
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arm) for arm in typing.get_args(hint))
    if origin is Literal:
        choices = typing.get_args(hint)
        return repr(choices[0]) if len(choices) == 1 else "one of " + ", ".join(repr(c) for c in choices)
    if hint is type(None) or hint is None:
        return "None"
    if hint is bool:
        return "True or False"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a finite number"
    if hint is str:
        return "a string"
    if origin in (collections.abc.Callable,) or hint is Callable:
        return "a callable"
    if origin in (collections.abc.Sequence, list, tuple):
        args = typing.get_args(hint)
        return f"a list or tuple of {describe(args[0]) if args else 'values'}"
    return f"a {getattr(hint, '__name__', str(hint))}"


def check_value(owner: str, name: str, value: Any, hint: Any, example: Any = dataclasses.MISSING) -> None:
    """Raise a :class:`BilevelError` unless ``value`` satisfies ``hint``; the message suggests ``example``."""
    if accepts(hint, value):
        return
    fix = f" For example {name}={example!r}." if example is not dataclasses.MISSING and accepts(hint, example) else ""
    raise BilevelError(f"{owner}: {name}={_show(value)} is not valid; expected {describe(hint)}.{fix}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def owner_name(obj: Any) -> str:
    """What messages call a settings object: its registered method name (``"cg"``), else its class name."""
    return type(obj).__dict__.get("method_name", type(obj).__name__)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def check_fields(obj: Any) -> None:
    """Check every ``init`` field of the dataclass ``obj`` against its annotation (defaults suggested as fixes)."""
    owner = owner_name(obj)
    hints = _hints(type(obj))
    for field in dataclasses.fields(obj):
        if not field.init or field.name not in hints:
            continue
        check_value(owner, field.name, getattr(obj, field.name), hints[field.name], field.default)


def check_arguments(owner: str, fn: Callable[..., Any], values: dict[str, Any]) -> None:
    """Check keyword arguments of ``fn`` against its signature's annotations (defaults suggested as fixes)."""
    import inspect

    hints = _hints(fn)  # type: ignore[arg-type]
    params = inspect.signature(fn).parameters
    for name, value in values.items():
        if name in hints:
            default = params[name].default if name in params else dataclasses.MISSING
            check_value(owner, name, value, hints[name], dataclasses.MISSING if default is inspect.Parameter.empty else default)


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of the solvers' settings dataclasses: every field is checked against its annotation when the
    solver is built; subclasses add checks that involve several fields in :meth:`check`."""

    problem_inputs: ClassVar[frozenset[str]] = frozenset({"inner_projection"})
    """Optional :class:`~bilevel.Problem` inputs this method honours (``solve`` refuses the others)."""
    differentiates: ClassVar[str | None] = None
    """What the method's hypergradient differentiates, for :func:`bilevel.check_hypergradient`: ``"solution"``
    (the exact inner solution w*(λ)), ``"penalty"`` (w*(λ), estimated through a penalty function), ``"unrolled"``
    (T inner steps from a start point), ``"adapted"`` / ``"proximal"`` (each task's adaptation: T steps, or the
    proximal solution); None when it computes no hypergradient of F on its own (``no_hypergradient`` says why)."""
    no_hypergradient: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self)
        self.check()

    def check(self) -> None:
        """Checks across fields (after each field passed its own); raise :class:`BilevelError`."""
