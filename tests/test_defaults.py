"""Default settings work without tuning: every method converges on every bundled problem and on the README's quick
start, whatever the scale of the losses.

Oracles: the ridge's F(λ) in closed form and its optimum F* computed by L-BFGS in the same test; the quadratic's
closed-form optimum λ*; each run's own first outer loss. Bounds sit at about twice the measured values (stated per
case) so that they hold on any CPU and thread count.
"""

from __future__ import annotations

import statistics
import warnings

import pytest
import torch

import bilevel
from bilevel.problems import hypercleaning_data, hypercleaning_problem, make_problem
from bilevel.problems.ridge import ridge_data, ridge_val_loss

F64 = torch.float64
SINGLE_LEVEL = ["ift", "cg", "minres", "exact", "unrolled", "f2sa", "lvhba"]


# ----- the README's quick start, with its losses scaled by 10⁻³, 1 and 10³ -------------------------------------------
@pytest.fixture(scope="module")
def quick_start():
    train, val = ridge_data(dim=8)
    lam = torch.zeros(8, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([lam], max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-12)

    def closure():
        opt.zero_grad()
        loss = ridge_val_loss(train, val, lam)
        loss.backward()
        return loss

    opt.step(closure)
    f_star = float(ridge_val_loss(train, val, lam.detach()))
    f_zero = float(ridge_val_loss(train, val, torch.zeros(8, dtype=F64)))
    return train, val, f_zero, f_star


def scaled_ridge(train, val, scale: float) -> bilevel.Problem:
    """The README's quick-start problem (losses written as sums), both losses multiplied by ``scale``."""

    def inner_loss(log_lam, w, batch):
        x, y = batch
        return scale * (0.5 * ((x @ w - y) ** 2).sum() + 0.5 * (log_lam.exp() * w**2).sum())

    def outer_loss(log_lam, w, batch):
        x, y = batch
        return scale * 0.5 * ((x @ w - y) ** 2).sum()

    return bilevel.Problem(outer=torch.zeros(8, dtype=F64, requires_grad=True), inner=torch.zeros(8, dtype=F64),
                           inner_loss=inner_loss, outer_loss=outer_loss, inner_data=train, outer_data=val)


# Remaining fraction of the gap F(λ₀) − F* after 150 default steps: measured 0.157 (ift), 0.019 (cg, minres, exact),
# 0.095 (unrolled), 0.319 (f2sa: its O(1/penalty) bias), 0.355 (lvhba); bounds about twice that.
QUICK_START_GAP = {"ift": 0.3, "cg": 0.05, "minres": 0.05, "exact": 0.05, "unrolled": 0.2, "f2sa": 0.6, "lvhba": 0.65}


@pytest.mark.parametrize("method", SINGLE_LEVEL)
def test_quick_start_converges_with_defaults_at_every_scale(quick_start, method):
    """With default settings (``bilevel.solve(problem, method, maxiter=150)``) the true F(λ) closes most of the gap
    to F* at every loss scale, with no error; and "auto" step sizes make the runs scale-free: λ after 150 steps is
    the same at scales 10⁻³ and 10³ as at 1 (rel 1e-2; measured ≤ 3e-4, rounding amplified over 150 steps)."""
    train, val, f_zero, f_star = quick_start
    outers = {}
    for scale in (1e-3, 1.0, 1e3):
        result = bilevel.solve(scaled_ridge(train, val, scale), method, maxiter=150)
        outers[scale] = result.outer
        gap = (float(ridge_val_loss(train, val, result.outer)) - f_star) / (f_zero - f_star)
        assert gap < QUICK_START_GAP[method], (scale, gap)
    for scale in (1e-3, 1e3):
        assert float((outers[scale] - outers[1.0]).norm() / outers[1.0].norm()) < 1e-2


def test_explicit_step_sizes_keep_their_meaning(quick_start):
    """An explicit number is used as given: inner_lr=0.1 (> 2/L ≈ 0.027 on the quick start) still diverges, as it
    did before "auto" existed, and the error says so."""
    train, val, _, _ = quick_start
    with pytest.raises(bilevel.BilevelError, match="not finite"):
        bilevel.solve(scaled_ridge(train, val, 1.0), "cg", maxiter=50, inner_lr=0.1)


# ----- the bundled problems -------------------------------------------------------------------------------------------
def test_quadratic_reaches_its_known_optimum_with_defaults():
    """The bundled quadratic (closed-form λ*): ‖λ − λ*‖/‖λ*‖ after 150 default steps, measured 0.0079 (ift), 0.0005
    (cg, minres, exact), 0.0047 (unrolled), 0.0127 (f2sa), 0.0218 (lvhba)."""
    bound = {"ift": 0.02, "cg": 0.002, "minres": 0.002, "exact": 0.002, "unrolled": 0.01, "f2sa": 0.03, "lvhba": 0.05}
    for method in SINGLE_LEVEL:
        problem, evaluate = make_problem("quadratic", seed=0)
        result = bilevel.solve(problem, method, maxiter=150, seed=0)
        assert evaluate(result)["rel_dist"] < bound[method], method


# (problem, options, steps, methods, largest final/first outer loss, smallest test accuracy); measured ratios:
# logreg_l2 0.19–0.56, spam 0.38–0.60, digits hyper-cleaning 0.13–0.21, Fashion-MNIST hyper-cleaning 0.23–0.46;
# accuracies 0.953–0.965, 0.932–0.939, 0.90–0.97, 0.72–0.79 (naive training on these noisy labels: about 0.5).
CASES = [
    ("logreg_l2", {}, 60, SINGLE_LEVEL, 0.8, 0.93),
    ("logreg_l2_spam", {}, 60, SINGLE_LEVEL, 0.8, 0.9),
    ("hypercleaning_small", {"source": "digits"}, 60, SINGLE_LEVEL, 0.4, 0.85),
    ("hypercleaning", {"n_train": 1000, "n_val": 300, "n_test": 1000}, 40,
     [m for m in SINGLE_LEVEL if m != "exact"], 0.7, 0.65),  # exact: 7850 unknowns, a dense 7850² system per step
]


@pytest.mark.parametrize("name, options, steps, methods, ratio, accuracy", CASES, ids=[c[0] for c in CASES])
def test_bundled_problems_converge_with_defaults(name, options, steps, methods, ratio, accuracy, debian_data):
    for method in methods:
        if name == "hypercleaning":
            data = debian_data(lambda: hypercleaning_data(0.5, seed=0, **options), "dataset-fashion-mnist")
            problem, evaluate = hypercleaning_problem(data)
        elif name == "logreg_l2_spam":
            problem, evaluate = debian_data(lambda: make_problem(name, seed=0), "r-cran-kernlab")
        else:
            problem, evaluate = make_problem(name, seed=0, **options)
        result = bilevel.solve(problem, method, maxiter=steps, seed=0)
        losses = result.history["outer_loss"]
        assert losses[-1] < ratio * losses[0], (method, losses[0], losses[-1])
        assert evaluate(result)["test_accuracy"] > accuracy, method


@pytest.mark.parametrize("method", ["maml", "imaml"])
def test_meta_learning_improves_with_defaults(method):
    """Sinusoid regression, 300 default meta-steps on batches of 8 tasks: the mean query loss of the last 20 steps is
    below 95% of the first 20's (measured 3.86 → 2.29 for maml, 4.44 → 3.69 for imaml)."""
    problem, _ = make_problem("sinusoid", seed=0, meta_batch=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.BilevelWarning)  # imaml's fallback on some tasks, by design
        losses = bilevel.solve(problem, method, maxiter=300, seed=0).history["outer_loss"]
    assert statistics.mean(losses[-20:]) < 0.95 * statistics.mean(losses[:20])


def test_auto_costs_are_counted_and_recorded(quick_start):
    """The curvature estimate's calls are in the oracle counts and its value in the history (cg: 1 gradient + 20 HVPs
    at the first step, 1 + 5 at every refresh)."""
    train, val, _, _ = quick_start
    auto = bilevel.solve(scaled_ridge(train, val, 1.0), "cg", maxiter=1, cg_maxiter=0)
    explicit = bilevel.solve(scaled_ridge(train, val, 1.0), "cg", maxiter=1, cg_maxiter=0, inner_lr=0.01, outer_lr=0.1)
    assert auto.oracle_calls["hvp"] - explicit.oracle_calls.get("hvp", 0) == 20
    assert auto.oracle_calls["grad_inner"] - explicit.oracle_calls["grad_inner"] == 1
    assert auto.history["curvature"][0] == pytest.approx(1.0 / auto.history["inner_lr"][0])
