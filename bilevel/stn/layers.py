r"""Structured best-response layers of Self-Tuning Networks.

MacKay, Vicol, Lorraine, Duvenaud & Grosse, 2019, "Self-Tuning Networks: Bilevel Optimization of Hyperparameters
using Structured Best-Response Functions", ICLR, §4.2: every weight and bias is an affine function of the
hyperparameters, ŵ_φ(λ) = W_e + (Vλ)[:out] ⊙_row W_h and b̂_φ(λ) = b_e + (Vλ)[out:] ⊙ b_h, so a layer computes

.. math::
    y = s\,(W_e x + b_e) + (V f)_{:out} \odot (W_h x) + (V f)_{out:} \odot b_h,

with f the hyperparameter features (``HyperSpace.features``, shape ``(H,)`` or ``(batch, H)``), V ∈ R^{2·out × H}
(no bias, initialised N(0, 0.01²)) and s a fixed scale of the elementary path (1 by default). The cost is two
matrix products instead of one, whatever H is. For a convolution the gates (V f) scale whole output channels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.errors import BilevelError

V_INIT_STD = 0.01


class _StnBase(nn.Module):
    """Parameters shared by the STN layers: elementary and hyper weights/biases and the gate matrix V."""

    def _setup(self, weight_shape: tuple[int, ...], out: int, n_hparams: int, bias: bool, scale: float) -> None:
        owner = type(self).__name__
        if not isinstance(n_hparams, int) or n_hparams < 1:
            raise BilevelError(f"{owner}: n_hparams must be an integer >= 1 (the length H of the features), got {n_hparams!r}.")
        if not math.isfinite(scale):
            raise BilevelError(f"{owner}: scale must be finite, got {scale}.")
        self.n_hparams = n_hparams
        self.scale = float(scale)
        self.out_size = out
        self.elem_weight = nn.Parameter(torch.empty(weight_shape))
        self.hyper_weight = nn.Parameter(torch.empty(weight_shape))
        self.elem_bias = nn.Parameter(torch.empty(out)) if bias else None
        self.hyper_bias = nn.Parameter(torch.empty(out)) if bias else None
        self.gate = nn.Parameter(torch.empty(2 * out if bias else out, n_hparams))  # V (2·out × H; out × H without bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W_e, W_h, b_e, b_h as ``nn.Linear`` / ``nn.Conv2d`` initialise theirs; V ~ N(0, 0.01²)."""
        fan_in = self.elem_weight[0].numel()
        for w in (self.elem_weight, self.hyper_weight):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        for b in (self.elem_bias, self.hyper_bias):
            if b is not None:
                nn.init.uniform_(b, -bound, bound)
        nn.init.normal_(self.gate, 0.0, V_INIT_STD)

    def gates(self, hparams: Tensor, batch: int) -> tuple[Tensor, Tensor | None]:
        """(V f)[:out] and (V f)[out:] (None without bias), each ``(out,)`` or ``(batch, out)``."""
        _check_hparams(type(self).__name__, hparams, self.n_hparams, batch)
        g = hparams @ self.gate.T
        if self.elem_bias is None:
            return g, None
        gw, gb = g.split(self.out_size, dim=-1)
        return gw, gb

    def effective_weight(self, hparams: Tensor) -> Tensor:
        """ŵ(λ) = s·W_e + (V f)[:out] ⊙_row W_h: ``weight.shape`` for ``(H,)`` features, ``(batch, *weight.shape)`` for rows."""
        g, _ = self.gates(hparams, hparams.shape[0] if hparams.dim() == 2 else 1)
        expand = (...,) + (None,) * (self.elem_weight.dim() - 1)
        return self.scale * self.elem_weight + g[expand] * self.hyper_weight

    def effective_bias(self, hparams: Tensor) -> Tensor | None:
        """b̂(λ) = s·b_e + (V f)[out:] ⊙ b_h (None without bias)."""
        _, gb = self.gates(hparams, hparams.shape[0] if hparams.dim() == 2 else 1)
        if gb is None:
            return None
        return self.scale * self.elem_bias + gb * self.hyper_bias

    def weight_sq_norm(self, hparams: Tensor) -> Tensor:
        r"""‖ŵ(λ)‖² of this layer's effective weight (bias excluded), ``()`` or ``(batch,)``; see :func:`weight_sq_norm`."""
        return _sq_norm(self.elem_weight, self.hyper_weight, self.gate, self.scale, self.out_size, hparams)


