"""Stage `train`: train one run <expert>-<pooling> on the train split, select on val.

    python src/train.py [--expert logmel [--expert aisfx]] [--pooling netvlad]
                        [--resume | --restart] [--set train.lr=0.003]

Reads params sections `data`, `text`, `train`. Writes models/<run>/{best,last}.pt,
metrics/<run>.json and metrics/history/<run>.json (see atric.engine). A run started again
with the same params continues from models/<run>/last.pt.
"""

from __future__ import annotations

import argparse
import json
import logging

from atric.cli import add_params_arguments, add_run_arguments, params_from_args, run, run_overrides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_arguments(parser)
    add_run_arguments(parser)
    parser.add_argument("--run", help="run name (default: <train.experts joined by +>-<train.pooling>)")
    parser.add_argument(
        "--fused",
        action="store_true",
        help="one run over every expert of features.experts, fused with text-predicted weights "
        "(train.fusion=text_weighted: the Collaborative Experts setting)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue models/<run>/last.pt (must exist)")
    group.add_argument("--restart", action="store_true", help="discard the run's checkpoints and start over")
    group.add_argument(
        "--pipeline",
        action="store_true",
        help="as `dvc repro` runs it: continue an interrupted run with the same params, otherwise "
        "keep the old checkpoints under models/.previous/ and start fresh",
    )
    args = parser.parse_args()
    extra = run_overrides(args)
    if args.fused:
        experts = params_from_args(args).features.experts
        extra += [f"train.experts={json.dumps(experts)}", "train.fusion=text_weighted"]
    params = params_from_args(args, extra)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Imported once the arguments and params are valid: torch, h5py and MLflow take seconds
    # to import, which --help and a mistyped --set need not wait for.
    from atric.engine import run_name_for
    from atric.metrics import format_metrics_table
    from atric.ops.experiment import train_tracked

    policy = (
        "resume" if args.resume else "restart" if args.restart else "pipeline" if args.pipeline else "auto"
    )
    result = train_tracked(params, run_name=args.run or run_name_for(params.train), policy=policy)
    print(f"{result.run_name}: best epoch {result.best_epoch} of {len(result.history)} (val)")
    print(format_metrics_table(result.best_metrics))
    return 0


if __name__ == "__main__":
    run(main)
