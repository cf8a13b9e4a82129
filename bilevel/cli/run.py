"""``bilevel run``: one method on one problem, and the summary of a run (shared with ``bilevel bench``)."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from bilevel.callbacks import ProgressBar
from bilevel.cli.parsing import DTYPES, check_names, method_options, problem_kwargs, split_pairs, with_suggested
from bilevel.problems import make_problem
from bilevel.solve import Result, solve


def run_one(problem: Any, evaluate: Any, method: str, options: dict[str, Any], args: argparse.Namespace,
            callbacks: list[Any]) -> tuple[Result, dict[str, float]]:
    """One :func:`bilevel.solve` run with the command's maxiter, seed and time limit; its result and test metrics."""
    result = solve(problem, method, maxiter=args.maxiter, seed=args.seed, time_limit=args.time_limit,
                   callbacks=callbacks, **options)
    return result, evaluate(result)


def run_summary(result: Result, metrics: dict[str, float]) -> dict[str, Any]:
    """A run's steps, stop reason, time, final outer loss and hypergradient norm, oracle calls and test metrics."""
    history = result.history
    return {
        "method": result.method,
        "steps": result.n_steps,
        "stop_reason": result.stop_reason,
        "time_s": result.wall_time,
        "outer_loss": history.last("outer_loss") if history.get("outer_loss") else math.nan,
        "hypergrad_norm": history.last("hypergrad_norm") if history.get("hypergrad_norm") else math.nan,
        "oracle_calls": sum(result.oracle_calls.values()),
        "oracle_calls_by_kind": dict(result.oracle_calls),
        "metrics": metrics,
    }


def cmd_run(args: argparse.Namespace) -> int:
    check_names(args.problem, [args.method])
    options = method_options(args.method, split_pairs(args.option, "--option"))
    options = with_suggested(args.problem, args.method, options, not args.no_suggested)
    kwargs = problem_kwargs(args.problem, split_pairs(args.problem_option, "--problem-option"),
                            seed=args.seed, dtype=DTYPES[args.dtype] if args.dtype else None, device=args.device)
    problem, evaluate = make_problem(args.problem, **kwargs)
    callbacks = [] if args.no_progress else [ProgressBar(args.maxiter, desc=f"{args.problem}/{args.method}")]
    result, metrics = run_one(problem, evaluate, args.method, options, args, callbacks)
    summary = {"problem": args.problem, "problem_options": {k: str(v) for k, v in kwargs.items()},
               "options": options, **run_summary(result, metrics)}
    if args.json:
        print(json.dumps(summary, default=str))
        return 0
    print(f"{args.problem} / {args.method}: {result.n_steps} steps in {result.wall_time:.2f} s ({result.stop_reason})")
    print(f"  options: {', '.join(f'{k}={v}' for k, v in options.items()) or 'defaults'}")
    width = max([16, *(len(k) + 1 for k in metrics)])
    print(f"  {'outer loss':<{width}}{summary['outer_loss']:.6g}")
    print(f"  {'hypergrad norm':<{width}}{summary['hypergrad_norm']:.4g}")
    calls = ", ".join(f"{k} {v}" for k, v in sorted(result.oracle_calls.items()))
    print(f"  {'oracle calls':<{width}}{summary['oracle_calls']} ({calls})")
    for key, value in metrics.items():
        print(f"  {key:<{width}}{value:.6g}")
    return 0
