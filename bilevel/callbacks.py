"""Callbacks that ``solve()`` calls after each outer step: ``callback(info) -> True`` stops the run."""

from __future__ import annotations

import dataclasses
from typing import Any

from bilevel.history import History


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a callback sees after outer step ``step`` (0-based): scalars of that step and the run so far."""

    step: int
    maxiter: int
    metrics: dict[str, float]
    state: Any
    history: History
    elapsed: float


class ProgressBar:
    """A ``tqdm`` progress bar showing the outer loss, the hypergradient norm and the elapsed time."""

    def __init__(self, total: int | None = None, desc: str = "bilevel", **tqdm_kwargs: Any):
        self.total = total
        self.desc = desc
        self.tqdm_kwargs = tqdm_kwargs
        self._bar: Any = None

    def __call__(self, info: StepInfo) -> bool:
        if self._bar is None:
            from tqdm.auto import tqdm

            total = self.total if self.total is not None else info.maxiter
            self._bar = tqdm(total=total, desc=self.desc, **self.tqdm_kwargs)
        shown = {k: f"{info.metrics[k]:.4g}" for k in ("outer_loss", "hypergrad_norm") if k in info.metrics}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)
        return False

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class EarlyStopping:
    """Stop when ``metric`` has not improved by ``min_delta`` for ``patience`` steps."""

    def __init__(self, metric: str = "outer_loss", *, patience: int = 20, min_delta: float = 0.0):
        if patience < 1:
            raise ValueError(f"EarlyStopping: patience must be >= 1 but got {patience}.")
        self.metric = metric
        self.patience = patience
        self.min_delta = min_delta
        self._best = float("inf")
        self._since = 0

    def __call__(self, info: StepInfo) -> bool:
        value = info.metrics.get(self.metric)
        if value is None:
            raise ValueError(f"EarlyStopping: metric {self.metric!r} is not recorded; have {sorted(info.metrics)}.")
        if value < self._best - self.min_delta:
            self._best, self._since = value, 0
        else:
            self._since += 1
        return self._since >= self.patience
