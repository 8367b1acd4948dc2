"""Start-up time of the train stage: process start to its first training step, cold and warm.

    python benchmarks/startup.py [--expert logmel] [--pooling mean] [--epochs 1] [--warm-runs 2]
                                 [--baseline REV] [--workdir DIR] [--out benchmarks/results/startup.json]

Runs the real stage command, ``python src/train.py --pipeline --expert E --pooling P`` (as
``dvc repro`` runs it, with the default MLflow store ``sqlite:///mlruns/mlflow.db``), in a
subprocess, in a temporary copy of the project's tracked files (``git ls-files``):

- ``cold``: no ``mlruns/`` yet (the first train stage of a fresh checkout creates the DB);
- ``warm``: the same command again (the DB, the experiment and earlier runs exist), the
  median of ``--warm-runs`` runs;
- ``imports``: one more warm run under ``python -X importtime``: the seconds spent importing
  until the first step, and the heaviest top-level imports;
- ``help_s``: ``python src/train.py --help``, what the script imports before it can answer.
- ``exit_s`` (in each run): from the stage's main returning to the process's end (exit
  handlers, the interpreter's shutdown).

``--baseline REV`` measures a copy of that revision (``git archive``) the same way, each of its
runs right after the current tree's, so that both see the same load.

The default corpus's features (``data/<dataset>`` of this checkout, when ``extract`` and
``embed_text`` have run) are linked into the copy, read only; without them a tiny corpus is
built there first (synthesize, prepare, extract, embed_text with tiny params).

"First training step": the engine has no hook for it, so the child is started through this
file (``--probe``), which wraps ``atric.engine.loop.train_epoch`` once that module is imported
and records wall-clock times (``time.time()``) at its first call (``first_epoch_s``: the
loop starts fetching the first batch) and at the first completed step (``first_step_s``:
the progress bar's first update, i.e. after the first ``optimizer.step()``). The parent
takes the time just before it starts the process, so interpreter start-up is included.
Nothing in the stage is changed otherwise: the script runs through ``runpy`` with
``sys.path[0] = src/``, exactly as ``python src/train.py`` has it.

Prints one JSON document and writes it to ``--out``; ``uptime`` records the load average,
which on a shared 2-core machine changes every number here.
"""

from __future__ import annotations

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEP_LINE = "atric-startup: first training step"
TINY_PARAMS = {
    "data": {
        "synth": {"clips": {"train": 16, "val": 6, "test": 6}, "min_duration": 1.5, "max_duration": 2.5}
    },
    "features": {"experts": ["logmel"]},
}


# --- the child: probe the real stage script -------------------------------------------------


def _probe(out_path: str, script: str, argv: list[str]) -> None:
    """Run ``script`` as ``__main__``; write the first-epoch and first-step times to ``out_path``."""
    import importlib.abc
    import importlib.util
    import json
    import resource
    import runpy

    marks: dict[str, float] = {}

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def save() -> None:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(marks, f)

    def instrument(loop: object) -> None:
        original_epoch = loop.train_epoch  # type: ignore[attr-defined]
        original_tqdm = loop.tqdm  # type: ignore[attr-defined]

        class FirstStep(original_tqdm):  # type: ignore[misc, valid-type]
            def update(self, n: float = 1) -> bool | None:
                if "first_step" not in marks:
                    marks["first_step"] = time.time()
                    marks["first_step_cpu"] = cpu_seconds()
                    save()
                    print(FIRST_STEP_LINE, file=sys.stderr, flush=True)  # splits -X importtime output
                return super().update(n)

        def train_epoch(*args: object, **kwargs: object) -> object:
            if "first_epoch" not in marks:
                marks["first_epoch"] = time.time()
                save()
            result = original_epoch(*args, **kwargs)
            if "first_epoch_end" not in marks:
                marks["first_epoch_end"] = time.time()
                save()
            return result

        loop.train_epoch = train_epoch  # type: ignore[attr-defined]
        loop.tqdm = FirstStep  # type: ignore[attr-defined]

    class Finder(importlib.abc.MetaPathFinder):
        """Instrument ``atric.engine.loop`` right after it is executed, wherever it is imported."""

        def find_spec(self, name: str, path: object, target: object = None) -> object:
            if name != "atric.engine.loop":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_instrument(module: object) -> None:
                exec_module(module)
                instrument(module)

            spec.loader.exec_module = exec_and_instrument  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, Finder())
    sys.argv = [script, *argv]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        marks["exit"] = time.time()
        save()


