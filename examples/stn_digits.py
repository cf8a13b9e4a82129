"""Self-tuning networks on scikit-learn's digits (1797 8×8 images, ships offline): dropout and weight decay of an MLP.

Three ways to pick two dropout rates (input, hidden) and a weight decay for a 64-H-H-10 MLP, at an equal budget of
minibatch forward/backward passes:

* fixed: the hyperparameters the STN starts from, never changed;
* random search: ``--trials`` MLPs, each trained for budget/trials steps at random hyperparameters (dropout
  U(0, 0.8), weight decay log-U(1e-6, 1e-1)), the best on the validation split kept;
* STN (``method="stn"``, MacKay et al., 2019): one self-tuning MLP (``StnLinear`` layers), ``--steps`` outer steps of
  2 perturbed training steps + 1 hyperparameter step = 3·steps passes; the hyperparameters follow a schedule.

Prints test accuracy, the final hyperparameters and the wall time of each, then the STN's schedule.

    python examples/stn_digits.py [--steps 3000] [--trials 8] [--hidden 128] [--threads 1] [--seed 0]

One thread by default: at these sizes (128×128 matrices) two intra-op threads on a 2-core machine shared with other
work were 7–20× slower than one (measured), and all three methods run with the same setting.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel
from bilevel.problems.datasets import Splits, split_three, to_splits
from bilevel.stn import HyperParam, HyperSpace, StnLinear, dropout, weight_sq_norm

BATCH = 128
INIT = {"drop_in": 0.05, "drop_hidden": 0.05, "weight_decay": 1e-4}


def digits_splits(seed: int) -> Splits:
    """Digits split 50/25/25 into train/val/test, standardized with the training statistics."""
    from sklearn.datasets import load_digits

    data = load_digits()
    parts = split_three(data.data.astype(np.float64), data.target, (0.5, 0.25, 0.25), seed)
    return to_splits(parts, dtype=torch.float32, device="cpu", name="digits", y_dtype=torch.long)


def sampler(x: Tensor, y: Tensor, batch: int = BATCH):
    """A callable returning a random minibatch (torch's global generator, seeded by ``solve(seed=...)``)."""

    def draw() -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, x.shape[0], (batch,))
        return x[idx], y[idx]

    return draw


# ----- the self-tuning MLP ------------------------------------------------------------------------------------
class StnMLP(nn.Module):
    """64-H-H-10 MLP whose three layers are structured best responses to the hyperparameter features."""

    def __init__(self, n_in: int, hidden: int, n_out: int, n_hparams: int):
        super().__init__()
        self.fc1 = StnLinear(n_in, hidden, n_hparams)
        self.fc2 = StnLinear(hidden, hidden, n_hparams)
        self.fc3 = StnLinear(hidden, n_out, n_hparams)

    def forward(self, x: Tensor, feats: Tensor, drop_in: Tensor, drop_hidden: Tensor) -> Tensor:
        x = dropout(x, drop_in, self.training)
        h = dropout(F.relu(self.fc1(x, feats)), drop_hidden, self.training)
        h = dropout(F.relu(self.fc2(h, feats)), drop_hidden, self.training)
        return self.fc3(h, feats)


