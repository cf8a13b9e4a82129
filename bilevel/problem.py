r"""The ``Problem`` type: what to optimize, validated once, exposed as pure functions of dicts of tensors.

.. math::
    \min_{\lambda} F(\lambda) = L_V(\lambda, w^*(\lambda)) \quad\text{s.t.}\quad
    w^*(\lambda) \in \arg\min_{w} \{ L_T(\lambda, w) : g(\lambda, w) \le 0 \}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bilevel import projections, tree
from bilevel.data import BatchStream
from bilevel.errors import BilevelError
from bilevel.functional import ModuleView, in_transform, split_module
from bilevel.options import check_value
from bilevel.types import Batch, ConstraintFn, LossFn, Params, ProjectionFn

Variables = Tensor | Mapping[str, Tensor] | nn.Module

OPTIONAL_INPUTS = ("inner_constraints", "joint_projection", "inner_projection", "inner_solver")
"""Problem inputs only some methods honour (each solver lists its own in ``problem_inputs``)."""

LONE_KEY = "value"
"""The name a lone tensor (``outer=tensor`` or ``inner=tensor``) gets inside bilevel's dicts of tensors."""


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    r"""A bilevel problem.

    Args:
        outer: the outer variables λ: a tensor (``requires_grad=True``), a dict of such tensors, or an
            ``nn.Module`` whose trainable parameters are the outer variables (e.g. a meta-learned initialisation).
        inner: the inner variables w: a tensor, a dict of tensors or an ``nn.Module`` (its trainable parameters;
            buffers such as BatchNorm running statistics are carried along and updated once per training step).
        inner_loss: ``L_T(outer, inner, batch) -> scalar``. ``outer`` and ``inner`` arrive in the form given
            here: a tensor, a dict, or a :class:`ModuleView` (call it like the module; index it for parameters).
        outer_loss: ``L_V(outer, inner, batch) -> scalar``, evaluated with the inner module in ``outer_mode``.
        inner_data / outer_data: a full batch (tensor, tuple, list or dict), a callable returning a batch,
            or an iterable of batches (a ``DataLoader``), cycled forever.
        inner_constraints: ``g(outer, inner) -> Tensor[m]``, feasible where ``g <= 0`` (used by ``lvhba``).
        outer_projection / inner_projection: ``Proj(params) -> params`` applied after each update.
        joint_projection: ``Proj_C(outer, inner) -> (outer, inner)`` onto a set C that couples both levels
            (e.g. {(λ, w) : 1ᵀλ + 1ᵀw = 0}); used by methods that update (λ, w) together (``lvhba``) in place
            of the two separate projections, so it must project onto all of C. See :mod:`bilevel.projections`.
        outer_bounds: ``(low, high)`` box for every outer variable (either may be None); composed after
            ``outer_projection``.
        outer_mode: mode of the inner module in ``outer_loss``: ``"eval"`` (running statistics) or ``"train"``.
        check_dependencies: raise when an outer variable does not enter ``inner_loss``.
        inner_solver: ``solver(outer, inner, batch) -> inner``, the user's own solver of the inner problem on one
            batch, started at the current ``inner`` (any code: a loop, ``torch.optim.LBFGS``, a closed form), returning
            the inner variables in their form (a tensor, a dict; for a module a dict of its parameters). The implicit
            methods (``ift``, ``cg``, ``minres``, ``exact``) then call it instead of their own inner steps and
            differentiate its output by the implicit function theorem on ∇_w L_T = 0 — what
            :func:`bilevel.implicit.custom_root` does with :func:`bilevel.optimality.stationarity`.
    """

    outer: Variables
    inner: Variables
    inner_loss: LossFn
    outer_loss: LossFn
    inner_data: Any = None
    outer_data: Any = None
    inner_constraints: ConstraintFn | None = None
    outer_projection: ProjectionFn | None = None
    inner_projection: ProjectionFn | None = None
    outer_bounds: tuple[float | None, float | None] | None = None
    outer_mode: Literal["eval", "train"] = "eval"
    check_dependencies: bool = True
    name: str = "problem"
    joint_projection: Callable[[Any, Any], tuple[Any, Any]] | None = None
    inner_solver: Callable[[Any, Any, Any], Any] | None = None

    def __post_init__(self) -> None:
        for name in ("inner_loss", "outer_loss"):
            if not callable(getattr(self, name)):
                raise BilevelError(f"Problem: {name} must be a callable f(outer, inner, batch) -> scalar tensor, "
                                   f"got {type(getattr(self, name)).__name__}.")
        for name, form in (("inner_constraints", "g(outer, inner) -> 1-D tensor"),
                           ("outer_projection", "proj(outer) -> outer"), ("inner_projection", "proj(inner) -> inner"),
                           ("joint_projection", "proj(outer, inner) -> (outer, inner)"),
                           ("inner_solver", "solver(outer, inner, batch) -> inner")):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise BilevelError(f"Problem: {name} must be None or a callable {form}, got {type(value).__name__}.")
        check_value("Problem", "outer_mode", self.outer_mode, Literal["eval", "train"], "eval")
        check_value("Problem", "check_dependencies", self.check_dependencies, bool, True)
        check_value("Problem", "name", self.name, str, "problem")
        outer, outer_consts, outer_module = _split_variables(self.outer, "outer", need_grad=True)
        inner, inner_consts, inner_module = _split_variables(self.inner, "inner", need_grad=False)
        set_ = object.__setattr__
        set_(self, "outer_init", outer)
        set_(self, "inner_init", inner)
        set_(self, "buffers_init", inner_consts)
        set_(self, "_outer_consts", outer_consts)
        set_(self, "_outer_module", outer_module)
        set_(self, "_inner_module", inner_module)
        set_(self, "_outer_lone", isinstance(self.outer, Tensor))
        set_(self, "_inner_lone", isinstance(self.inner, Tensor))
        # Validate the streams' types now; solve() makes its own streams.
        BatchStream(self.inner_data, "inner_data")
        BatchStream(self.outer_data, "outer_data")
        projections.check_bounds(self.outer_bounds)

    # The attributes set in __post_init__, declared for type checkers.
    outer_init: Params = dataclasses.field(init=False, repr=False)
    inner_init: Params = dataclasses.field(init=False, repr=False)
    buffers_init: Params = dataclasses.field(init=False, repr=False)

    @property
    def module(self) -> nn.Module | None:
        """The inner ``nn.Module`` (or None when the inner variables are tensors)."""
        return self._inner_module

    @property
    def has_constraints(self) -> bool:
        return self.inner_constraints is not None

    # ----- views handed to the user's functions -------------------------------------------------------
    def outer_view(self, outer: Params) -> Any:
        """``outer`` in the form the user gave: tensor, dict or ModuleView."""
        if self._outer_module is not None:
            return ModuleView(self._outer_module, outer, self._outer_consts, training=True)
        return outer[LONE_KEY] if self._outer_lone else outer

    def inner_view(self, inner: Params, buffers: Params | None, training: bool) -> Any:
        """``inner`` in the form the user gave: tensor, dict or ModuleView."""
        if self._inner_module is not None:
            return ModuleView(self._inner_module, inner, self.buffers_init if buffers is None else buffers, training)
        return inner[LONE_KEY] if self._inner_lone else inner

    # ----- pure objectives (what the oracles differentiate) ------------------------------------------
    def inner_objective(self, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None) -> Tensor:
        """L_T(λ, w; batch), inner module in train mode; running statistics are updated on a throw-away copy."""
        return self.inner_objective_and_buffers(outer, inner, batch, buffers)[0]

    def inner_objective_and_buffers(
        self, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None
    ) -> tuple[Tensor, Params]:
        """(L_T(λ, w; batch), buffers after the forward pass) — the training step keeps the updated statistics."""
        buffers = self.buffers_init if buffers is None else buffers
        fresh = {k: v.clone() for k, v in buffers.items()}
        loss = _call("inner_loss", self.inner_loss, self.outer_view(outer), self.inner_view(inner, fresh, training=True),
                     batch)
        return _loss_value("inner_loss", loss), {k: v.detach() for k, v in fresh.items()}

    def outer_objective(self, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None) -> Tensor:
        """L_V(λ, w; batch), inner module in ``outer_mode``."""
        training = self.outer_mode == "train"
        buffers = self.buffers_init if buffers is None else buffers
        if training:
            buffers = {k: v.clone() for k, v in buffers.items()}
        loss = _call("outer_loss", self.outer_loss, self.outer_view(outer), self.inner_view(inner, buffers, training),
                     batch)
        return _loss_value("outer_loss", loss)

    def constraints(self, outer: Params, inner: Params, buffers: Params | None = None) -> Tensor:
        """g(λ, w) as a 1-D tensor (feasible where ≤ 0)."""
        if self.inner_constraints is None:
            raise BilevelError(
                f"{self.name}: this method needs inner constraints g(outer, inner) <= 0; "
                "pass Problem(inner_constraints=...)."
            )
        g = _call("inner_constraints", self.inner_constraints, self.outer_view(outer),
                  self.inner_view(inner, buffers, training=False))
        if not isinstance(g, Tensor) or g.dim() > 1 or not g.is_floating_point():
            got = f"a {g.dim()}-d {g.dtype} tensor of shape {tuple(g.shape)}" if isinstance(g, Tensor) else type(g).__name__
            raise BilevelError(f"Problem: inner_constraints must return a 1-D floating-point tensor g (feasible where "
                               f"g <= 0), got {got}; stack the constraints with torch.stack([...]).")
        if not in_transform():  # concrete values (constraint_vjp checks its own): NaN/inf here would poison μ
            check_finite("Problem: inner_constraints", g.detach())
        count = self.__dict__.setdefault("_n_constraints", g.numel())  # fixed by the first evaluation
        if g.numel() != count:
            raise BilevelError(f"Problem: inner_constraints returned {g.numel()} values, but {count} the first time; the "
                               "number of constraints must stay fixed.")
        return g.reshape(-1)

    def project_outer(self, outer: Params) -> Params:
        """Proj onto the outer feasible set (user projection, then the box)."""
        if self.outer_projection is not None:
            projected = _as_params(_call("outer_projection", self.outer_projection, self.outer_view(outer)),
                                   self._outer_lone, "outer_projection")
            _check_same_structure("outer_projection", outer, projected)
            _check_finite_projection("outer_projection", projected, self._outer_lone)
            outer = projected
        return projections.clamp(outer, self.outer_bounds)

    def project_inner(self, inner: Params) -> Params:
        """Proj onto the inner feasible set (identity unless ``inner_projection`` is given)."""
        if self.inner_projection is None:
            return inner
        projected = _as_params(_call("inner_projection", self.inner_projection, self.inner_view(inner, None, training=False)),
                               self._inner_lone, "inner_projection")
        _check_same_structure("inner_projection", inner, projected)
        _check_finite_projection("inner_projection", projected, self._inner_lone)
        return projected

    def run_inner_solver(self, outer: Params, inner: Params, batch: Batch) -> Params:
        """w from the user's ``inner_solver`` on ``batch``, started at ``inner`` (no graph; checked: the form and
        shapes of the inner variables, finite)."""
        with torch.no_grad():
            value = _call("inner_solver", self.inner_solver, self.outer_view(tree.detach(outer)),
                          self.inner_to_user(tree.clone(inner)), batch)
        params = _user_params(value, self._inner_lone, self.inner_init, "inner", "Problem: inner_solver")
        bad = tree.nonfinite_keys(params)
        if bad:
            raise BilevelError(f"Problem: inner_solver returned NaN/inf ({bad}); it must return a solution.")
        return params

    def project_joint(self, outer: Params, inner: Params) -> tuple[Params, Params]:
        """Proj_C(λ, w): ``joint_projection`` when given, else the product of :meth:`project_outer` and
        :meth:`project_inner`."""
        if self.joint_projection is None:
            return self.project_outer(outer), self.project_inner(inner)
        result = _call("joint_projection", self.joint_projection, self.outer_view(outer),
                       self.inner_view(inner, None, training=False))
        if not (isinstance(result, tuple) and len(result) == 2):
            raise BilevelError(f"Problem: joint_projection must return a pair (outer, inner), got {type(result).__name__}.")
        new_outer = _as_params(result[0], self._outer_lone, "joint_projection (outer)")
        new_inner = _as_params(result[1], self._inner_lone, "joint_projection (inner)")
        _check_finite_projection("joint_projection", {**new_outer, **{f"inner.{k}": v for k, v in new_inner.items()}})
        _check_same_structure("joint_projection (outer)", outer, new_outer)
        _check_same_structure("joint_projection (inner)", inner, new_inner)
        return new_outer, new_inner

    def outer_params(self, value: Any) -> Params:
        """``value`` in the form of ``outer`` (a tensor, a dict of tensors or a module) as a detached dict of tensors,
        checked against the problem's outer variables (names, shapes, dtypes, devices)."""
        return _user_params(value, self._outer_lone, self.outer_init, "outer")

    def inner_params(self, value: Any) -> Params:
        """``value`` in the form of ``inner`` as a detached dict of tensors, checked like :meth:`outer_params`."""
        return _user_params(value, self._inner_lone, self.inner_init, "inner")

    def outer_to_user(self, outer: Params) -> Any:
        """A solution in the user's form: a lone tensor or a dict."""
        return outer[LONE_KEY] if self._outer_lone else dict(outer)

    def inner_to_user(self, inner: Params) -> Any:
        """The inner variables in the user's form: a lone tensor or a dict (a module's parameters by name)."""
        return inner[LONE_KEY] if self._inner_lone else dict(inner)

    # ----- validation ---------------------------------------------------------------------------------
    def validate(self, inner_batch: Batch, outer_batch: Batch) -> None:
        """Evaluate both losses once and raise a :class:`BilevelError` naming what is wrong."""
        outer = {k: v.detach().requires_grad_(True) for k, v in self.outer_init.items()}
        inner = {k: v.detach().requires_grad_(True) for k, v in self.inner_init.items()}
        with torch.enable_grad():
            _evaluate("inner_loss", "inner_data", self.inner_objective, outer, inner, inner_batch)
            _evaluate("outer_loss", "outer_data", self.outer_objective, outer, inner, outer_batch)
            if self.check_dependencies:
                from bilevel.oracles import unused_outer  # the oracle layer builds on this module

                unused = unused_outer(lambda lam, w: self.inner_objective(lam, w, inner_batch), outer, inner)
                if unused:
                    names = ", ".join(repr(k) for k in unused)
                    raise BilevelError(
                        f"Problem: inner_loss does not depend on outer variable(s) {names}, so the inner solution "
                        "cannot respond to them and their hypergradient through the inner problem is zero. "
                        "Use them in inner_loss, move them to the inner variables, or pass check_dependencies=False."
                    )
        if self.inner_constraints is not None:
            self.constraints(outer, inner)  # a 1-D floating-point tensor, whose length the later calls must keep


