"""The training and evaluation loop, checkpoints and resume.

A run ``<experts>-<pooling>`` writes
```
<models_dir>/<run>/last.pt     everything needed to continue: model, loss, optimiser, scheduler,
                               AMP scaler, RNG states, epoch, best score, history, config
<models_dir>/<run>/best.pt     model + loss weights and config of the best validation epoch
<metrics_dir>/<run>.json       the best epoch's row (val_* metrics) + best_epoch, epochs
<metrics_dir>/history/<run>.json  one row per epoch: epoch, train_loss, lr, val_t2a_R1, ...
<metrics_dir>/<split>/<run>.json   evaluate_checkpoint(): epoch + t2a_* / a2t_* metrics
```
Every file is written through a temp file and a rename. A run started again with the same
params continues from ``last.pt`` and ends with exactly the metrics an uninterrupted run
gets (on the same device): the shuffling order depends only on (seed, epoch), and every
other source of state is in the checkpoint. A ``last.pt`` from different params is an
error that lists the differing keys; ``restart=True`` discards it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from atric.atomic import atomic_path, write_text_atomic
from atric.config import NON_RESULT_KEYS, Params, TrainParams, flatten
from atric.data import (
    Batch,
    ClipCollate,
    ClipDataset,
    EpochSampler,
    PairCollate,
    PairDataset,
    SplitData,
    collate_words,
    open_split,
)
from atric.device import resolve_device
from atric.errors import AtricError, CheckpointError, ConfigError, DataError
from atric.layout import EVAL_CAPTIONS_PER_CLIP, Layout
from atric.losses import build_loss
from atric.metrics import retrieval_metrics
from atric.model import POOLINGS, RetrievalModel

log = logging.getLogger("atric.train")

CHECKPOINT_FORMAT = 1
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
SELECTION_METRIC = "t2a_geometric_mean"  # model selection, as in the paper


# ---------------------------------------------------------------- names and paths
def run_name_for(train: TrainParams) -> str:
    """``<expert>-<pooling>``, experts joined with '+' when several."""
    return f"{'+'.join(train.experts)}-{train.pooling}"


@dataclass(frozen=True)
class RunPaths:
    run_dir: Path
    best: Path
    last: Path
    metrics: Path
    history: Path

    @classmethod
    def of(cls, train: TrainParams, run_name: str) -> RunPaths:
        if not run_name or "/" in run_name or run_name in (".", ".."):
            raise ConfigError(f"run name {run_name!r}: must be a non-empty file name without '/'")
        run_dir = Path(train.models_dir) / run_name
        metrics_dir = Path(train.metrics_dir)
        return cls(
            run_dir=run_dir,
            best=run_dir / BEST_CHECKPOINT,
            last=run_dir / LAST_CHECKPOINT,
            metrics=metrics_dir / f"{run_name}.json",
            history=metrics_dir / "history" / f"{run_name}.json",
        )


def evaluation_metrics_dir(train: TrainParams, split: str) -> Path:
    """Where ``evaluate_checkpoint`` writes every run's metrics on ``split``."""
    return Path(train.metrics_dir) / split


def evaluation_metrics_path(train: TrainParams, run_name: str, split: str) -> Path:
    return evaluation_metrics_dir(train, split) / f"{run_name}.json"


# ---------------------------------------------------------------- results and callbacks
class Callback(Protocol):
    """Both methods are optional; an exception raised in them stops training and propagates
    (e.g. ``optuna.TrialPruned``); the checkpoints of finished epochs are already saved."""

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


