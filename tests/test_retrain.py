"""CI retraining against the real local stack: deploy/retrain.sh in a tiny copy of the repo, with the
stack's S3 as DVC remote and its MLflow server as tracking server; then a fresh clone restores every
output with `dvc pull`, and the Makefile's `data/raw` rule pulls instead of rebuilding.

One throwaway stack (PostgreSQL, SeaweedFS S3, MLflow server) and one tiny `dvc repro` serve the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from environment import require_stack_binaries, throwaway_stack
from fakes import copy_repo_with_params

from atric.ops import services
from atric.ops.services import Stack

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VENV = BIN.parent
EXPERIMENT = "SynthCaps"
POOLINGS = ["mean", "max"]
# The matrix, and the default fused run over features.experts (here logmel alone).
RUNS = [*(f"logmel-{p}" for p in POOLINGS), "fused-netrvlad"]
TRAIN_STAGE = {**{f"logmel-{p}": f"train@logmel-{p}" for p in POOLINGS}, "fused-netrvlad": "train_fused@netrvlad"}
TINY = {
    "data": {"synth": {"clips": {"train": 16, "val": 6, "test": 6}, "min_duration": 1.5, "max_duration": 2.5}},
    "features": {"experts": ["logmel"]},
    "train": {
        "poolings": POOLINGS,
        "epochs": 2,
        "batch_size": 16,
        "embed_dim": 16,
        "audio_clusters": 4,
        "text_clusters": 4,
        "lstm_hidden": 8,
        "device": "cpu",
    },
}
# What `dvc pull` must restore (DVC outputs) and what git carries (cache: false metrics and reports).
PULLED = ["data/raw", f"data/{EXPERIMENT}", "models", "indexes"]
FROM_GIT = ["metrics", "reports", "dvc.lock", "data.dvc"]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-5000:]}"
    return result


def _digests(root: Path, names: list[str]) -> dict[str, str]:
    """relative path -> sha256 of every file under ``names`` (files or directories) in ``root``
    that DVC tracks: what .dvcignore names (run locks, MLflow run ids: local state) is left out."""
    import pathspec

    ignored = pathspec.PathSpec.from_lines("gitwildmatch", (root / ".dvcignore").read_text().splitlines())
    out: dict[str, str] = {}
    for name in names:
        path = root / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            relative = file.relative_to(root).as_posix()
            # .gitignore: written by DVC for its outputs, not an output
            if file.name != ".gitignore" and not ignored.match_file(relative):
                out[relative] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """A throwaway stack on free ports with fresh credentials, stopped and deleted afterwards."""
    require_stack_binaries(make=True)
    with throwaway_stack("atric-retrain-stack-") as stack:
        yield stack


def _client_env() -> dict[str, str]:
    """No AWS_/MLFLOW_/ATRIC_ variables of the caller: DVC must find its keys in .dvc/config.local."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "ATRIC_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    return env


