"""A network with BatchNorm: bilevel's hypergradients equal a hand-written plain-autograd computation.

The reference writes the forward pass by hand (linear → batch norm with batch statistics in training and running
statistics in evaluation → tanh → linear), updates the running statistics by PyTorch's formula, and differentiates
with torch.autograd only. float64, tolerance 1e-9.
"""

import torch
import torch.nn.functional as F
from torch import nn

from bilevel import Problem
from bilevel.hypergrad import implicit_hypergrad, unrolled_hypergrad
from bilevel.linsolve import exact
from bilevel.optim import sgd

EPS, MOMENTUM = 1e-5, 0.1


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5, eps=EPS, momentum=MOMENTUM), nn.Tanh(), nn.Linear(5, 2)).double()


def data():
    gen = torch.Generator().manual_seed(1)
    x, xv = torch.randn(16, 3, generator=gen, dtype=torch.float64), torch.randn(12, 3, generator=gen, dtype=torch.float64)
    return (x, torch.randint(0, 2, (16,), generator=gen)), (xv, torch.randint(0, 2, (12,), generator=gen))


def manual_forward(p, x, stats, training):
    h = x @ p["0.weight"].T + p["0.bias"]
    if training:
        mean, var = h.mean(0), h.var(0, unbiased=False)
        n = h.shape[0]
        new_stats = ((1 - MOMENTUM) * stats[0] + MOMENTUM * mean.detach(),
                     (1 - MOMENTUM) * stats[1] + MOMENTUM * var.detach() * n / (n - 1))
    else:
        (mean, var), new_stats = stats, stats
    h = (h - mean) / torch.sqrt(var + EPS) * p["1.weight"] + p["1.bias"]
    return torch.tanh(h) @ p["3.weight"].T + p["3.bias"], new_stats


def problem_for(net, train, val):
    def inner_loss(lam, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y) + 0.5 * sum((lam[k].exp() * model[k] ** 2).sum() for k in lam)

    def outer_loss(lam, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    outer = {k: torch.full_like(v, -1.0).requires_grad_() for k, v in net.named_parameters()}
    return Problem(outer=outer, inner=net, inner_loss=inner_loss, outer_loss=outer_loss, inner_data=train, outer_data=val)


def manual_losses(lam, p, train, val, stats):
    logits, new_stats = manual_forward(p, train[0], stats, True)
    lt = F.cross_entropy(logits, train[1]) + 0.5 * sum((lam[k].exp() * p[k] ** 2).sum() for k in lam)
    return lt, new_stats


def test_unrolled_through_batchnorm_matches_manual_autograd():
    net = make_net()
    train, val = data()
    problem = problem_for(net, train, val)
    steps, lr = 3, 0.3
    lam = {k: v.detach() for k, v in problem.outer_init.items()}
    hg = unrolled_hypergrad(problem, lam, problem.inner_init, inner_batches=[train] * steps, outer_batch=val,
                            optimizer=sgd(lr), buffers=problem.buffers_init)

    lam_ref = {k: v.clone().requires_grad_() for k, v in lam.items()}
    p = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    stats = (net[1].running_mean.clone(), net[1].running_var.clone())
    for _ in range(steps):
        lt, stats = manual_losses(lam_ref, p, train, val, stats)
        grads = torch.autograd.grad(lt, list(p.values()), create_graph=True)
        p = {k: v - lr * g for (k, v), g in zip(p.items(), grads)}
    logits, _ = manual_forward(p, val[0], stats, training=False)
    reference = torch.autograd.grad(F.cross_entropy(logits, val[1]), list(lam_ref.values()))

    for k, g in zip(lam_ref, reference):
        torch.testing.assert_close(hg.hypergrad[k], g, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hg.buffers["1.running_mean"], stats[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hg.buffers["1.running_var"], stats[1], rtol=1e-12, atol=1e-12)
    assert int(hg.buffers["1.num_batches_tracked"]) == steps


def test_implicit_through_batchnorm_matches_dense_autograd_formula():
    """dF/dλ = ∂_λL_V − ∂²_{λw}L_T H⁻¹ ∂_wL_V with H, ∂²_{λw}L_T from torch.autograd.functional on the manual net;
    the derivative evaluations must not move the running statistics."""
    net = make_net()
    train, val = data()
    problem = problem_for(net, train, val)
    lam = {k: v.detach() for k, v in problem.outer_init.items()}
    w = {k: v.detach() + 0.1 for k, v in problem.inner_init.items()}
    buffers = {k: v.clone() for k, v in problem.buffers_init.items()}
    buffers["1.running_mean"] += 0.2
    before = {k: v.clone() for k, v in buffers.items()}
    hg = implicit_hypergrad(problem, lam, w, inner_batch=train, outer_batch=val, buffers=buffers, solve=exact)
    for k in before:
        assert torch.equal(before[k], buffers[k])

    keys = list(w)
    shapes = [w[k].shape for k in keys]
    sizes = [w[k].numel() for k in keys]

    def unflat(v):
        return {k: t.reshape(s) for k, t, s in zip(keys, v.split(sizes), shapes)}

    lam_flat = torch.cat([lam[k].reshape(-1) for k in keys])
    w_flat = torch.cat([w[k].reshape(-1) for k in keys])
    stats = (buffers["1.running_mean"], buffers["1.running_var"])

    def lt(lf, wf):
        return manual_losses(unflat(lf), unflat(wf), train, val, stats)[0]

    def lv(wf):
        logits, _ = manual_forward(unflat(wf), val[0], stats, training=False)
        return F.cross_entropy(logits, val[1])

    h = torch.autograd.functional.hessian(lt, (lam_flat, w_flat))
    h_ww, h_lw = h[1][1], h[0][1]
    grad_w = torch.autograd.functional.jacobian(lv, w_flat)
    reference = -h_lw @ torch.linalg.solve(h_ww, grad_w)  # ∂_λ L_V = 0: L_V does not use λ
    ours = torch.cat([hg.hypergrad[k].reshape(-1) for k in keys])
    torch.testing.assert_close(ours, reference, rtol=1e-8, atol=1e-11)
