"""Per-trial overhead of the tuner (study, storage, MLflow logging) on SQLite, and trials/hour.

    python benchmarks/tune.py [--trials 20] [--epochs 1]

On the tiny fake layout of tests/fakes.py, in a temp dir: first ``--trials`` bare
``engine.train`` runs (the same params, restart), then one worker of the same number of
trials on a fresh SQLite study with the default space of params.yaml, MLflow on SQLite.
Both are warmed up first (imports, first-use costs are not per-trial). Overhead per trial =
(worker wall time - bare wall time) / trials; the pruner is off so every trial trains all
epochs, as the bare runs do. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import fakes  # noqa: E402

from atric import engine  # noqa: E402
from atric.ops import tuning  # noqa: E402
from atric.config import Params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give
    space = yaml.safe_load((ROOT / "params.yaml").read_text())["tune"]["space"]
    # The fake layout's tiny model: cluster counts of the default space scaled into its range.
    space["audio_clusters"] = {"type": "int", "low": 2, "high": 8}
    space["text_clusters"] = {"type": "int", "low": 2, "high": 8}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        fakes.write_fake_layout(root / "data")
        raw = fakes.tiny_params(root, epochs=args.epochs)
        raw["tune"] = {"space": space, "pruner": "none", "n_trials": args.trials, "study_name": "bench"}
        params = Params.model_validate(raw)

        engine.train(params, run_name="warmup", restart=True)
        start = time.perf_counter()
        for _ in range(args.trials):
            engine.train(params, run_name="bare", restart=True)
        bare = time.perf_counter() - start

        warm = params.model_copy(
            update={"tune": params.tune.model_copy(update={"n_trials": 1, "study_name": "w"})}
        )
        tuning.run_worker(warm)
        start = time.perf_counter()
        summary = tuning.run_worker(params)
        tuned = time.perf_counter() - start
        study = tuning.load_study(params)
        trial_seconds = [t.user_attrs["seconds"] for t in study.trials]

    per_trial = tuned / args.trials
    print(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "epochs_per_trial": args.epochs,
                "trials": args.trials,
                "states": summary.trials,
                "bare_train_seconds_per_run": round(bare / args.trials, 3),
                "tuned_seconds_per_trial": round(per_trial, 3),
                "overhead_seconds_per_trial": round(per_trial - bare / args.trials, 3),
                "train_tracked_seconds_per_trial": round(sum(trial_seconds) / len(trial_seconds), 3),
                "trials_per_hour": round(3600 / per_trial),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
