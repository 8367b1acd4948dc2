"""Hyperparameter search (atric.ops.tuning, src/tune.py) against real storages: SQLite files,
a PostgreSQL server started here on 127.0.0.1, and an MLflow SQLite store; worker processes
are real `python src/tune.py` processes, one of them SIGKILLed mid-trial."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from environment import skip_or_fail
import torch
import yaml
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).parent))
import fakes

from atric import engine
from atric.ops import services, tuning
from atric.config import load_params
from atric.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TUNE = REPO / "src" / "tune.py"
SPACE = {
    "lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True},
    "margin": {"type": "float", "low": 0.05, "high": 0.5},
    "audio_clusters": {"type": "int", "low": 2, "high": 4},
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake")
    fakes.write_fake_layout(root / "data")
    return root


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the module: creating its schema costs seconds, once."""
    directory = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{directory / 'mlflow.db'}"


@pytest.fixture()
def env(mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment of this test and its workers; the test runs in its own tmp_path."""
    values = {
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "PYTHONPATH": str(REPO / "src"),
        "OMP_NUM_THREADS": "1",  # tiny tensors, two workers on shared cores
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ATRIC_OPTUNA_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    return dict(os.environ)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_tune_params(
    directory: Path, data_root: Path, *, train: dict[str, Any] | None = None, **tune: Any
) -> Path:
    raw = fakes.tiny_params(directory, **(train or {}))
    raw["data"]["root"] = str(data_root / "data")
    raw["train"]["models_dir"], raw["train"]["metrics_dir"] = "models", "metrics"
    raw["tune"] = {"space": SPACE, "heartbeat_interval": 1, "grace_period": 3, **tune}
    return fakes.write_params(directory / "params.yaml", raw)


def start_worker(cwd: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(TUNE), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 150) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"worker {proc.pid} did not finish:\n{out[-3000:]}")
    assert proc.returncode == 0, f"worker {proc.pid} exited {proc.returncode}:\n{out[-3000:]}"
    return out


def counts(study: optuna.Study) -> dict[str, int]:
    result: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        result[trial.state.name] = result.get(trial.state.name, 0) + 1
    return result


def mlflow_trial_runs(study_name: str) -> tuple[list[Any], list[Any]]:
    """(parent runs, trial runs) of a study in the configured MLflow store."""
    from mlflow import MlflowClient

    from atric.ops import tracking

    tracking.configure()
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`optuna.study_name` = '{study_name}'")
    parents = [r for r in runs if r.data.tags.get("atric.tune") == "study"]
    trials = [r for r in runs if r.data.tags.get("atric.tune") == "trial"]
    return parents, trials


# --------------------------------------------------------------------------- the space


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dropout": {"type": "float", "low": 0.1, "high": 0.5}}, "dropout: not a train.* param"),
        ({"lr": {"type": "float", "low": 0.1, "high": 0.01}}, "low 0.1 > high 0.01"),
        ({"lr": {"type": "float", "low": 0.0, "high": 0.01, "log": True}}, "log: true needs low > 0"),
        ({"audio_clusters": {"type": "float", "low": 2, "high": 8}}, "audio_clusters: an integer param"),
        (
            {"loss": {"type": "categorical", "choices": ["max_margin", "hinge"]}},
            "'hinge' is not a valid train.loss",
        ),
        ({"lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "tune.space.lr: Input tag 'uniform'"),
        ({"epochs": {"type": "int", "low": 1, "high": 9}}, "epochs: cannot be tuned"),
        ({"batch_size": {"type": "int", "low": 1, "high": 64}}, "1 is not a valid train.batch_size"),
    ],
)
def test_invalid_space_entries_name_the_key(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    path = fakes.write_params(tmp_path / "params.yaml", {"tune": {"space": entry}})
    with pytest.raises(ConfigError, match="tune.space") as info:
        load_params(path)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dropout": {"type": "float", "low": 0.1, "high": 0.5}}, "dropout: not a train.* param"),
        ({"margin": {"type": "float", "low": 0.5, "high": 0.05}}, "low 0.5 > high 0.05"),
    ],
)
def test_cli_refuses_invalid_space_before_any_trial(
    tmp_path: Path, data_root: Path, env: dict[str, str], entry: dict[str, Any], message: str
) -> None:
    path = write_tune_params(tmp_path, data_root)
    raw = yaml.safe_load(path.read_text())
    raw["tune"]["space"] = {**SPACE, **entry}
    fakes.write_params(path, raw)
    done = subprocess.run(
        [sys.executable, str(TUNE), "--n-trials", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "tune.space" in done.stderr
    assert "Traceback" not in done.stderr
    # Nothing touched: no storage file, no study, no trial, no checkpoints.
    assert not (tmp_path / "tune").exists()


def test_study_with_another_space_is_refused(tmp_path: Path, data_root: Path, env: dict[str, str]) -> None:
    """A worker joining with a different tune.space would mix incomparable trials."""
    params = load_params(write_tune_params(tmp_path, data_root))
    tuning.create_study(params)
    tuning.create_study(params)  # load_if_exists: the same space joins
    changed = load_params(tmp_path / "params.yaml", ["tune.space.margin.high=0.9"])
    with pytest.raises(ConfigError, match="another tune.space"):
        tuning.create_study(changed)


# --------------------------------------------------------------------------- workers


@pytest.mark.slow
def test_two_sqlite_workers_finish_exactly_the_total(
    tmp_path: Path, data_root: Path, env: dict[str, str]
) -> None:
    total = 4
    write_tune_params(tmp_path, data_root, train={"epochs": 2}, pruner="none")
    # No --create-only: both workers create the schema and study at once (the file lock's job).
    args = ["--n-trials", str(total), "--total-trials", "--study-name", "duo", "--sampler", "random"]
    workers = [start_worker(tmp_path, env, *args) for _ in range(2)]
    outputs = [finish(w) for w in workers]

    study = optuna.load_study(study_name="duo", storage=f"sqlite:///{tmp_path / 'tune' / 'optuna.db'}")
    assert counts(study) == {"COMPLETE": total}
    assert sorted(t.number for t in study.trials) == list(range(total))
    print(f"\ntrials per worker: {sorted({t.user_attrs['worker'] for t in study.trials})}")

    # Results: best_params.yaml holds the best trial's values in params.yaml key form.
    best = yaml.safe_load((tmp_path / "tune" / "duo" / "best_params.yaml").read_text())
    assert best == {"train": study.best_trial.params}
    assert any(f"-S train.lr={study.best_trial.params['lr']}" in out for out in outputs)
    report = tmp_path / "tune" / "duo" / "report"
    for name in ("optimization_history", "param_importances", "parallel_coordinate"):
        assert (report / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (report / f"{name}.html").stat().st_size > 0
    # Trials wrote under tune/<study>/, never into the pipeline's models/ and metrics/.
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()
    assert (
        tmp_path / "tune" / "duo" / "models" / f"fa-netrvlad-trial{study.best_trial.number}" / "best.pt"
    ).exists()

    # MLflow: one parent run for the study, every trial nested under it.
    parents, runs = mlflow_trial_runs("duo")
    assert len(parents) == 1
    assert len(runs) == total
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
    assert {r.data.tags["optuna.state"] for r in runs} == {"COMPLETE"}
    assert {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
def test_pruning_cuts_trials_in_a_bad_region(
    tmp_path: Path, data_root: Path, env: dict[str, str], one_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two good start-up trials (lr 0.01), then random points of a space that is mostly bad
    (AdamW with lr >= 0.1 collapses retrieval on this data within an epoch or two): the
    median pruner must stop trials after their first epochs."""
    epochs = 4
    path = write_tune_params(
        tmp_path, data_root, train={"epochs": epochs, "optimizer": "adamw"},
        n_trials=6, sampler="random", pruner="median", startup_trials=2, warmup_epochs=0, seed=3,
        space={"lr": {"type": "float", "low": 1.0e-2, "high": 2.0, "log": True}},
    )  # fmt: skip
    params = load_params(path)
    study = tuning.create_study(params)
    for _ in range(2):
        study.enqueue_trial({"lr": 1.0e-2})
    summary = tuning.run_worker(params)
    result = tuning.write_results(params)

    study = tuning.load_study(params)
    trials = study.get_trials(deepcopy=False)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert summary.trials.get("PRUNED", 0) == len(pruned) >= 1
    assert all(len(t.intermediate_values) < epochs for t in pruned)
    assert all(t.params["lr"] > 1.0e-2 for t in pruned)  # the good start-up trials ran to the end
    assert study.best_trial.params["lr"] == 1.0e-2
    saved = sum(epochs - len(t.intermediate_values) for t in pruned)
    with capsys.disabled():
        total_epochs = epochs * len(trials)
        print(
            f"\npruning: {len(pruned)} of {len(trials)} trials pruned, {saved} of {total_epochs} epochs saved"
        )
    assert yaml.safe_load(result.best_params.read_text()) == {"train": study.best_trial.params}

    _, runs = mlflow_trial_runs(study.study_name)
    by_trial = {int(r.data.tags["optuna.trial_number"]): r for r in runs}
    for trial in pruned:
        assert by_trial[trial.number].info.status == "KILLED"
        assert by_trial[trial.number].data.tags["optuna.state"] == "PRUNED"


def sigterm_mid_trial(study: optuna.Study, params: Any, epochs: int) -> None:
    """Run a worker in this process and SIGTERM it (docker stop, a scheduler) once the running
    trial has reported ``epochs`` epochs; the worker ends with KeyboardInterrupt."""

    def stop_when_training() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if running and len(running[0].intermediate_values) >= epochs:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=stop_when_training, daemon=True)
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        tuning.run_worker(params)
    watcher.join()


