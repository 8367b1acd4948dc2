"""End to end: the real dvc.yaml on a tiny corpus, in a temporary copy of the repo: `python src/repro.py`
(what `make run` runs) and plain `dvc repro`, whose outputs must hash the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fakes import copy_repo_with_params

# End-to-end (the whole DVC pipeline, built in a temp copy): part of make test, not make test-fast.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {
    "data": {"synth": {"clips": {"train": 16, "val": 6, "test": 6}, "min_duration": 1.5, "max_duration": 2.5}},
    "features": {"experts": ["logmel"]},
    "train": {
        "poolings": ["mean", "netrvlad"],
        "epochs": 2,
        "batch_size": 16,
        "embed_dim": 16,
        "audio_clusters": 4,
        "text_clusters": 4,
        "lstm_hidden": 8,
        "device": "cpu",
    },
}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the tracked files with tiny params, after `dvc repro`."""
    work = copy_repo_with_params(tmp_path_factory.mktemp("repo"), TINY)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    _run(["git", "init", "-q"], work, env)
    _run([sys.executable, "src/synthesize.py", "--no-progress"], work, env)
    _run(["dvc", "commit", "-f", "-q", "data.dvc"], work, env)  # the tiny corpus replaces the default one
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-q", "-m", "tiny"], work, env)
    # What `make run` runs: independent stages side by side (the second build below is plain dvc repro).
    _run([sys.executable, "src/repro.py", "--jobs", "2"], work, env)
    return work, env


def test_repro_trains_every_run_of_the_matrix(repro: tuple[Path, dict[str, str]]) -> None:
    work, env = repro
    runs = [*(f"logmel-{p}" for p in TINY["train"]["poolings"]), "fused-netrvlad"]
    for run in runs:
        assert (work / "models" / run / "best.pt").is_file()
        test_metrics = json.loads((work / "metrics" / "test" / f"{run}.json").read_text())
        assert 0 <= test_metrics["t2a_R10"] <= 100
        # The default corpus has mirror pairs: evaluation reports the order metric on them.
        assert test_metrics["order_pairs"] > 0 and 0 <= test_metrics["order_accuracy"] <= 100
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], work, env).stdout)
    files = {f for ws in shown.values() for f in ws["data"]}
    assert {f"metrics/test/{run}.json" for run in runs} <= files
    table = (work / "reports" / "results.md").read_text()
    for run in runs:
        expert, pooling = run.split("-")
        assert f"| {expert} | {pooling} |" in table
    assert (work / "reports" / "recall_at_k.png").stat().st_size > 1000


def test_repro_leaves_dvc_status_clean(repro: tuple[Path, dict[str, str]]) -> None:
    work, env = repro
    status = json.loads(_run(["dvc", "status", "--json"], work, env).stdout)
    assert status == {}


def test_mlflow_holds_one_finished_run_per_matrix_cell(repro: tuple[Path, dict[str, str]]) -> None:
    work, env = repro
    script = (
        "import json, mlflow\n"
        "mlflow.set_tracking_uri('sqlite:///mlruns/mlflow.db')\n"
        "runs = mlflow.search_runs(experiment_names=['SynthCaps'], output_format='list')\n"
        "print(json.dumps([[r.info.run_name, r.info.status, sorted(r.data.metrics)] for r in runs]))\n"
        "from mlflow import MlflowClient\n"
        "v = MlflowClient().get_model_version_by_alias('atric-SynthCaps', 'champion')\n"
        "print(json.dumps(v.run_id))\n"
    )
    out = _run([sys.executable, "-c", script], work, env).stdout.splitlines()
    runs = json.loads(out[0])
    champion_run_id = json.loads(out[1])
    assert sorted(name for name, _, _ in runs) == ["fused-netrvlad", "logmel-mean", "logmel-netrvlad"]
    for _, status, metrics in runs:
        assert status == "FINISHED"
        assert {"val_t2a_R10", "train_loss", "test_t2a_R10"} <= set(metrics)
    assert champion_run_id


def test_changing_lr_retrains_without_reextracting(repro: tuple[Path, dict[str, str]]) -> None:
    work, env = repro
    original = (work / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["train"]["lr"] = params["train"]["lr"] / 3
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        dry = _run(["dvc", "repro", "--dry"], work, env).stdout
        assert "Running stage 'train@logmel-mean'" in dry
        assert "Running stage 'extract@logmel'" not in dry
        assert "Running stage 'prepare'" not in dry
    finally:
        (work / "params.yaml").write_text(original)


def test_mlflow_ui_lists_the_runs_in_a_real_browser(repro: tuple[Path, dict[str, str]]) -> None:
    """Headless Chromium renders the experiment page: every run and its metric charts are there."""
    work, env = repro
    out = json.loads(_run([sys.executable, "src/ui_check.py", "--out", "reports/mlflow_ui.png"], work, env).stdout)
    assert out["runs_listed"] == ["fused-netrvlad", "logmel-mean", "logmel-netrvlad"]
    shot = work / "reports" / "mlflow_ui.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


# ------------------------------------------------------------------ byte-reproducible builds (issue #14)
def _lock_hashes(work: Path) -> dict[str, dict[str, str]]:
    """Per stage: path -> md5 of every output in dvc.lock (dirs: the .dir md5 of their listing)."""
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    return {
        stage: {out["path"]: out["md5"] for out in entry.get("outs", [])}
        for stage, entry in lock["stages"].items()
    }


@pytest.fixture(scope="module")
def second_build(
    repro: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, str]]:
    """The same tiny pipeline built again from scratch in another directory, with its own cache
    (what a second machine of the same kind does), by plain ``dvc repro``: one stage at a time."""
    _, env = repro
    work = copy_repo_with_params(tmp_path_factory.mktemp("repo2"), TINY)
    _run(["git", "init", "-q"], work, env)
    _run([sys.executable, "src/synthesize.py", "--no-progress"], work, env)
    _run(["dvc", "commit", "-f", "-q", "data.dvc"], work, env)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-q", "-m", "tiny"], work, env)
    _run(["dvc", "repro"], work, env)
    return work, env


def test_two_builds_give_identical_dvc_lock_hashes_for_every_stage(
    repro: tuple[Path, dict[str, str]], second_build: tuple[Path, dict[str, str]]
) -> None:
    """HDF5 without timestamps, sorted JSON, MLflow run ids out of the hashed outputs: every
    stage's outputs (features, text embeddings, checkpoints, index) hash the same, whether the
    stages ran side by side (src/repro.py, the first build) or one at a time (dvc repro)."""
    first, second = _lock_hashes(repro[0]), _lock_hashes(second_build[0])
    assert set(first) == set(second)
    assert {"extract@logmel", "embed_text", "index", "train@logmel-mean"} <= set(first)
    differing = {stage: (first[stage], second[stage]) for stage in first if first[stage] != second[stage]}
    assert differing == {}


def test_run_cache_restores_a_removed_stage_output_instead_of_rerunning(
    second_build: tuple[Path, dict[str, str]],
) -> None:
    import shutil

    work, env = second_build
    shutil.rmtree(work / "data" / "SynthCaps" / "AudioExpert" / "logmel")
    out = _run(["dvc", "repro"], work, env).stdout
    assert "Stage 'extract@logmel' is cached - skipping run, checking out outputs" in out
    assert "Running stage" not in out  # nothing downstream sees a change
    assert json.loads(_run(["dvc", "status", "--json"], work, env).stdout) == {}
