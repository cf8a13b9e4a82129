r"""Memory of the ``cg`` solver's recycled L-BFGS preconditioner, in vectors of the inner dimension P.

``solve(problem, "cg")`` carries curvature pairs (s, y = H s) from one outer step's CG solve to the next one's
preconditioner (``cg_preconditioner="lbfgs"``, memory m = ``--memory`` pairs; :mod:`bilevel.precondition`). This
script measures what that costs in memory against the same solver without it (``cg_preconditioner=None``):

* held: the bytes of the tensors the solver state keeps for the preconditioner between outer steps (``state.pairs``,
  every distinct storage counted once);
* step peak: the peak of memory during one outer step (inner step, building the preconditioner, the preconditioned
  CG solve recording its new pairs, recycling them into the state) above the level before it. Measured twice, in
  separate steps: by torch's own CPU allocations (the profiler's allocation events, summed in order: exact bytes of
  every tensor allocated or freed) and by the process's peak RSS (Linux ``VmHWM`` reset through ``clear_refs``, glibc's
  mmap threshold fixed so that a freed tensor leaves RSS), which is what a user sees;
* at peak − plain: held + step peak of the preconditioned solver minus the same of the plain one: the memory the
  preconditioner adds at the worst moment of a step.

Everything is divided by the bytes of one vector of P entries in the working dtype. The problem is a diagonal
quadratic (inner loss ½wᵀdiag(a)w + ½e^λ‖w‖² − bᵀw, a log-spaced in [1, 10⁴]; outer loss ½‖w − t‖²), so a Hessian
product costs a few vector operations and every CG solve (``--cg-maxiter`` iterations at rtol 1e-12, which none
reaches) records the full m new pairs: the worst case for the preconditioner's memory. Each cell runs in its own
process, after ``--warmup`` outer steps (the state then holds m pairs and lazy initialisation is done).

    .venv/bin/python benchmarks/preconditioner_memory.py                      # P = 10^5 and 10^6, float64 and float32
    .venv/bin/python benchmarks/preconditioner_memory.py --sizes 1000000 --dtypes float64

The script measures the ``bilevel`` of the checkout it lives in (its parent directory goes first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's bilevel, not an installed one
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from meta_vmap import _peak_rss_kib, _reset_peak_rss  # noqa: E402  (peak RSS above the level at the reset)

CONFIGS = {"plain CG": None, "CG + L-BFGS": "lbfgs"}


def machine() -> str:
    """The CPU's model name (``lscpu``), or the platform's processor string."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import platform

    return platform.processor() or platform.machine()


def diagonal_problem(size: int, dtype: Any):
    """The diagonal quadratic of the module docstring with P = ``size`` inner variables and one outer one."""
    import torch

    from bilevel import Problem

    gen = torch.Generator().manual_seed(0)
    a = torch.logspace(0, 4, size, dtype=torch.float64).to(dtype)
    b = torch.randn(size, generator=gen, dtype=torch.float64).to(dtype)
    target = torch.randn(size, generator=gen, dtype=torch.float64).to(dtype)

    def inner_loss(lam, w, batch):
        a, b = batch
        return 0.5 * (a * w * w).sum() + 0.5 * lam.exp().sum() * (w * w).sum() - (b * w).sum()

    def outer_loss(lam, w, t):
        return 0.5 * ((w - t) ** 2).sum()

    return Problem(outer=torch.zeros(1, dtype=dtype, requires_grad=True), inner=torch.zeros(size, dtype=dtype),
                   inner_loss=inner_loss, outer_loss=outer_loss, inner_data=(a, b), outer_data=target,
                   name="diagonal quadratic")


