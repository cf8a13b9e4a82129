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

from bilevel.data import BatchStream
from bilevel.errors import BilevelError
from bilevel.functional import ModuleView, split_module
from bilevel.types import Batch, ConstraintFn, LossFn, Params, ProjectionFn

Variables = Tensor | Mapping[str, Tensor] | nn.Module

_LONE = "_"  # key of a lone tensor inside the Params dict


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

    def __post_init__(self) -> None:
        if not callable(self.inner_loss) or not callable(self.outer_loss):
            raise BilevelError("Problem: inner_loss and outer_loss must be callables f(outer, inner, batch) -> scalar.")
        if self.joint_projection is not None and not callable(self.joint_projection):
            raise BilevelError(
                "Problem: joint_projection must be a callable (outer, inner) -> (outer, inner), "
                f"got {type(self.joint_projection).__name__}."
            )
        if self.outer_mode not in ("eval", "train"):
            raise BilevelError(f"Problem: outer_mode must be 'eval' or 'train', got {self.outer_mode!r}.")
        outer, outer_consts, outer_module = _split_variables(self.outer, "outer", need_grad=True)
        inner, inner_consts, inner_module = _split_variables(self.inner, "inner", need_grad=False)
        set_ = object.__setattr__
        set_(self, "outer_init", outer)
        set_(self, "inner_init", inner)
        set_(self, "buffers_init", inner_consts)
        set_(self, "_outer_consts", outer_consts)
        set_(self, "_outer_module", outer_module)
        set_(self, "_inner_module", inner_module)
        # Validate the streams' types now; solve() makes its own streams.
        BatchStream(self.inner_data, "inner_data")
        BatchStream(self.outer_data, "outer_data")
        if self.outer_bounds is not None:
            lo, hi = self.outer_bounds
            if lo is not None and hi is not None and lo > hi:
                raise BilevelError(f"Problem: outer_bounds low {lo} exceeds high {hi}.")

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
        return outer[_LONE] if _LONE in outer else outer

    def inner_view(self, inner: Params, buffers: Params | None, training: bool) -> Any:
        """``inner`` in the form the user gave: tensor, dict or ModuleView."""
        if self._inner_module is not None:
            return ModuleView(self._inner_module, inner, self.buffers_init if buffers is None else buffers, training)
        return inner[_LONE] if _LONE in inner else inner

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
        loss = self.inner_loss(self.outer_view(outer), self.inner_view(inner, fresh, training=True), batch)
        return _as_scalar(loss), {k: v.detach() for k, v in fresh.items()}

    def outer_objective(self, outer: Params, inner: Params, batch: Batch, buffers: Params | None = None) -> Tensor:
        """L_V(λ, w; batch), inner module in ``outer_mode``."""
        training = self.outer_mode == "train"
        buffers = self.buffers_init if buffers is None else buffers
        if training:
            buffers = {k: v.clone() for k, v in buffers.items()}
        return _as_scalar(self.outer_loss(self.outer_view(outer), self.inner_view(inner, buffers, training), batch))

    def constraints(self, outer: Params, inner: Params, buffers: Params | None = None) -> Tensor:
        """g(λ, w) as a 1-D tensor (feasible where ≤ 0)."""
        if self.inner_constraints is None:
            raise BilevelError(
                f"{self.name}: this method needs inner constraints g(outer, inner) <= 0; "
                "pass Problem(inner_constraints=...)."
            )
        g = self.inner_constraints(self.outer_view(outer), self.inner_view(inner, buffers, training=False))
        return g.reshape(-1)

    def project_outer(self, outer: Params) -> Params:
        """Proj onto the outer feasible set (user projection, then the box)."""
        if self.outer_projection is not None:
            projected = self.outer_projection(self.outer_view(outer))
            projected = _as_params(projected)
            _check_same_structure("outer_projection", outer, projected)
            outer = projected
        if self.outer_bounds is not None:
            lo, hi = self.outer_bounds
            outer = {k: v.clamp(min=lo, max=hi) for k, v in outer.items()}
        return outer

    def project_inner(self, inner: Params) -> Params:
        """Proj onto the inner feasible set (identity unless ``inner_projection`` is given)."""
        if self.inner_projection is None:
            return inner
        projected = _as_params(self.inner_projection(self.inner_view(inner, None, training=False)))
        _check_same_structure("inner_projection", inner, projected)
        return projected

    def project_joint(self, outer: Params, inner: Params) -> tuple[Params, Params]:
        """Proj_C(λ, w): ``joint_projection`` when given, else the product of :meth:`project_outer` and
        :meth:`project_inner`."""
        if self.joint_projection is None:
            return self.project_outer(outer), self.project_inner(inner)
        result = self.joint_projection(self.outer_view(outer), self.inner_view(inner, None, training=False))
        if not (isinstance(result, tuple) and len(result) == 2):
            raise BilevelError("Problem: joint_projection must return a pair (outer, inner).")
        new_outer, new_inner = _as_params(result[0]), _as_params(result[1])
        _check_same_structure("joint_projection (outer)", outer, new_outer)
        _check_same_structure("joint_projection (inner)", inner, new_inner)
        return new_outer, new_inner

    def outer_to_user(self, outer: Params) -> Any:
        """A solution in the user's form: a lone tensor or a dict."""
        return outer[_LONE] if _LONE in outer else dict(outer)

    def inner_to_user(self, inner: Params) -> Any:
        return inner[_LONE] if _LONE in inner else dict(inner)

    # ----- validation ---------------------------------------------------------------------------------
    def validate(self, inner_batch: Batch, outer_batch: Batch) -> None:
        """Evaluate both losses once and raise a :class:`BilevelError` naming what is wrong."""
        outer = {k: v.detach().requires_grad_(True) for k, v in self.outer_init.items()}
        inner = {k: v.detach().requires_grad_(True) for k, v in self.inner_init.items()}
        with torch.enable_grad():
            lt = _evaluate("inner_loss", "inner_data", self.inner_objective, outer, inner, inner_batch)
            _evaluate("outer_loss", "outer_data", self.outer_objective, outer, inner, outer_batch)
            if self.check_dependencies:
                grads = torch.autograd.grad(lt, list(outer.values()), allow_unused=True)
                unused = [k for k, g in zip(outer, grads) if g is None]
                if unused:
                    names = ", ".join(repr(k) for k in unused)
                    raise BilevelError(
                        f"Problem: inner_loss does not depend on outer variable(s) {names}, so the inner solution "
                        "cannot respond to them and their hypergradient through the inner problem is zero. "
                        "Use them in inner_loss, move them to the inner variables, or pass check_dependencies=False."
                    )
        if self.inner_constraints is not None:
            g = self.inner_constraints(self.outer_view(outer), self.inner_view(inner, None, training=False))
            if not isinstance(g, Tensor) or g.dim() > 1:
                shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
                raise BilevelError(f"Problem: inner_constraints must return a 1-D tensor g with g <= 0 feasible; got {shape}.")


