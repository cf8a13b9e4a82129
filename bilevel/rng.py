r"""Random-number generator states, captured and restored exactly (what a bit-identical resume needs).

Two kinds of generator hold the randomness of a run:

* the global ones — Python's ``random``, NumPy's legacy ``np.random``, torch's CPU generator and, when CUDA is in
  use, every CUDA device's: :func:`global_state` / :func:`set_global_state`;
* generators a data sampler keeps for itself (a ``torch.Generator``, ``np.random.Generator``,
  ``np.random.RandomState`` or ``random.Random``), found by :func:`find_generators` among the sampler's
  attributes, its closure cells and, for a bound method, its object's attributes.

States are converted to tensors, numbers, strings, tuples, lists and dicts only, so a checkpoint holding them loads
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

GeneratorLike = torch.Generator | np.random.Generator | np.random.RandomState | random.Random
_GENERATOR_TYPES = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def global_state() -> dict[str, Any]:
    """The states of the global generators (CUDA's only when CUDA has been initialised)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _legacy_numpy_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_state(state: dict[str, Any]) -> None:
    """Restore what :func:`global_state` captured."""
    random.setstate(_as_tuple(state["python"]))
    np.random.set_state(_numpy_legacy_tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_generators(obj: Any, *, depth: int = 2) -> dict[str, GeneratorLike]:
    """Generators reachable from ``obj`` by name: ``obj`` itself, its attributes, its closure cells and (bound
    methods) its ``__self__``, ``depth`` levels deep. Paths such as ``"_gen"`` or ``"__self__.sampler._gen"``."""
    found: dict[str, GeneratorLike] = {}
    seen: set[int] = set()

    def visit(x: Any, path: str, level: int) -> None:
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, _GENERATOR_TYPES):
            found[path or "."] = x
            return
        if level > depth or isinstance(x, (torch.Tensor, np.ndarray, str, bytes, int, float, type)):
            return
        prefix = f"{path}." if path else ""
        owner = getattr(x, "__self__", None)
        if owner is not None and not isinstance(owner, type):
            visit(owner, f"{prefix}__self__", level + 1)
        for i, cell in enumerate(getattr(x, "__closure__", None) or ()):
            try:
                visit(cell.cell_contents, f"{prefix}<closure {i}>", level + 1)
            except ValueError:  # an empty cell
                continue
        attributes = getattr(x, "__dict__", None)
        if isinstance(attributes, dict) and not callable(getattr(x, "state_dict", None)):
            for name, value in attributes.items():
                if not name.startswith("__"):
                    visit(value, f"{prefix}{name}", level + 1)

    visit(obj, "", 0)
    return found


def generator_state(g: GeneratorLike) -> Any:
    """A serialisable copy of ``g``'s state."""
    if isinstance(g, torch.Generator):
        return g.get_state()
    if isinstance(g, np.random.Generator):
        return g.bit_generator.state
    if isinstance(g, np.random.RandomState):
        return _legacy_numpy_state(g.get_state())
    return g.getstate()


def set_generator_state(g: GeneratorLike, state: Any) -> None:
    """Put ``g`` back in ``state`` (from :func:`generator_state`)."""
    if isinstance(g, torch.Generator):
        g.set_state(state)
    elif isinstance(g, np.random.Generator):
        g.bit_generator.state = state
    elif isinstance(g, np.random.RandomState):
        g.set_state(_numpy_legacy_tuple(state))
    else:
        g.setstate(_as_tuple(state))


def _legacy_numpy_state(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_legacy_tuple(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])


def _as_tuple(x: Any) -> Any:
    """Python's ``random`` state with its nested lists turned back into tuples."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
