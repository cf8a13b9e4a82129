r"""Storage: :func:`make_storage` builds an Optuna storage (in memory, SQLite or PostgreSQL) with heartbeats and the
retry of trials whose worker died, so several workers can share one study."""

from __future__ import annotations

import warnings
from typing import Any

import optuna

from bilevel.errors import BilevelError


def make_storage(
    url: str | None = None,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int | None = 3,
    engine_kwargs: dict[str, Any] | None = None,
) -> optuna.storages.BaseStorage:
    r"""An Optuna storage: in memory (``url=None``), SQLite (``"sqlite:///study.db"``) or PostgreSQL
    (``"postgresql://user:password@host:5432/db"``, needs ``pip install 'bilevel[postgres]'``) — any SQLAlchemy URL
    that Optuna's :class:`optuna.storages.RDBStorage` accepts. A plain ``postgresql://`` URL uses whichever driver is
    installed (psycopg2, else psycopg 3); name one explicitly with ``postgresql+psycopg2://``.

    Heartbeats (RDB storages only): a worker records a heartbeat for its running trial every ``heartbeat_interval``
    seconds; a trial whose last heartbeat is older than ``grace_period`` (default 2 × interval) is marked ``FAIL``
    by the next worker that starts a trial, and Optuna's retry callback re-queues it with the same parameters (up to
    ``max_retry`` times per original trial; ``None`` retries forever, ``0`` never). The retried trial's system
    attribute ``retry_history`` lists the trial numbers it replaces.

    SQLite: waits up to 60 s on a locked database file (several processes on one machine). PostgreSQL: connections
    are checked before use (``pool_pre_ping``), so a restarted server does not break long-running workers.
    """
    if heartbeat_interval is not None and (not isinstance(heartbeat_interval, int) or heartbeat_interval < 1):
        raise BilevelError(f"make_storage: heartbeat_interval must be an integer number of seconds >= 1 but got "
                           f"{heartbeat_interval!r}.")
    if grace_period is not None:
        if heartbeat_interval is None:
            raise BilevelError("make_storage: grace_period needs heartbeat_interval; pass both (e.g. 60 and 180).")
        if not isinstance(grace_period, int) or grace_period <= heartbeat_interval:
            raise BilevelError(
                f"make_storage: grace_period must be an integer greater than heartbeat_interval={heartbeat_interval} "
                f"(or live trials would be failed) but got {grace_period!r}."
            )
    if max_retry is not None and max_retry < 0:
        raise BilevelError(f"make_storage: max_retry must be >= 0 or None but got {max_retry}.")
    if url is None:
        if heartbeat_interval is not None:
            raise BilevelError(
                "make_storage: heartbeats need a database shared by the workers; pass url='sqlite:///study.db' "
                "or a PostgreSQL URL, or drop heartbeat_interval."
            )
        return optuna.storages.InMemoryStorage()
    if not isinstance(url, str) or "://" not in url:
        raise BilevelError(
            f"make_storage: url must be an SQLAlchemy URL such as 'sqlite:///study.db' or "
            f"'postgresql://user:password@host:5432/db', got {url!r}."
        )
    dialect = url.split("://", 1)[0].lower()
    if dialect in ("postgresql", "postgres"):
        url = f"postgresql+{_postgres_driver()}://" + url.split("://", 1)[1]
    kwargs = dict(engine_kwargs or {})
    if dialect.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"timeout": 60})
    elif dialect.startswith("postgres"):
        kwargs.setdefault("pool_pre_ping", True)
    storage_kwargs: dict[str, Any] = {"engine_kwargs": kwargs}
    if heartbeat_interval is not None:
        storage_kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        if max_retry != 0:
            storage_kwargs.update(_retry_callback(max_retry))
    with warnings.catch_warnings():  # heartbeats and the retry callback are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, **storage_kwargs)


def _postgres_driver() -> str:
    """The installed PostgreSQL driver (SQLAlchemy's default for ``postgresql://`` changed from psycopg2 to psycopg
    3 in SQLAlchemy 2.1, so plain URLs name the driver explicitly)."""
    import importlib.util

    for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        if importlib.util.find_spec(module) is not None:
            return driver
    raise BilevelError("make_storage: PostgreSQL storage needs a driver: pip install 'bilevel[postgres]' (psycopg2).")


def _retry_callback(max_retry: int | None) -> dict[str, Any]:
    """Optuna's retry-on-stale callback under the name and keyword of the installed version (renamed in 4.9)."""
    import inspect

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
            callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        else:  # pragma: no cover - Optuna < 4.9
            callback = optuna.storages.RetryFailedTrialCallback(max_retry=max_retry)
    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    key = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
    return {key: callback}
