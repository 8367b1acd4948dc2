"""The MLflow run is opened beside the first epoch, not before it (issue #17), and keeps every
guarantee of a run opened up front (issue #14): all epochs logged in order, a failure ends
the run FAILED with its reason, an unreachable MLflow stops the stage, nothing trained is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fakes

from atric.config import Params
from atric.engine import RunPaths
from atric.ops import interrupts, tracking
from atric.ops.experiment import train_tracked

RUN = "fa-netrvlad"  # run_name_for(fakes.tiny_params)
EVENT_TIMEOUT_S = 60


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A local MLflow store of the test's own; the client reading it."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the local store's artifacts go to ./mlruns
    return MlflowClient(uri)


def _params(data_root: Path, tmp_path: Path, **train: object) -> Params:
    raw = fakes.tiny_params(tmp_path, **train)
    raw["data"]["root"] = str(data_root / "data")
    return Params.model_validate(raw)


def _runs(client: Any) -> list[Any]:
    return [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]


def _unreachable() -> tracking.TrackingError:
    """What opening raises when the server refuses connections (a transient MLflow error)."""
    from mlflow.exceptions import MlflowException

    error = tracking.TrackingError("MLflow at http://127.0.0.1:9: cannot start run 'fa-netrvlad': refused")
    error.__cause__ = MlflowException("connection refused", error_code="INTERNAL_ERROR")
    return error


class _Gate:
    """Holds the opener thread back until the training thread opens the gate."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: BaseException | None = None) -> None:
        self.opened = threading.Event()
        self.waited = False
        real = tracking._open_run

        def gated(*args: Any, **kwargs: Any) -> str:
            self.waited = self.opened.wait(EVENT_TIMEOUT_S)
            if fail is not None:
                raise fail
            return real(*args, **kwargs)

        monkeypatch.setattr(tracking, "_open_run", gated)


class _OnEpoch:
    def __init__(self, epoch: int, action: Any) -> None:
        self.epoch, self.action = epoch, action

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch == self.epoch:
            self.action()


def test_epochs_train_while_the_run_opens_and_every_epoch_reaches_mlflow_in_order(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: Any
) -> None:
    gate = _Gate(monkeypatch)
    runs_before_open: list[int] = []

    def open_after_epoch_2() -> None:
        runs_before_open.append(len(_runs(store)))
        gate.opened.set()

    params = _params(data_root, tmp_path, epochs=4)
    result = train_tracked(params, callbacks=[_OnEpoch(2, open_after_epoch_2)], log_model=False)

    assert gate.waited, "the opener was never released"
    assert runs_before_open == [0]  # two epochs trained before the run existed
    (run,) = _runs(store)
    assert run.info.status == "FINISHED" and run.info.run_name == RUN
    assert run.data.params["train.epochs"] == "4"
    assert run.data.tags[tracking.RUN_NAME_TAG] == RUN and "mlflow.user" in run.data.tags
    # Buffered while the run was opening, yet each epoch once, with its own step and value.
    for key in ("val_t2a_R1", "train_loss"):
        history = store.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3, 4]
        assert [m.value for m in history] == pytest.approx([row[key] for row in result.history])
        assert [m.timestamp for m in history] == sorted(m.timestamp for m in history)
    assert run.info.start_time <= history[0].timestamp  # the run starts when training began
    run_file = result.paths.run_dir / tracking.RUN_ID_FILE
    assert json.loads(run_file.read_text())["run_id"] == run.info.run_id


def test_a_failure_while_the_run_is_opening_still_ends_it_failed_with_the_reason(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: Any
) -> None:
    gate = _Gate(monkeypatch)

    def fail() -> None:
        gate.opened.set()  # the run gets opened while the error is on its way up
        raise RuntimeError("disk on fire")

    params = _params(data_root, tmp_path, epochs=3)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train_tracked(params, callbacks=[_OnEpoch(1, fail)], log_model=False)

    (run,) = _runs(store)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.FAILURE_TAG] == "RuntimeError: disk on fire"
    assert [m.step for m in store.get_metric_history(run.info.run_id, "val_t2a_R1")] == [1]  # sent first