def _evaluate(name: str, data_name: str, fn: Any, outer: Params, inner: Params, batch: Batch) -> Any:
    try:
        value = fn(outer, inner, batch)
    except BilevelError as e:
        cause = e.__cause__
        if cause is None or isinstance(cause, BilevelError):  # bilevel's own finding: already says what to do
            raise
        raise BilevelError(  # the user's function failed: say on what
            f"Problem: {name} failed on the first batch of {data_name} ({_describe(batch)}) with the initial variables "
            f"({_describe(inner)}): {type(cause).__name__}: {cause}. Check that the data's shapes match the variables "
            "and the model."
        ) from cause
    return _check_scalar(name, value)


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"tensor {tuple(x.shape)}"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in x) + ")"
    return type(x).__name__


def check_finite(what: str, value: Tensor, step: int | None = None) -> None:
    """Raise a :class:`BilevelError` if ``value`` holds NaN or inf (one host sync)."""
    if not bool(torch.isfinite(value).all()):
        where = f" at step {step}" if step is not None else ""
        raise BilevelError(
            f"{what} is not finite{where} (value {value.detach().flatten()[:4].tolist()}); "
            "lower the step sizes, check the data for NaN/inf, or bound the outer variables with outer_bounds."
        )


def _call(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` for one of the user's functions: an exception it raises comes out as a :class:`BilevelError`
    that names the function (the original chained), wherever in a method it was called."""
    try:
        return fn(*args)
    except BilevelError:
        raise
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: any failure gets its name attached
        raise BilevelError(f"Problem: {name} raised {type(e).__name__}: {e}") from e


def _check_finite_projection(name: str, params: Params, lone: bool = False) -> None:
    """A projection's output must be finite (one host sync; skipped inside torch.func transforms, where values are
    abstract)."""
    if in_transform():
        return
    bad = tree.nonfinite_keys(params)
    if bad:
        where = "" if lone else f" (in {', '.join(map(repr, bad))})"
        raise BilevelError(f"Problem: {name} returned NaN/inf{where}; a projection must map finite variables to finite "
                           "ones.")


def _loss_value(name: str, value: Any) -> Tensor:
    """A user's loss as a 0-d floating-point tensor, or a :class:`BilevelError` saying what it returned instead
    (checked at every evaluation: a loss that changes its output later is caught where it happens)."""
    if not isinstance(value, Tensor):
        raise BilevelError(
            f"Problem: {name} must return a torch.Tensor scalar, got {type(value).__name__}"
            f"{' ' + _describe(value) if isinstance(value, (tuple, list, dict)) else ''}; return e.g. loss.mean() "
            "(not loss.item(), a tuple or None)."
        )
    if value.numel() != 1:
        raise BilevelError(
            f"Problem: {name} must return a scalar, got shape {tuple(value.shape)}; reduce it (e.g. .mean() or .sum())."
        )
    if not value.is_floating_point():
        raise BilevelError(f"Problem: {name} must return a floating-point scalar, got {value.dtype}.")
    return value.reshape(()) if value.dim() > 0 else value


def _check_scalar(name: str, value: Any) -> Tensor:
    value = _loss_value(name, value)
    check_finite(f"Problem: {name}", value)
    return value


def _as_params(x: Any, lone: bool, what: str) -> Params:
    """What a projection returned, as a dict of tensors (it must return the form it was given)."""
    if lone and isinstance(x, Tensor):
        return {LONE_KEY: x}
    if isinstance(x, ModuleView):
        return dict(x.params)
    if not lone and isinstance(x, Mapping) and all(isinstance(v, Tensor) for v in x.values()):
        return dict(x)
    expected = "a tensor" if lone else "a dict of tensors"
    raise BilevelError(f"Problem: {what} must return {expected} (the form it was given), got {_describe(x)}.")


def _user_params(value: Any, lone: bool, like: Params, level: str, what: str | None = None) -> Params:
    """``value`` (the form of the ``level`` variables) as a dict checked against ``like``; errors start with
    ``what`` (default: the level)."""
    what = what or level
    if isinstance(value, nn.Module):
        value = {k: v for k, v in value.named_parameters() if k in like}
    params = _as_params(value, lone, what)
    if set(params) != set(like):
        raise BilevelError(f"{what}: expected the problem's {level} variables {sorted(like)}, got {sorted(params)}.")
    for k, v in params.items():
        if _signature(v) != _signature(like[k]):
            name = f"the {level} tensor" if lone else repr(k)
            raise BilevelError(f"{what}: {name} is {_signature(v)}, but the problem's is {_signature(like[k])}.")
    return {k: v.detach() for k, v in params.items()}


def _check_same_structure(what: str, before: Params, after: Params) -> None:
    if set(before) != set(after):
        raise BilevelError(f"Problem: {what} changed the variable names from {sorted(before)} to {sorted(after)}; "
                           "it must return the same names.")
    for k in before:
        name = "the tensor" if k == LONE_KEY and len(before) == 1 else repr(k)
        if after[k].shape != before[k].shape or after[k].dtype != before[k].dtype or after[k].device != before[k].device:
            raise BilevelError(
                f"Problem: {what} changed {name} from {_signature(before[k])} to {_signature(after[k])}; a "
                "projection must keep shapes, dtypes and devices."
            )


def _signature(t: Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def _split_variables(x: Variables, level: str, *, need_grad: bool) -> tuple[Params, Params, nn.Module | None]:
    """(variables, constants, module) from a tensor, a dict of tensors or a module."""
    if isinstance(x, nn.Module):
        params, buffers = split_module(x)
        trainable = {k for k, p in x.named_parameters() if p.requires_grad}
        frozen = {k: v for k, v in params.items() if k not in trainable}
        variables = {k: v for k, v in params.items() if k in trainable}
        if not variables:
            raise BilevelError(f"Problem: the {level} module has no parameters with requires_grad=True.")
        _check_float(level, variables, lone=False)
        return variables, {**buffers, **frozen}, x
    if isinstance(x, Tensor):
        variables = {LONE_KEY: x}
    elif isinstance(x, Mapping):
        if not x:
            raise BilevelError(f"Problem: {level} is an empty dict; give at least one tensor.")
        bad = [k for k, v in x.items() if not isinstance(v, Tensor)]
        if bad:
            raise BilevelError(f"Problem: {level} values must be tensors; {bad} are not.")
        variables = dict(x)
    else:
        raise BilevelError(f"Problem: {level} must be a tensor, a dict of tensors or an nn.Module; got {type(x).__name__}.")
    _check_float(level, variables, lone=isinstance(x, Tensor))
    if need_grad:
        no_grad = [k for k, v in variables.items() if not v.requires_grad]
        if no_grad:
            names = "the outer tensor" if isinstance(x, Tensor) else f"outer variable(s) {no_grad}"
            raise BilevelError(
                f"Problem: {names} has requires_grad=False, but outer variables are what bilevel differentiates; "
                "create them with requires_grad=True, e.g. torch.zeros(8, requires_grad=True)."
            )
    return {k: v.detach().clone() for k, v in variables.items()}, {}, None


def _check_float(level: str, variables: Params, *, lone: bool) -> None:
    bad = {k: v.dtype for k, v in variables.items() if not v.is_floating_point()}
    if bad:
        names = ", ".join(f"{'tensor' if lone else repr(k)} ({d})" for k, d in bad.items())
        raise BilevelError(
            f"Problem: {level} variables must be floating point to be differentiated; got {names}. "
            "Use .float() or .double()."
        )
