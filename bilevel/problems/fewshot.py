r"""N-way K-shot image classification episodes on Fashion-MNIST, meta-train and meta-test classes disjoint.

An episode draws N classes from a class pool, relabels them 0..N−1 in random order, and takes K support and
K' query images per class (Finn, Abbeel & Levine, 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML, §5.2, with Fashion-MNIST in place of Omniglot, which is not available offline). Default split:
meta-train classes 0–5 (T-shirt, trouser, pullover, dress, coat, sandal), meta-test classes 6–9 (shirt, sneaker,
bag, ankle boot). The model is a small conv net (3 × [conv 3×3, stride 2, ReLU], linear head) whose
``body`` / ``head`` split lets a pretrained-classifier baseline swap the head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.errors import BilevelError
from bilevel.meta import Episode, adaptation_of, meta_params, meta_problem, predict
from bilevel.problem import Problem
from bilevel.problems.datasets import fashion_mnist_raw
from bilevel.types import Params

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


class FewShotTasks:
    """Sampler of N-way K-shot episodes: ``sampler() -> ((x_s, y_s), (x_q, y_q))`` with ``x_s`` of shape
    ``(n_tasks, n_way·k_shot, *image)`` and labels in ``0..n_way−1`` (int64), from its own seeded generator."""

    def __init__(
        self, images: Tensor, labels: Tensor, classes: Sequence[int], *, n_way: int = 3, k_shot: int = 5,
        k_query: int = 10, n_tasks: int = 16, seed: int = 0,
    ):
        classes = [int(c) for c in classes]
        if not isinstance(n_way, int) or not 2 <= n_way <= len(classes):
            raise BilevelError(f"FewShotTasks: n_way must be an integer in [2, {len(classes)}] (the class pool "
                               f"{classes}), got {n_way!r}.")
        for name, value in (("k_shot", k_shot), ("k_query", k_query), ("n_tasks", n_tasks)):
            if not isinstance(value, int) or value < 1:
                raise BilevelError(f"FewShotTasks: {name} must be an integer >= 1, got {value!r}.")
        self.images, self.classes = images, classes
        self.n_way, self.k_shot, self.k_query, self.n_tasks = n_way, k_shot, k_query, n_tasks
        labels = labels.cpu()
        self._index = [torch.nonzero(labels == c).flatten() for c in classes]
        short = [c for c, idx in zip(classes, self._index) if len(idx) < k_shot + k_query]
        if short:
            raise BilevelError(f"FewShotTasks: classes {short} have fewer than k_shot + k_query = {k_shot + k_query} images.")
        self._gen = torch.Generator().manual_seed(seed)

    def __call__(self) -> Episode:
        return self.sample()

    def sample(self, n_tasks: int | None = None) -> Episode:
        """One episode of ``n_tasks`` (default ``self.n_tasks``) tasks."""
        n = self.n_tasks if n_tasks is None else n_tasks
        k = self.k_shot + self.k_query
        picks = []
        for _ in range(n):
            chosen = torch.randperm(len(self.classes), generator=self._gen)[: self.n_way]
            for c in chosen.tolist():
                idx = self._index[c]
                picks.append(idx[torch.randperm(len(idx), generator=self._gen)[:k]])
        index = torch.stack(picks).reshape(n, self.n_way, k).to(self.images.device)
        x = self.images[index]  # (n, n_way, k, *image)
        y = torch.arange(self.n_way, device=x.device).reshape(1, self.n_way, 1).expand(n, self.n_way, k)

        def part(lo: int, hi: int) -> tuple[Tensor, Tensor]:
            xs = x[:, :, lo:hi].reshape(n, self.n_way * (hi - lo), *x.shape[3:])
            return xs, y[:, :, lo:hi].reshape(n, -1)

        return part(0, self.k_shot), part(self.k_shot, k)


class ConvNet(nn.Module):
    """3 × [conv 3×3 (stride 2, padding 1), ReLU] on 1×28×28 → ``channels``×4×4, flatten, linear to ``n_out``."""

    def __init__(self, n_out: int, channels: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        width = 1
        for _ in range(3):
            layers += [nn.Conv2d(width, channels, 3, stride=2, padding=1), nn.ReLU()]
            width = channels
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(channels * 16, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def fashion_mnist_images(split: str = "train", *, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Fashion-MNIST as ``(N, 1, 28, 28)`` floats scaled to zero mean / unit variance (training-set statistics)
    and int64 labels."""
    images, labels = fashion_mnist_raw(split)
    x = images.astype(np.float32) / 255.0
    x = (x - 0.2860) / 0.3530  # mean / std of the 60k training images
    return (torch.as_tensor(x, dtype=dtype, device=device).unsqueeze(1),
            torch.as_tensor(labels, device=device))


