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

import contextlib
import json
import logging
import os
import shlex
import shutil
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from atric.atomic import atomic_path, write_text_atomic
from atric.config import CategoricalDistribution, FloatDistribution, IntDistribution, Params, TuneParams, flatten
from atric.engine import SELECTION_METRIC, RunPaths, run_name_for
from atric.errors import AtricError, ConfigError
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


# --------------------------------------------------------------------------- storage


def study_name_for(params: Params) -> str:
    """``tune.study_name``, else ``<dataset>-<expert>-<pooling>``."""
    return params.tune.study_name or f"{params.data.dataset}-{run_name_for(params.train)}"


def storage_url(params: Params) -> str:
    """``tune.storage`` (src/tune.py fills it from ``--storage``, else ``ATRIC_OPTUNA_STORAGE``)."""
    return _normalise_url(params.tune.storage)


def study_dir(params: Params) -> Path:
    return Path(params.tune.dir) / study_name_for(params)


def redact(url: str) -> str:
    """The URL without its password, for logs and MLflow tags."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: say nothing about it
        return url.split("@")[-1]


def _normalise_url(url: str) -> str:
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the project ships psycopg2.
    if url.startswith("postgresql://"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///") or url in ("sqlite://", "sqlite:///:memory:"):
        return None
    return Path(url.removeprefix("sqlite:///"))


# Words of the driver errors that mean "the database is unreachable now", not "bad request".
_OUTAGE_WORDS = ("connect", "closed", "terminat", "shutting down", "starting up", "recovery mode",
                 "database is locked", "timeout", "timed out", "reset by peer", "broken pipe", "ssl")  # fmt: skip


def is_outage(exc: BaseException) -> bool:
    import sqlalchemy.exc as sa

    seen: BaseException | None = exc
    while seen is not None:  # Optuna wraps driver errors in StorageInternalError
        if isinstance(seen, sa.DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, (sa.OperationalError, sa.InterfaceError)):
            return any(word in str(seen).lower() for word in _OUTAGE_WORDS)
        seen = seen.__cause__
    return False


def retrying(call: Callable[[], Any], *, what: str, seconds: float) -> Any:
    """``call()``, retried with backoff while the database is out, for up to ``seconds``."""
    deadline, pause, warned = time.monotonic() + seconds, 0.25, False
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_outage(exc):
                raise
            reason = str(getattr(exc, "orig", None) or exc.__cause__ or exc).strip().splitlines()[0]
            if time.monotonic() + pause > deadline:
                raise TuneError(
                    f"{what}: unreachable for {seconds:.0f} s ({reason}); check the database, "
                    "or raise tune.storage_retry_seconds"
                ) from exc
            if not warned:
                log.warning("%s: unreachable (%s); retrying for up to %.0f s", what, reason, seconds)
                warned = True
            time.sleep(pause)
            pause = min(pause * 2, 4.0)


_IN_CALL = threading.local()


class ResilientStorage(optuna.storages.RDBStorage):
    """An ``RDBStorage`` whose every call (Optuna's own included: ask, report, tell, heartbeats)
    is one transaction retried through a database outage (see :func:`retrying`). Only the
    outermost call of a thread retries, so nested calls do not multiply the bound."""

    def __init__(self, url: str, *, retry_seconds: float, **kwargs: Any) -> None:
        self.retry_what, self.retry_seconds = f"storage {redact(url)}", retry_seconds
        super().__init__(url, **kwargs)

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name.startswith("__") or not callable(value) or not hasattr(value, "__self__"):
            return value
        if getattr(_IN_CALL, "active", False):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            _IN_CALL.active = True
            try:
                return retrying(
                    lambda: value(*args, **kwargs), what=self.retry_what, seconds=self.retry_seconds
                )
            finally:
                _IN_CALL.active = False

        return call


def open_storage(url: str, tune: TuneParams, *, create_tables: bool = True) -> ResilientStorage:
    """The study's storage: heartbeats, retry of stale trials, outages survived.

    ``create_tables=False`` skips schema creation (only the locked creator runs that racy path).
    """
    url = _normalise_url(url)
    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}  # several writers, one file
    elif url.startswith("sqlite"):
        engine_kwargs = {}
    else:
        # Connections idle through a long trial may have been dropped by the server or a proxy.
        engine_kwargs = {"pool_pre_ping": True, "pool_recycle": 1800}
    interval = tune.heartbeat_interval
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(tune.max_retry, inherit_intermediate_values=True)
    try:
        return ResilientStorage(
            url,
            retry_seconds=tune.storage_retry_seconds,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=interval,
            grace_period=(tune.grace_period or 2 * interval) if interval else None,
            heartbeat_stale_trial_callback=_StaleTrialCallback(retry) if interval else None,
            skip_table_creation=not create_tables,
        )
    except ImportError as exc:
        raise TuneError(f"storage {redact(url)}: driver missing: {exc}") from exc
    except TuneError:
        raise
    except Exception as exc:  # SQLAlchemy errors etc.: one clear line
        raise TuneError(f"storage {redact(url)}: cannot open: {str(exc).splitlines()[0]}") from exc


@contextlib.contextmanager
def storage_lock(url: str, name: str, retry_seconds: float = 0.0) -> Iterator[None]:
    """One lock for every worker of a storage: a file lock beside a SQLite file, a PostgreSQL
    advisory lock (the server releases it if the holder dies), none otherwise."""
    url = _normalise_url(url)
    path = _sqlite_path(url)
    if path is not None:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            yield
        return
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy

    key = zlib.crc32(f"atric.tune:{name}".encode())

    def connect() -> Any:
        conn = _lock_engine(url).connect()
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        return conn

    try:
        conn = retrying(connect, what=f"storage {redact(url)}", seconds=retry_seconds)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise TuneError(f"storage {redact(url)}: cannot connect: {reason}") from exc
    try:
        yield
    finally:
        with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):  # a restart already released it
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
        conn.close()


_LOCK_ENGINES: dict[str, Any] = {}


def _lock_engine(url: str) -> Any:
    import sqlalchemy

    if url not in _LOCK_ENGINES:
        _LOCK_ENGINES[url] = sqlalchemy.create_engine(url, pool_pre_ping=True, pool_size=1)
    return _LOCK_ENGINES[url]


# --------------------------------------------------------------------------- the study


def _space_doc(tune: TuneParams) -> dict[str, Any]:
    return {key: dim.model_dump(exclude_none=True) for key, dim in sorted(tune.space.items())}


def base_params(params: Params) -> dict[str, Any]:
    """What every trial of the study shares: the flattened data/features/text/train params."""
    data = params.model_dump()
    flat = flatten({s: data[s] for s in ("data", "features", "text", "train")})
    return {k: v for k, v in sorted(flat.items()) if k not in LOCAL_KEYS}


def build_sampler(tune: TuneParams, worker: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded from ``tune.seed`` plus the worker's number: workers sharing a seed would draw the
    same random start-up points."""
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=tune.seed + worker)
    return optuna.samplers.TPESampler(seed=tune.seed + worker)