def storage_bytes(obj: Any) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (tuples, lists, dicts, object attributes)."""
    import torch

    seen_storage: dict[int, int] = {}
    seen_obj: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen_obj:
            continue
        seen_obj.add(id(item))
        if isinstance(item, torch.Tensor):
            if item.device.type == "meta":  # shapes only, no data
                continue
            storage = item.untyped_storage()
            seen_storage[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
        elif hasattr(item, "__slots__"):
            stack.extend(getattr(item, name) for name in item.__slots__ if hasattr(item, name))
    return sum(seen_storage.values())


def allocation_peak(fn) -> int:
    """Peak bytes of torch's CPU allocations during ``fn()`` above the level at its start (profiler allocation
    events: each allocation +size, each free −size, summed in time order)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def worker(args: argparse.Namespace) -> dict:
    """One cell, in its own process: held bytes, then the allocation peak and the RSS peak of one outer step each."""
    import torch

    torch.set_num_threads(args.threads)
    import bilevel

    dtype = getattr(torch, args.dtype)
    problem = diagonal_problem(args.size, dtype)
    options = dict(inner_steps=1, inner_lr=1e-4, cg_maxiter=args.cg_maxiter, cg_rtol=1e-12,
                   cg_preconditioner=CONFIGS[args.config], cg_preconditioner_memory=args.memory)
    state = bilevel.solve(problem, "cg", maxiter=args.warmup, validate=False, **options).state
    iterations = []

    def step() -> None:
        nonlocal state
        result = bilevel.solve(problem, "cg", maxiter=1, validate=False, state=state, **options)
        iterations.append(int(result.history["linsolve_iterations"][-1]))
        state = result.state

    held = storage_bytes(state.pairs)
    gc.collect()
    allocated = allocation_peak(step)
    gc.collect()
    before = _reset_peak_rss()
    step()
    rss = (_peak_rss_kib() - before) * 1024
    vector = args.size * dtype.itemsize
    return {"held": held / vector, "allocated": allocated / vector, "rss": rss / vector, "vector_bytes": vector,
            "iterations": iterations, "bilevel": bilevel.__file__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="inner dimensions P, comma-separated")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--memory", type=int, default=10, help="cg_preconditioner_memory m (pairs kept)")
    parser.add_argument("--cg-maxiter", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="outer steps before the measured ones")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each subprocess")
    parser.add_argument("--worker", nargs=3, metavar=("SIZE", "DTYPE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.size, args.dtype, args.config = int(args.worker[0]), args.worker[1], args.worker[2]
        print(json.dumps(worker(args)))
        return

    # a fixed mmap threshold: large tensors are mmapped and returned to the OS when freed, so RSS follows live memory
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
    base = [sys.executable, os.path.abspath(__file__), "--memory", str(args.memory), "--cg-maxiter",
            str(args.cg_maxiter), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    m = args.memory
    print(f"cg solver, memory m = {m} pairs, {args.cg_maxiter} CG iterations per solve (every solve records m new "
          f"pairs), {args.threads} thread(s); machine: {machine()}")
    rows = []
    for size in (int(float(s)) for s in args.sizes.split(",")):
        for dtype in args.dtypes.split(","):
            cells = {}
            for config in CONFIGS:
                out = subprocess.run([*base, "--worker", str(size), dtype, config], capture_output=True, text=True,
                                     env=env)
                if out.returncode != 0:
                    raise SystemExit(f"P={size} {dtype} {config} failed:\n{out.stderr[-3000:]}")
                cells[config] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((size, dtype, cells))
    print(f"bilevel: {rows[0][2]['plain CG']['bilevel']}")
    print("vectors of P entries in the working dtype (MB = 10^6 bytes); 'alloc' = torch CPU allocations, 'RSS' = "
          "peak resident set size")
    print("| P | dtype | solver | held between steps | step peak (alloc) | step peak (RSS) | "
          "at peak − plain CG (alloc) | at peak − plain CG (RSS) | CG iterations |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, dtype, cells in rows:
        plain = cells["plain CG"]
        for config, cell in cells.items():
            vector_mb = cell["vector_bytes"] / 1e6

            def fmt(vectors: float, mb: float = vector_mb) -> str:
                return f"{vectors:.1f} ({vectors * mb:.0f} MB)"

            extra = {k: cell["held"] + cell[k] - plain["held"] - plain[k] for k in ("allocated", "rss")}
            print(f"| {size:.0e} | {dtype} | {config} | {fmt(cell['held'])} | {fmt(cell['allocated'])} | "
                  f"{fmt(cell['rss'])} | {fmt(extra['allocated'])} | {fmt(extra['rss'])} | "
                  f"{', '.join(map(str, cell['iterations']))} |")


if __name__ == "__main__":
    main()
