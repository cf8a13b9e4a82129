r"""Meta-learning as bilevel optimization: many inner problems (tasks) that share the outer meta-parameters θ.

.. math::
    \min_\theta \frac1M \sum_{i=1}^M L^{\mathrm{query}}_i\big(\theta, \phi_i(\theta)\big),\qquad
    \phi_i(\theta) = \mathrm{Alg}\big(\theta, L^{\mathrm{support}}_i\big),

where Alg adapts θ to task i on its support set: T gradient steps from θ (MAML, Finn, Abbeel & Levine, 2017,
"Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML) or the minimiser of
L_i^support(φ) + (λ/2)‖φ − θ‖² (iMAML, Rajeswaran, Finn, Kakade & Levine, 2019, "Meta-Learning with Implicit
Gradients", NeurIPS).

How a meta-learning problem is a :class:`bilevel.Problem`:

* ``outer`` = θ (an ``nn.Module`` or a dict of tensors); ``inner`` = φ with the same names and shapes (usually the
  same module): every task's φ starts at θ, so ``problem.inner_init`` only fixes the structure.
* ``inner_loss(outer, inner, batch)`` / ``outer_loss(...)`` are the losses of **one task** on its support / query
  set; the meta-solvers map them over tasks with ``torch.func.vmap``.
* ``inner_data`` / ``outer_data`` yield :class:`TaskBatch` es: every tensor carries a leading task dimension,
  support ``(x, y)`` of shape ``(n_tasks, k, ...)`` and the query set of the same tasks. :class:`EpisodeStream`
  pairs the two halves of a sampler's episodes; wrapping the losses in :func:`per_task` makes them accept a whole
  :class:`TaskBatch` too (the mean over tasks at shared parameters), which is what ``Problem.validate`` and other
  methods see.

:func:`meta_problem` builds all of this from a model, a loss ``loss_fn(prediction, target)`` and a task sampler.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import vmap

from bilevel.data import callable_state, load_callable_state
from bilevel.errors import BilevelError
from bilevel.problem import Problem
from bilevel.types import Batch, Params

Episode = tuple[Batch, Batch]
"""(support, query): two task batches of the same tasks, each a tensor / tuple / list / dict of tensors."""


@dataclasses.dataclass(frozen=True)
class TaskBatch:
    """A batch of ``n_tasks`` tasks: ``data`` is a tensor, tuple, list or dict of tensors, each of shape
    ``(n_tasks, ...)`` (e.g. ``(x, y)`` with ``x`` of shape ``(n_tasks, k, *features)``).

    A fixed ``TaskBatch`` can be passed as ``inner_data`` / ``outer_data`` directly: calling it returns itself, so
    the problem's data stream serves the same tasks at every step.
    """

    data: Batch

    def __post_init__(self) -> None:
        if isinstance(self.data, TaskBatch):
            object.__setattr__(self, "data", self.data.data)
        n_tasks(self.data, "TaskBatch")

    @property
    def n_tasks(self) -> int:
        return n_tasks(self.data, "TaskBatch")

    def __call__(self) -> TaskBatch:
        return self

    def task(self, i: int) -> Batch:
        """The data of task ``i`` (the task dimension removed)."""
        return task_slice(self.data, i)


def as_task_data(batch: Any, owner: str, what: str) -> Batch:
    """The raw task-batched data of a :class:`TaskBatch` (or of a plain batch read as one), checked."""
    data = batch.data if isinstance(batch, TaskBatch) else batch
    n_tasks(data, f"{owner}: {what}")
    return data


def n_tasks(data: Batch, owner: str = "meta") -> int:
    """The size of the leading task dimension shared by every tensor in ``data`` (raises if they disagree)."""
    sizes = [t.shape[0] if t.dim() > 0 else None for t in _leaves(data)]
    if not sizes:
        raise BilevelError(
            f"{owner}: a task batch must hold tensors with a leading task dimension, got {type(data).__name__} "
            "without tensors; pass e.g. (x, y) with x of shape (n_tasks, k, ...)."
        )
    if any(s is None for s in sizes):
        raise BilevelError(
            f"{owner}: every tensor of a task batch needs a leading task dimension, but one is 0-d; "
            "stack the tasks along dimension 0."
        )
    if len(set(sizes)) != 1 or sizes[0] == 0:
        raise BilevelError(
            f"{owner}: the tensors of a task batch must share one leading task dimension >= 1, got sizes {sizes}; "
            "stack every task's (x, y) along dimension 0."
        )
    return int(sizes[0])


def task_slice(data: Batch, i: int) -> Batch:
    """Task ``i`` of task-batched ``data`` (tensors indexed at ``i`` along dimension 0; structure kept)."""
    if isinstance(data, Tensor):
        return data[i]
    if isinstance(data, dict):
        return {k: task_slice(v, i) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(task_slice(v, i) for v in data)
    return data


def stack_tasks(outputs: list[Any]) -> Any:
    """Inverse of :func:`task_slice`: stack per-task outputs (tensors, tuples, lists, dicts) along a new dimension 0."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.stack(outputs)
    if isinstance(first, dict):
        return {k: stack_tasks([o[k] for o in outputs]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(stack_tasks([o[j] for o in outputs]) for j in range(len(first)))
    return first


def map_tasks(
    fn: Callable[..., Any], shared: Any, *batched: Batch, vectorize: bool = True, chunk_size: int | None = None
) -> Any:
    r"""``fn(shared, *task_i)`` for every task i, outputs stacked along dimension 0.

    ``vectorize=True`` runs ``torch.func.vmap(fn, in_dims=(None, 0, ...))`` — one batched call, no Python loop over
    tasks (``chunk_size`` tasks at a time when given, to bound memory); ``vectorize=False`` loops over the tasks
    (the reference, and what one would write without ``vmap``). ``fn`` must be a pure function of tensors.
    """
    if vectorize:
        in_dims = (None,) + (0,) * len(batched)
        return vmap(fn, in_dims=in_dims, chunk_size=chunk_size, randomness="different")(shared, *batched)
    count = n_tasks(batched[0])
    return stack_tasks([fn(shared, *(task_slice(b, i) for b in batched)) for i in range(count)])


def per_task(loss: Callable[[Any, Any, Batch], Tensor]) -> Callable[[Any, Any, Batch], Tensor]:
    r"""Wrap a one-task loss ``loss(outer, inner, batch)`` so that it also accepts a :class:`TaskBatch`, returning
    the mean over its tasks at the shared (outer, inner): :math:`\frac1M\sum_i L_i(\theta, \phi)`."""

    @functools.wraps(loss)
    def wrapped(outer: Any, inner: Any, batch: Batch) -> Tensor:
        if isinstance(batch, TaskBatch):
            return vmap(lambda b: loss(outer, inner, b), randomness="different")(batch.data).mean()
        return loss(outer, inner, batch)

    return wrapped


class EpisodeStream:
    """Pairs the halves of sampled episodes: ``Problem(inner_data=s.support, outer_data=s.query)``.

    ``sampler() -> (support, query)`` returns a fresh episode (two task batches of the same tasks). Each episode
    is served once to each side, in either order; a side asking again draws the next episode, so the query a
    solver reads always belongs to the tasks of the support it read last.
    """

    def __init__(self, sampler: Callable[[], Episode]):
        if not callable(sampler):
            raise BilevelError(f"EpisodeStream: sampler must be a callable returning (support, query), got "
                               f"{type(sampler).__name__}.")
        self.sampler = sampler
        self._episode: tuple[TaskBatch, TaskBatch] | None = None
        self._served = {"support": True, "query": True}

    def _draw(self) -> tuple[TaskBatch, TaskBatch]:
        episode = self.sampler()
        if not (isinstance(episode, (tuple, list)) and len(episode) == 2):
            raise BilevelError(
                f"EpisodeStream: the sampler must return (support, query), got {type(episode).__name__}"
                f"{' of length ' + str(len(episode)) if isinstance(episode, (tuple, list)) else ''}."
            )
        support, query = TaskBatch(episode[0]), TaskBatch(episode[1])
        if support.n_tasks != query.n_tasks:
            raise BilevelError(
                f"EpisodeStream: the sampler returned {support.n_tasks} support tasks but {query.n_tasks} query tasks; "
                "both halves must hold the same tasks."
            )
        return support, query

    def _next(self, side: Literal["support", "query"]) -> TaskBatch:
        if self._episode is None or self._served[side]:
            self._episode = self._draw()
            self._served = {"support": False, "query": False}
        self._served[side] = True
        return self._episode[0] if side == "support" else self._episode[1]

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state (see :func:`bilevel.data.callable_state`), the current episode and which halves of it
        were served: what a checkpoint needs to serve the same episodes after a resume."""
        episode = None if self._episode is None else (self._episode[0].data, self._episode[1].data)
        return {"sampler": callable_state(self.sampler), "episode": episode, "served": dict(self._served)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_callable_state(self.sampler, state["sampler"], "checkpoint: EpisodeStream sampler")
        episode = state["episode"]
        self._episode = None if episode is None else (TaskBatch(episode[0]), TaskBatch(episode[1]))
        self._served = dict(state["served"])

    def support(self) -> TaskBatch:
        """The support half of the current episode (drawing a new one when it was served already)."""
        return self._next("support")

    def query(self) -> TaskBatch:
        """The query half of the current episode (drawing a new one when it was served already)."""
        return self._next("query")


def meta_problem(
    model: nn.Module | Params,
    loss_fn: Callable[[Any, Any], Tensor],
    tasks: Callable[[], Episode] | Episode,
    *,
    forward: Callable[[Any, Tensor], Any] | None = None,
    outer_mode: Literal["eval", "train"] = "train",
    name: str = "meta",
) -> Problem:
    r"""A meta-learning :class:`Problem`: θ = ``model``'s parameters, φ = the same parameters adapted per task.

    Per task with support (x_s, y_s) and query (x_q, y_q):
    L_T(θ, φ) = ``loss_fn(f_φ(x_s), y_s)``, L_V(θ, φ) = ``loss_fn(f_φ(x_q), y_q)``, f_φ the model at φ.

    Args:
        model: an ``nn.Module`` (its trainable parameters are θ), or a dict of tensors θ together with ``forward``.
        loss_fn: ``loss_fn(prediction, target) -> scalar`` for one task (e.g. ``F.mse_loss``, ``F.cross_entropy``).
        tasks: a sampler ``() -> (support, query)`` drawing a fresh meta-batch per call, or one fixed
            ``(support, query)`` pair; each half is ``(x, y)`` with a leading task dimension ``(n_tasks, k, ...)``.
        forward: ``forward(params, x) -> prediction`` when ``model`` is a dict (ignored for modules).
        outer_mode: the module's mode on the query set (``"train"``: batch statistics, as MAML does).
    """
    if isinstance(model, nn.Module):
        def predict(params: Any, x: Tensor) -> Any:
            return params(x)
    elif isinstance(model, dict) and callable(forward):
        predict = forward
        model = {k: v.detach().clone().requires_grad_(True) for k, v in model.items()}
    else:
        raise BilevelError(
            "meta_problem: model must be an nn.Module, or a dict of tensors together with forward(params, x); "
            f"got {type(model).__name__}{' without forward' if isinstance(model, dict) else ''}."
        )
    check_no_running_stats("meta_problem", model if isinstance(model, nn.Module) else None)
    if not callable(loss_fn):
        raise BilevelError(f"meta_problem: loss_fn must be a callable loss_fn(prediction, target), got {type(loss_fn).__name__}.")

    @per_task
    def task_loss(outer: Any, inner: Any, batch: Batch) -> Tensor:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise BilevelError(f"meta_problem: each task's data must be (x, y), got {type(batch).__name__}.")
        x, y = batch
        return loss_fn(predict(inner, x), y)

    if callable(tasks) and not isinstance(tasks, (tuple, list)):
        stream = EpisodeStream(tasks)
        inner_data: Any = stream.support
        outer_data: Any = stream.query
    elif isinstance(tasks, (tuple, list)) and len(tasks) == 2:
        support, query = TaskBatch(tasks[0]), TaskBatch(tasks[1])
        if support.n_tasks != query.n_tasks:
            raise BilevelError(
                f"meta_problem: tasks has {support.n_tasks} support tasks but {query.n_tasks} query tasks; "
                "both halves must hold the same tasks."
            )
        inner_data, outer_data = support, query
    else:
        raise BilevelError(
            "meta_problem: tasks must be a sampler () -> (support, query) or one (support, query) pair, "
            f"got {type(tasks).__name__}."
        )
    inner = model if isinstance(model, nn.Module) else {k: v.detach().clone() for k, v in model.items()}
    return Problem(
        outer=model, inner=inner, inner_loss=task_loss, outer_loss=task_loss, inner_data=inner_data,
        outer_data=outer_data, outer_mode=outer_mode, check_dependencies=False, name=name,
    )


def predict(problem: Problem, inner: Params, x: Tensor, *, vectorize: bool = True, training: bool = False) -> Tensor:
    r"""Outputs f_{φ_i}(x_i) of the problem's model for every task: ``inner`` holds per-task parameters with a
    leading task dimension (e.g. from ``MAML.adapt``), ``x`` has shape ``(n_tasks, k, ...)``."""
    if problem.module is None:
        raise BilevelError("predict: the problem's inner variables are tensors, not a module; call your own forward.")

    def one(_: None, params: Params, xi: Tensor) -> Tensor:
        return problem.inner_view(params, None, training=training)(xi)

    with torch.no_grad():
        return map_tasks(one, None, inner, x, vectorize=vectorize)


def check_no_running_stats(owner: str, module: nn.Module | None) -> None:
    """Raise when ``module`` has layers with running statistics (BatchNorm with ``track_running_stats``): they
    would be updated in place by every task, which ``vmap`` over tasks cannot do."""
    if module is None:
        return
    for name, m in module.named_modules():
        if getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None:
            raise BilevelError(
                f"{owner}: layer {name or type(module).__name__!r} ({type(m).__name__}) tracks running statistics, "
                "which cannot be updated per task under vmap; build it with track_running_stats=False "
                "(MAML's transductive batch norm uses batch statistics only)."
            )


def meta_params(solution: Any) -> Params:
    """The meta-parameters θ as a dict from a :class:`bilevel.Result`, a solver state or a dict."""
    for attr in ("outer_params", "outer"):
        value = getattr(solution, attr, None)
        if isinstance(value, dict):
            return value
    if isinstance(solution, dict):
        return solution
    raise BilevelError(
        f"evaluate: pass a bilevel.Result, a solver state or a dict of meta-parameters, got {type(solution).__name__}."
    )


def adaptation_of(solution: Any, solver: Any = None) -> Any:
    """The meta-solver whose ``adapt`` evaluates ``solution``: ``solver`` when given, else the solver of a
    :class:`bilevel.Result`."""
    solver = solver if solver is not None else getattr(solution, "solver", None)
    if solver is None or not callable(getattr(solver, "adapt", None)):
        raise BilevelError(
            "evaluate: say how to adapt to each test task: pass solver=MAML(...) (or IMAML(...)), or a bilevel.Result "
            f"of a meta-learning method; got solver {type(solver).__name__}."
        )
    return solver


def _leaves(data: Any) -> list[Tensor]:
    if isinstance(data, Tensor):
        return [data]
    if isinstance(data, dict):
        return [t for v in data.values() for t in _leaves(v)]
    if isinstance(data, (tuple, list)):
        return [t for v in data for t in _leaves(v)]
    return []
