"""``dvc repro`` with independent stages side by side (issue #17: the pipeline on 2 cores).

DVC runs the stages of one ``dvc repro`` one after another. A train stage uses one thread on a
2-core machine (``atric.device.default_threads``), so the other core idles through most of the
pipeline. DVC's own answer is to launch ``dvc repro`` several times for independent parts of the
DAG (its "parallel stage execution"); this module does that over the DAG DVC reports:

- every stage of the pipeline (or of the given targets and what they depend on) is run by its own
  ``dvc --wait-for-lock repro --single-item <stage>``, once the stages it depends on have finished:
  DVC still decides whether the stage changed, runs its command, and records it in ``dvc.lock``
  (each process takes the repo lock to write it, so concurrent runs wait instead of failing);
- a stage that can start as soon as one other stage ends, when no other stage downstream of that
  one could start before it (``evaluate@x`` after ``train@x``, ``index`` after ``report``), runs
  in that stage's call: one DVC start-up (~2 s) less, and no parallelism lost;
- at most ``jobs`` calls run at once; among ready stages, the one with the most stages downstream
  of it starts first (its successors become ready sooner).

The result is what ``dvc repro`` gives: the same commands with the same environment, so the same
outputs, and a clean ``dvc status`` after it. With ``jobs=1`` it *is* ``dvc repro``.
"""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from atric.device import available_cpus, default_threads
from atric.errors import ConfigError

RUNNING_STAGE = re.compile(r"Running stage '([^']+)'")
EXIT_FAILED = 1  # a stage failed: dvc repro's own code for it
EXIT_SIGNAL_BASE = 128  # a signal ends the command as a shell reports it: 128 + its number
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PROGRESS_SECONDS = 10.0  # lanes share the terminal: a redrawn progress bar is shown this often
STOP_EVENT = -1  # in the event queue, in place of a task index: a stop signal came


