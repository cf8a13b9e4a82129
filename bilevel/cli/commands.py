"""The ``bilevel`` argument parser (its ``run``, ``bench`` and ``list`` commands and their options) and :func:`main`,
which dispatches to the command and turns errors into exit statuses."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from bilevel.cli.bench import cmd_bench
from bilevel.cli.listing import cmd_list
from bilevel.cli.parsing import DTYPES
from bilevel.cli.run import cmd_run
from bilevel.errors import BilevelError
from bilevel.problems import PROBLEMS, DatasetUnavailable
from bilevel.registry import available_methods


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
