"""The worker image for real: `deploy/image.sh smoke` builds it with podman (a debootstrap base,
kept in podman's store once built) and runs, inside it, `tune.py --help`, `import atric`, the
non-root check (USER 10001:10001) and a 1-trial tune against a throwaway local stack; and
deploy/docker-compose.yml through a real compose parser (podman-compose).

What this test costs depends on podman's store, which outlives a session on the same machine:
- warm (what CI does here: the base and the dependency layer are in the store; the code layer is
  rebuilt since the checkout changed, then the smoke run): WARM_CAP_SECONDS, asserted. Measured:
  worker image 23-31 s, build + smoke 67 s, the whole test (with its stack) about 2 min.
- cold (a fresh machine): the base (debootstrap + import, 77 s) and every layer (`ATRIC_NO_CACHE=1
  deploy/image.sh build`: 948 s, 15.8 min, most of it the ~200-wheel dependency layer), so about
  17 min plus the smoke run, measured on this 2-core machine under load ~8.5 (other engineers'
  runs). It is not held to the warm cap: a cold build gets COLD_CAP_SECONDS, and the test prints
  which case it ran.
The dependency layer depends only on pyproject.toml's dependency list (Dockerfile), so README,
code or tool-config changes keep it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from environment import require_stack_binaries, skip_or_fail, throwaway_stack

REPO = Path(__file__).resolve().parents[1]
WARM_CAP_SECONDS = 600  # base + dependency layer cached: code layer + smoke run (the 10 min)
COLD_CAP_SECONDS = 1800  # nothing cached: debootstrap + torch + ~200 wheels + smoke run

pytestmark = pytest.mark.integration


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        skip_or_fail(f"{', '.join(missing)} not installed (apt-get install podman debootstrap)")
    if os.geteuid() != 0:
        skip_or_fail("podman builds with a debootstrap base need root here")


class CommandLineWatch:
    """Reads every process's command line (/proc/*/cmdline) every 20 ms in a thread, and records
    the ones holding any of ``secrets``."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        self.secrets = [s.encode() for s in secrets if s]
        self.seen: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            for path in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    line = path.read_bytes()
                except OSError:
                    continue  # the process ended
                if any(secret in line for secret in self.secrets):
                    self.seen.append(f"{path.parent.name}: {line[:80]!r}...")
            self.scans += 1

    def __enter__(self) -> CommandLineWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    for path in ("data/", "models/", "tune/", "indexes/", ".venv/", ".git/", ".env", ".stack/", "mlruns/"):
        assert path in ignored, path


@pytest.mark.slow
def test_image_builds_and_tunes_against_the_local_stack(tmp_path: Path) -> None:
    _require("podman", "buildah", "debootstrap")
    require_stack_binaries()
    with throwaway_stack("atric-image-") as stack:
        env = {**os.environ, **stack.settings.client_env(), "PYTHON": sys.executable}
        secrets = (stack.settings.pg_password, stack.settings.s3_secret_key)
        started = time.monotonic()
        with CommandLineWatch(secrets) as watch:
            done = subprocess.run(
                ["bash", "deploy/image.sh", "smoke"], cwd=REPO, env=env, capture_output=True, text=True,
                timeout=COLD_CAP_SECONDS + 120,
            )  # fmt: skip
        seconds = time.monotonic() - started
        # No secret in any process's command line while the smoke ran (`ps` shows them to every user).
        assert watch.scans > 10 and watch.seen == [], watch.seen[:3]
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-4000:]
        # No secret of the stack in what the script printed.
        assert stack.settings.pg_password not in out and stack.settings.s3_secret_key not in out

        import optuna

        studies = optuna.get_all_study_summaries(stack.settings.pg_url("optuna"))
        smoke = [s for s in studies if s.study_name.startswith("smoke-")]
        assert smoke and smoke[-1].n_trials == 1
        trials = optuna.load_study(study_name=smoke[-1].study_name, storage=stack.settings.pg_url("optuna")).trials
        assert [t.state.name for t in trials] == ["COMPLETE"]

    assert "runs as 10001:10001, not root (USER 10001:10001)" in out
    size = int(re.search(r"image \S+ is (\d+) bytes", out).group(1))
    base = re.search(r"base built in (\d+) s", out)
    deps = re.search(r"dependency layer (\w+)", out).group(1)
    worker = int(re.search(r"worker image built in (\d+) s", out).group(1))
    warm = base is None and deps == "cached"
    cap = WARM_CAP_SECONDS if warm else COLD_CAP_SECONDS
    print(f"\nimage build + smoke in {seconds:.0f}s ({'warm' if warm else 'cold'}: "
          f"{'base built in ' + base.group(1) + ' s' if base else 'cached base'}, dependency layer {deps}, "
          f"worker image built in {worker} s); image {size / 1e9:.2f} GB")  # fmt: skip
    assert seconds < cap, f"image build + smoke took {seconds:.0f}s ({'warm' if warm else 'cold'} cap {cap}s)"


def _compose(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "podman-compose"
    if not tool.exists():
        pytest.fail("podman-compose missing from the venv: it is in pyproject.toml's test extra")
    return subprocess.run(
        [str(tool), "-f", "docker-compose.yml", *args], cwd=REPO / "deploy", env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_compose_file_parses_and_tune_workers_get_their_data() -> None:
    _require("podman")
    secrets = {"ATRIC_PG_PASSWORD": "pw-1", "ATRIC_S3_ACCESS_KEY": "key-1", "ATRIC_S3_SECRET_KEY": "sk-1"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATRIC_")}
    done = _compose(["config"], {**env, **secrets})
    assert done.returncode == 0, done.stderr[-2000:]
    doc = yaml.safe_load(done.stdout)
    tune = doc["services"]["tune"]
    assert "ports" not in tune and "container_name" not in tune  # any number of replicas
    assert "../data:/workspace/data:ro" in tune["volumes"] and "tune:/workspace/tune" in tune["volumes"]
    assert "--total-trials" in " ".join(tune["command"])
    assert tune["environment"]["ATRIC_OPTUNA_STORAGE"].endswith("@postgres:5432/optuna")
    assert tune["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert (REPO / "deploy" / doc["services"]["mlflow"]["build"]["context"] / "Dockerfile").exists()
    assert set(doc["volumes"]) >= {"pgdata", "s3data", "tune"}
    assert "whatever tune.py offers" not in (REPO / "deploy" / "docker-compose.yml").read_text()

    # A missing secret is refused by name, not replaced by an empty password.
    missing = _compose(["config"], {**env, **{k: v for k, v in secrets.items() if k != "ATRIC_PG_PASSWORD"}})
    assert missing.returncode != 0
    assert "ATRIC_PG_PASSWORD" in missing.stdout + missing.stderr
