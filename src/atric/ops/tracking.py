"""MLflow tracking: one experiment per dataset, one run per ``<expert>-<pooling>``.

Default store: ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts``
(MLflow 3 refuses the plain file store). ``MLFLOW_TRACKING_URI`` switches to a server.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from atric.atomic import write_text_atomic
from atric.errors import AtricError
from atric.ops.interrupts import stop_signals_as_interrupt
from atric.redact import redact

MLRUNS_DIR = Path("mlruns")
DEFAULT_TRACKING_URI = f"sqlite:///{MLRUNS_DIR}/mlflow.db"
ARTIFACTS_DIR = MLRUNS_DIR / "artifacts"
CHAMPION_ALIAS = "champion"
RUN_ID_FILE = "mlflow_run.json"  # beside the checkpoints: lets a resumed run log to the same MLflow run
RUN_NAME_TAG = "atric.run_name"
FAILURE_TAG = "atric.failure"  # why a run ended FAILED/KILLED: one line, secrets redacted
# Beside the checkpoints while a run finished training but not its MLflow logging: the
# pipeline policy then keeps the finished last.pt so that a rerun only completes the logging.
TRACKING_PENDING_FILE = "mlflow_pending.json"
MAX_BATCH_METRICS = 1000  # MLflow's limits per log_batch request
MAX_BATCH_PARAMS = 100
# MlflowException codes of a server that is down, restarting or overloaded (a connection
# failure is raised as INTERNAL_ERROR): worth buffering or retrying; any other code is final.
TRANSIENT_ERROR_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})

log = logging.getLogger("atric.ops.tracking")


class TrackingError(AtricError):
    """The tracking server cannot be reached or refused a request."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def display_uri() -> str:
    """The tracking URI for messages and logs: its password masked (``atric.redact``)."""
    return redact(tracking_uri())


