r"""Run states and checkpoints: everything that decides the rest of a run, saved so it resumes bit-identically.

A :class:`RunState` holds, after ``step`` outer steps, the solver state, the history, the oracle counts, the
elapsed time, every global random generator's state (Python, NumPy, torch CPU and CUDA), each data stream's
position (:meth:`bilevel.data.BatchStream.state_dict`) and the state of callbacks that have one. ``solve(...,
state=result)`` continues from ``result.run_state``; ``solve(..., checkpoint="run.pt")`` writes one to disk every
``checkpoint_every`` steps and at the end, and calling it again resumes from the file.

Files are written atomically (a temporary file beside the target, flushed to disk, then renamed over it), so a
process killed at any moment leaves the previous checkpoint or the new one, never a torn file. They contain only
tensors, numbers, strings, None, lists, tuples and dicts: they load with ``torch.load(weights_only=True)``, and the
solver state's own types (frozen dataclasses and named tuples) are rebuilt only from the types a fresh
``solver.init(problem)`` produces and those bilevel's own (loaded) modules define (dataclasses, named tuples and
classes with ``to_state``/``from_state`` such as :class:`~bilevel.precondition.CurvaturePairs`), never by importing a
name read from the file.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from typing import Any

import torch
from torch import Tensor

from bilevel.errors import BilevelError

FORMAT = "bilevel-checkpoint"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class RunState:
    """Where a run stands after ``step`` outer steps (see the module docstring).

    Attributes:
        method: the registered method name; options: its settings (field values).
        problem: the problem's variables by name, as (shape, dtype) strings, to refuse a state from another problem.
        step: outer steps taken; the next one is numbered ``step``.
        solver_state: the solver's state; history: the per-step records so far; oracle_calls: calls by kind.
        elapsed: seconds spent so far; rng: global generator states; data: the two streams' positions.
        callbacks: ``state_dict()`` of each callback that has one (None for the others).
    """

    method: str
    options: dict[str, Any]
    problem: dict[str, Any]
    step: int
    solver_state: Any
    history: dict[str, list[float]]
    oracle_calls: dict[str, int]
    elapsed: float
    rng: dict[str, Any]
    data: dict[str, Any]
    callbacks: list[Any]


# ----- files ----------------------------------------------------------------------------------------------------
def save(run: RunState, path: str | os.PathLike) -> None:
    """Write ``run`` to ``path`` atomically."""
    payload = {"format": FORMAT, "version": VERSION,
               **{f.name: getattr(run, f.name) for f in dataclasses.fields(run)}}
    payload["solver_state"] = encode(run.solver_state)
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bilevel-checkpoint-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path: str | os.PathLike, template: Any) -> RunState:
    """Read a checkpoint; ``template`` (a fresh ``solver.init(problem)``) names the types its state may hold."""
    try:
        payload = torch.load(os.fspath(path), weights_only=True, map_location=None)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise BilevelError(
            f"checkpoint: cannot read {os.fspath(path)!r} as a bilevel checkpoint ({type(err).__name__}: {err}); "
            "delete it to start afresh or pass another path."
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BilevelError(f"checkpoint: {os.fspath(path)!r} is not a bilevel checkpoint; pass another path.")
    if payload.get("version") != VERSION:
        raise BilevelError(f"checkpoint: {os.fspath(path)!r} has format version {payload.get('version')}, this "
                           f"bilevel reads version {VERSION}; finish the run with the version that wrote it.")
    fields = {f.name for f in dataclasses.fields(RunState)}
    payload["solver_state"] = decode(payload["solver_state"], allowed_types(template))
    return RunState(**{k: v for k, v in payload.items() if k in fields})


# ----- solver states as plain data -------------------------------------------------------------------------------
def encode(x: Any) -> Any:
    """``x`` as tensors, numbers, strings, None, lists and dicts (containers and types tagged)."""
    if x is None or isinstance(x, (bool, int, float, str, Tensor)):
        return x
    if isinstance(x, torch.dtype):
        return {"t": "dtype", "name": str(x).removeprefix("torch.")}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {"t": "dataclass", "type": _name(type(x)),
                "fields": {f.name: encode(getattr(x, f.name)) for f in dataclasses.fields(x)}}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return {"t": "namedtuple", "type": _name(type(x)), "items": [encode(v) for v in x]}
    if callable(getattr(x, "to_state", None)) and callable(getattr(type(x), "from_state", None)):
        return {"t": "object", "type": _name(type(x)), "state": encode(x.to_state())}
    if isinstance(x, (tuple, list)):
        return {"t": type(x).__name__, "items": [encode(v) for v in x]}
    if isinstance(x, dict):
        return {"t": "dict", "items": [[encode(k), encode(v)] for k, v in x.items()]}
    raise BilevelError(
        f"checkpoint: the solver state holds a {type(x).__name__}, which a checkpoint cannot store; a state may hold "
        "tensors, numbers, strings, None, tuples, lists, dicts, dataclasses and named tuples."
    )


def decode(x: Any, types: dict[str, type]) -> Any:
    """Inverse of :func:`encode`, building only the dataclasses and named tuples in ``types``."""
    if not isinstance(x, dict):
        return x
    tag = x.get("t")
    if tag == "dtype":
        return getattr(torch, x["name"])
    if tag in ("tuple", "list"):
        items = [decode(v, types) for v in x["items"]]
        return tuple(items) if tag == "tuple" else items
    if tag == "dict":
        return {decode(k, types): decode(v, types) for k, v in x["items"]}
    if tag in ("dataclass", "namedtuple", "object"):
        cls = types.get(x["type"])
        if cls is None:
            raise BilevelError(
                f"checkpoint: the saved state holds a {x['type']}, which this method's state does not use; the "
                "checkpoint was written by another method or version. Pass another path."
            )
        if tag == "namedtuple":
            return cls(*(decode(v, types) for v in x["items"]))
        if tag == "object":
            return cls.from_state(decode(x["state"], types))
        obj = cls.__new__(cls)
        for name, value in x["fields"].items():
            object.__setattr__(obj, name, decode(value, types))
        return obj
    raise BilevelError(f"checkpoint: unreadable entry {x!r} in the saved state.")


def allowed_types(template: Any) -> dict[str, type]:
    """The dataclass and named-tuple types reachable from ``template``, plus bilevel's own state types."""
    found: dict[str, type] = dict(_bilevel_state_types())

    def visit(x: Any) -> None:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            found[_name(type(x))] = type(x)
            for f in dataclasses.fields(x):
                visit(getattr(x, f.name))
        elif isinstance(x, tuple) and hasattr(x, "_fields"):
            found[_name(type(x))] = type(x)
            for v in x:
                visit(v)
        elif callable(getattr(type(x), "from_state", None)):
            found[_name(type(x))] = type(x)
        elif isinstance(x, (tuple, list)):
            for v in x:
                visit(v)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)

    visit(template)
    return found


