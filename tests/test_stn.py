"""Self-Tuning Networks: layers, hyperparameter transforms and the ``stn`` solver (MacKay et al., 2019, ICLR).

Oracles: closed forms (the toy bilevel problem's λ* = 2 and σ* = √(τ/d); ridge's dŵ/dλ = −H⁻¹e^λ w*), independent
computations (plain ``nn.Linear`` / ``nn.Conv2d`` at V = 0, per-example effective weights, plain autograd of the
reparameterised validation objective) and the transforms' own inverses.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel import BilevelError, Problem, solve
from bilevel.data import DataStreams
from bilevel.functional import ModuleView, split_module
from bilevel.problems.ridge import ridge_data, ridge_solution
from bilevel.solvers.stn import STN
from bilevel.stn import HyperParam, HyperSpace, StnConv2d, StnLinear, dropout, weight_sq_norm

D = torch.float64


# ----- (a) toy problem with an exactly linear best response -----------------------------------------------------
def toy_problem(d: int = 5, batch: int = 64, device: str = "cpu") -> tuple[Problem, HyperSpace]:
    """L_T = ½‖w − λ·1‖², L_V = ½‖w − 2·1‖²; w*(λ) = λ·1, so λ* = 2. ŵ is an StnLinear(1, d) at input 1."""
    space = HyperSpace([HyperParam("lam", "identity", 0.0)], device=device)
    net = StnLinear(1, d, space.n_features).to(device)

    def weights(hp, net, x):
        return net(x, space.features(hp).reshape(-1, 1))

    def inner_loss(hp, net, x):
        return 0.5 * ((weights(hp, net, x) - hp["lam"].reshape(-1, 1)) ** 2).sum(-1).mean()

    def outer_loss(hp, net, x):
        return 0.5 * ((weights(hp, net, x) - 2.0) ** 2).sum(-1).mean()

    ones = torch.ones(batch, 1, device=device)
    return Problem(outer=space, inner=net, inner_loss=inner_loss, outer_loss=outer_loss,
                   inner_data=ones, outer_data=ones, name="toy"), space


def test_toy_linear_best_response_reaches_closed_form():
    """λ → 2 (closed form) within 1e-2; σ → √(τ/d) (minimiser of ½dσ² − τ log σ for ŵ = λ·1) within 10%."""
    torch.manual_seed(0)
    d, tau = 5, 0.05
    problem, space = toy_problem(d)
    result = solve(problem, "stn", maxiter=300, seed=0, outer_lr=0.05, inner_lr=0.1, entropy_weight=tau)
    assert abs(float(result.outer["lam"]) - 2.0) < 1e-2
    sigma = result.history.last("scale/lam")
    assert sigma == pytest.approx(math.sqrt(tau / d), rel=0.1)
    # the learned response around λ* is the identity map λ·1 (slope 1, value 2)
    net = result.inner_module().requires_grad_(False)
    f = space.features(result.outer).reshape(1, 1).detach()
    torch.testing.assert_close(net(torch.ones(1, 1), f), torch.full((1, d), 2.0), atol=2e-2, rtol=0)
    slope = net(torch.ones(1, 1), f + 1) - net(torch.ones(1, 1), f)
    torch.testing.assert_close(slope, torch.ones(1, d), atol=0.01, rtol=0)
    # schedules are in the history, one value per step
    for key in ("hp/lam", "scale/lam", "entropy", "inner_loss", "outer_loss", "hypergrad_norm"):
        assert len(result.history[key]) == 300
    assert float(STN().init(problem).sigma["lam"]) == pytest.approx(0.5, rel=1e-6)  # σ₀


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_toy_runs_on_cuda():
    problem, space = toy_problem(device="cuda")
    result = solve(problem, "stn", maxiter=20, seed=0, outer_lr=0.05, inner_lr=0.1)
    assert result.outer["lam"].device.type == "cuda"
    assert result.history.last("hp/lam") > 0.0  # moving towards λ* = 2
    conv = StnConv2d(3, 4, 3, 2).cuda()
    assert conv(torch.ones(2, 3, 5, 5, device="cuda"), torch.ones(2, 2, device="cuda")).shape == (2, 4, 3, 3)


def test_validation_grad_matches_autograd_of_reparameterised_objective():
    """∇_λ, ∇_ρ of L_V(λ + softplus(ρ)ε) − τΣ log softplus(ρ) by the solver's chain rule vs plain autograd."""
    torch.manual_seed(1)
    problem, _ = toy_problem(d=3, batch=7)
    solver = STN(entropy_weight=0.3)
    state = solver.init(problem)
    outer = {"lam": torch.tensor(0.7)}
    scale = {"lam": torch.tensor(-0.4)}
    batch = torch.ones(7, 1)
    eps = {"lam": torch.randn(7)}
    loss, g_outer, g_scale = solver.validation_grad(problem, outer, scale, state.inner, batch, eps, state.buffers)

    lam = outer["lam"].clone().requires_grad_(True)
    rho = scale["lam"].clone().requires_grad_(True)
    sigma = F.softplus(rho)
    value = problem.outer_objective({"lam": lam + sigma * eps["lam"]}, state.inner, batch, state.buffers)
    objective = value - 0.3 * torch.log(sigma)
    ref_lam, ref_rho = torch.autograd.grad(objective, [lam, rho])
    torch.testing.assert_close(loss, value.detach())
    torch.testing.assert_close(g_outer["lam"], ref_lam, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_scale["lam"], ref_rho, rtol=1e-5, atol=1e-7)


