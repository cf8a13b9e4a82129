"""``bilevel.hypergradient`` and ``bilevel.check_hypergradient`` for every method.

Oracles: the ridge's closed-form hypergradient (float64, 1e-6) and central finite differences of what each method
differentiates (float64, rel 1e-6); F2SA's penalty bias must shrink like 1/penalty.
"""

from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel import BilevelError
from bilevel.meta import meta_problem
from bilevel.problems.ridge import ridge_data, ridge_hypergrad, ridge_problem

F64 = torch.float64


@pytest.fixture(scope="module")
def ridge():
    train, val = ridge_data(dim=5)
    lam = torch.linspace(-1.0, 1.0, 5, dtype=F64)
    return ridge_problem(train, val, lam.clone().requires_grad_()), ridge_hypergrad(train, val, lam)


SETTINGS = {
    "ift": dict(neumann_terms=400, neumann_alpha=0.005),
    "cg": dict(cg_maxiter=100, cg_rtol=1e-12),
    "minres": dict(cg_maxiter=100, cg_rtol=1e-12),
    "exact": {},
}


@pytest.mark.parametrize("method", list(SETTINGS))
def test_implicit_hypergradient_matches_closed_form(ridge, method):
    problem, reference = ridge
    hg = bilevel.hypergradient(problem, method, **SETTINGS[method])
    assert isinstance(hg.hypergrad, torch.Tensor)  # the user's form: the problem's outer is a tensor
    torch.testing.assert_close(hg.hypergrad, reference, rtol=1e-6, atol=1e-9)


def test_hypergradient_at_a_given_point_and_inner(ridge):
    problem, _ = ridge
    train, val = problem.inner_data, problem.outer_data
    lam = torch.full((5,), 0.3, dtype=F64)
    hg = bilevel.hypergradient(problem, "exact", outer=lam)
    torch.testing.assert_close(hg.hypergrad, ridge_hypergrad(train, val, lam), rtol=1e-6, atol=1e-9)
    # at a wrong inner point the implicit rule gives another (wrong) answer: the given inner is used
    off = bilevel.hypergradient(problem, "exact", outer=lam, inner=torch.zeros(5, dtype=F64))
    assert not torch.allclose(off.hypergrad, hg.hypergrad)
    with pytest.raises(BilevelError, match=r"outer: the outer tensor is \(4,\) float64 on cpu, but the problem's is \(5,\)"):
        bilevel.hypergradient(problem, "exact", outer=torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("method", [*SETTINGS, "unrolled"])
def test_check_hypergradient_agrees_with_finite_differences(ridge, method):
    problem, _ = ridge
    settings = SETTINGS.get(method, dict(inner_steps=20, inner_lr=0.005))
    check = bilevel.check_hypergradient(problem, method, **settings)
    assert check.rel_error < 1e-6, check
    assert check.note == ""


def test_check_hypergradient_catches_a_wrong_hypergradient(ridge):
    """A truncated Neumann series (5 terms, κ large) is far from the truth: the check must say so."""
    problem, _ = ridge
    check = bilevel.check_hypergradient(problem, "ift", neumann_terms=2, neumann_alpha=0.001)
    assert check.rel_error > 0.1, check


def test_f2sa_estimate_is_checked_with_its_penalty_bias_stated(ridge):
    problem, _ = ridge
    errors = {}
    for penalty in (1e2, 1e4):
        check = bilevel.check_hypergradient(problem, "f2sa", penalty0=penalty)
        assert f"penalty {penalty:g}" in check.note and "O(1/penalty)" in check.note
        errors[penalty] = check.rel_error
    assert errors[1e4] < errors[1e2] / 20  # O(1/λ): 100× the penalty, ≈100× smaller bias


@pytest.fixture(scope="module")
def meta():
    gen = torch.Generator().manual_seed(0)
    theta = {"w1": 0.5 * torch.randn(1, 8, generator=gen, dtype=F64), "b1": torch.zeros(8, dtype=F64),
             "w2": 0.5 * torch.randn(8, 1, generator=gen, dtype=F64)}

    def forward(p, x):
        return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    xs, xq = torch.randn(3, 5, 1, generator=gen, dtype=F64), torch.randn(3, 5, 1, generator=gen, dtype=F64)
    return meta_problem(theta, torch.nn.functional.mse_loss, ((xs, torch.sin(xs)), (xq, torch.sin(xq))), forward=forward)


def test_maml_and_imaml_meta_gradients_agree_with_finite_differences(meta):
    check = bilevel.check_hypergradient(meta, "maml", inner_steps=3, inner_lr=0.1)
    assert check.rel_error < 1e-6, check
    check = bilevel.check_hypergradient(meta, "imaml", inner_steps=300, lam=2.0, cg_maxiter=50, inner_maxiter=300)
    assert check.rel_error < 1e-6, check
    first_order = bilevel.check_hypergradient(meta, "maml", inner_steps=3, inner_lr=0.1, first_order=True)
    assert "first_order=True drops the second-order terms" in first_order.note
    assert first_order.rel_error > 0.1  # an approximation, and the check shows it


@pytest.mark.parametrize("method", ["lvhba", "stn"])
def test_methods_without_a_hypergradient_are_refused_with_the_reason(ridge, method):
    problem, _ = ridge
    with pytest.raises(BilevelError, match=rf"check_hypergradient: {method} .*; check the problem's hypergradient with "
                                           "method='cg'"):
        bilevel.check_hypergradient(problem, method)


def test_stochastic_data_is_refused(ridge):
    problem, _ = ridge
    x, y = problem.inner_data
    sampled = bilevel.Problem(outer=problem.outer, inner=problem.inner, inner_loss=problem.inner_loss,
                              outer_loss=problem.outer_loss, inner_data=lambda: (x, y), outer_data=problem.outer_data)
    with pytest.raises(BilevelError, match="needs full-batch inner_data and outer_data"):
        bilevel.check_hypergradient(sampled, "cg")