def build_pruner(tune: TuneParams, epochs: int) -> optuna.pruners.BasePruner:
    if tune.pruner == "none":
        return optuna.pruners.NopPruner()
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, tune.warmup_epochs), max_resource=epochs)
    # Optuna prunes at step >= n_warmup_steps; steps are 1-based epochs.
    return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=tune.warmup_epochs + 1)


def create_study(params: Params, *, worker: int = 0) -> optuna.Study:
    """Create or load the study, race-free (schema, study and MLflow experiment under
    :func:`storage_lock`). A study of another ``tune.space`` or other base params is refused:
    its trials would not be comparable."""
    tune, name, url = params.tune, study_name_for(params), storage_url(params)
    sampler, pruner = build_sampler(tune, worker), build_pruner(tune, params.train.epochs)
    with storage_lock(url, "schema", tune.storage_retry_seconds):
        storage = open_storage(url, tune)
        try:
            study = optuna.create_study(
                storage=storage, study_name=name, direction="maximize", sampler=sampler, pruner=pruner
            )
            study.set_user_attr(ATTR_SPACE, _space_doc(tune))
            study.set_user_attr(ATTR_BASE, base_params(params))
            log.info("study %s created in %s", name, redact(url))
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        # A fresh local MLflow store races the same way (alembic migrations): create it here too.
        tracking.configure()
        tracking.experiment_id(params.data.dataset)
    saved = study.user_attrs.get(ATTR_SPACE)
    if saved is not None and saved != _space_doc(tune):
        raise ConfigError(
            f"study {name!r} in {redact(url)} was created with another tune.space "
            f"({json.dumps(saved)}); use another --study-name or restore that space"
        )
    base, mine = study.user_attrs.get(ATTR_BASE, {}), base_params(params)
    differing = sorted(k for k in base.keys() | mine.keys() if base.get(k) != mine.get(k))
    if base and differing:
        raise ConfigError(
            f"study {name!r} in {redact(url)} was created with other params: "
            + ", ".join(f"{k}={base.get(k)!r} (here {mine.get(k)!r})" for k in differing)
            + "; use another --study-name or the same params"
        )
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(f"study {name!r}: direction must be maximize (it holds {SELECTION_METRIC})")
    return study


