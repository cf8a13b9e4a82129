"""Optuna integration: pruning callback, hybrid objective, solver tuning, storages and worker processes.

Oracles: a reference ``bilevel.solve`` run with the same seed and settings (full-batch ridge is deterministic, so
values agree to rtol 1e-12), the ridge closed form F(λ) = L_V(w*(λ)) (``ridge_val_loss``), Optuna's own pruner
semantics (an always-prune pruner, ``MedianPruner`` against crafted trials), and the storage read back from disk.
"""

from __future__ import annotations

import json
import math
import warnings

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from optuna_worker import check_killed_trial_retried, kill_one_worker_scenario, logs, spawn

import bilevel
from bilevel.integrations.optuna import (
    OUTER_ATTR,
    OptunaPruning,
    auto_search_space,
    hybrid_objective,
    load_outer,
    make_storage,
    tune_solver,
)
from bilevel.problems import ridge_data, ridge_problem, ridge_val_loss

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Stable settings for the ridge problem (λ_max(H) ≈ 74 at λ = 0, so inner_lr must stay below 2/74).
STABLE = {"inner_lr": 0.005, "inner_steps": 20, "outer_lr": 0.1}


@pytest.fixture(scope="module")
def ridge():
    train, val = ridge_data(seed=0)
    return train, val


def reference(train, val, method="cg", maxiter=10, **options):
    return bilevel.solve(ridge_problem(train, val), method, maxiter=maxiter, seed=0, **options)


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


# ----- pruning ---------------------------------------------------------------------------------------------------
def one_reporting_trial(ridge, pruner: optuna.pruners.BasePruner) -> optuna.trial.FrozenTrial:
    """One trial of 10 ``cg`` steps on the ridge, reporting through ``OptunaPruning(report_every=3)``."""
    train, val = ridge
    study = optuna.create_study(pruner=pruner)

    def objective(trial):
        result = bilevel.solve(ridge_problem(train, val), "cg", maxiter=10, seed=0,
                               callbacks=[OptunaPruning(trial, report_every=3)], **STABLE)
        return result.outer_loss()

    study.optimize(objective, n_trials=1)
    return study.trials[0]


def test_pruning_callback_reports_and_raises_with_always_prune(ridge):
    train, val = ridge
    trial = one_reporting_trial(ridge, AlwaysPrune())
    assert trial.state == TrialState.PRUNED
    ref = reference(train, val, **STABLE)
    # first report at step 2 (report_every=3), pruned right there: exactly one intermediate value.
    assert list(trial.intermediate_values) == [2]
    assert math.isclose(trial.intermediate_values[2], ref.history["outer_loss"][2], rel_tol=1e-12)


def test_pruning_callback_without_pruning_reports_every_k_steps(ridge):
    train, val = ridge
    trial = one_reporting_trial(ridge, optuna.pruners.NopPruner())
    ref = reference(train, val, **STABLE)
    assert trial.state == TrialState.COMPLETE
    assert sorted(trial.intermediate_values) == [2, 5, 8]
    for step, v in trial.intermediate_values.items():
        assert math.isclose(v, ref.history["outer_loss"][step], rel_tol=1e-12)
    assert math.isclose(trial.value, ref.outer_loss(), rel_tol=1e-12)


@pytest.mark.parametrize("crafted, pruned_at", [(0.0, 4), (1e9, None)])
def test_median_pruner_on_crafted_study(ridge, crafted, pruned_at):
    """Earlier trials at L_V = 0 (better than any ridge run) prune at the first step after warm-up; at 1e9 never."""
    train, val = ridge
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=4))
    dist = {"outer_lr": CategoricalDistribution([0.1])}
    for _ in range(2):
        study.add_trial(optuna.create_trial(value=crafted, params={"outer_lr": 0.1}, distributions=dist,
                                            intermediate_values={s: crafted for s in range(10)}))
    objective = hybrid_objective(
        lambda trial: (ridge_problem(train, val), {"outer_lr": trial.suggest_categorical("outer_lr", [0.1])}),
        method="cg", maxiter=10, seed=0, inner_lr=0.005, inner_steps=20,
    )
    study.optimize(objective, n_trials=1)
    trial = study.trials[-1]
    if pruned_at is None:
        assert trial.state == TrialState.COMPLETE and trial.user_attrs["n_steps"] == 10
    else:
        assert trial.state == TrialState.PRUNED
        assert max(trial.intermediate_values) == pruned_at and trial.user_attrs["n_steps"] == pruned_at + 1
        assert trial.user_attrs["stop_reason"] == "callback"
        assert OUTER_ATTR in trial.user_attrs  # λ is stored before the trial is marked pruned


