"""Write-to-temp-then-rename, so a crash never leaves a half-written output.

Temp files are named ``.<name>.<random>.tmp`` beside their target (``TEMP_GLOB``; ``.gitignore``
and ``.dvcignore`` cover it). A failed write removes its temp file; one left by a killed
process is removed by ``remove_stale_temps`` when the stage that owns the folder starts again.
A full disk or a read-only output folder becomes one ``OutputError`` line naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from atric.errors import AtricError

TEMP_SUFFIX = ".tmp"
TEMP_GLOB = f".*.*{TEMP_SUFFIX}"
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class OutputError(AtricError):
    """An output cannot be written: disk full, read-only or permission denied."""


def _errno_of(exc: BaseException) -> int | None:
    """The errno, also when a library (h5py, torch) only puts it in the message."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return code
    text = str(exc)
    if "No space left on device" in text or "errno = 28" in text:
        return errno.ENOSPC
    if "Read-only file system" in text or "errno = 30" in text:
        return errno.EROFS
    if "Permission denied" in text or "errno = 13" in text:
        return errno.EACCES
    return None


def output_error(exc: BaseException, path: str | os.PathLike[str]) -> BaseException:
    """``exc`` as an ``OutputError`` line when it means "cannot write ``path``", else ``exc`` itself."""
    code = _errno_of(exc)
    target = Path(path)
    if code in _NO_SPACE:
        return OutputError(f"no space left on {_mount_point(target)} (writing {target}); free some space and rerun")
    if code in _NOT_WRITABLE:
        why = "read-only file system" if code == errno.EROFS else "permission denied"
        return OutputError(f"cannot write {target}: {why}; make the folder writable or choose another one")
    return exc


def _mount_point(path: Path) -> Path:
    """The file system a path lives on (what "no space left on" should name)."""
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    while current != current.parent and not os.path.ismount(current):
        current = current.parent
    return current


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success.

    The temp file lives in the same directory so the final ``os.replace`` is atomic. It is
    removed on any failure; disk-full and read-only errors become ``OutputError``.
    """
    final = Path(path)
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TEMP_SUFFIX, dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        if tmp.is_file():
            # mkstemp creates 0600; an output should get the usual umask-based mode.
            os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:  # torch and h5py wrap write errors in RuntimeError/OSError
        mapped = output_error(exc, final)
        if mapped is exc:
            raise
        raise mapped from exc
    finally:
        if tmp is not None and tmp.exists():
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    """Bytes through a plain file write, so a full disk is an OSError with its errno."""
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], value: object) -> None:
    """JSON with sorted keys and a trailing newline: the same value gives the same bytes."""
    write_text_atomic(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Create ``folder`` and prove a file can be written there, before any work starts."""
    target = Path(folder)
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-check.", suffix=TEMP_SUFFIX, dir=target)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise output_error(exc, target) from exc


def remove_stale_temps(
    folder: str | os.PathLike[str], names: Iterable[str] | None = None, min_age_seconds: float = 0.0
) -> list[Path]:
    """Remove temp files (and temp folders) an interrupted write left in ``folder``.

    ``names``: only the temps of these outputs (``.<name>.*.tmp``), for a folder that
    several runs share; ``min_age_seconds``: spare temps young enough to belong to a
    writer that is still running (folders not protected by a run lock).
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    patterns = [f".{name}.*{TEMP_SUFFIX}" for name in names] if names is not None else [TEMP_GLOB]
    now, removed = time.time(), []
    for pattern in patterns:
        for path in root.glob(pattern):
            try:
                if now - path.lstat().st_mtime < min_age_seconds:
                    continue
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            except OSError:
                continue  # another cleaner got it, or we may not delete it: not our failure
            removed.append(path)
    return removed