def test_history_without_hyperspace_and_per_batch_noise():
    """A plain dict outer is recorded as ``outer/<name>`` (vectors entrywise); per_example=False draws ε of λ's shape."""
    net = StnLinear(1, 2, 2)

    def inner_loss(hp, net, batch):
        return ((net(torch.ones(1, 1), hp["a"]) - hp["a"]) ** 2).sum()

    def outer_loss(hp, net, batch):
        return ((net(torch.ones(1, 1), hp["a"]) - 1.0) ** 2).sum()

    problem = Problem(outer={"a": torch.zeros(2, requires_grad=True)}, inner=net,
                      inner_loss=inner_loss, outer_loss=outer_loss)
    result = solve(problem, "stn", maxiter=3, seed=0, per_example=False)
    assert {"outer/a/0", "outer/a/1", "scale/a/0", "scale/a/1"} <= set(result.history)
    assert STN(per_example=False).noise({"a": torch.zeros(2)}, None)["a"].shape == (2,)


# ----- (b) ridge: the learned response Jacobian ----------------------------------------------------------------
def test_ridge_response_jacobian_matches_closed_form():
    r"""Scalar log-penalty λ: STN's dŵ/dλ at λ₀ vs dw*/dλ = −H⁻¹e^λ w*, H = XᵀX + e^λ I, within 5%.

    ŵ(λ) = StnLinear(1, d) at input 1 (one gate per coordinate), features λ − λ₀, trained with λ fixed (warm-up
    only) on one perturbation per batch, σ = 0.3. The Gaussian-smoothing bias of the fitted slope at σ = 0.3 is
    1.1% here (Gauss–Hermite quadrature of the expected objective), below the tolerance.
    """
    torch.manual_seed(0)
    d, lam0 = 4, 3.0
    (xt, yt), (xv, yv) = ridge_data(n_train=40, n_val=40, dim=d, seed=0, dtype=D)
    n = xt.shape[0]
    space = HyperSpace([HyperParam("log_lam", "identity", lam0)], dtype=D)
    net = StnLinear(1, d, 1).to(D)
    one = torch.ones(1, 1, dtype=D)

    def weights(hp, net):
        return net(one, space.features(hp).reshape(-1, 1))[0]

    def inner_loss(hp, net, batch):
        x, y = batch
        w = weights(hp, net)
        return (0.5 * ((x @ w - y) ** 2).sum() + 0.5 * hp["log_lam"].exp() * (w**2).sum()) / n

    def outer_loss(hp, net, batch):
        x, y = batch
        return 0.5 * ((x @ weights(hp, net) - y) ** 2).sum() / n

    problem = Problem(outer=space, inner=net, inner_loss=inner_loss, outer_loss=outer_loss,
                      inner_data=(xt, yt), outer_data=(xv, yv))
    options = {"warmup_steps": 10**6, "scale_init": 0.3, "per_example": False}
    result = solve(problem, "stn", maxiter=300, seed=0, inner_lr=0.1, **options)
    result = solve(problem, "stn", maxiter=300, state=result.state, inner_lr=0.01, **options)
    assert float(result.outer["log_lam"]) == lam0  # warm-up steps never move λ ...
    assert result.history.last("scale/log_lam") == pytest.approx(0.3)  # ... nor σ

    module = result.inner_module()
    f = torch.zeros(1, 1, dtype=D)
    with torch.no_grad():
        w0 = module(one, f)[0]
        jac = (module(one, f + 1) - module(one, f))[0]  # ŵ is affine in the feature: exact difference
    lam = torch.tensor(lam0, dtype=D)
    w_star = ridge_solution((xt, yt), torch.full((d,), lam0, dtype=D))
    h = xt.T @ xt + lam.exp() * torch.eye(d, dtype=D)
    jac_star = -torch.linalg.solve(h, lam.exp() * w_star)
    assert float((w0 - w_star).norm() / w_star.norm()) < 0.02
    assert float((jac - jac_star).norm() / jac_star.norm()) < 0.05


