"""One tracked training run: the engine inside an MLflow run, plus its artifacts and model.

Used by ``src/train.py`` (one run per ``<expert>-<pooling>``) and by the tuner (nested runs).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from atric import tracking
from atric.config import Params, flatten
from atric.device import resolve_device
from atric.engine import RunPaths, TrainResult, check_names, load_checkpoint, run_name_for, train
from atric.errors import CheckpointError
from atric.model import RetrievalModel

log = logging.getLogger("atric.experiment")

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
    if unfinished:
        try:
            # Dry check of the signature: the engine raises on a mismatch; we set aside instead.
            return _signature_matches(params, checkpoint)
        finally:
            del checkpoint
    _set_aside_previous_run(paths)
    return False


def _signature_matches(params: Params, checkpoint: dict[str, Any]) -> bool:
    saved = checkpoint.get("signature", {})
    flat = flatten(params.train)
    ignored = {"epochs", "device", "num_workers", "cache_in_ram", "models_dir", "metrics_dir", "poolings"}
    for key, value in flat.items():
        if key in ignored:
            continue
        name = f"train.{key}"
        if name in saved and saved[name] != value and not (key == "max_frames" and not value):
            return False
    return saved.get("text.vectors", params.text.vectors) == params.text.vectors


def train_tracked(
    params: Params,
    *,
    run_name: str | None = None,
    policy: ResumePolicy = "auto",
    stage: str = "train",
    callbacks: Sequence[Any] = (),
    nested: bool = False,
    log_model: bool = True,
) -> TrainResult:
    """Train one run inside an MLflow run; artifacts: checkpoints, metrics, the model."""
    run_name = run_name or run_name_for(params.train)
    check_names(params.train)  # a typo must fail before an MLflow run or a folder is created
    paths = RunPaths.of(params.train, run_name)
    resume, restart = policy == "resume", policy == "restart"
    if policy == "pipeline":
        if not _apply_pipeline_policy(params, paths):
            (paths.run_dir / tracking.RUN_ID_FILE).unlink(missing_ok=True)
    if restart:
        (paths.run_dir / tracking.RUN_ID_FILE).unlink(missing_ok=True)
    device = resolve_device(params.train.device)
    with tracking.tracked_run(
        params.data.dataset,
        run_name,
        paths.run_dir,
        params=tracked_params(params),
        tags=run_tags(params, run_name, device, stage),
        nested=nested,
    ):
        result = train(
            params,
            run_name=run_name,
            resume=resume,
            restart=restart,
            callbacks=[tracking.EpochMetricsLogger(), *callbacks],
        )
        tracking.log_metrics(result.best_metrics, prefix="best_val_")
        tracking.log_metrics({"best_epoch": result.best_epoch})
        _log_artifacts(result.paths)
        if log_model:
            log_best_model(result.paths.best)
    return result


def _log_artifacts(paths: RunPaths) -> None:
    import mlflow

    for path in (paths.best, paths.last):
        if path.exists():
            mlflow.log_artifact(str(path), artifact_path="checkpoints")
    for path in (paths.metrics, paths.history):
        if path.exists():
            mlflow.log_artifact(str(path), artifact_path="metrics")


class AudioEmbedder(nn.Module):
    """The servable audio side of a single-expert model: features [B, T, D] -> embeddings [B, E].

    Frames that are all zeros count as padding, as the training collate pads with zeros.
    """

    def __init__(self, model: RetrievalModel) -> None:
        super().__init__()
        if len(model.experts) != 1:
            raise CheckpointError("only single-expert models are logged as an MLflow model")
        self.model = model
        self.expert = model.experts[0]

    def forward(self, features: Tensor) -> Tensor:
        mask = features.abs().sum(dim=-1) > 0
        return self.model.encode_audio({self.expert: (features, mask)})[self.expert]


def log_best_model(best_path: Path, artifact_name: str = "model") -> None:
    """Log the best checkpoint as an MLflow PyTorch model with a signature from a sample batch."""
    import mlflow
    from mlflow.models import infer_signature

    checkpoint = load_checkpoint(best_path)
    model = RetrievalModel.from_config(checkpoint["model_config"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    if len(model.experts) != 1:
        log.info("multi-expert model: checkpoint artifacts only, no MLflow model")
        return
    embedder = AudioEmbedder(model).eval()
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


def log_evaluation(params: Params, run_name: str, metrics: dict[str, float], split: str) -> None:
    """Add a run's evaluation metrics (``test_t2a_R1``, ...) to its MLflow training run."""
    paths = RunPaths.of(params.train, run_name)
    run_file = paths.run_dir / tracking.RUN_ID_FILE
    if not run_file.exists():
        log.info("%s: no MLflow run recorded; evaluation metrics not logged to MLflow", run_name)
        return
    run_id = json.loads(run_file.read_text())["run_id"]
    tracking.log_metrics_to_run(run_id, {f"{split}_{k}": v for k, v in metrics.items()})


def registered_model_name(params: Params) -> str:
    """One registered model per dataset, e.g. ``atric-SynthCaps``."""
    return f"atric-{params.data.dataset}"


def best_run_by_test(params: Params, metric: str = "t2a_geometric_mean") -> str:
    """The run with the best evaluation metric among ``metrics/<split>/*.json``."""
    from atric.errors import DataError

    directory = Path(params.train.metrics_dir) / params.evaluate.split
    scores: dict[str, float] = {}
    for path in sorted(directory.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if metric in doc:
            scores[path.stem] = float(doc[metric])
    if not scores:
        raise DataError(f"{directory}: no evaluated runs (run `python src/evaluate.py` or `dvc repro`)")
    return max(scores, key=lambda name: scores[name])


def register_champion(params: Params, run_name: str) -> str | None:
    """Register ``run_name``'s MLflow model and move the ``champion`` alias to it."""
    paths = RunPaths.of(params.train, run_name)
    run_file = paths.run_dir / tracking.RUN_ID_FILE
    if not run_file.exists():
        log.info("%s: no MLflow run recorded; nothing registered", run_name)
        return None
    run_id = json.loads(run_file.read_text())["run_id"]
    tracking.configure()
    return tracking.register_champion(run_id, registered_model_name(params))


def champion_run(params: Params) -> str:
    """The run the ``champion`` alias points at in MLflow, else the best evaluated run on disk."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        tracking.configure()
        version = MlflowClient().get_model_version_by_alias(registered_model_name(params), tracking.CHAMPION_ALIAS)
        run = MlflowClient().get_run(version.run_id)
        name = run.data.tags.get(tracking.RUN_NAME_TAG)
        if name and RunPaths.of(params.train, name).best.exists():
            return name
    except MlflowException:
        pass
    return best_run_by_test(params)