def default_jobs() -> int:
    """As many stages at once as train stages' thread teams fit in the cores this process may use:
    two on 2 cores (each train stage runs one thread), one where a stage takes most of the cores.
    A train stage's thread count is never lowered to fit more: CPU results depend on it, and
    ``make run`` must record what ``dvc repro`` records."""
    return max(1, available_cpus() // default_threads())


# ------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Task:
    """Stages one ``dvc repro --single-item`` call runs, in order, once ``after`` have finished."""

    stages: tuple[str, ...]
    after: frozenset[int]  # indices of the tasks this one waits for
    downstream: int  # stages downstream of this task's stages (its scheduling priority)


def upstream_closure(deps: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """Every stage each stage depends on, directly or not."""
    closure: dict[str, set[str]] = {}

    def visit(stage: str) -> set[str]:
        if stage not in closure:
            found: set[str] = set()
            for dep in deps.get(stage, ()):
                found |= {dep, *visit(dep)}
            closure[stage] = found
        return closure[stage]

    for stage in deps:
        visit(stage)
    return closure


def select(order: Sequence[str], deps: Mapping[str, set[str]], targets: Sequence[str]) -> list[str]:
    """The stages ``dvc repro <targets>`` considers: the targets (a stage's name, or a ``foreach``/
    ``matrix`` group's name, e.g. ``train``) and every stage they depend on, in ``order``; all of
    ``order`` without targets."""
    if not targets:
        return list(order)
    closure = upstream_closure(deps)
    chosen: set[str] = set()
    for target in targets:
        matched = [s for s in order if s == target or s.split("@", 1)[0] == target]
        if not matched:
            raise ConfigError(f"dvc.yaml has no stage {target!r}; its stages: {', '.join(order)}")
        for stage in matched:
            chosen |= {stage, *closure[stage]}
    return [s for s in order if s in chosen]


def plan(order: Sequence[str], deps: Mapping[str, set[str]]) -> list[Task]:
    """The tasks that run the stages of ``order`` (topologically sorted) with their ``deps``
    (stage -> the stages it reads outputs of; stages outside ``order`` count as done)."""
    members = set(order)
    deps = {s: {d for d in deps.get(s, ()) if d in members} for s in order}
    closure = upstream_closure(deps)
    dependents: dict[str, list[str]] = {s: [] for s in order}
    for stage in order:
        for dep in deps[stage]:
            dependents[dep].append(stage)

    def follower(stage: str) -> str | None:
        """The one stage that can start as soon as ``stage`` ends (every other dependency of it is
        done before ``stage`` starts) and that no other dependent of ``stage`` could start before:
        running it in ``stage``'s call delays nothing. Two such stages would run one after the
        other instead of side by side: neither joins."""
        ready = [d for d in dependents[stage] if deps[d] <= {stage} | closure[stage]]
        if len(ready) != 1:
            return None
        others = [d for d in dependents[stage] if d != ready[0]]
        return ready[0] if all(ready[0] in closure[d] for d in others) else None

    chains: list[list[str]] = []
    chain_of: dict[str, int] = {}
    for stage in order:
        if stage in chain_of:
            continue
        chain = [stage]
        while (next_stage := follower(chain[-1])) is not None and next_stage not in chain_of:
            chain.append(next_stage)
        for member in chain:
            chain_of[member] = len(chains)
        chains.append(chain)

    downstream = {s: sum(1 for other in order if s in closure[other]) for s in order}
    return [
        Task(
            stages=tuple(chain),
            after=frozenset(chain_of[d] for s in chain for d in deps[s] if chain_of[d] != index),
            downstream=max(downstream[s] for s in chain),
        )
        for index, chain in enumerate(chains)
    ]


def pipeline_stages(root: Path) -> tuple[list[str], dict[str, set[str]]]:
    """The pipeline's stages in a topological order (dvc.yaml's order where free) and each one's
    upstream stages, from DVC's own graph (``.dvc`` files such as ``data.dvc`` are not stages to run)."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to each stage it depends on
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
        position = {s.addressing: i for i, s in enumerate(stages)}
        names = set(position)
        deps = {s.addressing: {d.addressing for d in graph.successors(s) if d.addressing in names} for s in stages}
        dependency_first = nx.DiGraph([(d, s) for s, ds in deps.items() for d in ds])
        dependency_first.add_nodes_from(names)
        order = list(nx.lexicographical_topological_sort(dependency_first, key=position.__getitem__))
    return order, deps


# ------------------------------------------------------------------ running it
@dataclass
class StageTimes:
    """When each stage's ``Running stage`` line came, and when the next one or its call's end came
    (monotonic seconds)."""

    started: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)

    def seconds(self) -> dict[str, float]:
        """Seconds per stage that ran (DVC's bookkeeping after a command counts with its stage)."""
        return {stage: round(self.ended[stage] - start, 1) for stage, start in self.started.items() if stage in self.ended}

    def offsets(self, origin: float) -> dict[str, float]:
        """When each stage started, in seconds after ``origin`` (which stages ran side by side)."""
        return {stage: round(start - origin, 1) for stage, start in self.started.items()}


class _Call:
    """One ``dvc repro`` process: its lines go to ``out`` with the stage they belong to, its exit
    code to ``events`` as (index, code)."""

    def __init__(
        self, index: int, command: list[str], root: Path, out: Callable[[str | None, str], None],
        events: queue.SimpleQueue[tuple[int, int]], times: StageTimes,
    ) -> None:  # fmt: skip
        self.index, self.times, self.stage = index, times, None
        self._out, self._events = out, events
        # A session of its own, so that a stop reaches the stage's command too (os.killpg): DVC
        # ignores SIGINT while its command runs, and would leave a SIGTERMed command running.
        self.process = subprocess.Popen(
            command, cwd=root, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        # newline="": lines keep their ends, so a progress bar's "\r" redraws can be told apart.
        stream = io.TextIOWrapper(self.process.stdout, encoding="utf-8", errors="replace", newline="")  # type: ignore[arg-type]
        shown = 0.0
        for line in stream:
            if line.endswith("\r"):  # a progress bar redrawn in place: one line every PROGRESS_SECONDS
                if line.strip() and time.monotonic() - shown >= PROGRESS_SECONDS:
                    shown = time.monotonic()
                    self._out(self.stage, line.strip())
                continue
            match = RUNNING_STAGE.search(line)
            if match:
                self._started(match.group(1))
            self._out(self.stage, line.rstrip("\r\n"))
        code = self.process.wait()
        self._started(None)
        self._events.put((self.index, code))

    def _started(self, stage: str | None) -> None:
        now = time.monotonic()
        if self.stage is not None:
            self.times.ended[self.stage] = now
        if stage is not None:
            self.stage = stage
            self.times.started[stage] = now

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def join(self) -> None:
        self._thread.join()


def dvc_command(stages: Sequence[str], *, force: bool, single_item: bool) -> list[str]:
    """``dvc repro`` of these stages by this interpreter's DVC, waiting for the repo lock."""
    return [
        sys.executable, "-m", "dvc", "--wait-for-lock", "repro",
        *(["--force"] if force else []), *(["--single-item"] if single_item else []), *stages,
    ]  # fmt: skip


def stage_env() -> dict[str, str]:
    """The environment stage commands run in: this interpreter's ``bin`` first on PATH (the
    commands say ``python``), DVC's analytics off."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{path}" if path else bin_dir, "DVC_NO_ANALYTICS": "1"}


@dataclass
class Outcome:
    code: int  # 0; 1: a stage failed; 128 + N: stopped by signal N
    times: StageTimes
    failed: list[str]  # the stage each failed call was running
    not_run: list[int]  # calls never started (after a failure or a stop)


def run_calls(
    commands: Sequence[list[str]],
    after: Sequence[frozenset[int]],
    priority: Sequence[int],
    root: Path,
    *,
    jobs: int,
    out: Callable[[str | None, str], None],
) -> Outcome:
    """Run ``commands`` (``dvc repro`` calls), each once the calls in its ``after`` have
    succeeded, at most ``jobs`` at once, the highest ``priority`` first among ready ones. After a
    failed call no new one starts and the running ones finish; SIGINT/SIGTERM is passed on to
    every running call and waited out (a second one kills them)."""
    times = StageTimes()
    # A signal handler may put into a SimpleQueue (its put is reentrant): a stop arrives as an event.
    events: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    waiting = set(range(len(commands)))
    finished: set[int] = set()
    running: dict[int, _Call] = {}
    failed: list[str] = []
    stopped: int | None = None

    def stop(signum: int, frame: FrameType | None) -> None:
        events.put((STOP_EVENT, signum))

    in_main_thread = threading.current_thread() is threading.main_thread()  # where handlers can be set
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS} if in_main_thread else {}
    try:
        while waiting or running:
            if not failed and stopped is None:
                ready = sorted((i for i in waiting if after[i] <= finished), key=lambda i: (-priority[i], i))
                for index in ready[: jobs - len(running)]:
                    waiting.discard(index)
                    running[index] = _Call(index, list(commands[index]), root, out, events, times)
            if not running:
                break
            index, code = events.get()
            if index == STOP_EVENT:
                forwarded = code if stopped is None else signal.SIGKILL
                stopped = stopped or code
                for call in running.values():
                    call.signal(forwarded)
                continue
            call = running.pop(index)
            call.join()
            if code == 0:
                finished.add(index)
            else:
                failed.append(call.stage or commands[index][-1])  # DVC has said why, in the stage's lines
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    code = EXIT_SIGNAL_BASE + stopped if stopped is not None else EXIT_FAILED if failed else 0
    return Outcome(code, times, failed, sorted(waiting))


def reproduce(
    root: Path,
    targets: Sequence[str] = (),
    *,
    jobs: int | None = None,
    force: bool = False,
    timings: Path | None = None,
    write: Callable[[str], None] = print,
) -> int:
    """``dvc repro [targets]`` with up to ``jobs`` independent stages at once (``default_jobs()``
    when None); one job is plain ``dvc repro``. ``timings``: each stage's seconds are written there
    (JSON). Returns the exit code."""
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    started = time.monotonic()
    if jobs == 1:
        outcome = run_calls(
            [dvc_command(targets, force=force, single_item=False)], [frozenset()], [0], root, jobs=1,
            out=lambda stage, line: write(line),
        )  # fmt: skip
        names: list[str] = []
    else:
        order, deps = pipeline_stages(root)
        tasks = plan(select(order, deps, targets), deps)
        names = [", ".join(t.stages) for t in tasks]
        width = max((len(s) for t in tasks for s in t.stages), default=0)
        lock = threading.Lock()

        def out(stage: str | None, line: str) -> None:
            with lock:  # whole lines, one lane at a time
                write(f"{stage or '':<{width}} | {line}")

        write(f"repro: {sum(len(t.stages) for t in tasks)} stages in {len(tasks)} dvc calls, up to {jobs} at once")
        outcome = run_calls(
            [dvc_command(t.stages, force=force, single_item=True) for t in tasks],
            [t.after for t in tasks], [t.downstream for t in tasks], root, jobs=jobs, out=out,
        )  # fmt: skip
    if outcome.code >= EXIT_SIGNAL_BASE:
        write(f"repro: stopped by {signal.Signals(outcome.code - EXIT_SIGNAL_BASE).name}")
    elif outcome.failed:
        not_run = "; ".join(names[i] for i in outcome.not_run) or "none"
        write(f"repro: failed: {', '.join(outcome.failed)}" + (f"; not run: {not_run}" if names else ""))
    if timings is not None:
        from atric.atomic import write_json_atomic

        total = round(time.monotonic() - started, 1)
        write_json_atomic(
            timings,
            {
                "jobs": jobs, "exit_code": outcome.code, "total_s": total,
                "stages_s": outcome.times.seconds(), "started_at_s": outcome.times.offsets(started),
            },
        )  # fmt: skip
    return outcome.code
