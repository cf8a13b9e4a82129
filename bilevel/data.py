"""Data for each level: a fixed full batch, a sampler function, or an iterable (e.g. a ``DataLoader``) cycled forever.

A :class:`BatchStream` checks every batch it serves against the first one (same containers, dtypes and shapes but
for the leading batch dimension; no empty tensors) and knows its position, so a checkpoint can put it back exactly
where it was (:meth:`BatchStream.state_dict`):

* a full batch: nothing to restore;
* a sampler ``f()``: its own ``state_dict()`` when it has one (or its object has, for a bound method), else the
  random generators it holds (:func:`bilevel.rng.find_generators`); one drawing from the global generators needs
  nothing more, since the run's checkpoint restores those;
* an iterable: the pass over it (its epoch), how many batches of that pass were served, and the random generators
  as they were when the pass began (a ``DataLoader`` draws its shuffle from them): the pass is re-created and
  fast-forwarded. A one-shot iterator (a generator object) cannot be rewound and is refused by checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel import rng
from bilevel.errors import BilevelError
from bilevel.types import Batch


def is_full_batch(data: Any) -> bool:
    """A tensor, tuple, list, dict or ``None`` is one fixed batch; anything else iterable or callable is a stream."""
    return data is None or isinstance(data, (Tensor, tuple, list, dict))


def _stateful(data: Any) -> Any:
    """The object whose ``state_dict``/``load_state_dict`` describe a sampler: itself or its bound object."""
    for candidate in (data, getattr(data, "__self__", None)):
        if callable(getattr(candidate, "state_dict", None)) and callable(getattr(candidate, "load_state_dict", None)):
            return candidate
    return None


def callable_state(fn: Any) -> dict[str, Any]:
    """What restores a sampler ``fn`` exactly: its ``state_dict()``, or the states of the generators it holds."""
    owner = _stateful(fn)
    if owner is not None:
        return {"state_dict": owner.state_dict()}
    return {"generators": {path: rng.generator_state(g) for path, g in rng.find_generators(fn).items()}}


def load_callable_state(fn: Any, state: dict[str, Any], what: str) -> None:
    """Put the sampler ``fn`` back in ``state`` (from :func:`callable_state`)."""
    owner = _stateful(fn)
    if "state_dict" in state:
        if owner is None:
            raise BilevelError(f"{what}: the checkpoint holds a sampler state_dict, but this sampler has no "
                               "load_state_dict; resume with the same kind of sampler.")
        owner.load_state_dict(state["state_dict"])
        return
    _load_generators(rng.find_generators(fn), state["generators"], what)


def _load_generators(found: dict[str, Any], states: dict[str, Any], what: str) -> None:
    if set(found) != set(states):
        raise BilevelError(
            f"{what}: the checkpoint holds random generators at {sorted(states)} but this data source has them at "
            f"{sorted(found)}; resume with the same data source."
        )
    for path, g in found.items():
        rng.set_generator_state(g, states[path])


class BatchStream:
    """Endless source of batches for one level.

    - full batch (tensor / tuple / list / dict / None): the same batch every time;
    - callable ``f()``: a new batch per call (a sampler);
    - iterable: iterated, and re-iterated when exhausted (a ``DataLoader`` reshuffles each epoch).
    """

    def __init__(self, data: Batch | Callable[[], Batch] | Iterable[Batch], name: str):
        self.name = name
        self.data = data
        self.draws = 0
        self._iterator: Iterator[Batch] | None = None
        self._epoch_draws = 0
        self._epoch_start: dict[str, Any] | None = None
        self._signature: Any = None
        if is_full_batch(data):
            self.kind = "full"
        elif callable(data) and not isinstance(data, Iterable):
            self.kind = "sampler"
        elif isinstance(data, Iterable):
            self.kind = "iterator" if isinstance(data, Iterator) and iter(data) is data else "iterable"
        else:
            raise BilevelError(
                f"Problem: {name} must be a batch (tensor, tuple, list or dict), a callable returning a batch, "
                f"or an iterable of batches such as a DataLoader; got {type(data).__name__}."
            )

    @property
    def is_full_batch(self) -> bool:
        return self.kind == "full"

    def next(self) -> Batch:
        """The next batch (checked against the first)."""
        if self.kind == "full":
            batch = self.data
        elif self.kind == "sampler":
            batch = self.data()  # type: ignore[operator]
        else:
            batch = self._next_from_iterable()
        self.draws += 1
        if self.kind != "full" or self.draws == 1:
            self._check(batch)
        return batch

    def _new_pass(self) -> None:
        if self.kind == "iterable":
            self._epoch_start = self._random_state()
        self._iterator = iter(self.data)  # type: ignore[call-overload]
        self._epoch_draws = 0

    def _next_from_iterable(self) -> Batch:
        if self._iterator is None:
            self._new_pass()
        try:
            batch = next(self._iterator)  # type: ignore[arg-type]
        except StopIteration:
            if self.kind == "iterator":
                raise BilevelError(
                    f"Problem: {self.name} is exhausted after {self.draws} batches and cannot be restarted (a "
                    "generator or other one-shot iterator). Pass a re-iterable such as a DataLoader, or a callable "
                    f"that returns a fresh batch per call, e.g. {self.name}=lambda: next_batch()."
                ) from None
            self._new_pass()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise BilevelError(f"Problem: {self.name} is an empty iterable: it yields no batch.") from None
        self._epoch_draws += 1
        return batch

    def _random_state(self) -> dict[str, Any]:
        """The generators an iterable may draw from when a pass begins (a DataLoader's shuffle and worker seeds)."""
        found = rng.find_generators(self.data)
        return {"torch": torch.get_rng_state(),
                "generators": {path: rng.generator_state(g) for path, g in found.items()}}

    # ----- checks ---------------------------------------------------------------------------------------------
    def _check(self, batch: Batch) -> None:
        empty = _empty_leaf(batch)
        if empty is not None:
            raise BilevelError(
                f"Problem: {self.name} batch {self.draws} holds an empty tensor (shape {tuple(empty.shape)}); every "
                "batch needs at least one example."
            )
        signature = _signature(batch)
        if self._signature is None:
            self._signature = signature
        elif signature != self._signature:
            raise BilevelError(
                f"Problem: {self.name} batch {self.draws} is {_describe(batch)}, but the first batch was "
                f"{_describe_signature(self._signature)}; every batch must have the same structure, dtypes and "
                "shapes (only the leading batch dimension may vary)."
            )

    # ----- position -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands (see the module docstring); raises for a one-shot iterator."""
        state: dict[str, Any] = {"kind": self.kind, "draws": self.draws}
        if self.kind == "iterator":
            raise BilevelError(
                f"checkpoint: {self.name} is a one-shot iterator (e.g. a generator), whose position cannot be saved "
                "or restored; pass a re-iterable (a DataLoader, a list) or a sampler function instead."
            )
        if self.kind == "sampler":
            state["sampler"] = callable_state(self.data)
        elif self.kind == "iterable":
            state["epoch_draws"] = self._epoch_draws if self._iterator is not None else None
            state["epoch_start"] = self._epoch_start
            found = rng.find_generators(self.data)
            state["generators"] = {path: rng.generator_state(g) for path, g in found.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Move to the position ``state`` describes. Changes torch's global generator for an iterable: restore the
        global generators afterwards (the run's checkpoint does)."""
        if state["kind"] != self.kind:
            raise BilevelError(
                f"checkpoint: {self.name} was a {state['kind']} when the checkpoint was written and is a {self.kind} "
                "now; resume with the same kind of data."
            )
        self.draws = state["draws"]
        if self.kind == "sampler":
            load_callable_state(self.data, state["sampler"], f"checkpoint: {self.name}")
        elif self.kind == "iterable":
            self._iterator = None
            if state["epoch_draws"] is not None:
                start = state["epoch_start"]
                torch.set_rng_state(start["torch"])
                _load_generators(rng.find_generators(self.data), start["generators"], f"checkpoint: {self.name}")
                self._new_pass()
                for _ in range(state["epoch_draws"]):
                    next(self._iterator)  # type: ignore[arg-type]
                self._epoch_draws = state["epoch_draws"]
            _load_generators(rng.find_generators(self.data), state["generators"], f"checkpoint: {self.name}")


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

    def restarted(self) -> DataStreams:
        """Fresh streams over the same data that check their batches against this one's first batches (what
        ``solve`` uses after validating on a first batch of each)."""
        fresh = DataStreams(self.inner_stream.data, self.outer_stream.data)
        fresh.inner_stream._signature = self.inner_stream._signature
        fresh.outer_stream._signature = self.outer_stream._signature
        return fresh

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner_stream.state_dict(), "outer": self.outer_stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner_stream.load_state_dict(state["inner"])
        self.outer_stream.load_state_dict(state["outer"])


# ----- batch structure ------------------------------------------------------------------------------------------
def _signature(batch: Any) -> Any:
    """The structure of a batch: containers, and per tensor its dtype, device and shape without the leading dim."""
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):  # e.g. a meta-learning TaskBatch
        return (type(batch).__name__, tuple((f.name, _signature(getattr(batch, f.name)))
                                            for f in dataclasses.fields(batch)))
    if isinstance(batch, Tensor):
        return ("tensor", batch.dtype, batch.device.type, tuple(batch.shape[1:]) if batch.dim() else None)
    if isinstance(batch, Mapping):
        return ("dict", tuple((k, _signature(v)) for k, v in batch.items()))
    if isinstance(batch, (tuple, list)):
        return (type(batch).__name__, tuple(_signature(v) for v in batch))
    return (type(batch).__name__,)


def _describe_signature(sig: Any) -> str:
    kind = sig[0]
    if kind == "tensor":
        _, dtype, device, rest = sig
        shape = "()" if rest is None else "(n, " + ", ".join(map(str, rest)) + ")" if rest else "(n,)"
        return f"tensor {shape} {str(dtype).removeprefix('torch.')} on {device}"
    if kind == "dict":
        return "{" + ", ".join(f"{k!r}: {_describe_signature(v)}" for k, v in sig[1]) + "}"
    if kind in ("tuple", "list"):
        inner = ", ".join(_describe_signature(v) for v in sig[1])
        return f"({inner})" if kind == "tuple" else f"[{inner}]"
    if len(sig) == 2 and isinstance(sig[1], tuple):  # a dataclass
        return f"{kind}(" + ", ".join(f"{k}={_describe_signature(v)}" for k, v in sig[1]) + ")"
    return kind


def _describe(batch: Any) -> str:
    """A batch's structure in words, with the size of its leading dimension."""
    first = _first_tensor(batch)
    lead = f" with leading dimension {first.shape[0]}" if first is not None and first.dim() else ""
    return _describe_signature(_signature(batch)) + lead


def _children(batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return batch.values()
    if isinstance(batch, (tuple, list)):
        return batch
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    return ()


def _find_leaf(batch: Any, found: Callable[[Tensor], bool]) -> Tensor | None:
    """The first tensor of ``batch`` (depth first, in container order) for which ``found`` holds, or None."""
    if isinstance(batch, Tensor):
        return batch if found(batch) else None
    for value in _children(batch):
        leaf = _find_leaf(value, found)
        if leaf is not None:
            return leaf
    return None


def _first_tensor(batch: Any) -> Tensor | None:
    return _find_leaf(batch, lambda t: True)


def _empty_leaf(batch: Any) -> Tensor | None:
    return _find_leaf(batch, lambda t: t.numel() == 0)
