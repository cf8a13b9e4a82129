r"""Hypergradient cost and accuracy: bilevel against TorchOpt, higher, Betty and plain autograd, in one process.

Every contender computes dF/dλ at the SAME inner point w (ridge: the exact w*(λ); MLP: after ``--train-steps`` full-batch
Adam steps on L_T) and the same λ, with the same K:

* implicit (IFT): dF/dλ = ∂_λ L_V − (∂²_{wλ} L_T)ᵀ H⁻¹ ∂_w L_V, H = ∂²_ww L_T, H⁻¹ by K Neumann terms
  (Lorraine, Vicol & Duvenaud, 2020, "Optimizing Millions of Hyperparameters by Implicit Differentiation", AISTATS;
  step α = 1/L with L from power iteration, shared by every Neumann contender) or K conjugate-gradient iterations;
* unrolled: reverse mode through K SGD steps w_t = w_{t−1} − α ∇_w L_T(λ, w_{t−1}) started at w (Franceschi et al.,
  2017, "Forward and Reverse Gradient-Based Hyperparameter Optimization", ICML).

Contenders: bilevel (``implicit_hypergrad`` with ``neumann`` / ``cg``, ``cg`` with ``hvp_dtype`` one precision lower
("bilevel CG mixed": float32 products for float64 problems, bfloat16 for float32, reliable residual updates in the
working precision), ``unrolled_hypergrad``); TorchOpt 0.7.3
(``custom_root`` + ``linear_solve.solve_cg``); higher 0.2.1 (``innerloop_ctx`` + differentiable SGD); Betty 0.1.1
(``betty.hypergradient.get_grads`` with its ``neumann`` routine on two ``ImplicitProblem`` objects, no ``Engine``);
a plain-autograd Neumann loop (double backward on a retained graph, the reference of docs/peer_costs.md). Peers are
imported lazily and skipped, with the reason printed, when missing or broken.

Problems: (1) per-weight ridge (``bilevel.problems.ridge``; reference: the closed-form hypergradient); (2) MLP 784-H-H-10
classifier with one weight-decay hyperparameter per weight, L_T = CE(train) + ½ Σ e^λ w², L_V = CE(val), full batch,
float32; (3) the same with no hidden layer ("logreg": multinomial logistic regression, 7850 weights, a convex inner
problem, so H is positive definite and the MINRES reference below is well posed; always computed).
Accuracy on the MLP: at a trained point H = ∂²_ww L_T is near-singular and slightly indefinite (at H=64,
N=1024, e^λ = 0.01, 800 Adam steps: smallest eigenvalues ≈ −0.016 by Lanczos, scipy ``eigsh``), so H⁻¹∂_w L_V is
ill-posed: against a MINRES solve (still at residual 1e-2 after 3000 iterations) CG, TorchOpt's CG and Neumann all have
relative error ≈ 1 at K = 10 (0.96 at K = 160). What the MLP rows report instead is the agreement of each peer with
bilevel running the same algorithm (equal accuracy at equal K); ``--mlp-reference`` adds the MINRES reference
(Paige & Saunders, 1975). The equal-accuracy scan (time to reach a relative error by scanning K) runs on problems with
a reference: the ridge by default.

Times are medians of ``--reps`` runs after ``--warmup`` warm-ups, the contenders interleaved round-robin; "grad-eq" divides
by the time of one inner-loss gradient on the same data measured in the same rounds. Memory: CUDA
``max_memory_allocated`` above the baseline; CPU: growth of the peak resident set size (VmHWM, reset through
/proc/self/clear_refs, with glibc's mmap threshold pinned so freed tensors leave the RSS), measured in a separate pass.

One point, no history: every CG here starts from zero and unpreconditioned. What ``solve(problem, "cg")`` carries from
one outer step to the next (warm start, recycled L-BFGS preconditioner) is measured along a run, at equal accuracy,
by ``benchmarks/hypergrad_trajectory.py``.

Run: ``.venv/bin/python benchmarks/hypergrad_peers.py`` (2-core CPU defaults: about 10–15 minutes; the MLP inner point
is trained once and cached under ``--cache-dir``);
``--problem mlp --hidden 1024 --n 16384 --device cuda`` for the larger GPU rows of docs/peer_costs.md.
Optional peers: ``pip install torchopt==0.7.3 higher==0.2.1`` and ``pip install --no-deps betty-ml==0.1.1``.
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)
from __future__ import annotations

import os

# On a shared, oversubscribed machine OpenMP's spin-waiting makes 2-thread runs several times slower and noisy:
# let idle OpenMP threads sleep (must be set before torch loads its OpenMP runtime; equal for every contender).
_LOAD = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
if _LOAD > (os.cpu_count() or 1) and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import ctypes
import dataclasses
import functools
import gc
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel
from bilevel import oracles, tree
from bilevel.hypergrad import implicit_hypergrad, unrolled_hypergrad
from bilevel.linsolve import cg, minres, neumann, power_iteration
from bilevel.optim import sgd
from bilevel.problem import LONE_KEY
from bilevel.problems.ridge import ridge_data, ridge_hypergrad, ridge_problem, ridge_solution

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*functorch.*")
warnings.filterwarnings("ignore", message=".*_flat_weights.*")

Params = dict[str, Tensor]


# ----------------------------------------------------------------------------------------------------------------------
# problems
# ----------------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------------
# contenders: make(case, K) -> run() -> list of hypergradient tensors in case.names order
# ----------------------------------------------------------------------------------------------------------------------
Runner = Callable[[], list[Tensor]]


def one_gradient(case: Case, k: int) -> Runner:
    """The unit: one inner-loss gradient ∇_w L_T on the same data (plain autograd)."""
    w = {n: v.detach().requires_grad_(True) for n, v in case.w.items()}
    lam = {n: v.detach() for n, v in case.lam.items()}

    def run() -> list[Tensor]:
        return list(torch.autograd.grad(case.inner_loss_fn(lam, w, case.train), list(w.values())))

    return run


def bilevel_neumann(case: Case, k: int, *, check: bool = True) -> Runner:
    solve = functools.partial(neumann, alpha=case.alpha, maxiter=k, check=check)
    outer, inner = case.bl_outer(), case.bl_inner()

    def run() -> list[Tensor]:
        hg = implicit_hypergrad(case.problem, outer, inner, inner_batch=case.train, outer_batch=case.val, solve=solve)
        return [hg.hypergrad[case.bl_key[n]] for n in case.names]

    return run


def bilevel_cg(case: Case, k: int, *, check: bool = True) -> Runner:
    solve = functools.partial(cg, maxiter=k, rtol=0.0, check=check)  # rtol=0: exactly k iterations
    outer, inner = case.bl_outer(), case.bl_inner()

    def run() -> list[Tensor]:
        hg = implicit_hypergrad(case.problem, outer, inner, inner_batch=case.train, outer_batch=case.val, solve=solve)
        return [hg.hypergrad[case.bl_key[n]] for n in case.names]

    return run


LOW_PRECISION = {torch.float64: torch.float32, torch.float32: torch.bfloat16}


def bilevel_cg_mixed(case: Case, k: int) -> Runner:
    """bilevel CG with ``hvp_dtype``: Hessian-vector products one precision lower (float64 → float32, float32 →
    bfloat16), residuals corrected in the working precision (reliable updates); k cheap products."""
    solve = functools.partial(cg, maxiter=k, rtol=0.0)
    outer, inner = case.bl_outer(), case.bl_inner()
    low = LOW_PRECISION[case.w[case.names[0]].dtype]

    def run() -> list[Tensor]:
        hg = implicit_hypergrad(case.problem, outer, inner, inner_batch=case.train, outer_batch=case.val,
                                        solve=solve, hvp_dtype=low)
        return [hg.hypergrad[case.bl_key[n]] for n in case.names]

    return run


def bilevel_unrolled(case: Case, k: int) -> Runner:
    outer, inner = case.bl_outer(), case.bl_inner()
    opt = sgd(case.alpha)

    def run() -> list[Tensor]:
        hg = unrolled_hypergrad(case.problem, outer, inner, inner_batches=[case.train] * k, outer_batch=case.val,
                                        optimizer=opt)
        return [hg.hypergrad[case.bl_key[n]] for n in case.names]

    return run


def plain_neumann(case: Case, k: int) -> Runner:
    """The plain-autograd reference of docs/peer_costs.md: K Neumann terms by double backward on one retained graph."""
    alpha = case.alpha
    lam_list = [case.lam[n].detach().requires_grad_(True) for n in case.names]
    w_list = [case.w[n].detach().requires_grad_(True) for n in case.names]

    def run() -> list[Tensor]:
        lam = dict(zip(case.names, lam_list))
        w = dict(zip(case.names, w_list))
        d_w = torch.autograd.grad(case.outer_loss_fn(w, case.val), w_list)
        g = torch.autograd.grad(case.inner_loss_fn(lam, w, case.train), w_list, create_graph=True)
        v = p = list(d_w)
        for _ in range(k):
            hv = torch.autograd.grad(g, w_list, grad_outputs=v, retain_graph=True)
            v = [vi - alpha * hi for vi, hi in zip(v, hv)]
            p = [pi + vi for pi, vi in zip(p, v)]
        mixed = torch.autograd.grad(g, lam_list, grad_outputs=[alpha * pi for pi in p])
        return [-m for m in mixed]  # ∂_λ L_V = 0 here (L_V does not involve λ)

    return run


def torchopt_cg(case: Case, k: int, *, init: Any = None, kept: dict[str, Any] | None = None) -> Runner:
    """TorchOpt's implicit gradient: ``custom_root(optimality_fn, argnums=1, solve=solve_cg(maxiter=K))``.

    ``init``: a warm start for its CG (``solve_cg(init=...)``, in TorchOpt's layout and sign); ``kept``: a dict that
    receives its CG solution as ``kept["x"]`` (what a user's closure would keep for the next warm start)."""
    import torchopt

    names = case.names
    w_star = tuple(case.w[n].detach() for n in names)
    lam_t = tuple(case.lam[n].detach().requires_grad_(True) for n in names)
    cg_solve = torchopt.linear_solve.solve_cg(maxiter=k, rtol=0.0, init=init)

    def inner_of(lam: tuple[Tensor, ...], w: tuple[Tensor, ...]) -> Tensor:
        return case.inner_loss_fn(dict(zip(names, lam)), dict(zip(names, w)), case.train)

    def optimality(w: tuple[Tensor, ...], lam: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return torch.func.grad(inner_of, argnums=1)(lam, w)

    def solve(matvec: Callable, b: Any) -> Any:
        x = cg_solve(matvec, b)
        if kept is not None:
            kept["x"] = x
        return x

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver(w_init: tuple[Tensor, ...], lam: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return w_star  # the inner problem was solved beforehand: the same w as everyone

    def run() -> list[Tensor]:
        w = solver(w_star, lam_t)
        loss = case.outer_loss_fn(dict(zip(names, w)), case.val)
        return list(torch.autograd.grad(loss, lam_t))

    return run


def higher_unrolled(case: Case, k: int) -> Runner:
    """higher: ``innerloop_ctx`` with torch.optim.SGD(lr=α), K differentiable steps, then dL_V/dλ."""
    import higher

    model = case.copy_module()
    opt = torch.optim.SGD(model.parameters(), lr=case.alpha)
    lam_list = [case.lam[n].detach().requires_grad_(True) for n in case.names]
    x, y = case.train

    def run() -> list[Tensor]:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
            for _ in range(k):
                diffopt.step(case.data_loss(fmodel(x), y) + case.reg(lam_list, list(fmodel.parameters())))
            loss = case.data_loss(fmodel(case.val[0]), case.val[1])
            return list(torch.autograd.grad(loss, lam_list))

    return run


def betty_neumann(case: Case, k: int) -> Runner:
    """Betty: ``betty.hypergradient.get_grads`` over the path [outer, inner, outer] with the inner problem's config
    ``type="neumann"`` (its implicit gradient with Neumann), on two ``ImplicitProblem`` objects without an ``Engine``
    (the Engine only schedules steps; the hypergradient is this call). Timed: L_V forward + ``get_grads``."""
    from betty.configs import Config
    from betty.hypergradient import get_grads
    from betty.problems import ImplicitProblem

    data_loss, reg, names = case.data_loss, case.reg, case.names

    class Hyper(nn.Module):
        def __init__(self, lam: list[Tensor]):
            super().__init__()
            self.lam = nn.ParameterList([nn.Parameter(v.detach().clone()) for v in lam])

    class Inner(ImplicitProblem):
        def training_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
            x, y = batch
            return data_loss(self.module(x), y) + reg(list(self.outer_problem.module.lam), self.trainable_parameters())

    class Outer(ImplicitProblem):
        def training_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
            x, y = batch
            return data_loss(self.inner_problem.module(x), y)

    device = str(case.device)
    inner_p = Inner(name="inner", config=Config(type="neumann", neumann_iterations=k, neumann_alpha=case.alpha),
                    module=case.copy_module(), device=device)
    outer_p = Outer(name="outer", config=Config(), module=Hyper([case.lam[n] for n in names]), device=device)
    inner_p.outer_problem = outer_p
    outer_p.inner_problem = inner_p
    inner_p.cur_batch = case.train
    path = [outer_p, inner_p, outer_p]

    def run() -> list[Tensor]:
        loss = outer_p.training_step(case.val)
        return list(get_grads(loss, path, False))  # ∂_λ L_V = 0 here: Betty adds it separately

    return run


@dataclasses.dataclass(frozen=True)
class Contender:
    label: str
    make: Callable[[Case, int], Runner]
    family: str  # "unit", "implicit", "unrolled"
    peer: str | None = None  # import name of a peer package


CONTENDERS = [
    Contender("one gradient", one_gradient, "unit"),
    Contender("bilevel Neumann", bilevel_neumann, "implicit"),
    Contender("bilevel CG", bilevel_cg, "implicit"),
    Contender("bilevel CG mixed", bilevel_cg_mixed, "implicit"),
    Contender("bilevel unrolled", bilevel_unrolled, "unrolled"),
    Contender("plain Neumann", plain_neumann, "implicit"),
    Contender("TorchOpt CG", torchopt_cg, "implicit", "torchopt"),
    Contender("higher unrolled", higher_unrolled, "unrolled", "higher"),
    Contender("Betty Neumann", betty_neumann, "implicit", "betty"),
]
RATIOS = [("TorchOpt / bilevel", "TorchOpt CG", "bilevel CG"), ("TorchOpt / bilevel mixed", "TorchOpt CG", "bilevel CG mixed"),
          ("higher / bilevel", "higher unrolled", "bilevel unrolled"),
          ("Betty / bilevel", "Betty Neumann", "bilevel Neumann")]


def available_contenders() -> tuple[list[Contender], dict[str, str]]:
    """Contenders whose packages import; ``skipped[label] = reason``."""
    ok, skipped = [], {}
    for c in CONTENDERS:
        if c.peer is None:
            ok.append(c)
            continue
        try:
            __import__(c.peer)
            try:
                from importlib.metadata import version as dist_version

                version = dist_version({"betty": "betty-ml"}.get(c.peer, c.peer))
            except Exception:  # noqa: BLE001 - version is informative only
                version = "?"
            ok.append(c)
            print(f"[peers] {c.peer} {version} imported")
        except Exception as e:  # missing or incompatible peer: say why
            skipped[c.label] = f"{c.peer} unavailable: {type(e).__name__}: {e}"
            print(f"[peers] skip {c.label}: {skipped[c.label]}")
    return ok, skipped


# ----------------------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flat(out: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in out]).to("cpu", torch.float64)


def rel_err(out: list[Tensor], ref: Tensor) -> float:
    return float((flat(out) - ref).norm() / ref.norm())


def time_round_robin(runners: dict[str, Runner], device: torch.device, reps: int, warmup: int, *,
                     min_sample: float = 0.02) -> tuple[dict[str, float], dict[str, list[Tensor]], dict[str, str]]:
    """Median seconds per call of each runner, the runners interleaved round-robin; its last output; failures.

    A sample repeats a call ``n`` times (n chosen from the warm-up so a sample lasts ≥ ``min_sample`` s) and counts
    sample/n: sub-millisecond calls are otherwise lost in timer and scheduler noise."""
    outputs: dict[str, list[Tensor]] = {}
    failed: dict[str, str] = {}
    repeat: dict[str, int] = {}
    for label, run in runners.items():
        try:
            elapsed = math.inf
            for _ in range(max(1, warmup)):
                sync(device)
                t0 = time.perf_counter()
                outputs[label] = run()
                sync(device)
                elapsed = min(elapsed, time.perf_counter() - t0)
            repeat[label] = max(1, min(1000, math.ceil(min_sample / max(elapsed, 1e-7))))
        except Exception as e:  # a peer that breaks at run time is reported, not fatal
            failed[label] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"[run] {label} failed: {failed[label]}")
    times: dict[str, list[float]] = {label: [] for label in runners if label not in failed}
    for _ in range(reps):
        for label in times:
            run, n = runners[label], repeat[label]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                out = run()
            sync(device)
            times[label].append((time.perf_counter() - t0) / n)
            del out
    return {label: statistics.median(ts) for label, ts in times.items()}, outputs, failed


class PeakMemory:
    """Peak memory growth of one call: CUDA allocator statistics, or the resident set size on Linux."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ok = device.type == "cuda" or (sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs"))
        self._pinned = False
        self._libc: Any = None

    def unpin_malloc(self) -> None:
        """Back to glibc's steady state (mmap only above 32 MiB) so later timings see a normal allocator."""
        if self._pinned:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 32 * 2**20)
            libc.mallopt(-1, 64 * 2**20)
            self._pinned = False

    def pin_malloc(self) -> None:
        """glibc: serve every allocation ≥ 64 KiB by mmap (a fixed threshold) so freed tensors leave the RSS at once."""
        if self.device.type == "cuda" or self._pinned:
            return
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
            libc.malloc_trim(0)
            self._libc = libc
            self._pinned = True
        except OSError:
            self.ok = False

    def measure(self, run: Runner) -> float:
        """MiB above the level before the call."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            out = run()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            del out
            return (peak - base) / 2**20
        if self._libc is not None:
            self._libc.malloc_trim(0)  # give free heap pages back, so reusing them shows up as RSS growth
        base = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        out = run()
        peak = _rss_kib("VmHWM")
        del out
        return (peak - base) / 1024


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# ----------------------------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    """Results of one (case, K): seconds, relative errors, agreement with bilevel and peak MiB per contender."""

    case: Case
    k: int
    seconds: dict[str, float]
    errors: dict[str, float]  # vs the accurate reference (when the case has one)
    agreement: dict[str, float]  # vs bilevel running the same algorithm
    memory: dict[str, float] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    makers: dict[str, Callable[[], Runner]] = dataclasses.field(default_factory=dict)


SAME_ALGORITHM = {"plain Neumann": "bilevel Neumann", "Betty Neumann": "bilevel Neumann", "TorchOpt CG": "bilevel CG",
                  "bilevel CG mixed": "bilevel CG", "higher unrolled": "bilevel unrolled"}


def run_main(case: Case, k: int, contenders: list[Contender], args: argparse.Namespace) -> Row:
    makers: dict[str, Callable[[], Runner]] = {c.label: functools.partial(c.make, case, k) for c in contenders}
    notes = []
    if "bilevel CG" in makers:  # bilevel's CG refuses an indefinite H (check=True); time check=False then, and say so
        try:
            bilevel_cg(case, k)()
        except bilevel.BilevelError as e:
            makers["bilevel CG"] = functools.partial(bilevel_cg, case, k, check=False)
            notes.append(f"bilevel CG: {str(e)[:70]}…; timed with check=False (skips such steps; TorchOpt takes them)")
            if makers.pop("bilevel CG mixed", None):  # its reliable updates need the checked loop
                notes.append("bilevel CG mixed: not run (mixed precision needs the checked CG loop, which refuses an "
                             "indefinite H)")
    runners = {label: make() for label, make in makers.items()}
    seconds, outputs, failed = time_round_robin(runners, case.device, args.reps, args.warmup)
    errors, agreement = {}, {}
    for label, out in outputs.items():
        if label == "one gradient" or label in failed:
            continue
        if case.reference is not None:
            errors[label] = rel_err(out, case.reference)
        ours = SAME_ALGORITHM.get(label)
        if ours in outputs and ours not in failed:
            agreement[label] = rel_err(out, flat(outputs[ours]))
    return Row(case, k, seconds, errors, agreement, failed=failed, notes=notes, makers=makers)


def cell(row: Row, label: str, *, show_mem: bool) -> str:
    if label in row.failed:
        return "failed"
    if label not in row.seconds:
        return "—"
    unit = row.seconds["one gradient"]
    s = row.seconds[label]
    mem = row.memory.get(label)
    mem_s = f", {mem:.0f} MiB" if (show_mem and mem is not None) else ""
    if label == "one gradient":
        return f"{s * 1e3:.3g} ms{mem_s}"
    return f"{s / unit:.1f} ({s * 1e3:.3g} ms{mem_s})"


def print_main_table(rows: list[Row], contenders: list[Contender], device: torch.device) -> None:
    labels = [c.label for c in contenders]
    ratio_heads = [r for r in RATIOS if r[1] in labels and r[2] in labels]
    mem_note = "peak MiB = CUDA max_memory_allocated growth" if device.type == "cuda" else "peak MiB = peak RSS growth"
    print(f"\n### Time per hypergradient: grad-equiv (ms, {mem_note}); ratios: peer time / bilevel time, same algorithm\n")
    print("| problem, size, K | " + " | ".join(labels) + " | " + " | ".join(r[0] for r in ratio_heads) + " |")
    print("|" + "---|" * (1 + len(labels) + len(ratio_heads)))
    for row in rows:
        cells = [cell(row, lab, show_mem=True) for lab in labels]
        ratios = []
        for _, peer, ours in ratio_heads:
            if peer in row.seconds and ours in row.seconds:
                ratios.append(f"{row.seconds[peer] / row.seconds[ours]:.2f}")
            else:
                ratios.append("—")
        print(f"| {row.case.name} {row.case.label}, K={row.k} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    for row in rows:
        for note in row.notes:
            print(f"- {row.case.name} {row.case.label}, K={row.k}: {note}")
    err_labels = [lab for lab in labels if lab != "one gradient"]
    with_ref = [row for row in rows if row.errors]
    if with_ref:
        print("\n### Relative error ‖ĝ − g_ref‖/‖g_ref‖ at that K\n")
        print("| problem, size, K | " + " | ".join(err_labels) + " | reference |")
        print("|" + "---|" * (2 + len(err_labels)))
        for row in with_ref:
            cells = [f"{row.errors[lab]:.2e}" if lab in row.errors else "—" for lab in err_labels]
            print(f"| {row.case.name} {row.case.label}, K={row.k} | " + " | ".join(cells) + f" | {row.case.reference_note} |")
    peers = [lab for lab in err_labels if lab in SAME_ALGORITHM]
    print("\n### Same algorithm, same accuracy: ‖peer − bilevel‖/‖bilevel‖ (peer vs bilevel's Neumann / CG / unrolled)\n")
    print("| problem, size, K | " + " | ".join(f"{lab} vs {SAME_ALGORITHM[lab]}" for lab in peers) + " |")
    print("|" + "---|" * (1 + len(peers)))
    for row in rows:
        cells = [f"{row.agreement[lab]:.1e}" if lab in row.agreement else "—" for lab in peers]
        print(f"| {row.case.name} {row.case.label}, K={row.k} | " + " | ".join(cells) + " |")


def scan_grid(kmax: int) -> list[int]:
    """K = 1, 2, 3, 4, 5, 7, 9, ... (ratio ≈ 1.3) up to kmax."""
    ks, k = [], 1.0
    while round(k) <= kmax:
        if not ks or round(k) != ks[-1]:
            ks.append(int(round(k)))
        k *= 1.3
    return ks


def equal_accuracy(case: Case, contenders: list[Contender], targets: list[float], kmax: int,
                   args: argparse.Namespace) -> None:
    """For each implicit method: the smallest K on the scan grid reaching each target error, and its time."""
    implicit = [c for c in contenders if c.family == "implicit"]
    grid = scan_grid(kmax)
    found: dict[str, dict[float, tuple[int, float]]] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    for c in implicit:
        found[c.label] = {}
        curves[c.label] = []
        for k in grid:
            try:
                err = rel_err(c.make(case, k)(), case.reference)
            except Exception as e:  # noqa: BLE001 - report and move on
                print(f"[scan] {c.label} K={k} failed: {type(e).__name__}: {str(e)[:120]}")
                break
            curves[c.label].append((k, err))
            for t in targets:
                if t not in found[c.label] and err <= t:
                    found[c.label][t] = (k, err)
            if len(found[c.label]) == len(targets):
                break
    # time each method at each K it needed (one round-robin per distinct K set)
    runners: dict[str, Runner] = {"one gradient": one_gradient(case, 0)}
    for c in implicit:
        for k, _ in found[c.label].values():
            runners.setdefault(f"{c.label}@{k}", c.make(case, k))
    seconds, _, failed = time_round_robin(runners, case.device, args.reps, args.warmup)
    unit = seconds["one gradient"]
    print(f"\n### Equal accuracy, {case.name} {case.label}: smallest K on the grid {grid[:6]}… ≤ {kmax} reaching the "
          "target relative error, and the time at that K (grad-equiv, ms)\n")
    print("| method | " + " | ".join(f"err ≤ {t:g}: K, grad-eq (ms)" for t in targets) + " | error curve (K: err) |")
    print("|" + "---|" * (2 + len(targets)))
    best_bilevel: dict[float, float] = {}
    for c in implicit:
        cells = []
        for t in targets:
            if t in found[c.label]:
                k, _ = found[c.label][t]
                key = f"{c.label}@{k}"
                if key in seconds:
                    s = seconds[key]
                    cells.append(f"K={k}: {s / unit:.1f} ({s * 1e3:.3g} ms)")
                    if c.label.startswith("bilevel"):
                        best_bilevel[t] = min(best_bilevel.get(t, math.inf), s)
                else:
                    cells.append(f"K={k}: failed")
            else:
                last = curves[c.label][-1] if curves[c.label] else (0, math.nan)
                cells.append(f"not reached (K={last[0]}: {last[1]:.1e})")
        curve = ", ".join(f"{k}: {e:.1e}" for k, e in curves[c.label][:: max(1, len(curves[c.label]) // 8)])
        print(f"| {c.label} | " + " | ".join(cells) + f" | {curve} |")
    for t in targets:
        torchopt = found.get("TorchOpt CG", {}).get(t)
        if torchopt and t in best_bilevel and f"TorchOpt CG@{torchopt[0]}" in seconds:
            ratio = seconds[f"TorchOpt CG@{torchopt[0]}"] / best_bilevel[t]
            print(f"- err ≤ {t:g}: TorchOpt CG time / fastest bilevel implicit time = {ratio:.2f} (goal ≥ 2)")
        plain, mixed = found.get("bilevel CG", {}).get(t), found.get("bilevel CG mixed", {}).get(t)
        if plain and mixed and f"bilevel CG@{plain[0]}" in seconds and f"bilevel CG mixed@{mixed[0]}" in seconds:
            speedup = seconds[f"bilevel CG@{plain[0]}"] / seconds[f"bilevel CG mixed@{mixed[0]}"]
            print(f"- err ≤ {t:g}: bilevel CG (K={plain[0]}) time / bilevel CG mixed (K={mixed[0]}) time = {speedup:.2f}")


def memory_vs_k(case: Case, contenders: list[Contender], ks: list[int], mem: PeakMemory) -> None:
    """Peak memory of one hypergradient as K grows: IFT flat, unrolling linear in K."""
    chosen = [c for c in contenders
              if c.label in ("bilevel Neumann", "bilevel CG", "bilevel unrolled", "TorchOpt CG", "higher unrolled")]
    what = "CUDA max_memory_allocated growth" if case.device.type == "cuda" else "peak RSS growth (VmHWM, rough proxy)"
    print(f"\n### Peak memory (MiB, {what}) of one hypergradient vs K, {case.name} {case.label}\n")
    print("| K | " + " | ".join(c.label for c in chosen) + " |")
    print("|" + "---|" * (1 + len(chosen)))
    for i, k in enumerate(ks):
        cells = []
        for c in chosen:
            try:
                run = c.make(case, k)
                if c.label == "bilevel CG":
                    try:
                        run()
                    except bilevel.BilevelError:  # indefinite H: as in the main table
                        run = bilevel_cg(case, k, check=False)
                if i == 0:
                    run()  # warm-up once per contender (lazy initialisation)
                cells.append(f"{mem.measure(run):.0f}")
            except Exception as e:  # noqa: BLE001
                cells.append(f"failed ({type(e).__name__})")
        print(f"| {k} | " + " | ".join(cells) + " |", flush=True)


def unrolled_vs_higher(case: Case, k: int) -> str:
    """max |bilevel unrolled − higher unrolled| over λ, in float64 at the same point (same K SGD steps, step α)."""
    try:
        import higher  # noqa: F401
    except ImportError as e:
        return f"higher unavailable ({e})"
    case64 = cast_case(case, torch.float64)
    a = flat(bilevel_unrolled(case64, k)())
    b = flat(higher_unrolled(case64, k)())
    return f"max |Δ| = {float((a - b).abs().max()):.2e} (|g|_max = {float(a.abs().max()):.2e}), float64, K={k}"


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


# ----------------------------------------------------------------------------------------------------------------------
# profile of bilevel's implicit hypergradient, with prototypes of faster variants (not in the library)
# ----------------------------------------------------------------------------------------------------------------------
def profile_bilevel(case: Case, k: int, args: argparse.Namespace, with_torchopt: bool) -> None:
    """Time the pieces of ``implicit_hypergrad`` and prototypes of faster variants, interleaved, at one (λ, w)."""
    problem, outer, inner = case.problem, case.bl_outer(), case.bl_inner()
    train, val = case.train, case.val
    lin = oracles.Linearization(problem, outer, inner, train)
    b = tree.detach(oracles.grad_outer(problem, outer, inner, val)[2])
    v = {n: torch.randn_like(t) for n, t in b.items()}
    flat_lin = _FlatLinearization(case)
    low = LOW_PRECISION[case.w[case.names[0]].dtype]
    lin_low = oracles.Linearization(problem, tree.cast(outer, low), tree.cast(inner, low), tree.cast_batch(train, low))
    v_low = tree.cast(v, low)
    low_name = str(low).removeprefix("torch.")

    def plain_grad_outer() -> Any:
        w = {n: t.detach().requires_grad_(True) for n, t in case.w.items()}
        return torch.autograd.grad(case.outer_loss_fn(w, val), list(w.values()))

    def jvp_neumann() -> Any:  # Neumann with the pure torch.func HVP (forward-over-reverse), no retained graph
        mv = functools.partial(oracles.hvp, problem, outer, inner, train)
        return neumann(mv, b, alpha=case.alpha, maxiter=k, check=False)

    cg_label = f"cg({k}), check=True"
    parts: dict[str, Runner] = {
        "one gradient (unit)": one_gradient(case, 0),
        "grad_outer: (L_V, ∂_λ L_V, ∂_w L_V) by torch.func": lambda: oracles.grad_outer(problem, outer, inner, val),
        "  same by plain autograd (prototype)": plain_grad_outer,
        "Linearization: ∇_w L_T with graph": lambda: oracles.Linearization(problem, outer, inner, train),
        "one HVP, double backward (Linearization.hvp)": lambda: lin.hvp(v),
        "one HVP, torch.func jvp∘grad (oracles.hvp)": lambda: oracles.hvp(problem, outer, inner, train, v),
        "mixed VJP (Linearization.mixed_vjp)": lambda: lin.mixed_vjp(v),
        f"neumann({k}) on a built Linearization, check=True": lambda: neumann(lin.hvp, b, alpha=case.alpha, maxiter=k),
        f"neumann({k}), check=False": lambda: neumann(lin.hvp, b, alpha=case.alpha, maxiter=k, check=False),
        cg_label: lambda: cg(lin.hvp, b, maxiter=k, rtol=0.0),
        f"cg({k}), check=False": lambda: cg(lin.hvp, b, maxiter=k, rtol=0.0, check=False),
        f"neumann({k}) on one flat vector (prototype)": lambda: flat_lin.neumann(b, case.alpha, k),
        f"whole: implicit_hypergrad Neumann({k})": bilevel_neumann(case, k),
        f"whole: implicit_hypergrad Neumann({k}), check=False": bilevel_neumann(case, k, check=False),
        f"whole: implicit_hypergrad CG({k})": bilevel_cg(case, k),
        f"whole: implicit_hypergrad CG({k}), check=False": bilevel_cg(case, k, check=False),
        f"whole: prototype, flat vector + plain autograd, CG({k})": lambda: _FlatLinearization(case).hypergrad_cg(k),
    }
    parts[f"one HVP in {low_name} (hvp_dtype's linearization)"] = lambda: lin_low.hvp(v_low)
    parts[f"whole: implicit_hypergrad CG({k}), hvp_dtype={low_name}"] = bilevel_cg_mixed(case, k)
    if args.profile_jvp:
        parts[f"whole: Neumann({k}) with torch.func HVPs"] = jvp_neumann
    if with_torchopt:
        parts[f"peer: TorchOpt CG({k}), for the ratio"] = torchopt_cg(case, k)
    seconds, outputs, failed = time_round_robin(parts, case.device, args.reps, args.warmup)
    unit = seconds["one gradient (unit)"]
    print(f"\n### Where bilevel's implicit hypergradient spends its time, {case.name} {case.label}, K={k}\n")
    print("| part | ms | grad-equiv |")
    print("|---|---|---|")
    for label in parts:
        if label in failed:
            print(f"| {label} | failed: {failed[label][:70]} | |")
            continue
        s = seconds[label]
        print(f"| {label} | {s * 1e3:.3g} | {s / unit:.2f} |")
    hvp = seconds["one HVP, double backward (Linearization.hvp)"]
    neu = seconds[f"neumann({k}) on a built Linearization, check=True"]
    cgs = seconds.get(cg_label, seconds[f"cg({k}), check=False"])
    fixed = seconds["grad_outer: (L_V, ∂_λ L_V, ∂_w L_V) by torch.func"] + seconds["Linearization: ∇_w L_T with graph"]
    model = fixed + k * hvp + seconds["mixed VJP (Linearization.mixed_vjp)"]
    low_hvp = seconds.get(f"one HVP in {low_name} (hvp_dtype's linearization)")
    bf16_s = f"; in {low_name}: {low_hvp / unit:.2f}, speed-up {hvp / low_hvp:.2f}×" if low_hvp else ""
    print(f"\n- one HVP = {hvp / unit:.2f} grad-eq (torch.func jvp∘grad: "
          f"{seconds['one HVP, torch.func jvp∘grad (oracles.hvp)'] / unit:.2f}{bf16_s}); "
          f"linear-solver work beyond the HVPs: Neumann {(neu - k * hvp) / k * 1e3:.3g} ms/term, "
          f"CG {(cgs - k * hvp) / k * 1e3:.3g} ms/iteration")
    print(f"- cost model grad_outer + Linearization + K·HVP + mixed VJP = {model / unit:.1f} grad-eq "
          f"(whole Neumann measured: {seconds[f'whole: implicit_hypergrad Neumann({k})'] / unit:.1f}); "
          f"fixed part {fixed / unit:.1f} grad-eq, HVPs {k * hvp / unit:.1f} ({k * hvp / model:.0%} of the model)")
    plain_cg = outputs.get(f"cg({k}), check=False")
    if plain_cg is not None:
        print(f"- CG({k}) on H x = ∂_w L_V from 0: relative residual ‖b − Hx‖/‖b‖ = {float(plain_cg.residual):.2g} "
              "(reliable updates of low-precision products correct it each time it falls tenfold)")
    cg32 = outputs.get(f"whole: implicit_hypergrad CG({k}), check=False")
    mixed = outputs.get(f"whole: implicit_hypergrad CG({k}), hvp_dtype={low_name}")
    if cg32 is not None and mixed is not None:
        print(f"- CG({k}) with {low_name} products and reliable updates vs CG({k}): relative difference "
              f"{rel_err(mixed, flat(cg32)):.1e}")
    torchopt_seconds = seconds.get(f"peer: TorchOpt CG({k}), for the ratio")
    if torchopt_seconds is not None:
        whole = min(seconds.get(f"whole: implicit_hypergrad CG({k})", math.inf),
                    seconds[f"whole: implicit_hypergrad CG({k}), check=False"])
        print(f"- TorchOpt CG({k}) / bilevel CG({k}) in this round: {torchopt_seconds / whole:.2f}; "
              f"TorchOpt / flat-vector prototype: "
              f"{torchopt_seconds / seconds[f'whole: prototype, flat vector + plain autograd, CG({k})']:.2f}")
        mixed_seconds = seconds.get(f"whole: implicit_hypergrad CG({k}), hvp_dtype={low_name}")
        if mixed_seconds is not None:
            print(f"- TorchOpt CG({k}) / bilevel CG({k}) with {low_name} products: {torchopt_seconds / mixed_seconds:.2f}")
        floor = (seconds["Linearization: ∇_w L_T with graph"] + k * hvp) / unit
        bound = torchopt_seconds / unit / floor
        verdict = ("a 2x at equal accuracy needs fewer or cheaper HVPs (CG over Neumann, warm starts, preconditioning, "
                   "low-precision HVPs), not less overhead" if bound < 2 else
                   "here the overhead around the HVPs decides: cutting it can reach 2x")
        print(f"- TorchOpt CG({k}) = {torchopt_seconds / unit:.1f} grad-eq. Same K, even with grad_outer and the mixed VJP "
              f"free, bilevel costs ≥ {floor:.1f} grad-eq: TorchOpt/bilevel ≤ {bound:.2f}; {verdict}.")


class _FlatLinearization:
    """Prototype: the retained-graph linearization on ONE flat vector (torch.cat of w), plain autograd throughout.

    One tensor instead of a dict per vector op cuts the elementwise kernel count by the number of parameter
    tensors (6 for the MLP): what matters when launches dominate (small problems on a GPU)."""

    def __init__(self, case: Case):
        self.case = case
        names = case.names
        self.lam = [case.lam[n].detach().requires_grad_(True) for n in names]
        self.w = [case.w[n].detach().requires_grad_(True) for n in names]
        self.shapes = [t.shape for t in self.w]
        self.sizes = [t.numel() for t in self.w]
        with torch.enable_grad():
            loss = case.inner_loss_fn(dict(zip(names, self.lam)), dict(zip(names, self.w)), case.train)
            self.grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, self.w, create_graph=True)])

    def _split(self, x: Tensor) -> list[Tensor]:
        return [t.view(s) for t, s in zip(x.split(self.sizes), self.shapes)]

    def hvp(self, v: Tensor) -> Tensor:
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(self.grad, self.w, v, retain_graph=True)])

    def neumann(self, b: Params, alpha: float, k: int) -> Tensor:
        v = p = torch.cat([b[self.case.bl_key[n]].reshape(-1) for n in self.case.names])
        for _ in range(k):
            v = v - alpha * self.hvp(v)
            p = p + v
        return alpha * p

    def hypergrad_cg(self, k: int) -> list[Tensor]:
        names = self.case.names
        w = dict(zip(names, self.w))
        b = torch.cat([g.reshape(-1) for g in torch.autograd.grad(self.case.outer_loss_fn(w, self.case.val), self.w)])
        x = torch.zeros_like(b)
        r = p = b
        rs = r.dot(r)
        for _ in range(k):
            ap = self.hvp(p)
            step = rs / p.dot(ap)
            x = x + step * p
            r = r - step * ap
            rs_new = r.dot(r)
            p = r + (rs_new / rs) * p
            rs = rs_new
        mixed = torch.autograd.grad(self.grad, self.lam, x, retain_graph=True)
        return [-m for m in mixed]


# ----------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", choices=["ridge", "mlp", "logreg", "all"], default="all")
    p.add_argument("--dims", default="100,300,1000", help="ridge dimensions d (n_train = n_val = 2d)")
    p.add_argument("--hidden", type=int, default=256, help="MLP hidden width H")
    p.add_argument("--n", type=int, default=4096, help="MLP training (and validation) examples N")
    p.add_argument("--k", type=int, default=10, help="Neumann terms / CG iterations / unroll steps")
    p.add_argument("--ks", default="", help="extra K values for the main table, e.g. 50")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="MLP and logreg: e^λ for every weight")
    p.add_argument("--logreg-n", type=int, default=8192, help="logreg (784-10, convex): training (and validation) examples")
    p.add_argument("--train-steps", type=int, default=400, help="MLP: full-batch Adam steps before measuring")
    p.add_argument("--data", choices=["fashion", "random"], default="fashion")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ridge-dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--targets", default="1e-2,1e-3", help="relative errors for the equal-accuracy table")
    p.add_argument("--scan-kmax-ridge", type=int, default=400)
    p.add_argument("--scan-kmax-mlp", type=int, default=150)
    p.add_argument("--ref-maxiter", type=int, default=2000, help="MLP reference: MINRES iterations at most")
    p.add_argument("--ref-rtol", type=float, default=1e-7, help="MLP reference: MINRES relative residual")
    p.add_argument("--ref-dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--mlp-reference", action="store_true",
                   help="MLP: compute the exact-solve reference by MINRES (slow; cached) for error columns and the scan")
    p.add_argument("--memory-ks", default="5,10,20,40", help="K values for the memory-vs-K table ('' to skip)")
    p.add_argument("--no-scan", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--profile-jvp", action="store_true", help="also time a whole Neumann solve with torch.func HVPs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cache-dir", default="~/.cache/bilevel/hypergrad_peers",
                   help="where the trained MLP inner point is kept between runs ('' to retrain every time)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# hypergrad_peers: torch {torch.__version__}, bilevel {bilevel.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads, load average {_LOAD:.1f} on {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}; "
          f"medians of {args.reps} runs after {args.warmup} warm-ups, contenders interleaved\n")
    contenders, skipped = available_contenders()
    targets = [float(t) for t in args.targets.split(",") if t]
    ks = [args.k] + [int(k) for k in args.ks.split(",") if k]
    mem = PeakMemory(device)
    rows: list[Row] = []
    cases: list[Case] = []
    dtype_ridge = getattr(torch, args.ridge_dtype)

    if args.problem in ("ridge", "all"):
        for d in [int(x) for x in args.dims.split(",") if x]:
            case = make_ridge_case(d, dtype=dtype_ridge, device=device, seed=args.seed)
            cases.append(case)
            for k in ks:
                rows.append(run_main(case, k, contenders, args))
    # classifiers: name -> (hidden width, N, reference?); logreg is convex (H positive definite), so its MINRES
    # reference is well posed and always computed; the MLP's only on request (see the module docstring)
    classifiers = {"mlp": (args.hidden, args.n, args.mlp_reference), "logreg": (0, args.logreg_n, True)}
    for name, (hidden, n, with_reference) in classifiers.items():
        if args.problem not in (name, "all"):
            continue
        case = make_mlp_case(hidden, n, weight_decay=args.weight_decay, train_steps=args.train_steps,
                             data=args.data, dtype=torch.float32, device=device, seed=args.seed,
                             cache_dir=args.cache_dir or None)
        if with_reference:
            mlp_reference(case, maxiter=args.ref_maxiter, rtol=args.ref_rtol, dtype=getattr(torch, args.ref_dtype),
                          cache_dir=args.cache_dir or None)
            print(f"[{name}] reference: {case.reference_note}")
        cases.append(case)
        for k in ks:
            rows.append(run_main(case, k, contenders, args))

    # memory of the main-table calls, measured after all timings (the pinned malloc slows allocation)
    if mem.ok:
        mem.pin_malloc()
        for row in rows:
            for label, make in row.makers.items():
                if label in row.seconds:
                    row.memory[label] = mem.measure(make())
        mem.unpin_malloc()
    print_main_table(rows, contenders, device)
    if skipped:
        print("\nSkipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))

    print("\n### bilevel unrolled vs higher on the same loop (K SGD steps, step α, from w)\n")
    for case in cases:
        print(f"- {case.name} {case.label}: {unrolled_vs_higher(case, args.k)}")

    if not args.no_scan:
        for case in cases:
            if case.reference is None:
                print(f"\n(equal-accuracy scan skipped for {case.name} {case.label}: no reference; --mlp-reference "
                      "computes one by MINRES, see the module docstring on why it is ill-posed at a trained MLP point)")
                continue
            kmax = args.scan_kmax_ridge if case.name == "ridge" else args.scan_kmax_mlp
            equal_accuracy(case, contenders, targets, kmax, args)

    if not args.no_profile:  # the MLP (compute-bound) and the smallest ridge (overhead-bound, like a small GPU problem)
        ridges = [c for c in cases if c.name == "ridge"]
        for case in [c for c in cases if c.name in ("mlp", "logreg")] + ridges[:1]:
            profile_bilevel(case, args.k, args, any(c.label == "TorchOpt CG" for c in contenders))

    mem_ks = [int(k) for k in args.memory_ks.split(",") if k]
    if mem_ks and mem.ok:
        mem.pin_malloc()
        for case in cases:
            if case.name == "mlp" or case is cases[-1]:
                memory_vs_k(case, contenders, mem_ks, mem)


if __name__ == "__main__":
    main()
