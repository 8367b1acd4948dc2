"""Evaluation: retrieval metrics of a model on a val/test split, and of a saved checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from atric.atomic import check_writable, write_json_atomic
from atric.config import Params
from atric.data import SplitData, open_split
from atric.device import resolve_device
from atric.embed import split_similarity
from atric.engine.checkpoint import load_checkpoint
from atric.engine.runs import RunPaths, evaluation_metrics_path, run_identity, run_name_for
from atric.errors import AtricError, CheckpointError, ConfigError, DataError
from atric.factory import model_from_checkpoint
from atric.layout import EVAL_CAPTIONS_PER_CLIP, Layout
from atric.metrics import retrieval_metrics
from atric.model import RetrievalModel
from atric.order import order_metrics
from atric.precision import FP32, Precision


def evaluate_split(
    model: RetrievalModel,
    data: SplitData,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    precision: Precision = FP32,
    where: str = "",
    layout: Layout | None = None,
) -> dict[str, float]:
    """Retrieval metrics of ``model`` on a val/test split (5 captions per clip); with ``layout``,
    also the mirror-pair order metrics where the split has such pairs (``atric.order``)."""
    sim = split_similarity(
        model, data, device=device, batch_size=batch_size, num_workers=num_workers, precision=precision
    )
    if not np.isfinite(sim).all():
        raise AtricError(
            f"{where or data.split}: the {data.split} similarities hold NaN/inf: the model diverged "
            "(lower train.lr)"
        )
    metrics = retrieval_metrics(sim, captions_per_clip=EVAL_CAPTIONS_PER_CLIP)
    if layout is None:
        return metrics
    clip_ids = [c.clip_id for c in data.clips]
    order = order_metrics(sim, layout, data.split, clip_ids=clip_ids)
    if order:
        # The control: the same clips played backwards. Mirror clips also differ in cues other
        # than order (modifiers, loudness), so chance is not the baseline; the reversed score is.
        reversed_sim = split_similarity(
            model, data, device=device, batch_size=batch_size, num_workers=num_workers, precision=precision,
            time_reversed=True,
        )
        control = order_metrics(reversed_sim, layout, data.split, clip_ids=clip_ids)
        for key in ("order_accuracy", "order_accuracy_sequential"):
            if key in order:
                order[f"{key}_reversed"] = control[key]
                order[f"{key.replace('accuracy', 'gain')}"] = order[key] - control[key]
    metrics.update(order)
    return metrics


def check_experts_known(layout: Layout, experts: list[str] | tuple[str, ...], split: str = "train") -> None:
    """ConfigError for an expert that is neither registered (``atric.features``) nor has a
    feature file in the layout (seed-layout experts such as VGGSound come as files only)."""
    from atric.features import EXPERTS

    for expert in experts:
        path = layout.features_path(expert, split)
        if expert not in EXPERTS and not path.exists():
            raise ConfigError(
                f"unknown expert {expert!r}: not a registered audio expert ({', '.join(EXPERTS)}) "
                f"and no feature file {path}"
            )


def check_identity(checkpoint: dict[str, Any], path: Path, run_name: str, dataset: str) -> None:
    """CheckpointError unless ``checkpoint`` is run ``run_name``'s, trained on ``dataset``: a
    best.pt copied from another run must not be evaluated (and reported) under this run's name."""
    saved_run = checkpoint.get("run_name")
    if saved_run is not None and saved_run != run_name:
        raise CheckpointError(
            f"{path}: holds run {saved_run!r}, not {run_name!r} (copied from another run?); "
            f"evaluate it as --run {saved_run}, or retrain {run_name}"
        )
    saved_dataset = checkpoint.get("signature", {}).get("data.dataset")
    if saved_dataset is not None and saved_dataset != dataset:
        raise CheckpointError(f"{path}: run {run_name!r} was trained on {saved_dataset!r}, params say {dataset!r}")


def evaluate_checkpoint(
    params: Params, run_name: str, split: str = "test", which: str = "best"
) -> dict[str, float]:
    """Metrics of a run's ``best``/``last`` checkpoint on ``split``; writes <metrics_dir>/<split>/<run>.json.

    The model, its experts and their padded lengths come from the checkpoint; the data
    (dataset, root, text vectors) from ``params``.
    """
    if which not in ("best", "last"):
        raise ConfigError(f"evaluate.checkpoint: {which!r} is not one of best, last")
    tp = params.train
    paths = RunPaths.of(tp, run_name)
    layout = Layout(params.data.dataset, params.data.root)
    output = evaluation_metrics_path(tp, run_name, split)
    check_writable(output.parent)  # before minutes of work, not after
    device = resolve_device(tp.device)
    path = paths.best if which == "best" else paths.last
    if not path.exists() and run_name == run_name_for(tp):
        # `--expert mfcc` asks for run mfcc-<pooling>: say the expert is unknown, not "not trained".
        check_experts_known(layout, tp.experts, split)
    checkpoint = load_checkpoint(path)
    check_identity(checkpoint, path, run_name, params.data.dataset)
    check_experts_known(layout, list(checkpoint["max_frames"]), split)
    trained_vectors = checkpoint["signature"].get("text.vectors")
    if trained_vectors != params.text.vectors:
        raise CheckpointError(
            f"{run_name}: trained with text.vectors={trained_vectors!r}, params say {params.text.vectors!r}"
        )
    model = model_from_checkpoint(checkpoint).to(device)
    config = model.config()
    data = open_split(
        layout,
        split,
        experts=list(model.experts),
        vectors=params.text.vectors,
        padded_lengths=dict(checkpoint["max_frames"]),
        cache_in_ram=tp.cache_in_ram,
        expert_dims=config["expert_dims"],
    )
    try:
        if data.text_dim != config["text_dim"]:
            raise DataError(
                f"{split}: word vectors have dim {data.text_dim}, the model {run_name} expects {config['text_dim']}"
            )
        metrics = evaluate_split(
            model,
            data,
            device=device,
            batch_size=tp.batch_size,
            num_workers=tp.num_workers,
            precision=Precision.create(tp.precision, device),
            where=run_name,
            layout=layout,
        )
    finally:
        data.close()
    out = {"epoch": int(checkpoint["epoch"]), **metrics}
    write_json_atomic(output, {**out, **run_identity(layout)})
    return out
