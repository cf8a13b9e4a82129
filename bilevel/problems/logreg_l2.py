r"""Per-feature L2 selection for logistic regression (a classic hyperparameter-optimization benchmark).

.. math::
    L_T(\lambda, w) = \frac1n \sum_i \ell(y_i, x_i^\top w + b) + \tfrac12 \sum_j e^{\lambda_j} w_j^2,\qquad
    L_V(w) = \frac1m \sum_i \ell(y_i, x_i^\top w + b),

ℓ the logistic loss; one log-penalty λ_j per feature, so a large λ_j switches feature j off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.problem import Problem
from bilevel.problems._common import as_dtype, inner_of
from bilevel.problems.datasets import Splits, breast_cancer, spam


def logistic_loss(params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean binary cross-entropy of the linear model ``x @ w + b``."""
    x, y = batch
    return F.binary_cross_entropy_with_logits(x @ params["w"] + params["b"], y)


def accuracy(params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> float:
    """Fraction of correct sign predictions."""
    x, y = batch
    with torch.no_grad():
        return float(((x @ params["w"] + params["b"] > 0).to(y.dtype) == y).float().mean())


def logreg_l2_problem(
    splits: Splits | None = None, *, log_lam0: float = -2.0, log_lam_bounds: tuple[float, float] = (-10.0, 1.0), seed: int = 0,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> tuple[Problem, Callable[[dict[str, Tensor]], dict[str, float]]]:
    """(problem, evaluate) on ``splits`` (default: breast_cancer). ``evaluate(inner)`` gives test loss and accuracy.

    ``log_lam_bounds`` box the log-penalties: the upper bound 1 keeps e^λ ≤ 2.7, so inner gradient descent with a
    step up to 0.7 stays stable (a step η diverges once η·e^λ > 2).
    """
    splits = splits or breast_cancer(seed=seed, dtype=dtype, device=device)
    dim = splits.train.x.shape[1]
    x_dtype = splits.train.x.dtype
    outer = torch.full((dim,), log_lam0, dtype=x_dtype, device=splits.train.x.device, requires_grad=True)
    inner = {"w": torch.zeros(dim, dtype=x_dtype, device=outer.device), "b": torch.zeros((), dtype=x_dtype,
                                                                                          device=outer.device)}

    def inner_loss(lam: Tensor, params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        return logistic_loss(params, batch) + 0.5 * (lam.exp() * params["w"] ** 2).sum()

    def outer_loss(lam: Tensor, params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        return logistic_loss(params, batch)

    problem = Problem(
        outer=outer, inner=inner, inner_loss=inner_loss, outer_loss=outer_loss,
        inner_data=splits.train.astuple(), outer_data=splits.val.astuple(), outer_bounds=log_lam_bounds,
        name=f"logreg_l2[{splits.name}]",
    )

    def evaluate(solution: Any) -> dict[str, float]:
        params = inner_of(solution)
        test = splits.test.astuple()
        with torch.no_grad():
            return {"test_accuracy": accuracy(params, test), "test_loss": float(logistic_loss(params, test))}

    return problem, evaluate


def logreg_l2_spam(
    *, log_lam0: float = -2.0, seed: int = 0, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
) -> tuple[Problem, Callable[[Any], dict[str, float]]]:
    """Per-feature L2 logistic regression on spambase (4601 × 57, Debian's ``r-cran-kernlab``), split 40/30/30."""
    splits = spam(seed=seed, dtype=as_dtype(dtype), device=device)
    return logreg_l2_problem(splits, log_lam0=log_lam0, seed=seed, dtype=dtype, device=device)
