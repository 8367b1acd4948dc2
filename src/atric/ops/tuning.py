"""Hyperparameter search with Optuna: one study, any number of workers, each trial a tracked run.

The search space lives in ``params.yaml: tune.space`` (train.* names; validated by
atric.config.TuneParams before anything touches the storage). Each trial is one training run
of the same engine as ``src/train.py``, wrapped in an MLflow run nested under one parent run
per study; it reports the validation ``t2a_geometric_mean`` after every epoch and is pruned
when the pruner says so. Its checkpoints and metrics go to ``tune/<study>/{models,metrics}/``,
so trials never overwrite the pipeline's runs.

One laptop::

    python src/tune.py --n-trials 20                 # SQLite: tune/optuna.db
    optuna-dashboard sqlite:///tune/optuna.db        # live view (pip install optuna-dashboard)

Many workers (processes or machines) against one PostgreSQL study::

    python src/tune.py --storage postgresql+psycopg2://atric:PW@db/optuna --create-only
    python src/tune.py --storage ...same... --n-trials 200 --total-trials   # on every worker

``--create-only`` creates the schema and the study once: concurrent first creation races
(on SQLite and PostgreSQL alike). A plain run creates them too when missing, under a lock
(a file lock for SQLite, an advisory lock for PostgreSQL). ``ATRIC_OPTUNA_STORAGE`` sets the
storage URL when ``--storage`` is not given (src/tune.py). With ``--total-trials`` the trial count is the
study's total: a worker starts a trial only under the same lock after counting the study's
live trials, so a fleet stops together at exactly that total. Workers send heartbeats; a
worker killed mid-trial (even SIGKILL) has its trial marked FAIL by another worker once
``grace_period`` passes, and a copy is queued and retried (``RetryHeartbeatStaleTrialCallback``).
Workers with nothing left to start wait for the running trials of others for that reason.

GPU: ``train.device: auto`` picks the visible GPU; start one worker per GPU with
``CUDA_VISIBLE_DEVICES=<i>`` (nothing here overrides it).

Results (written by every worker when it stops, or with ``--report-only``):
``tune/<study>/best_params.yaml`` (``train: {lr: ..., ...}``, params.yaml key form), the
``dvc exp run -S ...`` command that reproduces the best trial, and ``tune/<study>/report/``
with Optuna's optimisation history, parameter importances and parallel coordinates as PNG
(matplotlib) and HTML (plotly, when installed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from atric.ops import tracking
from atric.atomic import atomic_path, write_text_atomic
from atric.config import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    Params,
    TuneParams,
)
from atric.engine import SELECTION_METRIC, RunPaths, run_name_for
from atric.errors import AtricError, ConfigError

log = logging.getLogger("atric.ops.tuning")

OBJECTIVE = f"val_{SELECTION_METRIC}"  # the engine's per-epoch row key; maximised
LIVE_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# Study user attrs: what a joining worker checks and uses.
ATTR_SPACE = "atric.space"
ATTR_PARENT_RUN = "atric.mlflow_parent_run_id"
ATTR_WORKERS = "atric.workers_started"
# MLflow tags
TAG_STUDY = "optuna.study_name"
TAG_STATE = "optuna.state"
TAG_TRIAL = "optuna.trial_number"
TAG_ROLE = "atric.tune"
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
WAIT_POLL_SECONDS = 5.0


class TuneError(AtricError):
    """The study cannot be created, joined or reported."""


# --------------------------------------------------------------------------- settings


def study_name_for(params: Params) -> str:
    """``tune.study_name``, else ``<dataset>-<expert>-<pooling>``."""
    return params.tune.study_name or f"{params.data.dataset}-{run_name_for(params.train)}"


def storage_url(params: Params) -> str:
    """``tune.storage`` (src/tune.py fills it from ``--storage``, else ``ATRIC_OPTUNA_STORAGE``)."""
    return params.tune.storage


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


def open_storage(url: str, tune: TuneParams, *, create_tables: bool = True) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats and retry of stale trials.

    ``create_tables=False`` skips schema creation: used once the schema surely exists, so
    that only the locked creator runs the racy CREATE TABLE path.
    """
    url = _normalise_url(url)
    path = _sqlite_path(url)
    engine_kwargs: dict[str, Any]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Several workers write one file: wait for the lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith("sqlite"):
        engine_kwargs = {}
    else:
        # Connections idle through a long trial may have been dropped by the server or a proxy.
        engine_kwargs = {"pool_pre_ping": True, "pool_recycle": 1800}
    interval = tune.heartbeat_interval
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=interval,
                grace_period=(tune.grace_period or 2 * interval) if interval else None,
                heartbeat_stale_trial_callback=_StaleTrialCallback(tune.max_retry) if interval else None,
                skip_table_creation=not create_tables,
            )
        except ImportError as exc:
            raise TuneError(f"storage {redact(url)}: driver missing: {exc}") from exc
        except Exception as exc:  # SQLAlchemy OperationalError etc.: one clear line
            raise TuneError(f"storage {redact(url)}: cannot open: {str(exc).splitlines()[0]}") from exc


