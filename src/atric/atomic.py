"""Write-to-temp-then-rename, so a crash never leaves a half-written output."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success.

    The temp file lives in the same directory so the final ``os.replace`` is atomic.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():
            # mkstemp creates 0600; an output should get the usual umask-based mode.
            os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], value: object) -> None:
    """JSON with sorted keys and a trailing newline: the same value gives the same bytes."""
    write_text_atomic(path, json.dumps(value, indent=1, sort_keys=True) + "\n")
