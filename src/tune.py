"""Hyperparameter search: Optuna trials of the training run, per `params.yaml: tune`.

    python src/tune.py [--n-trials 20 [--total-trials]] [--timeout SECONDS]
                       [--study-name NAME] [--storage sqlite:///tune/optuna.db | postgresql+psycopg2://...]
                       [--expert logmel] [--pooling netrvlad] [--sampler tpe|random]
                       [--pruner median|hyperband|none] [--set train.epochs=10]
    python src/tune.py --create-only     # create schema + study once, before starting many workers
    python src/tune.py --report-only     # rewrite best_params.yaml and the plots from the storage
    python src/tune.py --no-report ...   # a fleet worker: trials and best_params.yaml, no plots

Writes tune/<study>/best_params.yaml, tune/<study>/report/*.png|html and prints the
`dvc exp run -S ...` command that reproduces the best trial from params.yaml.
Live view: optuna-dashboard sqlite:///tune/optuna.db
See atric.ops.tuning for many workers, heartbeats and retries.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from atric.cli import add_params_arguments, add_run_arguments, params_from_args, run, run_overrides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_arguments(parser)
    parser.add_argument("--study-name", help="tune.study_name (default <dataset>-<expert>-<pooling>)")
    parser.add_argument(
        "--storage",
        help="tune.storage, e.g. sqlite:///tune/optuna.db (env ATRIC_OPTUNA_STORAGE beats tune.storage)",
    )
    parser.add_argument(
        "--n-trials", type=int, help="tune.n_trials: trials of this worker (see --total-trials)"
    )
    parser.add_argument(
        "--total-trials",
        action="store_true",
        default=None,
        help="--n-trials is the study's total over all workers: the fleet stops together",
    )
    parser.add_argument("--timeout", type=float, help="tune.timeout: seconds after which no trial starts")
    add_run_arguments(parser)
    parser.add_argument("--sampler", choices=["tpe", "random"], help="tune.sampler (default tpe, seeded)")
    parser.add_argument(
        "--pruner", choices=["median", "hyperband", "none"], help="tune.pruner (default median)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--create-only", action="store_true", help="create the storage schema and the study, then stop"
    )
    mode.add_argument(
        "--report-only", action="store_true", help="write best_params.yaml and the report, then stop"
    )
    mode.add_argument(
        "--no-report",
        action="store_true",
        help="skip the plots after the trials (a fleet draws them once: --report-only)",
    )
    args = parser.parse_args()

    extra = run_overrides(args)
    for flag, key in [
        ("study_name", "tune.study_name"),
        ("storage", "tune.storage"),
        ("n_trials", "tune.n_trials"),
        ("total_trials", "tune.total_trials"),
        ("timeout", "tune.timeout"),
        ("sampler", "tune.sampler"),
        ("pruner", "tune.pruner"),
    ]:
        value = getattr(args, flag)
        if value is not None:
            extra.append(f"{key}={json.dumps(value)}")
    if args.storage is None and os.environ.get("ATRIC_OPTUNA_STORAGE"):
        # The compose file's workers get the shared storage from the environment.
        extra.append(f"tune.storage={json.dumps(os.environ['ATRIC_OPTUNA_STORAGE'])}")
    params = params_from_args(args, extra)  # validates tune.space before the storage is touched
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)

    from atric.config import load_params
    from atric.ops import tuning

    if args.create_only:
        study = tuning.create_study(params)
        print(f"study {study.study_name} ready in {tuning.redact(tuning.storage_url(params))} "
              f"({len(study.trials)} trials)")  # fmt: skip
        return 0
    if not args.report_only:
        summary = tuning.run_worker(params)
        print(f"worker {summary.worker}: {summary.trials or 'no trials'} in {summary.seconds:.1f}s")
    study = tuning.load_study(params)
    if not args.report_only and not tuning.has_complete_trial(study):
        print("no complete trial yet: no best_params.yaml or report")
        return 0
    plots = args.report_only or (not args.no_report and tuning.claim_report(params, study))
    # The dvc command starts from params.yaml as on disk: every --set of this run goes into it.
    result = tuning.write_results(params, study, plots=plots, baseline=load_params(args.params))
    print(
        f"best trial {result.best_trial}: {tuning.OBJECTIVE} {result.best_value:.4f} -> {result.best_params}"
    )
    if plots:
        print(f"report: {result.best_params.parent / 'report'}")
    print(result.command)
    return 0


if __name__ == "__main__":
    run(main)
