"""One owner per run: an exclusive lock per run name for training, evaluation writes and tune trials.

Where: ``<models_dir>/.locks/<run>.lock`` (the OS lock, ``filelock``) and ``<run>.holder.json``
beside it (pid, host, start time, purpose: who holds it). Not inside ``<models_dir>/<run>/``,
the train stage's DVC output, so a lock never changes a run's hash; ``.dvcignore`` names
``.locks/`` so the index stage, which depends on the whole models folder, does not hash it.

A second process for the same run fails at once (``RunLockedError`` naming the holder). The
lock is an OS file lock (flock): the kernel frees it when its process dies, SIGKILL included,
so a killed run never blocks the next one; the holder record it left behind is recognised as
stale, reported in the log and replaced. Within one process the lock is re-entrant (a tune
trial may hold it around ``train_tracked``, which takes it again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from atric.atomic import output_error, write_json_atomic
from atric.errors import AtricError, ConfigError

LOCKS_DIR = ".locks"  # under models_dir; listed in .dvcignore
log = logging.getLogger("atric.ops.runlock")


class RunLockedError(AtricError):
    """Another process owns this run now."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str  # local time, ISO 8601
    purpose: str  # train | evaluate | tune trial ...

    def describe(self) -> str:
        return f"{self.purpose} pid {self.pid} on {self.host} since {self.started}"


def lock_paths(models_dir: str | os.PathLike[str], run_name: str) -> tuple[Path, Path]:
    """(lock file, holder record) of ``run_name``."""
    folder = Path(models_dir) / LOCKS_DIR
    return folder / f"{run_name}.lock", folder / f"{run_name}.holder.json"


def _read_holder(path: Path) -> Holder | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return Holder(int(doc["pid"]), str(doc["host"]), str(doc["started"]), str(doc["purpose"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# Re-entrancy within this process: lock file -> (FileLock, depth).
_held: dict[Path, tuple[FileLock, int]] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def run_lock(models_dir: str | os.PathLike[str], run_name: str, purpose: str) -> Iterator[Holder]:
    """Hold ``run_name``'s lock for the block; raise ``RunLockedError`` at once if another process has it."""
    if not run_name or "/" in run_name or run_name in (".", ".."):
        raise ConfigError(f"run name {run_name!r}: must be a non-empty file name without '/'")
    lock_path, holder_path = lock_paths(models_dir, run_name)
    key = lock_path.absolute()
    with _held_guard:
        if key in _held:
            lock, depth = _held[key]
            _held[key] = (lock, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield _read_holder(holder_path) or Holder(os.getpid(), socket.gethostname(), "?", purpose)
        finally:
            with _held_guard:
                lock, depth = _held[key]
                _held[key] = (lock, depth - 1)
        return

    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        # fallback_to_soft=False: a filesystem without flock must fail loudly, not pretend.
        lock = FileLock(lock_path, timeout=0, thread_local=False, fallback_to_soft=False)
        lock.acquire()
    except Timeout:
        holder = _read_holder(holder_path)
        who = holder.describe() if holder else "another process (it has not recorded itself yet)"
        raise RunLockedError(
            f"{run_name}: run is in use by {who} (lock {lock_path}); wait for it to finish or stop it"
        ) from None
    except OSError as exc:
        raise output_error(exc, lock_path) from exc
    try:
        stale = _read_holder(holder_path)
        if stale is not None:
            log.warning(
                "%s: taking over the stale lock of %s (that process is gone)", run_name, stale.describe()
            )
        holder = Holder(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%dT%H:%M:%S%z"), purpose)
        write_json_atomic(holder_path, holder.__dict__)
        with _held_guard:
            _held[key] = (lock, 1)
        try:
            yield holder
        finally:
            with _held_guard:
                del _held[key]
            holder_path.unlink(missing_ok=True)
    finally:
        lock.release()
