r"""Plain TPE versus the hybrid search on per-feature L2 selection (30 log-penalties, breast cancer), equal wall time.

The task: logistic regression with one penalty per feature,

.. math::
    \min_{\lambda \in \mathbb{R}^{30}} L_V(w^*(\lambda)),\qquad
    w^*(\lambda) = \arg\min_w \tfrac1n\textstyle\sum_i \ell(y_i, x_i^\top w + b) + \tfrac12 \sum_j e^{\lambda_j} w_j^2 .

- **plain TPE**: Optuna's TPE samples all 30 λ_j in [-6, 4]; each trial fits w*(λ) exactly (L-BFGS + Newton,
  ``bilevel.inner.solve_inner``) and scores L_V. The exact fit has no solver settings, so λ is all there is to sample.
- **hybrid**: TPE samples only the discrete choices — method (ift / cg / unrolled), outer step size, inner steps and
  the initial λ — and inside each trial ``bilevel.solve`` tunes the 30 λ_j by hypergradients; trials report L_V as
  they go and a median pruner stops poor ones. The trial's score is L_V(w*(λ_final)) with the same exact fit, so
  both searches are scored alike.

Both get the same wall-clock budget (``--budget`` seconds each; Optuna checks it between trials). The table gives
the best validation loss, the test loss and accuracy of w*(λ_best), the trials run and the time taken.

Run: ``python examples/optuna_hybrid_l2.py [--budget 40] [--seed 0]`` (about 2 × budget seconds).
"""

from __future__ import annotations

import argparse
import time

import optuna
import torch

import bilevel
from bilevel.inner import solve_inner
from bilevel.integrations.optuna import hybrid_objective, load_outer
from bilevel.problems.datasets import breast_cancer
from bilevel.problems.logreg_l2 import logistic_loss, logreg_l2_problem

LOW, HIGH = -6.0, 4.0  # range of each log-penalty for plain TPE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=40.0, help="seconds of search for each method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--maxiter", type=int, default=50, help="outer steps per hybrid trial")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 30-feature problem: threads only add overhead (and contention on a shared machine)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    splits = breast_cancer(seed=args.seed, dtype=torch.float64)
    problem, evaluate = logreg_l2_problem(splits)
    train, val = problem.inner_data, problem.outer_data

    def fit(lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """w*(λ) to ‖∇_w L_T‖ ≤ 1e-4 (L-BFGS, one Newton–CG polish)."""
        return solve_inner(problem, {"value": lam.detach()}, problem.inner_init, train, maxiter=200, gtol=1e-8, newton_steps=1)

    def val_loss(lam: torch.Tensor) -> float:
        return float(logistic_loss(fit(lam), val))

    rows = []

    # ----- no search: the problem's initial λ_j = -2 and a single default bilevel run ------------------------------
    t0 = time.perf_counter()
    lam0 = problem.outer_init["value"]
    rows.append(("no search (λ_j = -2)", 1, 0, val_loss(lam0), evaluate(fit(lam0)), time.perf_counter() - t0))
    t0 = time.perf_counter()
    single = bilevel.solve(problem, "ift", maxiter=args.maxiter, seed=args.seed)
    lam1 = single.outer.detach()
    rows.append(("one bilevel run (ift defaults)", 1, 0, val_loss(lam1), evaluate(fit(lam1)), time.perf_counter() - t0))

    # ----- plain TPE over the 30 log-penalties ---------------------------------------------------------------------
    def plain_objective(trial: optuna.Trial) -> float:
        lam = torch.tensor([trial.suggest_float(f"lam{j}", LOW, HIGH) for j in range(lam0.numel())], dtype=lam0.dtype)
        return val_loss(lam)

    t0 = time.perf_counter()
    plain = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=args.seed))
    plain.optimize(plain_objective, timeout=args.budget, catch=(bilevel.BilevelError,))
    plain_time = time.perf_counter() - t0
    best_lam = torch.tensor([plain.best_params[f"lam{j}"] for j in range(lam0.numel())], dtype=lam0.dtype)
    rows.append(("plain TPE (30 λ_j)", *_counts(plain), plain.best_value, evaluate(fit(best_lam)), plain_time))

    # ----- hybrid: TPE over discrete choices, bilevel over the 30 λ_j ------------------------------------------------
    def build(trial: optuna.Trial):
        start = trial.suggest_categorical("log_lam0", [-4.0, -2.0, 0.0])
        trial_problem, _ = logreg_l2_problem(splits, log_lam0=start)
        return trial_problem, {
            "method": trial.suggest_categorical("method", ["ift", "cg", "unrolled"]),
            "outer_lr": trial.suggest_categorical("outer_lr", [0.03, 0.1, 0.3, 1.0]),
            "inner_steps": trial.suggest_categorical("inner_steps", [5, 10, 20]),
        }

    objective = hybrid_objective(build, maxiter=args.maxiter, report_every=5, seed=args.seed,
                                 value=lambda result: val_loss(result.outer.detach()))
    t0 = time.perf_counter()
    hybrid = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=args.seed),
                                 pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=10))
    hybrid.optimize(objective, timeout=args.budget, catch=(bilevel.BilevelError,))
    hybrid_time = time.perf_counter() - t0
    best_lam = load_outer(hybrid.best_trial, problem)
    rows.append(("hybrid (TPE choices + bilevel λ)", *_counts(hybrid), hybrid.best_value, evaluate(fit(best_lam)), hybrid_time))

    print(f"breast_cancer: {len(train[0])} train / {len(val[0])} val / {len(splits.test)} test, 30 log-penalties; "
          f"budget {args.budget:.0f} s per search, seed {args.seed}")
    print(f"{'search':34s} {'trials':>7s} {'pruned':>7s} {'best val loss':>14s} {'test loss':>10s} {'test acc':>9s} "
          f"{'time (s)':>9s}")
    for name, n, pruned, best, test, seconds in rows:
        print(f"{name:34s} {n:7d} {pruned:7d} {best:14.4f} {test['test_loss']:10.4f} {test['test_accuracy']:9.3f} "
              f"{seconds:9.1f}")
    print(f"hybrid best choices: {hybrid.best_params}")


def _counts(study: optuna.Study) -> tuple[int, int]:
    states = [t.state for t in study.trials]
    return len(states), sum(s == optuna.trial.TrialState.PRUNED for s in states)


if __name__ == "__main__":
    main()
