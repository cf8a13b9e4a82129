r"""Hypergradients along a hyperparameter run: bilevel's warm-started and recycled-curvature CG against TorchOpt.

``hypergrad_peers.py`` times one hypergradient at one point. A hyperparameter run asks for one per outer step at
points that move little from one step to the next, and what a solver carries from one step to the next (its last
solution, curvature it met) can take most of the work off the next solve. This script measures that, at equal
accuracy, on the same sequence of points for every contender:

1. The trajectory: T outer steps of Adam on λ (one weight decay per weight, ``--outer-lr``) driven by the reference
   hypergradient, each at w_t ≈ w*(λ_t) (ridge: the closed form; logreg: ``--inner-iters`` L-BFGS iterations warm-started
   from w_{t−1}). The reference at each point: ridge, the closed form; logreg, CG to a 1e-10 residual in float64.
2. Each contender computes dF/dλ at every point with the smallest K (Hessian-vector products / CG iterations) whose
   result is within ``--target`` relative error of the reference, carrying its own state along the run; K is found by
   searching up or down from the previous step's K.
3. The calls at those K are timed, contenders interleaved round-robin (medians of ``--reps``), in grad-equivalents
   (one inner-loss gradient on the same data, timed in the same rounds).

Contenders (implicit hypergradient dF/dλ = ∂_λ L_V − (∂²_{wλ} L_T)ᵀ H⁻¹ ∂_w L_V at the same point):

* TorchOpt CG: ``custom_root(optimality, solve=solve_cg(maxiter=K))``, as documented (every solve starts from 0);
* TorchOpt CG warm (by hand): the same, with a ``solve`` closure passing the previous solution as ``init``: what a
  user who writes it gets;
* bilevel CG cold: ``implicit_hypergrad(solve=partial(cg, maxiter=K))``;
* bilevel CG warm: the same with ``x0`` = the previous solution (what ``solve(problem, "cg")`` does by default);
* bilevel CG warm + L-BFGS: also preconditioned by the L-BFGS matrix of the latest 10 curvature pairs the previous
  solves met (``cg(preconditioner=lbfgs_preconditioner(pairs), record_pairs=10)`` and ``recycle_pairs``, as
  ``solve(..., cg_preconditioner="lbfgs")`` does; Morales & Nocedal, 2000); building the preconditioner is inside
  the timed call;
* Betty Neumann (optional): ``betty.hypergradient.get_grads`` with ``type="neumann"`` (step α = 1/L), as in
  ``hypergrad_peers.py``; nothing is carried over (Betty's Neumann has no initial guess). The truncated Neumann
  series converges like (1 − 1/κ)^K, so it may not reach the target within ``--kmax`` (reported, then dropped).

The MLP of ``hypergrad_peers.py`` is left out: its Hessian at trained points is indefinite, where CG has no
guarantee (bilevel's checked CG refuses it) and no reference is well posed.

Run: ``.venv/bin/python benchmarks/hypergrad_trajectory.py`` (2-core CPU: about 5 minutes; needs ``torchopt``; Betty
optional); ``--device cuda`` on a GPU.
"""

# ruff: noqa: E402  (hypergrad_peers sets OMP_WAIT_POLICY before torch is imported)
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hypergrad_peers as peers
import torch
from torch import Tensor

import bilevel
from bilevel.hypergrad import implicit_hypergrad
from bilevel.linsolve import cg
from bilevel.optim import adam
from bilevel.precondition import lbfgs_preconditioner, recycle_pairs
from bilevel.problems.ridge import ridge_hypergrad, ridge_solution

Params = dict[str, Tensor]
PAIRS = 10  # curvature pairs kept for the recycled preconditioner


# ----------------------------------------------------------------------------------------------------------------------
# the trajectory
# ----------------------------------------------------------------------------------------------------------------------
def adam_steps(lam0: Params, steps: int, lr: float, point_at: Callable[[Params], peers.Case]) -> list[peers.Case]:
    """The cases at T points (each with its reference hypergradient): λ_{t+1} = Adam step (``bilevel.optim.adam``)
    on λ_t with the reference hypergradient at (λ_t, w*(λ_t))."""
    opt = adam(lr)
    lam = {k: v.detach().clone() for k, v in lam0.items()}
    state = opt.init(lam)
    points = []
    for _ in range(steps):
        case = point_at(lam)
        points.append(case)
        like = lam[case.names[0]]
        pieces = case.reference.to(like.device, like.dtype).split([lam[k].numel() for k in case.names])
        grads = {k: g.reshape(lam[k].shape) for k, g in zip(case.names, pieces)}
        lam, state = opt.update(lam, grads, state)
    return points


