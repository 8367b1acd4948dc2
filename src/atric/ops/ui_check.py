"""Look at the MLflow UI in a real browser: start `mlflow ui` on the local store, render the
experiment page in headless Chromium, check the runs are listed, and save a screenshot.

    python src/ui_check.py --out reports/mlflow_ui.png
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from atric.errors import AtricError
from atric.ops.services import free_port
from atric.ops.tracking import ARTIFACTS_DIR, DEFAULT_TRACKING_URI

# Without the background-networking flags Chromium keeps dialling Google on a closed network.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1600,1100",
)


METRIC_EVERY_RUN_LOGS = "best_epoch"  # short enough that its chart title is not truncated


class UiCheckError(AtricError):
    """The UI did not start or did not show what it should."""


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise UiCheckError("no Chromium found: install it with `apt-get install chromium` (Debian package)")


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UiCheckError(f"mlflow ui exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise UiCheckError(f"mlflow ui did not answer on {url} within {timeout:.0f} s")


def check_experiment_page(experiment: str, run_names: Sequence[str], screenshot: Path) -> str:
    """Render the experiment page; raise unless every run name is on it. Returns the page URL."""
    import mlflow

    mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise UiCheckError(f"no MLflow experiment {experiment!r} in {DEFAULT_TRACKING_URI}")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [
        mlflow_bin, "ui", "--backend-store-uri", DEFAULT_TRACKING_URI,
        "--default-artifact-root", str(ARTIFACTS_DIR), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            _wait_healthy(base, proc)
            # The chart view shows every logged metric per run, the table view only names the runs.
            page = f"{base}/#/experiments/{found.experiment_id}/runs?compareRunsMode=CHART"
            browser = [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
            expected = [*run_names, METRIC_EVERY_RUN_LOGS] if run_names else []
            # The page renders lazily; a busy machine needs more (virtual) time: try longer budgets.
            for budget_ms in (20_000, 45_000, 90_000):
                dom = subprocess.run(
                    [*browser, f"--virtual-time-budget={budget_ms}", "--dump-dom", page],
                    capture_output=True, text=True, timeout=240,
                ).stdout
                missing = [text for text in expected if text not in dom]
                if not missing:
                    break
            if missing:
                raise UiCheckError(f"the experiment page {page} does not show {', '.join(missing)}")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [*browser, f"--virtual-time-budget={budget_ms}", f"--screenshot={screenshot}", page],
                capture_output=True, timeout=240, check=True,
            )
            if not screenshot.exists() or screenshot.stat().st_size == 0:
                raise UiCheckError(f"Chromium wrote no screenshot to {screenshot}")
            return page
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