def load_study(params: Params) -> optuna.Study:
    url = storage_url(params)
    storage = open_storage(url, params.tune, create_tables=False)
    try:
        return optuna.load_study(study_name=study_name_for(params), storage=storage)
    except KeyError as exc:
        raise TuneError(f"no study {study_name_for(params)!r} in {redact(url)}") from exc


# --------------------------------------------------------------------------- MLflow


def _parent_run_id(params: Params, study: optuna.Study) -> str:
    """The study's MLflow parent run: recorded in the study, else found by tag, else created
    (under the study's lock: two workers joining at once make one parent run)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking.configure()
    client = MlflowClient()
    exp_id = tracking.experiment_id(params.data.dataset)
    with storage_lock(storage_url(params), study.study_name, params.tune.storage_retry_seconds):
        recorded = study.user_attrs.get(ATTR_PARENT_RUN)
        if recorded:
            with contextlib.suppress(MlflowException):
                if client.get_run(recorded).info.experiment_id == exp_id:
                    return str(recorded)
        found = client.search_runs(
            [exp_id],
            filter_string=f"tags.`{TAG_STUDY}` = '{study.study_name}' and tags.`{TAG_ROLE}` = 'study'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {TAG_STUDY: study.study_name, TAG_ROLE: "study", "git_commit": tracking.git_commit(),
                    "optuna.storage": redact(storage_url(params))}  # fmt: skip
            run_id = client.create_run(exp_id, run_name=f"tune-{study.study_name}", tags=tags).info.run_id
            tune = params.tune
            for key, value in {"tune.sampler": tune.sampler, "tune.pruner": tune.pruner, "tune.seed": tune.seed,
                               "tune.space": json.dumps(_space_doc(tune)), "train.epochs": params.train.epochs}.items():  # fmt: skip
                client.log_param(run_id, key, str(value)[:6000])
        study.set_user_attr(ATTR_PARENT_RUN, run_id)
        return run_id


def _mark_mlflow_run(run_id: str | None, state: str, status: str | None = None, tags: Mapping[str, str] = {}) -> None:
    """Tag a trial's MLflow run with its Optuna state; pruned runs end KILLED, failed FAILED."""
    if not run_id:
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        tracking.configure()
        client = MlflowClient()
        for key, value in {**tags, TAG_STATE: state}.items():
            client.set_tag(run_id, key, value)
        # tracked_run already ended it FINISHED (complete) or FAILED (any exception).
        if status or state == "PRUNED":
            client.set_terminated(run_id, status=status or MLFLOW_STATUS[state])
    except MlflowException as exc:  # tracking trouble must not lose the Optuna result
        log.warning("MLflow run %s: cannot mark %s: %s", run_id, state, exc.message)