def ridge_trajectory(dim: int, steps: int, lr: float, seed: int, device: torch.device | None = None) -> list[peers.Case]:
    """Per-weight ridge (float64), w_t = w*(λ_t) exactly, reference = closed form."""
    base = peers.make_ridge_case(dim, dtype=torch.float64, device=device or torch.device("cpu"), seed=seed)

    def point_at(lam: Params) -> peers.Case:
        lam_t = lam["w"].detach().clone().requires_grad_(True)
        w = ridge_solution(base.train, lam_t.detach())
        reference = ridge_hypergrad(base.train, base.val, lam_t.detach()).cpu()
        problem = dataclasses.replace(base.problem, outer=lam_t)
        return dataclasses.replace(base, lam={"w": lam_t}, w={"w": w}, problem=problem, reference=reference)

    return adam_steps(base.lam, steps, lr, point_at)


def logreg_trajectory(n: int, steps: int, lr: float, inner_iters: int, seed: int, cache_dir: str | None,
                      device: torch.device | None = None) -> list[peers.Case]:
    """784-10 logistic regression on Fashion-MNIST (float32), w_t by L-BFGS from w_{t−1}; reference: float64 CG."""
    base = peers.make_mlp_case(0, n, weight_decay=1e-2, train_steps=400, data="fashion", dtype=torch.float32,
                               device=device or torch.device("cpu"), seed=seed, cache_dir=cache_dir)
    w = {k: v.clone() for k, v in base.w.items()}

    def point_at(lam: Params) -> peers.Case:
        lam_t = {k: v.detach().clone().requires_grad_(True) for k, v in lam.items()}
        w_var = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        opt = torch.optim.LBFGS(list(w_var.values()), lr=1, max_iter=inner_iters, history_size=20,
                                tolerance_grad=1e-7, tolerance_change=0.0, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = base.inner_loss_fn({k: v.detach() for k, v in lam_t.items()}, w_var, base.train)
            loss.backward()
            return loss

        opt.step(closure)
        w.update({k: v.detach() for k, v in w_var.items()})
        case = dataclasses.replace(base, lam=lam_t, w={k: v.clone() for k, v in w.items()})
        case64 = peers.cast_case(case, torch.float64)
        hg = implicit_hypergrad(case64.problem, case64.bl_outer(), case64.bl_inner(), inner_batch=case64.train,
                                        outer_batch=case64.val, solve=functools.partial(cg, maxiter=5000, rtol=1e-10))
        case.reference = case64.flat_bl(hg.hypergrad).cpu()
        return case

    return adam_steps(base.lam, steps, lr, point_at)


# ----------------------------------------------------------------------------------------------------------------------
# contenders: make(case, K, carried) -> (runner, carried after the call)
# ----------------------------------------------------------------------------------------------------------------------
Carried = dict[str, Any]  # what a contender keeps from one outer step to the next
Runner = Callable[[], tuple[list[Tensor], Carried]]


def bilevel_runner(warm: bool, precondition: bool) -> Callable[[peers.Case, int, Carried], Runner]:
    def make(case: peers.Case, k: int, carried: Carried) -> Runner:
        outer, inner = case.bl_outer(), case.bl_inner()
        x0 = carried.get("x") if warm else None
        pairs = carried.get("pairs", ())

        def run() -> tuple[list[Tensor], Carried]:
            extra: dict[str, Any] = {}
            if precondition:
                extra = {"record_pairs": PAIRS, "preconditioner": lbfgs_preconditioner(pairs, memory=PAIRS)}
            solve = functools.partial(cg, maxiter=k, rtol=0.0, **extra)
            hg = implicit_hypergrad(case.problem, outer, inner, inner_batch=case.train, outer_batch=case.val,
                                            solve=solve, x0=x0)
            kept = recycle_pairs(pairs, hg.linsolve.pairs, memory=PAIRS)
            return [hg.hypergrad[case.bl_key[n]] for n in case.names], {"x": hg.linsolve.x, "pairs": kept}

        return run

    return make


def torchopt_runner(warm: bool) -> Callable[[peers.Case, int, Carried], Runner]:
    """``hypergrad_peers.torchopt_cg``; warm: started from, and keeping, its previous CG solution (a user's closure)."""
    def make(case: peers.Case, k: int, carried: Carried) -> Runner:
        kept: Carried = {}
        run = peers.torchopt_cg(case, k, init=carried.get("x") if warm else None, kept=kept)
        return lambda: (run(), {"x": kept["x"]})

    return make


def betty_runner(case: peers.Case, k: int, carried: Carried) -> Runner:
    """Betty's Neumann hypergradient (``hypergrad_peers.betty_neumann``, step α = 1/L): nothing carried over."""
    run = peers.betty_neumann(case, k)
    return lambda: (run(), {})


CONTENDERS: dict[str, Callable[[peers.Case, int, Carried], Runner]] = {
    "TorchOpt CG": torchopt_runner(warm=False),
    "TorchOpt CG warm (by hand)": torchopt_runner(warm=True),
    "bilevel CG cold": bilevel_runner(warm=False, precondition=False),
    "bilevel CG warm": bilevel_runner(warm=True, precondition=False),
    "bilevel CG warm + L-BFGS": bilevel_runner(warm=True, precondition=True),
}


PEERS = ("TorchOpt CG", "TorchOpt CG warm (by hand)", "Betty Neumann")  # the ratio columns, when present


def smallest_k(make: Callable[[peers.Case, int, Carried], Runner], case: peers.Case, carried: Carried, guess: int,
               target: float, kmax: int) -> tuple[int, float, Carried] | None:
    """The smallest K reaching ``target``, its error and carried state, or None if K = ``kmax`` does not reach it.

    Galloping from ``guess`` (steps 1, 2, 4, … down while the target holds, up while it does not), then bisection
    between the last K that missed and the first that met it: a few evaluations when K moves little from one outer
    step to the next, O(log K) when it is far off (Neumann)."""
    cache: dict[int, tuple[float, Carried]] = {}

    def meets(k: int) -> bool:
        if k not in cache:
            out, after = make(case, k, carried)()
            cache[k] = (peers.rel_err(out, case.reference), after)
        return cache[k][0] <= target

    k, step = max(1, min(guess, kmax)), 1
    if meets(k):
        hi, lo = k, 0  # meets(hi); lo = 0 or a K that misses
        while hi - step >= 1 and meets(hi - step):
            hi, step = hi - step, 2 * step
        lo = max(0, hi - step)
    else:
        lo = k
        while lo < kmax and not meets(min(lo + step, kmax)):
            lo, step = min(lo + step, kmax), 2 * step
        if lo >= kmax:
            return None
        hi = min(lo + step, kmax)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    return hi, cache[hi][0], cache[hi][1]


@dataclasses.dataclass
class Trace:
    ks: list[int] = dataclasses.field(default_factory=list)
    errors: list[float] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)


