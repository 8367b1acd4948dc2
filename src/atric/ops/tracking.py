"""MLflow tracking: one experiment per dataset, one run per ``<expert>-<pooling>``.

Default store: ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts``
(MLflow 3 refuses the plain file store). ``MLFLOW_TRACKING_URI`` switches to a server.

Training and evaluation talk to MLflow through a child process (:class:`TrackingProcess`,
``python -m atric.ops.tracking``), so that a stage never imports MLflow itself; the report
stage and the tuner's own study runs use it in-process.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from atric.atomic import write_text_atomic
from atric import errors
from atric.errors import AtricError
from atric.ops.interrupts import stop_signals_as_interrupt, uninterruptible
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


class MlflowCallError(Exception):
    """An MLflow call that failed in the :class:`TrackingProcess`: its one-line description,
    whether it is transient (``is_transient``) and MLflow's error code."""

    def __init__(self, message: str, *, transient: bool, error_code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.error_code = error_code


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def display_uri() -> str:
    """The tracking URI for messages and logs: its password masked (``atric.redact``)."""
    return redact(tracking_uri())


def local_store_path() -> Path | None:
    """The SQLite file of a local store (``sqlite:///relative`` or ``sqlite:////absolute``), else None."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    return Path(uri.removeprefix("sqlite:///"))


@contextmanager
def store_lock() -> Iterator[None]:
    """Held while a local SQLite store is opened (MLflow makes its tables on first use) and while
    an experiment is found or made: stages started together (``src/repro.py`` runs them side by
    side) would otherwise both create them, and one would fail. A server serialises this itself."""
    path = local_store_path()
    if path is None:
        yield
        return
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        yield


def configure() -> str:
    """Point MLflow at the configured store; the local store's folder is created on demand."""
    import mlflow

    uri = tracking_uri()
    path = local_store_path()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # Fail within seconds, not minutes, when a server is down (MLflow's default retries for ~2 min).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str) -> str:
    """Get or create the experiment; on the local store its artifacts go under mlruns/artifacts."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        with store_lock():
            client = MlflowClient()
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


def _is_mlflow_exception(exc: BaseException) -> bool:
    # Looked up, not imported: a process that never imported MLflow cannot hold its exceptions.
    module = sys.modules.get("mlflow.exceptions")
    return module is not None and isinstance(exc, module.MlflowException)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` means "MLflow (or the store behind it) is unreachable now", not "bad request"."""
    if isinstance(exc, MlflowCallError):
        return exc.transient
    if _is_mlflow_exception(exc):
        return exc.error_code in TRANSIENT_ERROR_CODES  # type: ignore[attr-defined]
    requests = sys.modules.get("requests")
    if requests is not None and isinstance(exc, requests.exceptions.RequestException):
        return True
    return isinstance(exc, (ConnectionError, TimeoutError))


def describe(exc: BaseException) -> str:
    """One line for a message: MLflow's text, without the long retry chatter of urllib3."""
    if isinstance(exc, MlflowCallError) or _is_mlflow_exception(exc):
        text = exc.message  # type: ignore[attr-defined]
    else:
        text = f"{type(exc).__name__}: {exc}"
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


class TrackingProcess:
    """This process's MLflow client, in a child process (``python -m atric.ops.tracking``).

    Importing MLflow and opening its store take ~3 s of Python (1.7 s and 1 s on 2 cores). A
    thread doing it beside the first epoch stalled that epoch about as long (it holds the GIL
    between the training thread's torch calls), and logging at the end of a stage needed MLflow
    imported all the same. The child spends those seconds on the core that training leaves free
    (``atric.device.default_threads``), then serves one request at a time, one JSON line each way
    (``call``). A fresh interpreter, not a fork: nothing of this process (database connections,
    torch's threads) is carried over; it has this process's environment and folder.

    ``preload_model``: the child also imports what logging the model needs (torch), so that
    ``log_model`` at the end of a stage does not wait for it. The child ignores SIGINT and
    SIGTERM (this process decides how its runs end); once this process is gone (end of file on
    its stdin), it ends every run it opened that it was never asked to end KILLED, and exits.
    """

    def __init__(self, *, preload_model: bool = False) -> None:
        command = [sys.executable, "-m", __name__] + (["--preload-model"] if preload_model else [])
        # The child imports the atric this process runs (a checkout's src/ before an installed copy).
        source = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
        # stdout carries the replies only; the child's logs go to our stderr.
        self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._lock = threading.Lock()
        self._last_id = 0
        self._received = b""
        self.used = False

    def call(self, op: str, **args: Any) -> Any:
        """Run ``op`` (one of ``_Served.ops``) in the child; its error is raised here (``MlflowCallError``
        or the ``AtricError`` it raised)."""
        with self._lock:
            self.used = True
            self._last_id += 1
            request_id = self._last_id
            self._send(json.dumps({"id": request_id, "op": op, "args": args}, default=str).encode() + b"\n")
            reply = self._receive(request_id)
        if "error" in reply:
            raise _error_from_doc(reply["error"])
        return reply.get("result")

    def log_metrics_to_run(self, run_id: str, metrics: Mapping[str, float]) -> None:
        """``log_metrics_to_run`` in the child; a failure is a one-line TrackingError naming the run."""
        try:
            self.call("log_metrics_to_run", run_id=run_id, metrics={k: float(v) for k, v in metrics.items()})
        except MlflowCallError as exc:
            raise TrackingError(f"MLflow at {display_uri()}: cannot log metrics to run {run_id}: {exc.message}") from exc

    @uninterruptible  # a request half-written would garble the next one
    def _send(self, data: bytes) -> None:
        assert self._proc.stdin is not None
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._proc.stdin.fileno(), view)
            except BrokenPipeError:
                raise self._gone() from None
            view = view[written:]

    def _receive(self, request_id: int) -> dict[str, Any]:
        # The wait is interruptible; taking a reply is not. A reply to a request that an interrupt
        # abandoned arrives later and is dropped: the child finished that request all the same.
        while (reply := self._take_reply(request_id)) is None:
            select.select([self._proc.stdout], [], [])
            self._read_available()
        return reply

    @uninterruptible
    def _take_reply(self, request_id: int) -> dict[str, Any] | None:
        while b"\n" in self._received:
            line, self._received = self._received.split(b"\n", 1)
            reply = json.loads(line)
            if reply.get("id") == request_id:
                return dict(reply)
        return None

    @uninterruptible
    def _read_available(self) -> None:
        assert self._proc.stdout is not None
        chunk = os.read(self._proc.stdout.fileno(), 1 << 16)
        if not chunk:
            raise self._gone()
        self._received += chunk

    def _gone(self) -> MlflowCallError:
        code = self._proc.poll()
        why = f"exited with code {code}" if code is not None else "closed its output"
        return MlflowCallError(f"the MLflow logging process {why} (see its messages above)", transient=True)

    def close(self, timeout: float = 60) -> None:
        """Let the child end what it must (end of file) and exit; an unused child is stopped."""
        if self._proc.poll() is not None:
            return
        if not self.used:
            self._proc.kill()
        else:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout)
        except KeyboardInterrupt:
            self._proc.kill()
            self._proc.wait()
            raise
        except subprocess.TimeoutExpired:  # e.g. ending a left-behind run on a server that is down
            self._proc.kill()
            self._proc.wait()
            log.warning("the MLflow logging process did not exit within %.0f s: stopped", timeout)

    def __enter__(self) -> TrackingProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error_doc(exc: BaseException) -> dict[str, Any]:
    """An error raised in the child, as the parent rebuilds it (``_error_from_doc``)."""
    try:
        transient = is_transient(exc)
    except Exception:  # noqa: BLE001 -- describing the error must not replace it
        transient = False
    atric = isinstance(exc, AtricError)
    doc: dict[str, Any] = {
        "type": type(exc).__name__,
        "message": redact(str(exc)) if atric else describe(exc),
        "transient": transient,
        "code": getattr(exc, "error_code", None),
        "atric": atric,
    }
    if atric and exc.__cause__ is not None:
        doc["cause"] = _error_doc(exc.__cause__)
    return doc


