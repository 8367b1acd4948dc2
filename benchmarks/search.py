"""Search latency, memory and recall over synthetic clip embeddings: exact against approximate.

    python benchmarks/search.py [--clips 100000 1000000] [--data gaussian_mixture event_mixtures]
                                [--threads 1 2] [--repeats 200] [--out benchmarks/results/search.json]

Prints one JSON document and writes it to ``--out``. The model is the params.yaml architecture
(train.*: text pooling, embed_dim, experts) with random weights, the word vectors are
``text.vectors`` (random 50-d vectors when they cannot be loaded, said in ``vectors``), and
the index holds ``--clips`` unit-norm clip embeddings that cluster as learnt ones do (``DATA``):
timing does not depend on what was learnt, recall does depend on the clusters.

Per size and data, for ``exact`` (every clip scored, what indexes below
``atric.search.ann.EXACT_BELOW`` clips get) and ``approximate`` (the index stage's IVF-Flat,
built, written and read back as the stage and ``src/search.py`` do):

- ``build_seconds``, ``load_seconds``: making the approximate index, reading its file back.
- ``by_threads``, per torch/faiss thread count (``--threads``):
  ``search``: one embedded query through ``Searcher.top_clips`` (the path ``src/search.py``
  takes after the text branch), p50/p99 ms over ``--repeats`` held-out draws of the same data;
  ``split_search``: the same restricted to a 10% split (``split_clips``);
  ``end_to_end``: one text query as ``src/search.py`` runs it (tokenise, word vectors, text
  branch, search); ``batched``: ``--batch`` text queries a call, queries per second.
- ``recall_at_10`` (``split_recall_at_10``): of the approximate top 10 against the exact top
  10, same queries; ``nprobe_sweep``: recall and p50 at other list counts.
- ``index_bytes`` (what the method holds beside the index's own arrays), ``rss_mib`` (this
  process when the method is ready) and ``rss_added_mib`` (over ``rss_mib_with_data``: the
  clip embeddings, ``data_mib``, are held once and shared by both methods).
- ``hnsw`` (up to ``--hnsw-up-to`` clips): faiss HNSW-Flat over the same rows, the
  alternative that was measured and not chosen (see atric.search.ann).

Other processes on the same cores inflate the tails, and with 2 threads the medians of the
small torch ops (the text branch) too: ``uptime_before``/``uptime_after`` say how loaded.
Target: p50 < 20 ms at 10^6 clips with recall@10 >= 0.95, on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from atric.atomic import write_text_atomic
from atric.config import load_params
from atric.errors import AtricError
from atric.factory import build_model
from atric.layout import Layout
from atric.search import Searcher, SearchIndex
from atric.search.ann import EXACT_BELOW, NPROBE, ApproximateIndex, clip_rows
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
TOP_K = 10
CLIPS_PER_CLUSTER = 1000
EVENTS = 300
DATA = {
    "gaussian_mixture": (
        f"N/{CLIPS_PER_CLUSTER} centres uniform on the sphere, lognormal cluster sizes; each clip a centre "
        "plus Gaussian noise with a power-law spectrum (variance of axis i ~ 1/i, random basis; "
        "cosine to its centre ~0.7), unit-normalised"
    ),
    "event_mixtures": (
        f"{EVENTS} random unit 'event' vectors; each clip 1-3 events (first weight 1, then uniform "
        "weights, present with p 0.7 and 0.4) plus power-law noise (cosine to its strongest event ~0.8), "
        "unit-normalised: tight clusters of near-duplicates, as clips made of a few sound events"
    ),
}
NPROBE_SWEEP = (4, 8, 16, 64)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SWEEP = (32, 64, 128, 256)
SPLIT_EVERY = 10  # every 10th clip is the split of the split-filter measurement
CHUNK = 50_000  # rows generated at a time: bounds the temporaries beside the one big array


# ---------------------------------------------------------------- data
class Embeddings:
    """Clustered unit-norm embeddings; clips and queries are draws of the same distribution."""

    def __init__(self, kind: str, clips: int, dim: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.kind, self.dim = kind, dim
        count = max(10, clips // CLIPS_PER_CLUSTER) if kind == "gaussian_mixture" else EVENTS
        self.centres = unit(rng.standard_normal((count, dim), dtype=np.float32))
        sizes = rng.lognormal(0.0, 1.0, count)
        self.weights = sizes / sizes.sum()
        spectrum = 1.0 / np.sqrt(np.arange(1, dim + 1))
        self.spectrum = (spectrum * np.sqrt(dim / np.sum(spectrum**2))).astype(
            np.float32
        )  # total variance dim
        self.basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        self.noise = 1.0 if kind == "gaussian_mixture" else 0.5

    def fill(self, out: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Fill ``out`` [n, dim] in place, CHUNK rows at a time."""
        for start in range(0, len(out), CHUNK):
            n = min(CHUNK, len(out) - start)
            if self.kind == "gaussian_mixture":
                base = self.centres[rng.choice(len(self.centres), n, p=self.weights)]
            else:
                events = rng.integers(0, EVENTS, (n, 3))
                weights = rng.random((n, 3), dtype=np.float32) * (rng.random((n, 3)) < [1.0, 0.7, 0.4])
                weights[:, 0] = 1.0
                base = np.einsum("nk,nkd->nd", weights, self.centres[events])
            noise = rng.standard_normal((n, self.dim), dtype=np.float32) * (
                self.spectrum * self.noise / np.sqrt(self.dim)
            )
            out[start : start + n] = unit(base + noise @ self.basis)
        return out


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def synthetic_index(audio: np.ndarray, experts: list[str]) -> SearchIndex:
    """An index over clip embeddings [X, N, E] (no captions: only text -> clips is timed)."""
    clips = audio.shape[1]
    splits = np.full(clips, "train", dtype=object)
    splits[::SPLIT_EVERY] = "val"
    return SearchIndex(
        clip_ids=[f"clip_{i:07d}" for i in range(clips)],
        splits=splits,
        audio=audio,
        caption_offsets=np.zeros(clips + 1, np.int64),
        captions=[],
        caption_text=np.zeros((len(experts), 0, audio.shape[2]), np.float32),
        caption_weights=np.zeros((0, len(experts)), np.float32),
        attrs={"experts": json.dumps(list(experts)), "indexed_splits": '["train", "val"]'},
    )


