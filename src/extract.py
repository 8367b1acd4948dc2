"""Extract audio-expert features: data/<Dataset>/AudioExpert/<expert>/<split>/<expert>.h5.

    python src/extract.py                      # every expert in features.experts, every split
    python src/extract.py --expert aisfx --split train --set features.batch_size=32

Resumable: an interrupted run continues where it stopped (see atric.features.extract).
"""

from __future__ import annotations

import argparse

from atric.cli import add_params_arguments, params_from_args, run
from atric.features.base import EXPERTS
from atric.features.extract import run_extraction
from atric.layout import SPLITS


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--expert",
        action="append",
        default=[],
        metavar="NAME",
        help=f"expert to extract (repeatable; default: features.experts). Known: {', '.join(EXPERTS)}",
    )
    parser.add_argument(
        "--split", action="append", choices=SPLITS, default=[], help="split (repeatable; default: all)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_params_arguments(parser)
    args = parser.parse_args()
    params = params_from_args(args)
    if params.data.source == "seed":  # the original's precomputed features: imported, not extracted
        from atric.corpus.seed import import_features

        for expert in args.expert or params.features.experts:
            for split in args.split or SPLITS:
                print(f"{expert}/{split}: imported -> {import_features(params, expert, split)}", flush=True)
        return 0
    run_extraction(params, args.expert or None, args.split or None, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    run(main)