def configure() -> str:
    """Point MLflow at the configured store; the local store's folder is created on demand."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # Fail within seconds, not minutes, when a server is down (MLflow's default retries for ~2 min).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str) -> str:
    """Get or create the experiment; on the local store its artifacts go under mlruns/artifacts."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        existing = client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        location = None
        if tracking_uri().startswith("sqlite:"):
            ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
            location = ARTIFACTS_DIR.resolve().as_uri()
        # The "model training" kind makes the UI open on the runs table, not the GenAI overview.
        return client.create_experiment(
            name, artifact_location=location, tags={"mlflow.experimentKind": "custom_model_development"}
        )
    except MlflowException as exc:
        raise TrackingError(f"MLflow at {display_uri()}: {exc.message}") from exc


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` means "MLflow (or the store behind it) is unreachable now", not "bad request"."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_ERROR_CODES
    return isinstance(exc, (requests.exceptions.RequestException, ConnectionError, TimeoutError))


def describe(exc: BaseException) -> str:
    """One line for a message: MLflow's text, without the long retry chatter of urllib3."""
    from mlflow.exceptions import MlflowException

    text = exc.message if isinstance(exc, MlflowException) else f"{type(exc).__name__}: {exc}"
    return redact(" ".join(str(text).split()))[:500]


def mark_pending(run_dir: Path, run_id: str | None, reason: str) -> None:
    """Record that ``run_dir`` finished training but its MLflow run is incomplete."""
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = {"run_id": run_id, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_text_atomic(run_dir / TRACKING_PENDING_FILE, json.dumps(doc) + "\n")


def tracking_pending(run_dir: Path) -> bool:
    return (run_dir / TRACKING_PENDING_FILE).exists()


def git_commit() -> str:
    """The checkout's commit (``unknown`` outside git): asked once per process and folder."""
    return _git_commit_in(os.getcwd())


@functools.lru_cache(maxsize=8)
def _git_commit_in(folder: str) -> str:
    # Cached: a tune worker tags every trial with it, and the code that runs is the one the
    # process imported when it started; one `git` per process and folder is enough.
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True, timeout=5
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def recorded_run_id(run_dir: Path) -> str | None:
    """The MLflow run id ``run_dir`` records (once its run is open), else None."""
    path = run_dir / RUN_ID_FILE
    if not path.exists():
        return None
    try:
        return str(json.loads(path.read_text())["run_id"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


class OpeningRun:
    """An MLflow run that a background thread opens while the first epoch trains.

    Importing MLflow and opening its store take ~4 s of Python on 2 cores, as long as the
    rest of a train stage's start-up; training need not wait for them (issue #17). The
    thread starts when the epochs begin (:meth:`start`, from the engine's ``on_train_begin``):
    earlier, it would compete for the GIL with loading the data, which is Python work too,
    while an epoch spends most of its time in torch kernels that release it. The thread only
    talks to MLflow through the client (no fluent state); the training thread makes the run
    its active one with :meth:`activate` when it logs artifacts and the model.
    """

    def __init__(self, open_run: Callable[[], str], *, nested: bool) -> None:
        self.nested = nested
        self.active = False
        self._run_id: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._open, args=(open_run,), name="atric-mlflow-open", daemon=True
        )

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> None:
        """Begin opening the run (once)."""
        if not self.started:
            self._thread.start()

    def _open(self, open_run: Callable[[], str]) -> None:
        try:
            self._run_id = open_run()
        except BaseException as exc:  # noqa: BLE001 -- handed to the training thread by wait()/poll()
            self._error = exc

    def poll(self) -> str | None:
        """The run id once open, None while it is being opened; raises why opening failed."""
        if not self.started or self._thread.is_alive():
            return None
        return self.wait()

    def wait(self) -> str:
        """Block until the run is open; returns its id or raises why opening failed."""
        run_id = self.settle()
        if self._error is not None:
            raise self._error
        assert run_id is not None
        return run_id

    @property
    def run_id(self) -> str | None:
        """The run's id once opened (None while opening, or when opening failed)."""
        return self._run_id

    def settle(self) -> str | None:
        """Wait for the opener (starting it if need be); the run id, or None when none was opened."""
        self.start()
        self._thread.join()
        return self._run_id

    def activate(self) -> str:
        """Make the run the active fluent run of the calling thread (for log_artifact, log_model)."""
        import mlflow

        run_id = self.wait()
        if not self.active:
            mlflow.start_run(run_id=run_id, nested=self.nested)
            self.active = True
        return run_id


@contextmanager
def tracked_run(
    experiment: str,
    run_name: str,
    run_dir: Path,
    *,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    resume: bool = True,
    nested: bool = False,
) -> Iterator[OpeningRun]:
    """Start (or re-open, when ``run_dir`` names an unfinished run) an MLflow run.

    The run is opened in a background thread once the body calls ``start`` (or needs the
    run: ``wait``/``activate``; a body that fails first still gets its run, ended FAILED); the
    body learns of an unreachable MLflow from ``poll``/``wait``/``activate``. Nested: the
    calling thread's active run is the parent. The run ends FINISHED on success, KILLED on
    interrupt/SIGTERM, FAILED on an error. A SIGKILLed run stays RUNNING until the same
    command runs again, which re-opens it.
    """
    parent_id = None
    if nested:
        import mlflow

        parent = mlflow.active_run()
        parent_id = parent.info.run_id if parent is not None else None
    all_tags = {k: redact(v) for k, v in {RUN_NAME_TAG: run_name, "git_commit": git_commit(), **tags}.items()}
    start_ms = int(time.time() * 1000)
    opener = functools.partial(
        _open_run, experiment, run_name, run_dir, params, all_tags, resume, parent_id, start_ms
    )
    opening = OpeningRun(opener, nested=nested)
    status, failed, reason = "FAILED", False, ""
    try:
        with stop_signals_as_interrupt():
            yield opening
            opening.wait()  # a body that never logged still needs its run
        status = "FINISHED"
    except KeyboardInterrupt as exc:
        status, failed, reason = "KILLED", True, f"interrupted ({exc or 'Ctrl-C'})"
        raise
    except BaseException as exc:
        failed, reason = True, f"{type(exc).__name__}: {exc}"
        raise
    finally:
        run_id = opening.settle()
        if run_id is not None:
            if failed:
                _tag_failure(run_id, reason)
            _end_run(run_id, run_name, run_dir, status, failed, active=opening.active)


def _open_run(
    experiment: str,
    run_name: str,
    run_dir: Path,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    resume: bool,
    parent_id: str | None,
    start_ms: int,
) -> str:
    """Create (or re-open) the run through the client, record its id beside the checkpoints."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.context.registry import resolve_tags

    configure()
    exp_id = experiment_id(experiment)
    client = MlflowClient()
    run_id = recorded_run_id(run_dir) if resume else None
    if run_id is not None:
        try:
            if client.get_run(run_id).info.status == "FINISHED":
                run_id = None  # a finished run is history; a new training run gets a new MLflow run
        except MlflowException:
            run_id = None
    try:
        if run_id is None:
            # The tags mlflow.start_run would add (user, source, git), as it resolves them.
            own = {**tags, "mlflow.runName": run_name}
            if parent_id:
                own["mlflow.parentRunId"] = parent_id
            run_id = client.create_run(
                exp_id, start_time=start_ms, tags=resolve_tags(own), run_name=run_name
            ).info.run_id
            new = True
        else:
            client.update_run(run_id, status="RUNNING")
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in {**tags, "resumed": "true"}.items()])
            new = False
    except MlflowException as exc:
        raise TrackingError(
            f"MLflow at {display_uri()}: cannot start run {run_name!r}: {exc.message}"
        ) from exc
    try:
        if new:
            logged = [Param(k, _param_value(v)) for k, v in params.items()]
            for begin in range(0, len(logged), MAX_BATCH_PARAMS):
                client.log_batch(run_id, params=logged[begin : begin + MAX_BATCH_PARAMS])
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / RUN_ID_FILE, json.dumps({"run_id": run_id}) + "\n")
    except BaseException as exc:  # a run-id file that cannot be written ends the run FAILED, not RUNNING
        _tag_failure(run_id, f"{type(exc).__name__}: {exc}")
        _end_run(run_id, run_name, run_dir, "FAILED", True, active=False)
        raise
    return run_id


def _tag_failure(run_id: str, reason: str) -> None:
    """Record why the run stopped (first line, redacted); MLflow being down must not mask the error."""
    from mlflow import MlflowClient

    line = redact(" ".join(reason.split()))[:5000]
    try:
        MlflowClient().set_tag(run_id, FAILURE_TAG, line)
    except Exception as exc:  # the reason is on stderr anyway
        log.warning("cannot tag MLflow run %s with its failure reason: %s", run_id, describe(exc))


def _end_run(run_id: str, run_name: str, run_dir: Path, status: str, failed: bool, *, active: bool) -> None:
    """End the run (``active``: the calling thread's active fluent run); the server may be down now too.

    After an error, a failing end_run only warns: the error that ended the run is the one
    to report (the run stays RUNNING and a rerun re-opens it). After success it raises a
    TrackingError, as the run is not complete in MLflow yet.
    """
    import mlflow

    try:
        if active:
            mlflow.end_run(status=status)  # pops the active run before the request: never left active
        else:
            mlflow.MlflowClient().set_terminated(run_id, status)
    except Exception as exc:
        if not is_transient(exc) and not failed:
            raise
        if failed:
            log.warning(
                "%s: cannot mark MLflow run %s %s at %s (%s); it stays RUNNING until the command runs again",
                run_name, run_id, status, display_uri(), describe(exc),
            )  # fmt: skip
            return
        mark_pending(run_dir, run_id, f"end_run: {describe(exc)}")
        raise TrackingError(
            f"{run_name}: the run finished locally (checkpoints and metrics in {run_dir}), but MLflow at "
            f"{display_uri()} could not mark run {run_id} FINISHED ({describe(exc)}); run the same "
            "command again to complete it (training is not repeated)"
        ) from exc


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return redact(text)[:6000]  # MLflow's limit on a param value


class EpochMetricsLogger:
    """Engine callback: per-epoch metrics into an MLflow run, buffered while MLflow is unreachable.

    Training must not stop because the tracking server does: a failed request keeps the
    epoch's metrics (with their step and time) in a buffer, warns once per outage, and the
    buffer is sent, in order, with the next epoch's metrics or by :meth:`flush` at the end.
    Epochs that end while the run is still being opened wait in the same buffer; a run that
    could not be opened stops training at the next epoch's end (its error is raised).
    """

    def __init__(self, run: OpeningRun) -> None:
        self.run = run
        # (name, value, time in ms, epoch), in the order they were produced; plain tuples, so
        # that an epoch ending while the opener thread still imports MLflow does not wait for it
        self.pending: list[tuple[str, float, int, int]] = []
        self.logged_steps: set[int] = set()  # epochs sent by this logger
        self.last_error: BaseException | None = None
        self._outage = False

    def on_train_begin(self) -> None:
        self.run.start()

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.pending.extend((_metric_name(k), float(v), now, epoch) for k, v in metrics.items())
        if self.run.poll() is not None:
            self.flush()

    def flush(self) -> bool:
        """Send what is buffered (once the run is open); True when nothing is left.

        Unreachable MLflow: False, no raise.
        """
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        run_id = self.run.wait()
        client = MlflowClient()
        while self.pending:
            batch = [Metric(*row) for row in self.pending[:MAX_BATCH_METRICS]]
            try:
                client.log_batch(run_id, metrics=batch)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.last_error = exc
                if not self._outage:
                    self._outage = True
                    log.warning(
                        "MLflow at %s unreachable (%s): training goes on; per-epoch metrics are kept "
                        "and sent when it answers again", display_uri(), describe(exc),
                    )  # fmt: skip
                return False
            del self.pending[: len(batch)]
            self.logged_steps.update(m.step for m in batch)
        if self._outage:
            self._outage = False
            log.warning("MLflow at %s reachable again: buffered metrics logged", display_uri())
        self.last_error = None
        return True

    @property
    def pending_steps(self) -> list[int]:
        return sorted({row[3] for row in self.pending})


def backfill_history(run_id: str, history: Sequence[Mapping[str, float]], skip_steps: set[int]) -> int:
    """Log the epochs of ``history`` the run lacks (a rerun after MLflow was down); returns the count.

    Epochs in ``skip_steps`` were just logged by this process; the others are compared with
    the run's own metric history, so nothing is logged twice.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    rows = [row for row in history if int(row["epoch"]) not in skip_steps]
    if not rows:
        return 0
    client = MlflowClient()
    names = {_metric_name(k) for row in rows for k in row}
    logged = {name: {m.step for m in client.get_metric_history(run_id, name)} for name in names}
    now = int(time.time() * 1000)
    missing = [
        Metric(_metric_name(k), float(v), now, int(row["epoch"]))
        for row in rows
        for k, v in row.items()
        if int(row["epoch"]) not in logged[_metric_name(k)]
    ]
    for start in range(0, len(missing), MAX_BATCH_METRICS):
        client.log_batch(run_id, metrics=missing[start : start + MAX_BATCH_METRICS])
    return len({m.step for m in missing})


def _metric_name(name: str) -> str:
    # MLflow accepts letters, digits, _ - . space / only.
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in name)


def register_with_alias(run_id: str, model_name: str, artifact_path: str = "model") -> str:
    """Register the run's logged model and point the ``champion`` alias at the new version.

    When the alias already names a version of this run, that version is returned and nothing
    is registered: a report that chooses the same champion again does not add a duplicate.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException:  # no such model or alias yet (or MLflow down: registering says so)
        current = None
    if current is not None and current.run_id == run_id:
        return str(current.version)
    version = mlflow.register_model(f"runs:/{run_id}/{artifact_path}", model_name)
    client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version.version)
    return str(version.version)


def log_metrics_to_run(run_id: str, metrics: Mapping[str, float]) -> None:
    """Log into a run that may have ended (e.g. test metrics after training), at step 0."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    configure()
    now = int(time.time() * 1000)
    MlflowClient().log_batch(
        run_id, metrics=[Metric(_metric_name(k), float(v), now, 0) for k, v in metrics.items()]
    )


class MetricsSidecar:
    """Logs one batch of metrics into a run from a child process started early.

    Importing MLflow and opening its store take ~2 s of Python: half of an evaluate stage on
    2 cores (``benchmarks/pipeline.py``). Started before the stage imports torch, the child
    (``python -m atric.ops.tracking``) spends them on the other core while the stage computes;
    the stage hands it the metrics when it has them. A fresh interpreter, not a fork: nothing of
    this process (open database connections, torch's threads) is carried into it. Leaving the
    block without logging stops it.
    """

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,  # the one-line answer; the child's logs go to our stderr
            text=True,
        )

    def log_metrics_to_run(self, run_id: str, metrics: Mapping[str, float]) -> None:
        """``log_metrics_to_run`` in the child; its failure is raised here as TrackingError."""
        request = json.dumps({"run_id": run_id, "metrics": {k: float(v) for k, v in metrics.items()}})
        out, _ = self._proc.communicate(request + "\n")
        if self._proc.returncode:
            answer = out.strip().splitlines()[-1] if out.strip() else ""
            raise TrackingError(
                answer or f"MLflow at {display_uri()}: the logging process exited {self._proc.returncode}"
            )

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()

    def __enter__(self) -> MetricsSidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sidecar_main() -> int:
    """The child of MetricsSidecar: open MLflow, then log the one request read from stdin."""
    from atric.redact import install_log_redaction

    install_log_redaction()
    run_id = "?"
    try:
        from mlflow import MlflowClient

        configure()
        MlflowClient()  # opens the store (the SQLite schema check) before the request comes
        line = sys.stdin.readline()
        if not line.strip():
            return 0  # the stage had nothing to log
        request = json.loads(line)
        run_id = request["run_id"]
        log_metrics_to_run(run_id, request["metrics"])
    except Exception as exc:
        print(f"MLflow at {display_uri()}: cannot log metrics to run {run_id}: {describe(exc)}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_sidecar_main())
