"""One tracked training run: the engine inside an MLflow run, plus its artifacts and model.

Used by ``src/train.py`` (one run per ``<expert>-<pooling>``) and by the tuner (nested runs).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from atric.atomic import check_writable, remove_stale_temps
from atric.config import Params, flatten
from atric.device import configure_threads, resolve_device
from atric.embed import frames_to_batch
from atric.engine import (
    RunPaths,
    TrainResult,
    load_checkpoint,
    run_name_for,
    train,
)
from atric.engine.evaluation import check_experts_known
from atric.engine.resume import check_continuable, continuable_without_data, open_run_splits
from atric.errors import CheckpointError
from atric.factory import build_model, check_model_size, model_from_checkpoint
from atric.layout import Layout
from atric.model import RetrievalModel
from atric.ops import tracking
from atric.ops.runlock import run_lock
from atric.ops.storage import RetryPolicy

log = logging.getLogger("atric.ops.experiment")

# auto: continue a matching last.pt, refuse a different one (the engine's rule);
# resume: last.pt must exist; restart: discard it;
# pipeline: what `dvc repro` needs: continue an interrupted run with the same params, but
#   when DVC reruns a finished or changed run, keep the old checkpoints aside and start fresh.
ResumePolicy = Literal["auto", "resume", "restart", "pipeline"]
PREVIOUS_RUNS_DIR = ".previous"  # under models_dir; outside every run's DVC output
LOGGED_SECTIONS = ("data", "features", "text", "train")


def tracked_params(params: Params) -> dict[str, Any]:
    """The flattened params that affect a run, as MLflow shows them (``train.lr``, ...)."""
    data = params.model_dump()
    return flatten({section: data[section] for section in LOGGED_SECTIONS})


def run_tags(params: Params, run_name: str, device: torch.device, stage: str) -> dict[str, str]:
    tp = params.train
    return {
        "dataset": params.data.dataset,
        "expert": "+".join(tp.experts),
        "pooling": tp.pooling,
        "loss": tp.loss,
        "device": str(device),
        # CPU results depend on the intra-op thread count at float rounding level, which grows into
        # different metrics over epochs (issue #14): record it so two runs can be compared.
        "torch_threads": str(configure_threads(tp.threads)),  # what train() will use
        "dvc_stage": stage,
        "run": run_name,
    }


def _set_aside_previous_run(paths: RunPaths) -> None:
    """Move a run's files out of its output folder; never delete a finished checkpoint."""
    files = [p for p in paths.run_dir.iterdir()] if paths.run_dir.exists() else []
    if not files:
        return
    target = paths.run_dir.parent / PREVIOUS_RUNS_DIR / paths.run_dir.name / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.move(str(path), target / path.name)
    log.info("%s: previous checkpoints kept in %s", paths.run_dir.name, target)


def _apply_pipeline_policy(params: Params, paths: RunPaths) -> bool:
    """Returns whether the engine should continue ``last.pt``."""
    if not paths.last.exists():
        _set_aside_previous_run(paths)  # e.g. a lone best.pt or run-id file of an older run
        return False
    checkpoint = load_checkpoint(paths.last)
    unfinished = int(checkpoint["epoch"]) < params.train.epochs
    # A run that finished training but not its MLflow logging (server or S3 down): the stage
    # failed, and its rerun must complete the logging of these checkpoints, not retrain.
    logging_pending = not unfinished and tracking.tracking_pending(paths.run_dir)
    if unfinished or logging_pending:
        try:
            # Dry check of the signature: the engine raises on a mismatch; we set aside instead.
            if continuable_without_data(params, checkpoint):
                return True
        finally:
            del checkpoint
        if unfinished:
            return False
    _set_aside_previous_run(paths)
    return False


