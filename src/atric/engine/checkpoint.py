"""Checkpoint files, the run signature that guards a resume, and the RNG state they carry.

``last.pt`` holds everything needed to continue: model, loss, optimiser, scheduler, AMP
scaler, RNG states, epoch, best score, history and the run signature. A ``last.pt`` from
different params is an error that lists the differing keys. Files are loaded with
``weights_only=True`` (tensors and plain containers only) and written through a temp file
and a rename.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atric.atomic import atomic_path
from atric.config import Params, flatten, signature_keys
from atric.errors import CheckpointError

CHECKPOINT_FORMAT = 1


def run_signature(params: Params, max_frames: dict[str, int], model_config: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides a run's results, flat (``train.lr``, ``model.expert_dims.fa``, ...).

    The train keys are those the schema marks as resume params (``atric.config.signature_keys``).
    """
    train = params.train.model_dump(include=set(signature_keys()))
    train["max_frames"] = {}  # the resolved lengths below are what counts
    signature = {
        "data.dataset": params.data.dataset,
        "text.vectors": params.text.vectors,
        **flatten(train, "train."),
        **flatten({"max_frames": dict(max_frames)}, "data."),
        **flatten(model_config, "model."),
    }
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in signature.items()}


def signature_hash(signature: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]


def signature_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per key whose value differs between two run signatures (empty: same run)."""
    missing = object()
    lines = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, missing), current.get(key, missing)
        if old != new:
            lines.append(
                f"{key}: checkpoint {'(absent)' if old is missing else repr(old)}, "
                f"now {'(absent)' if new is missing else repr(new)}"
            )
    return lines


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (weights_only: tensors and plain containers only)."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found (train the run first)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file raises many different types
        raise CheckpointError(f"{path}: not a readable atric checkpoint: {exc}") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an atric checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return checkpoint


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and ints (loadable with weights_only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_version": int(py_state[0]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    keys = state["numpy_keys"].cpu().numpy().astype(np.uint32)
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, state["numpy_pos"], int(has_gauss), float(gauss)))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), None))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
