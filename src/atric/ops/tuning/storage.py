"""Optuna storages that survive database outages, storage URLs, and the storage-wide lock that keeps fleet totals exact."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna

from atric.config import (
    Params,
    TuneParams,
)
from atric.engine import run_name_for
from atric.ops.tuning.common import StaleTrialCallback, TuneError
from atric.redact import redact, register_url

log = logging.getLogger("atric.ops.tuning")


# --------------------------------------------------------------------------- storage


def study_name_for(params: Params) -> str:
    """``tune.study_name``, else ``<dataset>-<expert>-<pooling>``."""
    return params.tune.study_name or f"{params.data.dataset}-{run_name_for(params.train)}"


def storage_url(params: Params) -> str:
    """``tune.storage`` (src/tune.py fills it from ``--storage``, else ``ATRIC_OPTUNA_STORAGE``);
    its password is masked in every message from here on, in every form a driver may print."""
    register_url(params.tune.storage)
    return _normalise_url(params.tune.storage)


def study_dir(params: Params) -> Path:
    return Path(params.tune.dir) / study_name_for(params)


def _normalise_url(url: str) -> str:
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the project ships psycopg2.
    if url.startswith("postgresql://"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///") or url in ("sqlite://", "sqlite:///:memory:"):
        return None
    return Path(url.removeprefix("sqlite:///"))


# Words of the driver errors that mean "the database is unreachable now", not "bad request".
_OUTAGE_WORDS = ("connect", "closed", "terminat", "shutting down", "starting up", "recovery mode",
                 "database is locked", "timeout", "timed out", "reset by peer", "broken pipe", "ssl")  # fmt: skip


def is_outage(exc: BaseException) -> bool:
    import sqlalchemy.exc as sa

    seen: BaseException | None = exc
    while seen is not None:  # Optuna wraps driver errors in StorageInternalError
        if isinstance(seen, sa.DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, (sa.OperationalError, sa.InterfaceError)):
            return any(word in str(seen).lower() for word in _OUTAGE_WORDS)
        seen = seen.__cause__
    return False


def retrying(call: Callable[[], Any], *, what: str, seconds: float) -> Any:
    """``call()``, retried with backoff while the database is out, for up to ``seconds``."""
    deadline, pause, warned = time.monotonic() + seconds, 0.25, False
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_outage(exc):
                raise
            reason = str(getattr(exc, "orig", None) or exc.__cause__ or exc).strip().splitlines()[0]
            if time.monotonic() + pause > deadline:
                raise TuneError(
                    f"{what}: unreachable for {seconds:.0f} s ({reason}); check the database, "
                    "or raise tune.storage_retry_seconds"
                ) from exc
            if not warned:
                log.warning("%s: unreachable (%s); retrying for up to %.0f s", what, reason, seconds)
                warned = True
            time.sleep(pause)
            pause = min(pause * 2, 4.0)


_IN_CALL = threading.local()


class ResilientStorage(optuna.storages.RDBStorage):
    """An ``RDBStorage`` whose every call (Optuna's own included: ask, report, tell, heartbeats)
    is one transaction retried through a database outage (see :func:`retrying`). Only the
    outermost call of a thread retries, so nested calls do not multiply the bound."""

    def __init__(self, url: str, *, retry_seconds: float, **kwargs: Any) -> None:
        self.retry_what, self.retry_seconds = f"storage {redact(url)}", retry_seconds
        super().__init__(url, **kwargs)

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name.startswith("__") or not callable(value) or not hasattr(value, "__self__"):
            return value
        if getattr(_IN_CALL, "active", False):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            _IN_CALL.active = True
            try:
                return retrying(
                    lambda: value(*args, **kwargs), what=self.retry_what, seconds=self.retry_seconds
                )
            finally:
                _IN_CALL.active = False

        return call


def open_storage(url: str, tune: TuneParams, *, create_tables: bool = True) -> ResilientStorage:
    """The study's storage: heartbeats, retry of stale trials, outages survived.

    ``create_tables=False`` skips schema creation (only the locked creator runs that racy path).
    """
    url = _normalise_url(url)
    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}  # several writers, one file
    elif url.startswith("sqlite"):
        engine_kwargs = {}
    else:
        # Connections idle through a long trial may have been dropped by the server or a proxy.
        engine_kwargs = {"pool_pre_ping": True, "pool_recycle": 1800}
    interval = tune.heartbeat_interval
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(tune.max_retry, inherit_intermediate_values=True)
    try:
        return ResilientStorage(
            url,
            retry_seconds=tune.storage_retry_seconds,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=interval,
            grace_period=(tune.grace_period or 2 * interval) if interval else None,
            heartbeat_stale_trial_callback=StaleTrialCallback(retry) if interval else None,
            skip_table_creation=not create_tables,
        )
    except ImportError as exc:
        raise TuneError(f"storage {redact(url)}: driver missing: {exc}") from exc
    except TuneError:
        raise
    except Exception as exc:  # SQLAlchemy errors etc.: one clear line
        raise TuneError(f"storage {redact(url)}: cannot open: {str(exc).splitlines()[0]}") from exc


@contextlib.contextmanager
def storage_lock(url: str, name: str, retry_seconds: float = 0.0) -> Iterator[None]:
    """One lock for every worker of a storage: a file lock beside a SQLite file, a PostgreSQL
    advisory lock (the server releases it if the holder dies), none otherwise."""
    url = _normalise_url(url)
    path = _sqlite_path(url)
    if path is not None:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            yield
        return
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy

    key = zlib.crc32(f"atric.tune:{name}".encode())

    def connect() -> Any:
        conn = _lock_engine(url).connect()
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        return conn

    try:
        conn = retrying(connect, what=f"storage {redact(url)}", seconds=retry_seconds)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise TuneError(f"storage {redact(url)}: cannot connect: {reason}") from exc
    try:
        yield
    finally:
        with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):  # a restart already released it
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
        conn.close()


_LOCK_ENGINES: dict[str, Any] = {}


def _lock_engine(url: str) -> Any:
    import sqlalchemy

    if url not in _LOCK_ENGINES:
        _LOCK_ENGINES[url] = sqlalchemy.create_engine(url, pool_pre_ping=True, pool_size=1)
    return _LOCK_ENGINES[url]


