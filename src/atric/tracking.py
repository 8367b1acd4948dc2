"""MLflow tracking: one experiment per dataset, one run per ``<expert>-<pooling>``.

Default store: ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts``
(MLflow 3 refuses the plain file store). ``MLFLOW_TRACKING_URI`` switches to a server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from atric.atomic import write_text_atomic
from atric.errors import AtricError

MLRUNS_DIR = Path("mlruns")
DEFAULT_TRACKING_URI = f"sqlite:///{MLRUNS_DIR}/mlflow.db"
ARTIFACTS_DIR = MLRUNS_DIR / "artifacts"
CHAMPION_ALIAS = "champion"
RUN_ID_FILE = "mlflow_run.json"  # beside the checkpoints: lets a resumed run log to the same MLflow run
RUN_NAME_TAG = "atric.run_name"


class TrackingError(AtricError):
    """The tracking server cannot be reached or refused a request."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


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
        raise TrackingError(f"MLflow at {tracking_uri()}: {exc.message}") from exc


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _previous_run_id(run_dir: Path) -> str | None:
    path = run_dir / RUN_ID_FILE
    if not path.exists():
        return None
    try:
        return str(json.loads(path.read_text())["run_id"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """DVC and schedulers stop a stage with SIGTERM: turn it into KeyboardInterrupt so the run is closed."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
) -> Iterator[Any]:
    """Start (or re-open, when ``run_dir`` names an unfinished run) an MLflow run.

    The run ends FINISHED on success, KILLED on interrupt/SIGTERM, FAILED on an error.
    A SIGKILLed run stays RUNNING until the same command runs again, which re-opens it.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    configure()
    exp_id = experiment_id(experiment)
    run_id = _previous_run_id(run_dir) if resume else None
    if run_id is not None:
        try:
            if mlflow.get_run(run_id).info.status == "FINISHED":
                run_id = None  # a finished run is history; a new training run gets a new MLflow run
        except MlflowException:
            run_id = None
    all_tags = {RUN_NAME_TAG: run_name, "git_commit": git_commit(), **tags}
    try:
        active = mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else exp_id,
            run_name=None if run_id else run_name,
            tags=all_tags,
            nested=nested,
        )
    except MlflowException as exc:
        raise TrackingError(f"MLflow at {tracking_uri()}: cannot start run {run_name!r}: {exc.message}") from exc
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / RUN_ID_FILE, json.dumps({"run_id": active.info.run_id}) + "\n")
    status = "FAILED"
    try:
        with _terminate_as_interrupt():
            if run_id is None:
                mlflow.log_params({k: _param_value(v) for k, v in params.items()})
            else:
                mlflow.set_tag("resumed", "true")
            yield active
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]  # MLflow's limit on a param value


class EpochMetricsLogger:
    """Engine callback: per-epoch metrics into the active MLflow run."""

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        import mlflow

        mlflow.log_metrics({_metric_name(k): float(v) for k, v in metrics.items()}, step=epoch)


def _metric_name(name: str) -> str:
    # MLflow accepts letters, digits, _ - . space / only.
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in name)


def log_metrics(metrics: Mapping[str, float], prefix: str = "", step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({_metric_name(prefix + k): float(v) for k, v in metrics.items()}, step=step)


def register_champion(run_id: str, model_name: str, artifact_path: str = "model") -> str:
    """Register the run's logged model and point the ``champion`` alias at the new version."""
    import mlflow
    from mlflow import MlflowClient

    version = mlflow.register_model(f"runs:/{run_id}/{artifact_path}", model_name)
    MlflowClient().set_registered_model_alias(model_name, CHAMPION_ALIAS, version.version)
    return str(version.version)


def log_metrics_to_run(run_id: str, metrics: Mapping[str, float]) -> None:
    """Log into a run that may have ended (e.g. test metrics after training)."""
    import time as _time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    configure()
    now = int(_time.time() * 1000)
    MlflowClient().log_batch(
        run_id, metrics=[Metric(_metric_name(k), float(v), now, 0) for k, v in metrics.items()]
    )
