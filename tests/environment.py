"""What the tests may skip: a missing service binary on a developer's machine, never in CI."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from atric.ops.services import Stack


def skip_or_fail(reason: str) -> None:
    """Skip with ``reason`` locally; with CI=true the missing piece is a failure (CI installs it)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"required for CI but missing: {reason}")
    pytest.skip(reason)


def require_stack_binaries(*, make: bool = False) -> None:
    """PostgreSQL server binaries, `weed`, and (as root) `runuser`; `make` when asked."""
    import shutil

    from atric.ops import services

    try:
        services.pg_bindir()
        services._venv_tool("weed")
    except services.StackError as exc:
        skip_or_fail(str(exc))
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        skip_or_fail("running as root without runuser: PostgreSQL cannot be started")
    if make and shutil.which("make") is None:
        skip_or_fail("make not installed")


@contextlib.contextmanager
def throwaway_stack(prefix: str) -> Iterator[Stack]:
    """PostgreSQL + S3 + MLflow server on free ports with fresh credentials; deleted afterwards."""
    import shutil
    import tempfile
    from pathlib import Path

    from atric.ops.services import Settings, Stack

    state = Path(tempfile.mkdtemp(prefix=prefix))
    state.chmod(0o711)  # as root, PostgreSQL runs as user postgres: it must enter this dir
    stack = Stack(Settings.generate(state / "stack"))
    try:
        timings = stack.up()
        print(f"\nstack up in {timings['total']:.1f}s")
        yield stack
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)
