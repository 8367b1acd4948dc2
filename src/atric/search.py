"""Search a trained run: text -> clips and sound -> captions, over a precomputed index.

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
from torch import Tensor
from tqdm import tqdm

from atric.atomic import atomic_path
from atric.audio import load_audio
from atric.config import Params
from atric.data import SplitData, open_split, pad_words
from atric.device import resolve_device
from atric.embed import embed_captions, embed_clips, frames_to_batch
from atric.engine import RunPaths, load_checkpoint
from atric.errors import AtricError, CheckpointError, DataError
from atric.factory import model_from_checkpoint
from atric.features.base import build_expert, sha256_file
from atric.layout import SPLITS, FeatureFile, Layout, read_text_attrs
from atric.model import RetrievalModel
from atric.text import VectorSource, load_vectors, tokenize

INDEX_FORMAT = 1
_QUERY_CHUNK = 256  # queries scored at once: bounds the [B, N] score matrix


class QueryError(AtricError):
    """A query that cannot be searched (empty, no known word)."""


# ---------------------------------------------------------------- paths and model
def index_path(params: Params, run: str) -> Path:
    """``<search.index_dir>/<run>.h5``."""
    RunPaths.of(params.train, run)  # validates the run name (no '/', not empty)
    return Path(params.search.index_dir) / f"{run}.h5"


def build_command(run: str) -> str:
    return f"python src/index.py --run {run}"


def _load_model(path: Path, device: torch.device) -> tuple[RetrievalModel, dict[str, Any]]:
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
    params: Params, run: str, splits: Sequence[str] | None = None, *, progress: bool = False
) -> IndexReport:
    """Embed every clip and caption of ``splits`` with ``run``'s best model; write the index atomically."""
    started = time.perf_counter()
    splits = list(splits or params.search.splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise DataError(f"splits {unknown or splits}: expected some of {', '.join(SPLITS)}")
    splits = [s for s in SPLITS if s in splits]  # canonical order, no duplicates
    paths = RunPaths.of(params.train, run)
    device = resolve_device(params.search.device)
    model, info = _load_model(paths.best, device)
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
            max_frames=info["max_frames"],
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
    strings = h5py.string_dtype()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("clip_ids", data=np.array(clip_ids, dtype=object), dtype=strings)
        h5.create_dataset("splits", data=np.array(clip_splits, dtype=object), dtype=strings)
        h5.create_dataset("audio", data=np.concatenate(audio_parts, axis=1))
        h5.create_dataset("caption_offsets", data=np.asarray(offsets, np.int64))
        h5.create_dataset("captions", data=np.array(captions, dtype=object), dtype=strings)
        h5.create_dataset("caption_text", data=np.concatenate(text_parts, axis=1))
        h5.create_dataset("caption_weights", data=np.concatenate(weight_parts, axis=0))
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
        for key, value in attrs.items():
            h5.attrs[key] = value
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
                clip_ids=list(h5["clip_ids"].asstr()[()]),
                splits=np.asarray(h5["splits"].asstr()[()], dtype=object),
                audio=np.asarray(h5["audio"][()], np.float32),
                caption_offsets=np.asarray(h5["caption_offsets"][()], np.int64),
                captions=list(h5["captions"].asstr()[()]),
                caption_text=np.asarray(h5["caption_text"][()], np.float32),
                caption_weights=np.asarray(h5["caption_weights"][()], np.float32),
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
    return index


# ---------------------------------------------------------------- searching
@dataclass
class Hit:
    rank: int
    clip_id: str
    split: str
    score: float
    caption: str  # text search: the clip's first caption; audio search: the matched caption

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "clip_id": self.clip_id,
            "split": self.split,
            "score": self.score,
            "caption": self.caption,
        }


@dataclass
class TextResult:
    query: str
    oov: list[str]  # query words unknown to the word vectors (left out of the embedding)
    hits: list[Hit]


