"""The stack's settings: ports, credentials and the .env file clients read; free ports on 127.0.0.1."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from atric.errors import AtricError

STATE_DIR = Path(".stack")
ENV_FILE = Path(".env")
HOST = "127.0.0.1"
DEFAULT_BUCKET = "atric"
MLFLOW_DB = "mlflow"
OPTUNA_DB = "optuna"
MLFLOW_ARTIFACTS_PREFIX = "mlflow"  # s3://<bucket>/mlflow/...
DVC_PREFIX = "dvc"  # s3://<bucket>/dvc/...
REGION = "us-east-1"


class StackError(AtricError):
    """A local service failed to start or stop; the message points at its log."""


# --------------------------------------------------------------------------- settings


def free_port() -> int:
    """A port the kernel says is free now (another process may still race us for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``export`` and quotes allowed, ``#`` comments skipped)."""
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.removeprefix("export ").split("=", 1)
        values[key.strip()] = value.strip().strip("'\"")
    return values


@dataclass(frozen=True)
class Settings:
    """Ports, credentials and paths of one stack. ``from_env`` is the only place they are chosen."""

    state_dir: Path
    pg_port: int
    s3_port: int
    mlflow_port: int
    pg_user: str
    pg_password: str = field(repr=False)
    s3_access_key: str = field(repr=False)
    s3_secret_key: str = field(repr=False)
    bucket: str = DEFAULT_BUCKET

    # Names in .env / the environment; docker-compose reads the same ones.
    ENV_KEYS: ClassVar[dict[str, str]] = {
        "pg_port": "ATRIC_PG_PORT",
        "s3_port": "ATRIC_S3_PORT",
        "mlflow_port": "ATRIC_MLFLOW_PORT",
        "pg_user": "ATRIC_PG_USER",
        "pg_password": "ATRIC_PG_PASSWORD",
        "s3_access_key": "ATRIC_S3_ACCESS_KEY",
        "s3_secret_key": "ATRIC_S3_SECRET_KEY",
        "bucket": "ATRIC_S3_BUCKET",
    }

    @classmethod
    def generate(cls, state_dir: Path) -> Settings:
        """Fresh random credentials and free ports (the tests' throwaway stacks)."""
        return cls(
            state_dir=state_dir,
            pg_port=free_port(),
            s3_port=free_port(),
            mlflow_port=free_port(),
            pg_user="atric",
            pg_password=secrets.token_urlsafe(24),
            s3_access_key="atric" + secrets.token_hex(8),
            s3_secret_key=secrets.token_urlsafe(32),
        )

    @classmethod
    def from_env(cls, env_file: Path = ENV_FILE, state_dir: Path | None = None, create: bool = True) -> Settings:
        """Environment first, then ``.env``; with ``create``, missing values are generated and saved."""
        stored = read_env_file(env_file)
        state = state_dir or Path(os.environ.get("ATRIC_STACK_DIR", stored.get("ATRIC_STACK_DIR", STATE_DIR)))
        generated = cls.generate(state)
        values: dict[str, Any] = {}
        missing: dict[str, str] = {}
        for attr, key in cls.ENV_KEYS.items():
            value = os.environ.get(key) or stored.get(key)
            if value is None:
                value = str(getattr(generated, attr))
                missing[key] = value
            values[attr] = int(value) if attr.endswith("_port") else value
        if missing and not create:
            raise StackError(f"no stack configured ({', '.join(missing)} unset, {env_file} has none): run deploy/stack.sh up")
        if missing:
            _append_env(env_file, missing)
        return cls(state_dir=state, **values)

    # URLs and environments derived from the settings
    def pg_url(self, database: str = MLFLOW_DB, *, password: bool = True) -> str:
        secret = f":{self.pg_password}" if password else ""
        return f"postgresql+psycopg2://{self.pg_user}{secret}@{HOST}:{self.pg_port}/{database}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{self.bucket}/{MLFLOW_ARTIFACTS_PREFIX}"

    @property
    def dvc_remote_url(self) -> str:
        return f"s3://{self.bucket}/{DVC_PREFIX}"

    def s3_env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
        }

    def client_env(self) -> dict[str, str]:
        """What train.py / tune.py / dvc / atric.ops.storage need to use this stack."""
        return {
            **self.s3_env(),
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "ATRIC_OPTUNA_STORAGE": self.pg_url(OPTUNA_DB),
        }


def _append_env(path: Path, values: Mapping[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        if new:
            fh.write("# Local stack settings (git-ignored; generated by deploy/stack.sh). Keep secret.\n")
        for key, value in values.items():
            fh.write(f"{key}={value}\n")
    os.chmod(path, 0o600)


