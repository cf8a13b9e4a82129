r"""Solver tuning: :func:`tune_solver` searches a method's own settings on one problem with an Optuna study (in
memory or shared through a storage), each trial a :func:`~bilevel.integrations.optuna.hybrid_objective` run."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna

from bilevel.errors import BilevelError
from bilevel.integrations.optuna.objective import hybrid_objective
from bilevel.integrations.optuna.pruning import Metric
from bilevel.integrations.optuna.search_space import SpaceSpec, as_distribution, auto_search_space, contains, suggest
from bilevel.integrations.optuna.storage import make_storage
from bilevel.problem import Problem
from bilevel.registry import make_solver, solver_options
from bilevel.solve import Result, solve


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
    space = {name: as_distribution(name, spec) for name, spec in raw_space.items()}
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
        defaults = {name: options[name] for name, dist in space.items() if contains(dist, options[name])}
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
