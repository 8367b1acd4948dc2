"""Study results: the best params, the dvc command that reproduces the best trial, reports."""

from __future__ import annotations

import json
import logging
import shlex
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from atric.atomic import atomic_path, write_text_atomic
from atric.config import (
    Params,
)
from atric.ops.tuning.common import ALWAYS_IN_COMMAND, ATTR_BASE, OBJECTIVE, TuneError
from atric.ops.tuning.storage import storage_lock, storage_url, study_dir
from atric.ops.tuning.study import base_params, load_study

log = logging.getLogger("atric.ops.tuning")


# --------------------------------------------------------------------------- results


def has_complete_trial(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def best_params(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """The best trial's sampled values in params.yaml key form: ``{"train": {"lr": ...}}``."""
    return {"train": dict(study.best_trial.params)}


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def dvc_command(study: optuna.Study, baseline: Params | None = None) -> str:
    """``dvc exp run -S ...`` that trains exactly the best trial from ``baseline`` (params.yaml as
    on disk): its sampled values, the study's expert/pooling/epochs, and every other param in
    which the study's base differs from the baseline (``--set`` flags of the workers)."""
    wanted = {**study.user_attrs.get(ATTR_BASE, {}), **{f"train.{k}": v for k, v in study.best_trial.params.items()}}
    current = base_params(baseline) if baseline is not None else {}
    keys = {f"train.{k}" for k in study.best_trial.params} | {k for k in ALWAYS_IN_COMMAND if k in wanted}
    keys |= {k for k, v in wanted.items() if k in current and current[k] != v}
    parts = ["dvc", "exp", "run"]
    for key in sorted(keys):
        parts += ["-S", f"{key}={_yaml_value(wanted[key])}"]
    # The trial's own run only (and what it depends on), not every run of the pipeline's matrix.
    return shlex.join([*parts, reproduce_stage(wanted["train.experts"], wanted["train.pooling"])])


def reproduce_stage(experts: list[str], pooling: str) -> str:
    """The dvc.yaml stage that trains and evaluates the run of ``experts`` and ``pooling``: one
    matrix cell (``evaluate@<expert>-<pooling>``) or the fused run of several experts."""
    if len(experts) > 1:
        return f"evaluate_fused@{pooling}"
    return f"evaluate@{experts[0]}-{pooling}"


@dataclass
class StudyResult:
    best_params: Path
    command: str
    report: list[Path]
    best_value: float
    best_trial: int


def claim_report(params: Params, study: optuna.Study) -> bool:
    """Whether this worker should draw the plots: not when a worker on this machine and folder
    drew them for the same finished trials (``--report-only`` redraws them anyway)."""
    key = f"atric.reported:{socket.gethostname()}:{study_dir(params).resolve()}"
    with storage_lock(storage_url(params), study.study_name, params.tune.storage_retry_seconds):
        finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))
        if study.user_attrs.get(key) == finished:
            return False
        study.set_user_attr(key, finished)
        return True


def write_results(
    params: Params, study: optuna.Study | None = None, *, plots: bool = True, baseline: Params | None = None
) -> StudyResult:
    """best_params.yaml, the dvc command (from ``baseline``, params.yaml as on disk) and the
    report, under ``tune/<study>/``."""
    study = study or load_study(params)
    if not has_complete_trial(study):
        raise TuneError(f"study {study.study_name!r}: no complete trial yet: nothing to report")
    best, command, trial = best_params(study), dvc_command(study, baseline), study.best_trial
    out = study_dir(params)
    header = (
        f"# Best trial {trial.number} of study {study.study_name}: {OBJECTIVE} = {trial.value:.4f}\n"
        f"# Merge into params.yaml, or reproduce it exactly as a DVC experiment (it trains and\n"
        f"# evaluates this one run, {shlex.split(command)[-1]}, and what it depends on):\n#   {command}\n"
    )
    path = out / "best_params.yaml"
    write_text_atomic(path, header + yaml.safe_dump(best, sort_keys=True))
    report = write_report(study, out / "report") if plots else []
    return StudyResult(path, command, report, float(trial.value), trial.number)


def write_report(study: optuna.Study, directory: Path) -> list[Path]:
    """Optimisation history, parameter importances (>= 2 distinct complete trials) and parallel
    coordinates: PNG via matplotlib, HTML via plotly (one plotly.min.js beside them, offline)."""
    import matplotlib

    matplotlib.use("Agg")  # workers have no display
    import matplotlib.pyplot as plt
    from optuna import visualization
    from optuna.visualization import matplotlib as mpl_vis

    directory.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = ["optimization_history", "parallel_coordinate"]
    if len({json.dumps(t.params, sort_keys=True) for t in complete}) >= 2 and study.best_trial.params:
        plots.insert(1, "param_importances")
    written: list[Path] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # notes on degenerate studies (flat axes)
        for name in plots:
            try:
                ax = getattr(mpl_vis, f"plot_{name}")(study)
                figure = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
                figure.set_size_inches(9, 5)
                figure.tight_layout()
                with atomic_path(directory / f"{name}.png") as tmp:
                    figure.savefig(tmp, dpi=110, format="png")
                plt.close(figure)
                html = directory / f"{name}.html"
                with atomic_path(html) as tmp:
                    getattr(visualization, f"plot_{name}")(study).write_html(str(tmp), include_plotlyjs="directory")
            except (ValueError, RuntimeError) as exc:  # e.g. importances of a constant objective
                log.warning("plot %s skipped: %s", name, exc)
                continue
            written += [directory / f"{name}.png", html]
    return written
