"""Optuna studies on a real PostgreSQL server: workers in several processes, one killed mid-trial.

The fixture starts a throw-away cluster (``initdb`` + ``pg_ctl`` in a temporary directory, as the ``postgres`` system
user when run as root, on a free localhost port), creates a database and removes everything afterwards. Skipped only
when the PostgreSQL server binaries are not installed (``scripts/setup.sh`` installs Debian's ``postgresql`` as root).

Oracle: the storage read back after the run — the killed worker's trial is FAIL, exactly one retry (system attribute
``retry_history == [killed]``, same parameters) is COMPLETE, and no trial is left RUNNING or WAITING.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from optuna_worker import check_killed_trial_retried, kill_one_worker_scenario, logs, spawn

from bilevel.integrations.optuna import OUTER_ATTR, make_storage

pytestmark = pytest.mark.postgres


def _postgres_bindir() -> Path | None:
    """The newest installed PostgreSQL server's bin directory (Debian layout), or the one on PATH."""
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True):
        if os.access(os.path.join(bindir, "initdb"), os.X_OK) and os.access(os.path.join(bindir, "pg_ctl"), os.X_OK):
            return Path(bindir)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


BINDIR = _postgres_bindir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    if BINDIR is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed; run scripts/setup.sh as root "
                    "or `apt-get install postgresql`.")
    as_root = os.geteuid() == 0
    if as_root and shutil.which("runuser") is None:
        pytest.skip("running as root but `runuser` is missing to start PostgreSQL as the postgres user.")
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    base = Path(tempfile.mkdtemp(prefix="bilevel-pg-"))  # under /tmp, reachable by the postgres user
    data = base / "data"
    if as_root:
        shutil.chown(base, user="postgres", group="postgres")
    port = _free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=120, cwd=str(base))

    try:
        run(str(BINDIR / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale",
            "--no-sync")
        options = (f"-p {port} -c listen_addresses=127.0.0.1 -k {base} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=50")
        run(str(BINDIR / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "server.log"), "-w", "-t", "60",
            "start")
        run(str(BINDIR / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna")
    except subprocess.CalledProcessError as e:
        log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {e.stderr.decode()}\n{log}") from e
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*prefix, str(BINDIR / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60, cwd=str(base))
        shutil.rmtree(base, ignore_errors=True)


def _drop_studies(url: str) -> None:
    storage = make_storage(url)
    for summary in optuna.get_all_study_summaries(storage):
        optuna.delete_study(study_name=summary.study_name, storage=storage)


def test_workers_share_a_postgres_study(postgres_url, tmp_path):
    _drop_studies(postgres_url)
    optuna.create_study(study_name="workers", storage=make_storage(postgres_url))
    workers = [spawn(postgres_url, w, tmp_path, "--n-trials", "3") for w in ("A", "B")]
    for p in workers:
        assert p.wait(120) == 0, logs(tmp_path)
    trials = optuna.load_study(study_name="workers", storage=make_storage(postgres_url)).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials), logs(tmp_path)
    assert sorted(t.user_attrs["worker"] for t in trials) == ["A"] * 3 + ["B"] * 3
    assert all(len(t.user_attrs[OUTER_ATTR]["value"]) == 8 for t in trials)


def test_killed_worker_trial_is_failed_and_retried_postgres(postgres_url, tmp_path):
    """SIGKILL one of three workers mid-trial; heartbeats 1 s, grace 2 s; two survivors race to recover it."""
    _drop_studies(postgres_url)
    survivors = ("B", "C")
    killed = kill_one_worker_scenario(postgres_url, tmp_path, survivors=survivors)
    check_killed_trial_retried(postgres_url, killed, tmp_path, survivors)
