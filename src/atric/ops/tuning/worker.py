"""A tuning worker: Optuna's own optimize loop with heartbeats, exact fleet totals and resumed retries."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from atric.config import (
    Params,
)
from atric.engine import RunPaths
from atric.errors import AtricError
from atric.ops import tracking
from atric.ops.interrupts import stop_signals_as_interrupt
from atric.ops.tuning.common import (
    ATTR_WORKERS,
    LIVE_STATES,
    OBJECTIVE,
    WAIT_POLL_SECONDS,
    TuneError,
    _TrialFailed,
    mark_mlflow_run,
    trial_run_tags,
)
from atric.ops.tuning.storage import redact, storage_lock, storage_url
from atric.ops.tuning.study import (
    _diverged,
    _parent_run_id,
    _Reporter,
    _resume_from_failed,
    build_sampler,
    create_study,
    suggest,
    trial_params,
    trial_run_name,
)

log = logging.getLogger("atric.ops.tuning")


# --------------------------------------------------------------------------- workers


@dataclass
class WorkerSummary:
    study_name: str
    worker: int
    trials: dict[str, int] = field(default_factory=dict)  # this worker's trials by final state
    seconds: float = 0.0


class _Worker:
    """One worker's ``Study.optimize``: the objective, the budget gate and the failure count."""

    def __init__(self, params: Params, study: optuna.Study, summary: WorkerSummary) -> None:
        self.params, self.study, self.summary = params, study, summary
        self.tune = params.tune
        self.lock: contextlib.ExitStack | None = None
        self.failures, self.current, self.exhausted = 0, None, False

    # The exact total: counting live trials and creating the next one form one step for the whole
    # fleet. The lock is taken before optimize asks for a trial (first, then in the callback after
    # each trial) and released by the objective, once the new trial exists.
    def open_gate(self) -> bool:
        self.lock = contextlib.ExitStack()
        self.lock.enter_context(
            storage_lock(storage_url(self.params), self.study.study_name, self.tune.storage_retry_seconds)
        )
        optuna.storages.fail_stale_trials(self.study)  # a dead worker's trial is queued, not counted
        trials = self.study.get_trials(deepcopy=False, states=LIVE_STATES)
        if any(t.state == TrialState.WAITING for t in trials) or len(trials) < self.tune.n_trials:
            return True
        self.close_gate()
        self.exhausted = True
        return False

    def close_gate(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.summary.trials[trial.state.name] = self.summary.trials.get(trial.state.name, 0) + 1
        self.failures = self.failures + 1 if trial.state == TrialState.FAIL else 0
        if self.failures >= self.tune.max_failures:
            raise TuneError(
                f"{self.failures} trials in a row failed (see the log above and the trials' "
                "fail_reason); stopping this worker"
            )
        if self.tune.total_trials and not self.open_gate():
            study.stop()

    def objective(self, trial: optuna.Trial) -> float:
        from atric.ops.experiment import train_tracked
        from atric.ops.runlock import run_lock

        self.close_gate()
        self.current = trial.number
        run_name = trial_run_name(self.params, trial.number)
        trial.set_user_attr("run_name", run_name)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        run_dir = Path(self.params.tune.dir, self.study.study_name, "models", run_name)  # trial_params' models_dir
        reporter = _Reporter(trial)
        state, status, started = "FAIL", None, time.perf_counter()
        try:
            run_params = trial_params(self.params, suggest(trial, self.tune))
            # One owner per trial run: the resume copy into its folder and the training itself.
            with run_lock(run_params.train.models_dir, run_name, f"tune trial {trial.number}"):
                resumed = _resume_from_failed(self.params, trial, run_params)
                if resumed is not None:
                    trial.set_user_attr("resumed_trial", resumed)
                result = train_tracked(run_params, run_name=run_name, policy="auto", stage="tune",
                                       callbacks=[reporter], nested=True, log_model=False,
                                       tags=trial_run_tags(self.study.study_name, trial.number))  # fmt: skip
            state = "COMPLETE"
            RunPaths.of(run_params.train, run_name).last.unlink(missing_ok=True)  # best.pt is kept
            return float(result.best_score)
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except TuneError:
            raise  # the storage is out: this worker stops
        except AtricError as exc:
            if _diverged(exc):
                state = "PRUNED"
                trial.set_user_attr("prune_reason", str(exc)[:2000])
                raise optuna.TrialPruned(f"diverged: {exc}") from exc
            trial.set_user_attr("fail_reason", str(exc)[:2000])
            raise _TrialFailed(str(exc)) from exc
        except KeyboardInterrupt:
            status = "KILLED"
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 3))
            mark_mlflow_run(tracking.recorded_run_id(run_dir), state, status)  # none if never opened

    def requeue_interrupted(self) -> None:
        """A preempted worker (docker stop, Ctrl-C) hands its trial back to the fleet."""
        frozen = next((t for t in self.study.get_trials(deepcopy=False) if t.number == self.current), None)
        if frozen is not None and frozen.state == TrialState.FAIL and self.tune.max_retry:
            optuna.storages.RetryHeartbeatStaleTrialCallback(
                self.tune.max_retry, inherit_intermediate_values=True
            )(self.study, frozen)


