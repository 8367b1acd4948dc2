"""The results report: a paper-style table over runs, seed noise, the order metric, and plots.

Runs are named ``<expert>-<pooling>`` (trained with ``train.seed``) or
``<expert>-<pooling>-seed<k>`` (an extra seed k); the table shows, per (expert, pooling), the
mean and standard deviation over the seeds found. Whether two poolings differ by more than the
seed noise is Welch's t-test (scipy, two-sided, alpha 0.05) on the test t2a geometric mean.

Why one module of this size: the table, the seed-noise test, the order section and the plots share one set of parsed runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display on workers and CI
import matplotlib.pyplot as plt

from atric.atomic import atomic_path, write_json_atomic, write_text_atomic
from atric.engine.runs import of_corpus
from atric.errors import DataError
from atric.layout import EVAL_CAPTIONS_PER_CLIP, Layout
from atric.metrics import RECALL_KS

# (column title, metric key, higher is better)
TABLE_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("t2a R@1", "t2a_R1", True),
    ("t2a R@5", "t2a_R5", True),
    ("t2a R@10", "t2a_R10", True),
    ("t2a MedR", "t2a_MedR", False),
    ("t2a mAP@10", "t2a_mAP10", True),
    ("a2t R@1", "a2t_R1", True),
    ("a2t R@5", "a2t_R5", True),
    ("a2t R@10", "a2t_R10", True),
    ("a2t MedR", "a2t_MedR", False),
    ("t2a geo", "t2a_geometric_mean", True),
)
NOISE_METRIC = "t2a_geometric_mean"  # the paper's summary metric; seed-noise test on it
NOISE_ALPHA = 0.05
ORDER_METRIC = "order_accuracy"  # atric.order: written into the test metrics when the split has pairs
ORDER_CHANCE = 50.0
SEED_SUFFIX = re.compile(r"^(?P<base>.+)-seed(?P<seed>\d+)$")
PLOTS_DIR = "plots"  # reports/plots/: the data `dvc plots show` reads (see dvc.yaml)


# ---------------------------------------------------------------- run files
def recall_curve(metrics: Mapping[str, float]) -> list[dict[str, float]]:
    """Rows {K, t2a_recall, a2t_recall} for DVC's recall@K plot of one run."""
    return [
        {"K": k, "t2a_recall": float(metrics[f"t2a_R{k}"]), "a2t_recall": float(metrics[f"a2t_R{k}"])}
        for k in RECALL_KS
    ]


def recall_curve_path(metrics_dir: Path, run_name: str) -> Path:
    return metrics_dir / "recall" / f"{run_name}.json"


def write_recall_curve(metrics_dir: Path, run_name: str, metrics: Mapping[str, float]) -> Path:
    path = recall_curve_path(metrics_dir, run_name)
    write_text_atomic(path, json.dumps(recall_curve(metrics), indent=1) + "\n")
    return path


