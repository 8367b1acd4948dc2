"""Stage `report`: reports/results.md (paper-style table) + recall@K and validation plots,
and the best run registered in MLflow as the `champion`.

    python src/report.py [--out reports] [--no-register]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atric.cli import add_params_arguments, params_from_args, run
from atric.engine import SELECTION_METRIC, RunPaths, evaluation_metrics_dir
from atric.ops.champion import best_run_by_test, register_champion
from atric.report import load_run_metrics, write_report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_arguments(parser)
    parser.add_argument("--out", default="reports", help="output folder (default: reports)")
    parser.add_argument("--no-register", action="store_true", help="do not touch the MLflow registry")
    args = parser.parse_args()
    params = params_from_args(args)
    runs = load_run_metrics(evaluation_metrics_dir(params.train, params.evaluate.split))
    histories = {}
    for name in runs:
        history = RunPaths.of(params.train, name).history
        if history.exists():
            histories[name] = json.loads(history.read_text(encoding="utf-8"))
    path = write_report(
        runs, histories, Path(args.out), dataset=params.data.dataset, validation_key=f"val_{SELECTION_METRIC}"
    )
    champion = best_run_by_test(params)
    print(f"wrote {path} ({len(runs)} runs); best run by {params.evaluate.split} t2a geometric mean: {champion}")
    if not args.no_register:
        version = register_champion(params, champion)
        if version:
            print(f"registered {champion} as champion (version {version})")
    return 0


if __name__ == "__main__":
    run(main)
