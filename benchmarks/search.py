"""Search latency and throughput over synthetic clip embeddings.

    python benchmarks/search.py [--clips 10000 100000] [--embed-dim 256] [--batch 64] [--threads 2]

Prints one JSON document. The model is the params.yaml architecture (train.*: text pooling,
embed_dim, fusion) with random weights, the word vectors are ``text.vectors`` (glove-6b-50d
by default; random 50-d vectors when they cannot be loaded, said in ``vectors``), and the index
holds ``--clips`` random unit-norm clip embeddings: timing does not depend on what was learnt.

- ``single``: one text query end to end as ``src/search.py`` runs it (tokenise, word vectors,
  text branch, one matmul over every clip, top-k): p50/p99/mean milliseconds over ``--repeats``
  queries. Target: p50 < 20 ms over 100,000 clips on 2 CPU cores.
- ``batched``: ``--batch`` queries per call, queries per second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from atric.config import load_params
from atric.factory import build_model
from atric.errors import AtricError
from atric.layout import Layout
from atric.search import Searcher, SearchIndex
from atric.text import KeyedVectorSource, VectorSource, load_vectors

QUERIES = [
    "a dog barks then a car passes",
    "rain falls on a tin roof while thunder rumbles",
    "a woman speaks and a baby cries",
    "birds chirp in the distance",
    "an engine idles and then revs up loudly",
    "a door slams shut",
    "water flows from a tap into a sink",
    "footsteps on gravel followed by a bell ringing",
]


def vector_source(params: Any) -> tuple[VectorSource, str]:
    try:
        source = load_vectors(params.text.vectors, params.text, Layout(params.data.dataset, params.data.root))
        return source, params.text.vectors
    except AtricError as exc:  # e.g. the glove cache is absent and offline
        from gensim.models import KeyedVectors

        words = sorted({w for q in QUERIES for w in q.split()})
        kv = KeyedVectors(50)
        kv.add_vectors(words, np.random.default_rng(0).normal(size=(len(words), 50)).astype(np.float32))
        return KeyedVectorSource("random-50d", kv), f"random-50d ({exc})"


def synthetic_index(clips: int, experts: list[str], embed_dim: int, seed: int = 0) -> SearchIndex:
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((len(experts), clips, embed_dim), dtype=np.float32)
    audio /= np.linalg.norm(audio, axis=-1, keepdims=True)
    return SearchIndex(
        clip_ids=[f"clip_{i:06d}" for i in range(clips)],
        splits=np.full(clips, "train", dtype=object),
        audio=audio,
        caption_offsets=np.zeros(clips + 1, np.int64),
        captions=[],
        caption_text=np.zeros((len(experts), 0, embed_dim), np.float32),
        caption_weights=np.zeros((0, len(experts)), np.float32),
        attrs={"experts": json.dumps(sorted(experts)), "indexed_splits": '["train"]'},
    )


def percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--embed-dim", type=int, help="default: train.embed_dim")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch CPU thread counts to time (target: 2 cores)",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    params = load_params()
    tp = params.train
    embed_dim = args.embed_dim or tp.embed_dim
    source, vectors = vector_source(params)
    # Text-side cost depends on the text pooling and the number of experts, not on audio dims.
    model = build_model(
        tp.model_copy(update={"embed_dim": embed_dim}), {e: 128 for e in tp.experts}, source.dim
    )
    model.eval()

    report: dict[str, Any] = {
        "device": args.device,
        "cpu_count": os.cpu_count(),
        # Other processes on the same cores inflate the tails (and, with 2 threads, the median).
        "load_average_1min_before": round(os.getloadavg()[0], 2),
        "vectors": vectors,
        "experts": list(model.experts),
        "text_pooling": tp.text_pooling,
        "embed_dim": embed_dim,
        "top_k": args.top_k,
        "results": [],
    }
    for clips, threads in [(c, t) for c in args.clips for t in args.threads]:
        torch.set_num_threads(threads)
        index = synthetic_index(clips, list(model.experts), embed_dim)
        searcher = Searcher(model, source, index, max_words=params.text.max_words, device=args.device)
        for q in QUERIES:  # warm-up: first calls allocate and pick kernels
            searcher.search_text([q], args.top_k)
        times = []
        for i in range(args.repeats):
            start = time.perf_counter()
            searcher.search_text([QUERIES[i % len(QUERIES)]], args.top_k)
            times.append(time.perf_counter() - start)
        batch = [QUERIES[i % len(QUERIES)] for i in range(args.batch)]
        searcher.search_text(batch, args.top_k)
        start = time.perf_counter()
        for _ in range(args.batches):
            searcher.search_text(batch, args.top_k)
        batched_seconds = time.perf_counter() - start
        report["results"].append(
            {
                "clips": clips,
                "threads": threads,
                "index_mb": round(searcher.clips.numel() * 4 / 2**20, 1),
                "single": {
                    "p50_ms": percentile_ms(times, 50),
                    "p99_ms": percentile_ms(times, 99),
                    "mean_ms": round(1000 * float(np.mean(times)), 3),
                    "queries": args.repeats,
                },
                "batched": {
                    "batch": args.batch,
                    "queries_per_second": round(args.batch * args.batches / batched_seconds, 1),
                    "ms_per_batch": round(1000 * batched_seconds / args.batches, 3),
                },
            }
        )
        del searcher, index
    report["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