# ----- (c) transforms ------------------------------------------------------------------------------------------
def test_logit_transform_respects_dropout_bound_and_round_trips():
    p = HyperParam("dropout", "logit", 0.1, high=0.9)
    u = torch.linspace(-40, 40, 201, dtype=D)
    v = p.constrain(u)
    assert float(v.min()) >= 0.0 and float(v.max()) <= 0.9
    assert bool((v[1:] >= v[:-1]).all())
    values = torch.tensor([1e-4, 0.1, 0.5, 0.89], dtype=D)
    torch.testing.assert_close(p.constrain(p.unconstrain(values)), values, rtol=1e-12, atol=0)
    torch.testing.assert_close(p.unconstrain(torch.tensor(0.45, dtype=D)), torch.tensor(0.0, dtype=D))  # midpoint
    bounded = HyperParam("r", "logit", 0.0, low=-1.0, high=3.0)
    torch.testing.assert_close(bounded.constrain(torch.tensor(0.0, dtype=D)), torch.tensor(1.0, dtype=D))


@pytest.mark.parametrize("transform", ["softplus", "exp", "identity"])
def test_scale_transforms_round_trip(transform):
    """v(u⁻¹(v)) = v; softplus against log(1 + eᵘ) and its inverse against log(eᵛ − 1) (independent formulas)."""
    p = HyperParam("wd", transform, 1e-4)
    values = torch.tensor([1e-8, 1e-4, 0.3, 1.0, 40.0], dtype=D)
    torch.testing.assert_close(p.constrain(p.unconstrain(values)), values, rtol=1e-10, atol=0)
    if transform == "softplus":
        u = torch.tensor([-5.0, 0.0, 3.0], dtype=D)
        torch.testing.assert_close(p.constrain(u), torch.log1p(torch.exp(u)))
        v = torch.tensor([0.1, 1.0, 5.0], dtype=D)
        torch.testing.assert_close(p.unconstrain(v), torch.log(torch.exp(v) - 1))


def test_floor_transform_is_integer_valued_with_equal_bins():
    p = HyperParam("cutout", "floor", 4, low=0, high=16)
    u = torch.linspace(-30, 30, 20001, dtype=D)
    v = p.constrain(u)
    assert bool((v == v.round()).all())
    assert bool((v[1:] >= v[:-1]).all())
    assert set(v.unique().tolist()) == set(range(0, 17))
    for k in range(17):  # round trip through the bin midpoint
        assert float(p.constrain(p.unconstrain(float(k)))) == k
    # each integer owns an equal share of sigmoid(u) ∈ (0, 1): bin edges at logit(k / 17)
    edges = torch.logit(torch.arange(1, 17, dtype=D) / 17)
    torch.testing.assert_close(p.constrain(edges + 1e-9), torch.arange(1, 17, dtype=D))
    torch.testing.assert_close(p.constrain(edges - 1e-9), torch.arange(0, 16, dtype=D))
    with pytest.raises(BilevelError, match="integers"):
        p.unconstrain(2.5)


