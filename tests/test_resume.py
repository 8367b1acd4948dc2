"""Continuing a run under every preset's padded lengths (atric.engine.resume): a killed run
resumes exactly, a finished one continues with more epochs. The presets give lengths in
seconds (30 s, 10 s) far beyond these clips (1.5-6 s at 0.5 s a frame): padding, never a refusal,
and the check before training must resolve the same lengths as the training loop does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import fakes

from atric import engine

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "params").glob("*.yaml"))
HOP_SECONDS = 0.5

# Training processes killed and restarted: end-to-end, part of make test, not make test-fast.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def hop_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hop")
    fakes.write_fake_layout(root / "data", hop_seconds=HOP_SECONDS)
    return root


def preset_lengths(preset: Path) -> dict[str, Any]:
    """The padded-length settings a preset gives (the keys that resolve a run's lengths)."""
    train = yaml.safe_load(preset.read_text())["train"]
    return {key: train[key] for key in ("max_seconds", "max_frames") if key in train}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_a_killed_preset_run_resumes_exactly_and_continues_with_more_epochs(
    hop_root: Path, tmp_path: Path, preset: Path
) -> None:
    lengths = preset_lengths(preset)
    assert "max_seconds" in lengths  # what broke resume: a length in seconds
    settings = {"pooling": "netvlad", **lengths}
    raw = fakes.tiny_params(tmp_path / "killed", epochs=4, **settings)
    raw["data"]["root"] = str(hop_root / "data")
    params_file = fakes.write_params(tmp_path / "params.yaml", raw)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [sys.executable, str(REPO / "src" / "train.py"), "--params", str(params_file)]
    history_path = tmp_path / "killed" / "metrics" / "history" / "fa-netvlad.json"

    fakes.kill_after_epochs(command, history_path, 2, cwd=tmp_path, env=env)
    last = tmp_path / "killed" / "models" / "fa-netvlad" / "last.pt"
    killed_at = engine.load_checkpoint(last)["epoch"]
    assert 2 <= killed_at < 4

    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming after epoch {killed_at}" in done.stderr
    # The preset's seconds pad these clips: said once per split, and recorded in the checkpoint.
    frames = round(lengths["max_seconds"] / HOP_SECONDS)
    assert f"fa padded to {frames} frames: 0.0% of clips cut" in done.stderr
    assert engine.load_checkpoint(last)["max_frames"] == {"fa": frames}

    full = engine.train(fakes.fake_params(hop_root, tmp_path / "full", epochs=4, **settings))
    assert read_json(history_path) == full.history
    assert read_json(tmp_path / "killed" / "metrics" / "fa-netvlad.json") == read_json(full.paths.metrics)

    # A finished run given more epochs goes on from its last epoch (the same command, epochs 5).
    more = [*command, "--set", "train.epochs=5"]
    extended = subprocess.run(more, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "resuming after epoch 4" in extended.stderr
    assert [row["epoch"] for row in read_json(history_path)] == [1, 2, 3, 4, 5]
    assert read_json(history_path)[:4] == full.history

    # The later stages read the lengths from the checkpoint: evaluate re-derives and re-checks nothing.
    evaluated = subprocess.run(
        [sys.executable, str(REPO / "src" / "evaluate.py"), "--params", str(params_file), "--run", "fa-netvlad",
         "--set", "train.epochs=5"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
