"""Ready-made problems: closed forms, data loaders, the registry.

Oracles: the quadratic's closed-form hypergradient is checked against bilevel's implicit hypergradient (dense solve,
float64, rtol 1e-6) and against central finite differences of its closed-form F (rtol 1e-6); its closed-form
optimum by bilevel's implicit hypergradient vanishing there (< 1e-10 relative). Hyper-cleaning is checked against its definition
(corruption rate within 4 binomial standard deviations of p·9/10) and by F(λ) = L_V(w*(λ)) with w* from L-BFGS.
"""

from __future__ import annotations

import functools
import math
import os
import struct

import numpy as np
import pytest
import torch

import bilevel
from bilevel.inner import solve_inner
from bilevel.problems import PROBLEMS, DatasetUnavailable, make_problem, problem_options, suggested_options
from bilevel.problems.datasets import read_rda, spam
from bilevel.problems.hypercleaning import (
    REG,
    clean_oracle_baseline,
    fit_classifier,
    hypercleaning_data,
    hypercleaning_problem,
    hypercleaning_small,
    naive_baseline,
    val_only_baseline,
)
from bilevel.problems.logreg_l2 import logistic_loss
from bilevel.problems.quadratic import quadratic_data, quadratic_problem


# ----- quadratic -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quad():
    return quadratic_data(seed=3)


@pytest.mark.parametrize("rule", ["exact", "cg"])
def test_quadratic_closed_form_hypergrad_matches_implicit(quad, rule):
    problem, _ = quadratic_problem(quad)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        lam = torch.randn(quad.outer_dim, generator=gen, dtype=torch.float64)
        w = quad.inner_solution(lam)
        solve = bilevel.linsolve.exact if rule == "exact" else functools.partial(bilevel.linsolve.cg, rtol=1e-13, maxiter=500)
        hg = bilevel.hypergrad.implicit_hypergrad(problem, {"value": lam}, {"value": w}, inner_batch=problem.inner_data,
                                        outer_batch=problem.outer_data, solve=solve)
        torch.testing.assert_close(hg.hypergrad["value"], quad.hypergrad(lam), rtol=1e-6, atol=1e-9)


def test_quadratic_closed_form_hypergrad_matches_finite_differences(quad):
    lam = torch.randn(quad.outer_dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 1e-5
    eye = torch.eye(quad.outer_dim, dtype=torch.float64)
    numeric = torch.stack([(quad.value(lam + eps * e) - quad.value(lam - eps * e)) / (2 * eps) for e in eye])
    torch.testing.assert_close(quad.hypergrad(lam), numeric, rtol=1e-6, atol=1e-7)


def test_quadratic_optimum_is_stationary_for_bilevel_and_approached_by_cg(quad):
    problem, evaluate = quadratic_problem(quad)
    lam_star, f_star = quad.optimum()
    hg = bilevel.hypergrad.implicit_hypergrad(problem, {"value": lam_star}, {"value": quad.inner_solution(lam_star)},
                                    inner_batch=problem.inner_data, outer_batch=problem.outer_data, solve=bilevel.linsolve.exact)
    scale = float(torch.linalg.vector_norm(quad.hypergrad(torch.zeros_like(lam_star))))
    assert float(torch.linalg.vector_norm(hg.hypergrad["value"])) < 1e-10 * scale  # ∇F(λ*) = 0 by bilevel's own rule
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):  # F is convex: λ* is its minimum
        assert float(quad.value(lam_star + 1e-2 * torch.randn(quad.outer_dim, generator=gen, dtype=torch.float64))) > f_star
    start = evaluate(torch.zeros(quad.outer_dim, dtype=torch.float64))
    assert start["dist_to_opt"] == pytest.approx(float(torch.linalg.vector_norm(lam_star)))
    result = bilevel.solve(problem, "cg", maxiter=60, seed=0, inner_lr=1.0, inner_steps=10, outer_lr=0.1, cg_maxiter=50)
    metrics = evaluate(result)
    assert metrics["dist_to_opt"] < start["dist_to_opt"] / 20, metrics
    assert metrics["F_gap"] == pytest.approx(float(quad.value(result.outer) - f_star))
    assert 0 <= metrics["F_gap"] < start["F_gap"] / 100


def test_quadratic_instance_is_the_same_in_every_dtype():
    q64 = quadratic_data(20, 4, seed=5)
    q32 = quadratic_data(20, 4, seed=5, dtype="float32")
    assert q32.A.dtype == torch.float32
    torch.testing.assert_close(q32.A.double(), q64.A, rtol=1e-6, atol=1e-7)
    eigs = torch.linalg.eigvalsh(quadratic_data(30, 3, cond=50.0).A)
    assert float(eigs.max() / eigs.min()) == pytest.approx(50.0, rel=1e-8)