def test_sigterm_fails_the_running_trial_and_queues_a_retry(
    tmp_path: Path, data_root: Path, env: dict[str, str], one_thread: None
) -> None:
    """docker stop / a scheduler's SIGTERM mid-trial: the trial ends FAIL (not RUNNING), its
    point is queued again (WAITING, same params), the MLflow runs end KILLED."""
    path = write_tune_params(tmp_path, data_root, train={"epochs": 60}, n_trials=3, study_name="stop")
    params = load_params(path)
    study = tuning.create_study(params)

    sigterm_mid_trial(study, params, epochs=1)

    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["fail_reason"] == "interrupted"
    assert trials[1].params == trials[0].params
    parents, runs = mlflow_trial_runs("stop")
    assert [r.info.status for r in runs] == ["KILLED"] and runs[0].data.tags["optuna.state"] == "FAIL"
    assert parents[0].info.status == "KILLED"


def test_a_retried_trial_under_a_length_in_seconds_resumes(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, env: dict[str, str], one_thread: None
) -> None:
    """The presets' train.max_seconds (30 s here, beyond these 1.5-6 s clips) once made every
    retry refuse its failed attempt's last.pt: the check before training resolved other lengths."""
    hop_root = tmp_path_factory.mktemp("hop")
    fakes.write_fake_layout(hop_root / "data", hop_seconds=0.5)
    path = write_tune_params(
        tmp_path, hop_root, train={"epochs": 6, "max_seconds": 30.0}, n_trials=2, study_name="seconds"
    )
    params = load_params(path)
    study = tuning.create_study(params)

    sigterm_mid_trial(study, params, epochs=2)
    tuning.run_worker(params)
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state == TrialState.FAIL
    retry = trials[1]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[0].params
    assert retry.user_attrs["resumed_trial"] == 0


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def postgres() -> Iterator[services.Settings]:
    """A throwaway PostgreSQL on 127.0.0.1 (atric.ops.services), with the `optuna` database."""
    try:
        services.pg_bindir()
    except services.StackError as exc:
        skip_or_fail(str(exc))
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        skip_or_fail("running as root without runuser: PostgreSQL cannot be started")
    state = Path(tempfile.mkdtemp(prefix="atric-tune-pg-"))
    state.chmod(0o711)  # as root, PostgreSQL runs as user postgres: it must enter this dir
    settings = services.Settings.generate(state)
    server = services.Postgres(settings)
    try:
        server.start()
        POSTGRES_SERVERS[settings.pg_port] = server
        yield settings
    finally:
        server.stop(kill=True)
        shutil.rmtree(state, ignore_errors=True)


