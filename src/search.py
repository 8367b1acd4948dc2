"""Search a trained run: describe a sound to get clips, or give a sound to get captions.

    python src/search.py "a dog barks then a car passes" [--top-k 10] [--split test] [--json]
    python src/search.py "rain on a roof" "a bell rings"      # several queries, one batch
    python src/search.py --audio path/to/sound.wav [--top-k 10]
    python src/search.py "..." --model logmel-netrvlad        # default: the champion run

Needs the run's index (`python src/index.py --run RUN`, the `index` stage). Prints rank,
clip id, split, score and the clip's first caption. For --audio: the matched caption, each
text once (case and spacing ignored: its best-scoring clip), with how many other clips have
a caption of that text ("(+2 other clips)"; `other_clips` in --json). Indexes of 50,000 clips
or more are searched approximately (atric.search.ann), smaller ones exactly.
"""

from __future__ import annotations

import argparse
import json
import sys

from atric.cli import add_params_arguments, params_from_args, run
from atric.errors import DataError
from atric.layout import SPLITS
from atric.search import Searcher, format_table


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_params_arguments(parser)
    parser.add_argument("query", nargs="*", help="text queries (each one is searched; batched)")
    parser.add_argument("--audio", metavar="PATH", help="search captions by this sound file instead")
    parser.add_argument("--top-k", type=int, help="results per query (default: search.top_k)")
    parser.add_argument("--split", choices=SPLITS, help="only clips of this split")
    parser.add_argument("--model", help="run name (default: the champion run)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if args.audio and args.query:
        parser.error("give text queries or --audio, not both")
    if not args.audio and not args.query:
        raise DataError(
            'empty query: give a description, e.g. "a dog barks then a car passes", or --audio PATH'
        )
    if any(not q.strip() for q in args.query):  # before the slow model load
        raise DataError('empty query: give a description, e.g. "a dog barks then a car passes"')
    if args.top_k is not None and args.top_k < 1:
        parser.error("--top-k must be >= 1")
    params = params_from_args(args)
    top_k = args.top_k or params.search.top_k
    if args.model:
        run_name = args.model
    else:
        from atric.ops.champion import champion_run

        try:
            run_name = champion_run(params)
        except DataError as exc:
            raise DataError(f"{exc}; or name a trained run with --model RUN") from exc
    searcher = Searcher.open(params, run_name)
    head = {"model": run_name, "top_k": top_k, "split": args.split}

    if args.audio:
        hits = searcher.search_audio(args.audio, top_k, args.split)
        if args.json:
            doc = {**head, "queries": [{"audio": args.audio, "results": [h.to_dict() for h in hits]}]}
            print(json.dumps(doc, indent=1, ensure_ascii=False))
        else:
            print(f"{args.audio} ({run_name}):")
            print(format_table(hits))
        return 0

    results = searcher.search_text(args.query, top_k, args.split)
    for result in results:
        if result.oov:
            print(
                f"warning: query {result.query!r}: unknown words left out: {', '.join(result.oov)}",
                file=sys.stderr,
            )
    if args.json:
        queries = [
            {"query": r.query, "oov": r.oov, "results": [h.to_dict() for h in r.hits]} for r in results
        ]
        print(json.dumps({**head, "queries": queries}, indent=1, ensure_ascii=False))
    else:
        for i, result in enumerate(results):
            if i:
                print()
            print(f"{result.query!r} ({run_name}):")
            print(format_table(result.hits))
    return 0


if __name__ == "__main__":
    run(main)
