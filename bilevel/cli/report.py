"""What ``bilevel bench`` shows: the table of each method's results over seeds (median [min, max]) and the PNG plot of
outer loss and test metric against time."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

from bilevel.errors import BilevelError


def median_range(values: Sequence[float], fmt: str) -> str:
    """``median [min, max]`` of the finite values (the median alone for one value, ``nan`` for none)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "nan"
    med = statistics.median(finite)
    if len(finite) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} [{format(min(finite), fmt)}, {format(max(finite), fmt)}]"


def print_table(problem: str, methods: Sequence[str], runs: dict[str, list[dict[str, Any]]],
                metric: str | None, n_seeds: int) -> None:
    """Print one Markdown row per method: final outer loss, test metric, time, oracle calls and steps over seeds."""
    spread = " (median [min, max] over seeds)" if n_seeds > 1 else ""
    print(f"\n{problem}: {n_seeds} seed(s){spread}")
    header = ["method", "final outer loss", metric or "metric", "time (s)", "oracle calls", "steps"]
    rows = []
    for method in methods:
        rs = runs[method]
        rows.append([
            method,
            median_range([r["outer_loss"] for r in rs], ".5g"),
            median_range([r["metrics"].get(metric, math.nan) for r in rs], ".4g") if metric else "",
            median_range([r["time_s"] for r in rs], ".2f"),
            median_range([float(r["oracle_calls"]) for r in rs], ".0f"),
            median_range([float(r["steps"]) for r in rs], ".0f"),
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def plot(path: str, problem: str, methods: Sequence[str], runs: dict[str, list[dict[str, Any]]],
         metric: str | None) -> None:
    """Save outer loss (left) and the test metric (right) against time, one colour per method, to the PNG ``path``."""
    try:
        import matplotlib
    except ImportError as e:
        raise BilevelError("bench --out: plotting needs matplotlib; pip install 'bilevel[plot]'.") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    positive = True
    for i, method in enumerate(methods):
        for j, r in enumerate(runs[method]):
            label = method if j == 0 else None
            color = colors[i % len(colors)]
            axes[0].plot(r["curve_time"], r["curve_outer_loss"], color=color, alpha=0.8, label=label)
            axes[1].plot(r["eval_time"], r["eval_metric"], color=color, alpha=0.8, marker=".", label=label)
            positive = positive and all(v > 0 for v in r["curve_outer_loss"])
    if positive:
        axes[0].set_yscale("log")
    metric_values = [v for m in methods for r in runs[m] for v in r["eval_metric"] if not math.isnan(v)]
    if metric_values and min(metric_values) > 0 and max(metric_values) > 100 * min(metric_values):
        axes[1].set_yscale("log")  # errors that fall over orders of magnitude (distance to the optimum, F − F*)
    axes[0].set(xlabel="time (s)", ylabel="outer loss", title=f"{problem}: outer loss")
    axes[1].set(xlabel="time (s)", ylabel=metric or "metric", title=f"{problem}: {metric or 'metric'}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
