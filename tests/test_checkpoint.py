"""Checkpoints and exact resume (``solve(..., checkpoint=...)``, ``solve(..., state=result)``).

Oracle: the same run without interruption, in the same process: a resumed run must end bit-identical to it
(``torch.equal`` on the variables, equal loss histories). The kill test uses real processes and SIGKILL.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import bilevel
from bilevel import BilevelError
from bilevel.checkpoint import RunState

WORKER = Path(__file__).with_name("checkpoint_worker.py")
sys.path.insert(0, str(WORKER.parent))
import checkpoint_worker  # noqa: E402

F64 = torch.float64


def same(a: bilevel.Result, b: bilevel.Result) -> bool:
    return (all(torch.equal(a.outer_params[k], b.outer_params[k]) for k in a.outer_params)
            and all(torch.equal(a.inner_params[k], b.inner_params[k]) for k in a.inner_params)
            and a.history["outer_loss"] == b.history["outer_loss"])


def ridge_with(inner_data, outer_data, d: int = 4) -> bilevel.Problem:
    def inner_loss(lam, w, batch):
        x, y = batch
        return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(lam, w, batch):
        x, y = batch
        return 0.5 * ((x @ w - y) ** 2).mean()

    return bilevel.Problem(outer=torch.zeros(d, dtype=F64, requires_grad=True), inner=torch.zeros(d, dtype=F64),
                           inner_loss=inner_loss, outer_loss=outer_loss, inner_data=inner_data, outer_data=outer_data)


def data(d: int = 4, n: int = 40):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    return x, x @ torch.ones(d, dtype=F64) + 0.1 * torch.randn(n, generator=gen, dtype=F64)


class Batches:
    """A re-iterable that is not a list (a list is one full batch)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


# Every kind of stream: a shuffled DataLoader (global generator), one with its own generator, a re-iterable of batches,
# a sampler on the global generator, a sampler with its own generator, and a full batch.
def streams(kind: str):
    x, y = data()
    if kind == "loader":
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    if kind == "loader_generator":
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5))
    if kind == "iterable":
        return Batches([(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)])
    if kind == "global_sampler":
        return lambda: (lambda i: (x[i], y[i]))(torch.randint(0, 40, (8,)))
    if kind == "own_sampler":
        gen = torch.Generator().manual_seed(7)
        return lambda: (lambda i: (x[i], y[i]))(torch.randint(0, 40, (8,), generator=gen))
    return (x, y)


KINDS = ["loader", "loader_generator", "iterable", "global_sampler", "own_sampler", "full"]


@pytest.mark.parametrize("inner_kind", KINDS)
def test_state_resume_is_exact_for_every_stream(inner_kind):
    """5 + 6 steps resumed through ``state=result`` equal 11 uninterrupted steps, bit for bit."""
    def problem():
        return ridge_with(streams(inner_kind), streams("own_sampler" if inner_kind != "own_sampler" else "loader"))

    reference = bilevel.solve(problem(), "cg", maxiter=11, seed=0, inner_lr=0.1, inner_steps=3)
    first = bilevel.solve(problem(), "cg", maxiter=5, seed=0, inner_lr=0.1, inner_steps=3)
    resumed = bilevel.solve(problem(), "cg", maxiter=11, state=first, inner_lr=0.1, inner_steps=3)
    assert same(resumed, reference)
    assert resumed.history["step"] == [float(i) for i in range(11)]  # the numbering continues
    # the bare solver state continues the variables only: the data restart, so the run is NOT the same
    if inner_kind in ("loader", "global_sampler", "own_sampler"):
        loose = bilevel.solve(problem(), "cg", maxiter=6, state=first.state, inner_lr=0.1, inner_steps=3)
        assert not torch.equal(loose.outer, reference.outer)


def test_checkpoint_file_resumes_and_holds_what_it_says(tmp_path):
    path = tmp_path / "run.pt"
    problem = lambda: ridge_with(streams("loader"), streams("own_sampler"))  # noqa: E731
    reference = bilevel.solve(problem(), "f2sa", maxiter=10, seed=3)
    partial = bilevel.solve(problem(), "f2sa", maxiter=7, seed=3, checkpoint=path, checkpoint_every=2)
    saved = torch.load(path, weights_only=True)  # a safe format: tensors, numbers, strings, lists, dicts
    assert saved["step"] == 7 and saved["method"] == "f2sa"
    assert set(saved["rng"]) >= {"python", "numpy", "torch"}
    assert saved["data"]["inner"]["kind"] == "iterable" and saved["data"]["outer"]["kind"] == "sampler"
    assert saved["history"]["outer_loss"] == partial.history["outer_loss"]
    resumed = bilevel.solve(problem(), "f2sa", maxiter=10, seed=3, checkpoint=path)
    assert same(resumed, reference)
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary file left behind
    again = bilevel.solve(problem(), "f2sa", maxiter=10, checkpoint=path)  # finished: nothing left to do
    assert torch.equal(again.outer, reference.outer) and again.n_steps == 10


