"""Training and evaluation: run files (``runs``), checkpoints and the resume signature
(``checkpoint``), the epoch loop (``loop``) and evaluation (``evaluation``).

Models, losses and optimisers are built by ``atric.factory``; precision is ``atric.precision``;
every split is embedded through ``atric.embed``.
"""

from atric.engine.checkpoint import load_checkpoint, run_signature, signature_differences
from atric.engine.evaluation import evaluate_checkpoint, evaluate_split
from atric.engine.loop import Callback, TrainResult, train, train_epoch, train_loader
from atric.engine.runs import (
    SELECTION_METRIC,
    RunPaths,
    evaluation_metrics_dir,
    evaluation_metrics_path,
    run_name_for,
)

__all__ = [
    "SELECTION_METRIC",
    "Callback",
    "RunPaths",
    "TrainResult",
    "evaluate_checkpoint",
    "evaluate_split",
    "evaluation_metrics_dir",
    "evaluation_metrics_path",
    "load_checkpoint",
    "run_name_for",
    "run_signature",
    "signature_differences",
    "train",
    "train_epoch",
    "train_loader",
]