def load_run_metrics(directory: Path, layout: Layout) -> tuple[dict[str, dict[str, float]], list[str]]:
    """``metrics/test/<run>.json`` files of ``layout``'s corpus -> ({run: metrics}, the runs of
    other corpora, left out)."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise DataError(f"{path}: not a JSON object of metrics")
        docs[path.stem] = doc
    kept, others = of_corpus(docs, layout)
    runs: dict[str, dict[str, float]] = {}
    for run in kept:
        metrics, path = docs[run], directory / f"{run}.json"
        missing = [key for _, key, _ in TABLE_COLUMNS if key not in metrics]
        missing += [f"t2a_R{k}" for k in RECALL_KS if f"t2a_R{k}" not in metrics]
        missing += [f"a2t_R{k}" for k in RECALL_KS if f"a2t_R{k}" not in metrics]
        if missing:
            raise DataError(f"{path}: missing metric(s) {', '.join(dict.fromkeys(missing))}")
        runs[run] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if not runs:
        ignored = f" ({len(others)} of another corpus ignored)" if others else ""
        raise DataError(
            f"{directory}: no test metrics of {layout.dataset} (corpus {layout.corpus_fingerprint()}) found"
            f"{ignored}; run the train and evaluate stages first"
        )
    return runs, others


def load_histories(directory: Path, runs: Sequence[str]) -> dict[str, list[dict[str, float]]]:
    """``metrics/history/<run>.json`` (a list of per-epoch rows) of those runs that have one."""
    histories = {}
    for run in runs:
        path = directory / f"{run}.json"
        if not path.exists():
            continue
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "epoch" in r for r in rows):
            raise DataError(f"{path}: expected a list of per-epoch rows with 'epoch'")
        histories[run] = rows
    return histories


# ---------------------------------------------------------------- seeds
@dataclass(frozen=True)
class RunGroup:
    """One (expert, pooling) cell: its runs by seed."""

    expert: str
    pooling: str
    runs: dict[int, str]  # seed -> run name

    def values(self, metrics: Mapping[str, Mapping[str, float]], key: str) -> np.ndarray:
        return np.array([metrics[run][key] for run in self.runs.values() if key in metrics[run]], dtype=float)


def split_run_name(run: str, default_seed: int) -> tuple[str, str, int]:
    """``<expert>-<pooling>[-seed<k>]`` -> (expert, pooling, seed); the bare name has ``default_seed``."""
    seed = default_seed
    match = SEED_SUFFIX.match(run)
    if match:
        run, seed = match["base"], int(match["seed"])
    expert, _, pooling = run.rpartition("-")
    return (expert or run), pooling, seed


def group_runs(runs: Sequence[str], default_seed: int) -> list[RunGroup]:
    """Runs grouped by (expert, pooling), sorted; a ``-seed<k>`` run repeating the bare run's seed
    is the same training twice and is left out (the bare run counts)."""
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for run in sorted(runs, key=lambda r: (SEED_SUFFIX.match(r) is not None, r)):  # bare names first
        expert, pooling, seed = split_run_name(run, default_seed)
        cells.setdefault((expert, pooling), {}).setdefault(seed, run)
    return [RunGroup(e, p, dict(sorted(seeds.items()))) for (e, p), seeds in sorted(cells.items())]


def mean_std(values: np.ndarray) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for one value)."""
    return float(values.mean()), (float(values.std(ddof=1)) if values.size > 1 else None)


@dataclass(frozen=True)
class Comparison:
    expert: str
    a: str
    b: str
    difference: float  # mean(a) - mean(b)
    p_value: float
    beyond_noise: bool


def compare_poolings(
    groups: Sequence[RunGroup], metrics: Mapping[str, Mapping[str, float]], key: str = NOISE_METRIC
) -> list[Comparison]:
    """Welch's t-test between every two poolings of an expert that both have >= 2 seeds."""
    from scipy import stats

    out = []
    by_expert: dict[str, list[RunGroup]] = {}
    for group in groups:
        by_expert.setdefault(group.expert, []).append(group)
    for expert, cells in by_expert.items():
        for a, b in combinations(cells, 2):
            va, vb = a.values(metrics, key), b.values(metrics, key)
            if va.size < 2 or vb.size < 2:
                continue
            if va.std() == 0 and vb.std() == 0:  # no spread at all: equal means are no difference
                p = 1.0 if va.mean() == vb.mean() else 0.0
            else:
                p = float(stats.ttest_ind(va, vb, equal_var=False).pvalue)
            out.append(
                Comparison(expert, a.pooling, b.pooling, float(va.mean() - vb.mean()), p, p < NOISE_ALPHA)
            )
    return out


# ---------------------------------------------------------------- trivial columns
def trivial_columns(n_clips: int | None, captions_per_clip: int = EVAL_CAPTIONS_PER_CLIP) -> dict[str, str]:
    """{metric key: why} for recalls that are 100 whatever the model: t2a R@k with k >= N clips
    (every clip is in the top k), a2t R@k with k > cpc * (N - 1) (a clip's best caption can rank
    no lower than that)."""
    if n_clips is None:
        return {}
    out = {}
    for k in RECALL_KS:
        if k >= n_clips:
            out[f"t2a_R{k}"] = f"t2a R@{k} (k >= {n_clips} clips)"
        if k > captions_per_clip * (n_clips - 1):
            out[f"a2t_R{k}"] = f"a2t R@{k} (k > {captions_per_clip} x ({n_clips} - 1) captions)"
    return out


