"""Bad input ends in a BilevelError that names the argument, never in a raw exception or a silently wrong number.

One test per class of bad input; the generated (property-based) counterpart is tests/test_fuzz.py.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch

import bilevel
from bilevel import BilevelError
from bilevel.options import Range
from bilevel.registry import solver_class

F64 = torch.float64


def ridge(d: int = 3, *, inner_data=None, outer_data=None, dtype=F64, **kwargs) -> bilevel.Problem:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, d, generator=gen, dtype=F64).to(dtype)
    y = x @ torch.ones(d, dtype=dtype)

    def inner_loss(lam, w, batch):
        xb, yb = batch
        return 0.5 * ((xb @ w - yb) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(lam, w, batch):
        xb, yb = batch
        return 0.5 * ((xb @ w - yb) ** 2).mean()

    return bilevel.Problem(outer=torch.zeros(d, dtype=dtype, requires_grad=True), inner=torch.zeros(d, dtype=dtype),
                           inner_loss=kwargs.pop("inner_loss", inner_loss), outer_loss=kwargs.pop("outer_loss", outer_loss),
                           inner_data=(x, y) if inner_data is None else inner_data,
                           outer_data=(x, y) if outer_data is None else outer_data, **kwargs)


# ----- solver options, from their annotations --------------------------------------------------------------------
def _fields_of(kind):
    """(method, field) pairs whose annotation is ``kind`` (possibly Annotated or with None)."""
    out = []
    for method in bilevel.available_methods():
        cls = solver_class(method)
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            if f.init and kind(hints[f.name]):
                out.append((method, f.name))
    return out


def _base(hint):
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def _arms(hint):
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) else (hint,)
    return [_base(a) for a in args]


@pytest.mark.parametrize("method, name", _fields_of(lambda h: bool in _arms(h)))
def test_bool_options_refuse_strings(method, name):
    """"False" must not be read as True."""
    with pytest.raises(BilevelError, match=rf"{method}: {name}='False' is not valid; expected True or False"):
        bilevel.solve(ridge(), method, maxiter=1, **{name: "False"})


@pytest.mark.parametrize("method, name", _fields_of(lambda h: float in _arms(h)))
@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.1", [0.1], True])
def test_float_options_refuse_nan_inf_and_other_types(method, name, bad):
    with pytest.raises(BilevelError, match=rf"{method}: {name}=.* is not valid; expected .*number"):
        bilevel.solve(ridge(), method, maxiter=1, **{name: bad})


@pytest.mark.parametrize("method, name", _fields_of(lambda h: int in _arms(h) and float not in _arms(h)))
@pytest.mark.parametrize("bad", [2.5, True, "3", -1])
def test_int_options_refuse_floats_bools_strings_and_negatives(method, name, bad):
    with pytest.raises(BilevelError, match=rf"{method}: {name}=.* is not valid; expected an integer"):
        bilevel.solve(ridge(), method, maxiter=1, **{name: bad})


def _ranges(hint):
    return [r for arm in ((hint,) if typing.get_origin(hint) is typing.Annotated else typing.get_args(hint))
            if typing.get_origin(arm) is typing.Annotated for r in typing.get_args(arm)[1:] if isinstance(r, Range)]


def test_ranges_are_enforced_for_every_bounded_option():
    """Every bounded float option refuses a value just outside its range (0 for '> 0', 1 for '< 1', ...)."""
    checked = 0
    for method in bilevel.available_methods():
        cls = solver_class(method)
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            for r in _ranges(hints.get(f.name)) if f.init else ():
                outside = [r.low] if r.low is not None and r.low_open else []
                outside += [r.low - 1] if r.low is not None else []
                outside += [r.high] if r.high is not None and r.high_open else []
                outside += [r.high + 1] if r.high is not None else []
                for value in outside:
                    with pytest.raises(BilevelError, match=rf"{f.name}=.* is not valid"):
                        cls(**{f.name: value})
                    checked += 1
    assert checked > 40


@pytest.mark.parametrize("method", ["ift", "cg", "unrolled", "stn", "maml"])
def test_literal_options_refuse_unknown_choices(method):
    cls = solver_class(method)
    with pytest.raises(BilevelError, match=r"outer_optimizer='lbfgs' is not valid; expected one of 'sgd', 'adam'"):
        cls(outer_optimizer="lbfgs")


def test_momentum_range_and_momentum_that_would_be_ignored():
    with pytest.raises(BilevelError, match=r"inner_momentum=1.0 is not valid; expected a finite number >= 0 and < 1"):
        bilevel.solve(ridge(), "cg", maxiter=1, inner_momentum=1.0)
    with pytest.raises(BilevelError, match="inner_momentum=0.5 applies to inner_optimizer='sgd' only"):
        bilevel.solve(ridge(), "cg", maxiter=1, inner_momentum=0.5, inner_optimizer="adam")


# ----- solve() arguments ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"maxiter": -1}, r"solve: maxiter=-1 is not valid; expected an integer >= 0"),
    ({"maxiter": 2.5}, r"solve: maxiter=2.5 is not valid"),
    ({"maxiter": True}, r"solve: maxiter=True is not valid"),
    ({"maxiter": "3"}, r"solve: maxiter='3' is not valid"),
    ({"seed": 1.5}, r"solve: seed=1.5 is not valid; expected an integer >= 0 and < 9223372036854775808 or None"),
    ({"seed": 2**64}, r"solve: seed=18446744073709551616 is not valid"),
    ({"seed": "0"}, r"solve: seed='0' is not valid"),
    ({"callbacks": print}, r"solve: callbacks=<built-in function print> is not valid; expected a list or tuple"),
    ({"callbacks": [1]}, r"solve: callbacks=\[1\] is not valid; expected a list or tuple of a callable"),
    ({"time_limit": math.nan}, r"solve: time_limit=nan is not valid; expected a finite number > 0 or None"),
    ({"time_limit": -1.0}, r"solve: time_limit=-1.0 is not valid"),
    ({"hypergrad_tol": -1.0}, r"solve: hypergrad_tol=-1.0 is not valid; expected a finite number >= 0"),
    ({"hypergrad_tol": "1e-3"}, r"solve: hypergrad_tol='1e-3' is not valid"),
    ({"validate": "yes"}, r"solve: validate='yes' is not valid; expected True or False"),
    ({"method": None}, r"solve: method=None is not valid; expected a method name \(one of .*cg"),
    ({"method": "nope"}, r"solve: unknown method 'nope'; valid methods are"),
    ({"method": bilevel.solvers.CG}, r"solve: method=<class .*CG'> is not valid"),
])
def test_solve_arguments_are_checked(kwargs, match):
    kwargs = {"method": "cg", **kwargs}
    with pytest.raises(BilevelError, match=match):
        bilevel.solve(ridge(), **kwargs)


def test_problem_must_be_a_problem():
    with pytest.raises(BilevelError, match="solve: problem must be a bilevel.Problem, got dict"):
        bilevel.solve({}, "cg")


# ----- data ------------------------------------------------------------------------------------------------------
def test_empty_batch_is_refused():
    x = torch.zeros(0, 3, dtype=F64)
    with pytest.raises(BilevelError, match=r"inner_data batch 1 holds an empty tensor \(shape \(0, 3\)\)"):
        bilevel.solve(ridge(inner_data=(x, torch.zeros(0, dtype=F64))), "cg", maxiter=1)


def test_a_later_batch_with_other_shapes_names_the_stream_and_the_step():
    gen = torch.Generator().manual_seed(0)
    calls = []

    def sampler():
        calls.append(1)
        d = 3 if len(calls) < 5 else 4  # the 5th batch has another feature dimension
        x = torch.randn(8, d, generator=gen, dtype=F64)
        return x, x.sum(1)

    with pytest.raises(BilevelError, match=r"inner_data batch \d+ is \(tensor \(n, 4\) float64 on cpu, .* but the first "
                                           r"batch was \(tensor \(n, 3\) float64 on cpu.*\[cg, outer step \d\]"):
        bilevel.solve(ridge(inner_data=sampler), "cg", maxiter=5, inner_steps=1, inner_lr=0.1)


def test_varying_leading_dimension_is_allowed():
    """A DataLoader's last, smaller batch: only the leading dimension differs, which is fine."""
    gen = torch.Generator().manual_seed(0)
    sizes = iter([8, 8, 5] * 10)

    def sampler():
        x = torch.randn(next(sizes), 3, generator=gen, dtype=F64)
        return x, x.sum(1)

    result = bilevel.solve(ridge(inner_data=sampler), "cg", maxiter=3, inner_steps=2, inner_lr=0.1)
    assert result.n_steps == 3


