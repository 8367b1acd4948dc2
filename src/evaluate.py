"""Stage `evaluate`: metrics of a trained run's checkpoint on a split.

    python src/evaluate.py [--run logmel-netrvlad] [--expert E --pooling P] [--split test] [--checkpoint best]

Reads params sections `data`, `text`, `train`, `evaluate`. Writes metrics/<split>/<run>.json
and prints the metrics table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atric.cli import add_params_arguments, add_run_arguments, params_from_args, run, run_overrides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_arguments(parser)
    parser.add_argument("--run", help="run name (default: <train.experts>-<train.pooling>)")
    add_run_arguments(parser)
    parser.add_argument("--split", help="evaluate.split (val | test)")
    parser.add_argument("--checkpoint", help="evaluate.checkpoint (best | last)")
    args = parser.parse_args()
    extra = run_overrides(args)
    if args.split:
        extra.append(f"evaluate.split={json.dumps(args.split)}")
    if args.checkpoint:
        extra.append(f"evaluate.checkpoint={json.dumps(args.checkpoint)}")
    params = params_from_args(args, extra)
    from atric.ops.tracking import TrackingProcess

    # MLflow is imported by a child on the other core while torch is imported here (seconds each).
    with TrackingProcess() as mlflow_process:
        # Imported once the arguments and params are valid (torch, h5py: seconds).
        from atric.engine import evaluate_checkpoint, run_name_for
        from atric.metrics import format_metrics_table
        from atric.ops.experiment import log_evaluation
        from atric.ops.runlock import run_lock
        from atric.report import write_recall_curve

        run_name = args.run or run_name_for(params.train)
        # The run's lock: no evaluation reads best.pt while a training of the run rewrites it,
        # and no two evaluations write metrics/<split>/<run>.json at once.
        with run_lock(params.train.models_dir, run_name, "evaluate"):
            metrics = evaluate_checkpoint(
                params, run_name, split=params.evaluate.split, which=params.evaluate.checkpoint
            )
            log_evaluation(params, run_name, metrics, params.evaluate.split, mlflow_process.log_metrics_to_run)
            write_recall_curve(Path(params.train.metrics_dir), run_name, metrics)
    print(
        f"{run_name} ({params.evaluate.checkpoint} checkpoint, epoch {metrics['epoch']}) on {params.evaluate.split}:"
    )
    print(format_metrics_table(metrics))
    return 0


if __name__ == "__main__":
    run(main)
