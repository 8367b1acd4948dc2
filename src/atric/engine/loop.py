"""The training loop: epochs over the train split, validation on val, best/last checkpoints.

A run started again with the same params continues from ``last.pt`` and ends with exactly
the metrics an uninterrupted run gets (on the same device): the shuffling order depends only
on (seed, epoch), and every other source of state is in the checkpoint. ``restart=True``
discards a previous ``last.pt``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader
from tqdm import tqdm

from atric.atomic import write_json_atomic
from atric.config import Params
from atric.data import BackgroundLoader, Batch, EpochSampler, SplitData, TrainBatches, batch_as_is
from atric.device import configure_threads, resolve_device
from atric.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    rng_state,
    run_signature,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    signature_hash,
)
from atric.engine.evaluation import evaluate_split
from atric.engine.resume import check_continuable, open_run_splits
from atric.engine.runs import SELECTION_METRIC, RunPaths, run_identity, run_name_for
from atric.errors import AtricError, CheckpointError, ConfigError, DataError
from atric.factory import (
    build_loss,
    build_model,
    build_optimizer,
    build_scheduler,
    check_model_size,
    scheduler_steps_per_batch,
)
from atric.layout import Layout
from atric.losses import merge_caption_similarities
from atric.model import RetrievalModel
from atric.precision import Precision

log = logging.getLogger("atric.train")


class Callback(Protocol):
    """Every method is optional; an exception raised in them stops training and propagates
    (e.g. ``optuna.TrialPruned``); the checkpoints of finished epochs are already saved."""

    def on_train_begin(self) -> None: ...  # data loaded, model built: the first epoch starts next

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, result: TrainResult) -> None: ...


@dataclass
class TrainResult:
    run_name: str
    best_epoch: int
    best_score: float  # val t2a_geometric_mean of the best epoch
    best_metrics: dict[str, float]  # val metrics of the best epoch (t2a_R1, ..., no prefix)
    history: list[dict[str, float]]  # one row per epoch, as in history/<run>.json
    paths: RunPaths
    resumed_from: int  # epoch of the checkpoint continued from; 0 for a fresh run
    epochs_run: int  # epochs trained by this call
    epoch_seconds: list[float] = field(default_factory=list)  # wall time of each epoch of this call
    data_wait_fraction: list[float] = field(default_factory=list)  # share of step time spent waiting for data
    clips_per_second: list[float] = field(default_factory=list)  # distinct clips per second of training
    max_frames: dict[str, int] = field(default_factory=dict)  # the effective padded length per expert
    truncation: dict[str, dict[str, float]] = field(default_factory=dict)  # per expert: clips_cut, frames_dropped


def train_loader(
    data: SplitData,
    *,
    batch_size: int,
    seed: int,
    num_workers: int,
    device: torch.device,
    sampling: str = "pairs",
) -> tuple[BackgroundLoader, EpochSampler]:
    """The train split shuffled by (seed, epoch): (clip, caption) pairs, or clips with all their
    captions (``sampling="clip"``). Incomplete last batches are dropped so every step sees the same
    batch size (and BatchNorm never sees a single row). Each batch is built whole from the items
    the sampler draws (``TrainBatches``): gathered from the cache of a split cached in RAM, read
    into it from the files of a streamed one; by a background thread without workers
    (``BackgroundLoader``)."""
    dataset = TrainBatches(data, sampling)
    sampler = EpochSampler(len(dataset), seed)
    loader = BackgroundLoader(
        dataset,
        batch_size=None,  # the sampler draws whole batches
        sampler=BatchSampler(sampler, min(batch_size, len(dataset)), drop_last=True),
        collate_fn=batch_as_is,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        # Each worker opens its own HDF5 handles; a small prefetch keeps memory bounded.
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        # Worker seeds come from this generator, not from the global RNG (kept reproducible).
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def train_epoch(
    *,
    model: RetrievalModel,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    precision: Precision,
    epoch: int,
    epochs: int,
    run_name: str,
    last_path: Path,
    max_steps: int | None = None,
    merge_captions: bool = False,
    batch_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> tuple[float, float, float, int]:
    """One pass over the training pairs (or its first ``max_steps`` batches: the benchmark's
    measurement); returns (mean loss, seconds, data-wait seconds, clips)."""
    model.train()
    loss_fn.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    steps = clips = 0
    wait = 0.0
    start = time.perf_counter()
    iterator = iter(loader)
    n_steps = len(loader) if max_steps is None else min(max_steps, len(loader))
    progress = tqdm(total=n_steps, desc=f"{run_name} epoch {epoch}/{epochs}", leave=False, disable=None)
    try:
        for step in range(1, n_steps + 1):
            fetch = time.perf_counter()
            try:
                batch: Batch = next(iterator)
            except StopIteration:
                break
            wait += time.perf_counter() - fetch
            n_clips = int(batch.clip_index.shape[0])
            if n_clips < 2:
                # BatchNorm cannot train on one row and a ranking needs a negative:
                # only possible when every caption drawn belongs to one clip.
                log.warning("epoch %d step %d: batch holds a single clip; skipped", epoch, step)
                continue
            batch = batch.to(device)
            with precision.autocast():
                sim = model(batch.audio, batch.words, batch.word_mask)
            if merge_captions:  # clip sampling: one row per clip, its captions' mean similarity
                sim = merge_caption_similarities(sim.float(), batch.caption_clip)
                loss = loss_fn(sim, torch.arange(n_clips, device=sim.device))
            else:
                loss = loss_fn(sim.float(), batch.caption_clip)
            loss_value = loss.item()  # the step's one host sync (a GPU waits here): the NaN check and the bar
            if not math.isfinite(loss_value):
                kept = (
                    f"the last good checkpoint {last_path} is kept"
                    if last_path.exists()
                    else "no checkpoint was written yet"
                )
                raise AtricError(
                    f"{run_name}: loss is {loss_value} at epoch {epoch}, step {step}: training stopped; "
                    f"{kept} (lower train.lr or check the features)"
                )
            optimizer.zero_grad(set_to_none=True)
            if precision.scaler is not None:
                precision.scaler.scale(loss).backward()
                precision.scaler.step(optimizer)
                precision.scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if batch_scheduler is not None:
                batch_scheduler.step()
            total += loss.detach()
            steps += 1
            clips += n_clips
            progress.update(1)
            if not progress.disable:
                progress.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
    finally:
        progress.close()
        del iterator
    seconds = time.perf_counter() - start
    if steps == 0:
        raise DataError(f"{run_name}: epoch {epoch} had no usable training batch (too few clips?)")
    return float(total.item() / steps), seconds, wait, clips


def train(
    params: Params,
    *,
    run_name: str | None = None,
    resume: bool = False,
    restart: bool = False,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train ``params.train`` on the train split, selecting the best epoch on val.

    ``resume`` requires ``last.pt``; without it an existing matching ``last.pt`` is still
    continued (a killed run re-started with the same command goes on). ``restart`` deletes
    the run's checkpoints first. Raises CheckpointError when ``last.pt`` comes from other
    params, AtricError on a NaN/inf loss, DataError/ConfigError on bad data or params.
    """
    tp = params.train
    run_name = run_name or run_name_for(tp)
    if resume and restart:
        raise ConfigError("--resume and --restart exclude each other")
    paths = RunPaths.of(tp, run_name)
    device = resolve_device(tp.device)
    loss_fn = build_loss(tp)

    if restart:
        for path in (paths.last, paths.best):
            path.unlink(missing_ok=True)
    checkpoint = load_checkpoint(paths.last) if paths.last.exists() else None
    if resume and checkpoint is None:
        raise CheckpointError(
            f"{paths.last}: nothing to resume (no checkpoint); drop --resume to start fresh"
        )

    threads = configure_threads(tp.threads)
    log.info("%s: %d CPU threads (train.threads=%s)", run_name, threads, tp.threads)
    seed_everything(tp.seed)
    with ExitStack() as stack:  # HDF5 handles are closed whatever happens
        train_data, val_data = open_run_splits(params, cache_in_ram=tp.cache_in_ram)
        stack.callback(train_data.close)
        stack.callback(val_data.close)
        for data in (train_data, val_data):
            _report_lengths(run_name, data)
        result = _fit(
            params,
            run_name=run_name,
            paths=paths,
            checkpoint=checkpoint,
            train_data=train_data,
            val_data=val_data,
            device=device,
            loss_fn=loss_fn,
            callbacks=callbacks,
        )
    _notify(callbacks, "on_train_end", result)
    return result