def test_quadratic_bad_settings():
    with pytest.raises(bilevel.BilevelError, match="cond must be >= 1"):
        quadratic_data(cond=0.5)
    with pytest.raises(bilevel.BilevelError, match="rho must be positive"):
        quadratic_data(rho=0.0)


# ----- hyper-cleaning ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    return hypercleaning_data(0.5, source="mnist5k", seed=0)


def test_hypercleaning_small_data(small):
    s = small.splits
    assert (len(s.train), len(s.val), len(s.test)) == (2000, 1000, 2000)
    assert s.train.x.shape[1] == 784
    # label changed with probability p·9/10 (a random class equals the true one 1 time in 10)
    rate, expected = float(small.corrupted.float().mean()), 0.5 * 0.9
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / 2000)
    assert bool((s.train.y[~small.corrupted] == small.clean_labels[~small.corrupted]).all())
    assert bool((s.train.y[small.corrupted] != small.clean_labels[small.corrupted]).all())
    # centred by the training mean
    assert float(s.train.x.mean(0).abs().max()) < 1e-5


def test_hypercleaning_small_solve_lowers_the_bilevel_objective(small):
    problem, evaluate = hypercleaning_problem(small, reg=1e-3)
    s = small.splits
    lam0 = problem.outer_init["value"]

    def f(lam):  # F(λ) = L_V(w*(λ)), w* by L-BFGS on the weighted training loss
        w = fit_classifier(s.train.x, s.train.y, torch.sigmoid(lam), reg=1e-3, maxiter=100)
        return float(torch.nn.functional.cross_entropy(s.val.x @ w["W"] + w["b"], s.val.y))

    result = bilevel.solve(problem, "cg", maxiter=10, seed=0, inner_steps=5, inner_lr=0.5, outer_lr=0.3, cg_maxiter=5)
    f0, f1 = f(lam0), f(result.outer)
    assert f1 < f0 - 0.2, (f0, f1)
    metrics = evaluate(result)
    assert set(metrics) >= {"test_accuracy", "test_loss", "detect_f1"}
    assert metrics["detect_f1"] > 0.6  # corrupted examples lose weight far more often than chance (F1 ≈ 0.47)
    assert evaluate(result.inner)["test_accuracy"] == metrics["test_accuracy"]


def test_hypercleaning_digits_fallback_builds():
    problem, evaluate = hypercleaning_small(source="digits", p=0.7, seed=1, dtype="float64")
    assert problem.outer_init["value"].shape == (900,)
    assert problem.inner_init["W"].shape == (64, 10) and problem.inner_init["W"].dtype == torch.float64
    assert 0.0 <= evaluate({"W": problem.inner_init["W"], "b": problem.inner_init["b"]})["test_accuracy"] <= 1.0


def test_hypercleaning_baselines_use_the_right_examples():
    """At p = 0.9 on digits the clean-only classifier (~170 examples) must beat the one trained on all labels (~80%
    wrong) by a wide margin; if the corruption mask were inverted or ignored the order would flip or the gap vanish."""
    data = hypercleaning_data(0.9, source="digits", seed=0, dtype="float64")
    naive, clean = naive_baseline(data, maxiter=200), clean_oracle_baseline(data, maxiter=200)
    val_only = val_only_baseline(data, maxiter=200)
    assert clean > naive + 0.2, (naive, clean)
    assert val_only > naive + 0.2, (naive, val_only)


def test_hypercleaning_missing_data_says_how_to_install(tmp_path):
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        hypercleaning_data(0.5, root=str(tmp_path))
    with pytest.raises(DatasetUnavailable, match="apt-get install r-cran-kernlab"):
        spam(root=str(tmp_path))


def test_missing_debian_data_fails_as_root_and_skips_otherwise(debian_data, monkeypatch):
    """CI runs as root, where scripts/setup.sh installs the data: missing data must fail the test there, and skip,
    saying why, only for users who are not root."""

    def missing():
        raise DatasetUnavailable("not found")

    def outcome(package):  # the exception debian_data ends with (a skip must not end this test as skipped)
        with pytest.raises(BaseException) as info:
            debian_data(missing, package)
        return info.type, str(info.value)

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    kind, message = outcome("dataset-fashion-mnist")
    assert kind is pytest.fail.Exception and "running as root but Debian's dataset-fashion-mnist is not" in message
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    kind, message = outcome("r-cran-kernlab")
    assert kind is pytest.skip.Exception and "not root and Debian's r-cran-kernlab is not installed" in message
    assert debian_data(lambda: 3, "r-cran-kernlab") == 3


def test_hypercleaning_bad_settings():
    with pytest.raises(bilevel.BilevelError, match="p must be a probability"):
        hypercleaning_data(1.5, source="digits")
    with pytest.raises(bilevel.BilevelError, match="source must be one of"):
        hypercleaning_data(0.5, source="cifar")


# ----- R data files and spam -----------------------------------------------------------------------------------
def _xdr_int(*values: int) -> bytes:
    return b"".join(struct.pack(">i", v) for v in values)


