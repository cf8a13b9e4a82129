r"""Optuna integration: hybrid search, pruning, solver tuning and shared (distributed) studies.

Gradient-based hyperparameter optimization handles many *continuous* hyperparameters λ; Optuna's samplers handle
*discrete* and conditional choices (width, optimizer, method and its settings) that have no gradient. The hybrid
search nests them:

.. math::
    \min_{c \in \mathcal{C}} \; \min_{\lambda} \; L_V\big(\lambda, w^*_c(\lambda)\big),

Optuna (Akiba et al., 2019, "Optuna: A Next-generation Hyperparameter Optimization Framework", KDD) samples c (TPE
by default; Bergstra et al., 2011, "Algorithms for Hyper-Parameter Optimization", NeurIPS),
and inside each trial :func:`bilevel.solve` tunes λ by hypergradients. The trial reports the outer loss as it goes,
so any Optuna pruner (median, successive halving / Hyperband) stops hopeless choices early; the final λ is stored in
the trial's user attributes as JSON lists.

Usage::

    import optuna
    from bilevel.integrations.optuna import hybrid_objective, load_outer, make_storage, tune_solver

    def build(trial):
        problem = make_problem(width=trial.suggest_categorical("width", [64, 128, 256]))
        return problem, {"method": trial.suggest_categorical("method", ["ift", "cg"]),
                         "outer_lr": trial.suggest_float("outer_lr", 1e-3, 1e-1, log=True)}

    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_warmup_steps=10))
    study.optimize(hybrid_objective(build, maxiter=200, report_every=5), n_trials=30)
    lam = load_outer(study.best_trial, problem)                 # the best trial's continuous hyperparameters

    # tune a solver's own settings (step sizes, Neumann terms, penalty schedules) on one problem:
    study = tune_solver(problem, "ift", n_trials=40, maxiter=100, time_limit=5.0)
    print(study.best_params)

Pruning inside your own objective: ``bilevel.solve(problem, callbacks=[OptunaPruning(trial)])`` reports the outer
loss each step and raises :class:`optuna.TrialPruned` when the study's pruner says so.

Storage: ``make_storage()`` is in memory; ``make_storage("sqlite:///study.db")`` persists to one file (a few
processes on one machine); ``make_storage("postgresql://user:pw@host/db", heartbeat_interval=60)`` lets many workers
on several machines share one study through Optuna's RDB storage (PostgreSQL needs ``pip install 'bilevel[postgres]'``
for the ``psycopg2`` driver). With heartbeats, a worker that dies mid-trial has its trial marked ``FAIL`` by the next
worker that starts a trial and re-queued (Optuna's retry-on-stale callback: the retry carries the same parameters and
the ``retry_history`` system attribute), so nothing is lost. Every worker runs the same script::

    storage = make_storage("postgresql://...", heartbeat_interval=30, grace_period=90)
    tune_solver(problem, "ift", storage=storage, study_name="ift-on-ridge", n_trials=20)   # adds 20 trials
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from bilevel.callbacks import StepInfo
from bilevel.data import is_full_batch
from bilevel.errors import BilevelError
from bilevel.optim import OPTIMIZERS
from bilevel.problem import Problem
from bilevel.registry import make_solver, solver_class, solver_options
from bilevel.solve import Result, solve
from bilevel.types import Params

__all__ = [
    "OUTER_ATTR",
    "OptunaPruning",
    "auto_search_space",
    "final_outer_loss",
    "hybrid_objective",
    "load_outer",
    "make_storage",
    "outer_to_json",
    "suggest",
    "tune_solver",
]

OUTER_ATTR = "outer"
"""User-attribute key under which :func:`hybrid_objective` stores the final outer variables ``{name: nested list}``."""

Metric = str | Callable[[StepInfo], float]
Build = Callable[[optuna.Trial], Problem | tuple[Problem, Mapping[str, Any]]]
SpaceSpec = BaseDistribution | Sequence[Any]


# ----- pruning --------------------------------------------------------------------------------------------------
class OptunaPruning:
    r"""A :func:`bilevel.solve` callback that reports a metric to an Optuna trial and stops pruned runs.

    Every ``report_every`` outer steps (k = ``report_every``−1, 2·``report_every``−1, …) it calls
    ``trial.report(metric, step)`` then ``trial.should_prune()``; the study's pruner compares the value with the
    other trials at the same step (``MedianPruner``: worse than the median of earlier trials at that step, the
    median stopping rule of Golovin et al., 2017, "Google Vizier", KDD; ``HyperbandPruner``: Li et al., 2018,
    "Hyperband: A Novel Bandit-Based Approach to Hyperparameter Optimization", JMLR).

    Args:
        trial: the running :class:`optuna.Trial` (single-objective study; Optuna cannot prune multi-objective ones).
        metric: a history key (default ``"outer_loss"``: L_V at the step) or ``f(StepInfo) -> float``, e.g. a
            held-out accuracy computed from ``info.state`` (then create the study with ``direction="maximize"``).
        report_every: report (and ask the pruner) every this many steps; each report is one storage write.
        raise_pruned: raise :class:`optuna.TrialPruned` from inside ``solve`` (right for a hand-written objective).
            With ``False`` the callback returns ``True`` so ``solve`` stops cleanly and returns its ``Result``; call
            :meth:`raise_if_pruned` afterwards (what :func:`hybrid_objective` does, to store λ first).

    Attributes:
        pruned: whether the pruner stopped the run; ``pruned_step`` the step it did so at; ``last_value`` the last
            reported value.
    """

    def __init__(self, trial: optuna.Trial, metric: Metric = "outer_loss", *, report_every: int = 1,
                 raise_pruned: bool = True):
        if not isinstance(report_every, int) or isinstance(report_every, bool) or report_every < 1:
            raise BilevelError(f"OptunaPruning: report_every must be an integer >= 1 but got {report_every!r}.")
        if not (isinstance(metric, str) or callable(metric)):
            raise BilevelError(
                f"OptunaPruning: metric must be a history key such as 'outer_loss' or a callable f(StepInfo) -> float; "
                f"got {type(metric).__name__}."
            )
        study = getattr(trial, "study", None)
        if study is not None and len(study.directions) > 1:
            raise BilevelError(
                "OptunaPruning: Optuna cannot prune trials of a multi-objective study; create the study with one "
                "direction, or drop the pruning callback."
            )
        self.trial = trial
        self.metric = metric
        self.report_every = report_every
        self.raise_pruned = raise_pruned
        self.pruned = False
        self.pruned_step: int | None = None
        self.last_value: float | None = None

    def value(self, info: StepInfo) -> float:
        """The metric at this step."""
        if callable(self.metric):
            return float(self.metric(info))
        if self.metric not in info.metrics:
            raise BilevelError(
                f"OptunaPruning: metric {self.metric!r} is not recorded by this solver; recorded: {sorted(info.metrics)}."
            )
        return float(info.metrics[self.metric])

    def __call__(self, info: StepInfo) -> bool:
        if (info.step + 1) % self.report_every != 0:
            return False
        value = self.value(info)
        self.last_value = value
        self.trial.report(value, info.step)
        if self.trial.should_prune():
            self.pruned, self.pruned_step = True, info.step
            if self.raise_pruned:
                raise optuna.TrialPruned(self._message())
            return True
        return False

    def raise_if_pruned(self) -> None:
        """Raise :class:`optuna.TrialPruned` if the pruner stopped the run (so Optuna records the trial as PRUNED)."""
        if self.pruned:
            raise optuna.TrialPruned(self._message())

    def _message(self) -> str:
        return f"pruned at step {self.pruned_step} with {self._name()} = {self.last_value:.6g}"

    def _name(self) -> str:
        return self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "metric")


# ----- storing and loading λ ------------------------------------------------------------------------------------
def outer_to_json(outer: Params) -> dict[str, Any]:
    """``{name: nested list of floats}``: outer variables as a JSON-serialisable user attribute."""
    return {name: value.detach().cpu().tolist() for name, value in outer.items()}


def load_outer(trial: optuna.trial.FrozenTrial | optuna.Trial, problem: Problem) -> Any:
    """The outer variables stored by :func:`hybrid_objective` in ``trial``, as tensors shaped, typed and placed like
    ``problem``'s (a lone tensor or a dict, the form the problem was given in)."""
    stored = trial.user_attrs.get(OUTER_ATTR)
    if stored is None:
        raise BilevelError(
            f"load_outer: trial {trial.number} has no {OUTER_ATTR!r} user attribute; it was not run by "
            "hybrid_objective/tune_solver with store_outer=True (or it failed before solve returned)."
        )
    like = problem.outer_init
    if set(stored) != set(like):
        raise BilevelError(
            f"load_outer: trial {trial.number} stores outer variables {sorted(stored)} but the problem has "
            f"{sorted(like)}; pass the problem the trial was built with."
        )
    out = {}
    for name, ref in like.items():
        value = torch.as_tensor(stored[name], dtype=ref.dtype, device=ref.device)
        if value.shape != ref.shape:
            raise BilevelError(
                f"load_outer: stored {name!r} has shape {tuple(value.shape)} but the problem's has {tuple(ref.shape)}."
            )
        out[name] = value
    return problem.outer_to_user(out)