def test_mlflow_unreachable_when_training_begins_stops_at_the_first_epoch_end(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: Any
) -> None:
    gate = _Gate(monkeypatch, fail=_unreachable())
    gate.opened.set()
    params = _params(data_root, tmp_path, epochs=5)

    with pytest.raises(tracking.TrackingError, match="cannot start run"):
        train_tracked(params, log_model=False)

    paths = RunPaths.of(params.train, RUN)
    history = json.loads(paths.history.read_text())
    assert [row["epoch"] for row in history] == [1]  # not five epochs for a run nobody records
    assert paths.last.is_file()  # epoch 1 is kept: the same command continues it
    assert _runs(store) == []


def test_training_that_ends_before_mlflow_answers_is_logged_by_the_rerun_without_retraining(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: Any
) -> None:
    gate = _Gate(monkeypatch, fail=_unreachable())
    params = _params(data_root, tmp_path, epochs=2)

    class ReleaseAtTheEnd:
        def on_train_end(self, result: Any) -> None:
            gate.opened.set()

    with pytest.raises(tracking.TrackingError) as info:
        train_tracked(params, callbacks=[ReleaseAtTheEnd()], log_model=False)
    assert "finished locally" in str(info.value) and "training is not repeated" in str(info.value)
    paths = RunPaths.of(params.train, RUN)
    assert tracking.tracking_pending(paths.run_dir) and _runs(store) == []

    monkeypatch.undo()  # MLflow is back
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    result = train_tracked(params, policy="pipeline", log_model=False)  # as `dvc repro` reruns it

    assert result.epochs_run == 0
    (run,) = _runs(store)
    assert run.info.status == "FINISHED"
    assert [m.step for m in store.get_metric_history(run.info.run_id, "val_t2a_R1")] == [1, 2]
    assert not tracking.tracking_pending(paths.run_dir)


