r"""Hypergradient cost and accuracy: bilevel against TorchOpt, higher, Betty and plain autograd, in one process.

Every contender computes dF/dλ at the SAME inner point w (ridge: the exact w*(λ); MLP: after ``--train-steps`` full-batch
Adam steps on L_T) and the same λ, with the same K:

* implicit (IFT): dF/dλ = ∂_λ L_V − (∂²_{wλ} L_T)ᵀ H⁻¹ ∂_w L_V, H = ∂²_ww L_T, H⁻¹ by K Neumann terms
  (Lorraine, Vicol & Duvenaud, 2020, "Optimizing Millions of Hyperparameters by Implicit Differentiation", AISTATS;
  step α = 1/L with L from power iteration, shared by every Neumann contender) or K conjugate-gradient iterations;
* unrolled: reverse mode through K SGD steps w_t = w_{t−1} − α ∇_w L_T(λ, w_{t−1}) started at w (Franceschi et al.,
  2017, "Forward and Reverse Gradient-Based Hyperparameter Optimization", ICML).

Contenders: bilevel (``implicit_hypergrad`` with ``neumann`` / ``cg``, ``cg`` with ``hvp_dtype`` one precision lower
("bilevel CG mixed": float32 products for float64 problems, bfloat16 for float32, reliable residual updates in the
working precision), ``unrolled_hypergrad``); TorchOpt 0.7.3
(``custom_root`` + ``linear_solve.solve_cg``); higher 0.2.1 (``innerloop_ctx`` + differentiable SGD); Betty 0.1.1
(``betty.hypergradient.get_grads`` with its ``neumann`` routine on two ``ImplicitProblem`` objects, no ``Engine``);
a plain-autograd Neumann loop (double backward on a retained graph, the reference of docs/peer_costs.md). Peers are
imported lazily and skipped, with the reason printed, when missing or broken. The problems live in
``peers/cases.py``, the contenders in ``peers/contenders.py`` (both importable); this script measures and reports.

Problems: (1) per-weight ridge (``bilevel.problems.ridge``; reference: the closed-form hypergradient); (2) MLP 784-H-H-10
classifier with one weight-decay hyperparameter per weight, L_T = CE(train) + ½ Σ e^λ w², L_V = CE(val), full batch,
float32; (3) the same with no hidden layer ("logreg": multinomial logistic regression, 7850 weights, a convex inner
problem, so H is positive definite and the MINRES reference below is well posed; always computed).
Accuracy on the MLP: at a trained point H = ∂²_ww L_T is near-singular and slightly indefinite (at H=64,
N=1024, e^λ = 0.01, 800 Adam steps: smallest eigenvalues ≈ −0.016 by Lanczos, scipy ``eigsh``), so H⁻¹∂_w L_V is
ill-posed: against a MINRES solve (still at residual 1e-2 after 3000 iterations) CG, TorchOpt's CG and Neumann all have
relative error ≈ 1 at K = 10 (0.96 at K = 160). What the MLP rows report instead is the agreement of each peer with
bilevel running the same algorithm (equal accuracy at equal K); ``--mlp-reference`` adds the MINRES reference
(Paige & Saunders, 1975). The equal-accuracy scan (time to reach a relative error by scanning K) runs on problems with
a reference: the ridge by default.

Times are medians of ``--reps`` runs after ``--warmup`` warm-ups, the contenders interleaved round-robin; "grad-eq" divides
by the time of one inner-loss gradient on the same data measured in the same rounds. Memory: CUDA
``max_memory_allocated`` above the baseline; CPU: growth of the peak resident set size (VmHWM, reset through
/proc/self/clear_refs, with glibc's mmap threshold pinned so freed tensors leave the RSS), measured in a separate pass.

One point, no history: every CG here starts from zero and unpreconditioned. What ``solve(problem, "cg")`` carries from
one outer step to the next (warm start, recycled L-BFGS preconditioner) is measured along a run, at equal accuracy,
by ``benchmarks/hypergrad_trajectory.py``.

Run: ``.venv/bin/python benchmarks/hypergrad_peers.py`` (2-core CPU defaults: about 10–15 minutes; the MLP inner point
is trained once and cached under ``--cache-dir``);
``--problem mlp --hidden 1024 --n 16384 --device cuda`` for the larger GPU rows of docs/peer_costs.md.
Optional peers: ``pip install torchopt==0.7.3 higher==0.2.1`` and ``pip install --no-deps betty-ml==0.1.1``.
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)
from __future__ import annotations

import os

# On a shared, oversubscribed machine OpenMP's spin-waiting makes 2-thread runs several times slower and noisy:
# let idle OpenMP threads sleep (must be set before torch loads its OpenMP runtime; equal for every contender).
_LOAD = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
if _LOAD > (os.cpu_count() or 1) and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import ctypes
import dataclasses
import functools
import gc
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the cases and contenders: peers/ beside this script
from peers.cases import Case, cast_case, make_mlp_case, make_ridge_case, mlp_reference
from peers.contenders import (
    LOW_PRECISION,
    Contender,
    FlatLinearization,
    Runner,
    available_contenders,
    bilevel_cg,
    bilevel_cg_mixed,
    bilevel_neumann,
    bilevel_unrolled,
    higher_unrolled,
    one_gradient,
    torchopt_cg,
)
from peers.contenders import betty_neumann as betty_neumann  # for tests/test_peers.py and hypergrad_trajectory.py
from peers.contenders import plain_neumann as plain_neumann

import bilevel
from bilevel import oracles, tree
from bilevel.linsolve import cg, neumann

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*functorch.*")
warnings.filterwarnings("ignore", message=".*_flat_weights.*")

RATIOS = [("TorchOpt / bilevel", "TorchOpt CG", "bilevel CG"), ("TorchOpt / bilevel mixed", "TorchOpt CG", "bilevel CG mixed"),
          ("higher / bilevel", "higher unrolled", "bilevel unrolled"),
          ("Betty / bilevel", "Betty Neumann", "bilevel Neumann")]


# ----------------------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flat(out: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in out]).to("cpu", torch.float64)


def rel_err(out: list[Tensor], ref: Tensor) -> float:
    return float((flat(out) - ref).norm() / ref.norm())


def time_round_robin(runners: dict[str, Runner], device: torch.device, reps: int, warmup: int, *,
                     min_sample: float = 0.02) -> tuple[dict[str, float], dict[str, list[Tensor]], dict[str, str]]:
    """Median seconds per call of each runner, the runners interleaved round-robin; its last output; failures.

    A sample repeats a call ``n`` times (n chosen from the warm-up so a sample lasts ≥ ``min_sample`` s) and counts
    sample/n: sub-millisecond calls are otherwise lost in timer and scheduler noise."""
    outputs: dict[str, list[Tensor]] = {}
    failed: dict[str, str] = {}
    repeat: dict[str, int] = {}
    for label, run in runners.items():
        try:
            elapsed = math.inf
            for _ in range(max(1, warmup)):
                sync(device)
                t0 = time.perf_counter()
                outputs[label] = run()
                sync(device)
                elapsed = min(elapsed, time.perf_counter() - t0)
            repeat[label] = max(1, min(1000, math.ceil(min_sample / max(elapsed, 1e-7))))
        except Exception as e:  # a peer that breaks at run time is reported, not fatal
            failed[label] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"[run] {label} failed: {failed[label]}")
    times: dict[str, list[float]] = {label: [] for label in runners if label not in failed}
    for _ in range(reps):
        for label in times:
            run, n = runners[label], repeat[label]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                out = run()
            sync(device)
            times[label].append((time.perf_counter() - t0) / n)
            del out
    return {label: statistics.median(ts) for label, ts in times.items()}, outputs, failed


class PeakMemory:
    """Peak memory growth of one call: CUDA allocator statistics, or the resident set size on Linux."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ok = device.type == "cuda" or (sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs"))
        self._pinned = False
        self._libc: Any = None

    def unpin_malloc(self) -> None:
        """Back to glibc's steady state (mmap only above 32 MiB) so later timings see a normal allocator."""
        if self._pinned:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 32 * 2**20)
            libc.mallopt(-1, 64 * 2**20)
            self._pinned = False

    def pin_malloc(self) -> None:
        """glibc: serve every allocation ≥ 64 KiB by mmap (a fixed threshold) so freed tensors leave the RSS at once."""
        if self.device.type == "cuda" or self._pinned:
            return
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
            libc.malloc_trim(0)
            self._libc = libc
            self._pinned = True
        except OSError:
            self.ok = False

    def measure(self, run: Runner) -> float:
        """MiB above the level before the call."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            out = run()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            del out
            return (peak - base) / 2**20
        if self._libc is not None:
            self._libc.malloc_trim(0)  # give free heap pages back, so reusing them shows up as RSS growth
        base = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        out = run()
        peak = _rss_kib("VmHWM")
        del out
        return (peak - base) / 1024


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# ----------------------------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    """Results of one (case, K): seconds, relative errors, agreement with bilevel and peak MiB per contender."""

    case: Case
    k: int
    seconds: dict[str, float]
    errors: dict[str, float]  # vs the accurate reference (when the case has one)
    agreement: dict[str, float]  # vs bilevel running the same algorithm
    memory: dict[str, float] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    makers: dict[str, Callable[[], Runner]] = dataclasses.field(default_factory=dict)


SAME_ALGORITHM = {"plain Neumann": "bilevel Neumann", "Betty Neumann": "bilevel Neumann", "TorchOpt CG": "bilevel CG",
                  "bilevel CG mixed": "bilevel CG", "higher unrolled": "bilevel unrolled"}


def run_main(case: Case, k: int, contenders: list[Contender], args: argparse.Namespace) -> Row:
    makers: dict[str, Callable[[], Runner]] = {c.label: functools.partial(c.make, case, k) for c in contenders}
    notes = []
    if "bilevel CG" in makers:  # bilevel's CG refuses an indefinite H (check=True); time check=False then, and say so
        try:
            bilevel_cg(case, k)()
        except bilevel.BilevelError as e:
            makers["bilevel CG"] = functools.partial(bilevel_cg, case, k, check=False)
            notes.append(f"bilevel CG: {str(e)[:70]}…; timed with check=False (skips such steps; TorchOpt takes them)")
            if makers.pop("bilevel CG mixed", None):  # its reliable updates need the checked loop
                notes.append("bilevel CG mixed: not run (mixed precision needs the checked CG loop, which refuses an "
                             "indefinite H)")
    runners = {label: make() for label, make in makers.items()}
    seconds, outputs, failed = time_round_robin(runners, case.device, args.reps, args.warmup)
    errors, agreement = {}, {}
    for label, out in outputs.items():
        if label == "one gradient" or label in failed:
            continue
        if case.reference is not None:
            errors[label] = rel_err(out, case.reference)
        ours = SAME_ALGORITHM.get(label)
        if ours in outputs and ours not in failed:
            agreement[label] = rel_err(out, flat(outputs[ours]))
    return Row(case, k, seconds, errors, agreement, failed=failed, notes=notes, makers=makers)


def cell(row: Row, label: str, *, show_mem: bool) -> str:
    if label in row.failed:
        return "failed"
    if label not in row.seconds:
        return "—"
    unit = row.seconds["one gradient"]
    s = row.seconds[label]
    mem = row.memory.get(label)
    mem_s = f", {mem:.0f} MiB" if (show_mem and mem is not None) else ""
    if label == "one gradient":
        return f"{s * 1e3:.3g} ms{mem_s}"
    return f"{s / unit:.1f} ({s * 1e3:.3g} ms{mem_s})"


def print_main_table(rows: list[Row], contenders: list[Contender], device: torch.device) -> None:
    labels = [c.label for c in contenders]
    ratio_heads = [r for r in RATIOS if r[1] in labels and r[2] in labels]
    mem_note = "peak MiB = CUDA max_memory_allocated growth" if device.type == "cuda" else "peak MiB = peak RSS growth"
    print(f"\n### Time per hypergradient: grad-equiv (ms, {mem_note}); ratios: peer time / bilevel time, same algorithm\n")
    print("| problem, size, K | " + " | ".join(labels) + " | " + " | ".join(r[0] for r in ratio_heads) + " |")
    print("|" + "---|" * (1 + len(labels) + len(ratio_heads)))
    for row in rows:
        cells = [cell(row, lab, show_mem=True) for lab in labels]
        ratios = []
        for _, peer, ours in ratio_heads:
            if peer in row.seconds and ours in row.seconds:
                ratios.append(f"{row.seconds[peer] / row.seconds[ours]:.2f}")
            else:
                ratios.append("—")
        print(f"| {row.case.name} {row.case.label}, K={row.k} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    for row in rows:
        for note in row.notes:
            print(f"- {row.case.name} {row.case.label}, K={row.k}: {note}")
    err_labels = [lab for lab in labels if lab != "one gradient"]
    with_ref = [row for row in rows if row.errors]
    if with_ref:
        print("\n### Relative error ‖ĝ − g_ref‖/‖g_ref‖ at that K\n")
        print("| problem, size, K | " + " | ".join(err_labels) + " | reference |")
        print("|" + "---|" * (2 + len(err_labels)))
        for row in with_ref:
            cells = [f"{row.errors[lab]:.2e}" if lab in row.errors else "—" for lab in err_labels]
            print(f"| {row.case.name} {row.case.label}, K={row.k} | " + " | ".join(cells) + f" | {row.case.reference_note} |")
    peers = [lab for lab in err_labels if lab in SAME_ALGORITHM]
    print("\n### Same algorithm, same accuracy: ‖peer − bilevel‖/‖bilevel‖ (peer vs bilevel's Neumann / CG / unrolled)\n")
    print("| problem, size, K | " + " | ".join(f"{lab} vs {SAME_ALGORITHM[lab]}" for lab in peers) + " |")
    print("|" + "---|" * (1 + len(peers)))
    for row in rows:
        cells = [f"{row.agreement[lab]:.1e}" if lab in row.agreement else "—" for lab in peers]
        print(f"| {row.case.name} {row.case.label}, K={row.k} | " + " | ".join(cells) + " |")


def scan_grid(kmax: int) -> list[int]:
    """K = 1, 2, 3, 4, 5, 7, 9, ... (ratio ≈ 1.3) up to kmax."""
    ks, k = [], 1.0
    while round(k) <= kmax:
        if not ks or round(k) != ks[-1]:
            ks.append(int(round(k)))
        k *= 1.3
    return ks


def equal_accuracy(case: Case, contenders: list[Contender], targets: list[float], kmax: int,
                   args: argparse.Namespace) -> None:
    """For each implicit method: the smallest K on the scan grid reaching each target error, and its time."""
    implicit = [c for c in contenders if c.family == "implicit"]
    grid = scan_grid(kmax)
    found: dict[str, dict[float, tuple[int, float]]] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    for c in implicit:
        found[c.label] = {}
        curves[c.label] = []
        for k in grid:
            try:
                err = rel_err(c.make(case, k)(), case.reference)
            except Exception as e:  # noqa: BLE001 - report and move on
                print(f"[scan] {c.label} K={k} failed: {type(e).__name__}: {str(e)[:120]}")
                break
            curves[c.label].append((k, err))
            for t in targets:
                if t not in found[c.label] and err <= t:
                    found[c.label][t] = (k, err)
            if len(found[c.label]) == len(targets):
                break
    # time each method at each K it needed (one round-robin per distinct K set)
    runners: dict[str, Runner] = {"one gradient": one_gradient(case, 0)}
    for c in implicit:
        for k, _ in found[c.label].values():
            runners.setdefault(f"{c.label}@{k}", c.make(case, k))
    seconds, _, failed = time_round_robin(runners, case.device, args.reps, args.warmup)
    unit = seconds["one gradient"]
    print(f"\n### Equal accuracy, {case.name} {case.label}: smallest K on the grid {grid[:6]}… ≤ {kmax} reaching the "
          "target relative error, and the time at that K (grad-equiv, ms)\n")
    print("| method | " + " | ".join(f"err ≤ {t:g}: K, grad-eq (ms)" for t in targets) + " | error curve (K: err) |")
    print("|" + "---|" * (2 + len(targets)))
    best_bilevel: dict[float, float] = {}
    for c in implicit:
        cells = []
        for t in targets:
            if t in found[c.label]:
                k, _ = found[c.label][t]
                key = f"{c.label}@{k}"
                if key in seconds:
                    s = seconds[key]
                    cells.append(f"K={k}: {s / unit:.1f} ({s * 1e3:.3g} ms)")
                    if c.label.startswith("bilevel"):
                        best_bilevel[t] = min(best_bilevel.get(t, math.inf), s)
                else:
                    cells.append(f"K={k}: failed")
            else:
                last = curves[c.label][-1] if curves[c.label] else (0, math.nan)
                cells.append(f"not reached (K={last[0]}: {last[1]:.1e})")
        curve = ", ".join(f"{k}: {e:.1e}" for k, e in curves[c.label][:: max(1, len(curves[c.label]) // 8)])
        print(f"| {c.label} | " + " | ".join(cells) + f" | {curve} |")
    for t in targets:
        torchopt = found.get("TorchOpt CG", {}).get(t)
        if torchopt and t in best_bilevel and f"TorchOpt CG@{torchopt[0]}" in seconds:
            ratio = seconds[f"TorchOpt CG@{torchopt[0]}"] / best_bilevel[t]
            print(f"- err ≤ {t:g}: TorchOpt CG time / fastest bilevel implicit time = {ratio:.2f} (goal ≥ 2)")
        plain, mixed = found.get("bilevel CG", {}).get(t), found.get("bilevel CG mixed", {}).get(t)
        if plain and mixed and f"bilevel CG@{plain[0]}" in seconds and f"bilevel CG mixed@{mixed[0]}" in seconds:
            speedup = seconds[f"bilevel CG@{plain[0]}"] / seconds[f"bilevel CG mixed@{mixed[0]}"]
            print(f"- err ≤ {t:g}: bilevel CG (K={plain[0]}) time / bilevel CG mixed (K={mixed[0]}) time = {speedup:.2f}")


def memory_vs_k(case: Case, contenders: list[Contender], ks: list[int], mem: PeakMemory) -> None:
    """Peak memory of one hypergradient as K grows: IFT flat, unrolling linear in K."""
    chosen = [c for c in contenders
              if c.label in ("bilevel Neumann", "bilevel CG", "bilevel unrolled", "TorchOpt CG", "higher unrolled")]
    what = "CUDA max_memory_allocated growth" if case.device.type == "cuda" else "peak RSS growth (VmHWM, rough proxy)"
    print(f"\n### Peak memory (MiB, {what}) of one hypergradient vs K, {case.name} {case.label}\n")
    print("| K | " + " | ".join(c.label for c in chosen) + " |")
    print("|" + "---|" * (1 + len(chosen)))
    for i, k in enumerate(ks):
        cells = []
        for c in chosen:
            try:
                run = c.make(case, k)
                if c.label == "bilevel CG":
                    try:
                        run()
                    except bilevel.BilevelError:  # indefinite H: as in the main table
                        run = bilevel_cg(case, k, check=False)
                if i == 0:
                    run()  # warm-up once per contender (lazy initialisation)
                cells.append(f"{mem.measure(run):.0f}")
            except Exception as e:  # noqa: BLE001
                cells.append(f"failed ({type(e).__name__})")
        print(f"| {k} | " + " | ".join(cells) + " |", flush=True)


def unrolled_vs_higher(case: Case, k: int) -> str:
    """max |bilevel unrolled − higher unrolled| over λ, in float64 at the same point (same K SGD steps, step α)."""
    try:
        import higher  # noqa: F401
    except ImportError as e:
        return f"higher unavailable ({e})"
    case64 = cast_case(case, torch.float64)
    a = flat(bilevel_unrolled(case64, k)())
    b = flat(higher_unrolled(case64, k)())
    return f"max |Δ| = {float((a - b).abs().max()):.2e} (|g|_max = {float(a.abs().max()):.2e}), float64, K={k}"




# ----------------------------------------------------------------------------------------------------------------------
# profile of bilevel's implicit hypergradient, with prototypes of faster variants (not in the library)
# ----------------------------------------------------------------------------------------------------------------------
def profile_bilevel(case: Case, k: int, args: argparse.Namespace, with_torchopt: bool) -> None:
    """Time the pieces of ``implicit_hypergrad`` and prototypes of faster variants, interleaved, at one (λ, w)."""
    problem, outer, inner = case.problem, case.bl_outer(), case.bl_inner()
    train, val = case.train, case.val
    lin = oracles.Linearization(problem, outer, inner, train)
    b = tree.detach(oracles.grad_outer(problem, outer, inner, val)[2])
    v = {n: torch.randn_like(t) for n, t in b.items()}
    flat_lin = FlatLinearization(case)
    low = LOW_PRECISION[case.w[case.names[0]].dtype]
    lin_low = oracles.Linearization(problem, tree.cast(outer, low), tree.cast(inner, low), tree.cast_batch(train, low))
    v_low = tree.cast(v, low)
    low_name = str(low).removeprefix("torch.")

    def plain_grad_outer() -> Any:
        w = {n: t.detach().requires_grad_(True) for n, t in case.w.items()}
        return torch.autograd.grad(case.outer_loss_fn(w, val), list(w.values()))

    def jvp_neumann() -> Any:  # Neumann with the pure torch.func HVP (forward-over-reverse), no retained graph
        mv = functools.partial(oracles.hvp, problem, outer, inner, train)
        return neumann(mv, b, alpha=case.alpha, maxiter=k, check=False)

    cg_label = f"cg({k}), check=True"
    parts: dict[str, Runner] = {
        "one gradient (unit)": one_gradient(case, 0),
        "grad_outer: (L_V, ∂_λ L_V, ∂_w L_V) by torch.func": lambda: oracles.grad_outer(problem, outer, inner, val),
        "  same by plain autograd (prototype)": plain_grad_outer,
        "Linearization: ∇_w L_T with graph": lambda: oracles.Linearization(problem, outer, inner, train),
        "one HVP, double backward (Linearization.hvp)": lambda: lin.hvp(v),
        "one HVP, torch.func jvp∘grad (oracles.hvp)": lambda: oracles.hvp(problem, outer, inner, train, v),
        "mixed VJP (Linearization.mixed_vjp)": lambda: lin.mixed_vjp(v),
        f"neumann({k}) on a built Linearization, check=True": lambda: neumann(lin.hvp, b, alpha=case.alpha, maxiter=k),
        f"neumann({k}), check=False": lambda: neumann(lin.hvp, b, alpha=case.alpha, maxiter=k, check=False),
        cg_label: lambda: cg(lin.hvp, b, maxiter=k, rtol=0.0),
        f"cg({k}), check=False": lambda: cg(lin.hvp, b, maxiter=k, rtol=0.0, check=False),
        f"neumann({k}) on one flat vector (prototype)": lambda: flat_lin.neumann(b, case.alpha, k),
        f"whole: implicit_hypergrad Neumann({k})": bilevel_neumann(case, k),
        f"whole: implicit_hypergrad Neumann({k}), check=False": bilevel_neumann(case, k, check=False),
        f"whole: implicit_hypergrad CG({k})": bilevel_cg(case, k),
        f"whole: implicit_hypergrad CG({k}), check=False": bilevel_cg(case, k, check=False),
        f"whole: prototype, flat vector + plain autograd, CG({k})": lambda: FlatLinearization(case).hypergrad_cg(k),
    }
    parts[f"one HVP in {low_name} (hvp_dtype's linearization)"] = lambda: lin_low.hvp(v_low)
    parts[f"whole: implicit_hypergrad CG({k}), hvp_dtype={low_name}"] = bilevel_cg_mixed(case, k)
    if args.profile_jvp:
        parts[f"whole: Neumann({k}) with torch.func HVPs"] = jvp_neumann
    if with_torchopt:
        parts[f"peer: TorchOpt CG({k}), for the ratio"] = torchopt_cg(case, k)
    seconds, outputs, failed = time_round_robin(parts, case.device, args.reps, args.warmup)
    unit = seconds["one gradient (unit)"]
    print(f"\n### Where bilevel's implicit hypergradient spends its time, {case.name} {case.label}, K={k}\n")
    print("| part | ms | grad-equiv |")
    print("|---|---|---|")
    for label in parts:
        if label in failed:
            print(f"| {label} | failed: {failed[label][:70]} | |")
            continue
        s = seconds[label]
        print(f"| {label} | {s * 1e3:.3g} | {s / unit:.2f} |")
    hvp = seconds["one HVP, double backward (Linearization.hvp)"]
    neu = seconds[f"neumann({k}) on a built Linearization, check=True"]
    cgs = seconds.get(cg_label, seconds[f"cg({k}), check=False"])
    fixed = seconds["grad_outer: (L_V, ∂_λ L_V, ∂_w L_V) by torch.func"] + seconds["Linearization: ∇_w L_T with graph"]
    model = fixed + k * hvp + seconds["mixed VJP (Linearization.mixed_vjp)"]
    low_hvp = seconds.get(f"one HVP in {low_name} (hvp_dtype's linearization)")
    bf16_s = f"; in {low_name}: {low_hvp / unit:.2f}, speed-up {hvp / low_hvp:.2f}×" if low_hvp else ""
    print(f"\n- one HVP = {hvp / unit:.2f} grad-eq (torch.func jvp∘grad: "
          f"{seconds['one HVP, torch.func jvp∘grad (oracles.hvp)'] / unit:.2f}{bf16_s}); "
          f"linear-solver work beyond the HVPs: Neumann {(neu - k * hvp) / k * 1e3:.3g} ms/term, "
          f"CG {(cgs - k * hvp) / k * 1e3:.3g} ms/iteration")
    print(f"- cost model grad_outer + Linearization + K·HVP + mixed VJP = {model / unit:.1f} grad-eq "
          f"(whole Neumann measured: {seconds[f'whole: implicit_hypergrad Neumann({k})'] / unit:.1f}); "
          f"fixed part {fixed / unit:.1f} grad-eq, HVPs {k * hvp / unit:.1f} ({k * hvp / model:.0%} of the model)")
    plain_cg = outputs.get(f"cg({k}), check=False")
    if plain_cg is not None:
        print(f"- CG({k}) on H x = ∂_w L_V from 0: relative residual ‖b − Hx‖/‖b‖ = {float(plain_cg.residual):.2g} "
              "(reliable updates of low-precision products correct it each time it falls tenfold)")
    cg32 = outputs.get(f"whole: implicit_hypergrad CG({k}), check=False")
    mixed = outputs.get(f"whole: implicit_hypergrad CG({k}), hvp_dtype={low_name}")
    if cg32 is not None and mixed is not None:
        print(f"- CG({k}) with {low_name} products and reliable updates vs CG({k}): relative difference "
              f"{rel_err(mixed, flat(cg32)):.1e}")
    torchopt_seconds = seconds.get(f"peer: TorchOpt CG({k}), for the ratio")
    if torchopt_seconds is not None:
        whole = min(seconds.get(f"whole: implicit_hypergrad CG({k})", math.inf),
                    seconds[f"whole: implicit_hypergrad CG({k}), check=False"])
        print(f"- TorchOpt CG({k}) / bilevel CG({k}) in this round: {torchopt_seconds / whole:.2f}; "
              f"TorchOpt / flat-vector prototype: "
              f"{torchopt_seconds / seconds[f'whole: prototype, flat vector + plain autograd, CG({k})']:.2f}")
        mixed_seconds = seconds.get(f"whole: implicit_hypergrad CG({k}), hvp_dtype={low_name}")
        if mixed_seconds is not None:
            print(f"- TorchOpt CG({k}) / bilevel CG({k}) with {low_name} products: {torchopt_seconds / mixed_seconds:.2f}")
        floor = (seconds["Linearization: ∇_w L_T with graph"] + k * hvp) / unit
        bound = torchopt_seconds / unit / floor
        verdict = ("a 2x at equal accuracy needs fewer or cheaper HVPs (CG over Neumann, warm starts, preconditioning, "
                   "low-precision HVPs), not less overhead" if bound < 2 else
                   "here the overhead around the HVPs decides: cutting it can reach 2x")
        print(f"- TorchOpt CG({k}) = {torchopt_seconds / unit:.1f} grad-eq. Same K, even with grad_outer and the mixed VJP "
              f"free, bilevel costs ≥ {floor:.1f} grad-eq: TorchOpt/bilevel ≤ {bound:.2f}; {verdict}.")



# ----------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", choices=["ridge", "mlp", "logreg", "all"], default="all")
    p.add_argument("--dims", default="100,300,1000", help="ridge dimensions d (n_train = n_val = 2d)")
    p.add_argument("--hidden", type=int, default=256, help="MLP hidden width H")
    p.add_argument("--n", type=int, default=4096, help="MLP training (and validation) examples N")
    p.add_argument("--k", type=int, default=10, help="Neumann terms / CG iterations / unroll steps")
    p.add_argument("--ks", default="", help="extra K values for the main table, e.g. 50")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="MLP and logreg: e^λ for every weight")
    p.add_argument("--logreg-n", type=int, default=8192, help="logreg (784-10, convex): training (and validation) examples")
    p.add_argument("--train-steps", type=int, default=400, help="MLP: full-batch Adam steps before measuring")
    p.add_argument("--data", choices=["fashion", "random"], default="fashion")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ridge-dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--targets", default="1e-2,1e-3", help="relative errors for the equal-accuracy table")
    p.add_argument("--scan-kmax-ridge", type=int, default=400)
    p.add_argument("--scan-kmax-mlp", type=int, default=150)
    p.add_argument("--ref-maxiter", type=int, default=2000, help="MLP reference: MINRES iterations at most")
    p.add_argument("--ref-rtol", type=float, default=1e-7, help="MLP reference: MINRES relative residual")
    p.add_argument("--ref-dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--mlp-reference", action="store_true",
                   help="MLP: compute the exact-solve reference by MINRES (slow; cached) for error columns and the scan")
    p.add_argument("--memory-ks", default="5,10,20,40", help="K values for the memory-vs-K table ('' to skip)")
    p.add_argument("--no-scan", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--profile-jvp", action="store_true", help="also time a whole Neumann solve with torch.func HVPs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cache-dir", default="~/.cache/bilevel/hypergrad_peers",
                   help="where the trained MLP inner point is kept between runs ('' to retrain every time)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# hypergrad_peers: torch {torch.__version__}, bilevel {bilevel.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads, load average {_LOAD:.1f} on {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}; "
          f"medians of {args.reps} runs after {args.warmup} warm-ups, contenders interleaved\n")
    contenders, skipped = available_contenders()
    targets = [float(t) for t in args.targets.split(",") if t]
    ks = [args.k] + [int(k) for k in args.ks.split(",") if k]
    mem = PeakMemory(device)
    rows: list[Row] = []
    cases: list[Case] = []
    dtype_ridge = getattr(torch, args.ridge_dtype)

    if args.problem in ("ridge", "all"):
        for d in [int(x) for x in args.dims.split(",") if x]:
            case = make_ridge_case(d, dtype=dtype_ridge, device=device, seed=args.seed)
            cases.append(case)
            for k in ks:
                rows.append(run_main(case, k, contenders, args))
    # classifiers: name -> (hidden width, N, reference?); logreg is convex (H positive definite), so its MINRES
    # reference is well posed and always computed; the MLP's only on request (see the module docstring)
    classifiers = {"mlp": (args.hidden, args.n, args.mlp_reference), "logreg": (0, args.logreg_n, True)}
    for name, (hidden, n, with_reference) in classifiers.items():
        if args.problem not in (name, "all"):
            continue
        case = make_mlp_case(hidden, n, weight_decay=args.weight_decay, train_steps=args.train_steps,
                             data=args.data, dtype=torch.float32, device=device, seed=args.seed,
                             cache_dir=args.cache_dir or None)
        if with_reference:
            mlp_reference(case, maxiter=args.ref_maxiter, rtol=args.ref_rtol, dtype=getattr(torch, args.ref_dtype),
                          cache_dir=args.cache_dir or None)
            print(f"[{name}] reference: {case.reference_note}")
        cases.append(case)
        for k in ks:
            rows.append(run_main(case, k, contenders, args))

    # memory of the main-table calls, measured after all timings (the pinned malloc slows allocation)
    if mem.ok:
        mem.pin_malloc()
        for row in rows:
            for label, make in row.makers.items():
                if label in row.seconds:
                    row.memory[label] = mem.measure(make())
        mem.unpin_malloc()
    print_main_table(rows, contenders, device)
    if skipped:
        print("\nSkipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))

    print("\n### bilevel unrolled vs higher on the same loop (K SGD steps, step α, from w)\n")
    for case in cases:
        print(f"- {case.name} {case.label}: {unrolled_vs_higher(case, args.k)}")

    if not args.no_scan:
        for case in cases:
            if case.reference is None:
                print(f"\n(equal-accuracy scan skipped for {case.name} {case.label}: no reference; --mlp-reference "
                      "computes one by MINRES, see the module docstring on why it is ill-posed at a trained MLP point)")
                continue
            kmax = args.scan_kmax_ridge if case.name == "ridge" else args.scan_kmax_mlp
            equal_accuracy(case, contenders, targets, kmax, args)

    if not args.no_profile:  # the MLP (compute-bound) and the smallest ridge (overhead-bound, like a small GPU problem)
        ridges = [c for c in cases if c.name == "ridge"]
        for case in [c for c in cases if c.name in ("mlp", "logreg")] + ridges[:1]:
            profile_bilevel(case, args.k, args, any(c.label == "TorchOpt CG" for c in contenders))

    mem_ks = [int(k) for k in args.memory_ks.split(",") if k]
    if mem_ks and mem.ok:
        mem.pin_malloc()
        for case in cases:
            if case.name == "mlp" or case is cases[-1]:
                memory_vs_k(case, contenders, mem_ks, mem)


if __name__ == "__main__":
    main()
