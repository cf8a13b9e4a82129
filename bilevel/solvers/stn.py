r"""Self-Tuning Networks: alternating best-response and hyperparameter steps.

MacKay, Vicol, Lorraine, Duvenaud & Grosse, 2019, "Self-Tuning Networks: Bilevel Optimization of Hyperparameters
using Structured Best-Response Functions", ICLR (Algorithm 1). The inner module is a best-response network
ŵ_φ(λ) (built from :class:`bilevel.stn.StnLinear` / :class:`bilevel.stn.StnConv2d`); the outer variables are
unconstrained hyperparameters λ (usually a :class:`bilevel.stn.HyperSpace`); σ = softplus(ρ) is a learned
perturbation scale per hyperparameter. One outer step:

1. ``train_steps`` times, on a training batch: λ̃_b = λ + σ ⊙ ε_b, ε_b ~ N(0, I) per example b (or once per batch),
   and φ ← Φ(φ, ∇_φ L_T(λ̃, ŵ_φ(λ̃))). L_T is never differentiated with respect to λ, so dropout rates,
   augmentation strengths and discrete hyperparameters (``floor`` transform) can be tuned.
2. ``val_steps`` times, on a validation batch (inner module in ``problem.outer_mode``, ``"eval"`` by default):

   .. math::
       (\lambda, \rho) \leftarrow \mathrm{Adam}\Big(\nabla_{\lambda,\rho}\big[L_V(\tilde\lambda, \hat w_\phi(\tilde\lambda))
       - \tau\, \mathcal{H}[\mathcal{N}(0, \sigma^2)]\big]\Big), \quad \tilde\lambda = \lambda + \sigma\odot\varepsilon,\quad
       \mathcal{H} = \textstyle\sum_i \log\sigma_i + \tfrac{n}{2}\log 2\pi e.

   With g̃_b = ∂L_V/∂λ̃_b (one ``grad_outer`` call at the perturbed point), the reparameterisation gives
   ∇_λ = Σ_b g̃_b and ∇_ρ = sigmoid(ρ) ⊙ (Σ_b g̃_b ⊙ ε_b − τ/σ). The entropy term keeps σ from collapsing,
   so φ keeps learning the best response in a neighbourhood of λ. Where L_V uses a hyperparameter directly (not
   only through ŵ_φ), that path is differentiated too; a discrete one (``floor``) contributes zero there (the
   paper's REINFORCE estimator for that case is not implemented).

The first ``warmup_steps`` outer steps do step 1 only (λ and σ fixed). Defaults follow the paper: T_train/T_val = 2/1,
SGD 0.01 with momentum 0.9 for φ, Adam 3e-3 for (λ, ρ), σ₀ = 0.5, τ = 10⁻³.

Writing the problem: ``outer`` = the unconstrained hyperparameters (a ``HyperSpace``, or any dict/tensor);
``inner`` = the STN module; both losses get ``(outer, net, batch)`` where ``outer[name]`` has shape ``(batch,)``
(per-example perturbation, ``per_example=True``) or the variable's own shape, and ``net`` is a
:class:`bilevel.functional.ModuleView` called with the extra features argument::

    space = HyperSpace([HyperParam("dropout", "logit", 0.1, high=0.9), HyperParam("wd", "softplus", 1e-4)])

    def inner_loss(hp, net, batch):                 # hp[name]: (batch,) perturbed unconstrained values
        x, y = batch
        h, f = space.constrained(hp), space.features(hp)
        logits = net(x, f, h["dropout"])            # the model applies stn.dropout(h, rate, self.training)
        return F.cross_entropy(logits, y) + 0.5 * (h["wd"] * stn.weight_sq_norm(net, f)).mean()

    def outer_loss(hp, net, batch):                 # eval mode: dropout off, λ acts through ŵ_φ(λ) only
        x, y = batch
        return F.cross_entropy(net(x, space.features(hp), None), y)

    result = solve(Problem(outer=space, inner=model, inner_loss=inner_loss, outer_loss=outer_loss,
                           inner_data=train_sampler, outer_data=val_sampler), method="stn", maxiter=5000)
    space.constrained(result.outer)                 # the final hyperparameters

The history holds the schedules: ``hp/<name>`` (constrained value at λ; ``outer/<name>`` without a HyperSpace)
and ``scale/<name>`` (σ) per step, besides ``outer_loss`` (L_V at the unperturbed λ and ŵ_φ(λ) on the step's last
validation batch, as every method reports it), ``perturbed_outer_loss`` (the mean L_V at the perturbed λ̃ the
hyperparameter steps descended), ``inner_loss``, ``entropy``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel import oracles, tree
from bilevel.data import DataStreams
from bilevel.errors import BilevelError
from bilevel.optim import Optimizer, make_optimizer
from bilevel.options import (
    Momentum,
    NonNegativeFloat,
    NonNegativeInt,
    OptimizerName,
    Options,
    PositiveFloat,
    PositiveInt,
    owner_name,
)
from bilevel.problem import Problem
from bilevel.registry import register
from bilevel.solvers.common import check_momentum_applies, inner_step, make_inner_optimizer, outer_update
from bilevel.stn.space import HyperSpace
from bilevel.types import Batch, Params


@dataclasses.dataclass(frozen=True)
class StnState:
    """State of the STN solver.

    Attributes:
        outer: unconstrained hyperparameters λ.
        inner: best-response parameters φ (all parameters of the STN module); buffers: its buffers.
        scale: unconstrained perturbation scale ρ (same names and shapes as ``outer``); σ = softplus(ρ).
        inner_opt / outer_opt / scale_opt: optimizer states of φ, λ and ρ.
        n_steps: outer steps taken (warm-up included).
    """

    outer: Params
    inner: Params
    buffers: Params
    scale: Params
    inner_opt: Any
    outer_opt: Any
    scale_opt: Any
    n_steps: int = 0

    @property
    def sigma(self) -> Params:
        """σ = softplus(ρ), the perturbation scale per hyperparameter."""
        return {k: F.softplus(v) for k, v in self.scale.items()}


@register("stn")
@dataclasses.dataclass(frozen=True)
class STN(Options):
    r"""Self-Tuning Networks (MacKay et al., 2019): see the module docstring for the update rules.

    Args:
        train_steps: T_train, perturbed training steps of φ per outer step.
        val_steps: T_val, hyperparameter steps of (λ, ρ) per outer step.
        warmup_steps: first outer steps that train φ only.
        inner_lr / inner_optimizer / inner_momentum: the optimizer of φ (SGD 0.01 with momentum 0.9; None: 0.9 for
            SGD, none for the adaptive optimizers, which keep their own moments).
        outer_lr / outer_optimizer: the optimizer of λ and ρ (Adam 3e-3).
        scale_init: σ₀, the initial perturbation scale (in unconstrained units).
        entropy_weight: τ, weight of the perturbation entropy in the validation objective.
        tune_scale: learn σ (else it stays at ``scale_init``).
        per_example: one perturbation per example (the batch size is the leading dimension of the batch's first
            tensor) or one per batch (needed when batches are not tensors with a batch dimension).
    """

    no_hypergradient: ClassVar[str] = (
        "stn differentiates its learned best-response network ŵ_φ(λ), an approximation whose error depends on "
        "training, not a hypergradient of F at a point"
    )

    train_steps: PositiveInt = 2
    val_steps: PositiveInt = 1
    warmup_steps: NonNegativeInt = 0
    inner_lr: PositiveFloat = 0.01
    inner_optimizer: OptimizerName = "sgd"
    inner_momentum: Momentum | None = None
    outer_lr: PositiveFloat = 3e-3
    outer_optimizer: OptimizerName = "adam"
    scale_init: PositiveFloat = 0.5
    entropy_weight: NonNegativeFloat = 1e-3
    tune_scale: bool = True
    per_example: bool = True

    def check(self) -> None:
        if self.inner_momentum is not None:
            check_momentum_applies(owner_name(self), self.inner_optimizer, self.inner_momentum)

    # ----- pieces -------------------------------------------------------------------------------------------
    def _inner_opt(self) -> Optimizer:
        momentum = self.inner_momentum
        if momentum is None:  # the paper's heavy ball 0.9 for SGD; the adaptive optimizers keep their own moments
            momentum = 0.9 if self.inner_optimizer == "sgd" else 0.0
        return make_inner_optimizer(self.inner_optimizer, self.inner_lr, momentum)

    def _outer_opt(self) -> Optimizer:
        return make_optimizer(self.outer_optimizer, self.outer_lr)

    def noise(self, outer: Params, batch: Batch) -> Params:
        """ε ~ N(0, I) of shape ``(batch, *λ.shape)`` per variable (per example) or ``λ.shape`` (per batch)."""
        lead = (_batch_size(batch),) if self.per_example else ()
        return {k: torch.randn(lead + tuple(v.shape), dtype=v.dtype, device=v.device) for k, v in outer.items()}

    def validation_grad(
        self, problem: Problem, outer: Params, scale: Params, inner: Params, batch: Batch, eps: Params,
        buffers: Params | None = None,
    ) -> tuple[Tensor, Params, Params]:
        r"""(L_V(λ̃), ∇_λ J, ∇_ρ J) for J = L_V(λ̃, ŵ_φ(λ̃)) − τ·Σ log σ, λ̃ = λ + σ ⊙ ε, σ = softplus(ρ), at fixed ε.

        One ``grad_outer`` call gives g̃ = ∂L_V/∂λ̃ (per example when ε has a batch dimension); the
        reparameterisation then gives ∇_λ J = Σ_b g̃_b and ∇_ρ J = sigmoid(ρ) ⊙ (Σ_b g̃_b ⊙ ε_b − τ/σ).
        """
        sigma = {k: F.softplus(v) for k, v in scale.items()}
        tilde = {k: outer[k] + sigma[k] * eps[k] for k in outer}
        loss, g_tilde, _ = oracles.grad_outer(problem, tilde, inner, batch, buffers)
        batched = {k: eps[k].dim() > outer[k].dim() for k in outer}
        g_outer = {k: g.sum(0) if batched[k] else g for k, g in g_tilde.items()}
        g_scale = {}
        for k in scale:
            g_eps = g_tilde[k] * eps[k]
            g_eps = g_eps.sum(0) if batched[k] else g_eps
            g_scale[k] = torch.sigmoid(scale[k]) * (g_eps - self.entropy_weight / sigma[k])
        return loss, g_outer, g_scale

    # ----- protocol -----------------------------------------------------------------------------------------
    def init(self, problem: Problem) -> StnState:
        if problem.module is None:
            raise BilevelError(
                "STN: the inner variables must be an nn.Module (the best-response network built from StnLinear / "
                "StnConv2d layers that take the hyperparameter features as an extra input)."
            )
        outer = problem.project_outer(tree.clone(problem.outer_init))
        rho0 = self.scale_init + math.log(-math.expm1(-self.scale_init))  # softplus⁻¹(σ₀)
        scale = {k: torch.full_like(v, rho0) for k, v in outer.items()}
        inner = tree.clone(problem.inner_init)
        return StnState(outer, inner, tree.clone(problem.buffers_init), scale,
                        self._inner_opt().init(inner), self._outer_opt().init(outer), self._outer_opt().init(scale))

    def step(self, problem: Problem, state: StnState, data: DataStreams) -> tuple[StnState, dict[str, Any]]:
        outer, inner, buffers, scale = state.outer, state.inner, state.buffers, state.scale
        inner_opt, inner_state = self._inner_opt(), state.inner_opt
        sigma = state.sigma
        inner_loss = None
        for _ in range(self.train_steps):  # best-response steps at perturbed, detached λ̃
            batch = data.inner()
            eps = self.noise(outer, batch)
            tilde = {k: outer[k] + sigma[k] * eps[k] for k in outer}
            inner, buffers, inner_state, inner_loss = inner_step(
                problem, tree.detach(tilde), inner, buffers, inner_opt, inner_state, batch)

        outer_opt, outer_state, scale_state = self._outer_opt(), state.outer_opt, state.scale_opt
        metrics: dict[str, Any] = {"inner_loss": inner_loss}
        if state.n_steps < self.warmup_steps:
            with torch.no_grad():
                metrics["outer_loss"] = problem.outer_objective(outer, inner, data.outer(), buffers)
            metrics["hypergrad_norm"] = 0.0
        else:
            outer_losses = []
            for _ in range(self.val_steps):  # hyperparameter steps through the best response at λ̃
                batch = data.outer()
                eps = self.noise(outer, batch)
                loss, g_outer, g_scale = self.validation_grad(problem, outer, scale, inner, batch, eps, buffers)
                outer, outer_state = outer_update(problem, outer, g_outer, outer_opt, outer_state)
                if self.tune_scale:
                    scale, scale_state = outer_opt.update(scale, g_scale, scale_state)
                    scale = tree.detach(scale)
                    sigma = {k: F.softplus(v) for k, v in scale.items()}
                outer_losses.append(loss)
            metrics["perturbed_outer_loss"] = torch.stack(outer_losses).mean()
            with torch.no_grad():  # L_V at the returned λ and ŵ_φ(λ) (unperturbed: what every method reports)
                at = {k: outer[k] + torch.zeros_like(eps[k]) for k in outer}  # the per-example shape, no noise
                metrics["outer_loss"] = problem.outer_objective(at, inner, batch, buffers)
            metrics["hypergrad_norm"] = tree.norm(g_outer)
        metrics["entropy"] = sum(
            float(torch.log(s).sum()) + 0.5 * s.numel() * math.log(2 * math.pi * math.e) for s in sigma.values())
        space = problem.outer if isinstance(problem.outer, HyperSpace) else None
        values = space.constrained(outer) if space is not None else outer
        metrics.update(_named_scalars("hp" if space is not None else "outer", values))
        metrics.update(_named_scalars("scale", sigma))
        new_state = dataclasses.replace(state, outer=outer, inner=inner, buffers=buffers, scale=scale, inner_opt=inner_state,
                                        outer_opt=outer_state, scale_opt=scale_state, n_steps=state.n_steps + 1)
        return new_state, metrics


def _batch_size(batch: Batch) -> int:
    """Leading dimension of the first tensor in ``batch`` (a tensor, a tuple/list, or a dict)."""
    first = batch
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
    elif isinstance(batch, Mapping) and batch:
        first = next(iter(batch.values()))
    if not isinstance(first, Tensor) or first.dim() == 0:
        kind = type(first).__name__ if not isinstance(first, Tensor) else "a 0-d tensor"
        raise BilevelError(
            f"STN: per_example=True draws one perturbation per example, so a batch must be a tensor, a tuple/list or a "
            f"dict whose first entry is a tensor with a batch dimension; got {kind}. Pass per_example=False to "
            "perturb the hyperparameters once per batch."
        )
    return int(first.shape[0])


def _named_scalars(prefix: str, values: Params) -> dict[str, Tensor]:
    """{``prefix/name``: value} for scalars, {``prefix/name/i``: value_i} for the entries of vectors."""
    out: dict[str, Tensor] = {}
    for k, v in values.items():
        name = k
        v = v.detach()
        if v.numel() == 1:
            out[f"{prefix}/{name}"] = v.reshape(())
        else:
            for i, x in enumerate(v.reshape(-1)):
                out[f"{prefix}/{name}/{i}"] = x
    return out
