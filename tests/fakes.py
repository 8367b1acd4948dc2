"""A tiny random seed layout on disk, so training tests need no audio or extraction.

Features are not pure noise: each clip gets a random "topic" vector that shows up in
both its audio frames and its caption words, so a model can learn something and
metrics move (while staying tiny and fast).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from atric.layout import Clip, Layout, write_features, write_index, write_text_embeddings

DATASET = "Fake"
VECTORS = "fakevec"


def write_fake_layout(
    root: Path,
    *,
    clips: dict[str, int] | None = None,
    experts: dict[str, int] | None = None,
    text_dim: int = 6,
    frames: tuple[int, int] = (3, 12),
    words: tuple[int, int] = (2, 7),
    train_captions: int = 5,
    seed: int = 0,
    dataset: str = DATASET,
    hop_seconds: float | None = None,
) -> Layout:
    """Write Index JSON, features for each expert and text embeddings for train/val/test.

    ``hop_seconds``: recorded in the feature files as atric's extractors do (padded lengths
    given in seconds then apply); without it they are like the original's own files."""
    clips = clips or {"train": 24, "val": 10, "test": 10}
    experts = experts or {"fa": 8, "fb": 5}
    rng = np.random.default_rng(seed)
    layout = Layout(dataset, root)
    for split, count in clips.items():
        ids = [f"{split}_{i:03d}" for i in range(count)]
        n_captions = train_captions if split == "train" else 5
        index = [Clip(cid, tuple(f"caption {k} of {cid}" for k in range(n_captions))) for cid in ids]
        write_index(layout.index_path(split), index, split)
        topics = rng.normal(size=(count, 16)).astype(np.float32)
        for expert, dim in experts.items():
            project = rng.normal(size=(16, dim)).astype(np.float32)
            arrays = []
            for c in range(count):
                t = int(rng.integers(frames[0], frames[1] + 1))
                arrays.append((ids[c], topics[c] @ project + rng.normal(size=(t, dim)).astype(np.float32)))
            attrs = {"expert": expert, "dim": dim, **({"hop_seconds": hop_seconds} if hop_seconds else {})}
            write_features(layout.features_path(expert, split), arrays, attrs)
        project = rng.normal(size=(16, text_dim)).astype(np.float32)
        embeddings = {
            cid: [
                topics[c] @ project
                + rng.normal(size=(int(rng.integers(words[0], words[1] + 1)), text_dim)).astype(np.float32)
                for _ in range(n_captions)
            ]
            for c, cid in enumerate(ids)
        }
        write_text_embeddings(layout.text_path(VECTORS, split), embeddings, {"vectors": VECTORS})
    return layout


def tiny_params(root: Path, **train: Any) -> dict[str, Any]:
    """A params.yaml dict for the fake layout with tiny model dims (override via ``train``)."""
    return {
        "data": {"dataset": DATASET, "root": str(root / "data")},
        "text": {"vectors": VECTORS},
        "train": {
            "experts": ["fa"],
            "pooling": "netrvlad",
            "text_pooling": "mean",
            "embed_dim": 8,
            "audio_clusters": 2,
            "text_clusters": 2,
            "lstm_hidden": 6,
            "lr": 0.01,
            "epochs": 2,
            "batch_size": 16,
            "device": "cpu",
            "models_dir": str(root / "models"),
            "metrics_dir": str(root / "metrics"),
            **train,
        },
    }


def fake_params(data_root: Path, out: Path, **train: Any) -> Any:
    """Validated Params for the fake layout under ``data_root`` with outputs under ``out``."""
    from atric.config import Params

    raw = tiny_params(out, **train)
    raw["data"]["root"] = str(data_root / "data")
    return Params.model_validate(raw)


def write_params(path: Path, params: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


REPO = Path(__file__).resolve().parents[1]
# Results of the repo's own full run, committed as DVC expects; a tiny copy makes its own.
PIPELINE_RESULTS = ("dvc.lock", "metrics/", "reports/")


def copy_repo_with_params(dest: Path, override: dict[str, Any]) -> Path:
    """Tracked files of the repo (working-tree versions, without committed pipeline results)
    into ``dest``, with params.yaml merged with ``override``: a tiny repo for end-to-end runs."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in tracked.stdout.split("\0"):
        if not name or name.startswith(PIPELINE_RESULTS) or not (REPO / name).is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), override)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def dvc_env() -> dict[str, str]:
    """The environment of a DVC/git command in a tiny repo copy: this venv's tools first, no
    analytics, a git identity, and MLflow's default store (the copy's own mlruns/)."""
    import os
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def kill_after_epochs(command: list[str], history_path: Path, epochs: int, **popen: Any) -> None:
    """Start a training ``command`` and SIGKILL it once ``history_path`` holds ``epochs`` rows."""
    import json
    import signal
    import time

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if history_path.exists() and len(json.loads(history_path.read_text(encoding="utf-8"))) >= epochs:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode() if process.stderr else ""