def test_hyperspace_maps_and_problem_integration():
    space = HyperSpace([HyperParam("drop", "logit", 0.2, high=0.9), HyperParam("wd", "softplus", 1e-3),
                        HyperParam("cut", "floor", 3, low=0, high=8)], dtype=D)
    assert list(space) == ["drop", "wd", "cut"] and space.n_features == 3
    assert all(v.requires_grad for v in space.values())
    init = {k: v.detach() for k, v in space.items()}
    torch.testing.assert_close(space.features(init), torch.zeros(3, dtype=D))
    values = space.constrained(init)
    assert values["drop"].item() == pytest.approx(0.2) and values["wd"].item() == pytest.approx(1e-3)
    assert values["cut"].item() == 3
    batched = {k: v + torch.arange(4, dtype=D) for k, v in init.items()}
    assert space.features(batched).shape == (4, 3)
    torch.testing.assert_close(space.features(batched)[:, 1], torch.arange(4, dtype=D))
    back = space.unconstrained({"drop": 0.2, "wd": 1e-3, "cut": 3})
    for k in init:
        torch.testing.assert_close(back[k], init[k])
    # a HyperSpace is a valid outer for Problem (a mapping of leaf tensors with requires_grad)
    problem = Problem(outer=space, inner=StnLinear(2, 1, 3), inner_loss=lambda o, n, b: n(b, space.features(o)).sum(),
                      outer_loss=lambda o, n, b: n(b, space.features(o)).sum(), inner_data=torch.ones(3, 2),
                      outer_data=torch.ones(3, 2))
    assert set(problem.outer_init) == {"drop", "wd", "cut"}


# ----- (d) layers --------------------------------------------------------------------------------------------
def _zero_gate(layer: nn.Module) -> None:
    with torch.no_grad():
        layer.gate.zero_()


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_stn_linear_at_zero_gate_is_a_scaled_linear(scale):
    torch.manual_seed(0)
    layer = StnLinear(6, 4, 3, scale=scale).to(D)
    _zero_gate(layer)
    plain = nn.Linear(6, 4).to(D)
    with torch.no_grad():
        plain.weight.copy_(scale * layer.elem_weight)
        plain.bias.copy_(scale * layer.elem_bias)
    x = torch.randn(5, 6, dtype=D)
    for hp in (torch.randn(3, dtype=D), torch.randn(5, 3, dtype=D)):
        torch.testing.assert_close(layer(x, hp), plain(x), rtol=1e-12, atol=1e-12)


def test_stn_linear_shapes_and_per_example_effective_weights():
    torch.manual_seed(0)
    layer = StnLinear(6, 4, 3, scale=1.5).to(D)
    with torch.no_grad():
        layer.gate.normal_()  # non-trivial gates
    x = torch.randn(5, 6, dtype=D)
    hp = torch.randn(5, 3, dtype=D)
    out = layer(x, hp)
    assert out.shape == (5, 4)
    assert layer(x, hp[0]).shape == (5, 4)
    assert layer(torch.randn(5, 7, 6, dtype=D), hp).shape == (5, 7, 4)
    assert layer.gate.shape == (8, 3)
    weights, biases = layer.effective_weight(hp), layer.effective_bias(hp)
    assert weights.shape == (5, 4, 6) and biases.shape == (5, 4)
    expected = torch.einsum("boi,bi->bo", weights, x) + biases
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    seq = torch.randn(5, 7, 6, dtype=D)
    torch.testing.assert_close(layer(seq, hp), torch.einsum("boi,bti->bto", weights, seq) + biases[:, None],
                               rtol=1e-12, atol=1e-12)


def test_gate_initialisation_scale():
    torch.manual_seed(0)
    layer = StnLinear(10, 500, 4)
    assert layer.gate.shape == (1000, 4)
    gate = layer.gate.detach()
    assert float(gate.std()) == pytest.approx(0.01, rel=0.05)  # N(0, 0.01²): 4000 draws, std of std ≈ 1.1%
    assert float(gate.mean().abs()) < 1e-3  # 6 standard errors
    assert StnLinear(10, 5, 4, bias=False).gate.shape == (5, 4)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_stn_conv2d_at_zero_gate_is_a_scaled_conv(scale):
    torch.manual_seed(0)
    layer = StnConv2d(3, 5, 3, 2, stride=2, padding=1, scale=scale).to(D)
    _zero_gate(layer)
    plain = nn.Conv2d(3, 5, 3, stride=2, padding=1).to(D)
    with torch.no_grad():
        plain.weight.copy_(scale * layer.elem_weight)
        plain.bias.copy_(scale * layer.elem_bias)
    x = torch.randn(4, 3, 9, 9, dtype=D)
    out = layer(x, torch.randn(4, 2, dtype=D))
    assert out.shape == (4, 5, 5, 5)
    torch.testing.assert_close(out, plain(x), rtol=1e-12, atol=1e-12)


