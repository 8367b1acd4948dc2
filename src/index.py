"""Stage `index`: embed every clip and caption of a run with its best model, for search.

    python src/index.py [--run logmel-netrvlad] [--split val ...] [--set search.device=cuda]

Reads params sections `data`, `text`, `train`, `features`, `search`. Writes
<search.index_dir>/<run>.h5 (default indexes/<run>.h5; format in atric.search), and from
50,000 clips on (atric.search.ann.EXACT_BELOW) <run>.faiss, its approximate index. The run
defaults to the champion named in reports/champion.json (chosen on val by the report stage). When
val is indexed, prints how often a val caption used as a query finds its own clip in
the top search.hit_rate_k.
"""

from __future__ import annotations

import argparse
import json

from atric.cli import add_params_arguments, params_from_args, run
from atric.layout import SPLITS
from atric.search import Searcher, build_index
from atric.text.vectors import PrecomputedOnlyError


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_params_arguments(parser)
    parser.add_argument("--run", help="run to index (default: the champion run)")
    parser.add_argument(
        "--split",
        action="append",
        choices=SPLITS,
        default=[],
        help="split (repeatable; default: search.splits)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    extra = [f"search.splits={json.dumps(args.split)}"] if args.split else []
    params = params_from_args(args, extra)
    if args.run:
        run_name = args.run
    else:
        from atric.ops.champion import champion_run

        run_name = champion_run(params)
    report = build_index(params, run_name, progress=not args.no_progress)
    clips = ", ".join(f"{split} {n}" for split, n in report.clips.items())
    seconds = f"{report.seconds:.1f} s"
    print(f"{run_name}: indexed {clips} clips, {report.captions} captions in {seconds} -> {report.path}")
    if "val" in report.clips:
        k = params.search.hit_rate_k
        try:
            searcher = Searcher.open(params, run_name)
        except PrecomputedOnlyError as exc:  # seed-layout captions: the index serves audio queries only
            print(f"no text-query hit rate: {exc}")
            return 0
        hits, total, unknown = searcher.caption_hits("val", k)
        note = f" ({unknown} with no known word)" if unknown else ""
        print(
            f"val captions as queries: own clip in the top {k} for {hits}/{total} = "
            f"{100 * hits / max(total, 1):.1f}%{note}"
        )
    return 0


if __name__ == "__main__":
    run(main)
