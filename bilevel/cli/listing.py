"""``bilevel list``: the problems and methods, or one problem's or method's options with their defaults, accepted
values and suggested settings."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

import torch

from bilevel.errors import BilevelError
from bilevel.options import describe
from bilevel.problems import PROBLEMS, problem_options, suggested_options
from bilevel.registry import available_methods, solver_class, solver_options


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
