"""Training throughput, data waiting and peak memory per pooling; evaluation time.

    python benchmarks/train.py [--clips 5000] [--steps 20] [--num-workers 2] [--device auto]

Prints one JSON document:
- ``default_corpus``: on the default corpus's train split (params.yaml: data.dataset,
  train.experts), when its features exist; else a note saying why it was skipped.
- ``synthetic``: AudioCaps-shaped features (``--clips`` x 31 x 2048 float32, one caption
  per clip as in AudioCaps train) written to a temporary HDF5 file and streamed from disk
  (train.cache_in_ram=no), to show that memory stays bounded whatever the corpus size.
  ``--clips 50000`` is the real AudioCaps size (about 12.7 GB on disk).
- ``evaluation``: seconds to compute the metrics of a 5,000 x 1,000 similarity matrix.

Per pooling: clips/s (distinct clips per second of training steps, after ``--warmup``
steps), the fraction of step time spent waiting for the next batch (target < 0.10) and
the peak RSS of the process plus its DataLoader workers (target < 4 GiB; shared pages of
forked workers count once per process, so this over-estimates).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from atric.config import load_params
from atric.data import SplitData, open_split
from atric.device import resolve_device
from atric.engine import train_epoch, train_loader
from atric.factory import build_loss, build_model, build_optimizer
from atric.layout import Clip, Layout, write_features, write_index, write_text_embeddings
from atric.metrics import retrieval_metrics
from atric.model import POOLINGS
from atric.precision import Precision

GIB = 1 << 30


class PeakRSS:
    """Samples the RSS of this process and its children (DataLoader workers) in a thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def measure(
    data: SplitData,
    train_params: Any,
    pooling: str,
    *,
    steps: int,
    warmup: int,
    num_workers: int,
    device: torch.device,
) -> dict[str, Any]:
    """The engine's training step (model, loss, optimiser, loader) for ``steps`` batches."""
    tp = train_params.model_copy(update={"pooling": pooling})
    torch.manual_seed(0)
    with PeakRSS() as rss:
        model = build_model(tp, data.expert_dims, data.text_dim).to(device)
        loss_fn = build_loss(tp).to(device)
        optimizer = build_optimizer(tp, model, loss_fn)
        loader, _ = train_loader(data, batch_size=tp.batch_size, seed=0, num_workers=num_workers, device=device)
        batch_size = loader.batch_size
        step = functools.partial(
            train_epoch,
            model=model,
            loss_fn=loss_fn,
            optimizer=optimizer,
            loader=loader,
            device=device,
            precision=Precision.create(tp.precision, device),
            epoch=1,
            epochs=1,
            run_name=f"benchmark-{pooling}",
            last_path=Path(tempfile.gettempdir()) / "atric-benchmark-none.pt",
        )
        if warmup:
            step(max_steps=warmup)
        # The engine's own epoch function, cut to ``steps`` batches: what training really runs.
        _, busy, wait, clips = step(max_steps=steps)
        measured = min(steps, len(loader))
        del loader
    return {
        "steps": measured,
        "batch_size": batch_size,
        "clips_per_s": round(clips / busy, 1) if busy else None,
        "step_ms": round(1000 * busy / measured, 1) if measured else None,
        "data_wait_fraction": round(wait / busy, 4) if busy else None,
        "peak_rss_gib": round(rss.peak / GIB, 3),
    }


