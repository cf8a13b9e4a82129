r"""The problems of the hypergradient benchmarks, each at one point (λ, w) in the forms every contender needs
(:class:`Case`): the per-weight ridge at its exact w*(λ) with the closed-form reference, and the MLP / multinomial
logistic regression classifiers after full-batch Adam steps, with an optional MINRES reference."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel
from bilevel import oracles, tree
from bilevel.hypergrad import implicit_hypergrad
from bilevel.linsolve import minres, power_iteration
from bilevel.problem import LONE_KEY
from bilevel.problems.ridge import ridge_data, ridge_hypergrad, ridge_problem, ridge_solution

Params = dict[str, Tensor]


@dataclasses.dataclass
class Case:
    """One benchmark problem at one point (λ, w), in the forms each contender needs."""

    name: str
    label: str  # row label: sizes
    module: nn.Module  # template module; its parameters hold w (peers copy it)
    names: list[str]  # parameter names, the canonical order of every flattened hypergradient
    lam: Params  # λ, one tensor per parameter, same names
    w: Params  # the inner point w
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    data_loss: Callable[[Tensor, Tensor], Tensor]  # (prediction, target) -> scalar
    problem: bilevel.Problem
    bl_key: dict[str, str]  # name -> key in bilevel's Params (ridge uses a lone tensor, key LONE_KEY)
    alpha: float = 0.0  # Neumann / unrolled step size (1/L)
    reference: Tensor | None = None  # accurate hypergradient, flat, float64
    reference_note: str = ""
    cache_tag: str = ""  # names the trained point on disk (MLP)

    @property
    def device(self) -> torch.device:
        return next(iter(self.w.values())).device

    def bl_outer(self) -> Params:
        return {self.bl_key[k]: self.lam[k] for k in self.names}

    def bl_inner(self) -> Params:
        return {self.bl_key[k]: self.w[k] for k in self.names}

    def flat_bl(self, hg: Params) -> Tensor:
        return torch.cat([hg[self.bl_key[k]].reshape(-1) for k in self.names])

    def reg(self, lam: list[Tensor], params: list[Tensor]) -> Tensor:
        """½ Σ_j e^{λ_j} w_j²."""
        return 0.5 * sum((lj.exp() * p.pow(2)).sum() for lj, p in zip(lam, params))

    def inner_loss_fn(self, lam: Params, w: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        """L_T(λ, w) through ``functional_call`` on the template module (TorchOpt, plain autograd)."""
        x, y = batch
        pred = torch.func.functional_call(self.module, w, (x,))
        return self.data_loss(pred, y) + self.reg([lam[k] for k in self.names], [w[k] for k in self.names])

    def outer_loss_fn(self, w: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return self.data_loss(torch.func.functional_call(self.module, w, (x,)), y)

    def copy_module(self) -> nn.Module:
        """A fresh module holding w (for higher and Betty)."""
        m = _clone_module(self.module)
        with torch.no_grad():
            for k, p in m.named_parameters():
                p.copy_(self.w[k])
        return m


def _clone_module(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


class RidgeModule(nn.Module):
    """x ↦ X w (the ridge predictor as a module, for the module-based peers)."""

    def __init__(self, w: Tensor):
        super().__init__()
        self.w = nn.Parameter(w.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w


def half_sq(pred: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (pred - y).pow(2).sum()


def make_ridge_case(dim: int, *, dtype: torch.dtype, device: torch.device, seed: int) -> Case:
    """Per-weight ridge, d = ``dim``, n_train = n_val = 2d, rows scaled by 1/√n (H's spectrum ≈ [0.2, 3]),
    λ_j = log 0.1 + 0.5 N(0, 1), w = w*(λ) exactly; reference = closed form (float64)."""
    n = 2 * dim
    (xt, yt), (xv, yv) = ridge_data(n, n, dim, seed=seed, dtype=torch.float64)
    s = 1.0 / math.sqrt(n)
    train64, val64 = (xt * s, yt * s), (xv * s, yv * s)
    gen = torch.Generator().manual_seed(seed + 1)
    lam64 = math.log(0.1) + 0.5 * torch.randn(dim, generator=gen, dtype=torch.float64)
    w64 = ridge_solution(train64, lam64)
    reference = ridge_hypergrad(train64, val64, lam64)
    h = train64[0].T @ train64[0] + torch.diag(lam64.exp())
    eig = torch.linalg.eigvalsh(h)
    cast = functools.partial(_to, dtype=dtype, device=device)
    train, val = (cast(train64[0]), cast(train64[1])), (cast(val64[0]), cast(val64[1]))
    lam = cast(lam64).requires_grad_(True)
    problem = ridge_problem(train, val, lam)
    module = RidgeModule(cast(w64))
    case = Case(
        name="ridge", label=f"d={dim}, n={n}", module=module, names=["w"], lam={"w": lam}, w={"w": cast(w64)},
        train=train, val=val, data_loss=half_sq, problem=problem, bl_key={"w": LONE_KEY},
        reference=reference, reference_note=f"closed form; κ(H)={float(eig[-1] / eig[0]):.3g}",
    )
    case.alpha = 1.0 / float(eig[-1])
    return case


def _to(x: Tensor, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)


def load_classification(n: int, source: str, seed: int, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """2n examples (n train, n val) of 784 features, 10 classes: Fashion-MNIST if installed, else random data."""
    if source == "fashion":
        try:
            from bilevel.problems.datasets import fashion_mnist_raw

            xs, ys = fashion_mnist_raw("train")
            if 2 * n > len(xs):
                raise ValueError(f"Fashion-MNIST has {len(xs)} training images, {2 * n} needed")
            order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed))[: 2 * n].numpy()
            x = torch.as_tensor(xs[order].reshape(2 * n, -1), dtype=torch.float32) / 255.0
            y = torch.as_tensor(ys[order])
            x = x - x[:n].mean(0)
            what = "Fashion-MNIST"
        except Exception as e:  # data missing: fall back to random data, say so
            print(f"[data] Fashion-MNIST unavailable ({e}); using random data")
            source = "random"
    if source == "random":
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(2 * n, 784, generator=gen)
        y = (x @ torch.randn(784, 10, generator=gen)).argmax(1)
        what = "random (linear teacher)"
    x = x.to(device=device, dtype=dtype)
    y = y.to(device)
    return (x[:n], y[:n]), (x[n:], y[n:]), what


def make_mlp_case(
    hidden: int, n: int, *, weight_decay: float, train_steps: int, data: str, dtype: torch.dtype, device: torch.device,
    seed: int, cache_dir: str | None = None,
) -> Case:
    """MLP 784-H-H-10 (``hidden=0``: multinomial logistic regression 784-10, a convex inner problem with a
    positive-definite H), λ = log(weight_decay) for every weight; w after ``train_steps`` full-batch Adam steps."""
    torch.manual_seed(seed)
    train, val, what = load_classification(n, data, seed, device, dtype)
    if hidden:
        module = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    else:
        module = nn.Linear(784, 10)
    name = "mlp" if hidden else "logreg"
    module = module.to(device=device, dtype=dtype)
    names = [k for k, _ in module.named_parameters()]
    lam = {k: torch.full_like(p, math.log(weight_decay)).requires_grad_(True) for k, p in module.named_parameters()}

    def inner_loss(lam_: Params, view: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(view(x), y) + 0.5 * sum((lam_[k].exp() * view[k].pow(2)).sum() for k in lam_)

    def outer_loss(lam_: Params, view: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(view(x), y)

    # "after training the inner problem": full-batch Adam on L_T (cached on disk: the same point on every run)
    t0 = time.perf_counter()
    cache = None
    tag = f"{name}_H{hidden}_N{n}_wd{weight_decay:g}_steps{train_steps}_{data}_seed{seed}"
    if cache_dir:
        cache = os.path.join(os.path.expanduser(cache_dir), tag + ".pt")
    if cache and os.path.exists(cache):
        module.load_state_dict(torch.load(cache, map_location=device))
        how = f"loaded from {cache}"
    else:
        opt = torch.optim.Adam(module.parameters(), lr=1e-3)
        lam_d = {k: v.detach() for k, v in lam.items()}
        for _ in range(train_steps):
            opt.zero_grad()
            x, y = train
            loss = F.cross_entropy(module(x), y) + 0.5 * sum(
                (lam_d[k].exp() * p.pow(2)).sum() for k, p in module.named_parameters()
            )
            loss.backward()
            opt.step()
        how = f"trained ({time.perf_counter() - t0:.0f} s)"
        if cache:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            torch.save(module.state_dict(), cache)
    w = {k: p.detach().clone() for k, p in module.named_parameters()}
    problem = bilevel.Problem(outer=lam, inner=module, inner_loss=inner_loss, outer_loss=outer_loss,
                              inner_data=train, outer_data=val, name=name)
    n_params = sum(p.numel() for p in module.parameters())
    size = f"H={hidden}, N={n} ({n_params / 1e6:.2f}M)" if hidden else f"784-10, N={n} ({n_params} weights)"
    case = Case(
        name=name, label=size, module=module, names=names, lam=lam, w=w,
        train=train, val=val, data_loss=F.cross_entropy, problem=problem, bl_key={k: k for k in names}, cache_tag=tag,
    )
    lin = oracles.Linearization(problem, case.bl_outer(), case.bl_inner(), train)
    g_norm = float(tree.norm(tree.detach(lin.grad)))
    lipschitz = power_iteration(lin.hvp, {k: torch.randn_like(v) for k, v in w.items()}, maxiter=30)
    case.alpha = 1.0 / (1.05 * lipschitz)
    # logreg: shifting every class's weights and bias alike leaves the softmax unchanged, so the cross-entropy's
    # Hessian is singular and λ_min(H) is exactly the weight decay: κ(H) = L / e^λ
    kappa = f"; κ(H) = L/e^λ ≈ {lipschitz / weight_decay:.3g} (λ_min(H) = e^λ)" if not hidden else ""
    print(f"[{name} {case.label}] data: {what}; inner point after {train_steps} Adam steps, {how}: "
          f"L_T={float(lin.loss):.4f}, |∇_w L_T|={g_norm:.3g}; L≈{lipschitz:.3g} (power iteration), α=1/(1.05 L); "
          f"weight decay e^λ={weight_decay:g}{kappa}")
    return case


def mlp_reference(case: Case, *, maxiter: int, rtol: float, dtype: torch.dtype = torch.float64,
                  cache_dir: str | None = None) -> None:
    """Accurate hypergradient at the same (λ, w): bilevel's ``implicit_hypergrad`` in ``dtype`` with MINRES as the
    linear solver (H is symmetric but, at a trained MLP point, usually slightly indefinite, where CG and Neumann
    have no convergence guarantee; MINRES has). Cached next to the trained point."""
    t0 = time.perf_counter()
    tag = case.cache_tag and f"{case.cache_tag}_ref_{str(dtype)[6:]}_{maxiter}_{rtol:g}.pt"
    path = os.path.join(os.path.expanduser(cache_dir), tag) if (cache_dir and tag) else None
    if path and os.path.exists(path):
        saved = torch.load(path)
        case.reference, case.reference_note = saved["reference"], saved["note"] + " (cached)"
        return
    module = _clone_module(case.module).to(dtype)
    lam = {k: v.detach().to(dtype).requires_grad_(True) for k, v in case.lam.items()}
    problem = dataclasses.replace(case.problem, outer=lam, inner=module)
    train = (case.train[0].to(dtype), case.train[1])
    val = (case.val[0].to(dtype), case.val[1])
    w = {k: v.to(dtype) for k, v in case.w.items()}
    hg = implicit_hypergrad(problem, lam, w, inner_batch=train, outer_batch=val,
                                    solve=functools.partial(minres, maxiter=maxiter, rtol=rtol))
    case.reference = torch.cat([hg.hypergrad[k].reshape(-1) for k in case.names]).cpu().double()
    case.reference_note = (f"bilevel implicit_hypergrad + MINRES in {str(dtype)[6:]}, {hg.linsolve.iterations} its, "
                           f"residual {float(hg.linsolve.residual):.1e} ({time.perf_counter() - t0:.0f} s)")
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"reference": case.reference, "note": case.reference_note}, path)


def cast_case(case: Case, dtype: torch.dtype) -> Case:
    """The same case with λ, w, data and module in ``dtype``."""
    module = _clone_module(case.module).to(dtype)
    lam = {k: v.detach().to(dtype).requires_grad_(True) for k, v in case.lam.items()}
    train = (case.train[0].to(dtype), case.train[1].to(dtype) if case.train[1].is_floating_point() else case.train[1])
    val = (case.val[0].to(dtype), case.val[1].to(dtype) if case.val[1].is_floating_point() else case.val[1])
    outer = {case.bl_key[k]: lam[k] for k in case.names}
    outer_arg: Any = outer[LONE_KEY] if LONE_KEY in outer else outer
    inner_arg: Any = case.w["w"].to(dtype) if case.name == "ridge" else module
    problem = dataclasses.replace(case.problem, outer=outer_arg, inner=inner_arg, inner_data=train, outer_data=val)
    return dataclasses.replace(case, module=module, lam=lam, w={k: v.to(dtype) for k, v in case.w.items()},
                               train=train, val=val, problem=problem)
