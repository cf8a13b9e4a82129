"""The README's code runs as written: its Quick start block is executed and its printed claims are checked."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_block(title: str) -> str:
    """The first ```python block after the heading ``title``."""
    text = README.read_text()
    section = text[text.index(f"## {title}"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under '## {title}'"
    return match.group(1)


def test_quick_start_runs_and_prints_what_the_readme_says():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_block("Quick start"), "README.md: Quick start", "exec"), {})
    printed = out.getvalue()
    check = re.search(r"rel_error=([0-9.e+-]+)", printed)
    assert check and float(check.group(1)) < 1e-6, printed  # "relative error about 1e-9"
    losses = re.search(r"outer loss ([0-9.]+) -> ([0-9.]+)", printed)
    assert losses, printed
    first, last = map(float, losses.groups())
    assert abs(first - 42.5) < 0.1 and 6.3 < last < 6.6, printed  # "from 42.5 ... to about 6.43"
    assert "oracle calls" in printed and "hvp" in printed
