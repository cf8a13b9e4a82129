"""bilevel's hypergradients against peer libraries on the same computation (issue 2).

* Unrolled: oracle = higher 0.2.1 (``innerloop_ctx`` with its differentiable ``torch.optim.SGD``/``Adam``), an
  independent reverse-mode implementation of the same K inner steps from the same w; tolerance max |Δ| ≤ 1e-6 in
  float64 (the issue's bound), and ≤ 1e-6·max|g| (the two agree to rounding).
* Implicit: the contenders of ``benchmarks/hypergrad_peers.py`` on a small float64 ridge at the exact w*(λ):
  bilevel Neumann against a plain-autograd Neumann loop and Betty's ``neumann``, bilevel CG against TorchOpt's
  ``custom_root`` + ``solve_cg`` (same iterates: rtol 1e-9), and CG to convergence against the closed form (rtol 1e-8).
  TorchOpt and Betty are optional (``bench`` extra); those cases skip without them.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel.optim import adam, sgd
from bilevel.problems.ridge import ridge_data, ridge_problem

higher = pytest.importorskip("higher")

K = 5  # inner steps


def _mlp_case(seed: int = 0):
    """A small float64 MLP 12-8-8-3 classifier, one weight-decay hyperparameter per weight."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    lam = {k: (math.log(1e-2) + 0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).requires_grad_(True)
           for k, p in module.named_parameters()}
    x = torch.randn(48, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=gen)
    train, val = (x[:24], y[:24]), (x[24:], y[24:])

    def inner_loss(lam_, view, batch):
        return F.cross_entropy(view(batch[0]), batch[1]) + 0.5 * sum((lam_[k].exp() * view[k] ** 2).sum() for k in lam_)

    def outer_loss(lam_, view, batch):
        return F.cross_entropy(view(batch[0]), batch[1])

    problem = bilevel.Problem(outer=lam, inner=module, inner_loss=inner_loss, outer_loss=outer_loss,
                              inner_data=train, outer_data=val)
    return problem, module, lam, train, val


