"""Run the DVC pipeline with independent stages side by side: ``dvc repro``, parallel.

    python src/repro.py                        # the whole pipeline (what `make run` runs)
    python src/repro.py train@logmel-lstm      # a stage (or a group: train) and what it needs
    python src/repro.py --jobs 1               # exactly `dvc repro`
    python src/repro.py --force --timings reports/repro.json

Each stage runs in its own ``dvc repro --single-item`` call once the stages it depends on have
finished (DVC's documented way to run a pipeline's branches in parallel), so DVC still decides
what changed, and ``dvc.lock`` and ``dvc status`` end as after ``dvc repro``. Lines are prefixed
with their stage. Exit code: 0; 1 when a stage failed (the others already running finish, nothing
new starts); 2 for a bad argument; 128 + N when stopped by signal N (passed on to every stage).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from atric.cli import run


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", nargs="*", help="stages or stage groups (default: the whole pipeline)")
    parser.add_argument(
        "-j", "--jobs", type=int, help="stages at once (default: as many as one-thread train stages fit the cores)"
    )
    parser.add_argument("-f", "--force", action="store_true", help="run the stages even if nothing changed")
    parser.add_argument("--timings", type=Path, help="write each stage's seconds here (JSON)")
    args = parser.parse_args()

    from dvc.repo import Repo

    from atric.ops.repro import reproduce

    return reproduce(Path(Repo.find_root()), args.targets, jobs=args.jobs, force=args.force, timings=args.timings)


if __name__ == "__main__":
    run(main)