# ---------------------------------------------------------------- tables
def _fmt(key: str, value: float) -> str:
    return f"{value:.3f}" if key.endswith("mAP10") else f"{value:.1f}"


def _cell(key: str, values: np.ndarray) -> str:
    mean, std = mean_std(values)
    return _fmt(key, mean) if std is None else f"{_fmt(key, mean)} ± {_fmt(key, std)}"


def results_table(
    groups: Sequence[RunGroup],
    metrics: Mapping[str, Mapping[str, float]],
    trivial: Mapping[str, str] | None = None,
) -> str:
    """Markdown table, rows expert x pooling, mean ± std over seeds; best mean per column in bold
    (not in trivial columns, whose values say nothing)."""
    trivial = trivial or {}
    means = {
        (g.expert, g.pooling): {k: g.values(metrics, k).mean() for _, k, _ in TABLE_COLUMNS} for g in groups
    }
    best = {}
    for _, key, higher in TABLE_COLUMNS:
        column = [m[key] for m in means.values()]
        best[key] = max(column) if higher else min(column)
    titles = [title + (" (trivial)" if key in trivial else "") for title, key, _ in TABLE_COLUMNS]
    rows = [
        "| expert | pooling | seeds | " + " | ".join(titles) + " |",
        "|---|---|---:|" + "---:|" * len(titles),
    ]
    for group in groups:
        cells = []
        for _, key, _ in TABLE_COLUMNS:
            text = _cell(key, group.values(metrics, key))
            is_best = means[(group.expert, group.pooling)][key] == best[key] and len(groups) > 1
            cells.append(f"**{text}**" if is_best and key not in trivial else text)
        rows.append(f"| {group.expert} | {group.pooling} | {len(group.runs)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


SUMMARY_COLUMNS = (("t2a R@1", "t2a_R1"), ("t2a R@10", "t2a_R10"), ("a2t R@1", "a2t_R1"),
                   ("a2t R@10", "a2t_R10"), ("t2a geo", "t2a_geometric_mean"))


def summary_table(groups: Sequence[RunGroup], metrics: Mapping[str, Mapping[str, float]]) -> str:
    """The main comparison for a terminal (under 80 columns): expert, pooling, seeds and the test
    recalls, means over seeds; the full table with std and significance is reports/results.md."""
    header = ["expert", "pooling", "seeds", *(name for name, _ in SUMMARY_COLUMNS)]
    rows = [
        [g.expert, g.pooling, str(len(g.runs)), *(f"{g.values(metrics, key).mean():.1f}" for _, key in SUMMARY_COLUMNS)]
        for g in groups
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def noise_section(groups: Sequence[RunGroup], metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    lines = ["## Seed noise", ""]
    comparisons = compare_poolings(groups, metrics)
    test = (
        f"Test: Welch's t-test (unequal variances, two-sided, alpha {NOISE_ALPHA}) on the test t2a "
        "geometric mean of R@1/5/10 over the seeds of two poolings of the same expert; a difference "
        "is marked **beyond noise** when p < alpha. Needs at least 2 seeds per pooling."
    )
    untested = [f"{g.expert}-{g.pooling}" for g in groups if len(g.runs) < 2]
    if all(len(g.runs) < 2 for g in groups):
        lines += [
            (
                "One seed per (expert, pooling): there is **no estimate of the seed noise**, so no pooling "
                "difference in the table can be called real. Train extra seeds as runs named "
                "`<expert>-<pooling>-seed<k>` to get one."
            ),
            "",
            test,
        ]
        return lines
    lines.append(test)
    if comparisons:
        lines += [
            "",
            "| expert | pooling A | pooling B | Δ t2a geo (A − B) | p | |",
            "|---|---|---|---:|---:|---|",
        ]
    for c in comparisons:
        verdict = "**beyond noise**" if c.beyond_noise else "within noise"
        p = "< 0.001" if c.p_value < 0.001 else f"{c.p_value:.3f}"
        lines.append(f"| {c.expert} | {c.a} | {c.b} | {c.difference:+.1f} | {p} | {verdict} |")
    if untested:
        lines += ["", f"Not compared (one seed, no noise estimate): {', '.join(untested)}."]
    return lines


def order_section(groups: Sequence[RunGroup], metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The order metric per (expert, pooling), when the test metrics carry it."""
    rows = [g for g in groups if g.values(metrics, ORDER_METRIC).size]
    if not rows:
        return []
    lines = [
        "## Temporal order",
        "",
        (
            "How often a caption scores its own clip above its mirror, a clip with the same events in "
            f"another order (chance {ORDER_CHANCE:.0f}%). Mean, max, NetVLAD and NetRVLAD pool the frames "
            "without regard to their order (permuting the frames gives the same embedding), so what they "
            "gain over chance comes from other cues the two renderings differ in (modifiers, loudness, "
            "durations); only a margin above those poolings shows a use of order. Single-event pairs are "
            "skipped; 'sequential' counts only clips without overlapping events, whose captions state the "
            "whole order. The control: the same test clips played backwards ('reversed'); the gain "
            "(accuracy minus reversed) is what the order of the frames contributes, 0 for an order-blind pooling."
        ),
        "",
        "| expert | pooling | seeds | order accuracy (%) | reversed (%) | gain | sequential only (%) | sequential gain | pairs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(g: RunGroup, key: str) -> str:
        values = g.values(metrics, key)
        return _cell(key, values) if values.size else "-"

    for g in rows:
        pairs = g.values(metrics, "order_pairs")
        lines.append(
            f"| {g.expert} | {g.pooling} | {len(g.runs)} | {cell(g, ORDER_METRIC)} | {cell(g, 'order_accuracy_reversed')} | "
            f"{cell(g, 'order_gain')} | {cell(g, 'order_accuracy_sequential')} | {cell(g, 'order_gain_sequential')} | "
            f"{int(pairs[0]) if pairs.size else '-'} |"
        )
    return lines


# ---------------------------------------------------------------- plots
def plot_recall_curves(
    groups: Sequence[RunGroup], metrics: Mapping[str, Mapping[str, float]], path: Path
) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, direction in zip(axes, ("t2a", "a2t"), strict=True):
        for g in groups:
            stats = [mean_std(g.values(metrics, f"{direction}_R{k}")) for k in RECALL_KS]
            err = [s or 0.0 for _, s in stats] if len(g.runs) > 1 else None
            ax.errorbar(
                RECALL_KS,
                [m for m, _ in stats],
                yerr=err,
                marker="o",
                capsize=3,
                label=f"{g.expert}-{g.pooling}",
            )
        ax.set_xscale("log")
        ax.set_xticks(RECALL_KS, [str(k) for k in RECALL_KS])
        ax.set_xlabel("K")
        ax.set_title(f"{direction}: recall@K (test; mean ± std over seeds)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    _save(fig, path)


def plot_validation_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]], path: Path, key: str
) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in sorted(histories):
        rows = [r for r in histories[run] if key in r]
        ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], label=run)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.set_title(f"validation {key}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def plot_order_accuracy(
    groups: Sequence[RunGroup], metrics: Mapping[str, Mapping[str, float]], path: Path
) -> None:
    """Bars per (expert, pooling) against chance; without order metrics a figure that says so
    (the report stage always declares this PNG as an output)."""
    rows = [g for g in groups if g.values(metrics, ORDER_METRIC).size]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2), 4.2))
    if not rows:
        ax.text(
            0.5,
            0.5,
            "no order metric: the split has no mirror pairs\n(or evaluate did not compute it)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()
        _save(fig, path)
        return
    stats = [mean_std(g.values(metrics, ORDER_METRIC)) for g in rows]
    ax.bar(
        range(len(rows)),
        [m for m, _ in stats],
        yerr=[s or 0.0 for _, s in stats],
        capsize=3,
        color="#4c72b0",
    )
    ax.axhline(ORDER_CHANCE, color="grey", linestyle="--", label=f"chance ({ORDER_CHANCE:.0f}%)")
    ax.set_xticks(range(len(rows)), [f"{g.expert}-{g.pooling}" for g in rows], rotation=30, ha="right")
    ax.set_ylabel("own clip above its mirror (%)")
    ax.set_ylim(0, 100)
    ax.set_title("temporal order (test)")
    ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_plot_data(
    metrics: Mapping[str, Mapping[str, float]],
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    directory: Path,
) -> dict[str, Path]:
    """Long-format rows for `dvc plots show` (one file over all runs, a ``run`` column that the
    ``linear_by_run`` template colours by): history.json {run, epoch, ...} and recall.json {run, K, ...}.

    DVC reads a directory plot source as one plot per file, never as one plot over runs, so the
    per-run files are joined here.
    """
    history_rows = [
        {"run": run, **{k: float(v) for k, v in row.items() if isinstance(v, (int, float))}}
        for run in sorted(histories)
        for row in histories[run]
    ]
    recall_rows = [{"run": run, **row} for run in sorted(metrics) for row in recall_curve(metrics[run])]
    paths = {"history": directory / "history.json", "recall": directory / "recall.json"}
    write_json_atomic(paths["history"], history_rows)
    write_json_atomic(paths["recall"], recall_rows)
    return paths


# ---------------------------------------------------------------- the report
def write_report(
    runs: Mapping[str, Mapping[str, float]],
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    out_dir: Path,
    *,
    dataset: str,
    validation_key: str,
    default_seed: int = 0,
    n_clips: int | None = None,
    champion: Mapping[str, Any] | None = None,
    split: str = "test",
    other_corpus_runs: Sequence[str] = (),
) -> Path:
    """reports/results.md, its PNG plots and reports/plots/*.json; ``n_clips``: clips of the
    evaluated split (for the trivial-recall check); ``champion``: atric.ops.champion's record;
    ``other_corpus_runs``: metrics files of other corpora, left out (named, never compared)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_runs(list(runs), default_seed)
    trivial = trivial_columns(n_clips)
    plot_recall_curves(groups, runs, out_dir / "recall_at_k.png")
    if histories:
        plot_validation_curves(histories, out_dir / "validation_curves.png", validation_key)
    write_plot_data(runs, histories, out_dir / PLOTS_DIR)
    seeds = sorted({len(g.runs) for g in groups})
    lines = [
        f"# Results on {dataset} ({split} split)",
        "",
        (
            "Recall in percent; mAP@10 in [0, 1]; MedR is the median rank (1 = first); t2a geo is the "
            "geometric mean of t2a R@1/5/10. Each cell is the mean ± standard deviation over the seeds "
            f"trained (seeds per row: {', '.join(map(str, seeds))}); a single seed shows its value alone. "
            "Best mean per column in **bold**."
        ),
    ]
    if n_clips is not None:
        lines[-1] += f" The {split} split has {n_clips} clips."
    if other_corpus_runs:
        shown = ", ".join(f"`{run}`" for run in sorted(other_corpus_runs)[:10])
        more = f" and {len(other_corpus_runs) - 10} more" if len(other_corpus_runs) > 10 else ""
        lines += [
            "",
            (
                f"Only runs of this corpus are shown and compared: {len(other_corpus_runs)} metrics file(s) of "
                f"another corpus (or from before metrics named their corpus) are left out: {shown}{more}."
            ),
        ]
    if trivial:
        lines += [
            "",
            (
                f"Trivial on a split this small (100 whatever the model; not bolded, not compared): "
                f"{'; '.join(trivial.values())}."
            ),
        ]
    lines += ["", results_table(groups, runs, trivial), ""]
    lines += noise_section(groups, runs)
    order = order_section(groups, runs)
    plot_order_accuracy(groups, runs, out_dir / "order_accuracy.png")
    if order:
        lines += ["", *order, "", "![order accuracy](order_accuracy.png)"]
    lines += ["", "## Champion", ""]
    if champion is not None:
        lines.append(
            f"`{champion['run']}`: the best {champion['metric']} = {champion['value']:.2f} on the "
            f"{champion['split']} split among {len(champion['candidates'])} trained runs "
            "(`reports/champion.json`; the `index` stage and search serve it). "
            f"The {split} metrics above are reported, never used to choose."
        )
    else:
        lines.append("Not chosen here (see `reports/champion.json`).")
    lines += ["", "![recall@K](recall_at_k.png)"]
    if histories:
        lines += ["", "![validation curves](validation_curves.png)"]
    path = out_dir / "results.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
