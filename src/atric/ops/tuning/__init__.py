"""Hyperparameter search with Optuna: one study, any number of workers, each trial a tracked run.

The space lives in ``params.yaml: tune.space`` (train.* names, validated by
atric.config.TuneParams before the storage is touched). Each trial is one run of the engine of
``src/train.py`` inside an MLflow run nested under one parent run per study; it reports the
validation ``t2a_geometric_mean`` after every epoch and is pruned when the pruner says so (a
diverged run, NaN loss, is pruned too: ``prune_reason``). Trials write under ``tune/<study>/``.

Workers run Optuna's own loop (``Study.optimize``) on an ``RDBStorage`` with heartbeats: a
worker killed mid-trial (even SIGKILL) has its trial marked FAIL by another worker after
``grace_period`` and a copy queued (``RetryHeartbeatStaleTrialCallback``); the copy resumes from
the failed trial's ``last.pt`` when that file is reachable (same machine or a shared ``tune/``),
and ends with the metrics an uninterrupted trial gets. SIGTERM/Ctrl-C fail the trial and queue it.

``--total-trials``: ``n_trials`` is the study's total. A worker counts the study's live trials
and creates its next one under one storage-wide lock (a file lock beside SQLite, an advisory
lock on PostgreSQL), so a fleet stops at exactly that total; workers with nothing left wait for
the running trials of others (they may still fail and be queued). Create the schema and study
once (``--create-only``) before starting many workers: concurrent first creation races.

Every storage call survives a database outage: it is retried with backoff for up to
``tune.storage_retry_seconds``, then the worker stops with one clear error.

Results (by every worker when it stops, or ``--report-only``): ``tune/<study>/best_params.yaml``
(the best trial's sampled values) with the ``dvc exp run -S ...`` command that reproduces the
best trial exactly, and ``tune/<study>/report/`` (history, importances, parallel coordinates).
"""


from __future__ import annotations

from atric.ops.tuning.common import (  # noqa: F401
    ALWAYS_IN_COMMAND,
    ATTR_BASE,
    ATTR_PARENT_RUN,
    ATTR_SPACE,
    ATTR_WORKERS,
    LIVE_STATES,
    LOCAL_KEYS,
    MLFLOW_STATUS,
    OBJECTIVE,
    TAG_ROLE,
    TAG_STATE,
    TAG_STUDY,
    TAG_TRIAL,
    WAIT_POLL_SECONDS,
    StaleTrialCallback,
    TuneError,
    mark_mlflow_run,
)
from atric.ops.tuning.results import (  # noqa: F401
    StudyResult,
    best_params,
    claim_report,
    dvc_command,
    has_complete_trial,
    write_report,
    write_results,
)
from atric.ops.tuning.storage import (  # noqa: F401
    ResilientStorage,
    is_outage,
    open_storage,
    redact,
    retrying,
    storage_lock,
    storage_url,
    study_dir,
    study_name_for,
)
from atric.ops.tuning.study import (  # noqa: F401
    base_params,
    build_pruner,
    build_sampler,
    create_study,
    load_study,
    suggest,
    trial_params,
    trial_run_name,
)
from atric.ops.tuning.worker import WorkerSummary, run_worker  # noqa: F401
