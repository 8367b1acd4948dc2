"""`mlflow server` on PostgreSQL with proxied S3 artifacts."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

from atric.ops.services.process import _pid_alive, _read_pid, _spawn, _stop_group, _wait
from atric.ops.services.settings import HOST, MLFLOW_DB, Settings, port_open

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