# --- the parent ------------------------------------------------------------------------------


def _uptime() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["uptime"], check=False, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except OSError:
        load = os.getloadavg()
        return f"load average: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


def _copy_tracked(dest: str) -> None:
    """The tracked files of this checkout (working-tree versions), without pipeline results."""
    import shutil
    import subprocess

    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in names:
        source = os.path.join(REPO, name)
        if not name or name.startswith(("dvc.lock", "metrics/", "reports/")) or not os.path.isfile(source):
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, name)) or dest, exist_ok=True)
        shutil.copy2(source, os.path.join(dest, name))


def _git_init(work: str) -> None:
    import subprocess

    env = {**_env(), "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com"}
    env.update(GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@example.com")
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "startup benchmark"]):
        subprocess.run(["git", *command], cwd=work, env=env, check=True, capture_output=True)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store, as `dvc repro` on a checkout uses it
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def _prepare_data(work: str, expert: str) -> str:
    """Link the default corpus's features into ``work``, or build a tiny corpus there; returns which."""
    import subprocess

    import yaml

    with open(os.path.join(work, "params.yaml"), encoding="utf-8") as f:
        params = yaml.safe_load(f)
    dataset, root = params["data"]["dataset"], params["data"]["root"]
    vectors = params["text"]["vectors"]
    source = os.path.join(REPO, root, dataset)
    needed = [
        os.path.join(source, "AudioExpert", expert, split, f"{expert}.h5") for split in ("train", "val")
    ] + [os.path.join(source, "TextEmbeddings", f"{vectors}_{split}.h5") for split in ("train", "val")]
    os.makedirs(os.path.join(work, root), exist_ok=True)
    if all(os.path.isfile(p) for p in needed):
        os.symlink(source, os.path.join(work, root, dataset))
        return f"{root}/{dataset} of {REPO} (linked)"
    from copy import deepcopy

    tiny = deepcopy(params)
    for section, values in TINY_PARAMS.items():
        for key, value in values.items():
            tiny[section][key] = value
    with open(os.path.join(work, "params.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(tiny, f, sort_keys=False)
    for command in (
        ["src/synthesize.py", "--no-progress"],
        ["src/prepare.py"],
        ["src/extract.py", "--expert", expert, "--no-progress"],
        ["src/embed_text.py"],
    ):
        subprocess.run([sys.executable, *command], cwd=work, env=_env(), check=True, capture_output=True)
    return "a tiny corpus built in the copy (no default-corpus features in this checkout)"


def _run_stage(work: str, stage_args: list[str], *, importtime: bool = False) -> dict[str, object]:
    import json
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        marks_path = f.name
    command = [sys.executable, *(["-X", "importtime"] if importtime else [])]
    command += [os.path.abspath(__file__), "--probe", marks_path, "src/train.py", *stage_args]
    start = time.time()
    done = subprocess.run(command, check=False, cwd=work, env=_env(), capture_output=True, text=True)
    end = time.time()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    with open(marks_path, encoding="utf-8") as f:
        marks = json.load(f)
    os.unlink(marks_path)
    if "first_epoch_end" not in marks:
        raise SystemExit("the probe saw no training epoch (atric.engine.loop.train_epoch not called)")
    step = "first_step" in marks  # False if the loop no longer updates its progress bar per step
    result: dict[str, object] = {
        "first_epoch_s": round(marks["first_epoch"] - start, 3),
        "first_step_s": round(marks["first_step"] - start, 3) if step else None,
        # user + sys of the stage process until then: close to what an idle machine takes
        "first_step_cpu_s": round(marks["first_step_cpu"], 3) if step else None,
        "first_epoch_train_s": round(marks["first_epoch_end"] - marks["first_epoch"], 3),
        "after_training_s": round(end - marks["first_epoch_end"], 3),  # validation, MLflow logging, exit
        "total_s": round(end - start, 3),
        "exit_s": round(end - marks["exit"], 3),  # the stage's main returned: interpreter shutdown
    }
    if importtime:
        result.update(_import_summary(done.stderr))
    return result


def _import_summary(stderr: str, top: int = 15) -> dict[str, object]:
    """Seconds spent importing before the first step, and the heaviest imports (cumulative)."""
    rows: list[tuple[int, int, str]] = []  # (cumulative us, depth, name)
    for line in stderr.splitlines():
        if line == FIRST_STEP_LINE:
            break
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, _, cumulative, name = line.replace("import time:", "|", 1).split("|")
        depth = (len(name) - len(name.lstrip(" "))) // 2
        rows.append((int(cumulative), depth, name.strip()))
    top_level = [(c, n) for c, d, n in rows if d == 0]
    heaviest = sorted(top_level, reverse=True)[:top]
    return {
        "import_s": round(sum(c for c, _ in top_level) / 1e6, 3),
        "top_imports_s": {name: round(c / 1e6, 3) for c, name in heaviest},
    }


def _make_tree(work: str, expert: str, revision: str | None) -> str:
    """A runnable copy in ``work``: this checkout's tracked files, or ``revision``'s."""
    import subprocess

    os.makedirs(work, exist_ok=True)
    if revision is None:
        _copy_tracked(work)
    else:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", revision], cwd=REPO, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", work], input=archive, check=True)
        subprocess.run(["rm", "-rf", "dvc.lock", "metrics", "reports"], cwd=work, check=True)
    data = _prepare_data(work, expert)
    # Byte-compiled like a checkout after its first stage: "cold" is about the MLflow store.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "src"], cwd=work, check=True)
    _git_init(work)  # runs are tagged with the commit: a stage runs in a git checkout
    return data


