"""The ``bilevel`` command line: ``run``, ``bench``, ``list``, option parsing and errors.

Oracles: the quadratic problem's closed-form optimum (a run must shrink F − F* below its starting value), the PNG
file signature for plots, and the solver dataclasses' own fields for option parsing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bilevel.cli import main, method_options, parse_value
from bilevel.problems import make_problem, suggested_options

SMALL = ["-P", "inner_dim=20", "-P", "outer_dim=4", "--no-progress"]


def _initial_gap() -> float:
    problem, evaluate = make_problem("quadratic", inner_dim=20, outer_dim=4)
    return evaluate(problem.outer_init["value"])["F_gap"]


def test_run_prints_json_with_metrics(capsys):
    code = main(["run", "quadratic", "--method", "cg", "--maxiter", "40", "--seed", "1", "-o", "inner_lr=1.0",
                 "-o", "outer_lr=0.1", "-o", "inner_steps=5", "--json", *SMALL])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "cg" and out["steps"] == 40
    assert out["options"] == {"inner_lr": 1.0, "outer_lr": 0.1, "inner_steps": 5}
    assert out["oracle_calls"] == sum(out["oracle_calls_by_kind"].values()) > 0
    assert out["metrics"]["F_gap"] < _initial_gap() / 10


def test_suggested_options_are_the_starting_point(capsys):
    assert main(["run", "quadratic", "-m", "unrolled", "--maxiter", "1", "--json", "-o", "outer_lr=0.2", *SMALL]) == 0
    assert json.loads(capsys.readouterr().out)["options"] == {**suggested_options("quadratic", "unrolled"), "outer_lr": 0.2}
    assert main(["run", "quadratic", "-m", "unrolled", "--maxiter", "1", "--json", "--no-suggested", *SMALL]) == 0
    assert json.loads(capsys.readouterr().out)["options"] == {}


def test_run_human_output_and_progress_bar(capsys):
    code = main(["run", "quadratic", "-m", "ift", "--maxiter", "3", "--dtype", "float32", "-P", "inner_dim=20",
                 "-P", "outer_dim=4"])
    assert code == 0
    captured = capsys.readouterr()
    assert "quadratic / ift: 3 steps" in captured.out
    assert "F_gap" in captured.out and "oracle calls" in captured.out
    assert "hypergrad_norm=" in captured.err  # tqdm's postfix


def test_bench_prints_table_and_saves_png(tmp_path, capsys):
    out_png = tmp_path / "sub" / "quad.png"
    out_json = tmp_path / "runs.json"
    code = main(["bench", "quadratic", "--methods", "ift,cg", "--seeds", "2", "--maxiter", "6", "--out", str(out_png),
                 "--json-out", str(out_json), "-o", "inner_lr=1.0", "-o", "cg.cg_maxiter=7", *SMALL])
    assert code == 0
    text = capsys.readouterr().out
    assert "median [min, max]" in text
    rows = [line for line in text.splitlines() if line.startswith("| ift") or line.startswith("| cg")]
    assert len(rows) == 2
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads(out_json.read_text())["runs"]
    assert [r["seed"] for r in runs["cg"]] == [0, 1]
    assert all(len(r["curve_outer_loss"]) == 6 == len(r["curve_time"]) for r in runs["ift"])
    times = runs["cg"][0]["curve_time"]
    assert times == sorted(times)


def test_bad_names_list_the_valid_ones(capsys):
    assert main(["run", "nope", "-m", "cg"]) == 2
    assert "valid problems are" in capsys.readouterr().err
    assert main(["run", "quadratic", "-m", "nope"]) == 2
    err = capsys.readouterr().err
    assert "valid methods are" in err and "cg" in err and "unrolled" in err
    assert main(["bench", "quadratic", "--methods", "cg,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["run", "quadratic", "-m", "cg", "-o", "bogus=1", *SMALL]) == 2
    assert "its options are" in capsys.readouterr().err
    assert main(["run", "quadratic", "-m", "cg", "-o", "inner_lr", *SMALL]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert main(["run", "quadratic", "-m", "cg", "-P", "kappa=2", *SMALL]) == 2
    assert "has no option 'kappa'" in capsys.readouterr().err
    assert main(["bench", "quadratic", "--methods", "unrolled", "-o", "cg_maxiter=3", *SMALL]) == 2
    assert "no method among unrolled" in capsys.readouterr().err


def test_missing_data_exits_3(tmp_path, capsys):
    assert main(["run", "hypercleaning", "-m", "cg", "-P", f"root={tmp_path}", "--no-progress"]) == 3
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_list(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "hypercleaning_small" in text and "unrolled" in text
    assert main(["list", "cg"]) == 0
    text = capsys.readouterr().out
    assert "--option cg_maxiter=20" in text and "an integer >= 0" in text
    assert "--option inner_lr=auto" in text and "a finite number > 0 or 'auto'" in text
    assert "suggested on quadratic: -o inner_lr=1.0" in text  # what `bilevel list PROBLEM` shows, per method here
    assert main(["list", "hypercleaning"]) == 0
    assert "--problem-option p=0.5" in capsys.readouterr().out


def test_parse_values_by_field_type():
    assert parse_value("x", "3", 1) == 3 and isinstance(parse_value("x", "3", 1), int)
    assert parse_value("x", "1e-3", 0.1) == 1e-3
    assert parse_value("x", "no", True) is False
    assert parse_value("x", "none", None) is None
    assert parse_value("p", "float64", torch.float32) is torch.float64
    with pytest.raises(ValueError, match="cannot read 'abc' as float"):
        parse_value("lr", "abc", 0.1)
    opts = method_options("ift", [("neumann_alpha", "0.25"), ("linsolve", "cg"), ("warm_start", "false"),
                                  ("neumann_terms", "7")])
    assert opts == {"neumann_alpha": 0.25, "linsolve": "cg", "warm_start": False, "neumann_terms": 7}
    with pytest.raises(ValueError, match="choose from|cannot read"):
        method_options("ift", [("linsolve", "lu")])
    assert method_options("ift", [("cg.cg_maxiter", "3")]) == {}  # targets another method


def test_help_and_subprocess_entry_points():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "bilevel.cli", "run", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0
    assert "--method" in proc.stdout and "problems:" in proc.stdout and "quadratic" in proc.stdout
    script = os.path.join(os.path.dirname(sys.executable), "bilevel")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "bilevel.cli"]
    proc = subprocess.run([*cmd, "run", "quadratic", "-m", "cg", "--maxiter", "3", "--json", *SMALL],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 3