def train_tracked(
    params: Params,
    *,
    run_name: str | None = None,
    policy: ResumePolicy = "auto",
    stage: str = "train",
    callbacks: Sequence[Any] = (),
    nested: bool = False,
    log_model: bool = True,
    tags: dict[str, str] | None = None,
) -> TrainResult:
    """Train one run inside an MLflow run; artifacts: checkpoints, metrics, the model.

    ``tags``: more tags for the MLflow run (the tuner's study and trial), set when it opens.

    The run's lock (``atric.ops.runlock``) is held throughout: a second process for the same
    run fails at once. Everything that can be refused up front (unknown expert, unwritable
    output folders, bad data, a ``last.pt`` from other params) is refused before an MLflow run
    exists; a run that started and then failed ends FAILED with the reason as a tag. MLflow is
    reached through a ``tracking.TrackingProcess`` (this process does not import it), and the run
    is opened while the first epoch trains (``tracking.OpeningRun``).
    """
    run_name = run_name or run_name_for(params.train)
    paths = RunPaths.of(params.train, run_name)
    # Started first: the child imports MLflow on the other core while the data is checked.
    with tracking.TrackingProcess(preload_model=log_model) as mlflow_process:
        with run_lock(params.train.models_dir, run_name, stage):
            _remove_stale_temps(paths)
            _preflight(params, paths, policy)
            return _train_locked(
                params, run_name, paths, policy, stage, callbacks, nested, log_model, tags or {}, mlflow_process
            )


def _remove_stale_temps(paths: RunPaths) -> None:
    """Temp files of this run that a killed process left (we hold the run's lock: none is live)."""
    removed = remove_stale_temps(paths.run_dir)
    removed += remove_stale_temps(paths.metrics.parent, names=[paths.metrics.name])
    removed += remove_stale_temps(paths.history.parent, names=[paths.history.name])
    for path in removed:
        log.info("%s: removed %s, left by an interrupted write", paths.run_dir.name, path)


def _preflight(params: Params, paths: RunPaths, policy: ResumePolicy) -> None:
    """The engine's checks that need no training, run before any MLflow run is created."""
    tp = params.train
    layout = Layout(params.data.dataset, params.data.root)
    check_experts_known(layout, tp.experts, "train")
    for folder in dict.fromkeys((paths.run_dir, paths.metrics.parent, paths.history.parent)):
        check_writable(folder)
    if policy == "resume" and not paths.last.exists():
        raise CheckpointError(f"{paths.last}: nothing to resume (no checkpoint); drop --resume to start fresh")
    train_data, val_data = open_run_splits(params, cache_in_ram="no")
    try:
        check_model_size(tp, train_data.expert_dims, train_data.text_dim)
        # pipeline: _apply_pipeline_policy sets a different last.pt aside; restart discards it.
        if policy in ("auto", "resume") and paths.last.exists():
            config = build_model(tp, train_data.expert_dims, train_data.text_dim).config()
            check_continuable(
                params, load_checkpoint(paths.last), paths.last, max_frames=train_data.max_frames, model_config=config
            )
    finally:
        train_data.close()
        val_data.close()


def _train_locked(
    params: Params,
    run_name: str,
    paths: RunPaths,
    policy: ResumePolicy,
    stage: str,
    callbacks: Sequence[Any],
    nested: bool,
    log_model: bool,
    tags: dict[str, str],
    mlflow_process: tracking.TrackingProcess,
) -> TrainResult:
    resume, restart = policy == "resume", policy == "restart"
    if policy == "pipeline":
        if not _apply_pipeline_policy(params, paths):
            (paths.run_dir / tracking.RUN_ID_FILE).unlink(missing_ok=True)
    if restart:
        for name in (tracking.RUN_ID_FILE, tracking.TRACKING_PENDING_FILE):
            (paths.run_dir / name).unlink(missing_ok=True)
    if policy in ("auto", "resume") and _finished_and_logged(params, paths):
        # The same command again after the run finished: nothing to train and nothing to log, so
        # no MLflow run is opened (each rerun used to add another FINISHED run of the same name).
        log.info(
            "%s: already trained to epoch %d and logged to MLflow run %s; nothing to do",
            run_name, params.train.epochs, tracking.recorded_run_id(paths.run_dir),
        )  # fmt: skip
        return train(params, run_name=run_name, resume=resume, callbacks=list(callbacks))
    device = resolve_device(params.train.device)
    with tracking.tracked_run(
        params.data.dataset,
        run_name,
        paths.run_dir,
        params=tracked_params(params),
        tags={**run_tags(params, run_name, device, stage), **tags},
        nested=nested,
        process=mlflow_process,
    ) as opening:
        metrics_logger = tracking.EpochMetricsLogger(opening)
        try:
            result = train(
                params,
                run_name=run_name,
                resume=resume,
                restart=restart,
                callbacks=[metrics_logger, *callbacks],
            )
        except BaseException:
            # Training stopped (error, pruning, Ctrl-C): still send what MLflow missed, if it answers.
            if metrics_logger.pending:
                with contextlib.suppress(Exception):  # never mask why training stopped
                    metrics_logger.flush()
            raise
        run_id = _log_run_metrics(opening, result, metrics_logger)
        _log_artifacts(result.paths, mlflow_process, run_id, log_model=log_model)
    (paths.run_dir / tracking.TRACKING_PENDING_FILE).unlink(missing_ok=True)
    return result


