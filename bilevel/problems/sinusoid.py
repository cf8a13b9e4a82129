r"""Sinusoid few-shot regression, the standard MAML experiment (Finn, Abbeel & Levine, 2017, "Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks", ICML, §5.1).

A task is y = A·sin(x − b) with amplitude A ~ U[0.1, 5], phase b ~ U[0, π], inputs x ~ U[−5, 5]; each task
offers K support points (adaptation) and K' query points (evaluation). The model is an MLP 1-40-40-1 with ReLU
and the loss the mean squared error. Predicting 0 everywhere costs E[A²]/2 ≈ 4.2 per task.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.errors import BilevelError
from bilevel.meta import Episode, adaptation_of, meta_params, meta_problem
from bilevel.problem import Problem
from bilevel.types import Params


@dataclasses.dataclass
class SinusoidTasks:
    """Sampler of sinusoid episodes: ``sampler() -> ((x_s, y_s), (x_q, y_q))``, tensors ``(n_tasks, k, 1)``.

    Draws from its own generator seeded with ``seed``, so a run's task sequence does not depend on other code.
    """

    n_tasks: int = 25
    k_shot: int = 10
    k_query: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    seed: int = 0
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"

    def __post_init__(self) -> None:
        for name in ("n_tasks", "k_shot", "k_query"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise BilevelError(f"SinusoidTasks: {name} must be an integer >= 1, got {value!r}.")
        self._gen = torch.Generator().manual_seed(self.seed)

    def _uniform(self, shape: tuple[int, ...], bounds: tuple[float, float]) -> Tensor:
        lo, hi = bounds
        return lo + (hi - lo) * torch.rand(shape, generator=self._gen, dtype=torch.float64)

    def __call__(self) -> Episode:
        return self.sample()

    def sample(self, n_tasks: int | None = None) -> Episode:
        """One episode of ``n_tasks`` (default ``self.n_tasks``) fresh tasks."""
        n = self.n_tasks if n_tasks is None else n_tasks
        amp = self._uniform((n, 1, 1), self.amplitude)
        phase = self._uniform((n, 1, 1), self.phase)
        x = self._uniform((n, self.k_shot + self.k_query, 1), self.x_range)
        y = amp * torch.sin(x - phase)
        x, y = (t.to(dtype=self.dtype, device=self.device) for t in (x, y))
        k = self.k_shot
        return (x[:, :k], y[:, :k]), (x[:, k:], y[:, k:])


def sinusoid_model(hidden: int = 40, n_hidden: int = 2, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> nn.Module:
    """The MLP of Finn et al.: 1 → hidden → … → hidden → 1 with ReLU (``n_hidden`` hidden layers)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width = 1
        for _ in range(n_hidden):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers).to(dtype=dtype, device=device)


def sinusoid_problem(
    *, meta_batch: int = 25, k_shot: int = 10, k_query: int = 10, hidden: int = 40, seed: int = 0,
    n_test_tasks: int = 500, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> tuple[Problem, Callable[..., dict[str, float]]]:
    """(problem, evaluate) for K-shot sinusoid regression.

    The problem's θ is the MLP's initialisation, trained on fresh meta-batches of ``meta_batch`` tasks.
    ``evaluate(outer, solver=None, n_steps=None)`` adapts ``outer`` (a Result, a state or θ) with ``solver.adapt``
    (default: the Result's solver) on ``n_test_tasks`` held-out tasks (a fixed episode from a different seed) and
    returns the mean query MSE ``test_loss`` and its standard error.
    """
    model = sinusoid_model(hidden, seed=seed, dtype=dtype, device=device)
    tasks = SinusoidTasks(meta_batch, k_shot, k_query, seed=seed, dtype=dtype, device=device)
    problem = meta_problem(model, F.mse_loss, tasks, name=f"sinusoid[{k_shot}-shot]")
    test = SinusoidTasks(n_test_tasks, k_shot, k_query, seed=seed + 10_000, dtype=dtype, device=device).sample()

    def evaluate(outer: Params | Any, solver: Any = None, *, n_steps: int | None = None) -> dict[str, float]:
        solver = adaptation_of(outer, solver)
        losses = solver.evaluate(problem, meta_params(outer), test[0], test[1], n_steps=n_steps)
        return {"test_loss": float(losses.mean()), "test_loss_se": float(losses.std() / math.sqrt(losses.numel()))}

    return problem, evaluate