def _error_from_doc(doc: Mapping[str, Any]) -> Exception:
    kinds = {cls.__name__: cls for cls in (TrackingError, errors.DataError, errors.ConfigError, errors.CheckpointError)}
    # Another AtricError (one line for the user, exit 2) stays one: a TrackingError with its text.
    kind = kinds.get(doc["type"]) or (TrackingError if doc.get("atric") else None)
    if kind is None:
        return MlflowCallError(doc["message"], transient=bool(doc["transient"]), error_code=doc.get("code"))
    error = kind(doc["message"])
    if "cause" in doc:
        error.__cause__ = _error_from_doc(doc["cause"])
    return error


class OpeningRun:
    """An MLflow run that the :class:`TrackingProcess` opens while the first epoch trains.

    A thread waits for the child's answer (the child opens the run on the other core; waiting
    on a pipe holds no GIL): the epochs need not wait for it. The thread starts when the
    epochs begin (:meth:`start`, from the engine's ``on_train_begin``) or when the run is needed.
    """

    def __init__(self, open_run: Callable[[], str], *, process: TrackingProcess) -> None:
        self.process = process
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
    process: TrackingProcess | None = None,
) -> Iterator[OpeningRun]:
    """Start (or re-open, when ``run_dir`` names an unfinished run) an MLflow run.

    The run is opened by ``process`` (a TrackingProcess of the block's own when None) once the
    body calls ``start`` (or needs the run: ``wait``; a body that fails first still gets its
    run, ended FAILED); the body learns of an unreachable MLflow from ``poll``/``wait``.
    Nested: the calling thread's active run is the parent. The run ends FINISHED on success,
    KILLED on interrupt/SIGTERM, FAILED on an error. A run whose process was SIGKILLed ends
    KILLED when the TrackingProcess sees it gone (RUNNING if that process was killed too, until
    the same command runs again, which re-opens it).
    """
    parent_id = None
    if nested:
        import mlflow

        parent = mlflow.active_run()
        parent_id = parent.info.run_id if parent is not None else None
    all_tags = {k: redact(v) for k, v in {RUN_NAME_TAG: run_name, "git_commit": git_commit(), **tags}.items()}
    start_ms = int(time.time() * 1000)
    with contextlib.ExitStack() as own:
        if process is None:
            process = own.enter_context(TrackingProcess())
        opener = functools.partial(
            _open_run, process, experiment, run_name, run_dir, params, all_tags, resume, parent_id, start_ms
        )
        opening = OpeningRun(opener, process=process)
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
                    _tag_failure(process, run_id, reason)
                _end_run(process, run_id, run_name, run_dir, status, failed)


