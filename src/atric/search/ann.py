"""Approximate nearest-neighbour search over an index's clips, for indexes too big to scan.

An index of fewer than ``EXACT_BELOW`` clips is searched exactly: one matmul over every clip
(``atric.search.searcher``). From ``EXACT_BELOW`` clips on, the index stage also writes
``<index_dir>/<run>.faiss`` beside ``<run>.h5``: a faiss ``IndexIVFFlat`` over the same
concatenated clip rows the exact search scans, in faiss's own format (``write_index`` /
``read_index``: no pickle), written atomically, and named with its parameters in the HDF5
index's ``ann`` attribute (``AnnInfo``).

Why IVF-Flat and not HNSW (``benchmarks/search.py``, results in benchmarks/results/search.json;
2 shared CPU cores, 256-d rows): both answer a query in milliseconds at 10^6 clips, but on
clips made of a few of some hundred sound events (tight clusters of near-duplicates, as a
captioned-audio corpus is) an HNSW graph's edge pruning cuts the clusters apart: recall@10
stayed at 0.77-0.84 for efSearch 32-256 (10^5 clips, M 32), where IVF reached 0.997 probing
8 lists. On a plain Gaussian mixture both do well (HNSW 0.97-0.99, IVF 0.9995). IVF also
builds in ~40 s at 10^6 clips (HNSW: ~5 min), holds 8 bytes a clip beyond its row (HNSW
M 32: ~260), keeps its recall under a split filter (the filter skips clips in the lists it
scans, not nodes of a graph walk), and rebuilding from the same clips gives the same bytes.

Scores are inner products, the model's similarity: every expert block of a clip is unit
norm, so every clip row has the same norm sqrt(X) and inner product ranks as cosine. The
lists hold the full float32 rows, so only *which* clips get scored is approximate; the
scores of those returned are exact. A search over the same file gives the same results.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from atric.atomic import atomic_path
from atric.errors import DataError

# Below this many clips a query scans every clip: ~10 ms at 5 x 10^4 on 2 cores, and no index
# to build (10^5: 15-23 ms; 10^6: 150-240 ms, bound by reading 1 GiB of rows a query). Also
# the split size under which a split filter on an approximate index scans that split.
EXACT_BELOW = 50_000
# Inverted lists: sqrt(N) (1000 at 10^6 clips, ~1000 clips each): k-means on 40 clips a list
# (faiss warns below 39) takes seconds; 4 sqrt(N) lists cut the scan per probe by 4 but took
# minutes to train and assign at 10^6. Spherical k-means: the lists are ranked by inner product.
LISTS_PER_SQRT_CLIP = 1
TRAIN_CLIPS_PER_LIST = 40
KMEANS_ITERATIONS = 10
KMEANS_SEED = 0
# Lists scanned per query: 32 of 1000 at 10^6 clips (~3% of the rows): recall@10 0.98-0.999
# on the benchmark's clustered data, p50 4-9 ms; 64 lists gained ~0.005 for twice the time,
# 16 lost ~0.005. Margin for real data, whose clusters are not the benchmark's.
NPROBE = 32
ANN_SUFFIX = ".faiss"
ANN_KIND = "ivf_flat_ip"


def ann_path(index_file: str | os.PathLike[str]) -> Path:
    """``<index_dir>/<run>.faiss`` for ``<index_dir>/<run>.h5``."""
    return Path(index_file).with_suffix(ANN_SUFFIX)


def clip_rows(audio: np.ndarray) -> np.ndarray:
    """Per-expert clip embeddings [X, N, E] -> [N, X*E] float32 rows (the expert blocks side by
    side, as the searcher's clip matrix); a view, no copy, for one expert."""
    experts, clips, dim = audio.shape
    return np.ascontiguousarray(audio.transpose(1, 0, 2).reshape(clips, experts * dim), dtype=np.float32)


def list_count(clips: int) -> int:
    return max(1, min(clips // TRAIN_CLIPS_PER_LIST, round(LISTS_PER_SQRT_CLIP * math.sqrt(clips))))


@dataclass(frozen=True)
class AnnInfo:
    """What the HDF5 index's ``ann`` attribute says of its approximate index (JSON)."""

    file: str  # the .faiss file's name, in the .h5's folder
    kind: str
    clips: int
    dim: int
    lists: int
    exact_below: int  # the threshold the index was built with; split filters use it too
    bytes: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AnnInfo:
        return cls(**json.loads(text))


class ApproximateIndex:
    """A faiss IVF-Flat index over an index's clip rows, with its ``AnnInfo``."""

    def __init__(self, index: faiss.IndexIVFFlat, info: AnnInfo, nprobe: int = NPROBE) -> None:
        self.index = index
        self.info = info
        self.nprobe = nprobe

    @classmethod
    def build(cls, rows: np.ndarray, *, exact_below: int = EXACT_BELOW) -> ApproximateIndex:
        """Train the coarse quantizer on an evenly spaced sample of ``rows`` [N, D], then add them all."""
        clips, dim = rows.shape
        lists = list_count(clips)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)  # keeps quantizer alive
        index.cp.spherical = True
        index.cp.niter = KMEANS_ITERATIONS
        index.cp.seed = KMEANS_SEED
        # Evenly spaced rows, not a random draw: the same clips train the same lists.
        sample = np.linspace(0, clips - 1, min(clips, TRAIN_CLIPS_PER_LIST * lists)).astype(np.int64)
        index.train(rows[sample])
        index.add(rows)
        info = AnnInfo("", ANN_KIND, clips, dim, lists, exact_below, 0)
        return cls(index, info)

    def write(self, path: str | os.PathLike[str]) -> AnnInfo:
        """Write atomically (temp file + rename); the returned info names the file and its size."""
        path = Path(path)
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))
        self.info = AnnInfo(**{**asdict(self.info), "file": path.name, "bytes": path.stat().st_size})
        return self.info

    @classmethod
    def read(cls, path: str | os.PathLike[str], info: AnnInfo, audio: np.ndarray) -> ApproximateIndex:
        """Read a .faiss file and check it indexes these clip embeddings [X, N, E]; DataError if not."""
        path = Path(path)
        rebuild = "rebuild the index (python src/index.py)"
        if not path.is_file():
            raise DataError(f"{path}: approximate index missing; {rebuild}")
        if path.stat().st_size != info.bytes:
            raise DataError(f"{path}: {path.stat().st_size} bytes, the index says {info.bytes}; {rebuild}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise DataError(f"{path}: not a readable faiss index ({exc}); {rebuild}") from exc
        if not isinstance(index, faiss.IndexIVFFlat):
            index = faiss.downcast_index(index)
        if (
            not isinstance(index, faiss.IndexIVFFlat)
            or index.metric_type != faiss.METRIC_INNER_PRODUCT
            or (index.ntotal, index.d, index.nlist) != (info.clips, info.dim, info.lists)
            or (audio.shape[1], audio.shape[0] * audio.shape[2]) != (info.clips, info.dim)
        ):
            raise DataError(f"{path}: not the approximate index of {path.with_suffix('.h5').name}; {rebuild}")
        # A few stored rows against the .h5's: a file left by another build (a crash between the
        # two writes) holds other embeddings.
        probe = np.unique(np.linspace(0, info.clips - 1, 16).astype(np.int64))
        index.make_direct_map()
        stored = index.reconstruct_batch(probe)
        index.set_direct_map_type(faiss.DirectMap.NoMap)  # 8 bytes a clip, not needed to search
        if not np.array_equal(stored, clip_rows(audio[:, probe])):
            raise DataError(
                f"{path}: holds other clip embeddings than {path.with_suffix('.h5').name}; {rebuild}"
            )
        return cls(index, info)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` clips of queries [B, D]: (scores [B, k], clip rows [B, k]; -1 where fewer
        than ``k`` were found). ``allowed`` [N] bool: only these clips (a split)."""
        params = faiss.SearchParametersIVF()
        nprobe = self.nprobe
        if allowed is not None:
            # A split's 10 best lie deeper in the lists than the whole index's: probe
            # sqrt(1/fraction) times as many. faiss skips the other clips' rows cheaply, so a 10%
            # split costs less than an unfiltered query (10^6 clips: 5 ms, recall@10 0.98 as
            # unfiltered; unscaled 2.5 ms and 0.96; scaled by 1/fraction 26 ms and 0.99).
            fraction = max(1, int(np.count_nonzero(allowed))) / len(allowed)
            nprobe = math.ceil(nprobe / math.sqrt(fraction))
            bitmap = np.packbits(allowed, bitorder="little")  # kept alive while faiss reads it
            selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
            params.sel = selector
        params.nprobe = min(nprobe, self.info.lists)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        return scores, rows

    @property
    def nbytes(self) -> int:
        """Memory the index holds: each clip's row and id in its list, plus the centroids."""
        return int(self.index.ntotal * (self.info.dim * 4 + 8) + self.info.lists * self.info.dim * 4)
