"""Answering queries over an index: text -> clips, sound -> captions, inner products
(see ``atric.search.index`` for the scores and the file).

Text -> clips scans every clip (exact) unless the index has an approximate index
(``atric.search.ann``, from ``EXACT_BELOW`` clips on); then a query scans the lists it
probes, and a split filter narrower than the threshold scans that split's clips exactly.
Sound -> captions is exact, and collapses captions of the same text (``normalize_caption``)
into their best-scoring one, saying how many other clips share it (``Hit.other_clips``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from atric.audio import check_audio_file, load_audio
from atric.config import Params
from atric.data import pad_words
from atric.device import resolve_device
from atric.embed import frames_to_batch
from atric.engine import RunPaths
from atric.errors import AtricError, CheckpointError, DataError
from atric.features.base import build_expert, sha256_file
from atric.layout import Layout
from atric.model import RetrievalModel
from atric.search.index import SearchIndex, build_command, index_path, load_index, load_run_model
from atric.text import VectorSource, load_vectors, tokenize

_QUERY_CHUNK = 256  # queries scored at once: bounds the [B, N] score matrix


class QueryError(AtricError):
    """A query that cannot be searched (empty, no known word)."""


# ---------------------------------------------------------------- searching

log = logging.getLogger("atric.search")
# Audio beyond the last frame the model sees, kept so that frame's window is complete (longer
# than any expert's analysis window: aisfx blocks ~2.3 s, YAMNet/VGGish patches 0.96 s).
QUERY_WINDOW_MARGIN_SECONDS = 3.0


def max_query_seconds(max_frames: Mapping[str, int], hop_seconds: Mapping[str, float]) -> float:
    """How much of a query file the model uses: each expert's padded length times its hop, plus margin."""
    return max(max_frames[n] * float(hop_seconds[n]) for n in max_frames) + QUERY_WINDOW_MARGIN_SECONDS


def read_query_audio(path: str | Path, sample_rate: int, max_seconds: float) -> np.ndarray:
    """The first ``max_seconds`` of a query file, mono at ``sample_rate``; only that much is decoded.

    Files soundfile can read are cut while reading (``frames=``); others (mp3 without libsndfile
    support) go through ``atric.audio.load_audio`` and are cut after decoding. A cut is logged.
    """
    import soundfile as sf

    path = Path(path)
    check_audio_file(path, str(path))  # before opening: a FIFO would block sf.info forever
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        audio = load_audio(path, sample_rate)
        total = audio.shape[0] / sample_rate
        keep = min(audio.shape[0], math.ceil(max_seconds * sample_rate))
        audio = audio[:keep]
    else:
        total = info.frames / info.samplerate if info.samplerate else 0.0
        keep = min(info.frames, math.ceil(max_seconds * info.samplerate))
        if keep < info.frames:
            try:
                audio, rate = sf.read(str(path), frames=keep, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise DataError(f"{path}: cannot read audio: {exc}") from exc
            if audio.size == 0 or not np.isfinite(audio).all():
                raise DataError(f"{path}: audio is empty or holds NaN/inf samples")
            audio = audio.mean(axis=1)
            if rate != sample_rate:
                import librosa

                audio = librosa.resample(audio, orig_sr=rate, target_sr=sample_rate, res_type="soxr_hq")
            audio = np.ascontiguousarray(audio, dtype=np.float32)
        else:
            audio = load_audio(path, sample_rate)
    if total > max_seconds:
        log.warning(
            "%s: %.1f s long; only its first %.1f s are used (what the model sees of a clip: "
            "the index's max_frames x each expert's hop)", path, total, max_seconds,
        )  # fmt: skip
    return audio


@dataclass
class Hit:
    rank: int
    clip_id: str
    split: str
    score: float
    caption: str  # text search: the clip's first caption; audio search: the matched caption
    # Audio search: how many other clips (of the split searched) have a caption of the same text.
    other_clips: int | None = None

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "rank": self.rank,
            "clip_id": self.clip_id,
            "split": self.split,
            "score": self.score,
            "caption": self.caption,
        }
        if self.other_clips is not None:
            result["other_clips"] = self.other_clips
        return result