POSTGRES_SERVERS: dict[int, services.Postgres] = {}  # the fixture's servers, by port (restart tests)


@pytest.mark.slow
def test_postgres_worker_killed_mid_trial_is_failed_and_retried(
    tmp_path: Path, data_root: Path, env: dict[str, str], postgres: services.Settings
) -> None:
    total = 2
    url = postgres.pg_url(services.OPTUNA_DB)
    write_tune_params(tmp_path, data_root, train={"epochs": 25}, pruner="none", sampler="random")
    params = load_params(tmp_path / "params.yaml", [f"tune.storage={url}", "tune.study_name=fleet"])
    tuning.create_study(params)  # the documented "create once before the workers" step
    env = {**env, "ATRIC_OPTUNA_STORAGE": url}  # as the compose file's workers get it
    args = ["--n-trials", str(total), "--total-trials", "--study-name", "fleet", "--no-report"]
    victim, survivor = start_worker(tmp_path, env, *args), start_worker(tmp_path, env, *args)
    try:
        study = optuna.load_study(study_name="fleet", storage=url)
        deadline, killed = time.monotonic() + 90, None
        while killed is None and time.monotonic() < deadline:
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                # Mid-trial: the victim's trial has reported at least one epoch.
                if (
                    trial.user_attrs.get("worker", "").endswith(f":{victim.pid}")
                    and trial.intermediate_values
                ):
                    victim.send_signal(signal.SIGKILL)
                    killed = trial.number
            time.sleep(0.2)
        assert killed is not None, (
            "the victim never ran a trial:\n" + (victim.communicate(timeout=5)[0] or "")[-2000:]
        )
        victim.wait(timeout=10)
        finish(survivor)
    finally:
        for proc in (victim, survivor):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[killed].state == TrialState.FAIL
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retries = [t for t in trials.values() if retried(t) == killed]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == trials[killed].params
    assert counts(study) == {"COMPLETE": total, "FAIL": 1}

    # The retry resumed the killed trial's last.pt and ends exactly as an uninterrupted trial.
    retry = retries[0]
    assert retry.user_attrs["resumed_trial"] == killed
    assert trials[killed].intermediate_values  # it had trained epochs worth resuming
    reference_params = tuning.trial_params(params, retry.params)
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): the same arithmetic
    reference = engine.train(reference_params, run_name="reference", restart=True)
    assert reference.resumed_from == 0
    assert retry.value == reference.best_score
    assert retry.intermediate_values == {
        int(row["epoch"]): row[tuning.OBJECTIVE] for row in reference.history
    }

    # The killed trial's MLflow run was closed as failed by the worker that retried it.
    _, runs = mlflow_trial_runs("fleet")
    killed_run = next(r for r in runs if r.data.tags["optuna.trial_number"] == str(killed))
    assert killed_run.info.status == "FAILED" and killed_run.data.tags["optuna.state"] == "FAIL"