def test_stn_conv2d_gates_channels():
    """Each example's output equals a conv with its own effective weights s·W_e + g ⊙_ch W_h (and bias)."""
    torch.manual_seed(0)
    layer = StnConv2d(3, 5, 3, 2, padding=1, scale=1.3).to(D)
    with torch.no_grad():
        layer.gate.normal_()
    x = torch.randn(4, 3, 6, 6, dtype=D)
    hp = torch.randn(4, 2, dtype=D)
    out = layer(x, hp)
    weights, biases = layer.effective_weight(hp), layer.effective_bias(hp)
    assert weights.shape == (4, 5, 3, 3, 3)
    for b in range(4):
        ref = F.conv2d(x[b : b + 1], weights[b], biases[b], padding=1)
        torch.testing.assert_close(out[b : b + 1], ref, rtol=1e-12, atol=1e-12)
    assert layer(x, hp[0]).shape == (4, 5, 6, 6)


def test_weight_sq_norm_matches_effective_weights():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = StnConv2d(2, 3, 3, 2, scale=0.7)
            self.fc = StnLinear(12, 4, 2, bias=False)

    net = Net().to(D)
    with torch.no_grad():
        for layer in (net.conv, net.fc):
            layer.gate.normal_()
    hp = torch.randn(6, 2, dtype=D)
    expected = sum((layer.effective_weight(hp) ** 2).flatten(1).sum(1) for layer in (net.conv, net.fc))
    torch.testing.assert_close(weight_sq_norm(net, hp), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight_sq_norm(net, hp[0]), expected[0], rtol=1e-12, atol=1e-12)
    params, buffers = split_module(net)
    view = ModuleView(net, params, buffers, training=True)  # what a loss receives
    torch.testing.assert_close(weight_sq_norm(view, hp), expected, rtol=1e-12, atol=1e-12)


def test_dropout_per_example_rates():
    torch.manual_seed(0)
    x = torch.ones(3, 20000, dtype=D)
    rate = torch.tensor([0.0, 0.3, 0.8], dtype=D)
    assert dropout(x, rate, training=False) is x
    out = dropout(x, rate, training=True)
    torch.testing.assert_close(out[0], x[0])
    for b, p in enumerate(rate.tolist()):
        zeros = float((out[b] == 0).to(D).mean())
        assert abs(zeros - p) < 5 * math.sqrt(p * (1 - p) / 20000) + 1e-12  # binomial, 5 standard deviations
        kept = out[b][out[b] != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))
    assert dropout(torch.ones(2, 3, 4), 0.5, training=True).shape == (2, 3, 4)