def _finished_and_logged(params: Params, paths: RunPaths) -> bool:
    """``last.pt`` is at ``train.epochs`` (the preflight checked it may continue) and its MLflow
    run holds everything (a run id recorded, no logging pending)."""
    if not paths.last.exists() or tracking.tracking_pending(paths.run_dir):
        return False
    if tracking.recorded_run_id(paths.run_dir) is None or not paths.best.exists():
        return False
    return int(load_checkpoint(paths.last)["epoch"]) == params.train.epochs


def _log_run_metrics(
    opening: tracking.OpeningRun, result: TrainResult, metrics_logger: tracking.EpochMetricsLogger
) -> str:
    """Log the per-epoch history (buffered, or missing after an earlier outage) and the best
    epoch; returns the run id.

    MLflow down here, or since the epochs began (the run could not even be opened): the run is
    complete on disk and marked as awaiting its logging; a TrackingError says how to finish it.
    """
    try:
        run_id = opening.wait()
        if not metrics_logger.flush():
            raise metrics_logger.last_error or RuntimeError("metrics not logged")
        filled = opening.process.call(
            "backfill_history", run_id=run_id, history=result.history, skip_steps=sorted(metrics_logger.logged_steps)
        )
        if filled:
            log.info("%s: %d earlier epochs logged to MLflow run %s", result.run_name, filled, run_id)
        best = {f"best_val_{k}": v for k, v in result.best_metrics.items()}
        opening.process.call("log_metrics_to_run", run_id=run_id, metrics={**best, "best_epoch": result.best_epoch})
        return run_id
    except Exception as exc:
        cause = exc.__cause__ if isinstance(exc, tracking.TrackingError) else exc  # opening failed
        if cause is None or not tracking.is_transient(cause):
            raise
        run_dir = result.paths.run_dir
        tracking.mark_pending(run_dir, opening.run_id, f"metrics: {tracking.describe(cause)}")
        unsent = metrics_logger.pending_steps
        epochs = f" (epochs {', '.join(map(str, unsent))} not sent)" if unsent else ""
        raise tracking.TrackingError(
            f"{result.run_name}: the run finished locally (checkpoints in {run_dir}, metrics in "
            f"{result.paths.metrics} and {result.paths.history}), but its metrics could not be logged "
            f"to MLflow at {tracking.display_uri()}{epochs}: {tracking.describe(cause)}. Run the same "
            "command again once MLflow is back: it logs them (training is not repeated)"
        ) from exc


def _log_artifacts(
    paths: RunPaths, mlflow_process: tracking.TrackingProcess, run_id: str, *, log_model: bool = False
) -> None:
    """Upload checkpoints, metrics files and the model (through ``mlflow_process``), retrying
    while MLflow or its S3 is down.

    Each upload is done once; a failure waits with bounded backoff (``RetryPolicy``:
    ``ATRIC_S3_ATTEMPTS``/``ATRIC_S3_BACKOFF``) and retries what is left. The local files are
    only read: when the budget is spent they are all still on disk, and a TrackingError
    names the ones not uploaded.
    """
    uploads: list[tuple[str, Path, Callable[[], None]]] = []

    def artifact(path: Path, folder: str) -> None:
        if path.exists():
            upload = functools.partial(mlflow_process.call, "log_artifact", run_id=run_id, path=str(path), folder=folder)
            uploads.append((f"{folder}/{path.name}", path, upload))

    for path in (paths.best, paths.last):
        artifact(path, "checkpoints")
    for path in (paths.metrics, paths.history):
        artifact(path, "metrics")
    if log_model and paths.best.exists():
        upload = functools.partial(mlflow_process.call, "log_model", run_id=run_id, best_path=str(paths.best))
        uploads.append(("model", paths.best, upload))

    policy = RetryPolicy.from_env()
    failures = 0
    while uploads:
        name, _, upload = uploads[0]
        try:
            upload()
        except Exception as exc:
            if not tracking.is_transient(exc):
                raise
            failures += 1
            if failures >= policy.attempts:
                tracking.mark_pending(paths.run_dir, run_id, f"artifacts: {tracking.describe(exc)}")
                names = ", ".join(f"{n} ({p})" for n, p, _ in uploads)
                raise tracking.TrackingError(
                    f"{paths.run_dir.name}: {len(uploads)} artifact upload(s) to MLflow at "
                    f"{tracking.display_uri()} failed after {failures} attempts: {tracking.describe(exc)}. "
                    f"Nothing is lost: these files are safe on local disk: {names}. Run the same command "
                    "again (without --restart) once the server and its artifact store are back: it "
                    "uploads them to the same MLflow run (training is not repeated)"
                ) from exc
            pause = policy.delay(failures)
            log.warning(
                "%s: upload of %s to MLflow at %s failed (%s); the file stays on local disk; retry %d/%d in %.1fs",
                paths.run_dir.name, name, tracking.display_uri(), tracking.describe(exc),
                failures, policy.attempts - 1, pause,
            )  # fmt: skip
            time.sleep(pause)
            continue
        uploads.pop(0)


