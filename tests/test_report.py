"""The report stage: champion chosen on val (reports/champion.json), mean ± std over seeds,
the seed-noise test, trivial recalls on tiny splits, the order section. Metric files by hand."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from atric.config import Params
from atric.engine.runs import run_identity
from atric.errors import DataError
from atric.layout import Clip, Layout, write_index
from atric.metrics import RECALL_KS
from atric.ops.champion import CHAMPION_METRIC, champion_run, read_champion, register_champion
from atric.report import (
    compare_poolings,
    group_runs,
    load_run_metrics,
    noise_section,
    results_table,
    split_run_name,
    trivial_columns,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
CHAMPION_KEYS = {"run", "metric", "value", "split", "dataset", "candidates"}  # required; corpus since it existed


def eval_row(geo: float, **extra: float) -> dict[str, float]:
    """A complete metrics/test/<run>.json row whose t2a numbers scale with ``geo``."""
    row: dict[str, float] = {"epoch": 3}
    for direction in ("t2a", "a2t"):
        for k in RECALL_KS:
            row[f"{direction}_R{k}"] = min(100.0, geo * (0.5 + k / 20))
        row[f"{direction}_MedR"] = 3.0
        row[f"{direction}_MeanR"] = 5.0
        row[f"{direction}_mAP10"] = geo / 100
        row[f"{direction}_geometric_mean"] = geo
    return {**row, **extra}


def write_run(
    metrics_dir: Path, run: str, val: float, test: float, corpus: Layout | None = None, **extra: float
) -> None:
    """A trained and evaluated run's metrics files, of ``corpus`` (default: the project's Toy)."""
    identity = run_identity(corpus or Layout("Toy", metrics_dir.parent / "data"))
    (metrics_dir / "test").mkdir(parents=True, exist_ok=True)
    (metrics_dir / "history").mkdir(parents=True, exist_ok=True)
    (metrics_dir / f"{run}.json").write_text(json.dumps({"best_epoch": 2, CHAMPION_METRIC: val, **identity}))
    (metrics_dir / "test" / f"{run}.json").write_text(json.dumps({**eval_row(test, **extra), **identity}))
    history = [{"epoch": e, "train_loss": 1.0 / e, CHAMPION_METRIC: val * e / 3} for e in (1, 2, 3)]
    (metrics_dir / "history" / f"{run}.json").write_text(json.dumps(history))


@pytest.fixture
def project(tmp_path: Path) -> dict[str, Any]:
    """params.yaml, a test Index of 6 clips, models and metrics folders under tmp_path."""
    raw = {
        "data": {"dataset": "Toy", "root": str(tmp_path / "data")},
        "train": {"metrics_dir": str(tmp_path / "metrics"), "models_dir": str(tmp_path / "models")},
    }
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    layout = Layout("Toy", tmp_path / "data")
    captions = tuple(f"caption {k}" for k in range(5))
    write_index(layout.index_path("test"), [Clip(f"clip{i}", captions) for i in range(6)], "test")
    return {"root": tmp_path, "params_file": params_file, "params": Params.model_validate(raw)}


def run_report(
    project: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str, str]:
    """src/report.py in this process (an interpreter start costs more than the whole test)."""
    out = project["root"] / "reports"
    argv = ["report.py", "--params", str(project["params_file"]), "--out", str(out), "--no-register", *extra]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "src" / "report.py"), run_name="__main__")
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def test_champion_is_the_val_best_even_when_another_run_is_test_best(
    project: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = project["root"] / "metrics"
    write_run(metrics, "logmel-mean", val=40.0, test=90.0)  # test-best
    write_run(metrics, "logmel-lstm", val=55.0, test=50.0)  # val-best
    write_run(metrics, "logmel-max", val=45.0, test=60.0)
    code, out, err = run_report(project, monkeypatch, capsys)
    assert code == 0, err
    champion = json.loads((project["root"] / "reports" / "champion.json").read_text())
    assert champion == {
        "run": "logmel-lstm",
        "metric": "val_t2a_geometric_mean",
        "value": 55.0,
        "split": "val",
        "dataset": "Toy",
        "corpus": Layout("Toy", project["root"] / "data").corpus_fingerprint(),
        "candidates": {"logmel-lstm": 55.0, "logmel-max": 45.0, "logmel-mean": 40.0},
        "other_corpus_runs": 0,
    }
    assert "logmel-lstm" in out
    assert (
        "`logmel-lstm`: the best val_t2a_geometric_mean"
        in (project["root"] / "reports" / "results.md").read_text()
    )
    # Search and index serve the file's run once it has a model; MLflow is not asked.
    params = project["params"]
    best = Path(params.train.models_dir) / "logmel-lstm" / "best.pt"
    with pytest.raises(DataError, match="has no"):
        champion_run(params, project["root"] / "reports" / "champion.json")
    best.parent.mkdir(parents=True)
    best.write_bytes(b"")
    assert champion_run(params, project["root"] / "reports" / "champion.json") == "logmel-lstm"
    # Registration follows the file; a run without an MLflow run id registers nothing.
    assert register_champion(params, project["root"] / "reports" / "champion.json") is None


def test_report_and_champion_consider_only_the_corpus_in_use(
    project: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default corpus's runs (committed metrics), then a release under another dataset name,
    a second release under the same name, then back: no report or champion mixes corpora."""
    root, metrics = project["root"], project["root"] / "metrics"
    toy = Layout("Toy", root / "data")
    write_run(metrics, "logmel-mean", val=90.0, test=90.0)  # the better run, of the first corpus
    write_run(metrics, "logmel-max", val=50.0, test=50.0)
    champion_file, results = root / "reports" / "champion.json", root / "reports" / "results.md"
    assert run_report(project, monkeypatch, capsys)[0] == 0
    assert json.loads(champion_file.read_text())["run"] == "logmel-mean"

    # A new release in the same dataset folder: the old corpus's runs are left out and named.
    captions = tuple(f"another caption {k}" for k in range(5))
    write_index(toy.index_path("test"), [Clip(f"new{i}", captions) for i in range(6)], "test")
    write_run(metrics, "aisfx-mean", val=10.0, test=10.0)
    code, out, err = run_report(project, monkeypatch, capsys)
    assert code == 0, err
    champion = json.loads(champion_file.read_text())
    assert champion["run"] == "aisfx-mean" and set(champion["candidates"]) == {"aisfx-mean"}
    assert champion["other_corpus_runs"] == 2 and champion["corpus"] == toy.corpus_fingerprint()
    text = results.read_text()
    assert "| aisfx | mean |" in text and "| logmel |" not in text
    assert "2 metrics file(s) of another corpus" in text and "`logmel-max`, `logmel-mean`" in text
    assert "1 runs of Toy; 2 of another corpus left out" in out
    # A champion file of the old corpus is refused by search and index, naming both corpora.
    params = project["params"]
    (Path(params.train.models_dir) / "aisfx-mean").mkdir(parents=True)
    (Path(params.train.models_dir) / "aisfx-mean" / "best.pt").write_bytes(b"")
    assert champion_run(params, champion_file) == "aisfx-mean"
    write_index(toy.index_path("test"), [Clip(f"clip{i}", tuple(f"caption {k}" for k in range(5))) for i in range(6)], "test")
    with pytest.raises(DataError, match=r"chosen among the runs of another Toy corpus"):
        champion_run(params, champion_file)

    # Back to the first corpus: its runs again, the release's left out.
    assert run_report(project, monkeypatch, capsys)[0] == 0
    champion = json.loads(champion_file.read_text())
    assert champion["run"] == "logmel-mean" and set(champion["candidates"]) == {"logmel-mean", "logmel-max"}
    assert "| aisfx |" not in results.read_text()


