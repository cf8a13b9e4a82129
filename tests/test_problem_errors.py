"""Bad input gets a BilevelError that names the problem and the fix."""

import pytest
import torch

import bilevel
from bilevel import BilevelError, Problem
from bilevel.problems.ridge import ridge_data, ridge_problem


def quad(lam, w, batch):
    return 0.5 * ((w - lam.sum()) ** 2).sum()


def make(**overrides):
    kwargs = dict(outer=torch.zeros(3, requires_grad=True), inner=torch.zeros(4), inner_loss=quad, outer_loss=quad)
    kwargs.update(overrides)
    return Problem(**kwargs)


def test_outer_without_grad():
    with pytest.raises(BilevelError, match="requires_grad=False.*requires_grad=True"):
        make(outer=torch.zeros(3))


def test_non_float_outer():
    with pytest.raises(BilevelError, match=r"floating point.*int64.*\.float\(\)"):
        make(outer={"k": torch.zeros(3, dtype=torch.int64)})


def test_outer_unused_by_inner_loss():
    problem = make(inner_loss=lambda lam, w, b: 0.5 * (w**2).sum())
    with pytest.raises(BilevelError, match="inner_loss does not depend on outer variable"):
        bilevel.solve(problem, "cg", maxiter=1)


def test_loss_must_be_scalar():
    problem = make(inner_loss=lambda lam, w, b: 0.5 * (w - lam.sum()) ** 2)
    with pytest.raises(BilevelError, match=r"inner_loss must return a scalar, got shape \(4,\).*\.mean\(\)"):
        bilevel.solve(problem, "cg", maxiter=1)


def test_shape_mismatch_in_data_names_the_data_and_shapes():
    train, val = ridge_data(dim=4)
    problem = ridge_problem(train, (val[0][:, :3], val[1]))
    with pytest.raises(BilevelError, match=r"outer_loss failed on the first batch of outer_data \(\(tensor \(40, 3\)"):
        bilevel.solve(problem, "cg", maxiter=1)


def test_nan_loss():
    problem = make(outer_loss=lambda lam, w, b: (w * float("nan")).sum())
    with pytest.raises(BilevelError, match="outer_loss is not finite"):
        bilevel.solve(problem, "cg", maxiter=1)


def test_nan_during_solve_names_the_step():
    """A run that blows up (huge inner step) stops naming the non-finite quantity and the outer step."""
    train, val = ridge_data(dim=4, dtype=torch.float32)
    problem = ridge_problem(train, val)
    with pytest.raises(BilevelError, match=r"not finite.*(at step|outer step) \d+"):
        bilevel.solve(problem, "cg", maxiter=50, inner_lr=5.0, inner_steps=20)


def test_diverging_neumann_suggests_step_size():
    train, val = ridge_data(dim=4)
    problem = ridge_problem(train, val)
    with pytest.raises(bilevel.linsolve.NeumannDivergenceError, match=r"neumann_alpha=[0-9.]+ \(≈1/L\)"):
        bilevel.solve(problem, "ift", maxiter=1, inner_lr=1e-3, neumann_alpha=0.2, neumann_terms=50)


def test_projection_must_keep_shapes():
    problem = make(outer_projection=lambda lam: lam[:2])
    with pytest.raises(BilevelError, match=r"outer_projection changed the tensor from \(3,\) float32 on cpu to \(2,\)"):
        bilevel.solve(problem, "cg", maxiter=1)


def test_bad_data_type_and_constraints_shape():
    with pytest.raises(BilevelError, match="inner_data must be a batch"):
        make(inner_data=3.0)
    problem = make(inner_constraints=lambda lam, w: torch.zeros(2, 2))
    with pytest.raises(BilevelError, match="1-D floating-point tensor"):
        bilevel.solve(problem, "lvhba", maxiter=1)
    with pytest.raises(BilevelError, match="method 'cg' cannot honour Problem\\(inner_constraints=...\\).*lvhba"):
        bilevel.solve(problem, "cg", maxiter=1)


def test_unknown_method_and_option():
    problem = make()
    with pytest.raises(BilevelError, match="unknown method 'nope'; valid methods are .*cg.*ift.*unrolled"):
        bilevel.solve(problem, "nope")
    with pytest.raises(BilevelError, match=r"no option\(s\) \['neuman_terms'\].*neumann_terms"):
        bilevel.solve(problem, "ift", neuman_terms=3)
    with pytest.raises(BilevelError, match="inner_lr=.* is not valid; expected a finite number > 0"):
        bilevel.solve(problem, "ift", inner_lr=-1.0)
