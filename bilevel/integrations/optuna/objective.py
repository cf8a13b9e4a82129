r"""The hybrid objective: :func:`hybrid_objective` lets Optuna sample the discrete choices while :func:`bilevel.solve`
tunes the continuous λ in each trial; :func:`load_outer` reads the λ a trial stored back as tensors."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
import torch

from bilevel.callbacks import StepInfo
from bilevel.data import is_full_batch
from bilevel.errors import BilevelError
from bilevel.integrations.optuna.pruning import Metric, OptunaPruning
from bilevel.problem import Problem
from bilevel.registry import make_solver
from bilevel.solve import Result, solve
from bilevel.types import Params

OUTER_ATTR = "outer"
"""User-attribute key under which :func:`hybrid_objective` stores the final outer variables ``{name: nested list}``."""

Build = Callable[[optuna.Trial], Problem | tuple[Problem, Mapping[str, Any]]]
"""``build(trial)``: a :class:`bilevel.Problem`, or ``(problem, options)`` with this trial's :func:`bilevel.solve` options."""


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