def test_exhausted_generator_advice_works():
    x = torch.randn(8, 3, dtype=F64)
    batches = ((x, x.sum(1)) for _ in range(3))
    with pytest.raises(BilevelError, match=r"inner_data is exhausted after 3 batches.*a DataLoader, or a callable") as err:
        bilevel.solve(ridge(inner_data=batches), "cg", maxiter=5, inner_steps=1, validate=False)
    assert "list" not in str(err.value)  # a list would be read as one batch: not advice to give


# ----- losses that change later -----------------------------------------------------------------------------------
def _turning(after: int, bad):
    """An outer loss that is fine for ``after`` calls, then returns ``bad(loss)``."""
    calls = []

    def outer_loss(lam, w, batch):
        xb, yb = batch
        loss = 0.5 * ((xb @ w - yb) ** 2).mean()
        calls.append(1)
        return loss if len(calls) <= after else bad(loss)

    return outer_loss


@pytest.mark.parametrize("bad, match", [
    (lambda loss: None, "outer_loss must return a torch.Tensor scalar, got NoneType"),
    (lambda loss: (loss, loss), r"outer_loss must return a torch.Tensor scalar, got tuple"),
    (lambda loss: loss * torch.ones(2, dtype=F64), r"outer_loss must return a scalar, got shape \(2,\)"),
    (lambda loss: float(loss), "outer_loss must return a torch.Tensor scalar, got float"),
    (lambda loss: loss * math.nan, "outer_loss is not finite"),
])
@pytest.mark.parametrize("method", ["cg", "f2sa", "lvhba", "unrolled"])
def test_loss_that_changes_later_is_caught_at_its_step(method, bad, match):
    problem = ridge(outer_loss=_turning(3, bad))  # 1 call validates, then one call per step (2 for f2sa)
    with pytest.raises(BilevelError, match=match):
        bilevel.solve(problem, method, maxiter=6)


