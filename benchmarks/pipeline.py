"""The default pipeline from a fresh clone, stage by stage, idle and under load (issue #17).

    python benchmarks/pipeline.py [--rev HEAD] [--serial] [--load-processes 2] [--out benchmarks/results/pipeline.json]

Clones this repository at ``--rev`` into a temporary folder and there runs what ``make run`` runs:
``make venv`` (the install, timed but not counted), ``make data/raw`` (the corpus), then
``python src/repro.py`` (independent stages side by side; ``dvc repro`` in revisions before it);
with ``--serial`` every stage again one at a time (``--jobs 1``, plain ``dvc repro``) and then side
by side again (two warm runs to compare); then once more beside ``--load-processes`` busy processes (another job on the same cores, as
``benchmarks/train.py`` starts them). A stage's time runs from DVC's ``Running stage`` line to
the next one of its DVC call (so DVC's own bookkeeping after a command is counted with its stage).
Prints and writes JSON: per stage and per stage kind, totals, CPU seconds, ``uptime`` around each run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import CompetingLoad, uptime  # noqa: E402 -- the benchmarks' one competing load

from atric.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"Running stage '([^']+)'")
GOAL_SECONDS = 360  # issue #17: the default pipeline in < 6 min on 2 idle cores


def _env(work: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{work / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def _timed(command: list[str], work: Path) -> float:
    started = time.monotonic()
    subprocess.run(command, cwd=work, env=_env(work), check=True, stdout=subprocess.DEVNULL)
    return round(time.monotonic() - started, 1)


def repro(work: Path, *, force: bool, jobs: int | None = None) -> dict[str, Any]:
    """What ``make run`` runs in ``work`` (``src/repro.py``; ``dvc repro`` in revisions before it),
    with ``jobs`` stages at once (None: its default). Seconds per stage: the runner's own timings
    (from a stage's ``Running stage`` line to the next line of that kind in its DVC call, or to the
    call's end), the same rule this benchmark applied to ``dvc repro``'s lines before."""
    runner = work / "src" / "repro.py"
    timings = work / "repro-timings.json"
    if runner.exists():
        command = [str(work / ".venv" / "bin" / "python"), str(runner), "--timings", str(timings)]
        command += [*(["--force"] if force else []), *(["--jobs", str(jobs)] if jobs is not None else [])]
    elif jobs in (None, 1):
        command = [str(work / ".venv" / "bin" / "dvc"), "repro", *(["-f"] if force else [])]
    else:
        raise SystemExit(f"{work}: this revision has no src/repro.py, so no --jobs {jobs}")
    before = uptime()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    starts: list[tuple[str, float]] = []
    with subprocess.Popen(
        command, cwd=work, env=_env(work), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = STAGE_LINE.search(line)
            if match:
                starts.append((match.group(1), time.monotonic() - started))
                print(f"{starts[-1][1]:7.1f} s  {match.group(1)}", file=sys.stderr, flush=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {proc.returncode}")
    total = time.monotonic() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    started_at: dict[str, float] = {}
    if runner.exists():
        recorded = json.loads(timings.read_text())
        stages: dict[str, float] = recorded["stages_s"]
        started_at = recorded.get("started_at_s", {})
        jobs = recorded["jobs"]
    else:
        stages = {name: round(end - begin, 1) for (name, begin), (_, end) in zip(starts, [*starts[1:], ("", total)])}
        jobs = 1
    kinds: dict[str, float] = {}
    for name, seconds in stages.items():
        kind = name.split("@")[0]
        kinds[kind] = round(kinds.get(kind, 0.0) + seconds, 1)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(command)),
        "jobs": jobs,
        "uptime_before": before,
        "uptime_after": uptime(),
        "total_s": round(total, 1),
        # CPU seconds of every process it ran: over the cores, the least time any schedule could take
        "cpu_s": round(cpu, 1),
        "stages_run": len(stages),
        "by_kind_s": kinds,
        "stages_s": stages,
        **({"started_at_s": started_at} if started_at else {}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the revision to clone (default: HEAD)")
    parser.add_argument("--load-processes", type=int, default=2, help="busy processes of the loaded run (0: none)")
    parser.add_argument("--workdir", help="clone here and keep it (default: a temporary folder, removed)")
    parser.add_argument(
        "--serial", action="store_true",
        help="also rerun every stage one at a time (--jobs 1: plain dvc repro), then side by side again",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline.json"))
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="atric-pipeline-"))
    work = root / "clone"
    try:
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(work)], check=True)
        subprocess.run(["git", "checkout", "--quiet", args.rev], cwd=work, check=True)
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=work, check=True, capture_output=True, text=True
        ).stdout.strip()
        report: dict[str, Any] = {
            "command": " ".join(["python", "benchmarks/pipeline.py", *sys.argv[1:]]),
            "commit": commit,
            "cpus": len(os.sched_getaffinity(0)),
            "install_s": _timed(["make", "venv"], work),  # not counted (issue #17)
            "uptime_before_corpus": uptime(),
            "corpus_s": _timed(["make", "data/raw"], work),
        }
        report["idle"] = repro(work, force=False)
        report["idle_corpus_and_repro_s"] = round(report["corpus_s"] + report["idle"]["total_s"], 1)
        report["goal_s"] = GOAL_SECONDS
        report["goal_met_idle"] = report["idle_corpus_and_repro_s"] < GOAL_SECONDS
        if args.serial:
            # Every stage again, one at a time (plain dvc repro), then side by side once more: two
            # warm runs, back to back on the same machine (the first run also paid first-run costs).
            report["idle_serial"] = repro(work, force=True, jobs=1)
            report["idle_parallel_again"] = repro(work, force=True)
            report["serial_over_parallel"] = round(
                report["idle_serial"]["total_s"] / report["idle_parallel_again"]["total_s"], 2
            )
        if args.load_processes:
            with CompetingLoad(args.load_processes):
                report["loaded"] = repro(work, force=True)
            report["loaded"]["load_processes"] = args.load_processes
            report["loaded_over_idle"] = round(report["loaded"]["total_s"] / report["idle"]["total_s"], 2)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
