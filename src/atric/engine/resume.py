"""The one owner of "may this run continue its ``last.pt``?", and of the data a run trains on.

The training loop, the tracked training's preflight (before an MLflow run exists), the
pipeline's resume policy and the tuning worker's retries all ask here, with the same
arguments, so they cannot disagree (a preflight that resolved the padded lengths without
``train.max_seconds`` once refused every preset run's resume).

A run's padded lengths are resolved from params once, when its train split is opened here
(``atric.data.resolve_max_frames``), and recorded in its checkpoint; val and every later stage
reuse them (``open_split(padded_lengths=...)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atric.config import Params
from atric.data import CacheMode, SplitData, open_split
from atric.engine.checkpoint import run_signature, signature_differences
from atric.errors import CheckpointError, DataError
from atric.layout import Layout


def open_run_splits(params: Params, *, cache_in_ram: CacheMode) -> tuple[SplitData, SplitData]:
    """A run's train split, its padded lengths resolved from params, and its val split with them."""
    tp = params.train
    layout = Layout(params.data.dataset, params.data.root)
    common: dict[str, Any] = {"experts": tp.experts, "vectors": params.text.vectors, "cache_in_ram": cache_in_ram}
    train_data = open_split(layout, "train", max_frames=tp.max_frames, max_seconds=tp.max_seconds, **common)
    try:
        val_data = open_split(
            layout, "val", padded_lengths=train_data.max_frames, expert_dims=train_data.expert_dims, **common
        )
        if val_data.text_dim != train_data.text_dim:
            val_data.close()
            raise DataError(
                f"{layout.text_path(params.text.vectors, 'val')}: word vectors have dim "
                f"{val_data.text_dim}, the train split's have {train_data.text_dim}"
            )
    except BaseException:
        train_data.close()
        raise
    return train_data, val_data


def continuation_differences(
    params: Params, checkpoint: dict[str, Any], *, max_frames: dict[str, int], model_config: dict[str, Any]
) -> list[str]:
    """What differs between ``checkpoint``'s run and the run these params and lengths make
    (empty: the same run). Epochs are not part of it: more epochs continue a finished run."""
    current = run_signature(params, max_frames, model_config)
    return signature_differences(checkpoint.get("signature", {}), current)


def check_continuable(
    params: Params,
    checkpoint: dict[str, Any],
    path: Path,
    *,
    max_frames: dict[str, int],
    model_config: dict[str, Any],
) -> None:
    """CheckpointError unless ``checkpoint`` (at ``path``) may be continued by this run."""
    differences = continuation_differences(params, checkpoint, max_frames=max_frames, model_config=model_config)
    if differences:
        raise CheckpointError(
            f"{path} was trained with different settings:\n  "
            + "\n  ".join(differences)
            + "\nrestore those params to continue it, or pass --restart to discard it and start over"
        )
    if int(checkpoint["epoch"]) > params.train.epochs:
        raise CheckpointError(
            f"{path} is at epoch {checkpoint['epoch']}, beyond train.epochs={params.train.epochs}; "
            "raise train.epochs or pass --restart"
        )


def continuable_without_data(params: Params, checkpoint: dict[str, Any]) -> bool:
    """``check_continuable`` where the data is not opened: the lengths and model come from the
    checkpoint. The padded lengths follow from the signature's own keys (``train.max_frames``,
    ``train.max_seconds``, the dataset), so equal keys give equal lengths on the same files."""
    configured = params.train.max_frames
    max_frames = {e: configured.get(e, checkpoint["max_frames"].get(e)) for e in params.train.experts}
    differences = continuation_differences(
        params, checkpoint, max_frames=max_frames, model_config=checkpoint["model_config"]
    )
    return not differences and int(checkpoint["epoch"]) <= params.train.epochs
