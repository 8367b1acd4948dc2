"""The study (sampler, pruner, create/load, its MLflow parent run) and one trial: its params, reporting, resume of a retried trial."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from pydantic import ValidationError

from atric.atomic import atomic_path
from atric.config import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    Params,
    TuneParams,
    flatten,
)
from atric.engine import SELECTION_METRIC, RunPaths, run_name_for
from atric.errors import AtricError, ConfigError
from atric.ops import tracking
from atric.ops.tuning.common import (
    ATTR_BASE,
    ATTR_PARENT_RUN,
    ATTR_SPACE,
    LOCAL_KEYS,
    OBJECTIVE,
    TAG_ROLE,
    TAG_STUDY,
    TuneError,
)
from atric.ops.tuning.storage import (
    open_storage,
    redact,
    storage_lock,
    storage_url,
    study_dir,
    study_name_for,
)

log = logging.getLogger("atric.ops.tuning")


# --------------------------------------------------------------------------- the study


def _space_doc(tune: TuneParams) -> dict[str, Any]:
    return {key: dim.model_dump(exclude_none=True) for key, dim in sorted(tune.space.items())}


def base_params(params: Params) -> dict[str, Any]:
    """What every trial of the study shares: the flattened data/features/text/train params."""
    data = params.model_dump()
    flat = flatten({s: data[s] for s in ("data", "features", "text", "train")})
    return {k: v for k, v in sorted(flat.items()) if k not in LOCAL_KEYS}


def build_sampler(tune: TuneParams, worker: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded from ``tune.seed`` plus the worker's number: workers sharing a seed would draw the
    same random start-up points. TPE with ``constant_liar``: a running trial counts as a poor
    result, so parallel workers do not all sample around the same best point (Optuna's advice
    for distributed TPE; one worker alone samples as without it)."""
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=tune.seed + worker)
    return optuna.samplers.TPESampler(seed=tune.seed + worker, constant_liar=True)


def build_pruner(tune: TuneParams, epochs: int) -> optuna.pruners.BasePruner:
    if tune.pruner == "none":
        return optuna.pruners.NopPruner()
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, tune.warmup_epochs), max_resource=epochs)
    # Optuna prunes at step >= n_warmup_steps; steps are 1-based epochs.
    return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=tune.warmup_epochs + 1)


def create_study(params: Params, *, worker: int = 0) -> optuna.Study:
    """Create or load the study, race-free (schema, study and MLflow experiment under
    :func:`storage_lock`). A study of another ``tune.space`` or other base params is refused:
    its trials would not be comparable."""
    tune, name, url = params.tune, study_name_for(params), storage_url(params)
    sampler, pruner = build_sampler(tune, worker), build_pruner(tune, params.train.epochs)
    with storage_lock(url, "schema", tune.storage_retry_seconds):
        storage = open_storage(url, tune)
        try:
            study = optuna.create_study(
                storage=storage, study_name=name, direction="maximize", sampler=sampler, pruner=pruner
            )
            study.set_user_attr(ATTR_SPACE, _space_doc(tune))
            study.set_user_attr(ATTR_BASE, base_params(params))
            log.info("study %s created in %s", name, redact(url))
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        if study.metric_names is None:  # plots and the dashboard name the objective, not "Objective 0"
            study.set_metric_names([OBJECTIVE])
        # A fresh local MLflow store races the same way (alembic migrations): create it here too.
        tracking.configure()
        tracking.experiment_id(params.data.dataset)
    saved = study.user_attrs.get(ATTR_SPACE)
    if saved is not None and saved != _space_doc(tune):
        raise ConfigError(
            f"study {name!r} in {redact(url)} was created with another tune.space "
            f"({json.dumps(saved)}); use another --study-name or restore that space"
        )
    base, mine = study.user_attrs.get(ATTR_BASE, {}), base_params(params)
    differing = sorted(k for k in base.keys() | mine.keys() if base.get(k) != mine.get(k))
    if base and differing:
        raise ConfigError(
            f"study {name!r} in {redact(url)} was created with other params: "
            + ", ".join(f"{k}={base.get(k)!r} (here {mine.get(k)!r})" for k in differing)
            + "; use another --study-name or the same params"
        )
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(f"study {name!r}: direction must be maximize (it holds {SELECTION_METRIC})")
    return study


def load_study(params: Params) -> optuna.Study:
    url = storage_url(params)
    storage = open_storage(url, params.tune, create_tables=False)
    try:
        return optuna.load_study(study_name=study_name_for(params), storage=storage)
    except KeyError as exc:
        raise TuneError(f"no study {study_name_for(params)!r} in {redact(url)}") from exc


