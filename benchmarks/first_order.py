r"""First-order bilevel methods against implicit differentiation, side by side in one process.

Methods: ``f2sa`` (Kwon, Kwon, Wright & Nowak, 2023, "A Fully First-Order Method for Stochastic Bilevel Optimization",
ICML), ``lvhba`` (Yao, Yu, Zeng & Zhang, 2024, "Constrained Bi-Level Optimization: Proximal Lagrangian Value Function
Approach and Hessian-free Algorithm", ICLR; run unconstrained here), ``ift`` (Neumann) and ``cg`` (Lorraine, Vicol &
Duvenaud, 2020, "Optimizing Millions of Hyperparameters by Implicit Differentiation", AISTATS).

Problems (both full batch):

* ``quadratic`` — ``bilevel.problems.quadratic`` (inner dim 100, outer dim 10, κ(A) = 10, float64): the optimum and
  F(λ) = L_V(λ, w*(λ)) are closed forms, so the curve is the exact gap F(λ_k) − F(λ*).
* ``hypercleaning`` — ``bilevel.problems.hypercleaning`` on Fashion-MNIST (Debian ``dataset-fashion-mnist``; 20k
  train with a fraction p of labels corrupted / 5k val / 10k test, float32): the validation loss of the current
  classifier (F2SA: z, the lower-level tracker; LV-HBA: y) and its test accuracy.

Every method gets the same wall-time budget per problem (``--quad-seconds``, ``--hc-seconds``); the state is evaluated
about ``--points`` times along the way, and evaluation time is excluded from the clock; every method first runs
2 untimed warm-up steps (the first torch.func calls of a process pay a one-off set-up of ~2 s). Oracle calls are ``solve()``'s
cumulative count (gradients, HVPs, mixed VJPs, constraint VJPs each count one). Settings per method are in
``SETTINGS`` (step sizes chosen for each problem's scale: F's Hessian on the quadratic has eigenvalues in [5.7, 36];
the hyper-cleaning hypergradient is O(1/n) per example, hence plain-SGD outer steps of order n/2 for F2SA/LV-HBA,
scaled from a sweep on the 2k-example MNIST variant, while IFT/CG use Adam).

Every method runs twice: with the tuned settings of ``SETTINGS`` and with its default settings (``solve(problem,
method)``: ``"auto"`` step sizes, :mod:`bilevel.steps`), labelled ``method (defaults)``; ``--settings`` picks one.
Prints one table per problem (final and best values, time and calls to a target) and saves a PNG: curves against
wall time (left) and oracle calls (right).

Run: ``.venv/bin/python benchmarks/first_order.py`` (2-core CPU: about 4 minutes by default);
``--problems quadratic`` alone takes ~1 minute; ``--out results/first_order.png`` is the default plot path.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import torch

try:
    import bilevel
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import bilevel

from bilevel.problems import DatasetUnavailable, hypercleaning_data, hypercleaning_problem, quadratic_problem

METHODS = ("f2sa", "lvhba", "ift", "cg")

SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "quadratic": {
        "f2sa": dict(inner_steps=3, inner_lr=1.0, outer_lr=0.04, penalty0=300.0),
        "lvhba": dict(lr=0.9, prox_lr=0.9, gamma1=10.0, penalty0=10.0, outer_lr=None),
        "ift": dict(inner_steps=10, inner_lr=1.0, neumann_terms=10, outer_optimizer="sgd", outer_lr=0.04),
        "cg": dict(inner_steps=10, inner_lr=1.0, cg_maxiter=10, outer_optimizer="sgd", outer_lr=0.04),
    },
    "hypercleaning": {
        "f2sa": dict(inner_steps=3, inner_lr=0.5, outer_lr=1e4, penalty0=10.0),
        "lvhba": dict(lr=0.5, outer_lr=1e4, prox_lr=0.5, gamma1=10.0, penalty0=10.0),
        "ift": dict(inner_steps=5, inner_lr=0.5, neumann_terms=5, outer_lr=0.3),
        "cg": dict(inner_steps=5, inner_lr=0.5, cg_maxiter=5, outer_lr=0.3),
    },
}


class Recorder:
    """Callback: evaluate the state about every ``every_s`` seconds of solver time (evaluation excluded) and stop
    once the solver time reaches ``budget_s``."""

    def __init__(self, evaluate: Any, budget_s: float, every_s: float):
        self.evaluate = evaluate
        self.budget_s = budget_s
        self.every_s = every_s
        self.eval_time = 0.0
        self.rows: list[dict[str, float]] = []
        self._last = -math.inf

    def __call__(self, info: Any) -> bool:
        solver_time = info.elapsed - self.eval_time
        done = solver_time >= self.budget_s
        if done or solver_time - self._last >= self.every_s:
            t0 = time.perf_counter()
            row = {"step": info.step + 1, "time": solver_time, "calls": info.metrics["oracle_calls"],
                   **self.evaluate(info.state)}
            self.rows.append(row)
            self._last = solver_time
            self.eval_time += time.perf_counter() - t0
        return done


# ----- problems ----------------------------------------------------------------------------------------------
def quadratic_setup(args: argparse.Namespace) -> tuple[Any, Any, dict[str, str]]:
    problem, evaluate = quadratic_problem(seed=args.seed)

    def measure(state: Any) -> dict[str, float]:
        e = evaluate(state)
        return {"F_gap": e["F_gap"], "rel_dist": e["rel_dist"]}

    start = evaluate(problem.outer_init)["F_gap"]
    return problem, measure, {"F_gap": f"F(λ) − F* (start {start:.3g})", "rel_dist": "‖λ − λ*‖/‖λ*‖"}


def hypercleaning_setup(args: argparse.Namespace) -> tuple[Any, Any, dict[str, str]]:
    data = hypercleaning_data(args.p, n_train=args.hc_n_train, seed=args.seed)
    problem, evaluate = hypercleaning_problem(data)
    val = problem.outer_data

    def measure(state: Any) -> dict[str, float]:
        with torch.no_grad():
            val_loss = float(problem.outer_objective(state.outer, state.inner, val))
        return {"val_loss": val_loss, "test_accuracy": evaluate(state)["test_accuracy"]}

    return problem, measure, {"val_loss": "validation loss L_V(w)", "test_accuracy": "test accuracy"}


SETUPS = {"quadratic": quadratic_setup, "hypercleaning": hypercleaning_setup}


# ----- running and reporting ---------------------------------------------------------------------------------------
def run_method(problem: Any, measure: Any, method: str, options: dict[str, Any], budget: float,
               points: int, seed: int) -> tuple[list[dict[str, float]], str]:
    recorder = Recorder(measure, budget, budget / points)
    try:
        bilevel.solve(problem, method, maxiter=10**9, callbacks=[recorder], seed=seed, **options)
    except bilevel.BilevelError as e:  # a diverging method is a result, not a crash of the benchmark
        return recorder.rows, f"stopped: {str(e)[:80]}"
    return recorder.rows, ""


def first_reach(rows: list[dict[str, float]], key: str, target: float, lower_is_better: bool) -> tuple[float, float]:
    for row in rows:
        value = row[key]
        if (value <= target) if lower_is_better else (value >= target):
            return row["time"], row["calls"]
    return math.nan, math.nan


def print_table(name: str, results: dict[str, tuple[list[dict[str, float]], str]], keys: list[str],
                target: tuple[str, float, bool]) -> None:
    tkey, tval, lower = target
    print(f"\n{name}: budget-limited runs (full batch); target {tkey} {'≤' if lower else '≥'} {tval:g}")
    head = f"{'method':<16} {'steps':>6} {'time s':>7} {'calls':>7} " + " ".join(f"{'final ' + k:>18}" for k in keys)
    head += f" {'best ' + tkey:>19} {'t→target s':>11} {'calls→target':>13}"
    print(head)
    print("-" * len(head))
    for method, (rows, note) in results.items():
        if not rows:
            print(f"{method:<16} no evaluation recorded {note}")
            continue
        last = rows[-1]
        best = min(r[tkey] for r in rows) if lower else max(r[tkey] for r in rows)
        t, c = first_reach(rows, tkey, tval, lower)
        line = f"{method:<16} {last['step']:>6.0f} {last['time']:>7.1f} {last['calls']:>7.0f} "
        line += " ".join(f"{last[k]:>18.4g}" for k in keys)
        line += f" {best:>19.4g} {t:>11.1f} {c:>13.0f}"
        print(line + (f"  ({note})" if note else ""))


def plot(all_results: dict[str, Any], labels: dict[str, dict[str, str]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, k) for p in all_results for k in labels[p]]
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for row, (prob, key) in enumerate(panels):
        for col, xkey in enumerate(("time", "calls")):
            ax = axes[row][col]
            for method, (rows, _) in all_results[prob].items():
                finite = [r for r in rows if math.isfinite(r[key])]  # a diverged run's last points are left out
                if finite:
                    ax.plot([r[xkey] for r in finite], [r[key] for r in finite], marker=".", label=method)
            if key in ("F_gap", "rel_dist"):
                ax.set_yscale("log")
            ax.set_xlabel("wall time (s)" if xkey == "time" else "oracle calls")
            ax.set_ylabel(labels[prob][key])
            ax.set_title(prob)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"\nplot saved to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default="quadratic,hypercleaning", help="comma-separated: quadratic, hypercleaning")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--settings", default="tuned,defaults", help="tuned, defaults or both (comma-separated)")
    parser.add_argument("--quad-seconds", type=float, default=8.0, help="wall-time budget per method, quadratic")
    parser.add_argument("--hc-seconds", type=float, default=45.0, help="wall-time budget per method, hyper-cleaning")
    parser.add_argument("--points", type=int, default=25, help="evaluations per run")
    parser.add_argument("--p", type=float, default=0.5, help="hyper-cleaning label-corruption probability")
    parser.add_argument("--hc-n-train", type=int, default=20_000, help="hyper-cleaning training examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", default=os.path.join("results", "first_order.png"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    targets = {"quadratic": ("F_gap", 1e-4, True), "hypercleaning": ("test_accuracy", 0.80, False)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    all_results: dict[str, Any] = {}
    labels: dict[str, dict[str, str]] = {}
    for name in [p.strip() for p in args.problems.split(",") if p.strip()]:
        try:
            problem, measure, keys = SETUPS[name](args)
        except DatasetUnavailable as e:
            print(f"\n{name}: skipped ({e})")
            continue
        budget = args.quad_seconds if name == "quadratic" else args.hc_seconds
        runs = [(method if kind == "tuned" else f"{method} (defaults)", method,
                 SETTINGS[name][method] if kind == "tuned" else {})
                for kind in args.settings.split(",") for method in methods]
        for _, method, options in runs:  # untimed warm-up: first calls into torch.func pay a one-off set-up of seconds
            try:
                bilevel.solve(problem, method, maxiter=2, seed=args.seed, **options)
            except bilevel.BilevelError:
                pass
        results = {}
        for label, method, options in runs:
            results[label] = run_method(problem, measure, method, options, budget, args.points, args.seed)
        for label, _, options in runs:
            print(f"  {name}/{label}: {options or 'default settings'}")
        print_table(name, results, list(keys), targets[name])
        all_results[name] = results
        labels[name] = keys
    if all_results:
        plot(all_results, labels, args.out)


if __name__ == "__main__":
    main()
