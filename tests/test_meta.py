"""Meta-learning (MAML, FOMAML, iMAML): vmap over tasks vs a per-task loop, iMAML vs the closed-form implicit
gradient of a linear-regression task family, MAML vs `higher` and plain autograd, a short sinusoid training run,
and bad input."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import bilevel
from bilevel import BilevelError, Problem, tree
from bilevel.meta import EpisodeStream, TaskBatch, meta_problem, n_tasks, per_task, predict
from bilevel.problems.sinusoid import SinusoidTasks, sinusoid_model, sinusoid_problem
from bilevel.solvers.maml import IMAML, MAML

SOLVERS = {
    "maml": MAML(inner_steps=3, inner_lr=0.05),
    "fomaml": MAML(inner_steps=3, inner_lr=0.05, first_order=True),
    "imaml": IMAML(inner_steps=5, inner_lr=0.02, lam=20.0, cg_maxiter=5),
    "imaml_auto_lr": IMAML(inner_steps=5, lam=20.0, cg_maxiter=5, power_iterations=3),
}


def sinusoid_setup(n=5, dtype=torch.float64, device="cpu", hidden=16):
    model = sinusoid_model(hidden, seed=1, dtype=dtype, device=device)
    tasks = SinusoidTasks(n, 6, 7, seed=2, dtype=dtype, device=device)
    support, query = tasks()
    return meta_problem(model, F.mse_loss, (support, query)), support, query


def linear_family(n_tasks_=6, n=12, m=9, d=4, dtype=torch.float64, device="cpu", prox=0.0):
    """Linear-regression tasks: L_T(θ, φ) = (1/2n)‖Xφ − Y‖² + (μ/2)‖φ − θ‖², L_V = (1/2m)‖X_qφ − Y_q‖² (μ = prox)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_tasks_, n, d, generator=gen, dtype=dtype).to(device)
    xq = torch.randn(n_tasks_, m, d, generator=gen, dtype=dtype).to(device)
    w = torch.randn(n_tasks_, d, 1, generator=gen, dtype=dtype).to(device)
    y = (x @ w).squeeze(-1) + 0.1 * torch.randn(n_tasks_, n, generator=gen, dtype=dtype).to(device)
    yq = (xq @ w).squeeze(-1) + 0.1 * torch.randn(n_tasks_, m, generator=gen, dtype=dtype).to(device)
    theta = torch.randn(d, generator=gen, dtype=dtype).to(device)

    @per_task
    def inner_loss(outer, inner, batch):
        xb, yb = batch
        return 0.5 * ((xb @ inner["w"] - yb) ** 2).mean() + 0.5 * prox * ((inner["w"] - outer["w"]) ** 2).sum()

    @per_task
    def outer_loss(outer, inner, batch):
        xb, yb = batch
        return 0.5 * ((xb @ inner["w"] - yb) ** 2).mean()

    problem = Problem(
        outer={"w": theta.clone().requires_grad_(True)}, inner={"w": theta.clone()}, inner_loss=inner_loss,
        outer_loss=outer_loss, inner_data=TaskBatch((x, y)), outer_data=TaskBatch((xq, yq)).data,
        check_dependencies=False,
    )
    return problem, (x, y), (xq, yq), theta


def imaml_closed_form(support, query, theta, lam):
    r"""Per task, with H = XᵀX/n + μI... here μ folded in by the caller: A = XᵀX/n + λI,
    φ* = A⁻¹(XᵀY/n + λθ) (the minimiser of (1/2n)‖Xφ−Y‖² + (λ/2)‖φ−θ‖²), and by the chain rule with
    dφ*/dθ = λA⁻¹ (A symmetric): dL_V(φ*)/dθ = λ A⁻¹ X_qᵀ(X_qφ* − Y_q)/m."""
    x, y = support
    xq, yq = query
    n, d = x.shape[1], x.shape[2]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    a = x.transpose(1, 2) @ x / n + lam * eye
    phi = torch.linalg.solve(a, (x.transpose(1, 2) @ y.unsqueeze(-1)).squeeze(-1) / n + lam * theta)
    g_val = (xq.transpose(1, 2) @ (xq @ phi.unsqueeze(-1) - yq.unsqueeze(-1))).squeeze(-1) / xq.shape[1]
    return lam * torch.linalg.solve(a, g_val), phi