def test_src_uses_no_private_optuna_attributes() -> None:
    """Optuna's private API changes without notice: the tuner uses its public one only."""
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "src").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "._storage" in line or "._trial_id" in line
    ]
    assert not offenders, "\n".join(offenders)


def test_diverged_trial_is_pruned_with_its_reason(
    tmp_path: Path, data_root: Path, env: dict[str, str], one_thread: None
) -> None:
    """A NaN loss is a bad point, not a broken worker: PRUNED, reason recorded, the study goes on."""
    path = write_tune_params(
        tmp_path, data_root, train={"epochs": 2, "optimizer": "adamw"}, n_trials=2, sampler="random",
        pruner="none", study_name="nan", space={"lr": {"type": "float", "low": 1.0e-3, "high": 1.0e12, "log": True}},
    )  # fmt: skip
    params = load_params(path)
    study = tuning.create_study(params)
    study.enqueue_trial({"lr": 1.0e12})
    study.enqueue_trial({"lr": 1.0e-2})
    summary = tuning.run_worker(params)
    first, second = study.get_trials(deepcopy=False)
    assert first.state == TrialState.PRUNED, first.user_attrs
    assert "NaN" in first.user_attrs["prune_reason"] or "loss is" in first.user_attrs["prune_reason"]
    assert second.state == TrialState.COMPLETE
    assert summary.trials == {"PRUNED": 1, "COMPLETE": 1}
    _, runs = mlflow_trial_runs("nan")
    by_trial = {int(r.data.tags["optuna.trial_number"]): r for r in runs}
    assert by_trial[0].data.tags["optuna.state"] == "PRUNED" and by_trial[0].info.status == "KILLED"