def test_champion_file_format_is_checked(tmp_path: Path, project: dict[str, Any]) -> None:
    path = tmp_path / "champion.json"
    with pytest.raises(DataError, match="no champion chosen yet"):
        read_champion(path)
    good = {
        "run": "a-mean",
        "metric": CHAMPION_METRIC,
        "value": 1.0,
        "split": "val",
        "dataset": "Toy",
        "candidates": {},
    }
    path.write_text(json.dumps(good))
    assert set(read_champion(path)) == CHAMPION_KEYS
    path.write_text(json.dumps({**good, "split": "test"}))
    with pytest.raises(DataError, match="chosen on 'val' only"):
        read_champion(path)
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "value"}))
    with pytest.raises(DataError, match="missing key"):
        read_champion(path)
    path.write_text(json.dumps({**good, "dataset": "Other"}))
    with pytest.raises(DataError, match="dataset 'Other'"):
        champion_run(project["params"], path)


def test_a_run_without_the_val_metric_is_an_error_and_nothing_is_written(
    project: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = project["root"] / "metrics"
    write_run(metrics, "logmel-mean", val=40.0, test=90.0)
    (metrics / "logmel-max.json").write_text(json.dumps({"best_epoch": 1}))
    (metrics / "test" / "logmel-max.json").write_text(json.dumps(eval_row(30.0)))
    code, _, err = run_report(project, monkeypatch, capsys)
    assert code == 2 and "logmel-max.json" in err and CHAMPION_METRIC in err
    assert len(err.strip().splitlines()) == 1
    assert not (project["root"] / "reports").exists()


def test_seeds_are_grouped_with_mean_and_std() -> None:
    assert split_run_name("logmel-lstm", 0) == ("logmel", "lstm", 0)
    assert split_run_name("logmel-lstm-seed2", 0) == ("logmel", "lstm", 2)
    assert split_run_name("logmel+aisfx-mean-seed11", 7) == ("logmel+aisfx", "mean", 11)
    runs = {
        "logmel-mean": eval_row(40.0),
        "logmel-mean-seed1": eval_row(42.0),
        "logmel-mean-seed2": eval_row(44.0),
        "logmel-mean-seed0": eval_row(99.0),  # the bare run's seed again: left out
        "logmel-lstm": eval_row(50.0),
    }
    groups = group_runs(list(runs), default_seed=0)
    assert [(g.pooling, g.runs) for g in groups] == [
        ("lstm", {0: "logmel-lstm"}),
        ("mean", {0: "logmel-mean", 1: "logmel-mean-seed1", 2: "logmel-mean-seed2"}),
    ]
    table = results_table(groups, runs)
    assert "| logmel | mean | 3 | " in table and "42.0 ± 2.0" in table  # sample std of 40, 42, 44
    assert "| logmel | lstm | 1 | " in table and "**50.0**" in table
    # One pooling with 3 seeds and one with 1: nothing to test, and the report says which.
    assert "Not compared (one seed, no noise estimate): logmel-lstm." in noise_section(groups, runs)


def test_welch_marks_only_differences_beyond_seed_noise() -> None:
    runs = {}
    for seed, (a, b, c) in enumerate([(40.0, 50.0, 44.0), (41.0, 51.0, 38.0), (42.0, 52.0, 41.0)]):
        suffix = "" if seed == 0 else f"-seed{seed}"
        runs[f"logmel-mean{suffix}"] = eval_row(a)
        runs[f"logmel-lstm{suffix}"] = eval_row(b)
        runs[f"logmel-max{suffix}"] = eval_row(c)
    verdicts = {(c.a, c.b): c.beyond_noise for c in compare_poolings(group_runs(list(runs), 0), runs)}
    from scipy import stats

    def welch(a: list[float], b: list[float]) -> float:
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)

    # lstm is 10 above mean and max (p < 0.05); max's spread hides its 0.3 over mean.
    assert welch([50, 51, 52], [40, 41, 42]) < 0.05 and welch([50, 51, 52], [44, 38, 41]) < 0.05
    assert welch([44, 38, 41], [40, 41, 42]) > 0.5
    assert verdicts == {("lstm", "max"): True, ("lstm", "mean"): True, ("max", "mean"): False}


