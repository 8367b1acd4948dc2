"""Run names and the files a run writes.

A run ``<experts>-<pooling>`` writes
```
<models_dir>/<run>/last.pt     everything needed to continue (see atric.engine.checkpoint)
<models_dir>/<run>/best.pt     model + loss weights and config of the best validation epoch
<metrics_dir>/<run>.json       the best epoch's row (val_* metrics) + best_epoch, epochs
<metrics_dir>/history/<run>.json  one row per epoch: epoch, train_loss, lr, val_t2a_R1, ...
<metrics_dir>/<split>/<run>.json   evaluate_checkpoint(): epoch + t2a_* / a2t_* metrics
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from atric.config import TrainParams
from atric.errors import ConfigError

BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
SELECTION_METRIC = "t2a_geometric_mean"  # model selection, as in the paper


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