# ----- hybrid objective ------------------------------------------------------------------------------------------
def _build(train, val):
    def build(trial):
        return ridge_problem(train, val), {
            "method": trial.suggest_categorical("method", ["cg", "exact"]),
            "outer_lr": trial.suggest_categorical("outer_lr", [0.03, 0.1]),
        }
    return build


def test_hybrid_stores_outer_as_json_and_replays(ridge, tmp_path):
    train, val = ridge
    url = f"sqlite:///{tmp_path / 'hybrid.db'}"
    study = optuna.create_study(study_name="hybrid", storage=make_storage(url), sampler=optuna.samplers.TPESampler(seed=0))
    objective = hybrid_objective(_build(train, val), maxiter=8, seed=0, inner_lr=0.005, inner_steps=20, prune=False,
                                 evaluate=lambda r: {"true_val_loss": float(ridge_val_loss(train, val, r.outer.detach()))})
    study.optimize(objective, n_trials=3)
    # read back from disk in a fresh study object
    trials = optuna.load_study(study_name="hybrid", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    problem = ridge_problem(train, val)
    for t in trials:
        json.dumps(t.user_attrs)
        assert isinstance(t.user_attrs[OUTER_ATTR]["value"], list) and len(t.user_attrs[OUTER_ATTR]["value"]) == 8
        lam = load_outer(t, problem)
        ref = bilevel.solve(problem, t.params["method"], maxiter=8, seed=0, inner_lr=0.005, inner_steps=20,
                            outer_lr=t.params["outer_lr"])
        torch.testing.assert_close(lam, ref.outer.detach(), rtol=1e-12, atol=0)
        assert math.isclose(t.value, ref.outer_loss(), rel_tol=1e-12)
        assert math.isclose(t.user_attrs["true_val_loss"], float(ridge_val_loss(train, val, lam)), rel_tol=1e-12)
        assert t.user_attrs["n_steps"] == 8 and t.user_attrs["stop_reason"] == "maxiter"


def test_hybrid_diverging_run_is_pruned_with_reason(ridge):
    train, val = ridge
    # inner_lr=0.1 > 2/λ_max(H): the inner iteration blows up (checked directly first).
    with pytest.raises(bilevel.BilevelError, match="not finite"):
        bilevel.solve(ridge_problem(train, val), "cg", maxiter=30, inner_lr=0.1)
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    study.optimize(hybrid_objective(lambda trial: ridge_problem(train, val), method="cg", maxiter=30, inner_lr=0.1),
                   n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED and "not finite" in trial.user_attrs["diverged"]


def test_hybrid_rejects_bad_build_and_settings(ridge):
    train, val = ridge
    study = optuna.create_study()
    with pytest.raises(bilevel.BilevelError, match="build\\(trial\\) must return a Problem"):
        study.optimize(hybrid_objective(lambda trial: 3.0), n_trials=1)
    with pytest.raises(bilevel.BilevelError, match="has no option"):
        study.optimize(hybrid_objective(lambda trial: ridge_problem(train, val), not_a_setting=1), n_trials=1)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]


def test_pruning_callback_validates_input(ridge):
    train, val = ridge
    trial = optuna.create_study().ask()
    with pytest.raises(bilevel.BilevelError, match="report_every must be an integer >= 1 but got 0"):
        OptunaPruning(trial, report_every=0)
    with pytest.raises(bilevel.BilevelError, match="metric 'val_acc' is not recorded"):
        bilevel.solve(ridge_problem(train, val), "cg", maxiter=1, callbacks=[OptunaPruning(trial, "val_acc")], **STABLE)
    multi = optuna.create_study(directions=["minimize", "minimize"]).ask()
    with pytest.raises(bilevel.BilevelError, match="multi-objective"):
        OptunaPruning(multi)


def test_pruning_callback_with_callable_metric(ridge):
    """A callable metric sees the step's state: report ‖λ‖² (recomputed from the reference run's λ trajectory)."""
    train, val = ridge
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    seen = []

    def lam_sq(info):
        value = float((info.state.outer["value"] ** 2).sum())
        seen.append(value)
        return value

    study.optimize(lambda t: bilevel.solve(ridge_problem(train, val), "cg", maxiter=4, seed=0,
                                           callbacks=[OptunaPruning(t, lam_sq)], **STABLE).outer_loss(), n_trials=1)
    assert list(study.trials[0].intermediate_values.values()) == seen and len(seen) == 4


# ----- tuning a solver's settings ---------------------------------------------------------------------------------
def test_tune_solver_on_ridge(ridge):
    train, val = ridge
    problem = ridge_problem(train, val)
    space = {"inner_lr": ["auto", 0.1, 0.003], "outer_lr": ["auto", 0.03, 0.3]}
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(storage=storage, study_name="ridge").enqueue_trial({"inner_lr": 0.1, "outer_lr": 0.3})
    study = tune_solver(problem, "cg", search_space=space, fixed={"inner_steps": 20}, n_trials=6, maxiter=15, seed=0,
                        storage=storage, study_name="ridge")
    trials = study.trials
    assert len(trials) == 6
    # the trial enqueued first (inner_lr=0.1 > 2/L ≈ 0.027) diverges: recorded as PRUNED with the reason
    assert trials[0].params == {"inner_lr": 0.1, "outer_lr": 0.3}
    assert trials[0].state == TrialState.PRUNED and "diverged" in trials[0].user_attrs
    # then the method's defaults, which lie in the space ("auto" both), run and complete
    assert trials[1].params == {"inner_lr": "auto", "outer_lr": "auto"} and trials[1].state == TrialState.COMPLETE
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    best = study.best_trial
    ref = bilevel.solve(problem, "cg", maxiter=15, seed=0, inner_steps=20, **best.params)
    assert math.isclose(best.value, ref.outer_loss(), rel_tol=1e-10)
    # closed form: the tuned λ improves the true validation objective F(λ) over the initial λ = 0
    lam = load_outer(best, problem)
    assert float(ridge_val_loss(train, val, lam)) < float(ridge_val_loss(train, val, torch.zeros(8, dtype=lam.dtype))) - 0.5


def test_tune_solver_automatic_space_runs(ridge):
    train, val = ridge
    study = tune_solver(ridge_problem(train, val), "unrolled", n_trials=3, maxiter=3, seed=1)
    assert len(study.trials) == 3
    assert set(study.trials[0].params) == set(auto_search_space("unrolled"))
    assert {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}


@pytest.mark.parametrize("method", bilevel.available_methods())
def test_auto_search_space_contains_defaults(method):
    space = auto_search_space(method)
    defaults = bilevel.solver_options(method)
    for name, dist in space.items():
        assert isinstance(dist, (FloatDistribution, IntDistribution, CategoricalDistribution))
        default = defaults[name]
        if isinstance(dist, CategoricalDistribution):
            assert default in dist.choices, (name, default, dist)
        else:
            assert dist.low <= default <= dist.high, (name, default, dist)


def test_auto_search_space_rules_on_ift():
    """The documented rules applied to IFT's defaults (inner_steps=10, inner_lr="auto", ...) and to F2SA's
    explicit ones (schedule_offset=10.0)."""
    space = auto_search_space("ift")
    assert space["inner_steps"] == IntDistribution(2, 40, log=True)
    assert "inner_lr" not in space and "outer_lr" not in space  # "auto": they adapt to the problem
    assert auto_search_space("f2sa")["schedule_offset"] == FloatDistribution(1.0, 100.0, log=True)
    assert "inner_momentum" not in space  # "auto"
    assert auto_search_space("f2sa")["momentum_weight"] == FloatDistribution(0.0, 0.99)  # a momentum-like name
    assert set(space["linsolve"].choices) == {"neumann", "cg", "minres", "exact"}
    assert set(space["inner_optimizer"].choices) == {"sgd", "adam", "rmsprop"}
    assert space["warm_start"].choices == (False, True)
    assert "cg_rtol" not in space and "neumann_alpha" not in space  # a tolerance; an "auto" step
    narrow = auto_search_space("f2sa", include=["schedule_offset"], spread=100.0)
    assert list(narrow) == ["schedule_offset"] and narrow["schedule_offset"].high == pytest.approx(1000.0)
    with pytest.raises(bilevel.BilevelError, match=r"cannot derive a range for ift.outer_lr \(default 'auto'\)"):
        auto_search_space("ift", include=["outer_lr"])
    assert "outer_lr" not in auto_search_space("ift", exclude=["outer_lr"])


def test_tune_solver_errors(ridge):
    problem = ridge_problem(*ridge)
    with pytest.raises(bilevel.BilevelError, match="unknown method 'nope'"):
        tune_solver(problem, "nope")
    with pytest.raises(bilevel.BilevelError, match="has no setting"):
        tune_solver(problem, "cg", search_space={"bogus": [1, 2]})
    with pytest.raises(bilevel.BilevelError, match="both searched and fixed"):
        tune_solver(problem, "cg", search_space={"outer_lr": [0.1]}, fixed={"outer_lr": 0.1})
    with pytest.raises(bilevel.BilevelError, match="must be an optuna distribution"):
        tune_solver(problem, "cg", search_space={"outer_lr": 0.1})
    with pytest.raises(bilevel.BilevelError, match="auto_search_space: method 'cg' has no setting"):
        auto_search_space("cg", include=["bogus"])


# ----- storage ---------------------------------------------------------------------------------------------------
def _retry(storage):
    """The storage's stale-trial callback (attribute renamed in Optuna 4.9)."""
    return getattr(storage, "heartbeat_stale_trial_callback", None) or getattr(storage, "failed_trial_callback", None)


def test_make_storage_kinds_and_errors(tmp_path):
    assert isinstance(make_storage(), optuna.storages.InMemoryStorage)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no experimental/deprecation noise leaks to the user
        storage = make_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=3, max_retry=2)
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert storage.get_heartbeat_interval() == 1 and storage.grace_period == 3
    assert _retry(storage) is not None and _retry(storage)._max_retry == 2
    assert _retry(make_storage(f"sqlite:///{tmp_path / 'n.db'}", heartbeat_interval=1, max_retry=0)) is None
    with pytest.raises(bilevel.BilevelError, match="heartbeats need a database"):
        make_storage(heartbeat_interval=5)
    with pytest.raises(bilevel.BilevelError, match="grace_period must be an integer greater than heartbeat_interval=5"):
        make_storage("sqlite:///x.db", heartbeat_interval=5, grace_period=5)
    with pytest.raises(bilevel.BilevelError, match="must be an SQLAlchemy URL"):
        make_storage("study.db")


def test_two_worker_processes_share_one_sqlite_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(study_name="workers", storage=make_storage(url))
    workers = [spawn(url, w, tmp_path, "--n-trials", "4") for w in ("A", "B")]
    for p in workers:
        assert p.wait(120) == 0, logs(tmp_path)
    trials = optuna.load_study(study_name="workers", storage=url).trials
    assert sorted(t.number for t in trials) == list(range(8))
    assert all(t.state == TrialState.COMPLETE for t in trials), logs(tmp_path)
    assert sorted(t.user_attrs["worker"] for t in trials) == ["A"] * 4 + ["B"] * 4
    assert all(len(t.user_attrs[OUTER_ATTR]["value"]) == 8 for t in trials)


def test_killed_worker_trial_is_failed_and_retried_sqlite(tmp_path):
    """SIGKILL a worker mid-trial: with heartbeats (1 s, grace 2 s) the survivors fail and re-run its trial."""
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    killed = kill_one_worker_scenario(url, tmp_path)
    check_killed_trial_retried(url, killed, tmp_path)
