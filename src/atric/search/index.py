"""The search index of a trained run: building it (the index stage) and reading it back.

The index of run ``<run>`` is ``<search.index_dir>/<run>.h5`` (default ``indexes/``: not
inside ``models/<run>/``, which is the train stage's DVC output). HDF5, read with h5py
only (numbers and strings: nothing is ever unpickled):

```
clip_ids          [N] str       clips of the indexed splits, split by split, index order
splits            [N] str       each clip's split
audio             [X, N, E] f32 per-expert clip embeddings (unit norm), X = len(experts)
caption_offsets   [N+1] int64   clip c's captions are captions[caption_offsets[c]:caption_offsets[c+1]]
captions          [M] str       every caption of every clip
caption_text      [X, M, E] f32 per-expert caption embeddings (unit norm)
caption_weights   [M, X] f32    each caption's fusion weights
attrs: format, run, checkpoint_sha256, params_hash, text_vectors, text_vectors_hash,
       max_words, experts (JSON), embed_dim, max_frames (JSON), dataset, indexed_splits (JSON),
       feature_settings (JSON: expert -> the settings its features were extracted with)
```
Clip and caption embeddings are computed exactly as evaluation computes them
(``open_split`` with the checkpoint's padded lengths, the stage's caption word vectors).

Scores are exact inner products: text query q scores clip j with
``sum_e w_e <t_e, a_je>`` (the model's similarity); the expert blocks are concatenated
once at load time, ``[w_1 t_1 | w_2 t_2] . [a_1 | a_2]``, so a query is one matmul + topk.
An index is refused when its checkpoint hash or params hash differs from the run's
``best.pt``: its embeddings would come from another model.

From ``atric.search.ann.EXACT_BELOW`` clips on, the stage also writes ``<run>.faiss`` (an
approximate index over the same clip rows, written first) and the attr ``ann`` (JSON,
``AnnInfo``) that names it; smaller indexes have neither and are byte-for-byte what they were.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from atric.atomic import atomic_path
from atric.config import Params
from atric.data import SplitData, open_split
from atric.device import resolve_device
from atric.embed import embed_captions, embed_clips
from atric.engine import RunPaths, load_checkpoint
from atric.errors import DataError
from atric.factory import model_from_checkpoint
from atric.features.base import sha256_file
from atric.layout import (
    H5_REPRODUCIBLE,
    SPLITS,
    FeatureFile,
    Layout,
    local_dataset,
    read_text_attrs,
    set_attrs,
)
from atric.model import RetrievalModel
from atric.search.ann import EXACT_BELOW, AnnInfo, ApproximateIndex, ann_path, clip_rows

INDEX_FORMAT = 1


# ---------------------------------------------------------------- paths and model
def index_path(params: Params, run: str) -> Path:
    """``<search.index_dir>/<run>.h5``."""
    RunPaths.of(params.train, run)  # validates the run name (no '/', not empty)
    return Path(params.search.index_dir) / f"{run}.h5"


def build_command(run: str) -> str:
    return f"python src/index.py --run {run}"


def load_run_model(path: Path, device: torch.device) -> tuple[RetrievalModel, dict[str, Any]]:
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint).to(device)
    info = {
        "params_hash": str(checkpoint.get("params_hash", "")),
        "max_frames": {k: int(v) for k, v in checkpoint["max_frames"].items()},
        "text_vectors": str(checkpoint["signature"].get("text.vectors", "")),
        "model_config": checkpoint["model_config"],
    }
    return model, info


# ---------------------------------------------------------------- building
@dataclass
class IndexReport:
    run: str
    path: Path
    clips: dict[str, int]  # split -> clips indexed
    captions: int
    checkpoint_sha256: str
    seconds: float = 0.0


@torch.no_grad()
def _embed_split(
    model: RetrievalModel, data: SplitData, device: torch.device, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(audio [X, N, E], caption text [X, M, E], caption weights [M, X]) through atric.embed."""
    audio = embed_clips(model, data, device=device, batch_size=batch_size)
    text, weights = embed_captions(model, data, device=device, batch_size=batch_size)
    return (
        torch.stack([audio[name].cpu() for name in model.experts]).numpy(),
        torch.stack([text[name].cpu() for name in model.experts]).numpy(),
        weights.cpu().numpy(),
    )