@contextlib.contextmanager
def storage_lock(url: str, name: str) -> Iterator[None]:
    """A lock shared by every worker of one storage: a file lock beside a SQLite file, a
    PostgreSQL advisory lock (released by the server if the holder dies), none otherwise
    (then ``--total-trials`` may overshoot by up to workers - 1)."""
    url = _normalise_url(url)
    path = _sqlite_path(url)
    if path is not None:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            yield
        return
    if url.startswith("postgresql"):
        import sqlalchemy

        key = zlib.crc32(f"atric.tune:{name}".encode())
        try:
            conn_cm = _lock_engine(url).connect()
        except sqlalchemy.exc.SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise TuneError(f"storage {redact(url)}: cannot connect: {reason}") from exc
        with conn_cm as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    yield


_LOCK_ENGINES: dict[str, Any] = {}


def _lock_engine(url: str) -> Any:
    import sqlalchemy

    if url not in _LOCK_ENGINES:
        _LOCK_ENGINES[url] = sqlalchemy.create_engine(url, pool_pre_ping=True, pool_size=1)
    return _LOCK_ENGINES[url]


def _space_doc(tune: TuneParams) -> dict[str, Any]:
    return {key: dim.model_dump(exclude_none=True) for key, dim in sorted(tune.space.items())}


