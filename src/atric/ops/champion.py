"""The champion: the run chosen to serve search, and its MLflow registered-model alias."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from atric.config import Params
from atric.engine import RunPaths
from atric.ops import tracking

log = logging.getLogger("atric.champion")


def registered_model_name(params: Params) -> str:
    """One registered model per dataset, e.g. ``atric-SynthCaps``."""
    return f"atric-{params.data.dataset}"


def best_run_by_test(params: Params, metric: str = "t2a_geometric_mean") -> str:
    """The run with the best evaluation metric among ``metrics/<split>/*.json``."""
    from atric.errors import DataError

    directory = Path(params.train.metrics_dir) / params.evaluate.split
    scores: dict[str, float] = {}
    for path in sorted(directory.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if metric in doc:
            scores[path.stem] = float(doc[metric])
    if not scores:
        raise DataError(f"{directory}: no evaluated runs (run `python src/evaluate.py` or `dvc repro`)")
    return max(scores, key=lambda name: scores[name])


def register_champion(params: Params, run_name: str) -> str | None:
    """Register ``run_name``'s MLflow model and move the ``champion`` alias to it."""
    paths = RunPaths.of(params.train, run_name)
    run_file = paths.run_dir / tracking.RUN_ID_FILE
    if not run_file.exists():
        log.info("%s: no MLflow run recorded; nothing registered", run_name)
        return None
    run_id = json.loads(run_file.read_text())["run_id"]
    tracking.configure()
    return tracking.register_with_alias(run_id, registered_model_name(params))


def champion_run(params: Params) -> str:
    """The run the ``champion`` alias points at in MLflow, else the best evaluated run on disk."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        tracking.configure()
        version = MlflowClient().get_model_version_by_alias(registered_model_name(params), tracking.CHAMPION_ALIAS)
        run = MlflowClient().get_run(version.run_id)
        name = run.data.tags.get(tracking.RUN_NAME_TAG)
        if name and RunPaths.of(params.train, name).best.exists():
            return name
    except MlflowException:
        pass
    return best_run_by_test(params)