def write_synthetic(root: Path, clips: int, frames: int, dim: int, text_dim: int) -> Layout:
    """AudioCaps-shaped train split: one caption per clip, fixed-length features."""
    layout = Layout("BenchCaps", root)
    rng = np.random.default_rng(0)
    ids = [f"clip{i:06d}" for i in range(clips)]
    write_index(layout.index_path("train"), [Clip(c, (f"caption of {c}",)) for c in ids], "train")

    def features():  # generated clip by clip: memory stays small at any corpus size
        for clip_id in ids:
            yield clip_id, rng.standard_normal((frames, dim), dtype=np.float32)

    write_features(layout.features_path("bench", "train"), features(), {"expert": "bench", "dim": dim})
    words = {c: [rng.standard_normal((int(rng.integers(6, 21)), text_dim), dtype=np.float32)] for c in ids}
    write_text_embeddings(layout.text_path("benchvec", "train"), words, {"vectors": "benchvec"})
    return layout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--clips", type=int, default=5000, help="synthetic clips (AudioCaps: 50000, ~12.7 GB)"
    )
    parser.add_argument(
        "--frames", type=int, default=31, help="synthetic frames per clip (PANNs CNN14 on AudioCaps)"
    )
    parser.add_argument("--dim", type=int, default=2048, help="synthetic feature dim (PANNs CNN14)")
    parser.add_argument(
        "--text-dim", type=int, default=300, help="word-vector dim (word2vec, as in the paper)"
    )
    parser.add_argument("--steps", type=int, default=20, help="measured training steps per pooling")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured first steps (worker start-up)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--poolings", nargs="+", default=list(POOLINGS), choices=POOLINGS)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--tmp-dir", default=None, help="where the synthetic HDF5 goes (default: system temp)"
    )
    args = parser.parse_args()

    params = load_params(args.params)
    device = resolve_device(args.device)
    report: dict[str, Any] = {
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "num_workers": args.num_workers,
        "targets": {"data_wait_fraction_below": 0.10, "peak_rss_gib_below": 4.0},
    }
    common = {"steps": args.steps, "warmup": args.warmup, "num_workers": args.num_workers, "device": device}

    # (a) the default corpus
    tp = params.train
    layout = Layout(params.data.dataset, params.data.root)
    missing = [
        str(layout.features_path(e, "train"))
        for e in tp.experts
        if not layout.features_path(e, "train").exists()
    ]
    if missing:
        report["default_corpus"] = {
            "skipped": f"no features at {', '.join(missing)} (run prepare, extract, embed_text)"
        }
    else:
        data = open_split(
            layout, "train", experts=tp.experts, vectors=params.text.vectors,
            max_frames=tp.max_frames, cache_in_ram=tp.cache_in_ram,
        )  # fmt: skip
        report["default_corpus"] = {
            "dataset": params.data.dataset,
            "experts": data.expert_dims,
            "max_frames": data.max_frames,
            "clips": len(data),
            "captions": len(data.words),
            "cached_in_ram": data.cached,
            "poolings": {p: measure(data, tp, p, **common) for p in args.poolings},
        }
        data.close()

    # (b) synthetic AudioCaps-shaped features, streamed from disk
    with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="atric-bench-") as tmp:
        t0 = time.perf_counter()
        synth = write_synthetic(Path(tmp), args.clips, args.frames, args.dim, args.text_dim)
        write_s = time.perf_counter() - t0
        feature_file = synth.features_path("bench", "train")
        t0 = time.perf_counter()
        data = open_split(
            synth,
            "train",
            experts=["bench"],
            vectors="benchvec",
            max_frames={"bench": args.frames},
            cache_in_ram="no",
        )
        open_s = time.perf_counter() - t0
        report["synthetic"] = {
            "clips": args.clips,
            "frames": args.frames,
            "dim": args.dim,
            "text_dim": args.text_dim,
            "file_gib": round(feature_file.stat().st_size / GIB, 3),
            "write_s": round(write_s, 1),
            "open_and_check_s": round(open_s, 2),
            "cached_in_ram": data.cached,
            "poolings": {p: measure(data, tp, p, **common) for p in args.poolings},
        }
        data.close()

    # (c) evaluation: metrics of a 5,000 x 1,000 similarity matrix
    sim = np.random.default_rng(0).standard_normal((5000, 1000)).astype(np.float32)
    t0 = time.perf_counter()
    retrieval_metrics(sim, captions_per_clip=5)
    report["evaluation"] = {"captions": 5000, "clips": 1000, "metrics_s": round(time.perf_counter() - t0, 3)}

    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