class _StaleTrialCallback:
    """Queue a copy of a trial whose worker stopped sending heartbeats; mark its MLflow run FAILED."""

    def __init__(self, retry: optuna.storages.RetryHeartbeatStaleTrialCallback) -> None:
        self.retry = retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        log.warning("trial %d: its worker stopped sending heartbeats; marked FAIL, retrying", trial.number)
        self.retry(study, trial)
        _mark_mlflow_run(trial.user_attrs.get("mlflow_run_id"), "FAIL", status="FAILED")


# --------------------------------------------------------------------------- one trial


def suggest(trial: optuna.Trial, tune: TuneParams) -> dict[str, Any]:
    """The trial's values for every dimension of ``tune.space`` (train.* names)."""
    values: dict[str, Any] = {}
    for key, dim in tune.space.items():
        if isinstance(dim, FloatDistribution):
            values[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log, step=dim.step)
        elif isinstance(dim, IntDistribution):
            values[key] = trial.suggest_int(key, dim.low, dim.high, log=dim.log, step=dim.step)
        elif isinstance(dim, CategoricalDistribution):
            values[key] = trial.suggest_categorical(key, dim.choices)
    return values


def trial_params(params: Params, values: Mapping[str, Any]) -> Params:
    """``params`` with the trial's train.* values, writing under ``tune/<study>/``."""
    base = study_dir(params)
    raw = params.model_dump()
    raw["train"].update(values, models_dir=str(base / "models"), metrics_dir=str(base / "metrics"))
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"trial values {dict(values)} are not valid params: {exc.errors()[0]['msg']}") from exc


def trial_run_name(params: Params, number: int) -> str:
    return f"{run_name_for(params.train)}-trial{number}"