def _bilevel_state_types() -> dict[str, type]:
    """Dataclasses, named tuples and ``from_state`` classes defined in bilevel's modules imported so far (looked up
    among loaded modules, never imported by name from a file)."""
    found = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "bilevel" or module_name.startswith("bilevel.")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__ == module_name and (
                    dataclasses.is_dataclass(value) or (issubclass(value, tuple) and hasattr(value, "_fields"))
                    or callable(getattr(value, "from_state", None))):
                found[_name(value)] = value
    return found


def _name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


# ----- what a state must match ------------------------------------------------------------------------------------
def problem_signature(outer: dict[str, Tensor], inner: dict[str, Tensor]) -> dict[str, Any]:
    """The variables' names, shapes and dtypes (what a resumed state must agree with)."""
    def sig(params: dict[str, Tensor]) -> dict[str, str]:
        return {k: f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in params.items()}

    return {"outer": sig(outer), "inner": sig(inner)}


def check_compatible(run: RunState, method: str, options: dict[str, Any], problem: dict[str, Any], where: str) -> None:
    """Refuse a run state written by another method, with other settings, or for another problem."""
    if run.method != method:
        raise BilevelError(
            f"{where}: it was written by method {run.method!r}, and this call asks for {method!r}; resume with "
            f"method={run.method!r} or start a new run (another checkpoint path, or state=None)."
        )
    changed = sorted(k for k in set(options) | set(run.options) if options.get(k) != run.options.get(k))
    if changed:
        diff = ", ".join(f"{k}: {run.options.get(k)!r} -> {options.get(k)!r}" for k in changed)
        raise BilevelError(
            f"{where}: the {method} settings differ from the ones it was written with ({diff}); a resumed run must "
            "use the same settings to continue exactly. Pass the saved settings or start a new run."
        )
    if run.problem != problem:
        raise BilevelError(
            f"{where}: it belongs to a problem with variables {run.problem}, and this problem has {problem}; "
            "resume with the same problem or start a new run."
        )