# ----- the hybrid objective -------------------------------------------------------------------------------------
def final_outer_loss(result: Result) -> float:
    """L_V at the returned (λ, w) on the full outer batch, or the last step's ``outer_loss`` for streamed data."""
    if is_full_batch(result.problem.outer_data):
        return result.outer_loss()
    return result.history.last("outer_loss")


def hybrid_objective(
    build: Build,
    *,
    method: str | Any = "ift",
    maxiter: int = 100,
    metric: Metric = "outer_loss",
    report_every: int = 1,
    value: Callable[[Result], float] | None = None,
    evaluate: Callable[[Result], Mapping[str, Any]] | None = None,
    callbacks: Sequence[Callable[[StepInfo], Any]] = (),
    store_outer: bool = True,
    prune: bool = True,
    **solve_options: Any,
) -> Callable[[optuna.Trial], float]:
    r"""An Optuna objective: ``build(trial)`` samples the discrete choices, :func:`bilevel.solve` tunes λ.

    ``build(trial)`` returns a :class:`bilevel.Problem`, or ``(problem, options)`` where ``options`` are keyword
    arguments of :func:`bilevel.solve` chosen for this trial (``method``, ``maxiter``, ``time_limit``, ``seed``,
    ``callbacks`` or the method's settings such as ``outer_lr``); they override the ones given here.

    Per trial: solve with :class:`OptunaPruning` (``metric`` every ``report_every`` steps), then store user
    attributes — ``outer`` (λ as ``{name: list}``, see :func:`load_outer`), ``outer_loss``, ``n_steps``,
    ``stop_reason``, ``wall_time`` and whatever ``evaluate(result)`` returns — and return ``value(result)``
    (default: L_V at the returned λ and w, :func:`final_outer_loss`).

    Outcomes: pruned runs raise :class:`optuna.TrialPruned` after storing λ; a run that diverges (a
    :class:`bilevel.BilevelError` raised while stepping: NaN/inf losses, a diverging Neumann series) is also
    recorded as PRUNED, with the message in the ``diverged`` user attribute, so samplers such as TPE rank it below
    every finished trial instead of ignoring it. Invalid settings or a malformed problem raise (the trial FAILs).
    """
    if not callable(build):
        raise BilevelError(f"hybrid_objective: build must be a callable build(trial) -> Problem; got {type(build).__name__}.")
    if maxiter < 1:
        raise BilevelError(f"hybrid_objective: maxiter must be >= 1 but got {maxiter}.")
    base = {"method": method, "maxiter": maxiter, **solve_options}

    def objective(trial: optuna.Trial) -> float:
        built = build(trial)
        problem, options = (built, {}) if isinstance(built, Problem) else _unpack(built)
        options = {**base, **options}
        user_callbacks = [*callbacks, *options.pop("callbacks", ())]
        run_method = options.pop("method")
        run_maxiter = options.pop("maxiter")
        solve_kwargs = {k: options.pop(k) for k in ("seed", "time_limit", "hypergrad_tol", "state") if k in options}
        validate = options.pop("validate", True)
        solver = make_solver(run_method, **options)  # invalid settings raise here (trial FAILs)
        pruning = OptunaPruning(trial, metric, report_every=report_every, raise_pruned=False) if prune else None
        if validate:  # outside the divergence guard: a malformed problem must not pass for divergence
            solve(problem, solver, maxiter=0, validate=True)
        try:
            result = solve(problem, solver, maxiter=run_maxiter, validate=False,
                           callbacks=[*user_callbacks, *([pruning] if pruning else [])], **solve_kwargs)
        except BilevelError as error:
            trial.set_user_attr("diverged", str(error)[:1000])
            raise optuna.TrialPruned(f"diverged: {error}") from error
        if store_outer:
            trial.set_user_attr(OUTER_ATTR, outer_to_json(result.outer_params))
        trial.set_user_attr("n_steps", result.n_steps)
        trial.set_user_attr("stop_reason", result.stop_reason)
        trial.set_user_attr("wall_time", result.wall_time)
        if pruning is not None:
            pruning.raise_if_pruned()
        final = final_outer_loss(result)
        objective_value = float(value(result)) if value is not None else final
        if not (math.isfinite(final) and math.isfinite(objective_value)):
            message = f"the final outer loss {final} / objective value {objective_value} is not finite"
            trial.set_user_attr("diverged", message)
            raise optuna.TrialPruned(f"diverged: {message}")
        trial.set_user_attr("outer_loss", final)
        if evaluate is not None:
            for key, val in evaluate(result).items():
                trial.set_user_attr(key, val)
        return objective_value

    return objective


