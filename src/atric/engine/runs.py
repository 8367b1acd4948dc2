"""Run names and the files a run writes.

A run ``<experts>-<pooling>`` writes
```
<models_dir>/<run>/last.pt     everything needed to continue (see atric.engine.checkpoint)
<models_dir>/<run>/best.pt     model + loss weights and config of the best validation epoch
<metrics_dir>/<run>.json       the best epoch's row (val_* metrics) + best_epoch, epochs, dataset, corpus
<metrics_dir>/history/<run>.json  one row per epoch: epoch, train_loss, lr, val_t2a_R1, ...
<metrics_dir>/<split>/<run>.json   evaluate_checkpoint(): epoch + t2a_* / a2t_* metrics, dataset, corpus
```
Every metrics file says which corpus it comes from (``run_identity``): the report and the
champion consider only the runs of the corpus in use (``of_corpus``), so the committed metrics
of another corpus are never compared with, or chosen over, this one's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atric.config import TrainParams
from atric.errors import ConfigError
from atric.layout import Layout

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


def run_identity(layout: Layout) -> dict[str, str]:
    """What a metrics file records of the corpus its run saw: the dataset and its fingerprint."""
    return {"dataset": layout.dataset, "corpus": layout.corpus_fingerprint()}


def of_corpus(docs: Mapping[str, Mapping[str, Any]], layout: Layout) -> tuple[list[str], list[str]]:
    """(runs whose metrics ``docs`` come from ``layout``'s corpus, the others: another dataset,
    another release of it, or files from before the metrics named their corpus)."""
    identity = run_identity(layout)
    kept: list[str] = []
    others: list[str] = []
    for run, doc in docs.items():
        (kept if all(doc.get(key) == value for key, value in identity.items()) else others).append(run)
    return kept, others