def _report_lengths(run_name: str, data: SplitData) -> None:
    """Say once per run and split what the padded lengths cut and how much of them is padding
    (silent truncation hides bugs; a length far beyond the clips costs time)."""
    for expert, cut in data.truncation.items():
        log.log(
            logging.WARNING if cut.clips_cut > 0 else logging.INFO,
            "%s: %s padded to %d frames: %s of the %s split (train.max_seconds / train.max_frames)",
            run_name, expert, data.max_frames[expert], cut.describe(), data.split,
        )  # fmt: skip


def _notify(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    """Call ``hook`` on every callback that has it (both Callback methods are optional)."""
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(*args)


def _fit(
    params: Params,
    *,
    run_name: str,
    paths: RunPaths,
    checkpoint: dict[str, Any] | None,
    train_data: SplitData,
    val_data: SplitData,
    device: torch.device,
    loss_fn: nn.Module,
    callbacks: Sequence[Any],
) -> TrainResult:
    """The epochs of ``train``: build or restore the state, then train, validate, checkpoint."""
    tp = params.train
    check_model_size(tp, train_data.expert_dims, train_data.text_dim)
    model = build_model(tp, train_data.expert_dims, train_data.text_dim).to(device)
    loss_fn.to(device)
    optimizer = build_optimizer(tp, model, loss_fn)
    scheduler = build_scheduler(tp, optimizer)
    per_batch = scheduler_steps_per_batch(tp)
    precision = Precision.create(tp.precision, device)
    signature = run_signature(params, train_data.max_frames, model.config())

    start_epoch, best_score, best_epoch = 0, -math.inf, 0
    history: list[dict[str, float]] = []
    if checkpoint is not None:
        check_continuable(params, checkpoint, paths.last, max_frames=train_data.max_frames, model_config=model.config())
        model.load_state_dict(checkpoint["model"])
        loss_fn.load_state_dict(checkpoint["loss"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if precision.scaler is not None and checkpoint.get("scaler"):
            precision.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        start_epoch = int(checkpoint["epoch"])
        best_score, best_epoch = float(checkpoint["best_score"]), int(checkpoint["best_epoch"])
        history = [dict(row) for row in checkpoint["history"]]
        log.info("%s: resuming after epoch %d from %s", run_name, start_epoch, paths.last)

    loader, sampler = train_loader(
        train_data,
        batch_size=tp.batch_size,
        seed=tp.seed,
        num_workers=tp.num_workers,
        device=device,
        sampling=tp.sampling,
    )
    base = {
        "format": CHECKPOINT_FORMAT,
        "run_name": run_name,
        "model_config": model.config(),
        "max_frames": dict(train_data.max_frames),
        "truncation": {k: asdict(v) for k, v in train_data.truncation.items()},
        "signature": signature,
        "params_hash": signature_hash(signature),
    }

    result = TrainResult(
        run_name=run_name,
        best_epoch=best_epoch,
        best_score=best_score,
        best_metrics={},
        history=history,
        paths=paths,
        resumed_from=start_epoch,
        epochs_run=0,
        max_frames=dict(train_data.max_frames),
        truncation=dict(base["truncation"]),
    )
    _notify(callbacks, "on_train_begin")
    for epoch in range(start_epoch + 1, tp.epochs + 1):
        sampler.set_epoch(epoch)
        lr = float(optimizer.param_groups[0]["lr"])
        train_loss, seconds, wait, clips = train_epoch(
            model=model,
            loss_fn=loss_fn,
            optimizer=optimizer,
            loader=loader,
            device=device,
            precision=precision,
            epoch=epoch,
            epochs=tp.epochs,
            run_name=run_name,
            last_path=paths.last,
            merge_captions=tp.sampling == "clip",
            batch_scheduler=scheduler if per_batch else None,
        )
        if not per_batch:
            scheduler.step()
        metrics = evaluate_split(
            model,
            val_data,
            device=device,
            batch_size=tp.batch_size,
            num_workers=tp.num_workers,
            precision=precision,
            where=f"{run_name} epoch {epoch}",
        )
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "lr": lr,
            **{f"val_{k}": v for k, v in metrics.items()},
        }
        history.append(row)
        score = metrics[SELECTION_METRIC]
        weights = {
            **base,
            "epoch": epoch,
            "model": model.state_dict(),
            "loss": loss_fn.state_dict(),
            "metrics": metrics,
        }
        if score > best_score:
            best_score, best_epoch = score, epoch
            save_checkpoint(paths.best, weights)
        # last.pt after best.pt: a crash in between redoes this epoch, identically.
        save_checkpoint(
            paths.last,
            {
                **weights,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": precision.scaler.state_dict() if precision.scaler is not None else {},
                "rng": rng_state(),
                "best_score": best_score,
                "best_epoch": best_epoch,
                "history": history,
            },
        )
        write_json_atomic(paths.history, history)
        result.epochs_run += 1
        result.epoch_seconds.append(seconds)
        result.data_wait_fraction.append(wait / seconds if seconds > 0 else 0.0)
        result.clips_per_second.append(clips / seconds if seconds > 0 else 0.0)
        log.info(
            "%s epoch %d/%d: loss %.4f lr %.3g val t2a R@1 %.2f R@10 %.2f geo %.2f (%.1fs)",
            run_name, epoch, tp.epochs, train_loss, lr, metrics["t2a_R1"], metrics["t2a_R10"],
            metrics[SELECTION_METRIC], seconds,
        )  # fmt: skip
        _notify(callbacks, "on_epoch_end", epoch, dict(row))

    best_row = next(row for row in history if row["epoch"] == best_epoch)
    result.best_epoch, result.best_score = best_epoch, best_score
    result.best_metrics = {k[4:]: v for k, v in best_row.items() if k.startswith("val_")}
    write_json_atomic(paths.history, history)
    summary = {k: v for k, v in best_row.items() if k != "epoch"}
    identity = run_identity(Layout(params.data.dataset, params.data.root))
    write_json_atomic(paths.metrics, {"best_epoch": best_epoch, "epochs": len(history), **summary, **identity})
    return result
