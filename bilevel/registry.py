"""Solvers registered by name, so ``solve(problem, method="name")`` can find them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from bilevel.errors import BilevelError
from bilevel.problem import OPTIONAL_INPUTS
from bilevel.protocols import Solver

_SOLVERS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a solver dataclass available as ``method=name``."""

    def decorate(cls: T) -> T:
        if name in _SOLVERS and _SOLVERS[name] is not cls:
            raise BilevelError(f"register: method name {name!r} is already taken by {_SOLVERS[name].__name__}.")
        _SOLVERS[name] = cls
        cls.method_name = name  # what error messages call it (the name the user passes to solve)
        return cls

    return decorate


def available_methods() -> list[str]:
    """Names accepted by ``solve(method=...)``."""
    import bilevel.solvers  # noqa: F401  (registers the built-in solvers)

    return sorted(_SOLVERS)


def solver_class(name: str) -> type:
    """The solver dataclass registered under ``name``."""
    methods = available_methods()
    if name not in _SOLVERS:
        raise BilevelError(f"solve: unknown method {name!r}; valid methods are {', '.join(methods)}.")
    return _SOLVERS[name]


def make_solver(method: str | Solver, **options: Any) -> Solver:
    """A solver instance from a name and keyword options (or an instance passed through, with no options)."""
    if not isinstance(method, str):
        if not isinstance(method, Solver) or isinstance(method, type):
            raise BilevelError(
                f"solve: method={method!r} is not valid; expected a method name (one of {', '.join(available_methods())}) "
                "or a solver instance with init(problem) and step(problem, state, data), e.g. bilevel.solvers.CG()."
            )
        if options:
            raise BilevelError("solve: pass options either to the solver instance or to solve(), not both.")
        return method
    cls = solver_class(method)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise BilevelError(
            f"solve: method {method!r} has no option(s) {unknown}; its options are {', '.join(sorted(fields))}."
        )
    return cls(**options)


def solver_options(method: str) -> dict[str, Any]:
    """Option names of a method with their defaults (what the CLI and Optuna integration expose)."""
    cls = solver_class(method)
    return {f.name: f.default for f in dataclasses.fields(cls) if f.init}


def check_problem_inputs(name: str, solver: Any, problem: Any, owner: str = "solve") -> None:
    """Refuse a problem input the method would ignore (``inner_constraints``, ``joint_projection``,
    ``inner_projection``), naming the methods that honour it."""
    honoured = getattr(solver, "problem_inputs", OPTIONAL_INPUTS)
    for what in OPTIONAL_INPUTS:
        if getattr(problem, what) is not None and what not in honoured:
            users = [m for m in available_methods() if what in getattr(solver_class(m), "problem_inputs", ())]
            raise BilevelError(
                f"{owner}: method {name!r} cannot honour Problem({what}=...), so it would be ignored; methods that do: "
                f"{', '.join(users) or 'none'}. Use one of them or drop {what}."
            )