class StnLinear(_StnBase):
    r"""``nn.Linear`` whose weights are the structured best response to the hyperparameters (see the module doc).

    ``forward(x, hparams)``: ``x`` of shape ``(batch, *, in_features)``, ``hparams`` of shape ``(H,)`` (shared) or
    ``(batch, H)`` (per example). Parameters: ``elem_weight``/``hyper_weight`` (out × in), ``elem_bias``/``hyper_bias``
    (out), ``gate`` (V, 2·out × H). At V = 0 it equals ``nn.Linear`` with weight s·W_e and bias s·b_e.
    """

    def __init__(self, in_features: int, out_features: int, n_hparams: int, *, bias: bool = True, scale: float = 1.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._setup((out_features, in_features), out_features, n_hparams, bias, scale)

    def forward(self, x: Tensor, hparams: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise BilevelError(
                f"StnLinear: input must end in in_features = {self.in_features}; got shape {tuple(x.shape)}."
            )
        batch = x.shape[0] if x.dim() > 1 else 1
        gw, gb = self.gates(hparams, batch)
        if hparams.dim() == 2 and x.dim() > 2:  # (batch, out) gates against (batch, *, out) outputs
            shape = (gw.shape[0],) + (1,) * (x.dim() - 2) + (gw.shape[1],)
            gw = gw.reshape(shape)
            gb = gb.reshape(shape) if gb is not None else None
        out = F.linear(x, self.elem_weight, self.elem_bias)
        if self.scale != 1.0:
            out = self.scale * out
        out = out + gw * F.linear(x, self.hyper_weight)
        if gb is not None:
            out = out + gb * self.hyper_bias
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, n_hparams={self.n_hparams}, "
                f"bias={self.elem_bias is not None}, scale={self.scale}")


class StnConv2d(_StnBase):
    r"""``nn.Conv2d`` with structured best-response weights: the gates (V f) scale whole output channels,

    .. math:: y = s\,(W_e * x + b_e) + (Vf)_{:C} \odot_{ch} (W_h * x) + (Vf)_{C:} \odot_{ch} b_h.

    ``forward(x, hparams)``: ``x`` of shape ``(batch, C_in, H, W)``, ``hparams`` ``(H,)`` or ``(batch, H)``.
    At V = 0 it equals ``nn.Conv2d`` with weight s·W_e and bias s·b_e.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], n_hparams: int, *,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True, scale: float = 1.0):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise BilevelError(
                f"StnConv2d: in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                f"groups ({groups})."
            )
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = k
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self._setup((out_channels, in_channels // groups, *k), out_channels, n_hparams, bias, scale)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor, hparams: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise BilevelError(
                f"StnConv2d: input must have shape (batch, {self.in_channels}, height, width); got {tuple(x.shape)}."
            )
        gw, gb = self.gates(hparams, x.shape[0])
        gw = gw[..., :, None, None]
        out = self._conv(x, self.elem_weight, self.elem_bias)
        if self.scale != 1.0:
            out = self.scale * out
        out = out + gw * self._conv(x, self.hyper_weight, None)
        if gb is not None:
            out = out + gb[..., :, None, None] * self.hyper_bias[:, None, None]
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, n_hparams={self.n_hparams}, bias={self.elem_bias is not None}, scale={self.scale}")


def dropout(x: Tensor, rate: Tensor | float, training: bool) -> Tensor:
    r"""Inverted dropout with a per-example rate: x ⊙ m / (1 − p), m ~ Bernoulli(1 − p) elementwise.

    ``rate`` is a float, a 0-d tensor or a ``(batch,)`` tensor (one rate per example, as the STN perturbation
    gives); identity when ``training`` is False (pass ``self.training`` from the module's forward).
    """
    if not training:
        return x
    rate = torch.as_tensor(rate, dtype=x.dtype, device=x.device)
    if rate.dim() == 1:
        if rate.shape[0] not in (1, x.shape[0]):
            raise BilevelError(
                f"stn.dropout: rate has {rate.shape[0]} entries but the input has batch size {x.shape[0]}."
            )
        rate = rate.reshape((-1,) + (1,) * (x.dim() - 1))
    elif rate.dim() > 1:
        raise BilevelError(f"stn.dropout: rate must be a scalar or a (batch,) tensor, got shape {tuple(rate.shape)}.")
    keep = torch.rand_like(x) >= rate.detach()
    return torch.where(keep, x / (1.0 - rate), torch.zeros((), dtype=x.dtype, device=x.device))


def _check_hparams(owner: str, hparams: Tensor, n_hparams: int, batch: int | None) -> None:
    if not isinstance(hparams, Tensor) or hparams.dim() not in (1, 2) or hparams.shape[-1] != n_hparams:
        shape = tuple(hparams.shape) if isinstance(hparams, Tensor) else type(hparams).__name__
        raise BilevelError(
            f"{owner}: hparams must be a tensor of shape (H,) or (batch, H) with H = n_hparams = {n_hparams}; "
            f"got {shape}. Pass HyperSpace.features(outer)."
        )
    if batch is not None and hparams.dim() == 2 and hparams.shape[0] not in (1, batch):
        raise BilevelError(
            f"{owner}: hparams has {hparams.shape[0]} rows but the input has batch size {batch}; give one row "
            "per example or a single (H,) vector for the whole batch."
        )


def _sq_norm(elem_weight: Tensor, hyper_weight: Tensor, gate: Tensor, scale: float, out: int, hparams: Tensor) -> Tensor:
    g = hparams @ gate.narrow(0, 0, out).T
    we = elem_weight.flatten(1)
    wh = hyper_weight.flatten(1)
    cross = (we * wh).sum(1)
    hh = (wh * wh).sum(1)
    return scale**2 * (we * we).sum() + g @ (2 * scale * cross) + (g * g) @ hh


def weight_sq_norm(net: nn.Module | Any, hparams: Tensor) -> Tensor:
    r"""Σ over the STN layers of ‖ŵ(λ)‖², the squared norm of the effective (best-response) weights, biases excluded:

    .. math::
        \|sW_e + g\odot W_h\|^2 = s^2\|W_e\|^2 + 2s\sum_o g_o\langle W_{e,o}, W_{h,o}\rangle + \sum_o g_o^2\|W_{h,o}\|^2,
        \quad g = (Vf)_{:out},

    computed without forming per-example weights. ``net`` is the :class:`bilevel.functional.ModuleView` a loss receives (or a
    plain module); ``hparams`` the features, ``(H,)`` or ``(batch, H)``; the result is ``()`` or ``(batch,)``. This
    is the weight-decay penalty of a self-tuning model: ``L_T = CE + ½·mean_b(wd_b · weight_sq_norm(net, f)_b)``.
    """
    if isinstance(net, nn.Module):
        module, params = net, dict(net.named_parameters())
    else:
        module, params = getattr(net, "module", None), getattr(net, "params", None)
    if not isinstance(module, nn.Module) or params is None:
        raise BilevelError(
            f"stn.weight_sq_norm: net must be an nn.Module or the ModuleView a loss receives, got {type(net).__name__}."
        )
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, _StnBase)]
    if not layers:
        raise BilevelError("stn.weight_sq_norm: the network has no StnLinear / StnConv2d layers.")
    total = None
    for name, layer in layers:
        prefix = f"{name}." if name else ""
        _check_hparams("stn.weight_sq_norm", hparams, layer.n_hparams, None)
        term = _sq_norm(params[prefix + "elem_weight"], params[prefix + "hyper_weight"], params[prefix + "gate"],
                        layer.scale, layer.out_size, hparams)
        total = term if total is None else total + term
    return total