def _concat(embeddings: Tensor, weights: Tensor | None = None) -> Tensor:
    """[X, R, E] (+ weights [R, X]) -> [R, X*E], each expert block scaled by its weight."""
    if weights is not None:
        embeddings = embeddings * weights.t().unsqueeze(-1)
    experts, rows, dim = embeddings.shape
    return embeddings.permute(1, 0, 2).reshape(rows, experts * dim).contiguous()


class Searcher:
    """A model + its vector source + an index, ready to answer queries."""

    def __init__(
        self,
        model: RetrievalModel,
        source: VectorSource,
        index: SearchIndex,
        *,
        max_words: int,
        device: torch.device | str = "cpu",
        run: str = "",
        params: Params | None = None,
    ) -> None:
        if index.experts != list(model.experts):
            raise CheckpointError(
                f"index experts {index.experts} differ from the model's {list(model.experts)}"
            )
        self.model = model.eval()
        self.source = source
        self.index = index
        self.max_words = max_words
        self.device = torch.device(device)
        self.run = run
        self.params = params
        self.model.to(self.device)
        # The expert blocks side by side once, so every query is a single matmul.
        self.clips = _concat(torch.from_numpy(index.audio)).to(self.device)  # [N, X*E]
        self.caption_matrix = _concat(  # [M, X*E], each block already scaled by its caption's weight
            torch.from_numpy(index.caption_text), torch.from_numpy(index.caption_weights)
        ).to(self.device)
        self._caption_clip = index.caption_clip()

    # -------------------------------------------------------- opening from disk
    @classmethod
    def open(cls, params: Params, run: str) -> Searcher:
        """Load ``run``'s best model and index; refuse an index made by another model."""
        paths = RunPaths.of(params.train, run)
        path = index_path(params, run)
        if not path.exists():
            raise DataError(f"{path}: no search index for run {run!r}; build it with `{build_command(run)}`")
        index = load_index(path)
        if not paths.best.exists():
            raise CheckpointError(f"{paths.best}: checkpoint of run {run!r} not found (train the run first)")
        sha = sha256_file(paths.best)
        device = resolve_device(params.search.device)
        model, info = _load_model(paths.best, device)
        stale = []
        if index.attrs.get("checkpoint_sha256") != sha:
            stale.append(
                f"checkpoint sha256 {str(index.attrs.get('checkpoint_sha256'))[:12]}, now {sha[:12]}"
            )
        if index.attrs.get("params_hash") != info["params_hash"]:
            stale.append(f"params_hash {index.attrs.get('params_hash')}, now {info['params_hash']}")
        if stale:
            raise CheckpointError(
                f"{path} was built by a different model than {paths.best} ({'; '.join(stale)}): "
                f"its embeddings do not match; rebuild it with `{build_command(run)}`"
            )
        vectors = str(index.attrs.get("text_vectors") or info["text_vectors"])
        source = load_vectors(vectors, params.text, Layout(params.data.dataset, params.data.root))
        expected = str(index.attrs.get("text_vectors_hash", ""))
        if expected and source.vectors_hash != expected:
            raise DataError(
                f"text.vectors {vectors!r}: these word vectors (hash {source.vectors_hash}) are not the ones "
                f"the run was trained with (hash {expected}); queries would be embedded differently"
            )
        max_words = int(index.attrs.get("max_words", params.text.max_words))
        return cls(model, source, index, max_words=max_words, device=device, run=run, params=params)

    # -------------------------------------------------------- text queries
    def query_words(self, query: str) -> tuple[np.ndarray, list[str]]:
        """The query's word vectors [n, D] (as the embed_text stage embeds captions) and its OOV words."""
        if not query.strip():
            raise QueryError('empty query: describe a sound, e.g. "a dog barks then a car passes"')
        tokens = tokenize(query)
        if not tokens:
            raise QueryError(f"query {query!r} has no words (only punctuation or symbols)")
        found = self.source.embed_batch([tokens], self.max_words)[0]
        if not len(found.vectors):
            raise QueryError(
                f"no word of the query {query!r} is known to the word vectors {self.source.name!r}; "
                f"out of vocabulary: {', '.join(found.oov)}. Rephrase with common words"
            )
        return found.vectors, found.oov

    @torch.no_grad()
    def embed_texts(self, word_arrays: Sequence[np.ndarray]) -> Tensor:
        """Word-vector arrays -> weighted, concatenated text embeddings [B, X*E]."""
        words, mask = pad_words(list(word_arrays))
        embeddings, weights = self.model.encode_text(words.to(self.device), mask.to(self.device))
        stacked = torch.stack([embeddings[name].float() for name in self.model.experts])
        return _concat(stacked, weights.float())

    def _split_mask(self, split: str | None) -> Tensor | None:
        return None if split is None else self._clips_of(split)

    def _clips_of(self, split: str) -> Tensor:
        """[N] bool: the index's clips of ``split``; an error if it has none."""
        mask = torch.from_numpy(self.index.splits == split)
        if not bool(mask.any()):
            indexed = json.loads(self.index.attrs.get("indexed_splits", "[]"))
            raise DataError(
                f"split {split!r} is not in the index of run {self.run!r} (indexed: {', '.join(indexed)}); "
                f"rebuild it with `{build_command(self.run)} --split {split}`"
            )
        return mask.to(self.device)

    @torch.no_grad()
    def top_clips(self, queries: Tensor, top_k: int, split: str | None = None) -> tuple[Tensor, Tensor]:
        """Exact top-k clips of embedded queries [B, X*E]: (scores [B, k], clip indices [B, k])."""
        mask = self._split_mask(split)
        k = min(top_k, len(self.index.clip_ids) if mask is None else int(mask.sum()))
        scores, indices = [], []
        for start in range(0, queries.shape[0], _QUERY_CHUNK):
            sim = queries[start : start + _QUERY_CHUNK] @ self.clips.t()  # [b, N]
            if mask is not None:
                sim = sim.masked_fill(~mask, float("-inf"))
            top = torch.topk(sim, k, dim=1)
            scores.append(top.values.cpu())
            indices.append(top.indices.cpu())
        return torch.cat(scores), torch.cat(indices)

    def search_text(
        self, queries: Sequence[str], top_k: int = 10, split: str | None = None
    ) -> list[TextResult]:
        """Clips for each text query, best first (one batched forward pass and matmul)."""
        if not queries:
            raise QueryError("no query given")
        looked_up = [self.query_words(q) for q in queries]
        scores, indices = self.top_clips(self.embed_texts([w for w, _ in looked_up]), top_k, split)
        results = []
        for q, (_, oov), row_scores, row_indices in zip(queries, looked_up, scores, indices, strict=True):
            hits = [
                Hit(
                    rank,
                    self.index.clip_ids[c],
                    str(self.index.splits[c]),
                    float(s),
                    self.index.first_caption(c),
                )
                for rank, (s, c) in enumerate(
                    zip(row_scores.tolist(), row_indices.tolist(), strict=True), start=1
                )
            ]
            results.append(TextResult(q, list(oov), hits))
        return results

    # -------------------------------------------------------- audio queries
    def audio_features(self, path: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
        """One file -> expert -> (frames [1, max_frames, D], mask), extracted as the extract stage does."""
        if self.params is None:
            raise AtricError("audio search needs the params (features.<expert> settings)")
        max_frames = json.loads(self.index.attrs["max_frames"])
        stored = json.loads(self.index.attrs.get("feature_settings", "{}"))
        dims = self.model.config()["expert_dims"]
        waveforms: dict[int, np.ndarray] = {}
        batch = {}
        for name in self.model.experts:
            expert = build_expert(name, self.params.features.expert_settings(name), self.device)
            settings = json.dumps(expert.settings(), sort_keys=True)
            if stored.get(name) and stored[name] != settings:
                raise DataError(
                    f"features.{name}: the settings now ({settings}) differ from those the indexed features "
                    f"were extracted with ({stored[name]}); restore them to search by audio"
                )
            if expert.sample_rate not in waveforms:
                waveforms[expert.sample_rate] = load_audio(path, expert.sample_rate)
            frames = expert.embed([waveforms[expert.sample_rate]])[0]
            if frames.shape[1] != dims[name]:
                raise DataError(
                    f"features.{name}: the expert gives dim {frames.shape[1]}, the model expects {dims[name]}"
                )
            batch.update(frames_to_batch({name: frames}, max_frames))
        return batch

    @torch.no_grad()
    def search_audio(self, path: str | Path, top_k: int = 10, split: str | None = None) -> list[Hit]:
        """Captions of the index that best describe the sound in ``path``, best first."""
        features = self.audio_features(path)
        embedded = self.model.encode_audio(
            {k: (x.to(self.device), m.to(self.device)) for k, (x, m) in features.items()}
        )
        query = torch.cat([embedded[name].float() for name in self.model.experts], dim=1)  # [1, X*E]
        sim = (self.caption_matrix @ query.t()).squeeze(1)  # [M]
        if split is not None:
            clip_mask = self._clips_of(split).cpu().numpy()
            sim = sim.masked_fill(
                ~torch.from_numpy(clip_mask[self._caption_clip]).to(sim.device), float("-inf")
            )
            allowed = int(clip_mask[self._caption_clip].sum())
        else:
            allowed = sim.shape[0]
        top = torch.topk(sim, min(top_k, allowed))
        hits = []
        for rank, (s, m) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), start=1):
            c = int(self._caption_clip[m])
            hits.append(
                Hit(rank, self.index.clip_ids[c], str(self.index.splits[c]), float(s), self.index.captions[m])
            )
        return hits

    # -------------------------------------------------------- the "done when" rate
    def caption_hits(self, split: str = "val", k: int = 10) -> tuple[int, int, int]:
        """(captions whose own clip is in the top k, captions, captions with no known word).

        Each caption of ``split`` is a query through the user's path (tokenise, word vectors,
        text branch) against that split's clips; captions with no known word count as misses.
        """
        mask = self._clips_of(split).cpu().numpy()
        clip_of = self._caption_clip
        rows = [m for m in range(len(self.index.captions)) if mask[clip_of[m]]]
        hits = unknown = 0
        for start in range(0, len(rows), _QUERY_CHUNK):
            chunk = rows[start : start + _QUERY_CHUNK]
            lookups = self.source.embed_batch(
                [tokenize(self.index.captions[m]) for m in chunk], self.max_words
            )
            usable = [
                (m, found.vectors) for m, found in zip(chunk, lookups, strict=True) if len(found.vectors)
            ]
            unknown += len(chunk) - len(usable)
            if not usable:
                continue
            _, indices = self.top_clips(self.embed_texts([v for _, v in usable]), k, split)
            targets = torch.tensor([int(clip_of[m]) for m, _ in usable]).unsqueeze(1)
            hits += int((indices == targets).any(dim=1).sum())
        return hits, len(rows), unknown


def caption_hit_rate(params: Params, run: str, split: str = "val", k: int = 10) -> float:
    """Fraction of ``split``'s captions that, used as a text query, find their own clip in the top k."""
    hits, total, _ = Searcher.open(params, run).caption_hits(split, k)
    if total == 0:
        raise DataError(f"split {split!r}: no captions in the index of run {run!r}")
    return hits / total


# ---------------------------------------------------------------- printing
def format_table(hits: Sequence[Hit]) -> str:
    """rank, clip id, split, score, caption as aligned columns."""
    if not hits:
        return "(no results)"
    headers = ("rank", "clip", "split", "score", "caption")
    rows = [(str(h.rank), h.clip_id, h.split, f"{h.score:.4f}", h.caption) for h in hits]
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(4)]
    right = (True, False, False, True)

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells[:4], widths, right, strict=True)]
        return "  ".join([*parts, cells[4]]).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


__all__ = [
    "Hit",
    "IndexReport",
    "QueryError",
    "SearchIndex",
    "Searcher",
    "TextResult",
    "build_index",
    "caption_hit_rate",
    "format_table",
    "index_path",
    "load_index",
]