# ---------------------------------------------------------------- checkpoints
def run_signature(params: Params, max_frames: dict[str, int], model_config: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides a run's results, flat (``train.lr``, ``model.expert_dims.fa``, ...)."""
    train = params.train.model_dump(exclude=set(NON_RESULT_KEYS))
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


def model_from_checkpoint(checkpoint: dict[str, Any]) -> RetrievalModel:
    """The trained model a loaded checkpoint holds (on the CPU)."""
    model = RetrievalModel.from_config(checkpoint["model_config"])
    model.load_state_dict(checkpoint["model"])
    return model


def _save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


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


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
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


# ---------------------------------------------------------------- building blocks
def check_names(train: TrainParams) -> None:
    """Unknown pooling/loss names fail before any data is read."""
    for key, name in (("train.pooling", train.pooling), ("train.text_pooling", train.text_pooling)):
        if name not in POOLINGS:
            raise ConfigError(f"{key}: unknown pooling {name!r}; valid poolings: {', '.join(POOLINGS)}")
    if not train.experts:
        raise ConfigError("train.experts: give at least one audio expert")
    if len(set(train.experts)) != len(train.experts):
        raise ConfigError(f"train.experts: duplicate expert names in {train.experts}")


def build_train_loss(train: TrainParams) -> nn.Module:
    if train.loss == "infonce":
        return build_loss("infonce", init_temperature=train.temperature)
    if train.loss == "max_margin":
        return build_loss("max_margin", margin=train.margin)
    return build_loss(train.loss)  # raises ConfigError listing the valid losses


def build_model(train: TrainParams, expert_dims: dict[str, int], text_dim: int) -> RetrievalModel:
    return RetrievalModel(
        expert_dims,
        text_dim,
        audio_pooling=train.pooling,
        text_pooling=train.text_pooling,
        embed_dim=train.embed_dim,
        audio_clusters=train.audio_clusters,
        text_clusters=train.text_clusters,
        ghost_clusters=train.ghost_clusters,
        lstm_hidden=train.lstm_hidden,
        fusion=train.fusion,
    )


def build_optimizer(train: TrainParams, model: nn.Module, loss: nn.Module) -> torch.optim.Optimizer:
    # The loss's parameters (InfoNCE's temperature) get no weight decay: decay would pull
    # log(1/T) towards 0, i.e. T towards 1, which is not regularisation (CLIP does the same).
    groups = [{"params": list(model.parameters()), "weight_decay": train.weight_decay}]
    loss_params = list(loss.parameters())
    if loss_params:
        groups.append({"params": loss_params, "weight_decay": 0.0})
    if train.optimizer == "ranger":
        from pytorch_optimizer import Ranger  # RAdam + Lookahead (+ gradient centralisation)

        return Ranger(groups, lr=train.lr, weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)
    raise ConfigError(f"train.optimizer: unknown optimizer {train.optimizer!r}; valid: ranger, adamw")


@dataclass
class _Precision:
    """Autocast on CUDA only: bfloat16 where supported, else float16 with a GradScaler."""

    enabled: bool
    dtype: torch.dtype = torch.float32
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def for_device(cls, device: torch.device, wanted: bool) -> _Precision:
        if not wanted or device.type != "cuda":
            return cls(False)
        if torch.cuda.is_bf16_supported():
            return cls(True, torch.bfloat16)
        return cls(True, torch.float16, torch.amp.GradScaler("cuda"))

    def autocast(self):
        if not self.enabled:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.dtype)


def _loader(
    dataset: Any, *, batch_size: int, collate: Any, num_workers: int, device: torch.device, **kw: Any
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        # Each worker opens its own HDF5 handles; a small prefetch keeps memory bounded.
        prefetch_factor=2 if num_workers > 0 else None,
        **kw,
    )


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def similarity_matrix(
    model: RetrievalModel,
    data: SplitData,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    precision: _Precision | None = None,
) -> np.ndarray:
    """Embed every clip once and every caption once: sim [n_captions, n_clips] (float32).

    Row i is caption i in clip-major index order, so with 5 captions per clip row i
    belongs to clip i // 5 (the evaluation protocol's order).
    """
    precision = precision or _Precision(False)
    was_training = model.training
    model.eval()
    try:
        clip_loader = _loader(
            ClipDataset(data),
            batch_size=batch_size,
            collate=ClipCollate(data.max_frames),
            num_workers=num_workers,
            device=device,
        )
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in data.experts}
        for audio in clip_loader:
            audio = {k: (x.to(device), m.to(device)) for k, (x, m) in audio.items()}
            with precision.autocast():
                embedded = model.encode_audio(audio)
            for name, value in embedded.items():
                parts[name].append(value.float())
        audio_all = {name: torch.cat(values) for name, values in parts.items()}

        rows = []
        word_loader = DataLoader(data.words, batch_size=batch_size, collate_fn=collate_words)
        for words, mask in word_loader:
            with precision.autocast():
                embeddings, weights = model.encode_text(words.to(device), mask.to(device))
            # Similarities in float32 even under autocast: ranks hinge on small differences.
            embeddings = {k: v.float() for k, v in embeddings.items()}
            rows.append(model.similarity((embeddings, weights.float()), audio_all).cpu())
        return torch.cat(rows).numpy()
    finally:
        model.train(was_training)