def _help_seconds(work: str) -> float:
    """Wall seconds of ``python src/train.py --help``: what the stage imports before it can answer."""
    import subprocess

    start = time.time()
    subprocess.run(
        [sys.executable, "src/train.py", "--help"], cwd=work, env=_env(), check=True, capture_output=True
    )
    return round(time.time() - start, 3)


def _summary(cold: dict[str, object], warm_runs: list[dict[str, object]], imports: dict[str, object]) -> dict:
    import statistics

    def median(key: str) -> float | None:
        values = [float(run[key]) for run in warm_runs if run[key] is not None]  # type: ignore[arg-type]
        return round(statistics.median(values), 3) if values else None

    return {
        "cold": cold,
        "warm": {key: median(key) for key in warm_runs[0]},
        "warm_runs": warm_runs,
        "imports": imports,
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        _probe(sys.argv[2], sys.argv[3], sys.argv[4:])
        return 0

    import argparse
    import json
    import shutil
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expert", default="logmel")
    parser.add_argument("--pooling", default="mean")
    parser.add_argument(
        "--epochs", type=int, default=1, help="train.epochs of each run (start-up is the same)"
    )
    parser.add_argument("--warm-runs", type=int, default=2)
    parser.add_argument(
        "--baseline", help="also measure this git revision, its runs interleaved with this tree's"
    )
    parser.add_argument("--workdir", help="keep the copies here (default: a temporary folder, removed)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "startup.json"))
    args = parser.parse_args()

    root = args.workdir or tempfile.mkdtemp(prefix="atric-startup-")
    sides = {"current": None, **({"baseline": args.baseline} if args.baseline else {})}
    trees = {side: os.path.join(root, side) for side in sides}
    stage = ["--pipeline", "--expert", args.expert, "--pooling", args.pooling]
    stage += ["--set", f"train.epochs={args.epochs}"]
    try:
        data = {side: _make_tree(trees[side], args.expert, rev) for side, rev in sides.items()}
        load_before = _uptime()
        # Interleaved, so that both sides see the same load on a shared machine.
        help_s = {side: _help_seconds(trees[side]) for side in sides}
        cold = {side: _run_stage(trees[side], stage) for side in sides}
        warm: dict[str, list[dict[str, object]]] = {side: [] for side in sides}
        for _ in range(args.warm_runs):
            for side in sides:
                warm[side].append(_run_stage(trees[side], stage))
        imports = {side: _run_stage(trees[side], stage, importtime=True) for side in sides}
        load_after = _uptime()
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)

    doc: dict[str, object] = {
        "command": "python src/train.py " + " ".join(stage),
        "tracking_uri": "sqlite:///mlruns/mlflow.db (the default store, in each copy)",
        "data": data["current"],
        "cpus": os.cpu_count(),
        "uptime_before": load_before,
        "uptime_after": load_after,
    }
    for side in sides:
        label = "current tree" if side == "current" else f"revision {args.baseline}"
        doc[side] = {"tree": label, "help_s": help_s[side], **_summary(cold[side], warm[side], imports[side])}
    text = json.dumps(doc, indent=2)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