def _open_run(
    process: TrackingProcess,
    experiment: str,
    run_name: str,
    run_dir: Path,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    resume: bool,
    parent_id: str | None,
    start_ms: int,
) -> str:
    """Have ``process`` create (or re-open) the run and record its id beside the checkpoints."""
    return str(
        process.call(
            "open_run", experiment=experiment, run_name=run_name, run_dir=str(run_dir), params=dict(params),
            tags=dict(tags), resume=resume, parent_id=parent_id, start_ms=start_ms,
        )  # fmt: skip
    )


def _failure_line(reason: str) -> str:
    return redact(" ".join(reason.split()))[:5000]


def _tag_failure(process: TrackingProcess, run_id: str, reason: str) -> None:
    """Record why the run stopped (first line, redacted); MLflow being down must not mask the error."""
    try:
        process.call("set_tag", run_id=run_id, key=FAILURE_TAG, value=_failure_line(reason))
    except Exception as exc:  # the reason is on stderr anyway
        log.warning("cannot tag MLflow run %s with its failure reason: %s", run_id, describe(exc))


def _end_run(process: TrackingProcess, run_id: str, run_name: str, run_dir: Path, status: str, failed: bool) -> None:
    """End the run; the server may be down now too.

    After an error, a failing end only warns: the error that ended the run is the one
    to report (the run stays RUNNING and a rerun re-opens it). After success it raises a
    TrackingError, as the run is not complete in MLflow yet.
    """
    try:
        process.call("end_run", run_id=run_id, status=status)
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
        # [name, value, time in ms, epoch], in the order they were produced
        self.pending: list[list[Any]] = []
        self.logged_steps: set[int] = set()  # epochs sent by this logger
        self.last_error: BaseException | None = None
        self._outage = False

    def on_train_begin(self) -> None:
        self.run.start()

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.pending.extend([_metric_name(k), float(v), now, epoch] for k, v in metrics.items())
        if self.run.poll() is not None:
            self.flush()

    def flush(self) -> bool:
        """Send what is buffered (once the run is open); True when nothing is left.

        Unreachable MLflow: False, no raise.
        """
        run_id = self.run.wait()
        while self.pending:
            batch = self.pending[:MAX_BATCH_METRICS]
            try:
                self.run.process.call("log_batch", run_id=run_id, metrics=batch)
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
            self.logged_steps.update(int(row[3]) for row in batch)
        if self._outage:
            self._outage = False
            log.warning("MLflow at %s reachable again: buffered metrics logged", display_uri())
        self.last_error = None
        return True

    @property
    def pending_steps(self) -> list[int]:
        return sorted({int(row[3]) for row in self.pending})


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


