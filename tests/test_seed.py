"""data.source: seed: the original's own input files (seed layout, legacy w2v pickles) train as
they are, through the real dvc.yaml, and are never written to."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fakes

from atric.layout import SPLITS, Layout, read_text_embeddings

BIN = Path(sys.executable).parent
DATASET = "CLOTHO"


def write_seed_release(raw: Path) -> None:
    """A tiny seed layout as the original's users have it: Index JSON, precomputed features,
    and w2v_<split>.pkl caption embeddings (a protocol-2 pickle of numpy arrays)."""
    staging = raw.parent / "staging"
    fakes.write_fake_layout(staging, experts={"vggsound": 6}, dataset=DATASET, clips={"train": 16, "val": 6, "test": 6})
    shutil.move(str(staging / DATASET), str(raw))
    for split in SPLITS:
        h5 = raw / "TextEmbeddings" / f"{fakes.VECTORS}_{split}.h5"
        embeddings = read_text_embeddings(h5)
        h5.unlink()
        (raw / "TextEmbeddings" / f"w2v_{split}.pkl").write_bytes(pickle.dumps(embeddings, protocol=2))


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_dvc_repro_trains_from_the_seed_layout_and_never_writes_into_it(tmp_path: Path) -> None:
    # Tiny model settings only; the seed mode itself comes from the README's own -S flags below.
    work = fakes.copy_repo_with_params(
        tmp_path / "repo",
        {"train": {"poolings": ["mean"], "fused_poolings": [], "epochs": 2, "batch_size": 8, "embed_dim": 8,
                   "audio_clusters": 2, "text_clusters": 2, "lstm_hidden": 4, "device": "cpu", "text_pooling": "mean"}},
    )
    raw = work / "data" / "raw"
    write_seed_release(raw)
    before = tree_digest(raw)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def run(*args: str) -> str:
        result = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{args}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    run("git", "init", "-q")
    run("dvc", "commit", "-f", "-q", "data.dvc")  # the seed layout is the tracked raw corpus
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "seed")
    # The README's seed recipe, as written there.
    run("dvc", "exp", "run", "-S", "data.source=seed", "-S", "data.dataset=CLOTHO", "-S", "features.experts=[vggsound]",
        "-S", "text.vectors=w2v")
    assert tree_digest(raw) == before  # inputs untouched
    layout = Layout(DATASET, work / "data")
    for split in SPLITS:  # the original's caption vectors, exactly, in atric's safe format
        imported = read_text_embeddings(layout.text_path("w2v", split))
        legacy = read_text_embeddings(raw / "TextEmbeddings" / f"w2v_{split}.pkl")
        assert imported.keys() == legacy.keys()
        assert all((a == b).all() for k in legacy for a, b in zip(imported[k], legacy[k], strict=True))
    checkpoint = torch.load(work / "models" / "vggsound-mean" / "best.pt", weights_only=True)
    assert checkpoint["signature"]["text.vectors"] == "w2v"
    assert checkpoint["model_config"]["expert_dims"] == {"vggsound": 6}
    metrics = json.loads((work / "metrics" / "test" / "vggsound-mean.json").read_text())
    assert {"t2a_R1", "a2t_R1", "t2a_geometric_mean"} <= set(metrics)
    status = json.loads(run("dvc", "status", "--json") or "{}")
    assert "data.dvc" not in status and not any(k.startswith("extract") or k.startswith("embed_text") for k in status)