# ----- (e) bad input ---------------------------------------------------------------------------------------
def test_layer_errors():
    layer = StnLinear(4, 3, 2)
    with pytest.raises(BilevelError, match=r"StnLinear: hparams must be a tensor of shape \(H,\) or \(batch, H\)"):
        layer(torch.ones(5, 4), torch.ones(5, 3))
    with pytest.raises(BilevelError, match="3 rows but the input has batch size 5"):
        layer(torch.ones(5, 4), torch.ones(3, 2))
    with pytest.raises(BilevelError, match="in_features = 4"):
        layer(torch.ones(5, 6), torch.ones(2))
    with pytest.raises(BilevelError, match="n_hparams must be an integer >= 1"):
        StnLinear(4, 3, 0)
    conv = StnConv2d(3, 4, 3, 2)
    with pytest.raises(BilevelError, match=r"StnConv2d: input must have shape \(batch, 3, height, width\)"):
        conv(torch.ones(2, 2, 5, 5), torch.ones(2))
    with pytest.raises(BilevelError, match="divisible by groups"):
        StnConv2d(3, 4, 3, 2, groups=2)
    with pytest.raises(BilevelError, match="no StnLinear / StnConv2d layers"):
        weight_sq_norm(nn.Linear(2, 2), torch.ones(2))
    with pytest.raises(BilevelError, match=r"stn.dropout: rate has 3 entries"):
        dropout(torch.ones(2, 4), torch.full((3,), 0.1), training=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "p", "transform": "sigmoid", "init": 0.1}, "transform must be one of"),
    ({"name": "p", "transform": "logit", "init": 0.95, "high": 0.9}, r"strictly inside \(low, high\)"),
    ({"name": "p", "transform": "softplus", "init": 0.0}, "is positive"),
    ({"name": "p", "transform": "floor", "init": 2}, "needs its integer range"),
    ({"name": "p", "transform": "floor", "init": 2.5, "low": 0, "high": 4}, "takes integers"),
    ({"name": "p", "transform": "floor", "init": 7, "low": 0, "high": 4}, "outside the integer range"),
    ({"name": "p", "transform": "softplus", "init": 1.0, "high": 2.0}, "apply to 'logit' and 'floor' only"),
    ({"name": "p", "transform": "logit", "init": 0.5, "low": 1.0, "high": 1.0}, "low must be below high"),
    ({"name": "", "transform": "identity", "init": 0.0}, "non-empty string"),
])
def test_hyperparam_errors(kwargs, match):
    with pytest.raises(BilevelError, match=match):
        HyperParam(**kwargs)


def test_hyperspace_errors():
    with pytest.raises(BilevelError, match="names must be unique"):
        HyperSpace([HyperParam("a", "identity", 0.0), HyperParam("a", "exp", 1.0)])
    with pytest.raises(BilevelError, match="at least one"):
        HyperSpace([])
    space = HyperSpace([HyperParam("a", "identity", 0.0)])
    with pytest.raises(BilevelError, match=r"HyperSpace.features: got names \['b'\], expected \['a'\]"):
        space.features({"b": torch.zeros(())})
    with pytest.raises(BilevelError, match="hyperparameters are scalars"):
        space.constrained({"a": torch.zeros(2, 2)})
    with pytest.raises(BilevelError, match="outside the range"):
        HyperParam("p", "logit", 0.1, high=0.9).unconstrain(0.95)


@pytest.mark.parametrize("kwargs, match", [
    ({"train_steps": 0}, "train_steps=0 is not valid; expected an integer >= 1"),
    ({"val_steps": -1}, "val_steps=-1 is not valid"),
    ({"scale_init": 0.0}, "scale_init=0.0 is not valid"),
    ({"entropy_weight": -1.0}, "entropy_weight=-1.0 is not valid; expected a finite number >= 0"),
    ({"inner_optimizer": "lbfgs"}, "inner_optimizer='lbfgs' is not valid; expected one of 'sgd'"),
    ({"inner_momentum": 1.0}, r"inner_momentum=1.0 is not valid; expected a finite number >= 0 and < 1"),
    ({"inner_optimizer": "adam", "inner_momentum": 0.9}, "inner_momentum=0.9 applies to inner_optimizer='sgd' only"),
])
def test_solver_setting_errors(kwargs, match):
    with pytest.raises(BilevelError, match=f"stn: {match}"):
        STN(**kwargs)


def test_solver_problem_errors():
    tensor_inner = Problem(outer=torch.zeros(1, requires_grad=True), inner=torch.zeros(2),
                           inner_loss=lambda o, w, b: ((w - o) ** 2).sum(), outer_loss=lambda o, w, b: (w**2).sum())
    with pytest.raises(BilevelError, match="STN: the inner variables must be an nn.Module"):
        solve(tensor_inner, "stn", maxiter=1)
    problem, _ = toy_problem()
    no_batch = Problem(outer=problem.outer, inner=problem.module, inner_loss=problem.inner_loss,
                       outer_loss=problem.outer_loss, inner_data=None, outer_data=None, check_dependencies=False)
    solver = STN()
    with pytest.raises(BilevelError, match="Pass per_example=False"):
        solver.step(no_batch, solver.init(no_batch), DataStreams(None, None))
    assert "stn" in bilevel.available_methods()
