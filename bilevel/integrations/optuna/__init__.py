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

from bilevel.integrations.optuna.objective import OUTER_ATTR, final_outer_loss, hybrid_objective, load_outer, outer_to_json
from bilevel.integrations.optuna.objective import Build as Build  # type aliases, importable from here too
from bilevel.integrations.optuna.pruning import Metric as Metric
from bilevel.integrations.optuna.pruning import OptunaPruning
from bilevel.integrations.optuna.search_space import SpaceSpec as SpaceSpec
from bilevel.integrations.optuna.search_space import auto_search_space, suggest
from bilevel.integrations.optuna.storage import make_storage
from bilevel.integrations.optuna.tuning import tune_solver

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