@pytest.fixture(scope="module")
def retrained(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    """A tiny copy of the repo, committed on `main`, after deploy/retrain.sh; its results committed too."""
    work = copy_repo_with_params(tmp_path_factory.mktemp("origin"), TINY)
    env = _client_env()
    _run(["git", "init", "-q", "-b", "main"], work, env)
    _run([sys.executable, "src/synthesize.py", "--no-progress"], work, env)
    _run(["dvc", "commit", "-f", "-q", "data.dvc"], work, env)  # the tiny corpus replaces the default one
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-q", "-m", "tiny"], work, env)
    services.configure_dvc_remote(work, stack.settings)

    retrain_env = {**env, "MLFLOW_TRACKING_URI": stack.settings.mlflow_url}
    done = _run(["deploy/retrain.sh"], work, retrain_env)
    # What a developer (or a bot) commits after retraining: dvc.lock and the cache: false metrics/reports.
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-q", "-m", "retrain"], work, env)
    return work, env, done.stdout + done.stderr


def _clone(origin: Path, dest: Path, stack: Stack, env: dict[str, str]) -> Path:
    _run(["git", "clone", "-q", str(origin), str(dest)], dest.parent, env)
    assert not (dest / "data" / "raw").exists() and not (dest / "models").exists()
    services.configure_dvc_remote(dest, stack.settings)  # keys are --local config: never cloned
    return dest


# --------------------------------------------------------------------------- deploy/retrain.sh


def test_retrain_reproduces_the_pipeline_and_prints_the_metrics_diff(
    retrained: tuple[Path, dict[str, str], str],
) -> None:
    work, env, out = retrained
    assert "== dvc pull" in out and "== python src/repro.py" in out and "== dvc push" in out
    for run in RUNS:
        assert f"Running stage '{TRAIN_STAGE[run]}'" in out
        assert json.loads((work / "metrics" / "test" / f"{run}.json").read_text())["t2a_R10"] >= 0
    # The metrics diff against main (which has no metrics yet) is a markdown table of every test metric.
    diff = out[out.index("== dvc metrics diff main") :]
    assert "### dvc metrics diff main" in diff
    assert "| Path" in diff and "| Metric" in diff
    for run in RUNS:
        assert f"metrics/test/{run}.json" in diff
    assert "t2a_R10" in diff
    assert json.loads(_run(["dvc", "status", "--json"], work, env).stdout) == {}


def test_retrain_pushed_every_output_to_the_stack_s3(
    stack: Stack, retrained: tuple[Path, dict[str, str], str]
) -> None:
    work, env, _ = retrained
    # Nothing left to push: the remote holds what the workspace has.
    cloud = _run(["dvc", "status", "--cloud", "--json"], work, env).stdout.strip()
    assert json.loads(cloud or "{}") == {}, cloud
    # And boto3 finds each output's object where DVC 3 keeps it: <remote>/files/md5/<2>/<rest>.
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    outs = [
        out
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if not out["path"].startswith(("metrics/", "reports/"))  # cache: false: git carries them
    ]
    outs += yaml.safe_load((work / "data.dvc").read_text())["outs"]
    paths = {out["path"] for out in outs}
    assert {"data/raw", "models/logmel-mean", "indexes"} <= paths
    assert any(p.startswith(f"data/{EXPERIMENT}/AudioExpert/") for p in paths)
    s3 = stack.s3.client()
    for out in outs:
        key = f"{services.DVC_PREFIX}/files/md5/{out['md5'][:2]}/{out['md5'][2:]}"
        head = s3.head_object(Bucket=stack.settings.bucket, Key=key)
        assert head["ContentLength"] > 0, out["path"]
    listed = s3.list_objects_v2(Bucket=stack.settings.bucket, Prefix=f"{services.DVC_PREFIX}/files/md5/")
    assert listed["KeyCount"] > 50  # the corpus' clips and captions, features, checkpoints, index


def test_mlflow_server_holds_the_runs_and_their_artifacts(
    stack: Stack, retrained: tuple[Path, dict[str, str], str]
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.settings.mlflow_url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(RUNS)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"train_loss", "val_t2a_R10", "test_t2a_R10"} <= set(run.data.metrics)
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied into the stack's S3
        prefix = f"{services.MLFLOW_ARTIFACTS_PREFIX}/{experiment.experiment_id}/{run.info.run_id}/artifacts/"
        listed = stack.s3.client().list_objects_v2(Bucket=stack.settings.bucket, Prefix=prefix)
        assert any(obj["Key"].endswith(".pt") for obj in listed.get("Contents", [])), prefix
    champion = client.get_model_version_by_alias(f"atric-{EXPERIMENT}", "champion")
    assert champion.run_id in {r.info.run_id for r in runs}


# --------------------------------------------------------------------------- a fresh clone


def test_fresh_clone_pulls_byte_identical_outputs(
    stack: Stack, retrained: tuple[Path, dict[str, str], str], tmp_path: Path
) -> None:
    work, env, _ = retrained
    clone = _clone(work, tmp_path / "clone", stack, env)
    _run(["dvc", "pull", "-q"], clone, env)
    expected = _digests(work, PULLED + FROM_GIT)
    assert any(name.startswith("models/logmel-mean/") for name in expected)
    assert any(name.startswith("metrics/test/") for name in expected)
    assert _digests(clone, PULLED + FROM_GIT) == expected
    assert json.loads(_run(["dvc", "status", "--json"], clone, env).stdout) == {}


def test_make_data_raw_in_a_clone_pulls_instead_of_rebuilding(
    stack: Stack, retrained: tuple[Path, dict[str, str], str], tmp_path: Path
) -> None:
    work, env, _ = retrained
    clone = _clone(work, tmp_path / "clone", stack, env)
    # Use the project's venv as is: -o keeps make from "updating" it because the clone's pyproject.toml
    # is newer than its .installed stamp (that would pip install -e the clone into the project's venv).
    make = ["make", f"VENV={VENV}", "-o", f"{VENV}/bin/.installed", "data/raw"]
    assert (VENV / "bin" / ".installed").exists()
    dry = _run([*make[:-1], "-n", "data/raw"], clone, env).stdout
    assert "pip install" not in dry and "-m venv" not in dry, dry
    done = _run(["make", "-s", *make[1:]], clone, env)
    out = done.stdout + done.stderr
    assert "pulled data and pipeline outputs from the DVC remote" in out, out
    assert "clips," not in out, out  # synthesize.py did not run
    assert _digests(clone, PULLED) == _digests(work, PULLED)
    assert json.loads(_run(["dvc", "status", "--json"], clone, env).stdout) == {}
    dry_repro = _run(["dvc", "repro", "--dry"], clone, env).stdout
    assert "Running stage" not in dry_repro and "Data and pipelines are up to date" in dry_repro, dry_repro