@dataclass
class TextResult:
    query: str
    oov: list[str]  # query words unknown to the word vectors (left out of the embedding)
    hits: list[Hit]


@dataclass
class _Split:
    clips: Tensor  # [N] bool
    # [1, N] 0 for the split's clips, -inf for the others: added to the scores, which costs
    # ~1000x less than masked_fill on 2 threads (15 ms at 10^5 clips, as much as the matmul).
    bias: Tensor
    count: int


def normalize_caption(text: str) -> str:
    """The form in which two captions are the same text: outer and repeated spaces and case ignored."""
    return " ".join(text.split()).casefold()


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
        self._splits: dict[str, _Split] = {}
        self._split_clips: dict[str, tuple[Tensor, Tensor]] = {}  # narrow splits of an approximate index

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
        model, info = load_run_model(paths.best, device)
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

    def _clips_of(self, split: str) -> Tensor:
        """[N] bool: the index's clips of ``split``; an error if it has none."""
        return self._split(split).clips

    def _split(self, split: str) -> _Split:
        """A split's masks, once a split: comparing 10^6 split names takes longer than a search."""
        if split not in self._splits:
            mask = torch.from_numpy(self.index.splits == split)
            if not bool(mask.any()):
                indexed = json.loads(self.index.attrs.get("indexed_splits", "[]"))
                raise DataError(
                    f"split {split!r} is not in the index of run {self.run!r} (indexed: {', '.join(indexed)}); "
                    f"rebuild it with `{build_command(self.run)} --split {split}`"
                )
            mask = mask.to(self.device)
            bias = torch.zeros(1, len(mask), device=self.device).masked_fill(~mask, float("-inf"))
            self._splits[split] = _Split(mask, bias, int(mask.sum()))
        return self._splits[split]

    @torch.no_grad()
    def top_clips(self, queries: Tensor, top_k: int, split: str | None = None) -> tuple[Tensor, Tensor]:
        """Top-k clips of embedded queries [B, X*E]: (scores [B, k], clip indices [B, k]); exact
        unless the index has an approximate index and the clips searched are that many."""
        searched = len(self.index.clip_ids) if split is None else self._split(split).count
        k = min(top_k, searched)
        ann = self.index.ann
        if ann is None:
            return self._exact_top(queries, k, split)
        if searched >= ann.info.exact_below:
            return self._approximate_top(queries, k, split)
        assert split is not None  # fewer clips than the threshold: only a split can be
        return self._exact_top_of_split(queries, k, split)

    def _exact_top(self, queries: Tensor, k: int, split: str | None) -> tuple[Tensor, Tensor]:
        """Every clip scored: one [b, N] matmul per chunk of queries."""
        bias = None if split is None else self._split(split).bias
        scores, indices = [], []
        for start in range(0, queries.shape[0], _QUERY_CHUNK):
            sim = queries[start : start + _QUERY_CHUNK] @ self.clips.t()  # [b, N]
            if bias is not None:
                sim += bias  # the split's scores unchanged (x + 0), the others -inf
            top = torch.topk(sim, k, dim=1)
            scores.append(top.values.cpu())
            indices.append(top.indices.cpu())
        return torch.cat(scores), torch.cat(indices)

    def _approximate_top(self, queries: Tensor, k: int, split: str | None) -> tuple[Tensor, Tensor]:
        assert self.index.ann is not None
        allowed = None if split is None else self._split(split).clips.cpu().numpy()
        scores, rows = self.index.ann.search(queries.float().cpu().numpy(), k, allowed)
        found_scores, found = torch.from_numpy(scores), torch.from_numpy(rows)
        short = (found < 0).any(dim=1)  # fewer than k clips of the split in the lists probed
        if bool(short.any()):
            found_scores[short], found[short] = self._exact_top(queries[short.to(queries.device)], k, split)
        return found_scores, found

    def _exact_top_of_split(self, queries: Tensor, k: int, split: str) -> tuple[Tensor, Tensor]:
        """A split narrower than the approximate index's threshold: its own clips, scanned."""
        if split not in self._split_clips:  # at most threshold x X*E floats a split, kept
            rows = torch.from_numpy(np.flatnonzero(self.index.splits == split)).to(self.device)
            self._split_clips[split] = (rows, self.clips[rows])
        rows, clips = self._split_clips[split]
        scores, indices = [], []
        for start in range(0, queries.shape[0], _QUERY_CHUNK):
            top = torch.topk(queries[start : start + _QUERY_CHUNK] @ clips.t(), k, dim=1)
            scores.append(top.values.cpu())
            indices.append(rows[top.indices].cpu())
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
        experts = {}
        for name in self.model.experts:
            expert = build_expert(name, self.params.features.expert_settings(name), self.device)
            settings = json.dumps(expert.settings(), sort_keys=True)
            if stored.get(name) and stored[name] != settings:
                raise DataError(
                    f"features.{name}: the settings now ({settings}) differ from those the indexed features "
                    f"were extracted with ({stored[name]}); restore them to search by audio"
                )
            experts[name] = expert
        # The model sees each expert's first max_frames frames: read no more audio than that covers.
        seconds = max_query_seconds(
            {n: int(max_frames[n]) for n in experts}, {n: e.hop_seconds for n, e in experts.items()}
        )
        waveforms: dict[int, np.ndarray] = {}
        batch = {}
        for name, expert in experts.items():
            if expert.sample_rate not in waveforms:
                waveforms[expert.sample_rate] = read_query_audio(path, expert.sample_rate, seconds)
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
        return self.top_captions(query, top_k, split)

    @torch.no_grad()
    def top_captions(self, query: Tensor, top_k: int, split: str | None = None) -> list[Hit]:
        """The ``top_k`` best distinct caption texts for an embedded sound [1, X*E] (fewer only if
        the captions searched have fewer): each text's best-scoring caption, ties to the first in
        the index, with how many other clips have a caption of that text."""
        sim = (self.caption_matrix @ query.t()).squeeze(1)  # [M]
        caption_mask = None
        if split is not None:
            caption_mask = self._clips_of(split).cpu().numpy()[self._caption_clip]
            sim = sim.masked_fill(~torch.from_numpy(caption_mask).to(sim.device), float("-inf"))
        return self._distinct_captions(sim, top_k, caption_mask)

    @cached_property
    def _caption_texts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Captions grouped by ``normalize_caption``: (group [M] of each caption, start [G+1] of
        each group in the next, caption indices [M] ordered by group, then index)."""
        groups: dict[str, int] = {}
        captions = self.index.captions
        group = np.fromiter(
            (groups.setdefault(normalize_caption(c), len(groups)) for c in captions), np.int64, len(captions)
        )
        order = np.argsort(group, kind="stable")
        return group, np.searchsorted(group[order], np.arange(len(groups) + 1)), order

    def _distinct_captions(self, sim: Tensor, top_k: int, caption_mask: np.ndarray | None) -> list[Hit]:
        group, starts, order = self._caption_texts
        searched = sim.shape[0] if caption_mask is None else int(caption_mask.sum())
        # Deep enough that repeats rarely force a second pass; each pass looks 4x deeper.
        depth = min(searched, 4 * top_k)
        while True:
            texts: dict[int, None] = {}  # groups, best first
            for m in torch.topk(sim, depth).indices.tolist():
                texts.setdefault(int(group[m]))
                if len(texts) == top_k:
                    break
            if len(texts) == top_k or depth == searched:
                break
            depth = min(searched, 4 * depth)
        scores = sim.cpu().numpy()
        hits = []
        for rank, g in enumerate(texts, start=1):
            members = order[starts[g] : starts[g + 1]]
            if caption_mask is not None:
                members = members[caption_mask[members]]
            best = int(members[np.argmax(scores[members])])
            c = int(self._caption_clip[best])
            others = len(np.unique(self._caption_clip[members])) - 1
            hits.append(
                Hit(
                    rank,
                    self.index.clip_ids[c],
                    str(self.index.splits[c]),
                    float(scores[best]),
                    self.index.captions[best],
                    others,
                )
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
