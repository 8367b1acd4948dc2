"""Tuning fleet figures on PostgreSQL: trials/hour and lost work for 1, 2 and 4 workers, and
the tuner's overhead per trial.

    python benchmarks/tune.py [--trials 8] [--epochs 2] [--workers 1 2 4]

On the tiny fake layout of tests/fakes.py, in a temp dir, against a throwaway PostgreSQL
(atric.ops.services) and MLflow on SQLite. Per fleet size: a fresh study of ``--trials`` in total
(``--total-trials``), real ``src/tune.py`` processes started together; reported: wall time,
trials/hour, the exact total reached (no overshoot), and lost work (epochs trained by trials
that did not end COMPLETE/PRUNED: nothing is killed here, so any is a bug). Overhead per trial =
(1-worker seconds per trial - bare ``engine.train`` seconds per run), the pruner off so every
trial trains every epoch. Prints JSON with the machine's `uptime` load; the last run is kept in
benchmarks/results/tune.json (`python benchmarks/tune.py > benchmarks/results/tune.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import fakes  # noqa: E402

from atric.config import Params  # noqa: E402
from atric.engine import train  # noqa: E402
from atric.ops import services  # noqa: E402

SPACE = {
    "lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True},
    "margin": {"type": "float", "low": 0.05, "high": 0.5},
}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def fleet(root: Path, env: dict[str, str], url: str, workers: int, trials: int) -> dict[str, object]:
    import optuna

    name = f"bench-{workers}"
    # The URL (with its password) goes by environment, never on a command line a failure prints.
    env = {**env, "ATRIC_OPTUNA_STORAGE": url}
    args = [sys.executable, str(ROOT / "src" / "tune.py"), "--n-trials", str(trials), "--total-trials",
            "--study-name", name]  # fmt: skip
    # --create-only and --no-report are one mutually exclusive mode: the study first, then the fleet.
    created = subprocess.run([*args, "--create-only"], cwd=root, env=env, capture_output=True, text=True)
    if created.returncode:
        raise SystemExit(f"--create-only exited {created.returncode}:\n{created.stderr[-2000:]}")
    args.append("--no-report")
    start = time.perf_counter()
    procs = [subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(workers)]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"worker exited {proc.returncode}:\n{err[-2000:]}")
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=url)
    states: dict[str, int] = {}
    lost = 0
    for trial in study.trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
        if trial.state.name not in ("COMPLETE", "PRUNED"):
            lost += len(trial.intermediate_values)
    seconds = [t.user_attrs["seconds"] for t in study.trials if "seconds" in t.user_attrs]
    return {
        "workers": workers,
        "wall_seconds": round(wall, 2),
        "trials": len(study.trials),
        "exact_total": states.get("COMPLETE", 0) + states.get("PRUNED", 0) == trials == len(study.trials),
        "states": states,
        "trials_per_hour": round(3600 * trials / wall),
        "mean_trial_seconds": round(sum(seconds) / len(seconds), 3),
        "lost_epochs": lost,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        state = root / "pg"
        state.mkdir()
        root.chmod(0o711)
        state.chmod(0o711)  # as root, PostgreSQL runs as user postgres: it must enter this dir
        settings = services.Settings.generate(state)
        server = services.Postgres(settings)
        server.start()
        try:
            fakes.write_fake_layout(root / "data")
            raw = fakes.tiny_params(root, epochs=args.epochs)
            raw["train"]["models_dir"], raw["train"]["metrics_dir"] = "models", "metrics"
            raw["tune"] = {"space": SPACE, "pruner": "none", "sampler": "random", "heartbeat_interval": 5}
            fakes.write_params(root / "params.yaml", raw)
            env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
                   "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}  # fmt: skip
            os.chdir(root)
            params = Params.model_validate(raw)
            train(params, run_name="warmup", restart=True)
            start = time.perf_counter()
            for _ in range(args.trials):
                train(params, run_name="bare", restart=True)
            bare = (time.perf_counter() - start) / args.trials
            url = settings.pg_url(services.OPTUNA_DB)
            results = [fleet(root, env, url, n, args.trials) for n in args.workers]
        finally:
            server.stop(kill=True)
            os.chdir(ROOT)
            shutil.rmtree(state, ignore_errors=True)
    one = next((r for r in results if r["workers"] == 1), None)
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "uptime_before": load_before,
        "uptime_after": uptime(),
        "storage": "postgresql (throwaway, 127.0.0.1)",
        "epochs_per_trial": args.epochs,
        "trials_per_study": args.trials,
        "bare_train_seconds_per_run": round(bare, 3),
        "fleets": results,
        # Trial time inside a worker minus the bare engine run: study, storage, MLflow per trial.
        "overhead_seconds_per_trial": round(one["mean_trial_seconds"] - bare, 3) if one else None,
        # Whole-process cost per trial at 1 worker (imports, joining the study, MLflow parent run).
        "worker_wall_seconds_per_trial_1": round(one["wall_seconds"] / args.trials, 3) if one else None,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