def max_err(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ----- (a) vmap over tasks == Python loop over tasks ---------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_vmap_matches_task_loop(name, device):
    """Oracle: the same per-task rule run task by task in a Python loop; ≤1e-5 absolute in float64."""
    problem, support, query = sinusoid_setup(device=device)
    solver = SOLVERS[name]
    theta = problem.outer_init
    batched = solver.task_hypergradients(problem, theta, support, query)
    looped = dataclasses.replace(solver, vectorize=False).task_hypergradients(problem, theta, support, query)
    assert batched[2]["0.weight"].shape == (5, 16, 1)
    assert max_err(batched[2], looped[2]) <= 1e-5
    torch.testing.assert_close(batched[0], looped[0], rtol=0, atol=1e-10)
    assert float(tree.norm({k: v[0] for k, v in batched[2].items()})) > 1e-3  # a non-trivial hypergradient
    # chunked vmap gives the same numbers
    chunked = dataclasses.replace(solver, task_chunk_size=2).task_hypergradients(problem, theta, support, query)
    assert max_err(batched[2], chunked[2]) <= 1e-10


@pytest.mark.parametrize("name", ["maml", "imaml"])
def test_vmap_matches_loop_when_task_loss_uses_theta(name):
    """The mixed term (∂²_{φθ}L_T)ᵀ· is on when L_T depends on θ; vmap vs loop ≤1e-5 (float64)."""
    problem, support, query, _ = linear_family(prox=0.3)
    solver = dataclasses.replace(SOLVERS[name], inner_lr=0.1)
    theta = problem.outer_init
    batched = solver.task_hypergradients(problem, theta, TaskBatch(support), TaskBatch(query))
    looped = dataclasses.replace(solver, vectorize=False).task_hypergradients(problem, theta, support, query)
    assert max_err(batched[2], looped[2]) <= 1e-5


# ----- (b) iMAML vs the closed-form implicit gradient ------------------------------------------------------
@pytest.mark.parametrize("prox,inner_lr", [(0.0, 0.3), (0.4, 0.3), (0.0, None)])
def test_imaml_matches_closed_form_linear_regression(prox, inner_lr, device):
    """Oracle: per task A = XᵀX/n + (λ+μ)I, φ* = A⁻¹(XᵀY/n + (λ+μ)θ), dL_V(φ*)/dθ = (λ+μ)A⁻¹X_qᵀ(X_qφ*−Y_q)/m;
    μ > 0 makes L_T depend on θ (checks the mixed term −(∂²_{φθ}L_T)ᵀx/λ); inner_lr=None checks that the
    curvature-based step converges. ≤1e-6 relative, float64, converged inner GD (300 steps) and d + 4 CG iterations
    (exact in d)."""
    lam = 0.7
    problem, support, query, theta = linear_family(prox=prox, device=device)
    solver = IMAML(inner_steps=300, inner_lr=inner_lr, lam=lam, cg_maxiter=8)
    query_loss, _, hypergrads, residual = solver.task_hypergradients(problem, problem.outer_init, support, query)
    expected, phi = imaml_closed_form(support, query, theta, lam + prox)
    adapted = solver.adapt(problem, problem.outer_init, support)["w"]
    torch.testing.assert_close(adapted, phi, rtol=1e-9, atol=1e-9)
    rel = float((hypergrads["w"] - expected).norm() / expected.norm())
    assert rel <= 1e-6, rel
    assert float(residual.max()) <= 1e-8
    mean = solver.meta_gradient(problem, problem.outer_init, support, query).hypergrad["w"]
    torch.testing.assert_close(mean, expected.mean(0), rtol=1e-6, atol=1e-9)


def test_imaml_few_cg_iterations_is_inexact():
    """With 1 CG iteration the answer differs from the closed form (the previous test could fail)."""
    problem, support, query, theta = linear_family()
    solver = IMAML(inner_steps=300, inner_lr=0.3, lam=0.7, cg_maxiter=1)
    hg = solver.task_hypergradients(problem, problem.outer_init, support, query)[2]["w"]
    expected, _ = imaml_closed_form(support, query, theta, 0.7)
    assert float((hg - expected).norm() / expected.norm()) > 1e-3


# ----- (c) MAML vs higher and plain autograd ---------------------------------------------------------------
def test_maml_second_order_matches_higher():
    """Oracle: `higher` (independent library) unrolling SGD with a differentiable optimizer, per task; ≤1e-6 (float64)."""
    higher = pytest.importorskip("higher")
    problem, support, query = sinusoid_setup(n=3)
    solver = MAML(inner_steps=3, inner_lr=0.05)
    ours = solver.task_hypergradients(problem, problem.outer_init, support, query)[2]
    model = sinusoid_model(16, seed=1, dtype=torch.float64)
    for i in range(3):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(F.mse_loss(fmodel(support[0][i]), support[1][i]))
            loss = F.mse_loss(fmodel(query[0][i]), query[1][i])
            reference = torch.autograd.grad(loss, list(model.parameters()))
        for (name, _), ref in zip(model.named_parameters(), reference):
            torch.testing.assert_close(ours[name][i], ref, rtol=1e-6, atol=1e-9)


def test_maml_matches_plain_autograd_with_theta_in_task_loss():
    """Oracle: torch.autograd through the same SGD loop (create_graph=True) when L_T also depends on θ; and
    FOMAML against ∂L_V/∂φ at the detached adapted φ_T (plus ∂L_V/∂θ = 0 here); ≤1e-6 (float64)."""
    prox, lr, steps = 0.3, 0.1, 4
    problem, (x, y), (xq, yq), theta0 = linear_family(prox=prox)
    ours = MAML(inner_steps=steps, inner_lr=lr).task_hypergradients(problem, problem.outer_init, (x, y), (xq, yq))[2]
    fo = MAML(inner_steps=steps, inner_lr=lr, first_order=True).task_hypergradients(
        problem, problem.outer_init, (x, y), (xq, yq))[2]
    for i in range(x.shape[0]):
        theta = theta0.clone().requires_grad_(True)
        phi = theta
        for _ in range(steps):
            lt = 0.5 * ((x[i] @ phi - y[i]) ** 2).mean() + 0.5 * prox * ((phi - theta) ** 2).sum()
            phi = phi - lr * torch.autograd.grad(lt, phi, create_graph=True)[0]
        lv = 0.5 * ((xq[i] @ phi - yq[i]) ** 2).mean()
        torch.testing.assert_close(ours["w"][i], torch.autograd.grad(lv, theta)[0], rtol=1e-6, atol=1e-10)
        phi_t = phi.detach().requires_grad_(True)
        g_fo = torch.autograd.grad(0.5 * ((xq[i] @ phi_t - yq[i]) ** 2).mean(), phi_t)[0]
        torch.testing.assert_close(fo["w"][i], g_fo, rtol=1e-6, atol=1e-10)


# ----- (d) training ----------------------------------------------------------------------------------------
def test_short_sinusoid_training_beats_no_meta_learning():
    """Oracle: the same adaptation (5 SGD steps) from the untrained initialisation on 200 held-out tasks; 150 MAML
    steps must cut the meta-test MSE to below 60% of it, and adaptation must help the trained θ."""
    problem, evaluate = sinusoid_problem(meta_batch=10, n_test_tasks=200, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest, and immune to oversubscribed CI cores
    try:
        result = bilevel.solve(problem, "maml", maxiter=150, inner_steps=1, inner_lr=0.01, outer_lr=0.01, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert result.n_steps == 150 and {"outer_loss", "inner_loss", "hypergrad_norm"} <= set(result.history)
    solver = result.solver
    trained = evaluate(result, solver, n_steps=5)["test_loss"]
    baseline = evaluate(problem.outer_init, solver, n_steps=5)["test_loss"]
    unadapted = evaluate(result, solver, n_steps=0)["test_loss"]
    assert trained < 0.6 * baseline, (trained, baseline)
    assert trained < unadapted, (trained, unadapted)


def test_solve_imaml_runs_and_reports_residual():
    problem, support, query = sinusoid_setup(n=4)
    result = bilevel.solve(problem, "imaml", maxiter=3, inner_steps=3, inner_lr=0.02, lam=20.0, outer_lr=1e-3)
    assert len(result.history["linsolve_residual"]) == 3 and result.history["n_tasks"] == [4.0] * 3
    assert result.oracle_calls["hvp"] == 3 * 5  # counted once per batched call: cg_maxiter HVPs per step


def test_episode_stream_pairs_support_and_query():
    """Support and query of one episode come from the same tasks whichever side asks first."""
    counter = iter(range(100))

    def sampler():
        i = float(next(counter))
        return (torch.full((2, 3), i), torch.full((2, 3), i)), (torch.full((2, 4), i), torch.full((2, 4), i))

    stream = EpisodeStream(sampler)
    s1, q1 = stream.support(), stream.query()
    q2, s2 = stream.query(), stream.support()
    s3 = stream.support()
    assert float(s1.data[0][0, 0]) == float(q1.data[0][0, 0]) == 0.0
    assert float(s2.data[0][0, 0]) == float(q2.data[0][0, 0]) == 1.0
    assert float(s3.data[0][0, 0]) == 2.0


def test_predict_and_per_task_mean():
    """predict gives each task's model output at its adapted φ_i; a TaskBatch loss is the mean over tasks."""
    problem, support, query = sinusoid_setup(n=3)
    solver = MAML(inner_steps=2, inner_lr=0.05)
    adapted = solver.adapt(problem, problem.outer_init, support)
    out = predict(problem, adapted, query[0])
    losses = solver.evaluate(problem, problem.outer_init, support, query)
    torch.testing.assert_close(((out - query[1]) ** 2).mean(dim=(1, 2)), losses)
    theta = problem.outer_init
    whole = problem.inner_objective(theta, theta, TaskBatch(support))
    each = torch.stack([problem.inner_objective(theta, theta, (support[0][i], support[1][i])) for i in range(3)])
    torch.testing.assert_close(whole, each.mean())


# ----- (e) bad input ---------------------------------------------------------------------------------------
def test_errors():
    problem, support, query = sinusoid_setup(n=3)
    theta = problem.outer_init
    with pytest.raises(BilevelError, match="maml: the support batch has 3 tasks but the query batch has 2"):
        MAML().task_hypergradients(problem, theta, support, (query[0][:2], query[1][:2]))
    with pytest.raises(BilevelError, match="share one leading task dimension"):
        MAML().task_hypergradients(problem, theta, (support[0], support[1][:2]), query)
    with pytest.raises(BilevelError, match="0-d"):
        n_tasks((torch.zeros(()), torch.zeros(3)))
    with pytest.raises(BilevelError, match="inner_lr=0.0 is not valid"):
        MAML(inner_lr=0.0)
    with pytest.raises(BilevelError, match="lam=.* is not valid"):
        IMAML(lam=-1.0)
    with pytest.raises(BilevelError, match="cg_maxiter=.* is not valid; expected an integer >= 0"):
        IMAML(cg_maxiter=-2)
    with pytest.raises(BilevelError, match="maml: inner_lr=None is not valid"):
        MAML(inner_lr=None)
    with pytest.raises(BilevelError, match="power_iterations=.* is not valid; expected an integer >= 1"):
        IMAML(power_iterations=0)
    with pytest.raises(BilevelError, match="task_chunk_size"):
        MAML(task_chunk_size=0)
    with pytest.raises(BilevelError, match="has no option"):
        bilevel.solve(problem, "maml", maxiter=1, lam=1.0)
    mismatched = Problem(outer={"w": torch.zeros(3, requires_grad=True)}, inner={"w": torch.zeros(4)},
                         inner_loss=lambda o, i, b: (i["w"] ** 2).sum(), outer_loss=lambda o, i, b: (i["w"] ** 2).sum(),
                         inner_data=torch.zeros(2, 3), outer_data=torch.zeros(2, 3), check_dependencies=False)
    with pytest.raises(BilevelError, match="same names and shapes"):
        bilevel.solve(mismatched, "imaml", maxiter=1)
    bn = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    with pytest.raises(BilevelError, match="track_running_stats=False"):
        bilevel.solve(meta_problem(bn, F.mse_loss, (support, query)), "maml", maxiter=1)
    with pytest.raises(BilevelError, match="3 support tasks but 2 query tasks"):
        meta_problem(sinusoid_model(8), F.mse_loss, (support, (query[0][:2], query[1][:2])))
    with pytest.raises(BilevelError, match="must return \\(support, query\\)"):
        EpisodeStream(lambda: support[0]).support()
    with pytest.raises(BilevelError, match="nn.Module, or a dict of tensors together with forward"):
        meta_problem({"w": torch.zeros(2)}, F.mse_loss, (support, query))
    with pytest.raises(BilevelError, match="n_steps=.* is not valid; expected an integer >= 0"):
        MAML().adapt(problem, theta, support, n_steps=-1)
    _, evaluate = sinusoid_problem(meta_batch=2, n_test_tasks=2)
    with pytest.raises(BilevelError, match="say how to adapt to each test task"):
        evaluate(theta)
