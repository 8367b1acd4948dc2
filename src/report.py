"""Stage `report`: reports/results.md (paper-style table, mean ± std over seeds, seed noise, temporal
order) + PNG plots + reports/plots/*.json for `dvc plots show`, and the champion chosen on val:
reports/champion.json, registered in MLflow with the `champion` alias.

    python src/report.py [--out reports] [--no-register]
    python src/report.py --summary     # print the main comparison (what `make run` ends with); writes nothing
"""

from __future__ import annotations

import argparse
from pathlib import Path

from atric.cli import add_params_arguments, params_from_args, run
from atric.engine import SELECTION_METRIC, evaluation_metrics_dir
from atric.layout import Layout, read_index
from atric.ops.champion import (
    CHAMPION_FILE,
    choose_champion,
    read_champion,
    register_champion,
    write_champion,
)
from atric.report import group_runs, load_histories, load_run_metrics, summary_table, write_report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_arguments(parser)
    parser.add_argument(
        "--out", default=str(CHAMPION_FILE.parent), help=f"output folder (default: {CHAMPION_FILE.parent})"
    )
    parser.add_argument("--no-register", action="store_true", help="do not touch the MLflow registry")
    parser.add_argument("--summary", action="store_true", help="print the compact results table; write nothing")
    args = parser.parse_args()
    params = params_from_args(args)
    split = params.evaluate.split
    layout = Layout(params.data.dataset, params.data.root)
    runs, other_corpus_runs = load_run_metrics(evaluation_metrics_dir(params.train, split), layout)
    if args.summary:
        print(f"{params.data.dataset}, {split} split (reports/results.md has every column, std and significance):")
        print(summary_table(group_runs(list(runs), params.train.seed), runs))
        champion = Path(args.out) / CHAMPION_FILE.name
        if champion.exists():
            print(f"champion, chosen on val: {read_champion(champion)['run']}")
        return 0
    histories = load_histories(Path(params.train.metrics_dir) / "history", list(runs))
    champion = choose_champion(params)
    n_clips = len(read_index(layout.index_path(split), split))
    # Everything read and checked before the first file is written.
    champion_path = write_champion(champion, Path(args.out) / CHAMPION_FILE.name)
    path = write_report(
        runs,
        histories,
        Path(args.out),
        dataset=params.data.dataset,
        validation_key=f"val_{SELECTION_METRIC}",
        default_seed=params.train.seed,
        n_clips=n_clips,
        champion=champion,
        split=split,
        other_corpus_runs=other_corpus_runs,
    )
    print(
        f"wrote {path} ({len(runs)} runs of {params.data.dataset}"
        + (f"; {len(other_corpus_runs)} of another corpus left out" if other_corpus_runs else "")
        + f"); champion by {champion['metric']} on val: {champion['run']} "
        f"({champion['value']:.2f}) -> {champion_path}"
    )
    if not args.no_register:
        version = register_champion(params, champion_path)
        if version:
            print(f"registered {champion['run']} as champion (version {version})")
    return 0


if __name__ == "__main__":
    run(main)
