"""Retrieval-metrics time on 5,000 x 1,000 (both directions), this tree against a baseline
revision's ``atric/metrics.py`` in the same process, interleaved; both must give identical
metrics on a random and on a heavily tied matrix.

    python benchmarks/metrics.py [--baseline cc6cc6f] [--rounds 9]

Prints JSON and writes benchmarks/results/metrics.json (target: < 20 ms on 2 idle cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np

from atric.metrics import retrieval_metrics


def baseline_metrics(revision: str):
    """``retrieval_metrics`` of ``atric/metrics.py`` at ``revision`` (it imports only numpy and atric.errors)."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:src/atric/metrics.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("baseline_metrics", handle.name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    Path(handle.name).unlink()
    return module.retrieval_metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="cc6cc6f")  # main when the performance issue was filed
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "metrics.json")
    args = parser.parse_args()
    sides = {"baseline": baseline_metrics(args.baseline), "current": retrieval_metrics}
    rng = np.random.default_rng(0)
    sim = rng.standard_normal((5000, 1000)).astype(np.float32)
    tied = np.round(sim, 1)
    identical = all(sides["baseline"](m, 5) == sides["current"](m, 5) for m in (sim, tied))
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    # Interleaved (each call right after the other side's) and consecutive (each side's calls back
    # to back, as timeit does). They differ on this 2-core VM: after ~0.1 s with one core idle, the
    # threaded counting runs ~1.5x slower than back to back (the idle core is slow to come back).
    times: dict[str, list[float]] = {name: [] for name in sides}
    consecutive: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, metrics in sides.items():
            start = time.perf_counter()
            metrics(sim, 5)
            times[name].append(1000 * (time.perf_counter() - start))
    for name, metrics in sides.items():
        metrics(sim, 5)
        for _ in range(args.rounds):
            start = time.perf_counter()
            metrics(sim, 5)
            consecutive[name].append(1000 * (time.perf_counter() - start))
    report = {
        "matrix": [5000, 1000],
        "baseline": args.baseline,
        "identical_metrics_random_and_tied": identical,
        **{
            f"{name}_ms": {"median": round(float(np.median(t)), 1), "min": round(min(t), 1)}
            for name, t in times.items()
        },
        **{
            f"{name}_consecutive_ms": {"median": round(float(np.median(t)), 1), "min": round(min(t), 1)}
            for name, t in consecutive.items()
        },
        "target_ms": 20,
        "uptime_before": uptime_before,
        "uptime_after": subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip(),
    }
    text = json.dumps(report, indent=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
