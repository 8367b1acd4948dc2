"""Embed every caption as a sequence of word vectors (params: ``text``, ``data``).

python src/embed_text.py                      # all splits, text.vectors from params.yaml
python src/embed_text.py --set text.vectors=train --split train
"""

from __future__ import annotations

import argparse

from atric import cli
from atric.layout import SPLITS, Layout
from atric.text import embed_captions, format_report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_params_arguments(parser)
    parser.add_argument(
        "--split",
        dest="splits",
        action="append",
        choices=SPLITS,
        help="split to embed (repeatable; default: all)",
    )
    args = parser.parse_args()
    params = cli.params_from_args(args)
    layout = Layout(params.data.dataset, params.data.root)
    from atric.corpus.seed import LEGACY_VECTORS, import_text

    if params.data.source == "seed" and params.text.vectors == LEGACY_VECTORS:
        # The original's word2vec caption embeddings, as they are (no tokenising, no lookup).
        for split in args.splits or SPLITS:
            print(f"{split}: imported -> {import_text(params, split)}")
        return 0
    report = embed_captions(layout, params.text.vectors, args.splits or SPLITS, params.text, progress=True)
    print(format_report(report))
    print(f"report: {layout.text_report_path(report.vectors)}")
    return 0


if __name__ == "__main__":
    cli.run(main)
