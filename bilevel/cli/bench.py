"""``bilevel bench``: every method on the problem for seeds 0..N-1, timing the runs without the test-metric
evaluations, then the table, the optional plot and the JSON file of every run."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

from bilevel.callbacks import ProgressBar, StepInfo
from bilevel.cli.parsing import DTYPES, check_names, method_options, problem_kwargs, split_pairs, with_suggested
from bilevel.cli.report import plot, print_table
from bilevel.cli.run import run_one, run_summary
from bilevel.errors import BilevelError
from bilevel.problems import make_problem
from bilevel.registry import solver_options
from bilevel.solve import solve


class Evaluations:
    """Callback evaluating the test metrics every ``every`` steps; records (time without evaluations, metrics)."""

    def __init__(self, evaluate: Any, every: int):
        self.evaluate, self.every = evaluate, max(1, every)
        self.times: list[float] = []
        self.values: list[dict[str, float]] = []
        self.overhead = 0.0
        self.step_times: list[float] = []  # each step's elapsed time less the evaluations before it

    def __call__(self, info: StepInfo) -> bool:
        self.step_times.append(info.elapsed - self.overhead)
        if info.step % self.every == 0:
            self.record(info.state, info.elapsed)
        return False

    def record(self, state: Any, elapsed: float) -> None:
        t0 = time.perf_counter()
        values = self.evaluate(state)
        self.times.append(elapsed - self.overhead)
        self.values.append(values)
        self.overhead += time.perf_counter() - t0


def cmd_bench(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise BilevelError("--methods: give at least one method, e.g. --methods ift,cg.")
    check_names(args.problem, methods)
    if args.seeds < 1:
        raise BilevelError(f"--seeds must be >= 1, got {args.seeds}.")
    pairs = split_pairs(args.option, "--option")
    options = {m: with_suggested(args.problem, m, method_options(m, pairs, strict=False), not args.no_suggested)
               for m in methods}
    for key, _ in pairs:
        target, dot, field = key.rpartition(".")
        owners = [m for m in methods if (not dot or m == target) and field in solver_options(m)]
        if not owners:
            raise BilevelError(f"--option: no method among {', '.join(methods)} has option {key!r}.")
    problem_pairs = split_pairs(args.problem_option, "--problem-option")
    every = args.eval_every or max(1, args.maxiter // 20)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    metric_name = args.metric
    for seed in range(args.seeds):
        kwargs = problem_kwargs(args.problem, problem_pairs, seed=seed,
                                dtype=DTYPES[args.dtype] if args.dtype else None, device=args.device)
        problem, evaluate = make_problem(args.problem, **kwargs)
        if seed == 0 and args.warmup > 0:  # one-time costs (lazy imports, allocator, first kernels) off the clock
            for method in methods:
                evaluate(solve(problem, method, maxiter=args.warmup, seed=seed, **options[method]))
        for method in methods:
            evals = Evaluations(evaluate, every)
            callbacks: list[Any] = [evals]
            if not args.no_progress:
                callbacks.append(ProgressBar(args.maxiter, desc=f"{method} seed {seed}", leave=False))
            run_args = argparse.Namespace(**{**vars(args), "seed": seed})
            result, metrics = run_one(problem, evaluate, method, options[method], run_args, callbacks)
            evals.times.append(result.wall_time - evals.overhead)
            evals.values.append(metrics)
            metric_name = metric_name or next(iter(metrics), None)
            if metric_name is not None and metric_name not in metrics:
                raise BilevelError(f"--metric: {args.problem} reports {', '.join(metrics)}; got {metric_name!r}.")
            history = result.history
            runs[method].append({
                **run_summary(result, metrics), "seed": seed, "time_s": result.wall_time - evals.overhead,
                "curve_time": evals.step_times,
                "curve_outer_loss": list(history.get("outer_loss", [])),
                "eval_time": evals.times, "eval_metric": [v.get(metric_name, math.nan) for v in evals.values],
            })
    print_table(args.problem, methods, runs, metric_name, args.seeds)
    if args.out:
        plot(args.out, args.problem, methods, runs, metric_name)
        print(f"\nplot saved to {args.out}")
    if args.json_out:
        if os.path.dirname(args.json_out):
            os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump({"problem": args.problem, "runs": runs}, f, default=str)
    return 0