def test_report_text_one_seed_trivial_recalls_and_order(tmp_path: Path) -> None:
    runs = {
        "logmel-mean": eval_row(40.0, order_accuracy=50.0, order_pairs=2.0, order_accuracy_sequential=50.0),
        "logmel-lstm": eval_row(50.0, order_accuracy=80.0, order_pairs=2.0, order_accuracy_sequential=90.0),
    }
    histories = {"logmel-mean": [{"epoch": 1, "train_loss": 0.5, "val_t2a_geometric_mean": 10.0}]}
    assert set(trivial_columns(6)) == {"t2a_R10", "t2a_R50", "a2t_R50"}  # a2t R@10 needs 10 > 5 x 5
    path = write_report(
        runs, histories, tmp_path, dataset="Toy", validation_key="val_t2a_geometric_mean", n_clips=6
    )
    text = path.read_text()
    assert "no estimate of the seed noise" in text and "Welch" in text
    assert "t2a R@10 (trivial)" in text and "t2a R@10 (k >= 6 clips)" in text
    header, _, lstm, _mean = [line for line in text.splitlines() if line.startswith("|")][:4]
    column = header.split(" | ").index("t2a R@10 (trivial)")
    assert "**" not in lstm.split(" | ")[column] and "**" in lstm.split(" | ")[column - 1]
    assert (
        "| logmel | lstm | 1 | 80.0 | - | - | 90.0 | - | 2 |" in text
        and "| logmel | mean | 1 | 50.0 | - | - | 50.0 | - | 2 |" in text
    )
    for png in ("recall_at_k.png", "validation_curves.png", "order_accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recall = json.loads((tmp_path / "plots" / "recall.json").read_text())
    assert {r["run"] for r in recall} == set(runs) and {r["K"] for r in recall} == set(RECALL_KS)
    history = json.loads((tmp_path / "plots" / "history.json").read_text())
    assert history == [
        {"run": "logmel-mean", "epoch": 1.0, "train_loss": 0.5, "val_t2a_geometric_mean": 10.0}
    ]


def test_missing_test_metric_names_the_file(tmp_path: Path) -> None:
    row = eval_row(10.0)
    del row["a2t_R50"]
    layout = Layout("Toy", tmp_path / "data")
    (tmp_path / "logmel-mean.json").write_text(json.dumps({**row, **run_identity(layout)}))
    with pytest.raises(DataError, match=r"logmel-mean.json: missing metric\(s\) a2t_R50"):
        load_run_metrics(tmp_path, layout)
    assert np.isfinite(eval_row(1.0)["t2a_R1"])


def test_a_fused_champion_is_not_registered_and_the_report_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The served MLflow model embeds one expert: a multi-expert champion has none to register."""
    import torch

    from atric.ops import tracking
    from atric.ops.champion import write_champion

    params = Params.model_validate({"train": {"models_dir": str(tmp_path / "models"), "metrics_dir": str(tmp_path / "m")}})
    run_dir = tmp_path / "models" / "fused-netrvlad"
    run_dir.mkdir(parents=True)
    (run_dir / tracking.RUN_ID_FILE).write_text(json.dumps({"run_id": "0" * 32}))
    torch.save({"format": 1, "model_config": {"expert_dims": {"aisfx": 512, "logmel": 128}}}, run_dir / "best.pt")
    champion = write_champion(
        {"run": "fused-netrvlad", "metric": CHAMPION_METRIC, "value": 1.0, "split": "val", "dataset": "SynthCaps",
         "candidates": {"fused-netrvlad": 1.0}},
        tmp_path / "champion.json",
    )
    monkeypatch.setattr(tracking, "register_with_alias", lambda *a: pytest.fail("must not register a fused model"))
    assert register_champion(params, champion) is None


def test_the_summary_fits_a_terminal_and_writes_nothing(
    project: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `make run` ends with (dvc metrics show was ~770 columns wide)."""
    metrics = project["root"] / "metrics"
    write_run(metrics, "logmel-mean", val=40.0, test=30.0)
    write_run(metrics, "logmel-netvlad", val=50.0, test=60.0)
    write_run(metrics, "logmel-netvlad-seed1", val=48.0, test=50.0)
    assert run_report(project, monkeypatch, capsys)[0] == 0  # the report stage, then its summary
    before = sorted(p.name for p in (project["root"] / "reports").iterdir())
    code, out, err = run_report(project, monkeypatch, capsys, "--summary")
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) < 80
    assert lines[1].split() == ["expert", "pooling", "seeds", "t2a", "R@1", "t2a", "R@10", "a2t", "R@1", "a2t", "R@10", "t2a", "geo"]
    netvlad = next(line.split() for line in lines if "netvlad" in line)
    assert netvlad[:3] == ["logmel", "netvlad", "2"] and netvlad[-1] == "55.0"  # the mean over the two seeds
    assert "champion, chosen on val: logmel-netvlad" in out
    assert sorted(p.name for p in (project["root"] / "reports").iterdir()) == before
