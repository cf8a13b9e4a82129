r"""Meta-gradients over a meta-batch of tasks: ``torch.func.vmap`` over tasks vs a Python loop over tasks.

For each method (MAML second order, FOMAML, iMAML) and each mode (``vmap`` / ``loop``), one subprocess builds the
problem, computes a one-task meta-gradient (lazy initialisation must not count as memory), then one full
meta-gradient: its peak memory is the peak RSS above the RSS before it on CPU (Linux: the peak mark reset through
``/proc/self/clear_refs``; glibc's mmap threshold fixed so freed tensors leave RSS), or
``torch.cuda.max_memory_allocated`` above the baseline on CUDA. Then it times ``--repeats`` more (median, after
warm-ups). Both modes compute the same numbers (tests/test_meta.py checks it). The table prints the time per
meta-gradient, the loop/vmap time ratio, and the same for peak memory. "grad-equiv" divides by the time of one
batched support-loss gradient over the whole meta-batch (vmap of ``grad``), measured in the same subprocesses.

    .venv/bin/python benchmarks/meta_vmap.py                       # sinusoid MLP, CPU
    .venv/bin/python benchmarks/meta_vmap.py --problem fewshot     # Fashion-MNIST conv net
    .venv/bin/python benchmarks/meta_vmap.py --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = {
    "maml": ("maml", {"inner_steps": 5, "first_order": False}),
    "fomaml": ("maml", {"inner_steps": 5, "first_order": True}),
    "imaml": ("imaml", {"inner_steps": 5, "cg_maxiter": 5}),
}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int:
    """Return freed heap to the OS, reset the peak-RSS mark to the current RSS (Linux ``clear_refs`` 5) and return
    the current RSS in KiB; where that is unavailable, the max RSS so far (``getrusage``)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = _status_kib("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_kib() -> int:
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(args: argparse.Namespace) -> dict:
    """Runs in a subprocess: one (method, mode) measurement."""
    import torch

    torch.set_num_threads(args.threads)
    from torch.func import grad, vmap

    from bilevel.meta import TaskBatch, as_task_data
    from bilevel.registry import make_solver

    dtype = torch.float32
    if args.problem == "sinusoid":
        from bilevel.problems.sinusoid import sinusoid_problem

        problem, _ = sinusoid_problem(meta_batch=args.tasks, k_shot=args.k_shot, k_query=args.k_shot,
                                      n_test_tasks=1, dtype=dtype, device=args.device)
        lr, extra = 0.01, {"lam": 50.0}
    else:
        from bilevel.problems.fewshot import fewshot_problem

        problem, _ = fewshot_problem(meta_batch=args.tasks, k_shot=args.k_shot, n_test_tasks=1, dtype=dtype,
                                     device=args.device)
        lr, extra = 0.1, {"lam": 1.0}
    name, options = METHODS[args.method]
    options = {**options, "inner_lr": lr, "vectorize": args.mode == "vmap", **(extra if name == "imaml" else {})}
    solver = make_solver(name, **options)
    support, query = problem.inner_data(), problem.outer_data()
    theta = problem.outer_init
    uses_outer = False  # meta_problem's task loss ignores θ

    def meta_gradient(s: TaskBatch = support, q: TaskBatch = query) -> None:
        hg = solver.meta_gradient(problem, theta, s, q, uses_outer=uses_outer)
        float(hg.outer_loss)  # force completion

    # a one-task meta-gradient first: lazy initialisation (kernels, dispatch tables) must not count as memory
    meta_gradient(TaskBatch(tuple(t[:1] for t in support.data)), TaskBatch(tuple(t[:1] for t in query.data)))
    # peak memory of the first full meta-gradient
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        meta_gradient()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        before = _reset_peak_rss()
        meta_gradient()
        peak_mib = (_peak_rss_kib() - before) / 1024

    def timed(fn) -> float:
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.repeats):
            _sync(args.device)
            t0 = time.perf_counter()
            fn()
            _sync(args.device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    data = as_task_data(support, "bench", "support")

    def one_gradient() -> None:  # the unit: one batched support-loss gradient at θ over all tasks
        g = vmap(grad(lambda w, b: problem.inner_objective(theta, w, b)), in_dims=(None, 0))(theta, data)
        float(next(iter(g.values())).sum())

    return {"time": timed(meta_gradient), "grad": timed(one_gradient), "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", choices=["sinusoid", "fewshot"], default="sinusoid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, default=32, help="meta-batch size")
    parser.add_argument("--k-shot", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each subprocess")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default="maml,fomaml,imaml")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.method, args.mode = args.worker
        print(json.dumps(worker(args)))
        return

    # a fixed mmap threshold: large tensors are mmapped and returned to the OS when freed, so RSS follows live memory
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
    base = [sys.executable, os.path.abspath(__file__), "--problem", args.problem, "--device", args.device,
            "--tasks", str(args.tasks), "--k-shot", str(args.k_shot), "--threads", str(args.threads),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    print(f"meta-gradient over {args.tasks} tasks, problem={args.problem} ({args.k_shot}-shot), device={args.device}, "
          f"threads={args.threads}; median of {args.repeats} after {args.warmup} warm-ups; each cell its own process")
    rows = []
    for method in args.methods.split(","):
        cell = {}
        for mode in ("vmap", "loop"):
            out = subprocess.run([*base, "--worker", method, mode], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"{method}/{mode} failed:\n{out.stderr[-3000:]}")
            cell[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((method, cell))
    print("| method | vmap ms | loop ms | loop/vmap time | vmap grad-equiv | loop grad-equiv | "
          "vmap peak MiB | loop peak MiB | loop/vmap memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, cell in rows:
        v, lo = cell["vmap"], cell["loop"]
        unit = statistics.median([v["grad"], lo["grad"]])
        mem_ratio = lo["peak_mib"] / v["peak_mib"] if v["peak_mib"] > 0.05 else float("nan")
        print(f"| {method} | {1e3 * v['time']:.1f} | {1e3 * lo['time']:.1f} | {lo['time'] / v['time']:.2f}x | "
              f"{v['time'] / unit:.1f} | {lo['time'] / unit:.1f} | {v['peak_mib']:.1f} | {lo['peak_mib']:.1f} | "
              f"{mem_ratio:.2f}x |")
    unit_ms = 1e3 * statistics.median([c[m]["grad"] for _, c in rows for m in ("vmap", "loop")])
    print(f"grad-equiv unit: one vmapped support-loss gradient over all {args.tasks} tasks = {unit_ms:.2f} ms")


if __name__ == "__main__":
    main()