def test_dvc_command_reproduces_the_best_trial_exactly(
    tmp_path: Path, data_root: Path, env: dict[str, str], one_thread: None
) -> None:
    """A study run with --pooling and --set: the printed command, applied to params.yaml as on
    disk, gives exactly the best trial's params (not only its sampled keys)."""
    import shlex

    path = write_tune_params(tmp_path, data_root, train={"epochs": 1}, n_trials=1, pruner="none", study_name="cmd")
    file_params = load_params(path)
    params = load_params(path, ["train.pooling=netvlad", "train.epochs=2", "train.text_clusters=3"])
    assert file_params.train.pooling != "netvlad" and file_params.train.text_clusters != 3
    tuning.run_worker(params)
    study = tuning.load_study(params)
    result = tuning.write_results(params, study, plots=False, baseline=file_params)
    words = shlex.split(result.command)
    # Only the trial's run: its evaluate stage as the target, not the pipeline's whole matrix.
    assert words[-1] == "evaluate@fa-netvlad" and "evaluate@fa-netvlad" in result.best_params.read_text()
    words = words[:-1]
    assert words[:3] == ["dvc", "exp", "run"] and words[3::2] == ["-S"] * (len(words[3:]) // 2)
    for key in ("train.pooling=netvlad", "train.epochs=2", "train.text_clusters=3", "train.experts=[fa]"):
        assert key in words, result.command
    reproduced = load_params(path, words[4::2])
    expected = tuning.trial_params(params, study.best_trial.params)
    assert tuning.base_params(reproduced) == tuning.base_params(expected)
    assert result.command in result.best_params.read_text()
    assert yaml.safe_load(result.best_params.read_text()) == {"train": study.best_trial.params}


@pytest.mark.slow
def test_postgres_restart_under_two_busy_workers_loses_and_duplicates_nothing(
    tmp_path: Path, env: dict[str, str], postgres: services.Settings
) -> None:
    """PostgreSQL restarts while two workers train (their heartbeats, reports and tells hit it):
    every storage call is retried until it is back; the study ends with exactly the total."""
    total, epochs = 4, 4
    data = tmp_path / "big"
    # Epochs of ~1 s: the restart falls inside the workers' trials.
    fakes.write_fake_layout(data / "data", clips={"train": 600, "val": 40, "test": 10}, frames=(40, 80))
    url = postgres.pg_url(services.OPTUNA_DB)
    write_tune_params(tmp_path, data, train={"epochs": epochs}, pruner="none", sampler="random", grace_period=30)
    params = load_params(tmp_path / "params.yaml", [f"tune.storage={url}", "tune.study_name=outage"])
    tuning.create_study(params)
    args = ["--n-trials", str(total), "--total-trials", "--study-name", "outage", "--no-report"]
    workers = [start_worker(tmp_path, {**env, "ATRIC_OPTUNA_STORAGE": url}, *args) for _ in range(2)]
    try:
        study = optuna.load_study(study_name="outage", storage=url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if len(running) == 2 and all(t.intermediate_values for t in running):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the two workers never trained at the same time")
        server = POSTGRES_SERVERS[postgres.pg_port]
        server.stop()
        time.sleep(2)  # heartbeats and reports fail meanwhile
        server.start()
        outputs = [finish(w, timeout=240) for w in workers]
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert any("unreachable" in out and "retrying" in out for out in outputs), outputs[0][-2000:]
    study = optuna.load_study(study_name="outage", storage=url)
    assert counts(study) == {"COMPLETE": total}, [o[-1500:] for o in outputs]
    assert sorted(t.number for t in study.trials) == list(range(total))
    assert all(sorted(t.intermediate_values) == list(range(1, epochs + 1)) for t in study.trials)


def test_the_study_names_its_objective(tmp_path: Path, data_root: Path, env: dict[str, str]) -> None:
    """Optuna's plots and optuna-dashboard show the metric's name, not "Objective 0"."""
    study = tuning.create_study(load_params(write_tune_params(tmp_path, data_root, study_name="named")))
    assert study.metric_names == ["val_t2a_geometric_mean"]
    assert tuning.load_study(load_params(tmp_path / "params.yaml")).metric_names == ["val_t2a_geometric_mean"]
