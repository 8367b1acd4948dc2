"""Check the MLflow UI in headless Chromium: the experiment page lists every run; save a screenshot.

    python src/ui_check.py [--out reports/mlflow_ui.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atric.cli import add_params_arguments, params_from_args, run
from atric.ops.tracking import RUN_ID_FILE
from atric.ops.ui_check import check_experiment_page


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_arguments(parser)
    parser.add_argument("--out", default="reports/mlflow_ui.png", help="screenshot path")
    args = parser.parse_args()
    params = params_from_args(args)
    runs = sorted(p.parent.name for p in Path(params.train.models_dir).glob(f"*/{RUN_ID_FILE}"))
    page = check_experiment_page(params.data.dataset, runs, Path(args.out))
    print(json.dumps({"page": page, "runs_listed": runs, "screenshot": args.out}))
    return 0


if __name__ == "__main__":
    run(main)
