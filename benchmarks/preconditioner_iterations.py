r"""Which curvature pairs the ``cg`` solver's L-BFGS preconditioner should keep: CG iterations along a run.

``solve(problem, "cg")`` preconditions each outer step's CG solve with the L-BFGS matrix of curvature pairs (p, Hp)
that earlier solves met (:mod:`bilevel.precondition`, Morales & Nocedal, 2000). This script runs ``--steps`` outer
steps of ``cg`` (``cg_rtol`` each of ``--rtols``, ``cg_maxiter`` = ``--maxiter``, memory m = ``--memory``) with four
choices of pairs, on the same problem and seed, and prints the CG iterations spent over the run:

* none: no preconditioner (``cg_preconditioner=None``);
* latest solve, first m: the first m pairs of the previous solve only (``recycle_pairs`` replaced by one that drops
  the older pairs);
* recycled, first m (the library's choice): each solve records its first m pairs (``record_pairs=m``) and
  :func:`~bilevel.precondition.recycle_pairs` tops them up with the most recent earlier ones to m;
* recycled, last m: the same, but each solve keeps its last m pairs instead of its first (``cg`` records all of
  them and the last m are kept).

The choices change only the preconditioner, so every run computes the same hypergradients up to the solves'
tolerance; the final outer variables are compared with the unpreconditioned run's (relative difference printed).
At the tight tolerance every solve takes more than m iterations and records m new pairs, so recycling has little to
add; at the loose one solves are shorter and the older pairs fill the memory.
Problems: per-weight ridge (``ridge_data(n_train=200, n_val=200, dim=100)``), per-feature L2 logistic regression on
breast cancer and on spambase (``logreg_l2``, ``logreg_l2_spam``), all in float64 with the settings of
``bilevel.problems.SUGGESTED_OPTIONS`` for the logistic regressions.

    .venv/bin/python benchmarks/preconditioner_iterations.py        # 2-core CPU: about 5 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's bilevel
import torch  # noqa: E402

import bilevel  # noqa: E402
from bilevel import linsolve, precondition  # noqa: E402
from bilevel.problems import make_problem, suggested_options  # noqa: E402
from bilevel.problems.ridge import ridge_data, ridge_problem  # noqa: E402
from bilevel.solvers import ift  # noqa: E402


def latest_only(old: Any, new: Any, *, memory: int = 10) -> Any:
    """``recycle_pairs`` without the old pairs."""
    return precondition.recycle_pairs((), new, memory=memory)


def cg_keeping_last(matvec: Any, b: Any, *, record_pairs: int = 0, maxiter: int = 50, **options: Any):
    """``cg`` recording every pair and returning the last ``record_pairs`` of them."""
    result = linsolve.cg(matvec, b, record_pairs=maxiter if record_pairs else 0, maxiter=maxiter, **options)
    return dataclasses.replace(result, pairs=result.pairs[len(result.pairs) - record_pairs :] if record_pairs else ())


CHOICES: dict[str, tuple[dict[str, Any], dict[str, Callable[..., Any]]]] = {
    "none": ({"cg_preconditioner": None}, {}),
    "latest solve, first m": ({}, {"recycle_pairs": latest_only}),
    "recycled, first m (default)": ({}, {}),
    "recycled, last m": ({}, {"cg": cg_keeping_last}),
}


def problems() -> dict[str, tuple[bilevel.Problem, dict[str, Any]]]:
    ridge = ridge_problem(*ridge_data(n_train=200, n_val=200, dim=100, dtype=torch.float64))
    out = {"ridge d=100": (ridge, {"inner_steps": 50, "inner_lr": 1e-3, "outer_lr": 0.1})}
    for name in ("logreg_l2", "logreg_l2_spam"):
        problem, _ = make_problem(name, dtype=torch.float64)
        out[f"{name} ({problem.name})"] = (problem, suggested_options(name, "cg"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rtols", default="1e-8,1e-4", help="cg_rtol values, comma-separated")
    parser.add_argument("--maxiter", type=int, default=500)
    parser.add_argument("--memory", type=int, default=10)
    args = parser.parse_args()
    print(f"cg solver, {args.steps} outer steps, memory m={args.memory}; total CG iterations over the run (per step: "
          "min–max; relative difference of the final outer variables from the unpreconditioned run's)")
    print("| problem | cg_rtol | " + " | ".join(CHOICES) + " |")
    print("|---|---|" + "---|" * len(CHOICES))
    cases = [(name, problem, options, float(rtol)) for rtol in args.rtols.split(",")
             for name, (problem, options) in problems().items()]
    for name, problem, options, rtol in cases:
        cells, reference = [], None
        for settings, patches in CHOICES.values():
            with mock.patch.multiple(ift, **patches) if patches else contextlib.nullcontext():
                run = bilevel.solve(problem, "cg", maxiter=args.steps, seed=0, cg_rtol=rtol, cg_maxiter=args.maxiter,
                                    cg_preconditioner_memory=args.memory, **{**options, **settings})
            per_step = [int(i) for i in run.history["linsolve_iterations"]]
            outer = torch.cat([v.reshape(-1) for v in run.outer_params.values()])
            reference = outer if reference is None else reference
            diff = float((outer - reference).norm() / reference.norm())
            cells.append(f"{sum(per_step)} ({min(per_step)}–{max(per_step)}; {diff:.0e})")
        print(f"| {name} | {rtol:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