class _Reporter:
    """Engine callback: report each epoch's objective; prune when the pruner says so."""

    def __init__(self, trial: optuna.Trial, study_name: str) -> None:
        self.trial, self.study_name, self.run_id = trial, study_name, None

    def on_epoch_end(self, epoch: int, row: Mapping[str, float]) -> None:
        import mlflow

        if self.run_id is None and mlflow.active_run() is not None:
            # In the study, so that a worker retrying this trial can mark its run.
            self.run_id = mlflow.active_run().info.run_id
            self.trial.set_user_attr("mlflow_run_id", self.run_id)
            mlflow.set_tags({TAG_STUDY: self.study_name, TAG_TRIAL: str(self.trial.number), TAG_ROLE: "trial"})
        self.trial.report(float(row[OBJECTIVE]), epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: {OBJECTIVE} {row[OBJECTIVE]:.3f}")

    def on_train_end(self, result: Any) -> None:
        # A resumed trial inherits the failed one's reports; an epoch trained but not reported
        # before the kill is in the checkpoint's history: report it too.
        reported = {step for step in _frozen(self.trial).intermediate_values}
        for row in result.history:
            if int(row["epoch"]) not in reported:
                self.trial.report(float(row[OBJECTIVE]), int(row["epoch"]))


def _frozen(trial: optuna.Trial) -> FrozenTrial:
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def _resume_from_failed(params: Params, trial: optuna.Trial, run_params: Params) -> int | None:
    """A retried trial continues its failed attempt: copy the newest ``last.pt`` of its retry
    history into this trial's run folder (the engine then resumes it exactly). Returns the
    number of the trial resumed, None when none left a reachable checkpoint."""
    history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(_frozen(trial))
    target = RunPaths.of(run_params.train, trial_run_name(params, trial.number)).last
    for number in reversed(history):
        source = RunPaths.of(run_params.train, trial_run_name(params, number)).last
        if source.exists():
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
            log.info("trial %d resumes trial %d from %s", trial.number, number, source)
            return number
    if history:
        log.info("trial %d: no checkpoint of trials %s here: starting over", trial.number, history)
    return None


def _diverged(exc: AtricError) -> bool:
    """The engine's NaN/inf errors (loss or similarities): a bad point, pruned, not failed."""
    text = str(exc)
    return "NaN" in text or "loss is nan" in text or "loss is inf" in text or "loss is -inf" in text


# --------------------------------------------------------------------------- workers


@dataclass
class WorkerSummary:
    study_name: str
    worker: int
    trials: dict[str, int] = field(default_factory=dict)  # this worker's trials by final state
    seconds: float = 0.0


class _Worker:
    """One worker's ``Study.optimize``: the objective, the budget gate and the failure count."""

    def __init__(self, params: Params, study: optuna.Study, summary: WorkerSummary) -> None:
        self.params, self.study, self.summary = params, study, summary
        self.tune = params.tune
        self.lock: contextlib.ExitStack | None = None
        self.failures, self.current, self.exhausted = 0, None, False

    # The exact total: counting live trials and creating the next one form one step for the whole
    # fleet. The lock is taken before optimize asks for a trial (first, then in the callback after
    # each trial) and released by the objective, once the new trial exists.
    def open_gate(self) -> bool:
        self.lock = contextlib.ExitStack()
        self.lock.enter_context(
            storage_lock(storage_url(self.params), self.study.study_name, self.tune.storage_retry_seconds)
        )
        optuna.storages.fail_stale_trials(self.study)  # a dead worker's trial is queued, not counted
        trials = self.study.get_trials(deepcopy=False, states=LIVE_STATES)
        if any(t.state == TrialState.WAITING for t in trials) or len(trials) < self.tune.n_trials:
            return True
        self.close_gate()
        self.exhausted = True
        return False

    def close_gate(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.summary.trials[trial.state.name] = self.summary.trials.get(trial.state.name, 0) + 1
        self.failures = self.failures + 1 if trial.state == TrialState.FAIL else 0
        if self.failures >= self.tune.max_failures:
            raise TuneError(
                f"{self.failures} trials in a row failed (see the log above and the trials' "
                "fail_reason); stopping this worker"
            )
        if self.tune.total_trials and not self.open_gate():
            study.stop()

    def objective(self, trial: optuna.Trial) -> float:
        from atric.ops.experiment import train_tracked

        self.close_gate()
        self.current = trial.number
        run_name = trial_run_name(self.params, trial.number)
        trial.set_user_attr("run_name", run_name)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        reporter = _Reporter(trial, self.study.study_name)
        state, status, started = "FAIL", None, time.perf_counter()
        try:
            run_params = trial_params(self.params, suggest(trial, self.tune))
            resumed = _resume_from_failed(self.params, trial, run_params)
            if resumed is not None:
                trial.set_user_attr("resumed_trial", resumed)
            result = train_tracked(run_params, run_name=run_name, policy="auto", stage="tune",
                                   callbacks=[reporter], nested=True, log_model=False)  # fmt: skip
            state = "COMPLETE"
            RunPaths.of(run_params.train, run_name).last.unlink(missing_ok=True)  # best.pt is kept
            return float(result.best_score)
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except TuneError:
            raise  # the storage is out: this worker stops
        except AtricError as exc:
            if _diverged(exc):
                state = "PRUNED"
                trial.set_user_attr("prune_reason", str(exc)[:2000])
                raise optuna.TrialPruned(f"diverged: {exc}") from exc
            trial.set_user_attr("fail_reason", str(exc)[:2000])
            raise _TrialFailed(str(exc)) from exc
        except KeyboardInterrupt:
            status = "KILLED"
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 3))
            run_id, tags = reporter.run_id, {}
            if run_id is None:  # stopped before its first epoch ended: the run is in its folder
                with contextlib.suppress(OSError, ValueError, KeyError):
                    run_dir = Path(self.params.tune.dir, self.study.study_name, "models", run_name)
                    run_id = json.loads((run_dir / tracking.RUN_ID_FILE).read_text())["run_id"]
                    tags = {TAG_STUDY: self.study.study_name, TAG_TRIAL: str(trial.number), TAG_ROLE: "trial"}
            _mark_mlflow_run(run_id, state, status, tags)

    def requeue_interrupted(self) -> None:
        """A preempted worker (docker stop, Ctrl-C) hands its trial back to the fleet."""
        frozen = next((t for t in self.study.get_trials(deepcopy=False) if t.number == self.current), None)
        if frozen is not None and frozen.state == TrialState.FAIL and self.tune.max_retry:
            optuna.storages.RetryHeartbeatStaleTrialCallback(
                self.tune.max_retry, inherit_intermediate_values=True
            )(self.study, frozen)