def _xdr_str(text: str) -> bytes:
    return _xdr_int(9 | (1 << 18)) + _xdr_int(len(text)) + text.encode()  # CHARSXP (gp bit: ASCII)


def _xdr_strsxp(*texts: str) -> bytes:
    return _xdr_int(16, len(texts)) + b"".join(_xdr_str(t) for t in texts)


def _xdr_tagged(name: str) -> bytes:  # the tag of a pairlist cell: a symbol
    return _xdr_int(1) + _xdr_str(name)


def test_read_rda_reads_a_hand_written_data_frame(tmp_path):
    """A data frame written by hand following R Internals' XDR serialization spec: x = c(1.5, -2), f = factor(b, a)."""
    attr, tag, obj = 1 << 9, 1 << 10, 1 << 8
    column_x = _xdr_int(14, 2) + struct.pack(">dd", 1.5, -2.0)
    column_f = (_xdr_int(13 | attr | obj, 2, 2, 1)
                + _xdr_int(2 | tag) + _xdr_tagged("levels") + _xdr_strsxp("a", "b")
                + _xdr_int(2 | tag) + _xdr_tagged("class") + _xdr_strsxp("factor") + _xdr_int(254))
    frame = (_xdr_int(19 | attr | obj, 2) + column_x + column_f
             + _xdr_int(2 | tag) + _xdr_tagged("names") + _xdr_strsxp("x", "f")
             + _xdr_int(2 | tag) + _xdr_int(255 | (3 << 8)) + _xdr_strsxp("data.frame") + _xdr_int(254))  # ref to "class"
    body = b"RDX2\nX\n" + _xdr_int(2, 0x040202, 0x020300) + _xdr_int(2 | tag) + _xdr_tagged("df") + frame + _xdr_int(254)
    import gzip

    path = tmp_path / "df.rda"
    path.write_bytes(gzip.compress(body))
    df = read_rda(str(path))["df"]
    assert df.attrs["names"].value == ["x", "f"]
    assert df.attrs["class"].value == ["data.frame"]
    np.testing.assert_array_equal(df.value[0].value, [1.5, -2.0])
    np.testing.assert_array_equal(df.value[1].value, [2, 1])
    assert df.value[1].attrs["levels"].value == ["a", "b"]


def test_spam_from_kernlab(debian_data):
    """Read without R from Debian's r-cran-kernlab (a failure, not a skip, when running as root without it)."""
    splits = debian_data(lambda: spam(seed=0), "r-cran-kernlab")
    n = len(splits.train) + len(splits.val) + len(splits.test)
    assert (n, splits.train.x.shape[1]) == (4601, 57)  # UCI spambase: 4601 e-mails, 57 features, 1813 spam
    n_spam = sum(float(s.y.sum()) for s in (splits.train, splits.val, splits.test))
    assert n_spam == 1813
    assert float(splits.train.x.mean(0).abs().max()) < 1e-5  # standardized with the training split's statistics


def test_logreg_l2_spam_short_cg_run_lowers_the_validation_loss(debian_data):
    """F(λ) = L_V(w*(λ)) with w* by L-BFGS + Newton (float64): 0.239 at λ = −2 for every feature, 0.171 after 20 outer
    steps of `cg`; test accuracy 92% → 93% (floor 90%)."""
    problem, evaluate = debian_data(lambda: make_problem("logreg_l2_spam", seed=0, dtype="float64"), "r-cran-kernlab")
    assert problem.outer_init["value"].shape == (57,)

    def refit(lam):
        inner = solve_inner(problem, {"value": lam}, problem.inner_init, problem.inner_data)
        return float(logistic_loss(inner, problem.outer_data)), evaluate(inner)

    f0, _ = refit(problem.outer_init["value"])
    result = bilevel.solve(problem, "cg", maxiter=20, seed=0, **suggested_options("logreg_l2_spam", "cg"))
    f1, metrics = refit(result.outer)
    assert f1 < 0.85 * f0, (f0, f1)
    assert metrics["test_accuracy"] > 0.9, metrics


# ----- registry ------------------------------------------------------------------------------------------------
def test_registry_names_and_options():
    assert {"quadratic", "logreg_l2", "hypercleaning", "hypercleaning_small"} <= set(PROBLEMS)
    opts = problem_options("hypercleaning")
    assert opts["p"] == 0.5 and opts["reg"] == REG and "data" not in opts
    with pytest.raises(bilevel.BilevelError, match="valid problems are .*quadratic"):
        make_problem("nope")
    with pytest.raises(bilevel.BilevelError, match="has no option.*kappa.*its options are cond"):
        make_problem("quadratic", kappa=3)
    problem, evaluate = make_problem("quadratic", inner_dim=12, outer_dim=3, dtype="float32")
    assert problem.outer_init["value"].dtype == torch.float32 and problem.inner_init["value"].shape == (12,)