def build_sampler(tune: TuneParams, worker: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded from ``tune.seed`` plus the worker's number in the study: workers sharing a seed
    would draw the same random start-up points."""
    seed = tune.seed + worker
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def build_pruner(tune: TuneParams, epochs: int) -> optuna.pruners.BasePruner:
    if tune.pruner == "none":
        return optuna.pruners.NopPruner()
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, tune.warmup_epochs), max_resource=epochs)
    # Optuna prunes at step >= n_warmup_steps; steps are 1-based epochs.
    return optuna.pruners.MedianPruner(
        n_startup_trials=tune.startup_trials, n_warmup_steps=tune.warmup_epochs + 1
    )


# --------------------------------------------------------------------------- the study


def create_study(params: Params, *, worker: int = 0) -> optuna.Study:
    """Create (or load) the study, with load_if_exists semantics, race-free.

    Schema and study creation (and the MLflow experiment's) run under :func:`storage_lock`;
    DuplicatedStudyError (another tool created it meanwhile) is caught and the study loaded.
    A study created with another ``tune.space`` is refused: its trials would not be comparable.
    """
    tune, name, url = params.tune, study_name_for(params), storage_url(params)
    sampler = build_sampler(tune, worker)
    pruner = build_pruner(tune, params.train.epochs)
    with storage_lock(url, "schema"):
        storage = open_storage(url, tune)
        try:
            study = optuna.create_study(
                storage=storage, study_name=name, direction="maximize", sampler=sampler, pruner=pruner
            )
            study.set_user_attr(ATTR_SPACE, _space_doc(tune))
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
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(f"study {name!r}: direction must be maximize (it holds {SELECTION_METRIC})")
    return study


def _join_study(params: Params) -> tuple[optuna.Study, int]:
    """Create or load the study and take this worker's number (seeds the sampler)."""
    study = create_study(params)
    url = storage_url(params)
    with storage_lock(url, study.study_name):
        worker = int(study.user_attrs.get(ATTR_WORKERS, 0))
        study.set_user_attr(ATTR_WORKERS, worker + 1)
    if worker:
        study.sampler = build_sampler(params.tune, worker)
    return study, worker


# --------------------------------------------------------------------------- MLflow


def _parent_run_id(params: Params, study: optuna.Study) -> str:
    """The study's MLflow parent run: recorded in the study, else found by tag, else created.

    Runs under the study's lock so that two workers joining at once make one parent run.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking.configure()
    client = MlflowClient()
    exp_id = tracking.experiment_id(params.data.dataset)
    with storage_lock(storage_url(params), study.study_name):
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
            run = client.create_run(
                exp_id,
                run_name=f"tune-{study.study_name}",
                tags={
                    TAG_STUDY: study.study_name,
                    TAG_ROLE: "study",
                    "optuna.storage": redact(storage_url(params)),
                    "git_commit": tracking.git_commit(),
                },
            )
            run_id = run.info.run_id
            tune = params.tune
            for key, value in {
                "tune.sampler": tune.sampler,
                "tune.pruner": tune.pruner,
                "tune.seed": tune.seed,
                "tune.space": json.dumps(_space_doc(tune)),
                "train.epochs": params.train.epochs,
            }.items():
                client.log_param(run_id, key, str(value)[:6000])
        study.set_user_attr(ATTR_PARENT_RUN, run_id)
        return run_id


def _mark_mlflow_run(run_id: str | None, state: str, status: str | None = None) -> None:
    """Tag a trial's MLflow run with its Optuna state; pruned runs end KILLED, failed FAILED."""
    if not run_id:
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        client = MlflowClient()
        client.set_tag(run_id, TAG_STATE, state)
        # tracked_run already ended it FINISHED (complete) or FAILED (any exception): only a
        # pruned or interrupted trial needs another status (one request less per trial).
        if status or state == "PRUNED":
            client.set_terminated(run_id, status=status or MLFLOW_STATUS[state])
    except MlflowException as exc:  # tracking trouble must not lose the Optuna result
        log.warning("MLflow run %s: cannot mark %s: %s", run_id, state, exc.message)


class _StaleTrialCallback:
    """Retry a trial whose worker stopped sending heartbeats, and mark its MLflow run FAILED."""

    def __init__(self, max_retry: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        log.warning("trial %d: its worker stopped sending heartbeats; marked FAIL, retrying", trial.number)
        self.retry(study, trial)
        # Its worker died: the MLflow run was left RUNNING.
        _mark_mlflow_run(trial.user_attrs.get("mlflow_run_id"), "FAIL", status="FAILED")


# --------------------------------------------------------------------------- one trial


def suggest(trial: optuna.Trial, params: TuneParams) -> dict[str, Any]:
    """The trial's values for every dimension of ``tune.space`` (train.* names)."""
    values: dict[str, Any] = {}
    for key, dim in params.space.items():
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
        raise ConfigError(
            f"trial values {dict(values)} are not valid params: {exc.errors()[0]['msg']}"
        ) from exc


class _Reporter:
    """Engine callback: report each epoch's objective; prune when the pruner says so."""

    def __init__(self, trial: optuna.Trial, study_name: str) -> None:
        self.trial = trial
        self.study_name = study_name
        self.run_id: str | None = None

    def on_epoch_end(self, epoch: int, row: Mapping[str, float]) -> None:
        import mlflow

        if self.run_id is None and mlflow.active_run() is not None:
            # Recorded in the study so a worker that retries this trial can mark its run.
            self.run_id = mlflow.active_run().info.run_id
            self.trial.set_user_attr("mlflow_run_id", self.run_id)
            mlflow.set_tags(
                {TAG_STUDY: self.study_name, TAG_TRIAL: str(self.trial.number), TAG_ROLE: "trial"}
            )
        self.trial.report(float(row[OBJECTIVE]), epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: {OBJECTIVE} {row[OBJECTIVE]:.3f}")


class _Heartbeat:
    """Record the trial's heartbeat every interval in a daemon thread (dies with the process)."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self.interval = storage.get_heartbeat_interval()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{trial_id}")

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # a storage hiccup: the next beat may get through
                log.warning("heartbeat of trial %d failed: %s", self.trial_id, exc)

    def __enter__(self) -> _Heartbeat:
        if self.interval:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def _run_trial(params: Params, study: optuna.Study, trial: optuna.Trial) -> tuple[TrialState, float | None]:
    """Train one trial and tell the study; returns the state and value.

    Pruned -> PRUNED; an AtricError (e.g. a diverged run's NaN loss: a bad point, not a broken
    worker) -> FAIL and the worker goes on; Ctrl-C/SIGTERM -> FAIL plus a queued retry, then
    the interrupt propagates; any other exception -> FAIL and propagates.
    """
    from atric.ops.experiment import train_tracked

    run_name = f"{run_name_for(params.train)}-trial{trial.number}"
    trial.set_user_attr("run_name", run_name)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    reporter = _Reporter(trial, study.study_name)
    state, value, interrupted = TrialState.FAIL, None, False
    last_checkpoint: Path | None = None
    started = time.perf_counter()
    try:
        run_params = trial_params(params, suggest(trial, params.tune))
        last_checkpoint = RunPaths.of(run_params.train, run_name).last
        result = train_tracked(
            run_params,
            run_name=run_name,
            policy="restart",
            stage="tune",
            callbacks=[reporter],
            nested=True,
            log_model=False,
        )
        state, value = TrialState.COMPLETE, float(result.best_score)
    except optuna.TrialPruned as exc:
        state = TrialState.PRUNED
        log.info("trial %d pruned at %s", trial.number, exc)
    except AtricError as exc:
        trial.set_user_attr("fail_reason", str(exc)[:2000])
        log.warning("trial %d failed: %s", trial.number, exc)
    except KeyboardInterrupt:
        interrupted = True
        trial.set_user_attr("fail_reason", "interrupted")
        raise
    finally:
        # Whatever happened, the trial leaves RUNNING (else the fleet would wait for it).
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 3))
        study.tell(trial, value, state=state)
        if interrupted and params.tune.max_retry:
            # A preempted worker (docker stop, Ctrl-C) hands its point back to the fleet.
            _retry(study, trial.number, params.tune.max_retry)
        with contextlib.suppress(Exception):
            tracking.configure()
            _mark_mlflow_run(reporter.run_id, state.name, status="KILLED" if interrupted else None)
        if last_checkpoint is not None:
            # Trials are never resumed (policy restart): last.pt is dead weight; best.pt is kept.
            last_checkpoint.unlink(missing_ok=True)
    return state, value


def _retry(study: optuna.Study, number: int, max_retry: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        frozen = study.get_trials(deepcopy=True)[number]
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, frozen)


# --------------------------------------------------------------------------- workers


@dataclass
class WorkerSummary:
    study_name: str
    worker: int
    trials: dict[str, int] = field(default_factory=dict)  # this worker's trials by final state
    seconds: float = 0.0


def _next_trial(study: optuna.Study, params: Params, url: str) -> optuna.Trial | None:
    """Fail stale trials, then ask for a trial unless the study total is reached, all under
    the study lock: the count and the new trial are one step for the whole fleet."""
    storage = study._storage  # the RDBStorage built by open_storage
    study_id = storage.get_study_id_from_name(study.study_name)
    with storage_lock(url, study.study_name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        if params.tune.total_trials:
            waiting = storage.get_n_trials(study_id, TrialState.WAITING)
            live = storage.get_n_trials(study_id, LIVE_STATES)
            if not waiting and live >= params.tune.n_trials:
                return None
        with warnings.catch_warnings():
            # Optuna warns that heartbeats are meant for Study.optimize; this loop beats itself (_Heartbeat).
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        # First heartbeat inside the lock: a worker killed right after ask still leaves a
        # trial that can go stale (a trial without any heartbeat is never failed).
        if storage.get_heartbeat_interval():
            storage.record_heartbeat(trial._trial_id)
        return trial


def run_worker(params: Params) -> WorkerSummary:
    """Run trials until the budget (per worker, or the study total) or the timeout is spent."""
    import mlflow

    tune = params.tune
    study, worker = _join_study(params)
    url = storage_url(params)
    storage = study._storage  # the RDBStorage of open_storage: heartbeats and counts
    summary = WorkerSummary(study.study_name, worker)
    parent = _parent_run_id(params, study)
    deadline = time.monotonic() + tune.timeout if tune.timeout else None
    started, failures = time.monotonic(), 0
    log.info(
        "worker %d on study %s (%s): %s", worker, study.study_name, redact(url),
        f"{tune.n_trials} trials in total" if tune.total_trials else f"{tune.n_trials} trials",
    )  # fmt: skip
    mlflow.start_run(run_id=parent)
    status = "FAILED"
    try:
        with contextlib.ExitStack() as stack:
            if threading.current_thread() is threading.main_thread():
                # SIGTERM (docker stop, schedulers) ends a worker as Ctrl-C does: FAIL + retry queued.
                stack.enter_context(tracking._terminate_as_interrupt())
            while deadline is None or time.monotonic() < deadline:
                if not tune.total_trials and sum(summary.trials.values()) >= tune.n_trials:
                    break
                trial = _next_trial(study, params, url)
                if trial is None:
                    # Total reached, but a running trial may still fail (its worker dies) and be
                    # queued again: wait while others run, if heartbeats can tell us.
                    if storage.get_heartbeat_interval() and _others_running(study):
                        time.sleep(min(WAIT_POLL_SECONDS, float(storage.get_heartbeat_interval())))
                        continue
                    break
                with _Heartbeat(storage, trial._trial_id):
                    state, _ = _run_trial(params, study, trial)
                summary.trials[state.name] = summary.trials.get(state.name, 0) + 1
                failures = failures + 1 if state == TrialState.FAIL else 0
                if failures >= tune.max_failures:
                    raise TuneError(
                        f"{failures} trials in a row failed (see the log above and the trials' "
                        "fail_reason); stopping this worker"
                    )
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


def _others_running(study: optuna.Study) -> bool:
    storage = study._storage
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_n_trials(study_id, (TrialState.RUNNING, TrialState.WAITING)) > 0


def _log_study_summary(study: optuna.Study) -> None:
    import mlflow

    trials = study.get_trials(deepcopy=False)
    counts = {
        s: sum(t.state == s for t in trials)
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    metrics = {f"trials_{s.name.lower()}": float(n) for s, n in counts.items()}
    if counts[TrialState.COMPLETE]:
        metrics[f"best_{OBJECTIVE}"] = float(study.best_value)
    mlflow.log_metrics(metrics, step=len(trials))


# --------------------------------------------------------------------------- results


def load_study(params: Params) -> optuna.Study:
    url = storage_url(params)
    storage = open_storage(url, params.tune, create_tables=False)
    try:
        return optuna.load_study(study_name=study_name_for(params), storage=storage)
    except KeyError as exc:
        raise TuneError(f"no study {study_name_for(params)!r} in {redact(url)}") from exc


def has_complete_trial(study: optuna.Study) -> bool:
    return any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def best_params(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """The best trial's values in params.yaml key form: ``{"train": {"lr": ...}}``."""
    return {"train": dict(study.best_trial.params)}


def dvc_command(best: Mapping[str, Mapping[str, Any]]) -> str:
    """``dvc exp run -S train.lr=... -S ...``: the best trial as a DVC experiment."""
    parts = ["dvc", "exp", "run"]
    for section, values in best.items():
        for key, value in sorted(values.items()):
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            parts += ["-S", f"{section}.{key}={text}"]
    return shlex.join(parts)


@dataclass
class StudyResult:
    best_params: Path
    command: str
    report: list[Path]
    best_value: float
    best_trial: int


def claim_report(params: Params, study: optuna.Study) -> bool:
    """Whether this worker should draw the plots: False when a worker on this machine and
    folder already drew them for the same finished trials (workers of a fleet stop together;
    one set of plots per folder is enough; ``--report-only`` redraws them anyway)."""
    key = f"atric.reported:{socket.gethostname()}:{study_dir(params).resolve()}"
    with storage_lock(storage_url(params), study.study_name):
        finished = len(study.get_trials(deepcopy=False, states=(*DONE_STATES, TrialState.FAIL)))
        if study.user_attrs.get(key) == finished:
            return False
        study.set_user_attr(key, finished)
        return True


def write_results(params: Params, study: optuna.Study | None = None, *, plots: bool = True) -> StudyResult:
    """best_params.yaml, the dvc command and (``plots``) the report, under ``tune/<study>/``."""
    study = study or load_study(params)
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise TuneError(f"study {study.study_name!r}: no complete trial yet: nothing to report")
    best = best_params(study)
    command = dvc_command(best)
    out = study_dir(params)
    trial = study.best_trial
    header = (
        f"# Best trial {trial.number} of study {study.study_name}: {OBJECTIVE} = {trial.value:.4f}\n"
        f"# Merge into params.yaml, or run it as a DVC experiment:\n#   {command}\n"
    )
    path = out / "best_params.yaml"
    write_text_atomic(path, header + yaml.safe_dump(best, sort_keys=True))
    report = write_report(study, out / "report") if plots else []
    return StudyResult(path, command, report, float(trial.value), trial.number)


def write_report(study: optuna.Study, directory: Path) -> list[Path]:
    """Optimisation history, parameter importances (>= 2 complete trials) and parallel
    coordinates: PNG via matplotlib, HTML via plotly when installed."""
    import matplotlib

    matplotlib.use("Agg")  # workers have no display
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as mpl_vis

    directory.mkdir(parents=True, exist_ok=True)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    plots = ["optimization_history", "parallel_coordinate"]
    distinct = {json.dumps(t.params, sort_keys=True) for t in complete}
    if len(complete) >= 2 and len(distinct) >= 2 and study.best_trial.params:
        plots.insert(1, "param_importances")
    else:
        log.info("parameter importances skipped: fewer than 2 distinct complete trials")
    written: list[Path] = []
    with warnings.catch_warnings():
        # Experimental APIs, and notes on degenerate studies (equal importances, flat axes).
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        for name in plots:
            try:
                ax = getattr(mpl_vis, f"plot_{name}")(study)
                figure = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
                figure.set_size_inches(9, 5)
                figure.tight_layout()
                png = directory / f"{name}.png"
                with atomic_path(png) as tmp:
                    figure.savefig(tmp, dpi=110, format="png")
                plt.close(figure)
                written.append(png)
            except (ValueError, RuntimeError) as exc:  # e.g. importances on a constant objective
                log.warning("plot %s skipped: %s", name, exc)
                continue
            html = _plotly_html(study, name, directory)
            if html is not None:
                written.append(html)
    return written


def _plotly_html(study: optuna.Study, name: str, directory: Path) -> Path | None:
    try:
        import plotly  # noqa: F401
    except ImportError:
        return None
    from optuna import visualization

    figure = getattr(visualization, f"plot_{name}")(study)
    path = directory / f"{name}.html"
    # "directory": one plotly.min.js beside the pages, so they open offline.
    with atomic_path(path) as tmp:
        figure.write_html(str(tmp), include_plotlyjs="directory")
    return path
