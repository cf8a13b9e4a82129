r"""Search spaces over a solver's settings: :func:`auto_search_space` derives Optuna distributions from the settings'
defaults and annotations, :func:`suggest` samples one through a trial's ``suggest_*`` methods."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from bilevel.errors import BilevelError
from bilevel.optim import OPTIMIZERS
from bilevel.registry import solver_class, solver_options

SpaceSpec = BaseDistribution | Sequence[Any]
"""One entry of a search space: an Optuna distribution or a non-empty list of choices."""

_UNIT_INTERVAL = {"momentum", "beta", "beta1", "beta2", "decay", "rho", "fraction", "prob", "probability", "dropout"}
_SKIP = {"tol", "rtol", "atol", "gtol", "seed", "eps", "epsilon", "device", "dtype", "vectorize", "chunk", "compile",
         "verbose"}


def auto_search_space(
    method: str, *, include: Sequence[str] | None = None, exclude: Sequence[str] = (), spread: float = 10.0,
) -> dict[str, BaseDistribution]:
    r"""A search space over ``method``'s settings built from their defaults (:func:`bilevel.solver_options`).

    Rules, per setting with default d: a positive float → log-uniform on [d/``spread``, d·``spread``] (step sizes,
    penalties, growth rates); a float named like a momentum/decay/probability → uniform on [0, 0.99]; a positive
    int → log-uniform int on [max(1, d/4), 4d] (inner steps, Neumann terms, CG iterations); a bool → {False, True};
    a ``Literal`` string or an ``*optimizer`` name → its choices. Tolerances, seeds, execution knobs (``vectorize``,
    chunk sizes), ``None`` defaults, ``"auto"`` step sizes (they adapt to the problem: :mod:`bilevel.steps`) and
    zero floats/ints are left at their defaults. ``include`` keeps only those
    names; ``exclude`` drops names.
    Settings that must satisfy a joint condition are checked when the solver is built (an invalid sample FAILs).
    """
    if spread <= 1.0:
        raise BilevelError(f"auto_search_space: spread must be > 1 but got {spread}.")
    options = solver_options(method)
    names = list(options) if include is None else list(include)
    unknown = sorted(set(names) - set(options)) + sorted(set(exclude) - set(options))
    if unknown:
        raise BilevelError(
            f"auto_search_space: method {method!r} has no setting(s) {unknown}; its settings are {', '.join(options)}."
        )
    hints = _type_hints(solver_class(method))
    space: dict[str, BaseDistribution] = {}
    for name in names:
        if name in exclude:
            continue
        dist = _default_distribution(name, options[name], hints.get(name), spread)
        if dist is None and include is not None:
            raise BilevelError(
                f"auto_search_space: cannot derive a range for {method}.{name} (default {options[name]!r}); "
                "pass search_space={name: optuna.distributions.FloatDistribution(low, high)} or a list of choices."
            )
        if dist is not None:
            space[name] = dist
    return space


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: fall back to the defaults alone
        return {}


def _literal_choices(hint: Any) -> list[Any] | None:
    """The choices of a ``Literal`` hint; ``Literal[...] | None`` adds None (e.g. a feature that can be off)."""
    if hint is None:
        return None
    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        for arg in args:
            choices = _literal_choices(arg)
            if choices is not None:
                return choices + ([None] if type(None) in args else [])
    return None


def _default_distribution(name: str, default: Any, hint: Any, spread: float) -> BaseDistribution | None:
    tokens = set(name.lower().split("_"))
    if default is dataclasses.MISSING or default is None or default == "auto" or tokens & _SKIP:
        return None  # "auto" step sizes adapt by themselves: nothing to search unless asked for
    choices = _literal_choices(hint)
    if choices is not None:
        return CategoricalDistribution(choices)
    if isinstance(default, bool):
        return CategoricalDistribution([False, True])
    if isinstance(default, str):
        return CategoricalDistribution(sorted(OPTIMIZERS)) if name.endswith("optimizer") and default in OPTIMIZERS else None
    if isinstance(default, int):
        return IntDistribution(max(1, default // 4), 4 * default, log=True) if default > 0 else None
    if isinstance(default, float):
        if tokens & _UNIT_INTERVAL and 0.0 <= default < 1.0:
            return FloatDistribution(0.0, 0.99)
        return FloatDistribution(default / spread, default * spread, log=True) if default > 0 else None
    return None


def as_distribution(name: str, spec: SpaceSpec) -> BaseDistribution:
    if isinstance(spec, BaseDistribution):
        return spec
    if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) > 0:
        return CategoricalDistribution(list(spec))
    raise BilevelError(
        f"tune_solver: search_space[{name!r}] must be an optuna distribution (FloatDistribution(1e-3, 1.0, log=True), "
        f"IntDistribution(1, 20)) or a non-empty list of choices; got {spec!r}."
    )


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """Sample ``name`` from ``distribution`` with the trial's public ``suggest_*`` methods."""
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log, step=distribution.step)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log, step=distribution.step)
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, list(distribution.choices))
    raise BilevelError(f"suggest: unsupported distribution {type(distribution).__name__} for {name!r}.")


def contains(distribution: BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return distribution.low <= value <= distribution.high