def _join_study(params: Params) -> tuple[optuna.Study, int]:
    """Create or load the study and take this worker's number (seeds the sampler)."""
    study = create_study(params)
    with storage_lock(storage_url(params), study.study_name, params.tune.storage_retry_seconds):
        worker = int(study.user_attrs.get(ATTR_WORKERS, 0))
        study.set_user_attr(ATTR_WORKERS, worker + 1)
    if worker:
        study.sampler = build_sampler(params.tune, worker)
    return study, worker


def run_worker(params: Params) -> WorkerSummary:
    """Run trials until the budget (per worker, or the study total) or the timeout is spent."""
    import mlflow

    tune = params.tune
    study, number = _join_study(params)
    summary = WorkerSummary(study.study_name, number)
    worker = _Worker(params, study, summary)
    parent = _parent_run_id(params, study)
    started = time.monotonic()
    log.info("worker %d on study %s (%s): %d trials%s", number, study.study_name, redact(storage_url(params)),
             tune.n_trials, " in total" if tune.total_trials else "")  # fmt: skip
    mlflow.start_run(run_id=parent)
    status = "FAILED"
    try:
        with contextlib.ExitStack() as stack:
            if threading.current_thread() is threading.main_thread():
                # SIGTERM (docker stop, schedulers) ends a worker as Ctrl-C does: FAIL + retry queued.
                stack.enter_context(tracking._terminate_as_interrupt())
            stack.callback(worker.close_gate)
            while True:
                left = tune.timeout - (time.monotonic() - started) if tune.timeout else None
                if left is not None and left <= 0:
                    break
                if tune.total_trials and not worker.open_gate():
                    # Total reached, but a running trial may still fail (its worker dies) and be
                    # queued again: wait while others run, if heartbeats can tell.
                    if tune.heartbeat_interval and study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                        time.sleep(min(WAIT_POLL_SECONDS, float(tune.heartbeat_interval)))
                        continue
                    break
                worker.exhausted = False
                try:
                    study.optimize(
                        worker.objective,
                        n_trials=None if tune.total_trials else tune.n_trials,
                        timeout=left,
                        catch=(_TrialFailed,),
                        callbacks=[worker.after_trial],
                        gc_after_trial=False,
                    )
                except KeyboardInterrupt:
                    worker.requeue_interrupted()
                    raise
                finally:
                    worker.close_gate()
                if not worker.exhausted:
                    break  # per-worker budget or timeout spent
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        summary.seconds = time.monotonic() - started
        with contextlib.suppress(Exception):
            _log_study_summary(study)
        mlflow.end_run(status=status)
    return summary


def _log_study_summary(study: optuna.Study) -> None:
    import mlflow

    trials = study.get_trials(deepcopy=False)
    metrics = {f"trials_{s.name.lower()}": float(sum(t.state == s for t in trials))
               for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}  # fmt: skip
    if metrics["trials_complete"]:
        metrics[f"best_{OBJECTIVE}"] = float(study.best_value)
    mlflow.log_metrics(metrics, step=len(trials))


# --------------------------------------------------------------------------- results


