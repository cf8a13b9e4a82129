"""Data for each level: a fixed full batch, a sampler function, or an iterable (e.g. a ``DataLoader``) cycled forever."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import Tensor

from bilevel.types import Batch


def is_full_batch(data: Any) -> bool:
    """A tensor, tuple, list, dict or ``None`` is one fixed batch; anything else iterable or callable is a stream."""
    return data is None or isinstance(data, (Tensor, tuple, list, dict))


class BatchStream:
    """Endless source of batches for one level.

    - full batch (tensor / tuple / list / dict / None): the same batch every time;
    - callable ``f()``: a new batch per call (a sampler);
    - iterable: iterated, and re-iterated when exhausted (a ``DataLoader`` reshuffles each epoch).
    """

    def __init__(self, data: Batch | Callable[[], Batch] | Iterable[Batch], name: str):
        self.name = name
        self.data = data
        self._iterator: Iterator[Batch] | None = None
        if not (is_full_batch(data) or callable(data) or isinstance(data, Iterable)):
            raise TypeError(
                f"Problem: {name} must be a batch (tensor, tuple, list or dict), a callable returning a batch, "
                f"or an iterable of batches such as a DataLoader; got {type(data).__name__}."
            )

    @property
    def is_full_batch(self) -> bool:
        return is_full_batch(self.data)

    def next(self) -> Batch:
        """The next batch."""
        if is_full_batch(self.data):
            return self.data
        if callable(self.data) and not isinstance(self.data, Iterable):
            return self.data()
        if self._iterator is None:
            self._iterator = iter(self.data)  # type: ignore[arg-type]
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.data)  # type: ignore[arg-type]
            try:
                return next(self._iterator)
            except StopIteration:
                raise ValueError(
                    f"Problem: {self.name} is exhausted and cannot be restarted (a generator?); "
                    "pass a re-iterable such as a DataLoader or a list, or a callable that returns a batch."
                ) from None


class DataStreams:
    """The two streams a solver step draws from: ``data.inner()`` and ``data.outer()``."""

    def __init__(self, inner_data: Any, outer_data: Any):
        self.inner_stream = BatchStream(inner_data, "inner_data")
        self.outer_stream = BatchStream(outer_data, "outer_data")

    def inner(self) -> Batch:
        return self.inner_stream.next()

    def outer(self) -> Batch:
        return self.outer_stream.next()

    @property
    def stochastic(self) -> bool:
        return not (self.inner_stream.is_full_batch and self.outer_stream.is_full_batch)
