"""Command line: ``bilevel run``, ``bilevel bench`` and ``bilevel list``.

The CLI only parses and calls :func:`bilevel.solve`: solver options are the fields of the method's dataclass
(``bilevel.solver_options(method)``), given as ``--option key=value`` and parsed by the type of the field;
problem options (``p``, ``cond``, ...) are the keyword arguments of the problem's factory in
``bilevel.problems.PROBLEMS``, given as ``--problem-option key=value``.

    bilevel run hypercleaning --method cg --maxiter 300 --seed 0 --option outer_lr=0.3 --problem-option p=0.7
    bilevel bench quadratic --methods ift,cg,unrolled --seeds 3 --maxiter 200 --out results/quadratic.png
    bilevel list
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import types
import typing
from collections.abc import Sequence
from typing import Any

import torch

from bilevel.callbacks import ProgressBar, StepInfo
from bilevel.errors import BilevelError
from bilevel.options import describe
from bilevel.problems import PROBLEMS, DatasetUnavailable, make_problem, problem_options, suggested_options
from bilevel.registry import available_methods, solver_class, solver_options
from bilevel.solve import Result, solve

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----- parsing option values -----------------------------------------------------------------------------------
def parse_value(name: str, text: str, default: Any, annotation: Any = None) -> Any:
    """``text`` converted to the type of ``default`` (or of ``annotation`` when the default is None):
    bool (true/false/1/0/yes/no/on/off), int, float, str, None ("none"), a Literal's choices, a tuple of numbers."""
    kinds = _candidate_types(default, annotation)
    if text.lower() in ("none", "null") and (default is None or type(None) in kinds):
        return None
    errors = []
    for kind in kinds:
        if kind is type(None):
            continue
        try:
            return _convert(text, kind)
        except ValueError as e:
            errors.append(str(e))
    expected = " or ".join(sorted({_type_name(k) for k in kinds if k is not type(None)})) or "a value"
    raise BilevelError(f"option {name}: cannot read {text!r} as {expected} (default {default!r}).")


def _candidate_types(default: Any, annotation: Any) -> list[Any]:
    if annotation is not None:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            return [a for arg in typing.get_args(annotation) for a in _candidate_types(None, arg)]
        if origin is typing.Literal:
            return [annotation]
        if isinstance(annotation, type):
            return [annotation]
    if default is None:
        return [float, str]
    if isinstance(default, torch.dtype):
        return [torch.dtype]
    return [type(default)]


def _convert(text: str, kind: Any) -> Any:
    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"choose from {', '.join(map(str, choices))}")
    if kind is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError("not a boolean")
    if kind is torch.dtype:
        if text.removeprefix("torch.") not in DTYPES:
            raise ValueError("not a dtype")
        return DTYPES[text.removeprefix("torch.")]
    if kind is tuple:
        return tuple(float(part) for part in text.strip("()").split(",") if part.strip())
    if kind in (int, float, str):
        return kind(text)
    raise ValueError(f"unsupported type {kind}")


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is typing.Literal:
        return "one of " + "/".join(map(str, typing.get_args(kind)))
    return getattr(kind, "__name__", str(kind))