def has_complete_trial(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def best_params(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """The best trial's sampled values in params.yaml key form: ``{"train": {"lr": ...}}``."""
    return {"train": dict(study.best_trial.params)}


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def dvc_command(study: optuna.Study, baseline: Params | None = None) -> str:
    """``dvc exp run -S ...`` that trains exactly the best trial from ``baseline`` (params.yaml as
    on disk): its sampled values, the study's expert/pooling/epochs, and every other param in
    which the study's base differs from the baseline (``--set`` flags of the workers)."""
    wanted = {**study.user_attrs.get(ATTR_BASE, {}), **{f"train.{k}": v for k, v in study.best_trial.params.items()}}
    current = base_params(baseline) if baseline is not None else {}
    keys = {f"train.{k}" for k in study.best_trial.params} | {k for k in ALWAYS_IN_COMMAND if k in wanted}
    keys |= {k for k, v in wanted.items() if k in current and current[k] != v}
    parts = ["dvc", "exp", "run"]
    for key in sorted(keys):
        parts += ["-S", f"{key}={_yaml_value(wanted[key])}"]
    return shlex.join(parts)


@dataclass
class StudyResult:
    best_params: Path
    command: str
    report: list[Path]
    best_value: float
    best_trial: int


def claim_report(params: Params, study: optuna.Study) -> bool:
    """Whether this worker should draw the plots: not when a worker on this machine and folder
    drew them for the same finished trials (``--report-only`` redraws them anyway)."""
    key = f"atric.reported:{socket.gethostname()}:{study_dir(params).resolve()}"
    with storage_lock(storage_url(params), study.study_name, params.tune.storage_retry_seconds):
        finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))
        if study.user_attrs.get(key) == finished:
            return False
        study.set_user_attr(key, finished)
        return True


def write_results(
    params: Params, study: optuna.Study | None = None, *, plots: bool = True, baseline: Params | None = None
) -> StudyResult:
    """best_params.yaml, the dvc command (from ``baseline``, params.yaml as on disk) and the
    report, under ``tune/<study>/``."""
    study = study or load_study(params)
    if not has_complete_trial(study):
        raise TuneError(f"study {study.study_name!r}: no complete trial yet: nothing to report")
    best, command, trial = best_params(study), dvc_command(study, baseline), study.best_trial
    out = study_dir(params)
    header = (
        f"# Best trial {trial.number} of study {study.study_name}: {OBJECTIVE} = {trial.value:.4f}\n"
        f"# Merge into params.yaml, or reproduce it exactly as a DVC experiment:\n#   {command}\n"
    )
    path = out / "best_params.yaml"
    write_text_atomic(path, header + yaml.safe_dump(best, sort_keys=True))
    report = write_report(study, out / "report") if plots else []
    return StudyResult(path, command, report, float(trial.value), trial.number)


def write_report(study: optuna.Study, directory: Path) -> list[Path]:
    """Optimisation history, parameter importances (>= 2 distinct complete trials) and parallel
    coordinates: PNG via matplotlib, HTML via plotly (one plotly.min.js beside them, offline)."""
    import matplotlib

    matplotlib.use("Agg")  # workers have no display
    import matplotlib.pyplot as plt
    from optuna import visualization
    from optuna.visualization import matplotlib as mpl_vis

    directory.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = ["optimization_history", "parallel_coordinate"]
    if len({json.dumps(t.params, sort_keys=True) for t in complete}) >= 2 and study.best_trial.params:
        plots.insert(1, "param_importances")
    written: list[Path] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # notes on degenerate studies (flat axes)
        for name in plots:
            try:
                ax = getattr(mpl_vis, f"plot_{name}")(study)
                figure = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
                figure.set_size_inches(9, 5)
                figure.tight_layout()
                with atomic_path(directory / f"{name}.png") as tmp:
                    figure.savefig(tmp, dpi=110, format="png")
                plt.close(figure)
                html = directory / f"{name}.html"
                with atomic_path(html) as tmp:
                    getattr(visualization, f"plot_{name}")(study).write_html(str(tmp), include_plotlyjs="directory")
            except (ValueError, RuntimeError) as exc:  # e.g. importances of a constant objective
                log.warning("plot %s skipped: %s", name, exc)
                continue
            written += [directory / f"{name}.png", html]
    return written
