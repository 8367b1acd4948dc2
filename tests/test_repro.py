"""src/repro.py: `dvc repro` with independent stages side by side, on small real DVC projects."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from atric.ops.repro import plan, select

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A stage that records when it ran: <name>.json {start, end}, after sleeping. FAIL=<name> makes
# that stage exit 3; an 'in.txt' dependency is read so the DAG is real.
STAGE = """
import json, os, sys, time
name, seconds = sys.argv[1], float(sys.argv[2])
start = time.time()
open(f"pid_{name}", "w").write(str(os.getpid()))
time.sleep(seconds)
if os.environ.get("FAIL") == name:
    sys.exit(3)
json.dump({"start": start, "end": time.time()}, open(f"{name}.json", "w"))
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        env[key] = "t"
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        env[key] = "t@example.com"
    return env


def _project(root: Path, stages: dict[str, tuple[float, list[str]]]) -> Path:
    """A git + DVC project whose stages sleep for the given seconds after their deps."""
    root.mkdir()
    (root / "stage.py").write_text(STAGE)
    (root / "in.txt").write_text("input\n")
    dvc_yaml = {
        "stages": {
            name: {
                "cmd": f"python stage.py {name} {seconds}",
                "deps": ["stage.py", "in.txt", *(f"{d}.json" for d in deps)],
                "outs": [f"{name}.json"],
            }
            for name, (seconds, deps) in stages.items()
        }
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    (root / ".gitignore").write_text("pid_*\n")
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "p"]):
        subprocess.run(command, cwd=root, env=_env(), check=True, capture_output=True)
    return root


def _repro(root: Path, *args: str, **popen: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "src" / "repro.py"), *args],
        cwd=root, env={**_env(), **popen.pop("env", {})}, capture_output=True, text=True, timeout=300,
        check=False, **popen,
    )  # fmt: skip


def _ran(root: Path, name: str) -> dict[str, float]:
    return json.loads((root / f"{name}.json").read_text())


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not yet reaped by an orphan's new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _dvc_status(root: Path) -> str:
    done = subprocess.run(["dvc", "status"], cwd=root, env=_env(), capture_output=True, text=True, check=True)
    return done.stdout


# A diamond with a tail: a -> (b, c) -> d -> e; e can only follow d, so d and e share one call.
DIAMOND = {"a": (0.2, []), "b": (2.0, ["a"]), "c": (2.0, ["a"]), "d": (0.2, ["b", "c"]), "e": (0.2, ["d"])}


def test_plan_chains_a_stage_that_only_one_stage_unblocks_and_orders_the_rest() -> None:
    deps = {name: set(d) for name, (_, d) in DIAMOND.items()}
    tasks = plan(list(DIAMOND), deps)
    assert [t.stages for t in tasks] == [("a",), ("b",), ("c",), ("d", "e")]
    assert [sorted(t.after) for t in tasks] == [[], [0], [0], [1, 2]]
    # The pipeline's shape: train@x then evaluate@x in one call (report needs every evaluate, so
    # evaluate joins train although report also depends on train); two extracts after prepare, or
    # two trains after extract@m, run side by side; extract@n's one train joins it.
    pipeline = {
        "prepare": set(), "extract@m": {"prepare"}, "extract@n": {"prepare"},
        "train@m1": {"extract@m"}, "evaluate@m1": {"train@m1", "extract@m"},
        "train@m2": {"extract@m"}, "evaluate@m2": {"train@m2", "extract@m"},
        "train@n": {"extract@n"}, "evaluate@n": {"train@n", "extract@n"},
        "report": {"train@m1", "train@m2", "train@n", "evaluate@m1", "evaluate@m2", "evaluate@n"},
        "index": {"report", "train@m1"},
    }  # fmt: skip
    tasks = plan(list(pipeline), pipeline)
    assert [t.stages for t in tasks] == [
        ("prepare",), ("extract@m",), ("extract@n", "train@n", "evaluate@n"),
        ("train@m1", "evaluate@m1"), ("train@m2", "evaluate@m2"), ("report", "index"),
    ]  # fmt: skip
    assert [sorted(t.after) for t in tasks] == [[], [0], [0], [1], [1], [2, 3, 4]]
    assert tasks[0].downstream == 10 and tasks[-1].downstream == 1
    # A target pulls in what it depends on, a group name every stage of the group.
    assert select(list(pipeline), pipeline, ["evaluate@n"]) == ["prepare", "extract@n", "train@n", "evaluate@n"]
    assert select(list(pipeline), pipeline, ["train"]) == [
        "prepare", "extract@m", "extract@n", "train@m1", "train@m2", "train@n"
    ]  # fmt: skip