@pytest.mark.parametrize("method", ["f2sa", "lvhba", "cg"])
def test_detached_inner_loss_is_an_error_not_a_zero_gradient(method):
    calls = []

    def inner_loss(lam, w, batch):
        xb, yb = batch
        loss = 0.5 * ((xb @ w - yb) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()
        calls.append(1)
        return loss if len(calls) <= 2 else loss.detach()

    with pytest.raises(BilevelError, match="inner_loss returned a tensor that does not depend on the inner variables"):
        bilevel.solve(ridge(inner_loss=inner_loss), method, maxiter=4)


def test_raw_errors_of_user_code_get_method_and_step():
    calls = []

    def inner_loss(lam, w, batch):
        calls.append(1)
        if len(calls) > 3:
            raise KeyError("feature 'age'")
        xb, yb = batch
        return 0.5 * ((xb @ w - yb) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()

    with pytest.raises(BilevelError, match=r"Problem: inner_loss raised KeyError: .*feature 'age'.*\[cg, outer step \d\]") as err:
        bilevel.solve(ridge(inner_loss=inner_loss), "cg", maxiter=3, inner_steps=1)
    causes = []
    cause = err.value.__cause__
    while cause is not None:
        causes.append(cause)
        cause = cause.__cause__
    assert any(isinstance(c, KeyError) for c in causes)  # the original exception stays in the chain


# ----- projections and bounds ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("projection, match", [
    (lambda v: v.tolist(), r"outer_projection must return a tensor \(the form it was given\), got \(float, float"),
    (lambda v: None, r"outer_projection must return a tensor \(the form it was given\), got NoneType"),
    (lambda v: v[:2], r"outer_projection changed the tensor from \(3,\) float64 on cpu to \(2,\)"),
    (lambda v: v.float(), r"outer_projection changed the tensor from \(3,\) float64 on cpu to \(3,\) float32"),
])
def test_projection_returning_the_wrong_thing(projection, match):
    with pytest.raises(BilevelError, match=match):
        bilevel.solve(ridge(outer_projection=projection), "cg", maxiter=1)