# --------------------------------------------------------------------------- MLflow


def _parent_run_id(params: Params, study: optuna.Study) -> str:
    """The study's MLflow parent run: recorded in the study, else found by tag, else created
    (under the study's lock: two workers joining at once make one parent run)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking.configure()
    client = MlflowClient()
    exp_id = tracking.experiment_id(params.data.dataset)
    with storage_lock(storage_url(params), study.study_name, params.tune.storage_retry_seconds):
        recorded = study.user_attrs.get(ATTR_PARENT_RUN)
        if recorded:
            with contextlib.suppress(MlflowException):
                if client.get_run(recorded).info.experiment_id == exp_id:
                    return str(recorded)
        found = client.search_runs(
            [exp_id],
            filter_string=f"tags.`{TAG_STUDY}` = '{study.study_name}' and tags.`{TAG_ROLE}` = 'study'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {TAG_STUDY: study.study_name, TAG_ROLE: "study", "git_commit": tracking.git_commit(),
                    "optuna.storage": redact(storage_url(params))}  # fmt: skip
            run_id = client.create_run(exp_id, run_name=f"tune-{study.study_name}", tags=tags).info.run_id
            tune = params.tune
            for key, value in {"tune.sampler": tune.sampler, "tune.pruner": tune.pruner, "tune.seed": tune.seed,
                               "tune.space": json.dumps(_space_doc(tune)), "train.epochs": params.train.epochs}.items():  # fmt: skip
                client.log_param(run_id, key, str(value)[:6000])
        study.set_user_attr(ATTR_PARENT_RUN, run_id)
        return run_id


# --------------------------------------------------------------------------- one trial


def suggest(trial: optuna.Trial, tune: TuneParams) -> dict[str, Any]:
    """The trial's values for every dimension of ``tune.space`` (train.* names)."""
    values: dict[str, Any] = {}
    for key, dim in tune.space.items():
        if isinstance(dim, FloatDistribution):
            values[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log, step=dim.step)
        elif isinstance(dim, IntDistribution):
            values[key] = trial.suggest_int(key, dim.low, dim.high, log=dim.log, step=dim.step)
        elif isinstance(dim, CategoricalDistribution):
            values[key] = trial.suggest_categorical(key, dim.choices)
    return values


def trial_params(params: Params, values: Mapping[str, Any]) -> Params:
    """``params`` with the trial's train.* values, writing under ``tune/<study>/``."""
    base = study_dir(params)
    raw = params.model_dump()
    raw["train"].update(values, models_dir=str(base / "models"), metrics_dir=str(base / "metrics"))
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"trial values {dict(values)} are not valid params: {exc.errors()[0]['msg']}") from exc


def trial_run_name(params: Params, number: int) -> str:
    return f"{run_name_for(params.train)}-trial{number}"


class _Reporter:
    """Engine callback: report each epoch's objective; prune when the pruner says so."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def on_epoch_end(self, epoch: int, row: Mapping[str, float]) -> None:
        self.trial.report(float(row[OBJECTIVE]), epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: {OBJECTIVE} {row[OBJECTIVE]:.3f}")

    def on_train_end(self, result: Any) -> None:
        # A resumed trial inherits the failed one's reports; an epoch trained but not reported
        # before the kill is in the checkpoint's history: report it too.
        reported = {step for step in _frozen(self.trial).intermediate_values}
        for row in result.history:
            if int(row["epoch"]) not in reported:
                self.trial.report(float(row[OBJECTIVE]), int(row["epoch"]))


def _frozen(trial: optuna.Trial) -> FrozenTrial:
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def _resume_from_failed(params: Params, trial: optuna.Trial, run_params: Params) -> int | None:
    """A retried trial continues its failed attempt: copy the newest ``last.pt`` of its retry
    history into this trial's run folder (the engine then resumes it exactly). Returns the
    number of the trial resumed, None when none left a reachable checkpoint."""
    history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(_frozen(trial))
    target = RunPaths.of(run_params.train, trial_run_name(params, trial.number)).last
    for number in reversed(history):
        source = RunPaths.of(run_params.train, trial_run_name(params, number)).last
        if source.exists():
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
            log.info("trial %d resumes trial %d from %s", trial.number, number, source)
            return number
    if history:
        log.info("trial %d: no checkpoint of trials %s here: starting over", trial.number, history)
    return None


def _diverged(exc: AtricError) -> bool:
    """The engine's NaN/inf errors (loss or similarities): a bad point, pruned, not failed."""
    text = str(exc)
    return "NaN" in text or "loss is nan" in text or "loss is inf" in text or "loss is -inf" in text