def _unpack(built: Any) -> tuple[Problem, dict[str, Any]]:
    if (isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], Problem)
            and isinstance(built[1], Mapping)):
        return built[0], dict(built[1])
    raise BilevelError(
        "hybrid_objective: build(trial) must return a Problem or (Problem, dict of solve options); "
        f"got {type(built).__name__}."
    )


# ----- search spaces --------------------------------------------------------------------------------------------
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


def _as_distribution(name: str, spec: SpaceSpec) -> BaseDistribution:
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


def _contains(distribution: BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return distribution.low <= value <= distribution.high


# ----- tuning a solver's settings -------------------------------------------------------------------------------
def tune_solver(
    problem: Problem,
    method: str = "ift",
    *,
    search_space: Mapping[str, SpaceSpec] | None = None,
    fixed: Mapping[str, Any] | None = None,
    n_trials: int | None = 20,
    timeout: float | None = None,
    maxiter: int = 100,
    time_limit: float | None = None,
    metric: Metric = "outer_loss",
    value: Callable[[Result], float] | None = None,
    report_every: int | None = None,
    direction: str = "minimize",
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    load_if_exists: bool = True,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    seed: int | None = 0,
    enqueue_defaults: bool = True,
    callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
) -> optuna.Study:
    r"""Tune ``method``'s own settings (step sizes, inner steps, Neumann terms, penalty schedules) on ``problem``.

    Each trial samples settings from ``search_space`` (default :func:`auto_search_space`; a dict of optuna
    distributions or lists of choices), runs :func:`bilevel.solve` for ``maxiter`` steps (and at most
    ``time_limit`` seconds: with a time limit, costlier settings get fewer outer steps, so the search weighs cost
    against progress), reports ``metric`` for pruning and minimizes ``value(result)`` (default L_V at the end).
    ``fixed`` holds settings that are not searched. With ``enqueue_defaults`` the method's defaults are the first
    trial. Defaults: ``TPESampler(seed=seed)``, ``MedianPruner(n_startup_trials=5, n_warmup_steps=maxiter // 5)``.

    ``storage``: None (in memory), a URL (:func:`make_storage`) or an Optuna storage. With a shared storage and the
    same ``study_name`` (default ``"bilevel-<problem>-<method>"``) every process that calls this adds ``n_trials``
    trials to one study. Returns the :class:`optuna.Study`; the trials' user attributes hold λ (:func:`load_outer`).
    """
    methods = _available()
    if not isinstance(method, str) or method not in methods:
        raise BilevelError(f"tune_solver: unknown method {method!r}; valid methods are {', '.join(methods)}.")
    if n_trials is None and timeout is None:
        raise BilevelError("tune_solver: pass n_trials or timeout (or both); otherwise the study never ends.")
    if n_trials is not None and n_trials < 1:
        raise BilevelError(f"tune_solver: n_trials must be >= 1 but got {n_trials}.")
    if maxiter < 1:
        raise BilevelError(f"tune_solver: maxiter must be >= 1 but got {maxiter}.")
    fixed = dict(fixed or {})
    raw_space = auto_search_space(method, exclude=list(fixed)) if search_space is None else dict(search_space)
    space = {name: _as_distribution(name, spec) for name, spec in raw_space.items()}
    options = solver_options(method)
    unknown = sorted((set(space) | set(fixed)) - set(options))
    if unknown:
        raise BilevelError(
            f"tune_solver: method {method!r} has no setting(s) {unknown}; its settings are {', '.join(options)}."
        )
    overlap = sorted(set(space) & set(fixed))
    if overlap:
        raise BilevelError(f"tune_solver: {overlap} are both searched and fixed; drop them from one of the two.")
    make_solver(method, **fixed)  # fixed settings must be valid on their own
    solve(problem, method, maxiter=0, **fixed)  # a malformed problem raises now, not once per trial
    report_every = report_every or max(1, maxiter // 20)

    if isinstance(storage, str):
        storage = make_storage(storage)
    study = optuna.create_study(
        storage=storage, study_name=study_name or f"bilevel-{problem.name}-{method}", load_if_exists=load_if_exists,
        direction=direction, sampler=sampler or optuna.samplers.TPESampler(seed=seed),
        pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, maxiter // 5)),
    )
    if enqueue_defaults:
        defaults = {name: options[name] for name, dist in space.items() if _contains(dist, options[name])}
        if defaults:
            study.enqueue_trial(defaults, skip_if_exists=True)

    def build(trial: optuna.Trial) -> tuple[Problem, dict[str, Any]]:
        return problem, {**fixed, **{name: suggest(trial, name, dist) for name, dist in space.items()}}

    solve_options = {"time_limit": time_limit} if time_limit is not None else {}
    if seed is not None:
        solve_options["seed"] = seed
    objective = hybrid_objective(build, method=method, maxiter=maxiter, metric=metric, report_every=report_every,
                                 value=value, **solve_options)
    study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(BilevelError,), callbacks=list(callbacks))
    return study


def _available() -> list[str]:
    from bilevel.registry import available_methods

    return available_methods()


# ----- storage --------------------------------------------------------------------------------------------------
def make_storage(
    url: str | None = None,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int | None = 3,
    engine_kwargs: dict[str, Any] | None = None,
) -> optuna.storages.BaseStorage:
    r"""An Optuna storage: in memory (``url=None``), SQLite (``"sqlite:///study.db"``) or PostgreSQL
    (``"postgresql://user:password@host:5432/db"``, needs ``pip install 'bilevel[postgres]'``) — any SQLAlchemy URL
    that Optuna's :class:`optuna.storages.RDBStorage` accepts. A plain ``postgresql://`` URL uses whichever driver is
    installed (psycopg2, else psycopg 3); name one explicitly with ``postgresql+psycopg2://``.

    Heartbeats (RDB storages only): a worker records a heartbeat for its running trial every ``heartbeat_interval``
    seconds; a trial whose last heartbeat is older than ``grace_period`` (default 2 × interval) is marked ``FAIL``
    by the next worker that starts a trial, and Optuna's retry callback re-queues it with the same parameters (up to
    ``max_retry`` times per original trial; ``None`` retries forever, ``0`` never). The retried trial's system
    attribute ``retry_history`` lists the trial numbers it replaces.

    SQLite: waits up to 60 s on a locked database file (several processes on one machine). PostgreSQL: connections
    are checked before use (``pool_pre_ping``), so a restarted server does not break long-running workers.
    """
    if heartbeat_interval is not None and (not isinstance(heartbeat_interval, int) or heartbeat_interval < 1):
        raise BilevelError(f"make_storage: heartbeat_interval must be an integer number of seconds >= 1 but got "
                           f"{heartbeat_interval!r}.")
    if grace_period is not None:
        if heartbeat_interval is None:
            raise BilevelError("make_storage: grace_period needs heartbeat_interval; pass both (e.g. 60 and 180).")
        if not isinstance(grace_period, int) or grace_period <= heartbeat_interval:
            raise BilevelError(
                f"make_storage: grace_period must be an integer greater than heartbeat_interval={heartbeat_interval} "
                f"(or live trials would be failed) but got {grace_period!r}."
            )
    if max_retry is not None and max_retry < 0:
        raise BilevelError(f"make_storage: max_retry must be >= 0 or None but got {max_retry}.")
    if url is None:
        if heartbeat_interval is not None:
            raise BilevelError(
                "make_storage: heartbeats need a database shared by the workers; pass url='sqlite:///study.db' "
                "or a PostgreSQL URL, or drop heartbeat_interval."
            )
        return optuna.storages.InMemoryStorage()
    if not isinstance(url, str) or "://" not in url:
        raise BilevelError(
            f"make_storage: url must be an SQLAlchemy URL such as 'sqlite:///study.db' or "
            f"'postgresql://user:password@host:5432/db', got {url!r}."
        )
    dialect = url.split("://", 1)[0].lower()
    if dialect in ("postgresql", "postgres"):
        url = f"postgresql+{_postgres_driver()}://" + url.split("://", 1)[1]
    kwargs = dict(engine_kwargs or {})
    if dialect.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"timeout": 60})
    elif dialect.startswith("postgres"):
        kwargs.setdefault("pool_pre_ping", True)
    storage_kwargs: dict[str, Any] = {"engine_kwargs": kwargs}
    if heartbeat_interval is not None:
        storage_kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        if max_retry != 0:
            storage_kwargs.update(_retry_callback(max_retry))
    with warnings.catch_warnings():  # heartbeats and the retry callback are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, **storage_kwargs)


def _postgres_driver() -> str:
    """The installed PostgreSQL driver (SQLAlchemy's default for ``postgresql://`` changed from psycopg2 to psycopg
    3 in SQLAlchemy 2.1, so plain URLs name the driver explicitly)."""
    import importlib.util

    for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        if importlib.util.find_spec(module) is not None:
            return driver
    raise BilevelError("make_storage: PostgreSQL storage needs a driver: pip install 'bilevel[postgres]' (psycopg2).")


def _retry_callback(max_retry: int | None) -> dict[str, Any]:
    """Optuna's retry-on-stale callback under the name and keyword of the installed version (renamed in 4.9)."""
    import inspect

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
            callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        else:  # pragma: no cover - Optuna < 4.9
            callback = optuna.storages.RetryFailedTrialCallback(max_retry=max_retry)
    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    key = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
    return {key: callback}