@pytest.mark.parametrize("bounds", ["a", (1,), (0.0, "b"), (math.nan, 1.0), 3.0])
def test_bounds_of_the_wrong_type(bounds):
    with pytest.raises(BilevelError, match="outer_bounds must be None or a pair"):
        ridge(outer_bounds=bounds)
    with pytest.raises(BilevelError, match="outer_bounds low 2 exceeds high 1"):
        ridge(outer_bounds=(2, 1))


def test_projection_not_callable():
    with pytest.raises(BilevelError, match="inner_projection must be None or a callable proj"):
        ridge(inner_projection=3)


# ----- inputs a method would ignore -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [m for m in bilevel.available_methods() if m != "lvhba"])
def test_inner_constraints_are_refused_where_ignored(method):
    problem = ridge(inner_constraints=lambda lam, w: w - 1.0)
    with pytest.raises(BilevelError, match=rf"method '{method}' cannot honour Problem\(inner_constraints=...\).*: lvhba"):
        bilevel.solve(problem, method, maxiter=1)


def test_joint_projection_is_refused_where_ignored():
    from bilevel import projections

    problem = ridge(joint_projection=projections.product())
    with pytest.raises(BilevelError, match=r"method 'cg' cannot honour Problem\(joint_projection=...\)"):
        bilevel.solve(problem, "cg", maxiter=1)


