"""Stage `prepare`: data.raw_dir -> data/<Dataset>/Index/{train,val,test} + manifest.json.

    python src/prepare.py [--params params.yaml] [--set data.source=clotho]

Reads params section `data`; see atric.corpus.prepare for what is checked.
"""

from __future__ import annotations

import argparse

from atric.cli import add_params_arguments, params_from_args, run
from atric.corpus.prepare import prepare_dataset, summarize
from atric.layout import Layout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_arguments(parser)
    params = params_from_args(parser.parse_args())
    manifest = prepare_dataset(params)
    print(summarize(manifest, Layout(params.data.dataset, params.data.root)))
    return 0


if __name__ == "__main__":
    run(main)
