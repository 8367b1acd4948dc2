"""PostgreSQL from Debian's packages: initdb + pg_ctl in the stack's folder, 127.0.0.1 only."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from atric.ops.services.process import _wait
from atric.ops.services.settings import HOST, MLFLOW_DB, OPTUNA_DB, Settings, StackError, port_open

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


