r"""The contenders of the hypergradient benchmarks: ``make(case, K) -> run() -> [dF/dλ per parameter]`` for bilevel
(``implicit_hypergrad`` with Neumann, CG, mixed-precision CG; ``unrolled_hypergrad``), TorchOpt, higher, Betty and
plain autograd, with the list of them (:data:`CONTENDERS`) and a flat-vector prototype (:class:`FlatLinearization`).
Peers are imported lazily: :func:`available_contenders` skips, saying why, the ones that do not import."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from bilevel.hypergrad import implicit_hypergrad, unrolled_hypergrad
from bilevel.linsolve import cg, neumann
from bilevel.optim import sgd
from peers.cases import Case, Params

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
    """One column of the tables: its label, ``make(case, K) -> run``, its family and the package of a peer."""

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


class FlatLinearization:
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