def evaluate_split(
    model: RetrievalModel,
    data: SplitData,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    precision: _Precision | None = None,
    where: str = "",
) -> dict[str, float]:
    """Retrieval metrics of ``model`` on a val/test split (5 captions per clip)."""
    sim = similarity_matrix(
        model, data, device=device, batch_size=batch_size, num_workers=num_workers, precision=precision
    )
    if not np.isfinite(sim).all():
        raise AtricError(
            f"{where or data.split}: the {data.split} similarities hold NaN/inf: the model diverged "
            "(lower train.lr)"
        )
    return retrieval_metrics(sim, captions_per_clip=EVAL_CAPTIONS_PER_CLIP)


# ---------------------------------------------------------------- training
def _train_epoch(
    *,
    model: RetrievalModel,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    precision: _Precision,
    epoch: int,
    epochs: int,
    run_name: str,
    last_path: Path,
) -> tuple[float, float, float, int]:
    """One pass over the training pairs; returns (mean loss, seconds, data-wait seconds, clips)."""
    model.train()
    loss_fn.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    steps = clips = 0
    wait = 0.0
    start = time.perf_counter()
    iterator = iter(loader)
    progress = tqdm(total=len(loader), desc=f"{run_name} epoch {epoch}/{epochs}", leave=False, disable=None)
    try:
        for step in range(1, len(loader) + 1):
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
            loss = loss_fn(sim.float(), batch.caption_clip)
            if not torch.isfinite(loss):
                kept = (
                    f"the last good checkpoint {last_path} is kept"
                    if last_path.exists()
                    else "no checkpoint was written yet"
                )
                raise AtricError(
                    f"{run_name}: loss is {loss.item()} at epoch {epoch}, step {step}: training stopped; "
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
            total += loss.detach()
            steps += 1
            clips += n_clips
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
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
    check_names(tp)
    if resume and restart:
        raise ConfigError("--resume and --restart exclude each other")
    paths = RunPaths.of(tp, run_name)
    device = resolve_device(tp.device)
    loss_fn = build_train_loss(tp)

    if restart:
        for path in (paths.last, paths.best):
            path.unlink(missing_ok=True)
    checkpoint = load_checkpoint(paths.last) if paths.last.exists() else None
    if resume and checkpoint is None:
        raise CheckpointError(
            f"{paths.last}: nothing to resume (no checkpoint); drop --resume to start fresh"
        )

    seed_everything(tp.seed)
    layout = Layout(params.data.dataset, params.data.root)
    common = {"experts": tp.experts, "vectors": params.text.vectors, "cache_in_ram": tp.cache_in_ram}
    with ExitStack() as stack:  # HDF5 handles are closed whatever happens
        train_data = open_split(layout, "train", max_frames=tp.max_frames, **common)
        stack.callback(train_data.close)
        val_data = open_split(
            layout, "val", max_frames=train_data.max_frames, expert_dims=train_data.expert_dims, **common
        )
        stack.callback(val_data.close)
        if val_data.text_dim != train_data.text_dim:
            raise DataError(
                f"{layout.text_path(params.text.vectors, 'val')}: word vectors have dim "
                f"{val_data.text_dim}, the train split's have {train_data.text_dim}"
            )
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
    model = build_model(tp, train_data.expert_dims, train_data.text_dim).to(device)
    loss_fn.to(device)
    optimizer = build_optimizer(tp, model, loss_fn)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=tp.lr_step_gamma)
    precision = _Precision.for_device(device, tp.mixed_precision)
    signature = run_signature(params, train_data.max_frames, model.config())

    start_epoch, best_score, best_epoch = 0, -math.inf, 0
    history: list[dict[str, float]] = []
    if checkpoint is not None:
        differences = signature_differences(checkpoint.get("signature", {}), signature)
        if differences:
            raise CheckpointError(
                f"{paths.last} was trained with different settings:\n  "
                + "\n  ".join(differences)
                + "\nrestore those params to continue it, or pass --restart to discard it and start over"
            )
        if checkpoint["epoch"] > tp.epochs:
            raise CheckpointError(
                f"{paths.last} is at epoch {checkpoint['epoch']}, beyond train.epochs={tp.epochs}; "
                "raise train.epochs or pass --restart"
            )
        model.load_state_dict(checkpoint["model"])
        loss_fn.load_state_dict(checkpoint["loss"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if precision.scaler is not None and checkpoint.get("scaler"):
            precision.scaler.load_state_dict(checkpoint["scaler"])
        _set_rng_state(checkpoint["rng"])
        start_epoch = int(checkpoint["epoch"])
        best_score, best_epoch = float(checkpoint["best_score"]), int(checkpoint["best_epoch"])
        history = [dict(row) for row in checkpoint["history"]]
        log.info("%s: resuming after epoch %d from %s", run_name, start_epoch, paths.last)

    # Batches never exceed the number of pairs; incomplete last batches are dropped so
    # every step sees the same batch size (and BatchNorm never sees a single row).
    batch_size = min(tp.batch_size, len(train_data.words))
    sampler = EpochSampler(len(train_data.words), tp.seed)
    loader = _loader(
        PairDataset(train_data),
        batch_size=batch_size,
        collate=PairCollate(train_data.max_frames),
        num_workers=tp.num_workers,
        device=device,
        sampler=sampler,
        drop_last=True,
        persistent_workers=tp.num_workers > 0,
        # Worker seeds come from this generator, not from the global RNG (kept reproducible).
        generator=torch.Generator().manual_seed(tp.seed),
    )
    base = {
        "format": CHECKPOINT_FORMAT,
        "run_name": run_name,
        "model_config": model.config(),
        "max_frames": dict(train_data.max_frames),
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
    )
    for epoch in range(start_epoch + 1, tp.epochs + 1):
        sampler.set_epoch(epoch)
        lr = float(optimizer.param_groups[0]["lr"])
        train_loss, seconds, wait, clips = _train_epoch(
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
        )
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
            _save(paths.best, weights)
        # last.pt after best.pt: a crash in between redoes this epoch, identically.
        _save(
            paths.last,
            {
                **weights,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": precision.scaler.state_dict() if precision.scaler is not None else {},
                "rng": _rng_state(),
                "best_score": best_score,
                "best_epoch": best_epoch,
                "history": history,
            },
        )
        _write_json(paths.history, history)
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
    _write_json(paths.history, history)
    summary = {k: v for k, v in best_row.items() if k != "epoch"}
    _write_json(paths.metrics, {"best_epoch": best_epoch, "epochs": len(history), **summary})
    return result


def _write_json(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=1) + "\n")


# ---------------------------------------------------------------- evaluation of a checkpoint
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
    device = resolve_device(tp.device)
    checkpoint = load_checkpoint(paths.best if which == "best" else paths.last)
    trained_vectors = checkpoint["signature"].get("text.vectors")
    if trained_vectors != params.text.vectors:
        raise CheckpointError(
            f"{run_name}: trained with text.vectors={trained_vectors!r}, params say {params.text.vectors!r}"
        )
    model = model_from_checkpoint(checkpoint).to(device)
    config = model.config()
    data = open_split(
        Layout(params.data.dataset, params.data.root),
        split,
        experts=list(model.experts),
        vectors=params.text.vectors,
        max_frames=dict(checkpoint["max_frames"]),
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
            precision=_Precision.for_device(device, tp.mixed_precision),
            where=run_name,
        )
    finally:
        data.close()
    out = {"epoch": int(checkpoint["epoch"]), **metrics}
    _write_json(evaluation_metrics_path(tp, run_name, split), out)
    return out


__all__ = [
    "Callback",
    "RunPaths",
    "TrainResult",
    "evaluate_checkpoint",
    "evaluate_split",
    "load_checkpoint",
    "model_from_checkpoint",
    "run_name_for",
    "similarity_matrix",
    "train",
]