def stn_problem(splits: Splits, hidden: int) -> tuple[bilevel.Problem, HyperSpace]:
    space = HyperSpace([
        HyperParam("drop_in", "logit", INIT["drop_in"], high=0.9),
        HyperParam("drop_hidden", "logit", INIT["drop_hidden"], high=0.9),
        HyperParam("weight_decay", "softplus", INIT["weight_decay"]),
    ])
    net = StnMLP(splits.train.x.shape[1], hidden, 10, space.n_features)

    def inner_loss(hp: dict[str, Tensor], net: bilevel.functional.ModuleView, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        h, feats = space.constrained(hp), space.features(hp)
        logits = net(x, feats, h["drop_in"], h["drop_hidden"])
        return F.cross_entropy(logits, y) + 0.5 * (h["weight_decay"] * weight_sq_norm(net, feats)).mean()

    def outer_loss(hp: dict[str, Tensor], net: bilevel.functional.ModuleView, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch  # eval mode: no dropout; λ reaches L_V only through the best response ŵ_φ(λ)
        h = space.constrained(hp)
        return F.cross_entropy(net(x, space.features(hp), h["drop_in"], h["drop_hidden"]), y)

    problem = bilevel.Problem(outer=space, inner=net, inner_loss=inner_loss, outer_loss=outer_loss,
                              inner_data=sampler(*splits.train.astuple()), outer_data=sampler(*splits.val.astuple()),
                              name="stn_digits")
    return problem, space


def stn_accuracy(result: bilevel.Result, space: HyperSpace, x: Tensor, y: Tensor) -> float:
    net = result.inner_module().eval()
    with torch.no_grad():
        h = space.constrained(result.outer)
        logits = net(x, space.features(result.outer), h["drop_in"], h["drop_hidden"])
    return float((logits.argmax(-1) == y).float().mean())


# ----- plain MLP at fixed hyperparameters ---------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, n_in: int, hidden: int, n_out: int):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(n_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, n_out)

    def forward(self, x: Tensor, drop_in: float, drop_hidden: float) -> Tensor:
        x = F.dropout(x, drop_in, self.training)
        h = F.dropout(F.relu(self.fc1(x)), drop_hidden, self.training)
        h = F.dropout(F.relu(self.fc2(h)), drop_hidden, self.training)
        return self.fc3(h)


def train_fixed(splits: Splits, hp: dict[str, float], steps: int, hidden: int, seed: int) -> tuple[MLP, float]:
    """SGD 0.01, momentum 0.9 (the STN's inner optimizer) on CE + ½·wd·Σ‖W‖² for ``steps`` minibatches."""
    torch.manual_seed(seed)
    model = MLP(splits.train.x.shape[1], hidden, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    draw = sampler(*splits.train.astuple())
    weights = [model.fc1.weight, model.fc2.weight, model.fc3.weight]
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = draw()
        loss = F.cross_entropy(model(x, hp["drop_in"], hp["drop_hidden"]), y)
        loss = loss + 0.5 * hp["weight_decay"] * sum((w * w).sum() for w in weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), time.perf_counter() - t0


def accuracy(model: MLP, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x, 0.0, 0.0).argmax(-1) == y).float().mean())


def fmt(hp: dict[str, float]) -> str:
    return f"p_in {hp['drop_in']:.3f}, p_h {hp['drop_hidden']:.3f}, wd {hp['weight_decay']:.2e}"


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="STN outer steps (each 2 training + 1 validation pass)")
    parser.add_argument("--trials", type=int, default=8, help="random-search trials sharing the same budget")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=100, help="STN warm-up outer steps (weights only)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    splits = digits_splits(args.seed)
    (xv, yv), (xs, ys) = splits.val.astuple(), splits.test.astuple()
    solver = bilevel.solvers.STN(warmup_steps=args.warmup)
    budget = args.steps * (solver.train_steps + solver.val_steps)  # minibatch forward/backward passes
    rows = []

    # Fixed hyperparameters (the STN's starting point).
    model, wall = train_fixed(splits, INIT, budget, args.hidden, args.seed)
    rows.append(("fixed (STN init)", accuracy(model, xv, yv), accuracy(model, xs, ys), fmt(INIT), budget, wall))

    # Random search at the same total budget.
    rng = np.random.default_rng(args.seed)
    per_trial = budget // args.trials
    best, total_wall = None, 0.0
    for trial in range(args.trials):
        hp = {"drop_in": float(rng.uniform(0, 0.8)), "drop_hidden": float(rng.uniform(0, 0.8)),
              "weight_decay": float(10 ** rng.uniform(-6, -1))}
        model, wall = train_fixed(splits, hp, per_trial, args.hidden, args.seed + 1 + trial)
        total_wall += wall
        val_acc = accuracy(model, xv, yv)
        if best is None or val_acc > best[0]:
            best = (val_acc, accuracy(model, xs, ys), hp)
    rows.append((f"random search ({args.trials} × {per_trial})", best[0], best[1], fmt(best[2]),
                 per_trial * args.trials, total_wall))

    # Self-tuning network.
    problem, space = stn_problem(splits, args.hidden)
    t0 = time.perf_counter()
    result = bilevel.solve(problem, solver, maxiter=args.steps, seed=args.seed)
    wall = time.perf_counter() - t0
    final = {k: float(v) for k, v in space.constrained(result.outer).items()}
    rows.append(("STN (schedule)", stn_accuracy(result, space, xv, yv), stn_accuracy(result, space, xs, ys), fmt(final),
                 budget, wall))

    print()
    print(f"digits: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, MLP 64-{args.hidden}-"
          f"{args.hidden}-10, batch {BATCH}, {torch.get_num_threads()} threads")
    print("| method | val acc | test acc | final hyperparameters | passes | wall time (s) |")
    print("|---|---|---|---|---|---|")
    for name, va, te, hp, passes, secs in rows:
        print(f"| {name} | {va:.4f} | {te:.4f} | {hp} | {passes} | {secs:.1f} |")
    print(f"wall time relative to the fixed run: random search {rows[1][5] / rows[0][5]:.1f}×, "
          f"STN {rows[2][5] / rows[0][5]:.1f}×")

    print()
    print("STN schedule (constrained values at λ, perturbation scale σ in unconstrained units):")
    hist = result.history
    print("| step | p_in | p_h | wd | σ_in | σ_h | σ_wd | val loss |")
    print("|---|---|---|---|---|---|---|---|")
    n = len(hist["step"])
    for i in sorted({0, *[math.ceil(n * f) - 1 for f in (0.1, 0.25, 0.5, 0.75, 1.0)]}):
        print(f"| {int(hist['step'][i])} | {hist['hp/drop_in'][i]:.3f} | {hist['hp/drop_hidden'][i]:.3f} | "
              f"{hist['hp/weight_decay'][i]:.2e} | {hist['scale/drop_in'][i]:.3f} | {hist['scale/drop_hidden'][i]:.3f} | "
              f"{hist['scale/weight_decay'][i]:.3f} | {hist['outer_loss'][i]:.4f} |")
    return {name: te for name, _, te, *_ in rows}


if __name__ == "__main__":
    main()