# ----- dtypes ----------------------------------------------------------------------------------------------------------
def test_exact_in_float16_solves_in_float32():
    from bilevel.linsolve import exact

    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    b = {"value": torch.tensor([1.0, 2.0], dtype=torch.float16)}
    result = exact(lambda v: {"value": (a.half() @ v["value"])}, b)
    expected = torch.linalg.solve(a, b["value"].float())
    assert result.x["value"].dtype == torch.float16
    torch.testing.assert_close(result.x["value"].float(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adam_in_half_precision_does_not_divide_by_a_zero_eps(dtype):
    from bilevel.optim import adam

    opt = adam(0.1)
    params = {"w": torch.ones(3, dtype=dtype)}
    state = opt.init(params)
    new, state = opt.update(params, {"w": torch.zeros(3, dtype=dtype)}, state)  # g = 0: m/(√v + ε) = 0/ε
    assert new["w"].dtype == dtype and bool(torch.isfinite(new["w"]).all())
    torch.testing.assert_close(new["w"], params["w"])
    new, _ = opt.update(params, {"w": torch.full((3,), 1e-3, dtype=dtype)}, state)
    assert bool(torch.isfinite(new["w"]).all()) and float(new["w"][0]) < 1.0


# ----- NaN/inf created by the last update ------------------------------------------------------------------------------
def test_nan_created_by_the_last_update_is_an_error():
    """The outer step at the last iteration overflows λ (a plain gradient step of 1e308); the loss that saw the old λ
    was finite. A projection that returns inf is named as the culprit."""
    loud = ridge(outer_loss=lambda lam, w, b: 1e3 * ((b[0] @ w - b[1]) ** 2).mean())  # |dF/dλ| ≫ 1
    with pytest.raises(BilevelError, match=r"the outer variables \(the tensor\) hold NaN/inf after outer step 0"):
        bilevel.solve(loud, "cg", maxiter=1, outer_optimizer="sgd", outer_lr=1e308)
    problem = ridge(outer_projection=lambda v: v * 1e308 * 10)  # 0 stays 0 (the start); anything else overflows
    with pytest.raises(BilevelError, match=r"outer_projection returned NaN/inf; a projection must map finite"):
        bilevel.solve(problem, "cg", maxiter=1, outer_lr=1.0)


# ----- a diverging Neumann series ---------------------------------------------------------------------------------------
def diagonal(scales=(1.0, 0.05)) -> bilevel.Problem:
    """L_T = ½ Σ a_i (w_i − λ_i)², L_V = ½‖w − 1‖²: H = diag(a), λ_max = a_1."""
    a = torch.tensor(scales, dtype=F64)

    def inner_loss(lam, w, batch):
        return 0.5 * (a * (w - lam) ** 2).sum()

    def outer_loss(lam, w, batch):
        return 0.5 * ((w - 1.0) ** 2).sum()

    return bilevel.Problem(outer=torch.zeros(2, dtype=F64, requires_grad=True), inner=torch.zeros(2, dtype=F64),
                           inner_loss=inner_loss, outer_loss=outer_loss)


def test_mildly_diverging_neumann_is_refused():
    """α·λ_max = 3.1: each term grows 2.1× along e_1; b = ∂_w L_V is mostly along e_2 at the start, so the norm of
    the last term stays below 100× ‖b‖ (the old check) and the series returned a wrong hypergradient."""
    with pytest.raises(bilevel.linsolve.NeumannDivergenceError, match=r"ift: the Neumann series would diverge: alpha=3.1 exceeds "
                                                             r"2/L≈2 \(L≈1 by power iteration\)"):
        bilevel.solve(diagonal(), "ift", maxiter=2, neumann_alpha=3.1, inner_lr=1.0, inner_steps=30)
    # the standalone series refuses any growth of ‖(I − αA)^K b‖ beyond ‖b‖
    from bilevel.linsolve import neumann

    a = torch.tensor([1.0, 0.05], dtype=F64)
    b = {"value": torch.tensor([0.05, 1.0], dtype=F64)}
    with pytest.raises(bilevel.linsolve.NeumannDivergenceError, match=r"the series would diverge: alpha=3.1 exceeds 2/L≈2"):
        neumann(lambda v: {"value": a * v["value"]}, b, alpha=3.1, maxiter=5)  # α checked by power iteration
    with pytest.raises(bilevel.linsolve.NeumannDivergenceError, match="series diverged"):  # the growth, with a wrong L given
        neumann(lambda v: {"value": a * v["value"]}, b, alpha=3.1, maxiter=5, lipschitz=0.5)
    ok = neumann(lambda v: {"value": a * v["value"]}, b, alpha=1.0, maxiter=5)  # α·λ_max = 1 converges: no error
    assert float(ok.residual) < 1.0


# ----- iMAML's fallback ------------------------------------------------------------------------------------------------
def test_imaml_fallback_warns_when_it_changes_a_task():
    """Task losses ½ Σ a_j φ_j² + c·Σ φ_j with a from −2 to 2 (indefinite H) and λ = 1: (I + H/λ) has eigenvalues from
    −1 to 3, and 2 CG iterations leave residuals above ‖b‖ for 2 of the 3 tasks (c = 1, 2, 3), which fall back to
    x = b; a warning says so, and with cg_fallback=False nothing falls back and nothing is said."""
    from bilevel.meta import meta_problem

    n = 10
    a = torch.linspace(-2.0, 2.0, n, dtype=F64)
    xs = torch.ones(3, 1, n, dtype=F64) * torch.tensor([1.0, 2.0, 3.0], dtype=F64).reshape(3, 1, 1)

    def loss(pred, target):
        return 0.5 * (a * pred[0] ** 2).sum() + (pred[0] * target[0]).sum()

    problem = meta_problem({"w": torch.ones(n, dtype=F64)}, loss, ((xs, xs), (xs, xs)),
                           forward=lambda p, x: p["w"].expand_as(x))
    settings = dict(maxiter=1, lam=1.0, inner_lr=0.01, inner_steps=1, cg_maxiter=2)
    with pytest.warns(bilevel.BilevelWarning, match=r"imaml: CG did not solve .* for some tasks"):
        result = bilevel.solve(problem, "imaml", **settings)
    assert result.history["linsolve_fallback"] == [pytest.approx(2 / 3)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", bilevel.BilevelWarning)
        kept = bilevel.solve(problem, "imaml", cg_fallback=False, **settings)
    assert not torch.equal(kept.outer["w"], result.outer["w"])


# ----- what users see -------------------------------------------------------------------------------------------------
def test_no_internal_key_in_results_states_or_errors():
    seen = []
    result = bilevel.solve(ridge(), "cg", maxiter=2, callbacks=[lambda info: seen.append(info)])
    assert "_" not in result.outer_params and "_" not in result.inner_params
    assert "_" not in seen[0].state.outer and "_" not in seen[0].state.inner
    with pytest.raises(BilevelError) as err:
        bilevel.solve(ridge(outer_projection=lambda v: v[:2]), "cg", maxiter=1)
    assert "'_'" not in str(err.value)
