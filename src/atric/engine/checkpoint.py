"""Checkpoint files, the run signature that guards a resume, and the RNG state they carry.

``last.pt`` holds everything needed to continue: model, loss, optimiser, scheduler, AMP
scaler, RNG states, epoch, best score, history and the run signature. A ``last.pt`` from
different params is an error that lists the differing keys. Files are loaded with
``weights_only=True`` (tensors and plain containers only) and written through a temp file
and a rename.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import zipfile
import reprlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atric.atomic import write_bytes_atomic
from atric.config import Params, flatten, signature_keys
from atric.errors import CheckpointError

CHECKPOINT_FORMAT = 1
# Parts of a checkpoint that are plain data (not tensors of weights), checked with bounds on load.
_PLAIN_PARTS = ("signature", "model_config", "max_frames", "metrics", "run_name", "params_hash")
_HISTORY_NODES = 2_000_000
MAX_EXPANSION = 2  # declared zip entry bytes per file byte (torch.save stores entries uncompressed)  # one row of ~30 metrics per epoch: far beyond any real run

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple = 3, 8, 8, 8
_repr.maxstring = _repr.maxother = 80
reprlib_repr = _repr.repr


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


# Bounds on what a checkpoint's plain-data parts may hold: a crafted file with a deeply nested
# list of shared references would otherwise cost seconds, GBs and a 100 MB message to compare.
MAX_DEPTH = 6
MAX_NODES = 200_000
MAX_STRING = 10_000
MAX_DIFFERENCE_LINES = 40
_REPR_CHARS = 200


def check_bounded(value: Any, where: str, *, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> None:
    """Raise CheckpointError unless ``value`` is plain data (str, numbers, bool, None, tensors,
    lists/tuples/dicts of them) within ``max_depth`` levels and ``max_nodes`` visited nodes.

    Shared references are visited once per reference, so the walk is bounded by ``max_nodes``
    however the file was built.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise CheckpointError(f"{where}: holds more than {max_nodes} values (not written by atric)")
        if depth > max_depth:
            raise CheckpointError(f"{where}: nested deeper than {max_depth} levels (not written by atric)")
        if isinstance(item, str):
            if len(item) > MAX_STRING:
                raise CheckpointError(f"{where}: holds a string of {len(item)} characters (not written by atric)")
        elif isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item.keys())
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
        elif not (item is None or isinstance(item, (bool, int, float, torch.Tensor))):
            raise CheckpointError(f"{where}: holds a {type(item).__name__} (not written by atric)")


def _short(value: Any) -> str:
    """A repr of bounded length (values are bounded by check_bounded; this bounds the message)."""
    text = reprlib_repr(value)
    return text if len(text) <= _REPR_CHARS else text[: _REPR_CHARS - 3] + "..."


def signature_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per key whose value differs between two run signatures (empty: same run).

    Bounded: a saved signature that is not bounded plain data is one line, and at most
    ``MAX_DIFFERENCE_LINES`` lines of at most a few hundred characters come back.
    """
    if not isinstance(saved, dict):
        return [f"signature: checkpoint holds a {type(saved).__name__}, not a mapping"]
    try:
        check_bounded(saved, "signature")
    except CheckpointError as exc:
        return [str(exc)]
    missing = object()
    lines = []
    keys = sorted(set(saved) | set(current), key=str)
    for key in keys:
        old, new = saved.get(key, missing), current.get(key, missing)
        if old != new:
            lines.append(
                f"{_short(key) if not isinstance(key, str) else key[:_REPR_CHARS]}: checkpoint "
                f"{'(absent)' if old is missing else _short(old)}, now {'(absent)' if new is missing else _short(new)}"
            )
    if len(lines) > MAX_DIFFERENCE_LINES:
        lines = [*lines[:MAX_DIFFERENCE_LINES], f"... and {len(lines) - MAX_DIFFERENCE_LINES} more keys"]
    return lines


def check_declared_size(path: Path) -> None:
    """CheckpointError when a checkpoint's zip entries declare more bytes than the file can
    plausibly hold: torch.save stores tensors uncompressed, so a deflated entry that expands far
    beyond the file (a 3.2 MB file holding a 1.5 GB tensor) is refused before it is inflated."""
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format reads every storage from the file's own bytes
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable atric checkpoint: {exc}") from exc
    if declared > MAX_EXPANSION * size + (1 << 20):
        raise CheckpointError(
            f"{path}: its entries declare {declared} bytes in a {size}-byte file (compressed tensors; "
            "torch.save writes them uncompressed): not written by atric, refused before inflating"
        )


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (weights_only: tensors and plain containers only)."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found (train the run first)")
    check_declared_size(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file raises many different types
        raise CheckpointError(f"{path}: not a readable atric checkpoint: {exc}") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an atric checkpoint (format {CHECKPOINT_FORMAT} expected)")
    for part in _PLAIN_PARTS:
        if part in checkpoint:
            check_bounded(checkpoint[part], f"{path}: {part}")
    if not isinstance(checkpoint.get("signature", {}), dict):
        raise CheckpointError(f"{path}: signature is not a mapping (not written by atric)")
    if "history" in checkpoint:
        check_bounded(checkpoint["history"], f"{path}: history", max_nodes=_HISTORY_NODES, max_depth=3)
    return checkpoint


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Serialise in memory, then one plain write: a full disk is "no space left on ...", not
    a torch RuntimeError, and the temp file is removed (atric.atomic)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getbuffer())


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
