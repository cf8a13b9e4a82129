r"""The solver protocol, written down (as optax types its ``init``/``update`` pair).

A method is a frozen dataclass of its settings (:class:`bilevel.options.Options`, validated from the fields'
annotations) registered by name with :func:`bilevel.register`, that implements :class:`Solver`:

* ``init(problem) -> state``: the state at step 0, a frozen dataclass satisfying :class:`SolverState`;
* ``step(problem, state, data) -> (state, metrics)``: one outer step. Batches come from ``data.inner()`` and
  ``data.outer()``; every derivative from :mod:`bilevel.oracles`; the new state is ``dataclasses.replace(state,
  ...)``; ``metrics`` holds at least ``outer_loss`` (L_V at the inner variables the state returns) and
  ``hypergrad_norm`` (the norm of the outer step's direction). Solvers never print.

What a step needs to be replayed exactly — the solver state, each data stream's cursor and every random generator —
is one :class:`bilevel.checkpoint.RunState`, which ``solve()`` keeps and checkpoints; a solver that draws random
numbers draws them from torch's global generator (or one it keeps in its state), so that the run state covers them.

A method that can compute a hypergradient of F at a point also implements :class:`HasHypergradient` (what
:func:`bilevel.hypergradient` and :func:`bilevel.check_hypergradient` call) and says what it differentiates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

from bilevel.types import Params

if TYPE_CHECKING:
    from bilevel.data import DataStreams
    from bilevel.hypergrad import Hypergradient
    from bilevel.problem import Problem


@runtime_checkable
class SolverState(Protocol):
    """What every solver state holds (besides its own fields): λ, w and the inner module's buffers."""

    outer: Params
    inner: Params
    buffers: Params


StateT = TypeVar("StateT", bound=SolverState)


@runtime_checkable
class Solver(Protocol[StateT]):
    """``init`` and ``step`` (see the module docstring)."""

    def init(self, problem: Problem) -> StateT: ...

    def step(self, problem: Problem, state: StateT, data: DataStreams) -> tuple[StateT, dict[str, Any]]: ...


@runtime_checkable
class HasHypergradient(Protocol):
    """A solver with a hypergradient rule at a point; ``differentiates`` names F (see :mod:`bilevel.check`)."""

    differentiates: ClassVar[str | None]

    def hypergradient(self, problem: Problem, outer: Params, inner: Params, data: DataStreams,
                      buffers: Params | None = None) -> Hypergradient: ...
