"""Datasets and collation for training and evaluation.

One split = its Index file, one HDF5 feature file per audio expert and one text-embedding
file. Everything is checked once when the split is opened (every indexed clip has features
of the right dim in every expert file, every caption has an embedding), so a bad file fails
before training starts, naming the file and the clip.

Features are either cached in RAM (already cut to the padded length) or streamed from HDF5
one clip at a time, each process (DataLoader worker) opening its own handle, so an
AudioCaps-scale corpus (tens of GB) trains in bounded memory.

Training batches are either (clip, caption) pairs (``train.sampling: pairs``) or clips with
all their captions (``clip``, the original's); both are collated with every distinct clip
once: a clip with several captions in the batch is one audio column and ``caption_clip`` maps
each caption row to that column (what the losses expect).

Why one module of this size: opening and checking a split, its datasets and its collation define together what a batch holds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

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
# A padded length this many times the longest clip is a mistake (a frame count given as seconds, say).
MAX_LENGTH_RATIO = 10
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

    def read_into(self, offset: int, out: np.ndarray, clip_id: str) -> None:
        """Fill ``out`` with the bytes at ``offset`` (a clip's float32 values)."""
        self._own()
        if self._fd is None:
            fd = os.open(self.path, os.O_RDONLY)
            if _file_identity(os.fstat(fd)) != self.identity:
                os.close(fd)
                raise DataError(
                    f"{self.path}: the file changed while its split was open; run the stage again"
                )
            self._fd = fd
        if os.preadv(self._fd, [out], offset) != out.nbytes:
            raise DataError(f"{self.path}: clip {clip_id!r} ends past the end of the file (truncated?)")

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
        clip_id = self.clip_ids[clip]
        if self.offsets is not None and self.offsets[clip] >= 0:
            # One pread of the frames used: ~10x less CPU per clip than h5py's read (issue #17),
            # and the same values bit for bit. Checked as FeatureFile checks what it reads.
            out = np.empty((min(int(self.lengths[clip]), self.max_frames), self.dim), dtype=np.float32)
            self._source.read_into(int(self.offsets[clip]), out, clip_id)
            return check_feature_array(out, f"{self.path}:{clip_id}", self.dim)
        # FeatureFile checks rank, dim and finiteness and names the file and clip on error.
        return self._source.get()[clip_id][: self.max_frames]

    def cached_rows(self, clips: np.ndarray | slice) -> tuple[Tensor, Tensor]:
        """Cached clips as a batch: their zero-padded rows and masks, the tensors ``pad_frames`` makes."""
        if self.cache is None:
            raise DataError(f"{self.path}: expert {self.name!r} is not cached in RAM")
        real = np.minimum(self.lengths[clips], self.max_frames)
        mask = np.arange(self.max_frames)[None, :] < real[:, None]
        return torch.from_numpy(self.cache[clips]), torch.from_numpy(mask)

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
    check: bool = True,
) -> dict[str, int]:
    """Padded length per expert, in this order: ``train.max_frames.<expert>`` (frames), a
    duration (``train.max_seconds``, else the dataset's whole-clip duration) over the file's
    recorded hop, the original's frame counts for files without a hop, the 95th percentile.

    ``check``: refuse a length the params set that is over 10x the longest clip (the train
    split's; val/test are opened with the train split's lengths and are not checked again)."""
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
        elif seconds is not None and hop:
            # Only a length the params set is checked below: the dataset's default is not a user's typo.
            key = "train.max_seconds" if max_seconds is not None else ""
            value = max(1, math.ceil(seconds / hop - 1e-9))
        elif expert in DEFAULT_MAX_FRAMES.get(dataset, {}):
            value, key = DEFAULT_MAX_FRAMES[dataset][expert], ""
        else:
            value, key = max(1, int(np.ceil(np.percentile(train_lengths[expert], LENGTH_PERCENTILE)))), ""
        if check and key and value > MAX_LENGTH_RATIO * longest:
            given = f"{max_seconds} s = {value} frames" if key == "train.max_seconds" else f"{value} frames"
            raise DataError(
                f"{key}: {given} of {expert} is more than {MAX_LENGTH_RATIO}x the longest train clip "
                f"({longest} frames{f' = {longest * hop:.1f} s' if hop else ''}); give seconds in "
                "train.max_seconds and frames in train.max_frames"
            )
        result[expert] = value
    return result


@dataclass(frozen=True)
class Truncation:
    """How much of a split a padded length cuts off."""

    clips_cut: float  # share of clips longer than the padded length
    frames_dropped: float  # share of all frames beyond it

    def describe(self) -> str:
        return f"{100 * self.clips_cut:.1f}% of clips cut, {100 * self.frames_dropped:.1f}% of frames dropped"


