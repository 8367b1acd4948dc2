"""`dvc plots show` renders every plot dvc.yaml configures with real data (the report stage's
joined files and the train/evaluate stages' per-run files), in a tiny copy of the repo whose
metric files are written by hand (no training: about a minute, most of it DVC and the report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from fakes import copy_repo_with_params

from atric.engine.runs import run_identity
from atric.layout import Clip, Layout, write_index
from atric.metrics import RECALL_KS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUNS = ("logmel-mean", "logmel-lstm")
# Hand-written metrics for the matrix runs only: no fused run (its plot files would be missing).
TINY = {"features": {"experts": ["logmel"]}, "train": {"poolings": ["mean", "lstm"], "fused_poolings": []}}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _write_run_files(work: Path, run: str, scale: float, identity: dict[str, str]) -> None:
    """A run's metric files as train and evaluate write them, of the corpus ``identity`` names."""
    metrics = work / "metrics"
    for sub in ("history", "recall", "test"):
        (metrics / sub).mkdir(parents=True, exist_ok=True)
    history = [
        {"epoch": e, "train_loss": 0.2 / e, "lr": 0.01, "val_t2a_geometric_mean": scale * e, "val_t2a_R1": e}
        for e in (1, 2, 3)
    ]
    (metrics / "history" / f"{run}.json").write_text(json.dumps(history))
    (metrics / f"{run}.json").write_text(json.dumps({**history[-1], "best_epoch": 3, "epochs": 3, **identity}))
    test = {"epoch": 3}
    for direction in ("t2a", "a2t"):
        for k in RECALL_KS:
            test[f"{direction}_R{k}"] = min(100.0, scale * k)
        test |= {f"{direction}_MedR": 2.0, f"{direction}_MeanR": 3.0, f"{direction}_mAP10": 0.4}
        test[f"{direction}_geometric_mean"] = scale * 3
    (metrics / "test" / f"{run}.json").write_text(json.dumps({**test, **identity}))
    rows = [{"K": k, "t2a_recall": test[f"t2a_R{k}"], "a2t_recall": test[f"a2t_R{k}"]} for k in RECALL_KS]
    (metrics / "recall" / f"{run}.json").write_text(json.dumps(rows))


def test_dvc_plots_show_renders_every_configured_plot_with_data(tmp_path: Path) -> None:
    work = copy_repo_with_params(tmp_path, TINY)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    _run(["git", "init", "-q"], work, env)
    layout = Layout("SynthCaps", work / "data")
    captions = tuple(f"caption {k}" for k in range(5))
    write_index(layout.index_path("test"), [Clip(f"c{i}", captions) for i in range(8)], "test")
    for scale, run in enumerate(RUNS, start=2):
        _write_run_files(work, run, float(scale), run_identity(layout))
    _run([sys.executable, "src/report.py", "--no-register"], work, env)

    shown = json.loads(_run(["dvc", "plots", "show", "--json"], work, env))
    assert not shown.get("errors"), shown.get("errors")
    data = shown["data"]
    top_level = [next(iter(entry)) for entry in yaml.safe_load((work / "dvc.yaml").read_text())["plots"]]
    stage_files = [f"metrics/{sub}/{run}.json" for sub in ("history", "recall") for run in RUNS]
    assert set(top_level) | set(stage_files) <= set(data), sorted(data)
    for name in top_level:
        (plot,) = data[name]
        values = plot["content"]["data"]["values"]
        x = plot["content"]["encoding"]["x"]["field"]
        y = plot["content"]["encoding"]["y"]["field"]
        assert x in ("epoch", "K") and values, name
        # Every run is a line of its own (coloured by run), with real numbers on both axes.
        assert {row["run"] for row in values} == set(RUNS), name
        assert plot["content"]["encoding"]["color"]["field"] == "run"
        assert all(isinstance(row[x], (int, float)) and isinstance(row[y], (int, float)) for row in values)
        assert len(values) == len(RUNS) * (3 if x == "epoch" else len(RECALL_KS)), name
    for name in stage_files:
        assert data[name][0]["content"]["data"]["values"], name