def _higher_hypergrad(module, lam_list, inner_fn, outer_fn, opt, steps):
    """dL_V/dλ through ``steps`` differentiable optimizer steps with higher (copied initial weights)."""
    with higher.innerloop_ctx(module, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(inner_fn(fmodel, list(fmodel.parameters())))
        return torch.autograd.grad(outer_fn(fmodel), lam_list)


OPTIMIZERS = {
    "sgd": (lambda: sgd(0.3), lambda ps: torch.optim.SGD(ps, lr=0.3)),
    "sgd-momentum": (lambda: sgd(0.3, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9)),
    "sgd-nesterov": (lambda: sgd(0.3, momentum=0.9, nesterov=True),
                     lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, nesterov=True)),
    # higher's Adam puts ε outside the bias correction (w −= η·√(1−β₂ᵗ)/(1−β₁ᵗ)·m/(√v + ε)), torch.optim.Adam and
    # bilevel inside (η/(1−β₁ᵗ)·m/(√(v/(1−β₂ᵗ)) + ε)): the same loop only when ε is negligible against √v.
    "adam": (lambda: adam(0.05, eps=1e-14), lambda ps: torch.optim.Adam(ps, lr=0.05, eps=1e-14)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unrolled_matches_higher_mlp(name):
    problem, module, lam, train, val = _mlp_case()
    ours_opt, torch_opt = OPTIMIZERS[name]
    hg = bilevel.hypergrad.unrolled_hypergrad(problem, lam, problem.inner_init, inner_batches=[train] * K, outer_batch=val,
                                    optimizer=ours_opt())
    names = list(lam)
    lam_list = [lam[k] for k in names]

    def inner_fn(fmodel, params):
        return F.cross_entropy(fmodel(train[0]), train[1]) + 0.5 * sum(
            (lj.exp() * p**2).sum() for lj, p in zip(lam_list, params))

    ref = _higher_hypergrad(module, lam_list, inner_fn, lambda fm: F.cross_entropy(fm(val[0]), val[1]),
                            torch_opt(module.parameters()), K)
    ours = torch.cat([hg.hypergrad[k].reshape(-1) for k in names])
    theirs = torch.cat([g.reshape(-1) for g in ref])
    assert theirs.abs().max() > 1e-6  # a non-trivial hypergradient is being compared
    diff = float((ours - theirs).abs().max())
    assert diff <= 1e-6  # the bound
    assert diff <= 1e-6 * float(theirs.abs().max())  # and relative to the hypergradient's scale (~1e-3 here)


class _Ridge(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return x @ self.w


@pytest.mark.parametrize("name", ["sgd", "sgd-momentum"])
def test_unrolled_matches_higher_ridge(name):
    train, val = ridge_data(30, 30, 6, seed=3)
    lam = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64, requires_grad=True)
    problem = ridge_problem(train, val, lam)
    w0 = 0.1 * torch.arange(6, dtype=torch.float64)
    lr = 0.01  # below 2/λ_max(X_tᵀX_t + diag e^λ) for this data
    momentum = {"sgd": 0.0, "sgd-momentum": 0.9}[name]
    hg = bilevel.hypergrad.unrolled_hypergrad(problem, {"value": lam}, {"value": w0}, inner_batches=[train] * K, outer_batch=val,
                                    optimizer=sgd(lr, momentum=momentum))
    module = _Ridge(w0)
    x, y = train

    def inner_fn(fmodel, params):
        return 0.5 * ((fmodel(x) - y) ** 2).sum() + 0.5 * (lam.exp() * params[0] ** 2).sum()

    (ref,) = _higher_hypergrad(module, [lam], inner_fn, lambda fm: 0.5 * ((fm(val[0]) - val[1]) ** 2).sum(),
                               torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum), K)
    assert ref.abs().max() > 1e-6
    diff = float((hg.hypergrad["value"] - ref).abs().max())
    assert diff <= 1e-6
    assert diff <= 1e-6 * float(ref.abs().max())


# ----- implicit contenders of the benchmark, on a small ridge ------------------------------------------------------------
def _bench():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "hypergrad_peers.py"
    spec = importlib.util.spec_from_file_location("hypergrad_peers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("hypergrad_peers", module)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ridge_case():
    bench = _bench()
    return bench, bench.make_ridge_case(12, dtype=torch.float64, device=torch.device("cpu"), seed=0)


@pytest.mark.parametrize("runner", ["bilevel_cg", "bilevel_cg_mixed"])
def test_bilevel_cg_reaches_closed_form(ridge_case, runner):
    """Both CG contenders, the mixed one with float32 products on this float64 ridge (reliable updates)."""
    bench, case = ridge_case
    out = bench.flat(getattr(bench, runner)(case, 40)())
    torch.testing.assert_close(out, case.reference, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("peer", ["plain", "betty"])
def test_neumann_matches_independent_neumann(ridge_case, peer):
    bench, case = ridge_case
    if peer == "betty":
        pytest.importorskip("betty")
    make = {"plain": bench.plain_neumann, "betty": bench.betty_neumann}[peer]
    ours = bench.flat(bench.bilevel_neumann(case, 7)())
    theirs = bench.flat(make(case, 7)())
    assert float((ours - case.reference).norm() / case.reference.norm()) > 1e-3  # truncated: not the exact answer
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


def test_cg_matches_torchopt(ridge_case):
    pytest.importorskip("torchopt")
    bench, case = ridge_case
    ours = bench.flat(bench.bilevel_cg(case, 4)())
    theirs = bench.flat(bench.torchopt_cg(case, 4)())
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


# ----- the trajectory benchmark (benchmarks/hypergrad_trajectory.py) on a small ridge -----------------------------------
@pytest.fixture(scope="module")
def trajectory():
    _bench()  # registers hypergrad_peers, which the trajectory script imports
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "hypergrad_trajectory.py"
    spec = importlib.util.spec_from_file_location("hypergrad_trajectory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("hypergrad_trajectory", module)
    spec.loader.exec_module(module)
    return module, module.ridge_trajectory(12, steps=3, lr=0.05, seed=0)


def test_trajectory_points_and_smallest_k(trajectory):
    """The points move (λ changes along the run) and carry their closed-form reference; ``smallest_k`` returns a K
    that meets the target while K − 1 does not, from a guess above and from one below, and None when ``kmax`` is
    below that K."""
    bench, points = trajectory
    lams = [case.lam["w"].detach() for case in points]
    assert float((lams[1] - lams[0]).norm()) > 0
    case = points[1]
    make = bench.CONTENDERS["bilevel CG cold"]
    for guess in (1, 12):
        k, err, _ = bench.smallest_k(make, case, {}, guess, 1e-3, 50)
        assert err <= 1e-3 < bench.peers.rel_err(make(case, k - 1, {})()[0], case.reference)
    k, _, _ = bench.smallest_k(make, case, {}, 1, 1e-3, 50)
    assert bench.smallest_k(make, case, {}, 1, 1e-3, k - 1) is None  # not reachable below K: reported, not raised


def test_trajectory_warm_contenders_compute_the_same_numbers(trajectory):
    """TorchOpt warm-started by hand and bilevel's warm CG run the same algorithm from the same start: equal to 1e-9
    at equal K, so the benchmark's K columns compare like with like. The preconditioned contender carries pairs."""
    pytest.importorskip("torchopt")
    bench, points = trajectory
    first, second = points[0], points[1]
    _, carried = bench.CONTENDERS["bilevel CG warm"](first, 3, {})()
    ours = bench.peers.flat(bench.CONTENDERS["bilevel CG warm"](second, 3, carried)()[0])
    # the same start in TorchOpt's layout (a tuple) and sign (custom_root's linear system has the solution −H⁻¹∂_w L_V)
    as_torchopt = {"x": tuple(-carried["x"][second.bl_key[n]] for n in second.names)}
    theirs = bench.peers.flat(bench.CONTENDERS["TorchOpt CG warm (by hand)"](second, 3, as_torchopt)()[0])
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    _, kept = bench.CONTENDERS["bilevel CG warm + L-BFGS"](first, 3, {})()
    assert len(kept["pairs"]) == 3