def truncation(lengths: np.ndarray, max_frames: int) -> Truncation:
    total = float(lengths.sum())
    dropped = float(np.clip(lengths - max_frames, 0, None).sum())
    return Truncation(float(np.mean(lengths > max_frames)), dropped / total if total else 0.0)


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
    max_frames: Mapping[str, int],
    cache_in_ram: CacheMode = "auto",
    expert_dims: Mapping[str, int] | None = None,
    max_seconds: float | None = None,
) -> SplitData:
    """Open and check one split.

    ``max_frames`` may leave experts out: they get the paper's length for AudioCaps/CLOTHO,
    else the 95th percentile of this split's lengths (open the train split first and pass
    its ``max_frames`` on to val/test). ``expert_dims`` (e.g. a trained model's) makes a
    different dim in this split an error naming the file.
    """
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
    resolved = resolve_max_frames(
        layout.dataset,
        experts,
        dict(max_frames),
        {e: scan.lengths for e, scan in scans.items()},
        max_seconds=max_seconds,
        hops=hops,
        check=split == "train",
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
    cache = np.zeros((len(expert.clip_ids), expert.max_frames, expert.dim), dtype=np.float32)
    for i in range(len(expert.clip_ids)):
        frames = expert.frames(i)
        cache[i, : frames.shape[0]] = frames
    expert.cache = cache
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


# A training sample: (clip index in the split, expert -> [t, D] frames, words [n, Dw]).
PairSample = tuple[int, dict[str, np.ndarray], np.ndarray]


class PairCollate:
    """Collate (clip, caption) pairs, each distinct clip once (picklable for workers)."""

    def __init__(self, max_frames: dict[str, int]) -> None:
        self.max_frames = dict(max_frames)

    def __call__(self, samples: Sequence[PairSample]) -> Batch:
        column: dict[int, int] = {}
        audio_rows: list[dict[str, np.ndarray]] = []
        caption_clip: list[int] = []
        for clip, frames, _ in samples:
            if clip not in column:
                column[clip] = len(audio_rows)
                audio_rows.append(frames)
            caption_clip.append(column[clip])
        audio = {
            name: pad_frames([row[name] for row in audio_rows], self.max_frames[name])
            for name in self.max_frames
        }
        words, word_mask = pad_words([sample[2] for sample in samples])
        return Batch(
            audio=audio,
            words=words,
            word_mask=word_mask,
            caption_clip=torch.tensor(caption_clip, dtype=torch.long),
            clip_index=torch.tensor(list(column), dtype=torch.long),
        )


class PairDataset(Dataset[PairSample]):
    """Every (clip, caption) pair of a split: one item per caption."""

    def __init__(self, data: SplitData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data.words)

    def __getitem__(self, caption: int) -> PairSample:
        clip = int(self.data.caption_clip[caption])
        frames = {name: expert.frames(clip) for name, expert in self.data.experts.items()}
        return clip, frames, self.data.words[caption]


class ClipCaptionsDataset(Dataset[list[PairSample]]):
    """One item per clip holding all its captions (the original's training batches: a batch
    is distinct clips, so no clip repeats inside it)."""

    def __init__(self, data: SplitData) -> None:
        self.data = data
        self.captions_of = [np.flatnonzero(data.caption_clip == clip) for clip in range(len(data.clips))]

    def __len__(self) -> int:
        return len(self.data.clips)

    def __getitem__(self, clip: int) -> list[PairSample]:
        frames = {name: expert.frames(clip) for name, expert in self.data.experts.items()}
        return [(clip, frames, self.data.words[int(c)]) for c in self.captions_of[clip]]


class ClipCaptionsCollate(PairCollate):
    """Collate clips with all their captions: the same Batch as pairs, each clip once."""

    def __call__(self, samples: Sequence[list[PairSample]]) -> Batch:  # type: ignore[override]
        return super().__call__([pair for clip in samples for pair in clip])


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


class CachedBatches:
    """The training batches of a RAM-cached split, without a DataLoader: each batch's audio is
    gathered from the zero-padded cache in one indexing operation instead of being fetched and
    collated sample by sample (a tenth of a small model's step). Yields exactly the Batch that
    ``PairCollate`` (or ``ClipCaptionsCollate``) makes for the same sampler order, incomplete
    last batch dropped as there."""

    def __init__(self, data: SplitData, sampler: EpochSampler, batch_size: int, sampling: str = "pairs") -> None:
        if not data.cached:
            raise DataError(f"{data.split}: CachedBatches needs a split cached in RAM")
        self.data = data
        self.sampler = sampler
        self.batch_size = batch_size
        self.captions_of = (
            [np.flatnonzero(data.caption_clip == clip) for clip in range(len(data.clips))]
            if sampling == "clip"
            else None
        )

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        order = np.asarray(list(self.sampler), dtype=np.int64)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            items = order[start : start + self.batch_size]
            if self.captions_of is None:
                yield self.batch(items)
            else:  # a batch of clips, each with all its captions in index order
                yield self.batch(np.concatenate([self.captions_of[clip] for clip in items]))

    def batch(self, captions: np.ndarray) -> Batch:
        """The Batch of these caption indices: each distinct clip once, in order of first use."""
        clips = self.data.caption_clip[captions]
        distinct, first, inverse = np.unique(clips, return_index=True, return_inverse=True)
        by_first_use = np.argsort(first, kind="stable")
        column = np.empty_like(by_first_use)
        column[by_first_use] = np.arange(len(by_first_use))
        clip_index = distinct[by_first_use]
        audio = {name: expert.cached_rows(clip_index) for name, expert in self.data.experts.items()}
        words, word_mask = pad_words([self.data.words[int(c)] for c in captions])
        return Batch(
            audio=audio,
            words=words,
            word_mask=word_mask,
            caption_clip=torch.from_numpy(column[inverse.reshape(-1)].astype(np.int64)),
            clip_index=torch.from_numpy(clip_index.astype(np.int64)),
        )


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
