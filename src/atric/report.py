"""The results report: a paper-style table over runs plus recall@K and validation curves."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers and CI
import matplotlib.pyplot as plt  # noqa: E402

from atric.atomic import atomic_path, write_text_atomic  # noqa: E402
from atric.errors import DataError  # noqa: E402

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
)
RECALL_KS = (1, 5, 10, 50)


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


def load_run_metrics(directory: Path) -> dict[str, dict[str, float]]:
    """``metrics/test/<run>.json`` files -> {run: metrics}; a run is named ``<expert>-<pooling>``."""
    runs: dict[str, dict[str, float]] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from exc
        metrics = doc.get("metrics", doc)
        missing = [key for _, key, _ in TABLE_COLUMNS if key not in metrics]
        if missing:
            raise DataError(f"{path}: missing metric(s) {', '.join(missing)}")
        runs[path.stem] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if not runs:
        raise DataError(f"{directory}: no test metrics found (run the evaluate stage first)")
    return runs


def results_table(runs: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table, rows expert x pooling, best value per column in bold."""
    best: dict[str, float] = {}
    for _, key, higher in TABLE_COLUMNS:
        values = [m[key] for m in runs.values()]
        best[key] = max(values) if higher else min(values)
    header = "| expert | pooling | " + " | ".join(title for title, _, _ in TABLE_COLUMNS) + " |"
    rule = "|---|---|" + "---:|" * len(TABLE_COLUMNS)
    rows = [header, rule]
    for run in sorted(runs):
        expert, _, pooling = run.rpartition("-")
        cells = []
        for _, key, _ in TABLE_COLUMNS:
            value = runs[run][key]
            text = f"{value:.3f}" if key.endswith("mAP10") else f"{value:.1f}"
            cells.append(f"**{text}**" if value == best[key] else text)
        rows.append(f"| {expert or run} | {pooling} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_recall_curves(runs: Mapping[str, Mapping[str, float]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, direction in zip(axes, ("t2a", "a2t"), strict=True):
        for run in sorted(runs):
            ax.plot(RECALL_KS, [runs[run][f"{direction}_R{k}"] for k in RECALL_KS], marker="o", label=run)
        ax.set_xscale("log")
        ax.set_xticks(RECALL_KS, [str(k) for k in RECALL_KS])
        ax.set_xlabel("K")
        ax.set_title(f"{direction}: recall@K (test)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    _save(fig, path)


def plot_validation_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: Path, key: str) -> None:
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


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(
    runs: Mapping[str, Mapping[str, float]],
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    out_dir: Path,
    *,
    dataset: str,
    validation_key: str,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_recall_curves(runs, out_dir / "recall_at_k.png")
    if histories:
        plot_validation_curves(histories, out_dir / "validation_curves.png", validation_key)
    best_run = max(runs, key=lambda r: runs[r].get("t2a_geometric_mean", runs[r]["t2a_R10"]))
    lines = [
        f"# Results on {dataset} (test split)",
        "",
        "Recall in percent; mAP@10 in [0, 1]; MedR is the median rank (1 = first). Best per column in **bold**.",
        "",
        results_table(runs),
        "",
        f"Best run by t2a geometric mean of R@1, R@5, R@10 (the paper's selection rule): `{best_run}`.",
        "",
        "![recall@K](recall_at_k.png)",
    ]
    if histories:
        lines += ["", "![validation curves](validation_curves.png)"]
    path = out_dir / "results.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