def _feature_settings(layout: Layout, experts: Sequence[str], split: str) -> dict[str, str]:
    """The settings each expert's features were extracted with ('' when the file does not say)."""
    result = {}
    for expert in experts:
        with FeatureFile(layout.features_path(expert, split)) as features:
            result[expert] = str(features.attrs.get("settings", ""))
    return result


def build_index(
    params: Params,
    run: str,
    splits: Sequence[str] | None = None,
    *,
    progress: bool = False,
    exact_below: int = EXACT_BELOW,
) -> IndexReport:
    """Embed every clip and caption of ``splits`` with ``run``'s best model; write the index atomically
    (and, from ``exact_below`` clips on, its approximate index)."""
    started = time.perf_counter()
    splits = list(splits or params.search.splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise DataError(f"splits {unknown or splits}: expected some of {', '.join(SPLITS)}")
    splits = [s for s in SPLITS if s in splits]  # canonical order, no duplicates
    paths = RunPaths.of(params.train, run)
    device = resolve_device(params.search.device)
    model, info = load_run_model(paths.best, device)
    vectors = info["text_vectors"] or params.text.vectors
    layout = Layout(params.data.dataset, params.data.root)
    expert_dims = info["model_config"]["expert_dims"]

    clip_ids: list[str] = []
    clip_splits: list[str] = []
    captions: list[str] = []
    offsets = [0]
    audio_parts, text_parts, weight_parts = [], [], []
    text_attrs: dict[str, Any] = {}
    feature_settings: dict[str, str] = {}
    for split in tqdm(splits, desc=f"index {run}", unit="split", disable=not progress):
        data = open_split(
            layout,
            split,
            experts=list(model.experts),
            vectors=vectors,
            padded_lengths=info["max_frames"],
            cache_in_ram=params.train.cache_in_ram,
            expert_dims=expert_dims,
        )
        try:
            if data.text_dim != model.config()["text_dim"]:
                raise DataError(
                    f"{layout.text_path(vectors, split)}: word vectors have dim {data.text_dim}, "
                    f"the model {run} expects {model.config()['text_dim']}"
                )
            audio, text, weights = _embed_split(model, data, device, params.search.batch_size)
        finally:
            data.close()
        audio_parts.append(audio)
        text_parts.append(text)
        weight_parts.append(weights)
        for clip in data.clips:
            clip_ids.append(clip.clip_id)
            clip_splits.append(split)
            captions.extend(clip.captions)
            offsets.append(len(captions))
        text_attrs = text_attrs or read_text_attrs(layout.text_path(vectors, split))
        feature_settings = feature_settings or _feature_settings(layout, model.experts, split)

    path = index_path(params, run)
    sha = sha256_file(paths.best)
    audio = np.concatenate(audio_parts, axis=1)
    del audio_parts
    ann: AnnInfo | None = None
    if len(clip_ids) >= exact_below:
        # Before the .h5: a crash between the two leaves the old .h5, which refuses the new file.
        ann = ApproximateIndex.build(clip_rows(audio), exact_below=exact_below).write(ann_path(path))
    strings = h5py.string_dtype()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("clip_ids", data=np.array(clip_ids, dtype=object), dtype=strings, **H5_REPRODUCIBLE)
        h5.create_dataset(
            "splits", data=np.array(clip_splits, dtype=object), dtype=strings, **H5_REPRODUCIBLE
        )
        h5.create_dataset("audio", data=audio, **H5_REPRODUCIBLE)
        h5.create_dataset("caption_offsets", data=np.asarray(offsets, np.int64), **H5_REPRODUCIBLE)
        h5.create_dataset("captions", data=np.array(captions, dtype=object), dtype=strings, **H5_REPRODUCIBLE)
        h5.create_dataset("caption_text", data=np.concatenate(text_parts, axis=1), **H5_REPRODUCIBLE)
        h5.create_dataset("caption_weights", data=np.concatenate(weight_parts, axis=0), **H5_REPRODUCIBLE)
        attrs = {
            "format": INDEX_FORMAT,
            "run": run,
            "checkpoint_sha256": sha,
            "params_hash": info["params_hash"],
            "text_vectors": vectors,
            "text_vectors_hash": str(text_attrs.get("vectors_hash", "")),
            "max_words": int(text_attrs.get("max_words", params.text.max_words)),
            "experts": json.dumps(list(model.experts)),
            "embed_dim": model.embed_dim,
            "max_frames": json.dumps(info["max_frames"], sort_keys=True),
            "dataset": params.data.dataset,
            "indexed_splits": json.dumps(splits),
            "feature_settings": json.dumps(feature_settings, sort_keys=True),
        }
        if ann is not None:
            attrs["ann"] = ann.to_json()
        set_attrs(h5, attrs)
    if ann is None:
        ann_path(path).unlink(missing_ok=True)  # a larger build's, which this .h5 does not name
    counts = {s: clip_splits.count(s) for s in splits}
    return IndexReport(run, path, counts, len(captions), sha, round(time.perf_counter() - started, 3))


# ---------------------------------------------------------------- loading
@dataclass
class SearchIndex:
    """An index in memory (numpy); ``attrs`` as written by ``build_index``."""

    clip_ids: list[str]
    splits: np.ndarray  # [N] str
    audio: np.ndarray  # [X, N, E]
    caption_offsets: np.ndarray  # [N+1]
    captions: list[str]
    caption_text: np.ndarray  # [X, M, E]
    caption_weights: np.ndarray  # [M, X]
    attrs: dict[str, Any] = field(default_factory=dict)
    ann: ApproximateIndex | None = None  # from EXACT_BELOW clips on: searched instead of every clip

    @property
    def experts(self) -> list[str]:
        return list(json.loads(self.attrs["experts"]))

    def first_caption(self, clip: int) -> str:
        start, end = int(self.caption_offsets[clip]), int(self.caption_offsets[clip + 1])
        return self.captions[start] if end > start else ""

    def caption_clip(self) -> np.ndarray:
        """[M] the clip of each caption."""
        return np.repeat(np.arange(len(self.clip_ids)), np.diff(self.caption_offsets))


def load_index(path: str | Path) -> SearchIndex:
    """Read an index file (h5py datasets and attrs only); DataError if missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: index not found")
    try:
        with h5py.File(path, "r") as h5:
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()}
            if attrs.get("format") != INDEX_FORMAT:
                raise DataError(f"{path}: not an atric search index (format {INDEX_FORMAT} expected)")
            index = SearchIndex(
                clip_ids=list(local_dataset(h5, "clip_ids", str(path)).asstr()[()]),
                splits=np.asarray(local_dataset(h5, "splits", str(path)).asstr()[()], dtype=object),
                audio=np.asarray(local_dataset(h5, "audio", str(path))[()], np.float32),
                caption_offsets=np.asarray(local_dataset(h5, "caption_offsets", str(path))[()], np.int64),
                captions=list(local_dataset(h5, "captions", str(path)).asstr()[()]),
                caption_text=np.asarray(local_dataset(h5, "caption_text", str(path))[()], np.float32),
                caption_weights=np.asarray(local_dataset(h5, "caption_weights", str(path))[()], np.float32),
                attrs=attrs,
            )
    except (OSError, KeyError) as exc:
        raise DataError(f"{path}: not a readable search index: {exc}") from exc
    n, x = len(index.clip_ids), len(index.experts)
    if (
        index.audio.shape[:2] != (x, n)
        or len(index.caption_offsets) != n + 1
        or index.caption_text.shape[:2] != (x, len(index.captions))
        or index.caption_weights.shape != (len(index.captions), x)
    ):
        raise DataError(f"{path}: inconsistent shapes in the search index; rebuild it")
    offsets = index.caption_offsets
    if n and (offsets[0] != 0 or offsets[-1] != len(index.captions) or (np.diff(offsets) < 1).any()):
        raise DataError(
            f"{path}: caption_offsets do not split the {len(index.captions)} captions among the {n} clips "
            "(each clip needs at least one); rebuild it"
        )
    for name in ("audio", "caption_text", "caption_weights"):
        if not np.isfinite(getattr(index, name)).all():  # a NaN row would rank first with score nan
            raise DataError(f"{path}: {name} holds NaN or inf values; rebuild it")
    if "ann" in attrs:
        try:
            info = AnnInfo.from_json(str(attrs["ann"]))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: unreadable attr ann ({exc}); rebuild it") from exc
        index.ann = ApproximateIndex.read(path.parent / Path(info.file).name, info, index.audio)
    return index