def _split_pairs(pairs: Sequence[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BilevelError(f"{flag}: expected key=value, got {pair!r}.")
        out.append((key.strip(), value.strip()))
    return out


def method_options(method: str, pairs: Sequence[tuple[str, str]], *, strict: bool = True) -> dict[str, Any]:
    """Solver options for ``method`` from ``key=value`` pairs, parsed by each field's default and annotation.

    A key may be prefixed by a method name (``cg.cg_maxiter=50``) to target one method of a benchmark;
    with ``strict`` an unknown key raises, listing the method's options.
    """
    defaults = solver_options(method)
    cls = solver_class(method)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # annotations that do not resolve: fall back to the defaults' types
        hints = {}
    out: dict[str, Any] = {}
    for key, text in pairs:
        target, dot, field = key.rpartition(".")
        if dot and target != method:
            continue
        if field not in defaults:
            if strict:
                raise BilevelError(
                    f"--option: method {method!r} has no option {field!r}; its options are {', '.join(sorted(defaults))} "
                    f"(see `bilevel list {method}`)."
                )
            continue
        out[field] = parse_value(field, text, defaults[field], hints.get(field))
    return out


def problem_kwargs(name: str, pairs: Sequence[tuple[str, str]], **fixed: Any) -> dict[str, Any]:
    """Keyword arguments for the problem factory ``name``: ``fixed`` ones that it accepts, then parsed pairs."""
    defaults = problem_options(name)
    out = {k: v for k, v in fixed.items() if k in defaults and v is not None}
    for key, text in pairs:
        if key not in defaults:
            raise BilevelError(
                f"--problem-option: problem {name!r} has no option {key!r}; its options are {', '.join(defaults)}."
            )
        out[key] = parse_value(key, text, defaults[key])
    return out


# ----- shared pieces -------------------------------------------------------------------------------------------
def _check_names(problem: str, methods: Sequence[str]) -> None:
    if problem not in PROBLEMS:
        raise BilevelError(f"unknown problem {problem!r}; valid problems are {', '.join(sorted(PROBLEMS))}.")
    valid = available_methods()
    for method in methods:
        if method not in valid:
            raise BilevelError(f"unknown method {method!r}; valid methods are {', '.join(valid)}.")


class _Evaluations:
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


def _run_one(problem: Any, evaluate: Any, method: str, options: dict[str, Any], args: argparse.Namespace,
             callbacks: list[Any]) -> tuple[Result, dict[str, float]]:
    result = solve(problem, method, maxiter=args.maxiter, seed=args.seed, time_limit=args.time_limit,
                   callbacks=callbacks, **options)
    return result, evaluate(result)


def _summary(result: Result, metrics: dict[str, float]) -> dict[str, Any]:
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


# ----- commands ------------------------------------------------------------------------------------------------
def _with_suggested(problem: str, method: str, options: dict[str, Any], use: bool) -> dict[str, Any]:
    """The problem's measured settings for ``method`` (see ``bilevel.problems.SUGGESTED_OPTIONS``), overridden by
    the user's ``--option``s; only the user's with ``--no-suggested``."""
    if not use:
        return options
    fields = solver_options(method)
    return {**{k: v for k, v in suggested_options(problem, method).items() if k in fields}, **options}


def cmd_run(args: argparse.Namespace) -> int:
    _check_names(args.problem, [args.method])
    options = method_options(args.method, _split_pairs(args.option, "--option"))
    options = _with_suggested(args.problem, args.method, options, not args.no_suggested)
    kwargs = problem_kwargs(args.problem, _split_pairs(args.problem_option, "--problem-option"),
                            seed=args.seed, dtype=DTYPES[args.dtype] if args.dtype else None, device=args.device)
    problem, evaluate = make_problem(args.problem, **kwargs)
    callbacks = [] if args.no_progress else [ProgressBar(args.maxiter, desc=f"{args.problem}/{args.method}")]
    result, metrics = _run_one(problem, evaluate, args.method, options, args, callbacks)
    summary = {"problem": args.problem, "problem_options": {k: str(v) for k, v in kwargs.items()},
               "options": options, **_summary(result, metrics)}
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


def _spread(values: Sequence[float], fmt: str) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "nan"
    med = statistics.median(finite)
    if len(finite) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} [{format(min(finite), fmt)}, {format(max(finite), fmt)}]"


def cmd_bench(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise BilevelError("--methods: give at least one method, e.g. --methods ift,cg.")
    _check_names(args.problem, methods)
    if args.seeds < 1:
        raise BilevelError(f"--seeds must be >= 1, got {args.seeds}.")
    pairs = _split_pairs(args.option, "--option")
    options = {m: _with_suggested(args.problem, m, method_options(m, pairs, strict=False), not args.no_suggested)
               for m in methods}
    for key, _ in pairs:
        target, dot, field = key.rpartition(".")
        owners = [m for m in methods if (not dot or m == target) and field in solver_options(m)]
        if not owners:
            raise BilevelError(f"--option: no method among {', '.join(methods)} has option {key!r}.")
    problem_pairs = _split_pairs(args.problem_option, "--problem-option")
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
            evals = _Evaluations(evaluate, every)
            callbacks: list[Any] = [evals]
            if not args.no_progress:
                callbacks.append(ProgressBar(args.maxiter, desc=f"{method} seed {seed}", leave=False))
            run_args = argparse.Namespace(**{**vars(args), "seed": seed})
            result, metrics = _run_one(problem, evaluate, method, options[method], run_args, callbacks)
            evals.times.append(result.wall_time - evals.overhead)
            evals.values.append(metrics)
            metric_name = metric_name or next(iter(metrics), None)
            if metric_name is not None and metric_name not in metrics:
                raise BilevelError(f"--metric: {args.problem} reports {', '.join(metrics)}; got {metric_name!r}.")
            history = result.history
            runs[method].append({
                **_summary(result, metrics), "seed": seed, "time_s": result.wall_time - evals.overhead,
                "curve_time": evals.step_times,
                "curve_outer_loss": list(history.get("outer_loss", [])),
                "eval_time": evals.times, "eval_metric": [v.get(metric_name, math.nan) for v in evals.values],
            })
    _print_table(args.problem, methods, runs, metric_name, args.seeds)
    if args.out:
        _plot(args.out, args.problem, methods, runs, metric_name)
        print(f"\nplot saved to {args.out}")
    if args.json_out:
        if os.path.dirname(args.json_out):
            os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump({"problem": args.problem, "runs": runs}, f, default=str)
    return 0


def _print_table(problem: str, methods: Sequence[str], runs: dict[str, list[dict[str, Any]]],
                 metric: str | None, n_seeds: int) -> None:
    spread = " (median [min, max] over seeds)" if n_seeds > 1 else ""
    print(f"\n{problem}: {n_seeds} seed(s){spread}")
    header = ["method", "final outer loss", metric or "metric", "time (s)", "oracle calls", "steps"]
    rows = []
    for method in methods:
        rs = runs[method]
        rows.append([
            method,
            _spread([r["outer_loss"] for r in rs], ".5g"),
            _spread([r["metrics"].get(metric, math.nan) for r in rs], ".4g") if metric else "",
            _spread([r["time_s"] for r in rs], ".2f"),
            _spread([float(r["oracle_calls"]) for r in rs], ".0f"),
            _spread([float(r["steps"]) for r in rs], ".0f"),
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def _plot(path: str, problem: str, methods: Sequence[str], runs: dict[str, list[dict[str, Any]]],
          metric: str | None) -> None:
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


def cmd_list(args: argparse.Namespace) -> int:
    if args.name:
        if args.name in PROBLEMS:
            print(f"problem {args.name}: {_summary_line(PROBLEMS[args.name])}")
            for key, value in problem_options(args.name).items():
                print(f"  --problem-option {key}={_show(value)}")
            for method in available_methods():
                suggested = suggested_options(args.name, method)
                if suggested:
                    print(f"  suggested for {method}: " + " ".join(f"-o {k}={v}" for k, v in suggested.items()))
            return 0
        if args.name in available_methods():
            cls = solver_class(args.name)
            hints = typing.get_type_hints(cls, include_extras=True)
            print(f"method {args.name}: {_summary_line(cls)}")
            for key, value in solver_options(args.name).items():
                setting = f"{key}={_show(value)}"
                print(f"  --option {setting:<32} {describe(hints[key]) if key in hints else ''}")
            for problem in sorted(PROBLEMS):
                suggested = suggested_options(problem, args.name)
                if suggested:
                    print(f"  suggested on {problem}: " + " ".join(f"-o {k}={v}" for k, v in suggested.items()))
            print('  "auto" step sizes adapt to the problem (bilevel.steps); defaults need no tuning.')
            return 0
        raise BilevelError(
            f"unknown name {args.name!r}; problems are {', '.join(sorted(PROBLEMS))}; "
            f"methods are {', '.join(available_methods())}."
        )
    print("problems (bilevel list PROBLEM for its options):")
    for name, factory in sorted(PROBLEMS.items()):
        print(f"  {name:<22} {_summary_line(factory)}")
    print("methods (bilevel list METHOD for its options):")
    for name in available_methods():
        print(f"  {name:<22} {_summary_line(solver_class(name))}")
    return 0


def _summary_line(obj: Any) -> str:
    """The first sentence of ``obj``'s docstring, without reST markup."""
    paragraph = " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())
    sentence = paragraph.split(". ")[0].rstrip(".")
    return sentence.replace("``", "").replace(":class:", "").replace("`", "")


def _show(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if dataclasses.is_dataclass(value):
        return type(value).__name__
    return str(value)


# ----- the parser ----------------------------------------------------------------------------------------------
def _epilog() -> str:
    return (f"problems: {', '.join(sorted(PROBLEMS))}\n"
            f"methods:  {', '.join(available_methods())}\n"
            "`bilevel list NAME` shows a problem's or a method's options with their defaults.")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("problem", help="problem name (see `bilevel list`)")
    parser.add_argument("--maxiter", type=int, default=100, help="outer steps (default 100)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="floating-point type of the problem (default: the problem's own)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the problem's own, cpu)")
    parser.add_argument("--time-limit", type=float, default=None, help="stop each run after this many seconds")
    parser.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a solver option (a field of the method's dataclass), repeatable: -o inner_steps=20")
    parser.add_argument("-P", "--problem-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a problem option (a keyword of its factory), repeatable: -P p=0.7")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-suggested", action="store_true",
                        help="start from the solver's own defaults, not the settings measured for this problem "
                        "(bilevel.problems.SUGGESTED_OPTIONS; shown by `bilevel list PROBLEM`)")


def build_parser() -> argparse.ArgumentParser:
    """The ``bilevel`` argument parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="bilevel", formatter_class=fmt,
        description="Bilevel / gradient-based hyperparameter optimization on ready-made problems.",
        epilog=_epilog() + "\n\nexamples:\n"
        "  bilevel run quadratic --method cg --maxiter 200 -o inner_lr=1.0\n"
        "  bilevel run hypercleaning --method cg --maxiter 300 -P p=0.7 -o outer_lr=0.3\n"
        "  bilevel bench quadratic --methods ift,cg,unrolled --seeds 3 --out results/quadratic.png",
    )
    sub = parser.add_subparsers(dest="command", metavar="{run,bench,list}")
    run = sub.add_parser("run", formatter_class=fmt, help="solve one problem with one method",
                         description="Solve PROBLEM with METHOD, show a progress bar, print the final metrics.",
                         epilog=_epilog())
    _common(run)
    run.add_argument("-m", "--method", required=True, help="solver name (see below)")
    run.add_argument("--seed", type=int, default=0, help="seed of the data split and the solver (default 0)")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    run.set_defaults(func=cmd_run)
    bench = sub.add_parser("bench", formatter_class=fmt, help="compare methods over seeds: table and plot",
                           description="Run each method on PROBLEM for seeds 0..N-1; print final outer loss, test "
                           "metric, time and oracle calls (median [min, max]); optionally plot outer loss and "
                           "test metric against time.", epilog=_epilog())
    _common(bench)
    bench.add_argument("--methods", required=True, help="comma-separated solver names, e.g. ift,cg,unrolled")
    bench.add_argument("--seeds", type=int, default=1, help="number of seeds, 0..N-1 (default 1)")
    bench.add_argument("--out", default=None, help="PNG file for the plot (e.g. results/x.png)")
    bench.add_argument("--json-out", default=None, help="write every run's summary and curves to this JSON file")
    bench.add_argument("--metric", default=None, help="test metric for the table and plot (default: the first)")
    bench.add_argument("--warmup", type=int, default=2,
                       help="untimed steps of each method before the timed runs (default 2; 0 to skip)")
    bench.add_argument("--eval-every", type=int, default=None,
                       help="evaluate the test metric every K steps (default maxiter/20); not counted in the time")
    bench.set_defaults(func=cmd_bench)
    lst = sub.add_parser("list", help="list problems and methods, or one's options")
    lst.add_argument("name", nargs="?", help="a problem or method name")
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bilevel`` script; returns the exit status (2 for bad input, 3 for missing data)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if hasattr(args, "maxiter") and args.maxiter < 0:
        parser.error(f"--maxiter must be >= 0, got {args.maxiter}")
    try:
        return args.func(args)
    except BrokenPipeError:  # `bilevel list | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except DatasetUnavailable as e:
        print(f"bilevel: data unavailable: {e}", file=sys.stderr)
        return 3
    except BilevelError as e:
        print(f"bilevel: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