# --------------------------------------------------------------------------- in the TrackingProcess


def log_metrics_to_run(run_id: str, metrics: Mapping[str, float]) -> None:
    """Log into a run that may have ended (e.g. test metrics after training), at step 0."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    configure()
    now = int(time.time() * 1000)
    MlflowClient().log_batch(
        run_id, metrics=[Metric(_metric_name(k), float(v), now, 0) for k, v in metrics.items()]
    )


def backfill_history(run_id: str, history: Sequence[Mapping[str, float]], skip_steps: Sequence[int]) -> int:
    """Log the epochs of ``history`` the run lacks (a rerun after MLflow was down); returns the count.

    Epochs in ``skip_steps`` were just logged by this process; the others are compared with
    the run's own metric history, so nothing is logged twice.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    rows = [row for row in history if int(row["epoch"]) not in set(skip_steps)]
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


class _Served:
    """What the child's requests do, and the runs it opened (ended KILLED if left behind)."""

    def __init__(self) -> None:
        self.opened: set[str] = set()
        self.ending: set[str] = set()  # asked to end (whether or not MLflow answered)

    def open_run(self, experiment: str, run_name: str, run_dir: str, params: Mapping[str, Any],
                 tags: Mapping[str, str], resume: bool, parent_id: str | None, start_ms: int) -> str:  # fmt: skip
        """Create (or re-open) the run through the client, record its id beside the checkpoints."""
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking.context.registry import resolve_tags

        folder = Path(run_dir)
        configure()
        exp_id = experiment_id(experiment)
        client = MlflowClient()
        run_id = recorded_run_id(folder) if resume else None
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
        self.opened.add(run_id)
        try:
            if new:
                logged = [Param(k, _param_value(v)) for k, v in params.items()]
                for begin in range(0, len(logged), MAX_BATCH_PARAMS):
                    client.log_batch(run_id, params=logged[begin : begin + MAX_BATCH_PARAMS])
            folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(folder / RUN_ID_FILE, json.dumps({"run_id": run_id}) + "\n")
        except BaseException as exc:  # a run-id file that cannot be written ends the run FAILED, not RUNNING
            self.abandon(run_id, "FAILED", f"{type(exc).__name__}: {exc}")
            raise
        return run_id

    def log_batch(self, run_id: str, metrics: Sequence[Sequence[Any]]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        # A batch sent again (its reply was abandoned to an interrupt) adds nothing: MLflow's SQL
        # store keeps one row per (key, value, time, step).
        MlflowClient().log_batch(run_id, metrics=[Metric(*row) for row in metrics])

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        from mlflow import MlflowClient

        MlflowClient().set_tag(run_id, key, value)

    def end_run(self, run_id: str, status: str) -> None:
        import mlflow

        self.ending.add(run_id)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:  # log_model made it the active run
            mlflow.end_run(status=status)  # pops the active run before the request: never left active
        else:
            mlflow.MlflowClient().set_terminated(run_id, status)

    def log_artifact(self, run_id: str, path: str, folder: str) -> None:
        from mlflow import MlflowClient

        MlflowClient().log_artifact(run_id, path, artifact_path=folder)

    def log_model(self, run_id: str, best_path: str) -> None:
        import mlflow

        from atric.ops.experiment import log_best_model

        active = mlflow.active_run()
        if active is None or active.info.run_id != run_id:
            mlflow.start_run(run_id=run_id)  # MLflow's log_model logs into the active run
        log_best_model(Path(best_path))

    def abandon(self, run_id: str, status: str, reason: str) -> None:
        """End a run that nobody else will end; MLflow failing here only warns."""
        try:
            self.set_tag(run_id, FAILURE_TAG, _failure_line(reason))
            self.end_run(run_id, status)
        except Exception as exc:
            log.warning("cannot mark MLflow run %s %s: %s", run_id, status, describe(exc))

    def ops(self) -> dict[str, Callable[..., Any]]:
        return {
            "open_run": self.open_run,
            "log_batch": self.log_batch,
            "set_tag": self.set_tag,
            "end_run": self.end_run,
            "log_artifact": self.log_artifact,
            "log_model": self.log_model,
            "log_metrics_to_run": log_metrics_to_run,
            "backfill_history": backfill_history,
        }


def _serve(preload_model: bool) -> int:
    """The child of TrackingProcess: open MLflow, then answer requests until end of file."""
    from atric.redact import install_log_redaction

    # The parent decides how its runs end (Ctrl-C reaches the whole process group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Registered first, so run last: the exit then skips a garbage collection over every object
    # MLflow and torch made (atric.cli does the same for the stages).
    atexit.register(gc.freeze)
    install_log_redaction()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a library's print() cannot garble a reply
    served = _Served()
    try:
        from mlflow import MlflowClient

        configure()
        with store_lock():
            MlflowClient()  # opens the store (the SQLite schema check) before the first request
        if preload_model:  # what log_model needs, so that the end of a stage does not wait for it
            import mlflow.pyfunc  # noqa: F401
            import mlflow.pytorch  # noqa: F401
            from mlflow.models import infer_signature  # noqa: F401

            import atric.ops.experiment  # noqa: F401 -- torch
    except Exception as exc:  # noqa: BLE001 -- each request raises it again, as the parent's error
        log.debug("MLflow not ready: %s", describe(exc))
    ops = served.ops()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            reply = {"id": request["id"], "result": ops[request["op"]](**request["args"])}
        except Exception as exc:
            reply = {"id": request["id"], "error": _error_doc(exc)}
        try:
            replies.write(json.dumps(reply).encode() + b"\n")
            replies.flush()
        except BrokenPipeError:
            pass  # the parent is gone: end of file comes next
    for run_id in sorted(served.opened - served.ending):
        served.abandon(run_id, "KILLED", "the training process ended without closing its run")
    return 0


if __name__ == "__main__":
    sys.exit(_serve(preload_model="--preload-model" in sys.argv[1:]))
