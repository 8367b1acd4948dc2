"""Generate the embedded default corpus (SynthCaps) into data.raw_dir.

python src/synthesize.py                      # data/raw/{audio/<split>/*.wav, captions.json}
python src/synthesize.py --force              # regenerate even if an identical corpus exists
python src/synthesize.py --figure reports/corpus_examples.png
"""

from __future__ import annotations

import argparse

from atric.cli import add_params_arguments, params_from_args, run


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_params_arguments(parser)
    parser.add_argument("--force", action="store_true", help="regenerate even if an identical corpus exists")
    parser.add_argument("--figure", metavar="PNG", help="also draw example spectrograms with captions to PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    params = params_from_args(args)

    from atric.corpus.synth import describe, read_synth_raw, synthesize_corpus

    result = synthesize_corpus(params.data, force=args.force, progress=not args.no_progress)
    summary = describe(read_synth_raw(result.raw_dir))
    print(f"{result.raw_dir}: {result.status} ({result.clips} clips, {result.seconds:.1f} s); {summary}")
    if args.figure:
        from atric.corpus.figures import plot_corpus_examples

        plot_corpus_examples(result.raw_dir, args.figure)
        print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    run(main)