def fewshot_problem(
    *, n_way: int = 3, k_shot: int = 5, k_query: int = 10, meta_batch: int = 16, channels: int = 16,
    train_classes: Sequence[int] = (0, 1, 2, 3, 4, 5), test_classes: Sequence[int] = (6, 7, 8, 9),
    n_test_tasks: int = 200, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> tuple[Problem, Callable[..., dict[str, float]]]:
    """(problem, evaluate) for N-way K-shot Fashion-MNIST classification.

    Meta-training episodes come from ``train_classes`` of the 60k training images; ``evaluate(outer, solver=None,
    n_steps=None)`` adapts ``outer`` on ``n_test_tasks`` fixed episodes of ``test_classes`` drawn from the 10k test
    images and returns the query ``test_loss`` and ``test_accuracy`` (mean over tasks) with a 95% interval half-width;
    ``solver`` defaults to the Result's solver.
    """
    if set(train_classes) & set(test_classes):
        raise BilevelError(f"fewshot_problem: train_classes {tuple(train_classes)} and test_classes "
                           f"{tuple(test_classes)} overlap; meta-test classes must be unseen.")
    x_train, y_train = fashion_mnist_images("train", dtype=dtype, device=device)
    x_test, y_test = fashion_mnist_images("test", dtype=dtype, device=device)
    tasks = FewShotTasks(x_train, y_train, train_classes, n_way=n_way, k_shot=k_shot, k_query=k_query,
                         n_tasks=meta_batch, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConvNet(n_way, channels).to(dtype=dtype, device=device)
    problem = meta_problem(model, F.cross_entropy, tasks, name=f"fashion_mnist[{n_way}-way {k_shot}-shot]")
    test_tasks = FewShotTasks(x_test, y_test, test_classes, n_way=n_way, k_shot=k_shot, k_query=k_query,
                              n_tasks=n_test_tasks, seed=seed + 10_000)
    support, query = test_tasks.sample()

    def evaluate(outer: Any, solver: Any = None, *, n_steps: int | None = None) -> dict[str, float]:
        solver = adaptation_of(outer, solver)
        theta = meta_params(outer)
        adapted = solver.adapt(problem, theta, support, n_steps=n_steps)
        logits = predict(problem, adapted, query[0], vectorize=solver.vectorize)
        losses = F.cross_entropy(logits.flatten(0, 1), query[1].flatten(), reduction="none").reshape(query[1].shape)
        accuracy = (logits.argmax(-1) == query[1]).to(torch.float64).mean(1)
        half = 1.96 * float(accuracy.std()) / math.sqrt(accuracy.numel())
        return {"test_loss": float(losses.mean()), "test_accuracy": float(accuracy.mean()), "test_accuracy_ci95": half}

    return problem, evaluate


def pretrain_classifier(
    classes: Sequence[int], *, n_way: int, channels: int = 16, steps: int = 300, batch_size: int = 128,
    lr: float = 1e-3, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> Params:
    """Baseline without meta-learning: train a ``len(classes)``-way :class:`ConvNet` on all images of ``classes``
    (ordinary supervised learning, Adam), then return its parameters with a fresh zero ``n_way`` head, as an
    initialisation to fine-tune on new tasks."""
    x, y = fashion_mnist_images("train", dtype=dtype, device=device)
    keep = torch.isin(y, torch.as_tensor(list(classes), device=y.device))
    x, y = x[keep], y[keep]
    relabel = {c: i for i, c in enumerate(classes)}
    y = torch.as_tensor([relabel[int(c)] for c in y.tolist()], device=x.device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConvNet(len(classes), channels).to(dtype=dtype, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=gen).to(x.device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    params["head.weight"] = torch.zeros(n_way, params["head.weight"].shape[1], dtype=dtype, device=x.device)
    params["head.bias"] = torch.zeros(n_way, dtype=dtype, device=x.device)
    return params