@pytest.mark.slow  # real dvc repro processes: make test only
def test_independent_stages_run_side_by_side_and_the_result_is_dvc_repro_s(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", DIAMOND)
    done = _repro(root, "--jobs", "2", "--timings", "t.json")
    assert done.returncode == 0, done.stdout + done.stderr
    a, b, c, d, e = (_ran(root, n) for n in "abcde")
    assert max(b["start"], c["start"]) < min(b["end"], c["end"]), "b and c did not overlap"
    assert a["end"] <= min(b["start"], c["start"]) and max(b["end"], c["end"]) <= d["start"] <= d["end"] <= e["start"]
    # Lines are prefixed with their stage; d and e came from one DVC call.
    assert "b | Running stage 'b'" in done.stdout and "e | Running stage 'e'" in done.stdout
    timings = json.loads((root / "t.json").read_text())
    assert timings["jobs"] == 2 and set(timings["stages_s"]) == set("abcde") and timings["stages_s"]["b"] >= 2.0
    started = timings["started_at_s"]
    assert started["a"] < started["b"] and abs(started["b"] - started["c"]) < 2.0 and started["d"] < started["e"]
    assert "Data and pipelines are up to date" in _dvc_status(root)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set("abcde")
    # As after dvc repro: nothing changed, nothing runs; a changed input reruns what depends on it.
    again = _repro(root, "--jobs", "2")
    assert again.returncode == 0 and "Running stage" not in again.stdout
    (root / "in.txt").write_text("changed\n")
    third = _repro(root, "--jobs", "2", "d")
    assert third.returncode == 0
    assert {line.split("'")[1] for line in third.stdout.splitlines() if "Running stage" in line} == set("abcd")


@pytest.mark.slow  # real dvc repro processes: make test only
def test_a_failed_stage_stops_what_depends_on_it_and_the_running_ones_finish(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {**DIAMOND, "c": (0.5, ["a"])})
    done = _repro(root, "--jobs", "2", env={"FAIL": "c"})
    assert done.returncode == 1
    last = done.stdout.strip().splitlines()[-1]
    assert last == "repro: failed: c; not run: d, e", last
    assert "exited with 3" in done.stdout  # DVC's own line, prefixed with the stage
    assert (root / "b.json").is_file() and not (root / "d.json").exists()
    # b finished beside the failure and is recorded: a rerun without the fault runs only c, d, e.
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"a", "b"}
    rerun = _repro(root, "--jobs", "2")
    assert rerun.returncode == 0
    assert {line.split("'")[1] for line in rerun.stdout.splitlines() if "Running stage" in line} == set("cde")


@pytest.mark.slow  # real dvc repro processes: make test only
def test_sigterm_reaches_the_running_stages_and_nothing_new_starts(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"a": (0.1, []), "b": (60.0, ["a"]), "c": (60.0, ["a"]), "d": (0.1, ["b", "c"])})
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "src" / "repro.py"), "--jobs", "2"],
        cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ((root / "pid_b").exists() and (root / "pid_c").exists()):
        assert time.monotonic() < deadline and proc.poll() is None, "b and c never started"
        time.sleep(0.1)
    stage_pids = [int((root / f"pid_{n}").read_text()) for n in "bc"]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "repro: stopped by SIGTERM" in out
    for pid in stage_pids:  # the stage commands themselves got the signal, not only DVC
        assert not _alive(pid), f"stage process {pid} still runs"
    assert not (root / "d.json").exists()


@pytest.mark.slow  # real dvc repro processes: make test only
def test_one_job_is_plain_dvc_repro_and_bad_targets_are_one_line(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"a": (0.1, []), "b": (0.1, ["a"])})
    done = _repro(root, "--jobs", "1")
    assert done.returncode == 0 and done.stdout.count("Running stage") == 2
    assert "| Running" not in done.stdout  # no prefixes: DVC's own output
    bad = _repro(root, "--jobs", "2", "nope")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: dvc.yaml has no stage 'nope'; its stages: a, b"
    zero = _repro(root, "--jobs", "0")
    assert zero.returncode == 2 and "--jobs must be >= 1" in zero.stderr
