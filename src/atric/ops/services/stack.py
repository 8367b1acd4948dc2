"""The whole stack (PostgreSQL, S3, MLflow server) up, down and its status; the DVC remote on it."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from atric.ops.services.mlflow_server import MlflowServer
from atric.ops.services.postgres import Postgres
from atric.ops.services.seaweed import SeaweedS3
from atric.ops.services.settings import REGION, Settings, StackError

# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    settings: Settings
    postgres: Postgres = field(init=False)
    s3: SeaweedS3 = field(init=False)
    mlflow: MlflowServer = field(init=False)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.postgres = Postgres(self.settings)
        self.s3 = SeaweedS3(self.settings)
        self.mlflow = MlflowServer(self.settings)

    @property
    def services(self) -> tuple[Postgres, SeaweedS3, MlflowServer]:
        return (self.postgres, self.s3, self.mlflow)

    def up(self) -> dict[str, float]:
        """Start what is not running; returns seconds from the start until each service was ready."""
        start = time.monotonic()
        try:
            # Overlap the slow starts: weed boots while PostgreSQL initialises, and the MLflow
            # server (which needs only PostgreSQL to boot) imports while weed's filer comes up.
            self.s3.launch()
            self.postgres.start()
            self.timings["postgres"] = time.monotonic() - start
            self.mlflow.launch()
            self.s3.wait_ready()
            self.s3.ensure_bucket(self.settings.bucket)
            self.timings["s3"] = time.monotonic() - start
            self.mlflow.start()
            self.timings["mlflow"] = time.monotonic() - start
        except BaseException:
            self.down()  # never leave half a stack running
            raise
        self.timings["total"] = time.monotonic() - start
        return self.timings

    def down(self) -> None:
        errors: list[str] = []
        for service in reversed(self.services):
            try:
                service.stop()
            except (StackError, OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{service.name}: {exc}")
        if errors:
            raise StackError("; ".join(errors))

    def status(self) -> dict[str, tuple[bool, str]]:
        return {s.name: (s.is_up(), s.url) for s in self.services}


def configure_dvc_remote(repo: Path, settings: Settings, name: str = "stack", url: str | None = None) -> None:
    """Make the stack's S3 the default DVC remote of ``repo``; keys go to the git-ignored ``--local`` config."""
    dvc = [sys.executable, "-m", "dvc"]

    def run(*args: str, value: str) -> None:
        # "--" ends dvc's options, so a value starting with "-" (a random secret can) stays a value;
        # dvc echoes what it could not parse, so the value is kept out of the error.
        done = subprocess.run([*dvc, *args, "--", value], cwd=repo, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            stderr = done.stderr.replace(value, "***").strip()[-500:]
            raise StackError(f"dvc {' '.join(args)} failed: {stderr}")

    run("remote", "add", "--local", "--force", "--default", name, value=url or settings.dvc_remote_url)
    run("remote", "modify", "--local", name, "endpointurl", value=settings.s3_endpoint)
    run("remote", "modify", "--local", name, "region", value=REGION)
    run("remote", "modify", "--local", name, "access_key_id", value=settings.s3_access_key)
    run("remote", "modify", "--local", name, "secret_access_key", value=settings.s3_secret_key)