def _evaluate(name: str, data_name: str, fn: Any, outer: Params, inner: Params, batch: Batch) -> Any:
    try:
        value = fn(outer, inner, batch)
    except (RuntimeError, IndexError, TypeError) as e:
        shapes = _describe(batch)
        raise BilevelError(
            f"Problem: {name} failed on the first batch of {data_name} ({shapes}) with the initial variables "
            f"({_describe(inner)}): {e}. Check that the data's shapes match the variables and the model."
        ) from e
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


def _as_scalar(value: Tensor) -> Tensor:
    """A one-element loss as a 0-d tensor (``validate`` reports anything else)."""
    return value.reshape(()) if isinstance(value, Tensor) and value.dim() > 0 and value.numel() == 1 else value


def _check_scalar(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise BilevelError(f"Problem: {name} must return a torch.Tensor scalar, got {type(value).__name__}.")
    if value.numel() != 1:
        raise BilevelError(
            f"Problem: {name} must return a scalar, got shape {tuple(value.shape)}; reduce it (e.g. .mean() or .sum())."
        )
    if not value.is_floating_point():
        raise BilevelError(f"Problem: {name} must return a floating-point scalar, got {value.dtype}.")
    check_finite(f"Problem: {name}", value)
    return value


def _as_params(x: Any) -> Params:
    if isinstance(x, Tensor):
        return {_LONE: x}
    if isinstance(x, ModuleView):
        return dict(x.params)
    return dict(x)


def _check_same_structure(what: str, before: Params, after: Params) -> None:
    if set(before) != set(after):
        raise BilevelError(f"Problem: {what} changed the variable names from {sorted(before)} to {sorted(after)}.")
    for k in before:
        if after[k].shape != before[k].shape:
            raise BilevelError(
                f"Problem: {what} changed the shape of {k!r} from {tuple(before[k].shape)} to {tuple(after[k].shape)}."
            )


def _split_variables(x: Variables, level: str, *, need_grad: bool) -> tuple[Params, Params, nn.Module | None]:
    """(variables, constants, module) from a tensor, a dict of tensors or a module."""
    if isinstance(x, nn.Module):
        params, buffers = split_module(x)
        trainable = {k for k, p in x.named_parameters() if p.requires_grad}
        frozen = {k: v for k, v in params.items() if k not in trainable}
        variables = {k: v for k, v in params.items() if k in trainable}
        if not variables:
            raise BilevelError(f"Problem: the {level} module has no parameters with requires_grad=True.")
        _check_float(level, variables)
        return variables, {**buffers, **frozen}, x
    if isinstance(x, Tensor):
        variables = {_LONE: x}
    elif isinstance(x, Mapping):
        if not x:
            raise BilevelError(f"Problem: {level} is an empty dict; give at least one tensor.")
        bad = [k for k, v in x.items() if not isinstance(v, Tensor)]
        if bad:
            raise BilevelError(f"Problem: {level} values must be tensors; {bad} are not.")
        variables = dict(x)
    else:
        raise BilevelError(f"Problem: {level} must be a tensor, a dict of tensors or an nn.Module; got {type(x).__name__}.")
    _check_float(level, variables)
    if need_grad:
        no_grad = [k for k, v in variables.items() if not v.requires_grad]
        if no_grad:
            names = "the outer tensor" if no_grad == [_LONE] else f"outer variable(s) {no_grad}"
            raise BilevelError(
                f"Problem: {names} has requires_grad=False, but outer variables are what bilevel differentiates; "
                "create them with requires_grad=True, e.g. torch.zeros(8, requires_grad=True)."
            )
    return {k: v.detach().clone() for k, v in variables.items()}, {}, None


def _check_float(level: str, variables: Params) -> None:
    bad = {k: v.dtype for k, v in variables.items() if not v.is_floating_point()}
    if bad:
        names = ", ".join(f"{'tensor' if k == _LONE else repr(k)} ({d})" for k, d in bad.items())
        raise BilevelError(
            f"Problem: {level} variables must be floating point to be differentiated; got {names}. "
            "Use .float() or .double()."
        )
