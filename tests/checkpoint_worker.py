"""Worker processes for the checkpoint tests (not a test module).

``python tests/checkpoint_worker.py kill METHOD DIR --at STEP`` runs METHOD with a checkpoint in DIR and kills
itself with SIGKILL after outer step STEP (between two checkpoints); ``python tests/checkpoint_worker.py resume
DIR METHOD...`` resumes each killed run from its checkpoint, runs the same problem uninterrupted in the same
process, and prints one line ``METHOD identical|different steps=N`` per method.

Every problem draws from stochastic data: a shuffling ``DataLoader`` and a sampler with its own generator (ridge,
for the single-problem methods), per-example perturbations from torch's global generator (``stn``), and an episode
sampler with its own generator (``maml`` / ``imaml``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

MAXITER = 9
EVERY = 3
OPTIONS: dict[str, dict[str, Any]] = {
    "ift": {"inner_lr": 0.1, "neumann_alpha": 0.1, "inner_steps": 3},
    "cg": {"inner_lr": 0.1, "inner_steps": 3},
    "minres": {"inner_lr": 0.1, "inner_steps": 3},
    "exact": {"inner_lr": 0.1, "inner_steps": 3},
    "unrolled": {"inner_lr": 0.1, "inner_steps": 3},
    "f2sa": {"inner_lr": 0.1},
    "lvhba": {"lr": 0.05, "prox_lr": 0.05},
    "stn": {"inner_lr": 0.1, "outer_lr": 0.05},
    "maml": {"inner_steps": 1},
    "imaml": {"inner_steps": 2},
}


def build(method: str) -> Any:
    """A small problem with stochastic data for ``method`` (the same one in every process)."""
    import bilevel

    torch.manual_seed(0)  # module initialisations below
    if method == "stn":
        sys.path.insert(0, str(Path(__file__).parent))
        from test_stn import toy_problem

        return toy_problem()[0]
    if method in ("maml", "imaml"):
        from bilevel.problems import sinusoid_problem

        return sinusoid_problem(meta_batch=4, hidden=8)[0]
    from torch.utils.data import DataLoader, TensorDataset

    d, f64 = 5, torch.float64
    gen = torch.Generator().manual_seed(1)
    x, xv = torch.randn(64, d, generator=gen, dtype=f64), torch.randn(32, d, generator=gen, dtype=f64)
    w = torch.randn(d, generator=gen, dtype=f64)
    y, yv = x @ w + 0.1 * torch.randn(64, generator=gen, dtype=f64), xv @ w
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    own = torch.Generator().manual_seed(3)

    def val_sampler() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, 32, (8,), generator=own)
        return xv[idx], yv[idx]

    def inner_loss(lam: torch.Tensor, w: torch.Tensor, batch: Any) -> torch.Tensor:
        xb, yb = batch
        return 0.5 * ((xb @ w - yb) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(lam: torch.Tensor, w: torch.Tensor, batch: Any) -> torch.Tensor:
        xb, yb = batch
        return 0.5 * ((xb @ w - yb) ** 2).mean()

    return bilevel.Problem(outer=torch.zeros(d, dtype=f64, requires_grad=True), inner=torch.zeros(d, dtype=f64),
                           inner_loss=inner_loss, outer_loss=outer_loss, inner_data=loader, outer_data=val_sampler)


def run(method: str, directory: str, kill_at: int | None = None) -> Any:
    import bilevel

    def killer(info: Any) -> None:
        if kill_at is not None and info.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    path = os.path.join(directory, f"{method}.pt")
    return bilevel.solve(build(method), method, maxiter=MAXITER, seed=0, checkpoint=path, checkpoint_every=EVERY,
                         callbacks=[killer], **OPTIONS[method])


def main(argv: list[str]) -> None:
    import bilevel

    torch.set_num_threads(1)
    if argv[0] == "kill":
        method, directory, at = argv[1], argv[2], int(argv[argv.index("--at") + 1])
        run(method, directory, kill_at=at)
        print("not killed")
        return
    directory = argv[1]
    for method in argv[2:]:
        resumed = run(method, directory)
        reference = bilevel.solve(build(method), method, maxiter=MAXITER, seed=0, **OPTIONS[method])
        same = all(torch.equal(resumed.outer_params[k], reference.outer_params[k]) for k in reference.outer_params)
        same = same and all(torch.equal(resumed.inner_params[k], reference.inner_params[k]) for k in reference.inner_params)
        same = same and resumed.history["outer_loss"] == reference.history["outer_loss"]
        print(f"{method} {'identical' if same else 'different'} steps={len(resumed.history['step'])}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