def run_trajectory(title: str, points: list[peers.Case], contenders: dict[str, Callable], args: argparse.Namespace) -> None:
    labels = list(contenders)
    carried: dict[str, Carried] = {label: {} for label in labels}
    guess: dict[str, int] = {label: 10 for label in labels}
    traces = {label: Trace() for label in labels}
    missed: dict[str, str] = {}
    units: list[float] = []
    t0 = time.perf_counter()
    for t, case in enumerate(points, start=1):
        runners: dict[str, Callable[[], list[Tensor]]] = {"one gradient": peers.one_gradient(case, 0)}
        for label in labels:
            if label in missed:
                continue
            make = contenders[label]
            found = smallest_k(make, case, carried[label], guess[label], args.target, args.kmax)
            if found is None:
                missed[label] = f"target not reached within K = {args.kmax} at step {t}"
                continue
            k, err, after = found
            run = make(case, k, carried[label])
            runners[label] = lambda run=run: run()[0]
            traces[label].ks.append(k)
            traces[label].errors.append(err)
            carried[label], guess[label] = after, k
        seconds, _, failed = peers.time_round_robin(runners, case.device, args.reps, 1)
        if failed:
            raise RuntimeError(f"timing failed: {failed}")
        units.append(seconds["one gradient"])
        for label in labels:
            if label not in missed:
                traces[label].seconds.append(seconds[label])
    unit = sum(units) / len(units)
    print(f"\n### {title}: {len(points)} outer steps, every hypergradient within {args.target:g} of the reference "
          f"(one gradient {unit * 1e3:.3g} ms; {time.perf_counter() - t0:.0f} s)\n")
    totals = {label: sum(tr.seconds) for label, tr in traces.items() if label not in missed}
    peer_labels = [label for label in PEERS if label in totals]
    print("| contender | K per step (first → last; mean) | grad-eq per hypergradient | total ms | "
          + " | ".join(f"{peer} / this" for peer in peer_labels) + " | max error |")
    print("|---|---|---|---|" + "---|" * len(peer_labels) + "---|")
    for label, tr in traces.items():
        if label in missed:
            print(f"| {label} | {missed[label]} |" + " |" * (3 + len(peer_labels)))
            continue
        ks = tr.ks
        ratios = " | ".join(f"{totals[peer] / totals[label]:.2f}" for peer in peer_labels)
        print(f"| {label} | {', '.join(map(str, ks[:3]))} … {ks[-1]}; {sum(ks) / len(ks):.1f} | "
              f"{totals[label] / len(ks) / unit:.1f} | {totals[label] * 1e3:.0f} | {ratios} | {max(tr.errors):.1e} |")
    mean_k = {label: sum(tr.ks) / len(tr.ks) for label, tr in traces.items() if label not in missed}
    if {"bilevel CG cold", "bilevel CG warm", "bilevel CG warm + L-BFGS"} <= set(mean_k):
        best = mean_k["bilevel CG warm + L-BFGS"]
        print(f"\nMean K (Hessian-vector products per hypergradient): cold / warm + L-BFGS = "
              f"{mean_k['bilevel CG cold'] / best:.2f}, warm / warm + L-BFGS = {mean_k['bilevel CG warm'] / best:.2f}")
    steady = slice(len(points) // 2, None)
    late = {label: sum(tr.seconds[steady]) for label, tr in traces.items() if label not in missed}
    print(f"\nSecond half of the run (steps {len(points) // 2 + 1}–{len(points)}): TorchOpt CG / bilevel CG warm + L-BFGS = "
          f"{late['TorchOpt CG'] / late['bilevel CG warm + L-BFGS']:.2f}, TorchOpt CG warm (by hand) / bilevel CG warm + "
          f"L-BFGS = {late['TorchOpt CG warm (by hand)'] / late['bilevel CG warm + L-BFGS']:.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", choices=["ridge", "logreg", "all"], default="all")
    p.add_argument("--dims", default="100,1000", help="ridge dimensions d")
    p.add_argument("--logreg-n", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20, help="outer steps T")
    p.add_argument("--outer-lr", type=float, default=0.05, help="Adam step on λ")
    p.add_argument("--inner-iters", type=int, default=30, help="logreg: L-BFGS iterations per outer step")
    p.add_argument("--target", type=float, default=1e-3, help="relative error every hypergradient must reach")
    p.add_argument("--kmax", type=int, default=300)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--cache-dir", default="~/.cache/bilevel/hypergrad_peers")
    args = p.parse_args(argv)
    print(f"# hypergrad_trajectory: torch {torch.__version__}, bilevel {bilevel.__version__}, device {args.device}, "
          f"{torch.get_num_threads()} threads; target relative error {args.target:g}; medians of {args.reps}")
    try:
        import torchopt  # noqa: F401
    except Exception as e:  # noqa: BLE001
        sys.exit(f"TorchOpt is needed for this comparison ({e}); pip install torchopt==0.7.3")
    contenders = dict(CONTENDERS)
    try:
        import betty  # noqa: F401

        contenders["Betty Neumann"] = betty_runner
    except Exception as e:  # noqa: BLE001 - optional peer
        print(f"(Betty skipped: {e}; pip install --no-deps betty-ml==0.1.1)")
    if args.problem in ("ridge", "all"):
        for d in [int(x) for x in args.dims.split(",") if x]:
            points = ridge_trajectory(d, args.steps, args.outer_lr, args.seed, torch.device(args.device))
            run_trajectory(f"ridge d={d} (float64, n=2d)", points, contenders, args)
    if args.problem in ("logreg", "all"):
        points = logreg_trajectory(args.logreg_n, args.steps, args.outer_lr, args.inner_iters, args.seed,
                                   args.cache_dir or None, torch.device(args.device))
        run_trajectory(f"logistic regression 784-10, N={args.logreg_n} (float32, Fashion-MNIST)", points, contenders, args)


if __name__ == "__main__":
    main()
