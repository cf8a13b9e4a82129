"""custom_root with each family of optimality conditions, on scikit-learn's diabetes data (442 × 10, standardised).

For each family the solver is ordinary code (``torch.optim.LBFGS``, ISTA, projected gradient, a linear solve), the
optimality condition comes from ``bilevel.optimality``, and the implicit derivative of a validation loss in the
hyperparameter is printed beside central finite differences of the same solver:

1. stationarity — ridge regression, d/dλ of the validation loss, solver L-BFGS;
2. proximal gradient — Lasso, the same derivative (it exists where the support is stable), solver ISTA;
3. projected gradient — stacking: simplex weights over the 10 one-feature regressors, solver projected gradient,
   derivative in the temperature θ that scales the predictions;
4. KKT — least squares with the weights summing to one (an equality), solver the KKT linear system.

    .venv/bin/python examples/implicit_conditions.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_diabetes

from bilevel.implicit import custom_root
from bilevel.optimality import kkt, projected_gradient, prox_l1, proximal_gradient, stationarity
from bilevel.projections import simplex

D = torch.float64


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_diabetes(return_X_y=True)
    x, y = torch.as_tensor(x, dtype=D), torch.as_tensor(y, dtype=D)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    return x[:300], y[:300], x[300:], y[300:]


XT, YT, XV, YV = data()


def val_loss(w: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((XV @ w - YV) ** 2).mean()


def report(name: str, f, hyper: float, eps: float = 1e-5) -> None:
    """d/dθ val_loss(solver(θ)) by the implicit rule (autograd through custom_root) and by central differences."""
    theta = torch.tensor(hyper, dtype=D, requires_grad=True)
    (analytic,) = torch.autograd.grad(val_loss(f(theta)), theta)
    with torch.no_grad():
        numeric = (val_loss(f(torch.tensor(hyper + eps, dtype=D))) - val_loss(f(torch.tensor(hyper - eps, dtype=D)))) / (2 * eps)
    print(f"{name:<34} implicit {float(analytic): .8f}   finite difference {float(numeric): .8f}   "
          f"rel. difference {abs(float(analytic - numeric)) / max(abs(float(numeric)), 1e-12):.1e}")


# 1. stationarity: ridge, solved by L-BFGS --------------------------------------------------------------------------
def ridge_objective(w, lam):
    return 0.5 * ((XT @ w - YT) ** 2).mean() + 0.5 * lam * (w**2).sum()


@custom_root(stationarity(ridge_objective), solve="cg")
def ridge(init, lam):
    w = init.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=1000, tolerance_grad=1e-13, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ridge_objective(w, lam)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


# 2. proximal gradient: Lasso, solved by ISTA ---------------------------------------------------------------------------
STEP = float(1.0 / torch.linalg.matrix_norm(XT / XT.shape[0] ** 0.5, 2) ** 2)


def squared_error(w, lam):
    return 0.5 * ((XT @ w - YT) ** 2).mean()


@custom_root(proximal_gradient(squared_error, prox_l1, step=STEP), solve="exact")
def lasso(init, lam):
    w = init.clone()
    for _ in range(4000):
        w = prox_l1(w - STEP * XT.T @ (XT @ w - YT) / XT.shape[0], STEP, lam)
    return w


# 3. projected gradient: simplex weights over the one-feature regressors ----------------------------------------------
COEF = (XT * YT[:, None]).mean(0) / (XT**2).mean(0)  # one-feature least-squares slopes
SINGLE = XT * COEF  # each column: one feature's prediction
project = simplex()


def stacking_objective(a, temperature):
    return 0.5 * ((temperature * SINGLE @ a - YT) ** 2).mean()


@custom_root(projected_gradient(stacking_objective, project, step=0.5), solve="exact")
def stacking(init, temperature):
    a = init.clone()
    for _ in range(4000):
        a = project(a - 0.5 * temperature * SINGLE.T @ (temperature * SINGLE @ a - YT) / SINGLE.shape[0])
    return a


# 4. KKT: least squares with weights summing to one -------------------------------------------------------------------
def constrained_objective(w, lam):
    return 0.5 * ((XT @ w - YT) ** 2).mean() + 0.5 * lam * (w**2).sum()


@custom_root(kkt(constrained_objective, eq=lambda w, lam: w.sum().reshape(1) - 1.0), solve="exact")
def constrained(init, lam):
    n = XT.shape[1]
    h = XT.T @ XT / XT.shape[0] + lam * torch.eye(n, dtype=D)
    system = torch.cat([torch.cat([h, torch.ones(n, 1, dtype=D)], 1),
                        torch.cat([torch.ones(1, n, dtype=D), torch.zeros(1, 1, dtype=D)], 1)])
    z = torch.linalg.solve(system, torch.cat([XT.T @ YT / XT.shape[0], torch.ones(1, dtype=D)]))
    return z[:n], z[n:], torch.zeros(0, dtype=D)


def main() -> None:
    zeros = torch.zeros(10, dtype=D)
    report("1. stationarity (ridge, L-BFGS)", lambda t: ridge(zeros, t), 0.3)
    report("2. proximal gradient (Lasso, ISTA)", lambda t: lasso(zeros, t), 0.05)
    support = int((lasso(zeros, torch.tensor(0.05, dtype=D)).abs() > 1e-10).sum())
    print(f"   Lasso support at λ = 0.05: {support} of 10 features")
    start = torch.full((10,), 0.1, dtype=D)
    report("3. projected gradient (simplex)", lambda t: t * _stack_w(stacking(start, t)), 1.2)
    report("4. KKT (weights summing to one)", lambda t: constrained(None, t)[0], 0.1)


def _stack_w(a: torch.Tensor) -> torch.Tensor:
    """Stacking weights a as a linear model's weights: the prediction T·Σ_j a_j c_j x_j is x·(T a ⊙ c)."""
    return a * COEF


if __name__ == "__main__":
    main()
