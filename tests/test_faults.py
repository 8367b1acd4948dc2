"""Faults of the production stack, for real: a throwaway PostgreSQL + SeaweedFS S3 + MLflow
server (atric.ops.services) on 127.0.0.1, and services stopped and started in the middle of work.

- the MLflow server dies mid-run: training goes on, per-epoch metrics are buffered and sent
  when it returns; if it never returns, a TrackingError and a rerun that completes the run;
- S3 (behind the MLflow server's artifact proxy) dies mid-run: uploads are retried until it
  returns; if it never returns, a TrackingError, the files on disk, and a rerun that uploads;
- PostgreSQL restarts under a tune worker: the worker reconnects and the study completes.

Services are stopped from an engine callback at an exact epoch, so each outage falls where the
test says, not where a timer happens to land. (MLflow down at start: tests/test_stack.py.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pytest
from environment import require_stack_binaries, throwaway_stack

sys.path.insert(0, str(Path(__file__).parent))
import fakes  # noqa: E402

from atric.ops import services, tracking, tuning  # noqa: E402
from atric.config import Params, load_params  # noqa: E402
from atric.engine import RunPaths  # noqa: E402
from atric.ops.experiment import train_tracked  # noqa: E402
from atric.ops.services import Stack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TUNE = REPO / "src" / "tune.py"
RUN = "fa-netrvlad"  # run_name_for(fakes.tiny_params)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_stack_binaries()
    with throwaway_stack("atric-faults-") as stack:
        yield stack


@pytest.fixture()
def stack_up(stack: Stack) -> Iterator[Stack]:
    """The stack, whole again after the test whatever it stopped."""
    yield stack
    if not stack.s3.is_up():
        stack.s3.start()
    if not stack.mlflow.is_up():
        stack.mlflow.start()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake")
    fakes.write_fake_layout(root / "data")
    return root


@pytest.fixture()
def client(stack_up: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """This process as a training client of the stack (as `eval "$(deploy/stack.sh env)"` makes it)."""
    for key, value in stack_up.settings.client_env().items():
        monkeypatch.setenv(key, value)
    # Artifacts are proxied by the server: the client has no S3 keys, so S3 trouble reaches it
    # only through the server, as in production.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key)
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "ATRIC_S3_ATTEMPTS", "ATRIC_S3_BACKOFF"):
        monkeypatch.delenv(key, raising=False)  # tracking.configure's and RetryPolicy's defaults
    monkeypatch.chdir(tmp_path)
    return stack_up


def _params(directory: Path, data_root: Path, **train: Any) -> Params:
    raw = fakes.tiny_params(directory, **train)
    raw["data"]["root"] = str(data_root / "data")
    return load_params(fakes.write_params(directory / "params.yaml", raw))


@dataclass
class Outage:
    """Engine callback: stop a service (as a crash) after one epoch, start it after another.

    It runs after the MLflow logger, so epoch ``stop_after`` is logged before the outage and
    epoch ``start_after`` is the first one training through it. The MLflow run opens beside
    the first epoch (``tracking.OpeningRun``); an outage while it opens fails the stage (as
    it did when the run was opened before training), so the first epoch waits for the run
    here: these outages are mid-run.
    """

    service: Any  # services.MlflowServer | services.SeaweedS3
    run_dir: Path  # RunPaths.run_dir: its run-id file appears once the run is open
    stop_after: int
    start_after: int | None = None
    events: list[str] = field(default_factory=list)

    def on_train_begin(self) -> None:
        deadline = time.monotonic() + 120
        while not (self.run_dir / tracking.RUN_ID_FILE).exists():
            assert time.monotonic() < deadline, "the MLflow run was not opened"
            time.sleep(0.02)

    def on_epoch_end(self, epoch: int, row: dict[str, float]) -> None:
        if epoch == self.stop_after:
            self.service.stop(kill=True)
            self.events.append(f"stopped after {epoch}")
        if epoch == self.start_after:
            self.service.start()
            self.events.append(f"started after {epoch}")


def _run_id(params: Params) -> str:
    return str(json.loads((RunPaths.of(params.train, RUN).run_dir / tracking.RUN_ID_FILE).read_text())["run_id"])


def _warnings(caplog: pytest.LogCaptureFixture, logger: str, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING and text in r.getMessage()]


def _history(run_id: str, key: str) -> list[Any]:
    from mlflow import MlflowClient

    return sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def _artifact_files(run_id: str) -> set[str]:
    from mlflow import MlflowClient

    client = MlflowClient()
    found: set[str] = set()
    folders = [""]
    while folders:
        for item in client.list_artifacts(run_id, folders.pop() or None):
            (folders.append(item.path) if item.is_dir else found.add(item.path))
    return found


def _s3_object(stack: Stack, params: Params, run_id: str, path: str) -> bytes:
    """The artifact as the S3 bucket holds it (read with boto3, not through MLflow)."""
    from mlflow import MlflowClient

    exp = MlflowClient().get_run(run_id).info.experiment_id
    key = f"{services.MLFLOW_ARTIFACTS_PREFIX}/{exp}/{run_id}/artifacts/{path}"
    return bytes(stack.s3.client().get_object(Bucket=stack.settings.bucket, Key=key)["Body"].read())


def _status(run_id: str) -> str:
    import mlflow

    return str(mlflow.get_run(run_id).info.status)


# --------------------------------------------------------------------------- MLflow server down mid-run


def test_mlflow_down_mid_run_training_goes_on_and_buffered_metrics_arrive_in_order(
    client: Stack, data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    params = _params(tmp_path, data_root, epochs=4)
    outage = Outage(client.mlflow, RunPaths.of(params.train, RUN).run_dir, stop_after=1, start_after=2)

    result = train_tracked(params, callbacks=[outage], log_model=False)

    assert outage.events == ["stopped after 1", "started after 2"]
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    run_id = _run_id(params)
    # One warning for the outage, naming the server; one when the buffer went out.
    down = _warnings(caplog, "atric.ops.tracking", "unreachable")
    assert len(down) == 1 and client.settings.mlflow_url in down[0]
    assert len(_warnings(caplog, "atric.ops.tracking", "reachable again")) == 1
    # Every epoch once, with its own step, value and the time it was measured (epoch 2 was
    # buffered through the outage and sent with epoch 3, yet keeps its earlier timestamp).
    for key in ("val_t2a_R1", "train_loss"):
        history = _history(run_id, key)
        assert [m.step for m in history] == [1, 2, 3, 4]
        assert [m.value for m in history] == pytest.approx([row[key] for row in result.history])
        assert [m.timestamp for m in history] == sorted(m.timestamp for m in history)
        assert history[1].timestamp < history[2].timestamp
    assert _status(run_id) == "FINISHED"
    assert {"checkpoints/best.pt", "checkpoints/last.pt", f"metrics/{RUN}.json"} <= _artifact_files(run_id)
    assert not tracking.tracking_pending(result.paths.run_dir)


def test_mlflow_down_until_the_end_is_a_clear_error_and_a_rerun_completes_the_run(
    client: Stack, data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One HTTP-level retry (for a stale keep-alive connection), not configure's two with backoff:
    # the test above runs with those; here they would only add seconds per refused request.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    params = _params(tmp_path, data_root, epochs=3)
    paths = RunPaths.of(params.train, RUN)
    url = client.settings.mlflow_url

    with pytest.raises(tracking.TrackingError) as info:
        outage = Outage(client.mlflow, RunPaths.of(params.train, RUN).run_dir, stop_after=1)
        train_tracked(params, callbacks=[outage], log_model=False)

    message = str(info.value)
    assert "finished locally" in message and url in message
    assert "epochs 2, 3 not sent" in message and "Run the same command again" in message
    assert len(_warnings(caplog, "atric.ops.tracking", "unreachable")) == 1
    # The real error is the one raised: ending the run FAILED failed too, and only warned.
    assert _warnings(caplog, "atric.ops.tracking", "cannot mark MLflow run")
    # Everything training produced is on disk.
    assert paths.best.is_file() and paths.last.is_file() and paths.metrics.is_file()
    assert len(json.loads(paths.history.read_text())) == 3
    assert tracking.tracking_pending(paths.run_dir)

    client.mlflow.start()
    run_id = _run_id(params)
    assert _status(run_id) == "RUNNING"  # nobody could end it

    result = train_tracked(params, log_model=False)  # the same command again

    assert result.epochs_run == 0  # not retrained: the finished last.pt is complete
    assert _run_id(params) == run_id
    assert _status(run_id) == "FINISHED"
    for key in ("val_t2a_R1", "lr"):
        history = _history(run_id, key)
        assert [m.step for m in history] == [1, 2, 3]  # epoch 1 was logged live, not twice
        assert [m.value for m in history] == pytest.approx([row[key] for row in result.history])
    assert "best_val_t2a_R1" in mlflow.get_run(run_id).data.metrics
    assert {"checkpoints/best.pt", "checkpoints/last.pt"} <= _artifact_files(run_id)
    assert not tracking.tracking_pending(paths.run_dir)


# --------------------------------------------------------------------------- S3 down mid-run


class _OnWarning(logging.Handler):
    """Run ``action`` once, in a thread, at the first warning holding ``text`` (the failed upload)."""

    def __init__(self, text: str, action: Any) -> None:
        super().__init__(logging.WARNING)
        self.text, self.action = text, action
        self.thread: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.thread is None and self.text in record.getMessage():
            self.thread = threading.Thread(target=self.action, daemon=True)
            self.thread.start()


def test_s3_down_mid_run_upload_is_retried_and_succeeds_when_s3_returns(
    client: Stack, data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = _params(tmp_path, data_root, epochs=3)
    paths = RunPaths.of(params.train, RUN)
    logger = logging.getLogger("atric.ops.experiment")
    # S3 comes back only once the first upload has failed and been reported: the success
    # afterwards can only come from a retry.
    restart = _OnWarning("failed", client.s3.start)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # as below: our retries are under test
    logger.addHandler(restart)
    try:
        outage = Outage(client.s3, RunPaths.of(params.train, RUN).run_dir, stop_after=1)
        train_tracked(params, callbacks=[outage], log_model=True)
    finally:
        logger.removeHandler(restart)
    assert restart.thread is not None
    restart.thread.join(timeout=60)

    failed = _warnings(caplog, "atric.ops.experiment", "upload of checkpoints/best.pt")
    assert failed and "stays on local disk" in failed[0] and client.settings.mlflow_url in failed[0]
    run_id = _run_id(params)
    assert _status(run_id) == "FINISHED"
    # In the bucket, byte for byte, and the model too.
    for path in (paths.best, paths.last):
        assert _s3_object(client, params, run_id, f"checkpoints/{path.name}") == path.read_bytes()
    exp = mlflow.get_run(run_id).info.experiment_id
    models = mlflow.search_logged_models(experiment_ids=[exp], output_format="list")
    assert [str(m.status) for m in models if m.source_run_id == run_id][-1:] == ["READY"], models


def test_s3_down_past_the_retry_budget_keeps_files_local_and_a_rerun_uploads_them(
    client: Stack, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATRIC_S3_ATTEMPTS", "2")  # a short budget (the default rides out ~25 s)
    monkeypatch.setenv("ATRIC_S3_BACKOFF", "0.2")
    # Our RetryPolicy is the retry under test; more of MLflow's own HTTP retries of the server's
    # 500s would only multiply each attempt's time (the test above runs with configure's defaults).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    params = _params(tmp_path, data_root, epochs=2)
    paths = RunPaths.of(params.train, RUN)

    with pytest.raises(tracking.TrackingError) as info:
        outage = Outage(client.s3, RunPaths.of(params.train, RUN).run_dir, stop_after=1)
        train_tracked(params, callbacks=[outage], log_model=False)

    message = str(info.value)
    assert "failed after 2 attempts" in message and "safe on local disk" in message
    assert f"checkpoints/best.pt ({paths.best})" in message and f"checkpoints/last.pt ({paths.last})" in message
    assert "Run the same command again" in message
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (paths.best, paths.last, paths.metrics)}
    run_id = _run_id(params)
    assert _status(run_id) == "FAILED"  # the server answered; only its S3 was gone
    assert tracking.tracking_pending(paths.run_dir)

    client.s3.start()
    result = train_tracked(params, log_model=False)  # the same command again

    assert result.epochs_run == 0 and _run_id(params) == run_id
    assert _status(run_id) == "FINISHED"
    for path, digest in digests.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # untouched on disk
    for path in (paths.best, paths.last):
        assert _s3_object(client, params, run_id, f"checkpoints/{path.name}") == path.read_bytes()
    assert [m.step for m in _history(run_id, "val_t2a_R1")] == [1, 2]
    assert not tracking.tracking_pending(paths.run_dir)


# --------------------------------------------------------------------------- PostgreSQL restart under tune


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_postgres_restart_under_a_tune_worker_study_completes(
    stack_up: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optuna.trial import TrialState

    total, epochs = 2, 3
    # Epochs of ~1 s (600 clips): the restart falls inside one, between the worker's reports.
    fakes.write_fake_layout(tmp_path / "data", clips={"train": 600, "val": 40, "test": 10}, frames=(40, 80))
    raw = fakes.tiny_params(tmp_path, epochs=epochs)
    raw["train"]["models_dir"], raw["train"]["metrics_dir"] = "models", "metrics"
    url = stack_up.settings.pg_url(services.OPTUNA_DB)
    raw["tune"] = {
        "space": {"lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True}},
        "heartbeat_interval": 1, "grace_period": 10, "pruner": "none", "sampler": "random",
        "study_name": "pg-restart", "storage": url,
    }  # fmt: skip
    params = load_params(fakes.write_params(tmp_path / "params.yaml", raw))
    monkeypatch.chdir(tmp_path)
    # Optuna on the stack's PostgreSQL; MLflow in a local file, so only PostgreSQL is at fault here.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tuning.create_study(params)
    env = {
        **os.environ,
        "ATRIC_OPTUNA_STORAGE": url,
        "PYTHONPATH": str(REPO / "src"),
        "OMP_NUM_THREADS": "1",
    }
    worker = subprocess.Popen(
        [sys.executable, str(TUNE), "--n-trials", str(total), "--total-trials", "--no-report"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    study = tuning.load_study(params)  # its own pool has pre-ping too: it survives the restart
    try:
        def mid_trial() -> bool:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            return bool(running and len(running[0].intermediate_values) == 1)

        _wait_for(mid_trial, 120, "the worker's first trial to report epoch 1")
        time.sleep(0.2)  # past the report and the prune check: the worker trains epoch 2 now
        # Freeze the worker for the restart so it lands in that epoch at a known point, not in
        # the middle of one of its queries: every pooled connection it holds is then dead.
        worker.send_signal(signal.SIGSTOP)
        try:
            stack_up.postgres.stop()
            assert not stack_up.postgres.is_up()
            stack_up.postgres.start()
        finally:
            worker.send_signal(signal.SIGCONT)
        out, _ = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, out[-3000:]

    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == total, (states, out[-3000:])
    # No trial lost: a FAIL is accepted only if its retried copy completed.
    completed_params = [t.params for t in trials if t.state == TrialState.COMPLETE]
    for failed in (t for t in trials if t.state == TrialState.FAIL):
        assert failed.params in completed_params, out[-3000:]
    assert all(len(t.intermediate_values) == epochs for t in trials if t.state == TrialState.COMPLETE)
