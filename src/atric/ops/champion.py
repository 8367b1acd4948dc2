"""The champion: the run chosen to serve search, and its MLflow registered-model alias.

The choice is made on the **validation** split only (the engine's selection metric in each
run's ``metrics/<run>.json``) and written by the ``report`` stage to ``reports/champion.json``,
a DVC output the ``index`` stage depends on::

    {"run": "aisfx-netvlad", "metric": "val_t2a_geometric_mean", "value": 71.2, "split": "val",
     "dataset": "SynthCaps", "corpus": "<fingerprint>", "candidates": {"aisfx-lstm": 64.0, ...},
     "other_corpus_runs": 0}

Test metrics are reported, never used to choose. The MLflow ``champion`` alias is moved
from that file; ``champion_run`` reads only the file: an alias is state DVC does not track,
and following it could serve a run the pipeline's results no longer name.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from atric.atomic import write_json_atomic
from atric.config import Params
from atric.engine import SELECTION_METRIC, RunPaths, load_checkpoint
from atric.engine.runs import of_corpus
from atric.errors import DataError
from atric.layout import Layout
from atric.ops import tracking

log = logging.getLogger("atric.champion")

CHAMPION_FILE = Path("reports/champion.json")
CHAMPION_SPLIT = "val"
CHAMPION_METRIC = f"{CHAMPION_SPLIT}_{SELECTION_METRIC}"  # a key of metrics/<run>.json
_FIELDS = ("run", "metric", "value", "split", "dataset", "corpus", "candidates", "other_corpus_runs")
_REQUIRED = ("run", "metric", "value", "split", "dataset", "candidates")


def registered_model_name(params: Params) -> str:
    """One registered model per dataset, e.g. ``atric-SynthCaps``."""
    return f"atric-{params.data.dataset}"


def validation_scores(
    metrics_dir: str | Path, layout: Layout, metric: str = CHAMPION_METRIC
) -> tuple[dict[str, float], list[str]]:
    """({run: value of ``metric``} over the trained runs of ``layout``'s corpus (the best val row
    in ``<metrics_dir>/<run>.json``), the runs of other corpora, left out)."""
    directory = Path(metrics_dir)
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get(metric), (int, float)):
            raise DataError(f"{path}: no numeric {metric!r} (the train stage writes it)")
        docs[path.stem] = doc
    kept, others = of_corpus(docs, layout)
    # A diverged run (NaN) is no candidate.
    scores = {run: float(docs[run][metric]) for run in kept if math.isfinite(float(docs[run][metric]))}
    if not scores:
        ignored = f" ({len(others)} of another corpus ignored)" if others else ""
        raise DataError(
            f"{directory}: no trained runs of {layout.dataset} with {metric!r}{ignored} "
            "(run `python src/train.py` or `dvc repro`)"
        )
    return scores, others


def choose_champion(params: Params, metric: str = CHAMPION_METRIC) -> dict[str, Any]:
    """The run with the highest validation ``metric`` among the runs of the corpus in use; a tie
    goes to the first name in sort order. Runs of other corpora are counted, never candidates."""
    layout = Layout(params.data.dataset, params.data.root)
    scores, others = validation_scores(params.train.metrics_dir, layout, metric)
    run = max(sorted(scores), key=lambda name: scores[name])
    return {
        "run": run,
        "metric": metric,
        "value": scores[run],
        "split": CHAMPION_SPLIT,
        "dataset": params.data.dataset,
        "corpus": layout.corpus_fingerprint(),
        "candidates": scores,
        "other_corpus_runs": len(others),
    }


def write_champion(champion: Mapping[str, Any], path: str | Path = CHAMPION_FILE) -> Path:
    path = Path(path)
    write_json_atomic(path, {key: champion[key] for key in _FIELDS if key in champion})
    return path


def read_champion(path: str | Path = CHAMPION_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no champion chosen yet (run `python src/report.py` or `dvc repro report`)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from exc
    missing = [key for key in _REQUIRED if not isinstance(doc, dict) or key not in doc]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}")
    if not isinstance(doc["run"], str) or not doc["run"]:
        raise DataError(f"{path}: 'run' must be a run name")
    if doc["split"] != CHAMPION_SPLIT:
        raise DataError(
            f"{path}: split is {doc['split']!r}: the champion is chosen on {CHAMPION_SPLIT!r} only"
        )
    return doc


def register_champion(params: Params, path: str | Path = CHAMPION_FILE) -> str | None:
    """Register the run named in the champion file and move the ``champion`` alias to it."""
    run_name = read_champion(path)["run"]
    run_file = RunPaths.of(params.train, run_name).run_dir / tracking.RUN_ID_FILE
    if not run_file.exists():
        log.info("%s: no MLflow run recorded; nothing registered", run_name)
        return None
    best = RunPaths.of(params.train, run_name).best
    if best.exists() and len(load_checkpoint(best)["model_config"]["expert_dims"]) > 1:
        # The served MLflow model embeds one expert's features (experiment.AudioEmbedder); a fused
        # champion is served from its checkpoint by the index and search, not from the registry.
        log.info("%s: a multi-expert champion has no MLflow model to register; the alias is not moved", run_name)
        return None
    run_id = json.loads(run_file.read_text())["run_id"]
    tracking.configure()
    return tracking.register_with_alias(run_id, registered_model_name(params))


def champion_run(params: Params, path: str | Path = CHAMPION_FILE) -> str:
    """The run named in the champion file, checked against the dataset and the trained models."""
    doc = read_champion(path)
    if doc["dataset"] != params.data.dataset:
        raise DataError(
            f"{path}: chosen for dataset {doc['dataset']!r}, params say {params.data.dataset!r} "
            "(rerun `python src/report.py`)"
        )
    corpus = Layout(params.data.dataset, params.data.root).corpus_fingerprint()
    if doc.get("corpus") != corpus:
        raise DataError(
            f"{path}: chosen among the runs of another {params.data.dataset} corpus ({doc.get('corpus')}, this "
            f"one is {corpus}); rerun `python src/report.py` after training on this one"
        )
    run_name = doc["run"]
    if not RunPaths.of(params.train, run_name).best.exists():
        raise DataError(f"{path}: champion {run_name!r} has no {RunPaths.of(params.train, run_name).best}")
    return run_name
