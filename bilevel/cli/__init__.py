"""Command line: ``bilevel run``, ``bilevel bench`` and ``bilevel list``.

The CLI only parses and calls :func:`bilevel.solve`: solver options are the fields of the method's dataclass
(``bilevel.solver_options(method)``), given as ``--option key=value`` and parsed by the type of the field;
problem options (``p``, ``cond``, ...) are the keyword arguments of the problem's factory in
``bilevel.problems.PROBLEMS``, given as ``--problem-option key=value``.

    bilevel run hypercleaning --method cg --maxiter 300 --seed 0 --option outer_lr=0.3 --problem-option p=0.7
    bilevel bench quadratic --methods ift,cg,unrolled --seeds 3 --maxiter 200 --out results/quadratic.png
    bilevel list

Modules: :mod:`~bilevel.cli.parsing` (option values, names), :mod:`~bilevel.cli.run`, :mod:`~bilevel.cli.bench`,
:mod:`~bilevel.cli.listing` (the three commands), :mod:`~bilevel.cli.report` (bench's table and plot),
:mod:`~bilevel.cli.commands` (the argument parser and :func:`main`).
"""

from bilevel.cli.bench import cmd_bench
from bilevel.cli.commands import build_parser, main
from bilevel.cli.listing import cmd_list
from bilevel.cli.parsing import DTYPES, method_options, parse_value, problem_kwargs
from bilevel.cli.run import cmd_run

__all__ = [
    "DTYPES",
    "build_parser",
    "cmd_bench",
    "cmd_list",
    "cmd_run",
    "main",
    "method_options",
    "parse_value",
    "problem_kwargs",
]
