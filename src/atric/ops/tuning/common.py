"""Names every tuning module shares: the objective, attribute and tag keys, errors, MLflow run marking."""

from __future__ import annotations

import logging
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from atric.engine import SELECTION_METRIC
from atric.errors import AtricError
from atric.ops import tracking

log = logging.getLogger("atric.ops.tuning")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, retries


OBJECTIVE = f"val_{SELECTION_METRIC}"  # the engine's per-epoch row key; maximised
LIVE_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
ATTR_SPACE = "atric.space"  # study user attrs
ATTR_BASE = "atric.base_params"
ATTR_PARENT_RUN = "atric.mlflow_parent_run_id"
ATTR_WORKERS = "atric.workers_started"
TAG_STUDY, TAG_STATE, TAG_TRIAL, TAG_ROLE = "optuna.study_name", "optuna.state", "optuna.trial_number", "atric.tune"
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
WAIT_POLL_SECONDS = 5.0
# Params that may differ between the workers of one study (paths, hardware); the rest must match.
LOCAL_KEYS = frozenset(
    {"data.root", "train.device", "train.num_workers", "train.cache_in_ram", "train.models_dir",
     "train.metrics_dir", "train.poolings"}
)  # fmt: skip
ALWAYS_IN_COMMAND = ("train.experts", "train.pooling", "train.epochs")


class TuneError(AtricError):
    """The study cannot be created, joined, reached or reported."""


class _TrialFailed(Exception):
    """A bad point (the reason is in the trial's ``fail_reason``): FAIL, and the worker goes on."""


# --------------------------------------------------------------------------- MLflow


def mark_mlflow_run(run_id: str | None, state: str, status: str | None = None) -> None:
    """Tag a trial's MLflow run with its Optuna state; pruned runs end KILLED, failed FAILED."""
    if not run_id:
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        tracking.configure()
        client = MlflowClient()
        client.set_tag(run_id, TAG_STATE, state)
        # tracked_run already ended it FINISHED (complete) or FAILED (any exception).
        if status or state == "PRUNED":
            client.set_terminated(run_id, status=status or MLFLOW_STATUS[state])
    except MlflowException as exc:  # tracking trouble must not lose the Optuna result
        log.warning("MLflow run %s: cannot mark %s: %s", run_id, state, exc.message)


class StaleTrialCallback:
    """Queue a copy of a trial whose worker stopped sending heartbeats; mark its MLflow run FAILED."""

    def __init__(self, retry: optuna.storages.RetryHeartbeatStaleTrialCallback) -> None:
        self.retry = retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        log.warning("trial %d: its worker stopped sending heartbeats; marked FAIL, retrying", trial.number)
        self.retry(study, trial)
        mark_mlflow_run(trial_mlflow_run_id(study.study_name, trial.number), "FAIL", status="FAILED")


def trial_run_tags(study_name: str, number: int) -> dict[str, str]:
    """The MLflow tags of a trial's run (set when it opens; they find it from any worker)."""
    return {TAG_STUDY: study_name, TAG_TRIAL: str(number), TAG_ROLE: "trial"}


def trial_mlflow_run_id(study_name: str, number: int) -> str | None:
    """The MLflow run of a trial, found by the tags it gets when it opens (from any worker)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        tracking.configure()
        client = MlflowClient()
        experiments = [e.experiment_id for e in client.search_experiments()]
        query = " and ".join(
            f"tags.`{key}` = '{value}'" for key, value in trial_run_tags(study_name, number).items()
        )
        found = client.search_runs(experiments, filter_string=query, max_results=1)
    except MlflowException as exc:  # tracking trouble must not stop the retry
        log.warning("trial %d: cannot look up its MLflow run: %s", number, exc.message)
        return None
    return found[0].info.run_id if found else None