class AudioEmbedder(nn.Module):
    """The servable audio side of a single-expert model: features [B, T, D] -> embeddings [B, E].

    Each row is one whole clip (rows of one batch share T); its frames are cut to the run's
    padded length and masked exactly as training does (``atric.embed.frames_to_batch``).
    """

    def __init__(self, model: RetrievalModel, max_frames: dict[str, int]) -> None:
        super().__init__()
        if len(model.experts) != 1:
            raise CheckpointError("only single-expert models are logged as an MLflow model")
        self.model = model
        self.expert = model.experts[0]
        self.max_frames = {k: int(v) for k, v in max_frames.items()}

    def forward(self, features: Tensor) -> Tensor:
        x, mask = frames_to_batch({self.expert: features}, self.max_frames)[self.expert]
        device = features.device
        return self.model.encode_audio({self.expert: (x.to(device), mask.to(device))})[self.expert]


def log_best_model(best_path: Path, artifact_name: str = "model") -> None:
    """Log the best checkpoint into the active MLflow run as a PyTorch model with a signature
    from a sample batch (in the ``tracking.TrackingProcess``: its ``log_model``)."""
    import mlflow
    from mlflow.models import infer_signature

    checkpoint = load_checkpoint(best_path)
    model = model_from_checkpoint(checkpoint)
    if len(model.experts) != 1:
        log.info("multi-expert model: checkpoint artifacts only, no MLflow model")
        return
    embedder = AudioEmbedder(model, dict(checkpoint["max_frames"])).eval()
    expert = model.experts[0]
    frames = int(checkpoint["max_frames"][expert])
    dim = int(checkpoint["model_config"]["expert_dims"][expert])
    sample = np.random.default_rng(0).standard_normal((2, frames, dim)).astype(np.float32)
    with torch.no_grad():
        output = embedder(torch.from_numpy(sample)).numpy()
    mlflow.pytorch.log_model(
        embedder,
        name=artifact_name,
        signature=infer_signature(sample, output),
        input_example=sample,
        # Explicit requirements: MLflow's inference of them imports the model in a subprocess (slow).
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
        # torch.export cannot trace the packed LSTM pooling; the registry is our own trusted store.
        serialization_format="pickle",
    )


def log_evaluation(
    params: Params,
    run_name: str,
    metrics: dict[str, float],
    split: str,
    log_metrics: Callable[[str, dict[str, float]], None] = tracking.log_metrics_to_run,
) -> None:
    """Add a run's evaluation metrics (``test_t2a_R1``, ...) to its MLflow training run
    (through ``log_metrics``: e.g. a ``tracking.TrackingProcess``'s)."""
    paths = RunPaths.of(params.train, run_name)
    run_file = paths.run_dir / tracking.RUN_ID_FILE
    if not run_file.exists():
        log.info("%s: no MLflow run recorded; evaluation metrics not logged to MLflow", run_name)
        return
    run_id = json.loads(run_file.read_text())["run_id"]
    log_metrics(run_id, {f"{split}_{k}": v for k, v in metrics.items()})
