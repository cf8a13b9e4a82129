"""Worker processes for the Optuna storage tests (not a test module).

Run as a script, it joins a study in a shared storage and runs hybrid trials on the ridge problem:
``python tests/optuna_worker.py --storage URL --study NAME --worker ID [--heartbeat 1 --grace 2] ...``.
The helpers below start such workers and run the kill-a-worker scenario against any RDB storage URL.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = "workers"


def main(argv: list[str] | None = None) -> None:
    import optuna

    from bilevel.integrations.optuna import hybrid_objective, make_storage
    from bilevel.problems import ridge_data, ridge_problem

    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study", default=STUDY)
    parser.add_argument("--worker", required=True)
    parser.add_argument("--n-trials", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--heartbeat", type=int, default=None)
    parser.add_argument("--grace", type=int, default=None)
    parser.add_argument("--hang-at-step", type=int, default=-1, help="block inside the first trial at this step")
    parser.add_argument("--marker", default=None, help="file that receives the hanging trial's number")
    parser.add_argument("--until-retried", action="store_true", help="stop once a retried trial has completed")
    args = parser.parse_args(argv)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(args.storage, heartbeat_interval=args.heartbeat, grace_period=args.grace)
    study = optuna.load_study(study_name=args.study, storage=storage, pruner=optuna.pruners.NopPruner())
    train, val = ridge_data(seed=0)
    current: dict[str, int] = {}

    def build(trial: optuna.Trial):
        current["trial"] = trial.number
        return ridge_problem(train, val), {
            "method": trial.suggest_categorical("method", ["cg", "exact"]),
            "outer_lr": trial.suggest_categorical("outer_lr", [0.03, 0.1, 0.3]),
        }

    def hang(info) -> bool:
        if info.step == args.hang_at_step:
            Path(args.marker).write_text(str(current["trial"]))
            time.sleep(600)  # "training": the test SIGKILLs this process here
        return False

    def stop_once_retried(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        retried = any(t.state == optuna.trial.TrialState.COMPLETE and t.system_attrs.get("retry_history") for t in trials)
        waiting = any(t.state == optuna.trial.TrialState.WAITING for t in trials)
        if retried and not waiting:
            study.stop()

    objective = hybrid_objective(
        build, maxiter=5, inner_lr=0.005, inner_steps=5, seed=0,
        evaluate=lambda result: {"worker": args.worker},
        callbacks=[hang] if args.hang_at_step >= 0 else [],
    )
    study.optimize(objective, n_trials=args.n_trials, timeout=args.timeout,
                   callbacks=[stop_once_retried] if args.until_retried else [])


# ----- helpers for the tests ------------------------------------------------------------------------------------
def spawn(storage: str, worker: str, log_dir: Path, *extra: str) -> subprocess.Popen:
    """Start a worker process; its output goes to ``log_dir/worker-<id>.log``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.setdefault("OMP_NUM_THREADS", "1")
    log = open(log_dir / f"worker-{worker}.log", "w")  # noqa: SIM115 - closed by the OS when the process ends
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--storage", storage, "--worker", worker, *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
    )


def logs(log_dir: Path) -> str:
    """All worker logs (for assertion messages)."""
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("worker-*.log")))


def wait_for(path: Path, process: subprocess.Popen, timeout: float, log_dir: Path) -> str:
    """Wait until ``path`` exists (written by ``process``) and return its text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        if process.poll() is not None:
            raise AssertionError(f"worker exited with {process.returncode} before reaching the marker\n{logs(log_dir)}")
        time.sleep(0.05)
    raise AssertionError(f"no marker after {timeout} s\n{logs(log_dir)}")


def kill_one_worker_scenario(
    storage_url: str, log_dir: Path, *, survivors: tuple[str, ...] = ("B",), heartbeat: int = 1, grace: int = 2
) -> int:
    """Worker A hangs in its first trial and is SIGKILLed; the ``survivors`` keep going with heartbeats on and stop
    once the killed trial has been failed, re-queued and completed by one of them.

    Returns the number of the killed trial. The study is created here (before the workers join).
    """
    import optuna

    from bilevel.integrations.optuna import make_storage

    optuna.create_study(study_name=STUDY, storage=make_storage(storage_url), direction="minimize")
    hb = ["--heartbeat", str(heartbeat), "--grace", str(grace)]
    marker = log_dir / "hanging-trial"
    a = spawn(storage_url, "A", log_dir, *hb, "--n-trials", "1", "--hang-at-step", "3", "--marker", str(marker))
    try:
        killed = int(wait_for(marker, a, 90, log_dir))
        others = [spawn(storage_url, w, log_dir, *hb, "--n-trials", "200", "--timeout", "60", "--until-retried")
                  for w in survivors]
        a.send_signal(signal.SIGKILL)  # mid-trial: no chance to tell the storage
        a.wait(10)
        for p in others:
            rc = p.wait(120)
            assert rc == 0, f"worker exited with {rc}\n{logs(log_dir)}"
    finally:
        if a.poll() is None:
            a.kill()
    return killed


def check_killed_trial_retried(storage_url: str, killed: int, log_dir: Path, survivors: tuple[str, ...] = ("B",)) -> None:
    """The killed trial is FAIL, exactly one retry with the same parameters completed, nothing is left pending."""
    import optuna
    from optuna.trial import TrialState

    from bilevel.integrations.optuna import make_storage

    study = optuna.load_study(study_name=STUDY, storage=make_storage(storage_url))
    trials = {t.number: t for t in study.get_trials()}
    context = f"\n{[(t.number, t.state.name, t.system_attrs) for t in trials.values()]}\n{logs(log_dir)}"
    assert trials[killed].state == TrialState.FAIL, context
    retries = [t for t in trials.values() if t.system_attrs.get("retry_history")]
    assert len(retries) == 1, context
    retry = retries[0]
    assert retry.system_attrs["retry_history"] == [killed] and retry.system_attrs["failed_trial"] == killed, context
    assert retry.state == TrialState.COMPLETE and retry.params == trials[killed].params, context
    assert retry.user_attrs["worker"] in survivors and "outer" in retry.user_attrs, context
    others = [t for n, t in trials.items() if n != killed]
    assert all(t.state == TrialState.COMPLETE for t in others), context
    assert {t.user_attrs["worker"] for t in others} <= set(survivors), context


if __name__ == "__main__":
    main()
