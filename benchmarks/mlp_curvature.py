r"""Is the MLP's inner Hessian positive definite once the inner problem is solved further? (Why the README leaves the
MLP out of every equal-accuracy comparison.)

The point is the MLP case of ``hypergrad_peers.py`` (784-H-H-10 on Fashion-MNIST, N training examples, one weight
decay e^λ per weight, w after ``--train-steps`` full-batch Adam steps; the same cached point). From there this script
runs ``--lbfgs-iters`` further full-batch L-BFGS iterations on L_T (strong-Wolfe line search), printing ‖∇_w L_T‖ as
it goes, and then, at the start point and at the end point, runs bilevel's checked conjugate gradient on
H x = ∂_w L_V (H = ∂²_ww L_T, Hessian-vector products by double backward on one retained graph). Checked CG stops
with an error at the first direction p with pᵀHp ≤ 0: such a direction proves H is not positive definite there, so
CG has no convergence guarantee and H⁻¹∂_w L_V (the implicit hypergradient's linear system) is ill-posed.

Run: ``.venv/bin/python benchmarks/mlp_curvature.py`` (2-core CPU, defaults: a few minutes, mostly the L-BFGS
iterations; the Adam point is cached under ``--cache-dir`` as in ``hypergrad_peers.py``).
"""

# ruff: noqa: E402  (hypergrad_peers sets OMP_WAIT_POLICY before torch is imported)
from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hypergrad_peers as peers
import torch

import bilevel
from bilevel import oracles, tree
from bilevel.linsolve import cg


def curvature_check(case: peers.Case, w: dict[str, torch.Tensor], maxiter: int) -> str:
    """Run checked CG on H x = ∂_w L_V at w; say where it met non-positive curvature, or how far it got."""
    point = dict(case.bl_inner())
    point.update({case.bl_key[k]: v for k, v in w.items()})
    lin = oracles.Linearization(case.problem, case.bl_outer(), point, case.train)
    b = tree.detach(oracles.grad_outer(case.problem, case.bl_outer(), point, case.val)[2])
    grad_norm = float(tree.norm(tree.detach(lin.grad)))
    try:
        out = cg(lin.hvp, b, maxiter=maxiter, rtol=1e-6)
    except bilevel.BilevelError as e:
        found = re.search(r"pᵀAp=(\S+) at iteration (\d+)", str(e))
        where = f"non-positive curvature pᵀHp = {found.group(1)} at iteration {found.group(2)}" if found else str(e)
        return f"‖∇_w L_T‖ = {grad_norm:.3g}; checked CG: {where}"
    return (f"‖∇_w L_T‖ = {grad_norm:.3g}; checked CG: no non-positive curvature within {out.iterations} iterations "
            f"(relative residual {float(out.residual):.2e})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256, help="MLP hidden width H")
    p.add_argument("--n", type=int, default=4096, help="training (and validation) examples N")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="e^λ for every weight")
    p.add_argument("--train-steps", type=int, default=400, help="full-batch Adam steps before (hypergrad_peers' point)")
    p.add_argument("--lbfgs-iters", type=int, default=3000, help="further full-batch L-BFGS iterations on L_T")
    p.add_argument("--report-every", type=int, default=500)
    p.add_argument("--cg-maxiter", type=int, default=500)
    p.add_argument("--data", choices=["fashion", "random"], default="fashion")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cache-dir", default="~/.cache/bilevel/hypergrad_peers")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# mlp_curvature: torch {torch.__version__}, bilevel {bilevel.__version__}, {torch.get_num_threads()} threads")
    case = peers.make_mlp_case(args.hidden, args.n, weight_decay=args.weight_decay, train_steps=args.train_steps,
                               data=args.data, dtype=torch.float32, device=torch.device("cpu"), seed=args.seed,
                               cache_dir=args.cache_dir or None)
    lam = {k: v.detach() for k, v in case.lam.items()}
    print(f"after {args.train_steps} Adam steps: {curvature_check(case, case.w, args.cg_maxiter)}")

    w = {k: v.detach().clone().requires_grad_(True) for k, v in case.w.items()}
    opt = torch.optim.LBFGS(list(w.values()), lr=1, max_iter=args.report_every, tolerance_grad=0.0,
                            tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = case.inner_loss_fn(lam, w, case.train)
        loss.backward()
        return loss

    t0, done, first = time.perf_counter(), 0, next(iter(w.values()))
    while done < args.lbfgs_iters:
        opt.param_groups[0]["max_iter"] = min(args.report_every, args.lbfgs_iters - done)
        opt.step(closure)
        done_now = opt.state[first]["n_iter"]  # cumulative over step() calls
        if done_now == done:  # the line search made no progress: L-BFGS has stopped
            print(f"L-BFGS stopped making progress after {done} iterations")
            break
        done = done_now
        loss = float(closure().detach())  # the gradient at the current point
        grad_norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in w.values())))
        print(f"L-BFGS iteration {done}: L_T = {loss:.6f}, ‖∇_w L_T‖ = {grad_norm:.3g} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    print(f"after {done} further L-BFGS iterations: {curvature_check(case, tree.detach(w), args.cg_maxiter)}")


if __name__ == "__main__":
    main()