class _SlowEpochs:
    """Epochs long enough that a deferred signal lands inside training."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        time.sleep(0.2)


def test_sigterm_while_an_epoch_is_logged_ends_the_run_killed_with_each_epoch_once(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: Any
) -> None:
    """SIGTERM while the stage waits for the child to log epoch 2: the child logs it all the
    same, the stage stops, the error path sends the buffer again (epoch 2 not twice), and the
    calls after it (tag, end KILLED) get their own replies, not the abandoned one."""
    real_receive = tracking.TrackingProcess._receive
    signalled: list[int] = []

    def receive(self: tracking.TrackingProcess, request_id: int) -> dict[str, Any]:
        if not signalled and request_id > 2:  # after open_run and epoch 1's log_batch
            signalled.append(request_id)
            signal.raise_signal(signal.SIGTERM)  # raised here, in the interruptible wait
        return real_receive(self, request_id)

    monkeypatch.setattr(tracking.TrackingProcess, "_receive", receive)
    params = _params(data_root, tmp_path, epochs=40)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        train_tracked(params, callbacks=[_SlowEpochs()], log_model=False)
    elapsed = time.monotonic() - started

    assert signalled, "no epoch was logged"
    (run,) = _runs(store)
    assert run.info.status == "KILLED", run.data.tags.get(tracking.FAILURE_TAG)
    assert run.data.tags[tracking.FAILURE_TAG] == "interrupted (SIGTERM)"
    steps = [m.step for m in store.get_metric_history(run.info.run_id, "val_t2a_R1")]
    assert steps == list(range(1, len(steps) + 1)) and 2 <= len(steps) < 40
    assert elapsed < 60


@pytest.mark.parametrize("protected", ["uninterruptible", "sqlalchemy"])
def test_an_interrupt_inside_a_protected_call_waits_until_the_call_returns(protected: str) -> None:
    """Inside an @uninterruptible function (a request to the tracking process) or a SQLAlchemy
    call (a tuner's in-process SQLite write: an interrupt there left the write lock held), a
    SIGTERM is deferred until the call has returned, then raised."""
    done: list[str] = []
    code = "def call():\n    signal.raise_signal(signal.SIGTERM)\n    time.sleep(0.2)\n    done.append('returned')\n"
    namespace: dict[str, Any] = {"signal": signal, "time": time, "done": done}
    namespace["__name__"] = "sqlalchemy.engine.default" if protected == "sqlalchemy" else __name__
    exec(code, namespace)
    call = namespace["call"]
    if protected == "uninterruptible":
        call = interrupts.uninterruptible(call)
    with interrupts.stop_signals_as_interrupt():
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            call()
            done.append("after")
            time.sleep(5)  # the deferred signal comes back within DEFER_SECONDS
    assert done == ["returned", "after"]


def test_a_stage_never_imports_mlflow_itself(data_root: Path, tmp_path: Path) -> None:
    """Training and evaluation reach MLflow through the TrackingProcess (issue #17: importing it
    beside the first epoch stalled that epoch ~3 s); the run is complete all the same."""
    from mlflow import MlflowClient

    params = fakes.write_params(tmp_path / "params.yaml", fakes.tiny_params(data_root, epochs=2))
    script = (
        "import sys\n"
        "from atric.config import load_params\n"
        "from atric.ops.experiment import train_tracked\n"
        f"result = train_tracked(load_params({str(params)!r}), log_model=True)\n"
        "print('mlflow imported:', 'mlflow' in sys.modules, result.best_epoch)\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(fakes.REPO / "src")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mlflow imported: False" in done.stdout
    client = MlflowClient(uri)
    (run,) = _runs(client)
    assert run.info.status == "FINISHED" and "best_val_t2a_R1" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_t2a_R1")] == [1, 2]
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run.info.run_id]  # the model was logged into the run

    # The same command again, with nothing left to train: no second FINISHED run of the same name.
    again = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.split()[-1] == done.stdout.split()[-1]  # the same best epoch
    assert [r.info.run_id for r in _runs(client)] == [run.info.run_id]


def test_stop_signals_are_taken_over_only_from_python_defaults() -> None:
    def own(signum: int, frame: Any) -> None:
        pass

    before = signal.getsignal(signal.SIGTERM)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with interrupts.stop_signals_as_interrupt():
            assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is not before
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

        for kept in (own, signal.SIG_IGN):  # a caller's own Ctrl-C handler; a job started with `&`
            signal.signal(signal.SIGINT, kept)
            with interrupts.stop_signals_as_interrupt():
                assert signal.getsignal(signal.SIGINT) is kept
    finally:
        signal.signal(signal.SIGINT, previous)

    seen: list[Any] = []
    thread = threading.Thread(target=lambda: seen.append(_enter_off_the_main_thread()))
    thread.start()
    thread.join()
    assert seen == [before]  # handlers can only be set on the main thread: left alone


def _enter_off_the_main_thread() -> Any:
    with interrupts.stop_signals_as_interrupt():
        return signal.getsignal(signal.SIGTERM)


def test_tracking_process_logs_into_an_ended_run_and_names_the_run_it_cannot_log_to(store: Any) -> None:
    """Evaluate stages log their test metrics through a child that imported MLflow meanwhile."""
    run = store.create_run(store.create_experiment("child"))
    store.set_terminated(run.info.run_id)
    missing = "0" * 32
    with tracking.TrackingProcess() as child:
        child.log_metrics_to_run(run.info.run_id, {"test_t2a_R1": 12.5, "test_t2a_R@10": 50})
        with pytest.raises(tracking.TrackingError, match=f"cannot log metrics to run {missing}: .*not found"):
            child.log_metrics_to_run(missing, {"test_t2a_R1": 1.0})
        child.log_metrics_to_run(run.info.run_id, {"val_x": 1.0})  # the process serves on after an error

        real_receive = tracking.TrackingProcess._receive
        with pytest.MonkeyPatch.context() as patch:  # Ctrl-C while waiting for a reply (an error, later)

            def interrupted(self: tracking.TrackingProcess, request_id: int) -> dict[str, Any]:
                patch.setattr(tracking.TrackingProcess, "_receive", real_receive)
                raise KeyboardInterrupt

            patch.setattr(tracking.TrackingProcess, "_receive", interrupted)
            with pytest.raises(KeyboardInterrupt):
                child.log_metrics_to_run(missing, {"test_t2a_R1": 1.0})
        child.log_metrics_to_run(run.info.run_id, {"val_y": 2.0})  # its own reply, not the abandoned error
    metrics = store.get_run(run.info.run_id).data.metrics
    assert metrics == {"test_t2a_R1": 12.5, "test_t2a_R_10": 50.0, "val_x": 1.0, "val_y": 2.0}  # MLflow-safe names
    assert store.get_run(run.info.run_id).info.status == "FINISHED"
    assert child._proc.returncode == 0

    unused = tracking.TrackingProcess()
    with unused:
        pass  # nothing to log (e.g. no MLflow run recorded): the child is stopped, not left behind
    assert unused._proc.poll() is not None


def test_errors_in_the_tracking_process_come_back_as_the_same_kind(tmp_path: Path, store: Any) -> None:
    """An AtricError raised in the child (a checkpoint that cannot be read while logging the model)
    is the same one-line error here; an MLflow refusal is an MlflowCallError, not transient."""
    from atric.errors import CheckpointError

    run = store.create_run(store.create_experiment("errors"))
    broken = tmp_path / "best.pt"
    broken.write_bytes(b"not a checkpoint")
    with tracking.TrackingProcess() as child:
        with pytest.raises(CheckpointError, match=f"{broken}: not a readable atric checkpoint"):
            child.call("log_model", run_id=run.info.run_id, best_path=str(broken))
        with pytest.raises(tracking.MlflowCallError, match="not found") as info:
            child.call("set_tag", run_id="0" * 32, key="k", value="v")
    assert not tracking.is_transient(info.value) and info.value.error_code == "RESOURCE_DOES_NOT_EXIST"


def test_a_run_whose_training_process_dies_is_ended_killed_by_the_tracking_process(
    tmp_path: Path, store: Any
) -> None:
    """The stage was SIGKILLed (or crashed) after its run opened: the child sees its stdin end
    and ends the run KILLED with the reason, instead of leaving it RUNNING."""
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from atric.ops import tracking\n"
        "process = tracking.TrackingProcess()\n"
        "run_id = tracking._open_run(process, 'Fake', 'r-mean', Path('r-mean'), {'a': 1}, {}, True, None, 0)\n"
        "print(process._proc.pid, run_id, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(fakes.REPO / "src")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    child_pid, run_id = done.stdout.split()
    deadline = time.monotonic() + 60
    while Path(f"/proc/{child_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    run = store.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[tracking.FAILURE_TAG] == "the training process ended without closing its run"
    assert run.data.params == {"a": "1"}


OPEN_STORE = """
import os, sys, time
from atric.ops import tracking
tracking.configure()
while time.time() < float(sys.argv[1]):  # every process starts at the same moment
    time.sleep(0.001)
print(tracking.experiment_id("together"))
"""


@pytest.mark.slow  # a subprocess kill/restart or several stage processes: make test only
def test_stages_started_together_on_a_new_local_store_share_one_experiment(tmp_path: Path) -> None:
    """src/repro.py starts train stages side by side: on a fresh clone the first two both find no
    store and no experiment; both must get the one experiment, neither may fail making tables."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"}
    start_at = str(time.time() + 8)  # after both have imported MLflow
    procs = [
        subprocess.Popen([sys.executable, "-c", OPEN_STORE, start_at], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1
