"""Per-step records of a run."""

from __future__ import annotations

from collections import defaultdict


class History(defaultdict):
    """``history[name]`` is the list of that scalar over outer steps (``step``, ``outer_loss``,
    ``hypergrad_norm``, ``oracle_calls`` (cumulative total), ``calls_<kind>`` (cumulative per oracle kind, e.g.
    ``calls_hvp``), ``step_time``, ``elapsed`` (seconds) and each solver metric)."""

    def __init__(self) -> None:
        super().__init__(list)

    def append(self, record: dict[str, float]) -> None:
        for k, v in record.items():
            self[k].append(v)

    def last(self, name: str) -> float:
        """The latest value of ``name``."""
        if not self.get(name):
            raise KeyError(f"History: no values recorded for {name!r}; recorded: {sorted(self)}.")
        return self[name][-1]

    def rows(self) -> list[dict[str, float]]:
        """The history as one dict per step (missing values as NaN)."""
        n = len(self.get("step", []))
        return [{k: (v[i] if i < len(v) else float("nan")) for k, v in self.items()} for i in range(n)]