# ---------------------------------------------------------------- measuring
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


def memory_mib() -> dict[str, float]:
    """This process's resident memory now and at its peak (Linux /proc; getrusage elsewhere)."""
    try:
        status = Path("/proc/self/status").read_text()
        kib = {
            line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith("Vm")
        }
        return {"rss_mib": round(kib["VmRSS"] / 1024, 1), "peak_rss_mib": round(kib["VmHWM"] / 1024, 1)}
    except (OSError, KeyError, IndexError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"rss_mib": None, "peak_rss_mib": round(peak, 1)}  # type: ignore[dict-item]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(calls: list[Callable[[], Any]]) -> tuple[list[float], list[Any]]:
    """Seconds and result of each call, after two untimed calls (first calls allocate)."""
    for call in calls[:2]:
        call()
    seconds, results = [], []
    for call in calls:
        start = time.perf_counter()
        results.append(call())
        seconds.append(time.perf_counter() - start)
    return seconds, results


def latency(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "queries": len(ms),
    }


def recall_at(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    return round(
        float(
            np.mean(
                [len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]
            )
        ),
        4,
    )


def vector_search(
    searcher: Searcher, queries: np.ndarray, split: str | None = None
) -> tuple[list[float], list[np.ndarray]]:
    tensors = [torch.from_numpy(queries[i : i + 1]) for i in range(len(queries))]
    seconds, results = timed([lambda q=q: searcher.top_clips(q, TOP_K, split)[1][0].numpy() for q in tensors])
    return seconds, results


def text_search(searcher: Searcher, repeats: int, batch: int, batches: int) -> dict[str, Any]:
    seconds, _ = timed(
        [lambda i=i: searcher.search_text([QUERIES[i % len(QUERIES)]], TOP_K) for i in range(repeats)]
    )
    texts = [QUERIES[i % len(QUERIES)] for i in range(batch)]
    batch_seconds, _ = timed([lambda: searcher.search_text(texts, TOP_K) for _ in range(batches)])
    return {
        "end_to_end": latency(seconds),
        "batched": {
            "batch": batch,
            "queries_per_second": round(batch * batches / sum(batch_seconds), 1),
            "ms_per_batch": round(1000 * float(np.mean(batch_seconds)), 3),
        },
    }


def hnsw_comparison(rows: np.ndarray, queries: np.ndarray, truth: list[np.ndarray]) -> dict[str, Any]:
    start = time.perf_counter()
    index = faiss.IndexHNSWFlat(rows.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(rows)
    result: dict[str, Any] = {
        "m": HNSW_M,
        "ef_construction": HNSW_EF_CONSTRUCTION,
        "build_seconds": round(time.perf_counter() - start, 2),
        "index_bytes": int(faiss.serialize_index(index).size),
        "ef_search_sweep": [],
    }
    for ef in HNSW_EF_SWEEP:
        index.hnsw.efSearch = ef
        seconds, found = timed(
            [lambda i=i: index.search(queries[i : i + 1], TOP_K)[1][0] for i in range(len(queries))]
        )
        result["ef_search_sweep"].append(
            {"ef_search": ef, "recall_at_10": recall_at(found, truth), **latency(seconds)}
        )
    return result


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def timings(
    searcher: Searcher, queries: np.ndarray, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[np.ndarray], list[np.ndarray]]:
    """Each thread count's latencies; the top 10s found (the same at every thread count)."""
    rows, found, found_split = [], [], []
    for threads in args.threads:
        set_threads(threads)
        seconds, found = vector_search(searcher, queries)
        split_seconds, found_split = vector_search(searcher, queries, "val")
        rows.append(
            {
                "threads": threads,
                "search": latency(seconds),
                "split_search": latency(split_seconds),
                **text_search(searcher, args.repeats, args.batch, args.batches),
            }
        )
    set_threads(max(args.threads))
    return rows, found, found_split


def measure(
    clips: int, kind: str, model: Any, source: VectorSource, args: argparse.Namespace, max_words: int
) -> dict[str, Any]:
    experts = list(model.experts)
    embeddings = Embeddings(kind, clips, args.embed_dim)
    rng = np.random.default_rng(1)
    before = memory_mib()["rss_mib"]
    audio = np.empty((len(experts), clips, args.embed_dim), np.float32)  # the one big array
    for block in audio:
        embeddings.fill(block, rng)
    queries = clip_rows(
        np.stack(
            [embeddings.fill(np.empty((args.repeats, args.embed_dim), np.float32), rng) for _ in experts]
        )
    )
    index = synthetic_index(audio, experts)
    data_rss = memory_mib()["rss_mib"]
    result: dict[str, Any] = {
        "clips": clips,
        "data": kind,
        "split_clips": int((index.splits == "val").sum()),
        "data_mib": round(audio.nbytes / 2**20, 1),
        # Cumulative over the sizes before (freed memory is not always given back to the system).
        "rss_mib_before": before,
        "rss_mib_with_data": data_rss,
    }

    # Exact: every clip scored.
    exact = Searcher(model, source, index, max_words=max_words, device="cpu")
    by_threads, truth, split_truth = timings(exact, queries, args)
    memory = memory_mib()
    result["exact"] = {
        "build_seconds": 0.0,
        "index_bytes": 0,  # scans the index's clip matrix itself (a view for one expert)
        "rss_mib": memory["rss_mib"],
        "rss_added_mib": round(memory["rss_mib"] - data_rss, 1),
        "by_threads": by_threads,
    }

    # Approximate: built, written, read back, as the index stage and src/search.py do.
    start = time.perf_counter()
    built = ApproximateIndex.build(clip_rows(audio), exact_below=EXACT_BELOW)
    build_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        info = built.write(Path(tmp) / "bench.faiss")
        del built
        gc.collect()
        start = time.perf_counter()
        ann = ApproximateIndex.read(Path(tmp) / "bench.faiss", info, audio)
        load_seconds = time.perf_counter() - start
    memory = memory_mib()
    approximate = Searcher(
        model, source, dataclasses.replace(index, ann=ann), max_words=max_words, device="cpu"
    )
    by_threads, found, split_found = timings(approximate, queries, args)
    sweep = []
    for nprobe in NPROBE_SWEEP:
        ann.nprobe = nprobe
        sweep_seconds, sweep_found = vector_search(approximate, queries)
        sweep.append(
            {"nprobe": nprobe, "recall_at_10": recall_at(sweep_found, truth), **latency(sweep_seconds)}
        )
    ann.nprobe = NPROBE
    result["approximate"] = {
        "kind": info.kind,
        "lists": info.lists,
        "nprobe": NPROBE,
        "build_seconds": round(build_seconds, 2),
        "build_threads": max(args.threads),
        "load_seconds": round(load_seconds, 2),
        "file_bytes": info.bytes,
        "index_bytes": ann.nbytes,
        "rss_mib": memory["rss_mib"],
        "rss_added_mib": round(memory["rss_mib"] - data_rss, 1),
        "recall_at_10": recall_at(found, truth),
        "split_recall_at_10": recall_at(split_found, split_truth),
        "by_threads": by_threads,
        "nprobe_sweep": sweep,
    }
    if clips <= args.hnsw_up_to:
        result["hnsw"] = hnsw_comparison(clip_rows(audio), queries, truth)
    approx = result["approximate"]
    result["goal_met"] = approx["recall_at_10"] >= 0.95 and all(
        row["search"]["p50_ms"] < 20 for row in approx["by_threads"]
    )
    del exact, approximate, ann, index, audio
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--data", nargs="+", choices=sorted(DATA), default=list(DATA))
    parser.add_argument("--embed-dim", type=int, help="default: train.embed_dim")
    parser.add_argument("--repeats", type=int, default=200, help="single queries timed per method")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch and faiss thread counts to time (target: 2 cores; the build uses the most)",
    )
    parser.add_argument(
        "--hnsw-up-to", type=int, default=100_000, help="measure HNSW too up to this many clips"
    )
    parser.add_argument(
        "--tmp", help="folder for the index files written and read back (default: system temp)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "search.json"))
    args = parser.parse_args()

    params = load_params()
    tp = params.train
    torch_default, faiss_default = torch.get_num_threads(), faiss.omp_get_max_threads()
    args.embed_dim = args.embed_dim or tp.embed_dim
    set_threads(max(args.threads))
    source, vectors = vector_source(params)
    # Text-side cost depends on the text pooling and the number of experts, not on audio dims.
    model = build_model(
        tp.model_copy(update={"embed_dim": args.embed_dim}), {e: 128 for e in tp.experts}, source.dim
    )
    model.eval()
    report: dict[str, Any] = {
        "uptime_before": uptime(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,  # torch and faiss, each timed; torch/faiss defaults below
        "torch_threads_default": torch_default,
        "faiss_threads_default": faiss_default,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "faiss_version": faiss.__version__,
        "torch_version": torch.__version__,
        "vectors": vectors,
        "experts": list(model.experts),
        "text_pooling": tp.text_pooling,
        "embed_dim": args.embed_dim,
        "row_dim": args.embed_dim * len(model.experts),
        "top_k": TOP_K,
        "exact_below": EXACT_BELOW,
        "data": {kind: DATA[kind] for kind in args.data},
        "queries": "held-out draws of the same data (recall, search); QUERIES through the text branch (end_to_end)",
        "results": [],
    }
    for clips in args.clips:
        for kind in args.data:
            print(f"{clips} clips, {kind} ...", file=sys.stderr, flush=True)
            report["results"].append(measure(clips, kind, model, source, args, params.text.max_words))
    report["uptime_after"] = uptime()
    report["peak_rss_mib"] = memory_mib()["peak_rss_mib"]
    text = json.dumps(report, indent=1)
    print(text)
    write_text_atomic(args.out, text + "\n")


if __name__ == "__main__":
    main()
