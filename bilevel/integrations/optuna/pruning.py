r"""Pruning: :class:`OptunaPruning`, a :func:`bilevel.solve` callback that reports a metric to an Optuna trial and stops
the run when the study's pruner says so."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from bilevel.callbacks import StepInfo
from bilevel.errors import BilevelError

Metric = str | Callable[[StepInfo], float]
"""What a trial reports: a history key such as ``"outer_loss"`` or ``f(StepInfo) -> float``."""


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