def _join_study(params: Params) -> tuple[optuna.Study, int]:
    """Create or load the study and take this worker's number (seeds the sampler)."""
    study = create_study(params)
    with storage_lock(storage_url(params), study.study_name, params.tune.storage_retry_seconds):
        worker = int(study.user_attrs.get(ATTR_WORKERS, 0))
        study.set_user_attr(ATTR_WORKERS, worker + 1)
    if worker:
        study.sampler = build_sampler(params.tune, worker)
    return study, worker


def run_worker(params: Params) -> WorkerSummary:
    """Run trials until the budget (per worker, or the study total) or the timeout is spent."""
    import mlflow

    tune = params.tune
    study, number = _join_study(params)
    summary = WorkerSummary(study.study_name, number)
    worker = _Worker(params, study, summary)
    parent = _parent_run_id(params, study)
    started = time.monotonic()
    log.info("worker %d on study %s (%s): %d trials%s", number, study.study_name, redact(storage_url(params)),
             tune.n_trials, " in total" if tune.total_trials else "")  # fmt: skip
    mlflow.start_run(run_id=parent)
    status = "FAILED"
    try:
        with contextlib.ExitStack() as stack:
            # SIGTERM (docker stop, schedulers) ends a worker as Ctrl-C does: FAIL + retry queued.
            stack.enter_context(stop_signals_as_interrupt())
            stack.callback(worker.close_gate)
            while True:
                left = tune.timeout - (time.monotonic() - started) if tune.timeout else None
                if left is not None and left <= 0:
                    break
                if tune.total_trials and not worker.open_gate():
                    # Total reached, but a running trial may still fail (its worker dies) and be
                    # queued again: wait while others run, if heartbeats can tell.
                    if tune.heartbeat_interval and study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                        time.sleep(min(WAIT_POLL_SECONDS, float(tune.heartbeat_interval)))
                        continue
                    break
                worker.exhausted = False
                try:
                    study.optimize(
                        worker.objective,
                        n_trials=None if tune.total_trials else tune.n_trials,
                        timeout=left,
                        catch=(_TrialFailed,),
                        callbacks=[worker.after_trial],
                        gc_after_trial=False,
                    )
                except KeyboardInterrupt:
                    worker.requeue_interrupted()
                    raise
                finally:
                    worker.close_gate()
                if not worker.exhausted:
                    break  # per-worker budget or timeout spent
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        summary.seconds = time.monotonic() - started
        with contextlib.suppress(Exception):
            _log_study_summary(study)
        mlflow.end_run(status=status)
    return summary


def _log_study_summary(study: optuna.Study) -> None:
    import mlflow

    trials = study.get_trials(deepcopy=False)
    metrics = {f"trials_{s.name.lower()}": float(sum(t.state == s for t in trials))
               for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}  # fmt: skip
    if metrics["trials_complete"]:
        metrics[f"best_{OBJECTIVE}"] = float(study.best_value)
    mlflow.log_metrics(metrics, step=len(trials))


