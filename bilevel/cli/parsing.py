"""Reading the command line's words: option values parsed by the type of the setting they fill (``parse_value``),
a method's ``--option`` pairs (``method_options``, with the problem's suggested settings), a problem factory's
``--problem-option`` pairs (``problem_kwargs``), and the check of problem and method names."""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from typing import Any

import torch

from bilevel.errors import BilevelError
from bilevel.problems import PROBLEMS, problem_options, suggested_options
from bilevel.registry import available_methods, solver_class, solver_options

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----- parsing option values -----------------------------------------------------------------------------------
def parse_value(name: str, text: str, default: Any, annotation: Any = None) -> Any:
    """``text`` converted to the type of ``default`` (or of ``annotation`` when the default is None):
    bool (true/false/1/0/yes/no/on/off), int, float, str, None ("none"), a Literal's choices, a tuple of numbers."""
    kinds = _candidate_types(default, annotation)
    if text.lower() in ("none", "null") and (default is None or type(None) in kinds):
        return None
    errors = []
    for kind in kinds:
        if kind is type(None):
            continue
        try:
            return _convert(text, kind)
        except ValueError as e:
            errors.append(str(e))
    expected = " or ".join(sorted({_type_name(k) for k in kinds if k is not type(None)})) or "a value"
    raise BilevelError(f"option {name}: cannot read {text!r} as {expected} (default {default!r}).")


def _candidate_types(default: Any, annotation: Any) -> list[Any]:
    if annotation is not None:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            return [a for arg in typing.get_args(annotation) for a in _candidate_types(None, arg)]
        if origin is typing.Literal:
            return [annotation]
        if isinstance(annotation, type):
            return [annotation]
    if default is None:
        return [float, str]
    if isinstance(default, torch.dtype):
        return [torch.dtype]
    return [type(default)]


def _convert(text: str, kind: Any) -> Any:
    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"choose from {', '.join(map(str, choices))}")
    if kind is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError("not a boolean")
    if kind is torch.dtype:
        if text.removeprefix("torch.") not in DTYPES:
            raise ValueError("not a dtype")
        return DTYPES[text.removeprefix("torch.")]
    if kind is tuple:
        return tuple(float(part) for part in text.strip("()").split(",") if part.strip())
    if kind in (int, float, str):
        return kind(text)
    raise ValueError(f"unsupported type {kind}")


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is typing.Literal:
        return "one of " + "/".join(map(str, typing.get_args(kind)))
    return getattr(kind, "__name__", str(kind))


def split_pairs(pairs: Sequence[str], flag: str) -> list[tuple[str, str]]:
    """``key=value`` words as (key, value) pairs; ``flag`` names the option in the error."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BilevelError(f"{flag}: expected key=value, got {pair!r}.")
        out.append((key.strip(), value.strip()))
    return out


def method_options(method: str, pairs: Sequence[tuple[str, str]], *, strict: bool = True) -> dict[str, Any]:
    """Solver options for ``method`` from ``key=value`` pairs, parsed by each field's default and annotation.

    A key may be prefixed by a method name (``cg.cg_maxiter=50``) to target one method of a benchmark;
    with ``strict`` an unknown key raises, listing the method's options.
    """
    defaults = solver_options(method)
    cls = solver_class(method)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # annotations that do not resolve: fall back to the defaults' types
        hints = {}
    out: dict[str, Any] = {}
    for key, text in pairs:
        target, dot, field = key.rpartition(".")
        if dot and target != method:
            continue
        if field not in defaults:
            if strict:
                raise BilevelError(
                    f"--option: method {method!r} has no option {field!r}; its options are {', '.join(sorted(defaults))} "
                    f"(see `bilevel list {method}`)."
                )
            continue
        out[field] = parse_value(field, text, defaults[field], hints.get(field))
    return out


def problem_kwargs(name: str, pairs: Sequence[tuple[str, str]], **fixed: Any) -> dict[str, Any]:
    """Keyword arguments for the problem factory ``name``: ``fixed`` ones that it accepts, then parsed pairs."""
    defaults = problem_options(name)
    out = {k: v for k, v in fixed.items() if k in defaults and v is not None}
    for key, text in pairs:
        if key not in defaults:
            raise BilevelError(
                f"--problem-option: problem {name!r} has no option {key!r}; its options are {', '.join(defaults)}."
            )
        out[key] = parse_value(key, text, defaults[key])
    return out



def check_names(problem: str, methods: Sequence[str]) -> None:
    """Raise, listing the valid names, unless ``problem`` is a ready-made problem and each method is registered."""
    if problem not in PROBLEMS:
        raise BilevelError(f"unknown problem {problem!r}; valid problems are {', '.join(sorted(PROBLEMS))}.")
    valid = available_methods()
    for method in methods:
        if method not in valid:
            raise BilevelError(f"unknown method {method!r}; valid methods are {', '.join(valid)}.")


def with_suggested(problem: str, method: str, options: dict[str, Any], use: bool) -> dict[str, Any]:
    """The problem's measured settings for ``method`` (see ``bilevel.problems.SUGGESTED_OPTIONS``), overridden by
    the user's ``--option``s; only the user's with ``--no-suggested``."""
    if not use:
        return options
    fields = solver_options(method)
    return {**{k: v for k, v in suggested_options(problem, method).items() if k in fields}, **options}
