"""Datasets and collation for training and evaluation.

One split = its Index file, one HDF5 feature file per audio expert and one text-embedding
file. Everything is checked once when the split is opened (every indexed clip has features
of the right dim in every expert file, every caption has an embedding), so a bad file fails
before training starts, naming the file and the clip.

Features are either cached in RAM (already cut to the padded length) or streamed from HDF5
a batch at a time, each process (DataLoader worker) opening its own handle, so an
AudioCaps-scale corpus (tens of GB) trains in bounded memory.

Training batches are either (clip, caption) pairs (``train.sampling: pairs``) or clips with
all their captions (``clip``, the original's); both hold every distinct clip once: a clip with
several captions in the batch is one audio column and ``caption_clip`` maps each caption row
to that column (what the losses expect).

Why one module of this size: opening and checking a split, its datasets and its collation define together what a batch holds.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from atric.errors import DataError
from atric.layout import Clip, FeatureFile, Layout, check_feature_array, read_index, read_text_embeddings

# The original's padded lengths per dataset and expert (ORIGINAL_SPEC.md), in frames of the
# ORIGINAL's own feature files. They apply only to files that do not record their frame rate
# (precomputed seed-layout features such as the original's); for atric's extractors the
# padded length is a duration (``DEFAULT_MAX_SECONDS`` or ``train.max_seconds``), turned into
# frames with the ``hop_seconds`` each feature file records. EfficientLatent had no Clotho
# value (a bug): 96 = 3 x its AudioCaps length, the ~3x ratio that VGGish (10 -> 31),
# VGGSound (29 -> 95) and PANNs CNN14 (31 -> 90) show between the two datasets.
DEFAULT_MAX_FRAMES: dict[str, dict[str, int]] = {
    "AudioCaps": {
        "logmel": 10,
        "vggish": 10,
        "vggsound": 29,
        "panns_cnn10": 62,
        "panns_cnn14": 31,
        "efficientlatent": 32,
    },
    "CLOTHO": {
        "logmel": 90,
        "vggish": 31,
        "vggsound": 95,
        "panns_cnn10": 120,
        "panns_cnn14": 90,
        "efficientlatent": 96,
    },
}
# The durations those lengths cover: a whole AudioCaps clip (10 s), a whole Clotho clip (15-30 s).
DEFAULT_MAX_SECONDS: dict[str, float] = {"AudioCaps": 10.0, "CLOTHO": 30.0}
# A padded length longer than every clip is padding, not an error (a 30 s preset on 1 s clips).
# Refused only where it is obviously a unit mistake: a duration over 10 minutes (milliseconds or
# frames given as seconds; no captioned retrieval clip is that long), or, for feature files that
# record no frame rate, a frame count over this many times the longest clip.
MAX_PADDED_SECONDS = 600.0
MAX_FRAMES_RATIO_WITHOUT_HOP = 100
# Other datasets: cover this percentile of the train split's sequence lengths.
LENGTH_PERCENTILE = 95.0
# cache_in_ram "auto" caches a split when its (cut) features take less than this.
CACHE_LIMIT_BYTES = 1 << 30

CacheMode = Literal["auto", "yes", "no"]


# ---------------------------------------------------------------- feature sources
def _file_identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class _LazyFeatures:
    """A FeatureFile, and a plain descriptor for direct reads, opened on first use in each process.

    h5py handles must not be shared across fork(): a handle inherited by a DataLoader
    worker is replaced by a fresh one (keyed by the process id). Direct reads go to byte
    offsets found when the split was opened, so the descriptor must be the same file:
    ``identity`` (device, inode, size, mtime) is checked when it opens.
    """

    def __init__(self, path: Path, dim: int, identity: tuple[int, int, int, int]) -> None:
        self.path = path
        self.dim = dim
        self.identity = identity
        self._file: FeatureFile | None = None
        self._fd: int | None = None
        self._pid = -1

    def _own(self) -> None:
        if self._pid != os.getpid():  # fresh in this process: never close the parent's handles
            self._file, self._fd, self._pid = None, None, os.getpid()

    def get(self) -> FeatureFile:
        self._own()
        if self._file is None:
            self._file = FeatureFile(self.path, self.dim)
        return self._file

    def _descriptor(self) -> int:
        self._own()
        if self._fd is None:
            fd = os.open(self.path, os.O_RDONLY)
            if _file_identity(os.fstat(fd)) != self.identity:
                os.close(fd)
                raise DataError(
                    f"{self.path}: the file changed while its split was open; run the stage again"
                )
            self._fd = fd
        return self._fd

    def read_into(self, offset: int, out: np.ndarray, clip_id: str) -> None:
        """Fill ``out`` with the bytes at ``offset`` (a clip's float32 values)."""
        if os.preadv(self._descriptor(), [out], offset) != out.nbytes:
            raise DataError(f"{self.path}: clip {clip_id!r} ends past the end of the file (truncated?)")

    def will_need(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Tell the kernel which (offset, bytes) ranges are read next: it fetches them from the
        disk concurrently instead of one blocking read after another (about twice the throughput
        of random clip reads from a cold page cache, measured here). A hint only, where it exists."""
        if not hasattr(os, "posix_fadvise"):  # not on macOS
            return
        fd = self._descriptor()
        for offset, length in ranges:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._pid == os.getpid():
            if self._file is not None:
                self._file.close()
            if self._fd is not None:
                os.close(self._fd)
        self._file, self._fd = None, None

    def __getstate__(self) -> dict[str, object]:
        state = {"path": self.path, "dim": self.dim, "identity": self.identity}
        return {**state, "_file": None, "_fd": None, "_pid": -1}


def _batch_tensor(shape: tuple[int, int, int]) -> Tensor:
    """An uninitialised float32 tensor, in shared memory inside a DataLoader worker (the batch
    goes to the training process through it) and in ordinary memory elsewhere."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    # default_collate's own allocation (torch/utils/data/_utils/collate.py): no public API makes
    # a shared tensor without first filling an ordinary one.
    storage = torch.empty(0, dtype=torch.float32)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return torch.empty(0, dtype=torch.float32).new(storage).resize_(shape)


@dataclass
class ExpertFeatures:
    """One expert's features for the clips of a split, in index order."""

    name: str
    path: Path
    dim: int
    lengths: np.ndarray  # [N] original sequence lengths
    max_frames: int
    clip_ids: tuple[str, ...]
    cache: np.ndarray | None = None  # [N, max_frames, dim] zero-padded, when cached
    # [N] byte offset of each clip's float32 values in the file, -1 where HDF5 must decode them
    offsets: np.ndarray | None = None
    _source: _LazyFeatures | None = None

    def frames(self, clip: int) -> np.ndarray:
        """Clip ``clip``'s features cut to at most ``max_frames`` frames, [t, dim]."""
        if self.cache is not None:
            return self.cache[clip, : min(int(self.lengths[clip]), self.max_frames)]
        assert self._source is not None
        if self.offsets is not None and self.offsets[clip] >= 0:
            out = np.empty((min(int(self.lengths[clip]), self.max_frames), self.dim), dtype=np.float32)
            return self._read_direct(clip, out)
        # FeatureFile checks rank, dim and finiteness and names the file and clip on error.
        return self._source.get()[self.clip_ids[clip]][: self.max_frames]

    def _read_direct(self, clip: int, out: np.ndarray) -> np.ndarray:
        """One pread of the frames used into ``out``: ~10x less CPU per clip than h5py's read
        (issue #17), the same values bit for bit, checked as FeatureFile checks what it reads."""
        assert self._source is not None and self.offsets is not None
        clip_id = self.clip_ids[clip]
        self._source.read_into(int(self.offsets[clip]), out, clip_id)
        return check_feature_array(out, f"{self.path}:{clip_id}", self.dim)

    def rows(self, clips: np.ndarray | slice) -> tuple[Tensor, Tensor]:
        """These clips as a batch: [n, max_frames, dim] zero-padded rows and their masks, the tensors
        ``pad_frames`` makes. Indexed from the cache; or read from the file straight into the batch,
        the kernel told first which clips come (``will_need``), and inside a DataLoader worker into
        shared memory, as torch's default_collate does, so handing the batch over copies nothing."""
        real = np.minimum(self.lengths[clips], self.max_frames)
        mask = torch.from_numpy(np.arange(self.max_frames)[None, :] < real[:, None])
        if self.cache is not None:
            return torch.from_numpy(self.cache[clips]), mask  # a slice stays a view
        assert self._source is not None
        clips = np.arange(len(self.clip_ids))[clips] if isinstance(clips, slice) else np.asarray(clips, np.int64)
        x = _batch_tensor((len(clips), self.max_frames, self.dim))
        out = x.numpy()
        direct = self.offsets[clips] >= 0 if self.offsets is not None else np.zeros(len(clips), dtype=bool)
        if direct.any():
            row_bytes = self.dim * 4
            self._source.will_need(
                [(int(self.offsets[c]), int(t) * row_bytes) for c, t, d in zip(clips, real, direct) if d]  # type: ignore[index]
            )
        for row, (clip, length) in enumerate(zip(clips.tolist(), real.tolist())):
            if direct[row]:
                self._read_direct(clip, out[row, :length])
            else:
                out[row, :length] = self.frames(clip)
            out[row, length:] = 0.0
        return x, mask

    @property
    def cache_bytes(self) -> int:
        """RAM a cache takes: the zero-padded [N, max_frames, dim] float32 array."""
        return len(self.clip_ids) * self.max_frames * self.dim * 4

    def close(self) -> None:
        if self._source is not None:
            self._source.close()


@dataclass(frozen=True)
class FeatureScan:
    dim: int
    lengths: np.ndarray  # [N] frames per clip
    offsets: np.ndarray  # [N] byte offset of each clip's values, -1 where HDF5 must read them
    identity: tuple[int, int, int, int]  # the scanned file: device, inode, size, mtime (ns)


def scan_features(path: Path, clip_ids: Sequence[str]) -> FeatureScan:
    """Check that every clip has a [T, D] dataset of one dim; return its dim, lengths, offsets.

    The dim is the file's ``dim`` attribute when present, else the first clip's. Only
    metadata is read (shapes, storage offsets), so this is cheap even for tens of GB of features.
    """
    with FeatureFile(path) as features:
        identity = _file_identity(os.stat(path))
        present = set(features.keys())
        missing = [c for c in clip_ids if c not in present]
        if missing:
            preview = ", ".join(repr(c) for c in missing[:5])
            raise DataError(
                f"{path}: {len(missing)} clip(s) of the index have no features, e.g. {preview} "
                "(re-run `python src/extract.py`)"
            )
        attr_dim = features.attrs.get("dim")
        dim = int(attr_dim) if attr_dim is not None else None
        lengths = np.empty(len(clip_ids), dtype=np.int64)
        offsets = np.full(len(clip_ids), -1, dtype=np.int64)
        for i, clip_id in enumerate(clip_ids):
            shape, offset = features.stored(clip_id)
            if len(shape) != 2 or shape[0] < 1:
                raise DataError(f"{path}: clip {clip_id!r} has shape {shape}, expected [T >= 1, D]")
            if dim is None:
                dim = int(shape[1])
            if shape[1] != dim:
                raise DataError(
                    f"{path}: clip {clip_id!r} has feature dim {shape[1]}, expected {dim} "
                    f"(the file's dim, as of clip {clip_ids[0]!r} or its 'dim' attribute)"
                )
            lengths[i] = shape[0]
            if offset is not None:
                offsets[i] = offset
    assert dim is not None  # clip_ids is non-empty (checked by the caller)
    return FeatureScan(dim, lengths, offsets, identity)


def feature_hop_seconds(path: Path) -> float | None:
    """The audio time per frame a feature file records (atric's extractors do), else None."""
    with FeatureFile(path) as features:
        hop = features.attrs.get("hop_seconds")
    return float(hop) if hop is not None and float(hop) > 0 else None


def resolve_max_frames(
    dataset: str,
    experts: Sequence[str],
    configured: Mapping[str, int],
    train_lengths: Mapping[str, np.ndarray],
    *,
    max_seconds: float | None = None,
    hops: Mapping[str, float | None] | None = None,
) -> dict[str, int]:
    """Padded length per expert, in this order: ``train.max_frames.<expert>`` (frames), a
    duration (``train.max_seconds``, else the dataset's whole-clip duration) over the file's
    recorded hop, the original's frame counts for files without a hop, the 95th percentile.

    The one place a run's padded lengths are derived from params: training calls it once (on
    the train split) and records the result in the checkpoint; every later stage reads them
    from there (``open_split(padded_lengths=...)``). A length longer than the clips pads; only a
    value the params set that is obviously a unit mistake is refused (``MAX_PADDED_SECONDS``)."""
    hops = hops or {}
    result: dict[str, int] = {}
    for expert in experts:
        hop = hops.get(expert)
        seconds = max_seconds if max_seconds is not None else DEFAULT_MAX_SECONDS.get(dataset)
        longest = int(np.max(train_lengths[expert]))
        if expert in configured:
            value, key = int(configured[expert]), f"train.max_frames.{expert}"
            if value < 1:
                raise DataError(f"{key}: must be >= 1, got {value}")
            given = f"{key}={value} frames"
        elif seconds is not None and hop:
            # Only a length the params set is checked below: the dataset's default is not a user's typo.
            key = "train.max_seconds" if max_seconds is not None else ""
            value = max(1, math.ceil(seconds / hop - 1e-9))
            given = f"train.max_seconds={seconds:g} s"
        elif expert in DEFAULT_MAX_FRAMES.get(dataset, {}):
            value, key, given = DEFAULT_MAX_FRAMES[dataset][expert], "", ""
        else:
            value = max(1, int(np.ceil(np.percentile(train_lengths[expert], LENGTH_PERCENTILE))))
            key, given = "", ""
        if key and hop and value * hop > MAX_PADDED_SECONDS:
            raise DataError(
                f"{given} (params.yaml or --set) pads {expert} clips to {value * hop:g} s, over "
                f"{MAX_PADDED_SECONDS:g} s: a unit mistake? train.max_seconds is in seconds, "
                f"train.max_frames.<expert> in frames ({expert}: {hop:g} s per frame)"
            )
        if key and not hop and value > MAX_FRAMES_RATIO_WITHOUT_HOP * longest:
            raise DataError(
                f"{given} (params.yaml or --set) is over {MAX_FRAMES_RATIO_WITHOUT_HOP}x the longest train "
                f"clip of {expert} ({longest} frames; its feature file records no frame rate): a unit mistake?"
            )
        result[expert] = value
    return result


@dataclass(frozen=True)
class Truncation:
    """How much of a split a padded length cuts off."""

    clips_cut: float  # share of clips longer than the padded length
    frames_dropped: float  # share of all frames beyond it
    padding: float = 0.0  # share of the padded [clips x length] frames that are padding

    def describe(self) -> str:
        return (
            f"{100 * self.clips_cut:.1f}% of clips cut, {100 * self.frames_dropped:.1f}% of frames dropped, "
            f"{100 * self.padding:.1f}% of the padded length is padding"
        )


def truncation(lengths: np.ndarray, max_frames: int) -> Truncation:
    total = float(lengths.sum())
    dropped = float(np.clip(lengths - max_frames, 0, None).sum())
    padded = float(len(lengths) * max_frames)
    kept = float(np.minimum(lengths, max_frames).sum())
    return Truncation(
        float(np.mean(lengths > max_frames)), dropped / total if total else 0.0, 1 - kept / padded if padded else 0.0
    )


# ---------------------------------------------------------------- one split
@dataclass
class SplitData:
    """A checked split: clips, per-expert features and per-caption word vectors."""

    split: str
    clips: list[Clip]
    experts: dict[str, ExpertFeatures]
    words: list[np.ndarray]  # one [n_tokens, text_dim] array per caption, clip-major order
    caption_clip: np.ndarray  # [n_captions] index of each caption's clip
    text_dim: int
    cached: bool

    @property
    def expert_dims(self) -> dict[str, int]:
        return {name: e.dim for name, e in self.experts.items()}

    @property
    def max_frames(self) -> dict[str, int]:
        return {name: e.max_frames for name, e in self.experts.items()}

    @property
    def truncation(self) -> dict[str, Truncation]:
        """Per expert, what the padded length cuts off this split's clips."""
        return {name: truncation(e.lengths, e.max_frames) for name, e in self.experts.items()}

    def __len__(self) -> int:
        return len(self.clips)

    def close(self) -> None:
        for expert in self.experts.values():
            expert.close()


def open_split(
    layout: Layout,
    split: str,
    *,
    experts: Sequence[str],
    vectors: str,
    max_frames: Mapping[str, int] | None = None,
    cache_in_ram: CacheMode = "auto",
    expert_dims: Mapping[str, int] | None = None,
    max_seconds: float | None = None,
    padded_lengths: Mapping[str, int] | None = None,
) -> SplitData:
    """Open and check one split.

    Either ``padded_lengths``: a run's resolved lengths (its checkpoint's, or the train split's
    for val), used as they are; or the params to resolve them from (``resolve_max_frames``):
    ``max_frames`` (``train.max_frames``, may leave experts out) and ``max_seconds``. Only a
    training run resolves; every later stage passes ``padded_lengths``. ``expert_dims`` (e.g. a
    trained model's) makes a different dim in this split an error naming the file.
    """
    if padded_lengths is not None and (max_frames or max_seconds is not None):
        raise ValueError("open_split: give padded_lengths or max_frames/max_seconds, not both")
    if not experts:
        raise DataError("no audio experts given (train.experts is empty)")
    index_path = layout.index_path(split)
    clips = read_index(index_path, split)
    if not clips:
        raise DataError(f"{index_path}: the {split} split has no clips")
    clip_ids = tuple(c.clip_id for c in clips)

    scans = {expert: scan_features(layout.features_path(expert, split), clip_ids) for expert in experts}
    hops = {expert: feature_hop_seconds(layout.features_path(expert, split)) for expert in experts}
    for expert, scan in scans.items():
        if expert_dims is not None and expert in expert_dims and scan.dim != expert_dims[expert]:
            raise DataError(
                f"{layout.features_path(expert, split)}: feature dim is {scan.dim} (clip {clip_ids[0]!r}), "
                f"but the model expects {expert_dims[expert]} for expert {expert!r}"
            )
    if padded_lengths is not None:
        missing = [e for e in experts if e not in padded_lengths]
        if missing:
            raise DataError(f"no padded length recorded for expert(s) {', '.join(missing)} (split {split})")
        resolved = {e: int(padded_lengths[e]) for e in experts}
    else:
        resolved = resolve_max_frames(
            layout.dataset,
            experts,
            dict(max_frames or {}),
            {e: scan.lengths for e, scan in scans.items()},
            max_seconds=max_seconds,
            hops=hops,
        )
    features = {
        expert: ExpertFeatures(
            name=expert,
            path=layout.features_path(expert, split),
            dim=scan.dim,
            lengths=scan.lengths,
            max_frames=resolved[expert],
            clip_ids=clip_ids,
            offsets=scan.offsets,
            _source=_LazyFeatures(layout.features_path(expert, split), scan.dim, scan.identity),
        )
        for expert, scan in scans.items()
    }

    total = sum(e.cache_bytes for e in features.values())
    cached = cache_in_ram == "yes" or (cache_in_ram == "auto" and total < CACHE_LIMIT_BYTES)
    if cached:
        for expert in features.values():
            _fill_cache(expert)

    words, caption_clip, text_dim = _load_words(layout.text_path(vectors, split), clips)
    return SplitData(split, clips, features, words, caption_clip, text_dim, cached)


def _fill_cache(expert: ExpertFeatures) -> None:
    expert.cache = expert.rows(slice(None))[0].numpy()
    expert.close()  # no handle left open to leak into forked workers


def _load_words(path: Path, clips: Sequence[Clip]) -> tuple[list[np.ndarray], np.ndarray, int]:
    embeddings = read_text_embeddings(path)
    words: list[np.ndarray] = []
    caption_clip: list[int] = []
    text_dim: int | None = None
    for index, clip in enumerate(clips):
        if clip.clip_id not in embeddings:
            raise DataError(f"{path}: clip {clip.clip_id!r} of the index has no text embeddings")
        vectors = embeddings[clip.clip_id]
        if len(vectors) != len(clip.captions):
            raise DataError(
                f"{path}: clip {clip.clip_id!r} has {len(vectors)} caption embeddings but "
                f"{len(clip.captions)} captions in the index (re-run `python src/embed_text.py`)"
            )
        for k, array in enumerate(vectors):
            if array.ndim != 2 or array.shape[0] < 1:
                raise DataError(f"{path}: clip {clip.clip_id!r} caption {k + 1} has shape {array.shape}")
            if text_dim is None:
                text_dim = int(array.shape[1])
            if array.shape[1] != text_dim:
                raise DataError(
                    f"{path}: clip {clip.clip_id!r} caption {k + 1} has dim {array.shape[1]}, expected {text_dim}"
                )
            words.append(np.asarray(array, dtype=np.float32))
            caption_clip.append(index)
    assert text_dim is not None
    return words, np.asarray(caption_clip, dtype=np.int64), text_dim


# ---------------------------------------------------------------- loaders
PREFETCH_BATCHES = 2  # batches the background thread builds ahead (num_workers: 0)


class BackgroundLoader(DataLoader):  # type: ignore[type-arg]
    """A DataLoader that, without worker processes (``num_workers=0``), builds its batches in one
    background thread of this process, ``PREFETCH_BATCHES`` ahead of the consumer: the same batches
    in the same order. Building a batch is reads and copies (``pread``, numpy indexing) that release
    the GIL, so it runs on another core while the training step runs, with nothing copied into
    shared memory and page-faulted in again by the trainer, as worker processes do. Streaming
    AudioCaps-sized features from a cold page cache on 2 cores, mean pooling trained 1.4x faster
    than with 2 worker processes and waited for data 2% of the time instead of 20%
    (benchmarks/train.py, streaming). With workers it is a plain DataLoader."""

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers > 0:
            return super().__iter__()
        return _in_background(super().__iter__(), PREFETCH_BATCHES)


def _in_background(items: Iterator[Any], ahead: int) -> Iterator[Any]:
    """``items`` produced by a daemon thread, at most ``ahead`` waiting; an error there is raised
    here. Closing the generator (a break, an error in the consumer) stops the thread and waits
    for it, so no read outlives the split's open files."""
    ready: queue.Queue[tuple[str, Any]] = queue.Queue(ahead)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 -- handed to the consumer, raised there
            put(("error", exc))

    thread = threading.Thread(target=produce, name="atric-batches", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------- batches
@dataclass
class Batch:
    """A collated batch; ``audio`` maps expert -> (x [Na, T, D], mask [Na, T])."""

    audio: dict[str, tuple[Tensor, Tensor]]
    words: Tensor  # [Nt, L, Dw]
    word_mask: Tensor  # [Nt, L]
    caption_clip: Tensor  # [Nt] column of each caption's clip in the audio batch
    clip_index: Tensor  # [Na] index of each audio column's clip in the split

    def to(self, device: torch.device) -> Batch:
        blocking = device.type != "cuda"
        return Batch(
            audio={
                k: (x.to(device, non_blocking=not blocking), m.to(device, non_blocking=not blocking))
                for k, (x, m) in self.audio.items()
            },
            words=self.words.to(device, non_blocking=not blocking),
            word_mask=self.word_mask.to(device, non_blocking=not blocking),
            caption_clip=self.caption_clip.to(device),
            clip_index=self.clip_index.to(device),
        )

    def pin_memory(self) -> Batch:  # DataLoader(pin_memory=True) calls this on custom types
        return Batch(
            audio={k: (x.pin_memory(), m.pin_memory()) for k, (x, m) in self.audio.items()},
            words=self.words.pin_memory(),
            word_mask=self.word_mask.pin_memory(),
            caption_clip=self.caption_clip.pin_memory(),
            clip_index=self.clip_index.pin_memory(),
        )


def pad_frames(arrays: Sequence[np.ndarray], max_frames: int) -> tuple[Tensor, Tensor]:
    """Cut each [t, D] array to its first ``max_frames`` frames, zero-pad to exactly that; + mask."""
    dim = arrays[0].shape[1]
    x = np.zeros((len(arrays), max_frames, dim), dtype=np.float32)
    mask = np.zeros((len(arrays), max_frames), dtype=bool)
    for row, array in enumerate(arrays):
        t = min(array.shape[0], max_frames)
        x[row, :t] = array[:t]
        mask[row, :t] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


def pad_words(arrays: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Pad word vectors to the longest caption of the batch; + mask."""
    longest = max(a.shape[0] for a in arrays)
    x = np.zeros((len(arrays), longest, arrays[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(arrays), longest), dtype=bool)
    for row, array in enumerate(arrays):
        x[row, : array.shape[0]] = array
        mask[row, : array.shape[0]] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


class ClipDataset(Dataset[dict[str, np.ndarray]]):
    """The clips of a split in index order (for embedding every clip once); ``time_reversed``
    plays each clip's frames backwards (the order metric's control: order-blind poolings do
    not change, a model that uses order does)."""

    def __init__(self, data: SplitData, time_reversed: bool = False) -> None:
        self.data = data
        self.time_reversed = time_reversed

    def __len__(self) -> int:
        return len(self.data.clips)

    def __getitem__(self, clip: int) -> dict[str, np.ndarray]:
        frames = {name: expert.frames(clip) for name, expert in self.data.experts.items()}
        if self.time_reversed:
            frames = {name: np.ascontiguousarray(x[::-1]) for name, x in frames.items()}
        return frames


class ClipCollate:
    def __init__(self, max_frames: dict[str, int]) -> None:
        self.max_frames = dict(max_frames)

    def __call__(self, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, tuple[Tensor, Tensor]]:
        return {name: pad_frames([s[name] for s in samples], t) for name, t in self.max_frames.items()}


def collate_words(samples: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    return pad_words(samples)


class TrainBatches(Dataset[Batch]):
    """The training batches of a split, one per list of items a ``BatchSampler`` draws: (clip,
    caption) pairs (item = caption) or clips with all their captions in index order (``sampling=
    "clip"``, item = clip). Each distinct clip is one audio column (``split_batch``), whether the
    split is cached in RAM or streamed from its files (picklable for DataLoader workers)."""

    def __init__(self, data: SplitData, sampling: str = "pairs") -> None:
        self.data = data
        self.captions_of = (
            [np.flatnonzero(data.caption_clip == clip) for clip in range(len(data.clips))]
            if sampling == "clip"
            else None
        )

    def __len__(self) -> int:
        return len(self.data.clips) if self.captions_of is not None else len(self.data.words)

    def __getitem__(self, items: Sequence[int]) -> Batch:  # type: ignore[override]
        if self.captions_of is None:
            return split_batch(self.data, np.asarray(items, dtype=np.int64))
        return split_batch(self.data, np.concatenate([self.captions_of[clip] for clip in items]))


def split_batch(data: SplitData, captions: np.ndarray) -> Batch:
    """The Batch of these caption indices: each distinct clip once, in order of first use."""
    clips = data.caption_clip[captions]
    distinct, first, inverse = np.unique(clips, return_index=True, return_inverse=True)
    by_first_use = np.argsort(first, kind="stable")
    column = np.empty_like(by_first_use)
    column[by_first_use] = np.arange(len(by_first_use))
    clip_index = distinct[by_first_use]
    audio = {name: expert.rows(clip_index) for name, expert in data.experts.items()}
    words, word_mask = pad_words([data.words[int(c)] for c in captions])
    return Batch(
        audio=audio,
        words=words,
        word_mask=word_mask,
        caption_clip=torch.from_numpy(column[inverse.reshape(-1)].astype(np.int64)),
        clip_index=torch.from_numpy(clip_index.astype(np.int64)),
    )


def batch_as_is(batch: Batch) -> Batch:
    """The DataLoader's collate_fn for ``TrainBatches``: its items are whole batches already."""
    return batch


class EpochSampler(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch).

    Resuming at epoch e therefore replays exactly the order an uninterrupted run would
    use, with no sampler state to carry; ``set_epoch`` is called before each epoch.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)

    def __iter__(self):  # type: ignore[override]
        return iter(torch.randperm(self.size, generator=self.generator()).tolist())

    def __len__(self) -> int:
        return self.size
