"""Fixtures several test modules share: a tiny fake seed layout and one torch thread."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import atric  # noqa: F401  (before torch: OpenMP threads wait passively on the shared cores)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fakes


@pytest.fixture
def one_thread():
    """Tiny tensors: thread hand-offs cost more than the work, and results must not depend
    on how many cores the other tests leave free (subprocess tests use one thread too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module's fake layout (fakes.write_fake_layout) under <root>/data."""
    root = tmp_path_factory.mktemp("fake")
    fakes.write_fake_layout(root / "data")
    return root
