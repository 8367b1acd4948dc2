"""The paper's clip batching against (clip, caption) pairs on the default corpus, several seeds.

    python benchmarks/sampling.py --data-root /tmp/sampling/data [--seeds 0 1 2] [--experts logmel]

Needs the default corpus prepared under --data-root (prepare, embed_text, extract). Per
sampling, expert, pooling and seed: one training with params.yaml's settings, then test metrics
(t2a/a2t R@1, R@10, the selection metric) and the mirror-pair order metric. Both samplings
get the same wall-clock budget: ``pairs`` trains train.epochs epochs; ``clip`` trains
``--clip-epochs`` (default: train.epochs x the measured ratio of pairs to clip epoch time).
Prints one JSON document (with `uptime`); --out also writes it, a markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from atric import engine  # noqa: E402
from atric.config import load_params  # noqa: E402
from atric.data import open_split  # noqa: E402
from atric.device import resolve_device  # noqa: E402
from atric.embed import split_similarity  # noqa: E402
from atric.factory import model_from_checkpoint  # noqa: E402
from atric.layout import Layout  # noqa: E402
from atric.metrics import retrieval_metrics  # noqa: E402
from atric.order import order_metrics  # noqa: E402

KEYS = ("t2a_R1", "t2a_R10", "a2t_R1", "t2a_geometric_mean", "order_accuracy")


def run_one(base: list[str], out: Path, expert: str, pooling: str, seed: int, sampling: str, epochs: int) -> dict[str, Any]:
    overrides = [*base, f"train.experts=[{expert}]", f"train.pooling={pooling}", f"train.seed={seed}",
                 f"train.sampling={sampling}", f"train.epochs={epochs}",
                 f"train.models_dir={out}/models", f"train.metrics_dir={out}/metrics"]
    params = load_params("params.yaml", overrides)
    started = time.perf_counter()
    result = engine.train(params, run_name=f"{expert}-{pooling}-{sampling}-s{seed}", restart=True)
    seconds = time.perf_counter() - started
    checkpoint = engine.load_checkpoint(result.paths.best)
    model = model_from_checkpoint(checkpoint)
    layout = Layout(params.data.dataset, params.data.root)
    data = open_split(layout, "test", experts=[expert], vectors=params.text.vectors,
                      padded_lengths=dict(checkpoint["max_frames"]), expert_dims=checkpoint["model_config"]["expert_dims"])
    try:
        sim = split_similarity(model, data, device=resolve_device("cpu"), batch_size=256)
        metrics = {**retrieval_metrics(sim, captions_per_clip=5),
                   **order_metrics(sim, layout, "test", clip_ids=[c.clip_id for c in data.clips])}
    finally:
        data.close()
    return {"expert": expert, "pooling": pooling, "seed": seed, "sampling": sampling, "epochs": epochs,
            "best_epoch": result.best_epoch, "train_seconds": round(seconds, 1),
            "epoch_seconds": round(statistics.mean(result.epoch_seconds), 3),
            **{k: round(float(metrics[k]), 2) for k in KEYS if k in metrics}}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["expert"], row["pooling"], row["sampling"]), []).append(row)
    table = []
    for (expert, pooling, sampling), members in groups.items():
        entry: dict[str, Any] = {"expert": expert, "pooling": pooling, "sampling": sampling, "seeds": len(members),
                                 "train_seconds": round(statistics.mean(m["train_seconds"] for m in members), 1)}
        for key in KEYS:
            values = [m[key] for m in members if key in m]
            if values:
                entry[key] = round(statistics.mean(values), 2)
                entry[f"{key}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
        table.append(entry)
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    head = "| expert | pooling | sampling | t2a R@1 | t2a R@10 | a2t R@1 | order acc. | train s |\n|---|---|---|---|---|---|---|---|\n"
    cell = lambda e, k: f"{e[k]:.1f} ± {e[k + '_std']:.1f}" if k in e else "–"  # noqa: E731
    return head + "".join(
        f"| {e['expert']} | {e['pooling']} | {e['sampling']} | {cell(e, 't2a_R1')} | {cell(e, 't2a_R10')} | "
        f"{cell(e, 'a2t_R1')} | {cell(e, 'order_accuracy')} | {e['train_seconds']} |\n" for e in table
    )


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(e["expert"], e["pooling"]) for e in table})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for i, sampling in enumerate(("pairs", "clip")):
        entries = {(e["expert"], e["pooling"]): e for e in table if e["sampling"] == sampling}
        xs = [j + (i - 0.5) * width for j in range(len(labels))]
        ax.bar(xs, [entries[k]["t2a_R1"] if k in entries else 0 for k in labels], width,
               yerr=[entries[k]["t2a_R1_std"] if k in entries else 0 for k in labels], capsize=3, label=sampling)
    ax.set_xticks(range(len(labels)), [f"{e}\n{p}" for e, p in labels])
    ax.set_ylabel("test t2a R@1 (%), mean ± std over seeds")
    ax.legend(title="train.sampling")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--experts", nargs="+", default=["logmel"])
    parser.add_argument("--poolings", nargs="+", default=["mean", "max", "lstm", "netvlad", "netrvlad"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--clip-epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="folder for sampling.json, sampling.md, sampling.png")
    args = parser.parse_args()
    base = [f"data.root={args.data_root}", "train.device=cpu"]
    pairs_epochs = load_params("params.yaml").train.epochs
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        clip_epochs = args.clip_epochs
        if clip_epochs is None:  # same wall-clock budget: calibrate on the first expert's mean pooling
            pairs = run_one(base, out, args.experts[0], "mean", 99, "pairs", 2)
            clip = run_one(base, out, args.experts[0], "mean", 99, "clip", 2)
            clip_epochs = max(pairs_epochs, round(pairs_epochs * pairs["epoch_seconds"] / clip["epoch_seconds"]))
        for expert in args.experts:
            for pooling in args.poolings:
                for seed in args.seeds:
                    for sampling, epochs in (("pairs", pairs_epochs), ("clip", clip_epochs)):
                        rows.append(run_one(base, out, expert, pooling, seed, sampling, epochs))
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    table = summarise(rows)
    doc = {"uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
           "cpus": os.cpu_count(), "pairs_epochs": pairs_epochs, "clip_epochs": clip_epochs,
           "summary": table, "runs": rows}
    print(json.dumps(doc, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sampling.json").write_text(json.dumps(doc, indent=1) + "\n")
        (args.out / "sampling.md").write_text(markdown(table))
        plot(table, args.out / "sampling.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
