"""What the tests may skip: a missing service binary on a developer's machine, never in CI."""

from __future__ import annotations

import os

import pytest


def skip_or_fail(reason: str) -> None:
    """Skip with ``reason`` locally; with CI=true the missing piece is a failure (CI installs it)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"required for CI but missing: {reason}")
    pytest.skip(reason)