def test_checkpoints_of_another_run_are_refused(tmp_path):
    path = tmp_path / "run.pt"
    x, y = data()
    bilevel.solve(ridge_with((x, y), (x, y)), "cg", maxiter=2, checkpoint=path, inner_lr=0.1)
    with pytest.raises(BilevelError, match="written by method 'cg', and this call asks for 'ift'"):
        bilevel.solve(ridge_with((x, y), (x, y)), "ift", maxiter=4, checkpoint=path, inner_lr=0.1)
    with pytest.raises(BilevelError, match=r"settings differ .*inner_lr: '0.1' -> '0.2'"):
        bilevel.solve(ridge_with((x, y), (x, y)), "cg", maxiter=4, checkpoint=path, inner_lr=0.2)
    x5 = torch.cat([x, x[:, :1]], 1)
    with pytest.raises(BilevelError, match="belongs to a problem with variables"):
        bilevel.solve(ridge_with((x5, y), (x5, y), d=5), "cg", maxiter=4, checkpoint=path, inner_lr=0.1)
    first = bilevel.solve(ridge_with((x, y), (x, y)), "cg", maxiter=2, inner_lr=0.1)
    with pytest.raises(BilevelError, match="state= is a ImplicitState, but method 'f2sa' keeps a F2SAState"):
        bilevel.solve(ridge_with((x, y), (x, y)), "f2sa", maxiter=4, state=first.state)
    with pytest.raises(BilevelError, match="state=: it was written by method 'cg'"):
        bilevel.solve(ridge_with((x, y), (x, y)), "f2sa", maxiter=4, state=first)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BilevelError, match="cannot read .*junk.pt.* as a bilevel checkpoint"):
        bilevel.solve(ridge_with((x, y), (x, y)), "cg", maxiter=4, checkpoint=tmp_path / "junk.pt", inner_lr=0.1)


def test_one_shot_iterators_and_bad_arguments_are_refused(tmp_path):
    x, y = data()
    gen = ((x, y) for _ in range(100))
    with pytest.raises(BilevelError, match="inner_data is a one-shot iterator"):
        bilevel.solve(ridge_with(gen, (x, y)), "cg", maxiter=2, checkpoint=tmp_path / "a.pt", validate=False)
    result = bilevel.solve(ridge_with(((x, y) for _ in range(100)), (x, y)), "cg", maxiter=2, validate=False)
    assert result.run_state is None
    with pytest.raises(BilevelError, match="cannot be resumed exactly"):
        bilevel.solve(ridge_with((x, y), (x, y)), "cg", maxiter=3, state=result)
    with pytest.raises(BilevelError, match="checkpoint_every is set but checkpoint is None"):
        bilevel.solve(ridge_with((x, y), (x, y)), "cg", maxiter=3, checkpoint_every=2)
    with pytest.raises(BilevelError, match="checkpoint_every=0 is not valid"):
        bilevel.solve(ridge_with((x, y), (x, y)), "cg", maxiter=3, checkpoint=tmp_path / "b.pt", checkpoint_every=0)


def test_run_state_only_rebuilds_the_methods_own_types(tmp_path):
    """The file names types; loading builds only those a fresh state of the method uses (no import by name)."""
    path = tmp_path / "run.pt"
    x, y = data()
    bilevel.solve(ridge_with((x, y), (x, y)), "cg", maxiter=2, checkpoint=path, inner_lr=0.1)
    saved = torch.load(path, weights_only=True)
    saved["solver_state"]["type"] = "os:system"
    torch.save(saved, path)
    with pytest.raises(BilevelError, match="holds a os:system, which this method's state does not use"):
        bilevel.solve(ridge_with((x, y), (x, y)), "cg", maxiter=4, checkpoint=path, inner_lr=0.1)
    assert isinstance(bilevel.solve(ridge_with((x, y), (x, y)), "cg", maxiter=2, inner_lr=0.1).run_state, RunState)


@pytest.mark.slow
def test_sigkill_at_any_step_then_resume_is_bit_identical(tmp_path):
    """Every method is killed with SIGKILL between two checkpoints (a different step each) in its own process,
    restarted in a fresh process, and compared there with an uninterrupted run."""
    methods = bilevel.available_methods()
    assert set(checkpoint_worker.OPTIONS) == set(methods)  # a new method must join this test
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[1])}
    kills = {m: 4 + i % 4 for i, m in enumerate(methods)}  # steps 4..7: after the checkpoint at 3, or at 6
    procs = {m: subprocess.Popen([sys.executable, str(WORKER), "kill", m, str(tmp_path), "--at", str(at)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for m, at in kills.items()}
    for m, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == -9, f"{m}: exit {proc.returncode}\n{out.decode()}\n{err.decode()[-2000:]}"
        saved = torch.load(tmp_path / f"{m}.pt", weights_only=True)
        every = checkpoint_worker.EVERY
        assert saved["step"] == (kills[m] // every) * every  # the last checkpoint before the kill
    out = subprocess.run([sys.executable, str(WORKER), "resume", str(tmp_path), *methods], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert set(lines) == set(methods)
    for m in methods:
        assert lines[m] == f"identical steps={checkpoint_worker.MAXITER}", (m, lines[m])
