"""Embedding a corpus's captions with a vector source, and the OOV report (the embed_text stage)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from atric.atomic import write_text_atomic
from atric.config import TextParams
from atric.errors import DataError
from atric.layout import SPLITS, Layout, read_index, vectors_slug, write_text_embeddings
from atric.text.tokenize import TOKENIZER_VERSION, tokenize
from atric.text.vectors import Lookup, VectorSource, load_vectors


# ---------------------------------------------------------------- embedding captions
@dataclass
class SplitReport:
    clips: int = 0
    captions: int = 0
    tokens: int = 0
    oov_tokens: int = 0
    captions_with_oov: int = 0
    empty_captions: int = 0  # no known word: embedded as the unk row (on_empty: unk)
    truncated_captions: int = 0  # more than max_words known words
    top_oov: dict[str, int] = field(default_factory=dict)
    path: str = ""

    @property
    def oov_token_rate(self) -> float:
        return self.oov_tokens / self.tokens if self.tokens else 0.0

    @property
    def oov_caption_rate(self) -> float:
        return self.captions_with_oov / self.captions if self.captions else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "oov_token_rate": self.oov_token_rate,
            "oov_caption_rate": self.oov_caption_rate,
        }


@dataclass
class TextReport:
    dataset: str
    vectors: str
    slug: str
    dim: int
    vectors_hash: str
    max_words: int
    on_empty: str
    tokenizer: str
    seconds: float = 0.0
    splits: dict[str, SplitReport] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # No wall time in the file: it is a DVC output, and the same inputs must give the same bytes.
        doc = {k: v for k, v in asdict(self).items() if k not in ("splits", "seconds")}
        doc["splits"] = {name: s.to_dict() for name, s in self.splits.items()}
        return doc


TOP_OOV = 20
_CHUNK_CAPTIONS = 256  # captions per embed_batch call (MiniLM batches within it)


def _with_fallback(source: VectorSource, found: Lookup, text: TextParams, where: str) -> np.ndarray:
    """The caption's vectors, or (no known word) an error or the one-row unk fallback."""
    if len(found.vectors):
        return found.vectors
    if text.on_empty == "raise":
        raise DataError(
            f"{where} has no word known to the vectors {source.name!r} "
            f"(out of vocabulary: {found.oov or 'no words at all'}); "
            "fix the caption, use other vectors, or set text.on_empty=unk"
        )
    return source.unk_vector()[None, :]


def embed_caption(source: VectorSource, caption: str, text: TextParams) -> np.ndarray:
    """One caption or search query -> float32 [n_words, dim], exactly as the stage embeds captions."""
    found = source.embed_batch([tokenize(caption)], text.max_words)[0]
    return _with_fallback(source, found, text, f"caption {caption!r}")


def embed_split(
    layout: Layout, source: VectorSource, split: str, text: TextParams, *, progress: bool = False
) -> tuple[dict[str, list[np.ndarray]], dict[str, list[str]], SplitReport]:
    """Embed one split's captions: ({clip: [arrays]}, {clip: [captions]}, its report)."""
    clips = read_index(layout.index_path(split), split)
    report = SplitReport(clips=len(clips))
    embeddings: dict[str, list[np.ndarray]] = {}
    captions: dict[str, list[str]] = {}
    oov_counter: Counter[str] = Counter()
    with tqdm(total=len(clips), desc=f"embed {split}", unit="clip", disable=not progress) as bar:
        start = 0
        while start < len(clips):
            chunk, n = [], 0
            while start < len(clips) and (not chunk or n + len(clips[start].captions) <= _CHUNK_CAPTIONS):
                chunk.append(clips[start])
                n += len(clips[start].captions)
                start += 1
            flat = [(clip, caption) for clip in chunk for caption in clip.captions]
            lookups = source.embed_batch([tokenize(c) for _, c in flat], text.max_words)
            for (clip, caption), found in zip(flat, lookups, strict=True):
                report.captions += 1
                report.tokens += found.n_tokens
                report.oov_tokens += len(found.oov)
                report.captions_with_oov += bool(found.oov)
                report.truncated_captions += found.truncated
                oov_counter.update(found.oov)
                report.empty_captions += not len(found.vectors)
                vectors = _with_fallback(
                    source, found, text, f"{split} clip {clip.clip_id!r}: caption {caption!r}"
                )
                embeddings.setdefault(clip.clip_id, []).append(vectors)
                captions.setdefault(clip.clip_id, []).append(caption)
            bar.update(len(chunk))
    report.top_oov = dict(oov_counter.most_common(TOP_OOV))
    return embeddings, captions, report


def embed_captions(
    layout: Layout,
    vectors: str | VectorSource,
    splits: Sequence[str] | str = SPLITS,
    text: TextParams | None = None,
    *,
    progress: bool = False,
) -> TextReport:
    """Embed every caption of ``splits``; write one HDF5 per split and the JSON report.

    ``vectors`` is a ``text.vectors`` value or an already loaded source (then its name
    names the output files). Each split's file is written atomically once it is complete.
    """
    text = text or TextParams()
    split_list = [splits] if isinstance(splits, str) else list(splits)
    for split in split_list:  # fail on a missing/bad index before the slow vector load
        read_index(layout.index_path(split), split)
    started = time.perf_counter()
    source = load_vectors(vectors, text, layout) if isinstance(vectors, str) else vectors
    spec = vectors if isinstance(vectors, str) else source.name
    report = TextReport(
        dataset=layout.dataset,
        vectors=spec,
        slug=vectors_slug(spec),
        dim=source.dim,
        vectors_hash=source.vectors_hash,
        max_words=text.max_words,
        on_empty=text.on_empty,
        tokenizer=TOKENIZER_VERSION,
    )
    for split in split_list:
        embeddings, captions, split_report = embed_split(layout, source, split, text, progress=progress)
        path = layout.text_path(spec, split)
        attrs = {
            "vectors": spec,
            "vectors_hash": report.vectors_hash,
            "dim": source.dim,
            "max_words": text.max_words,
            "on_empty": text.on_empty,
            "tokenizer": TOKENIZER_VERSION,
            "split": split,
            "oov_token_rate": split_report.oov_token_rate,
            "empty_captions": split_report.empty_captions,
        }
        write_text_embeddings(path, embeddings, attrs, captions=captions)
        split_report.path = str(path)
        report.splits[split] = split_report
    report.seconds = round(time.perf_counter() - started, 3)
    write_text_atomic(layout.text_report_path(spec), json.dumps(report.to_dict(), indent=1) + "\n")
    return report


def format_report(report: TextReport) -> str:
    """A few human lines for the CLI."""
    lines = [
        f"{report.dataset}: {report.vectors} ({report.dim}-d, hash {report.vectors_hash}), "
        f"max_words={report.max_words}, {report.seconds:.1f} s"
    ]
    for name, s in report.splits.items():
        top = ", ".join(f"{w} ({n})" for w, n in list(s.top_oov.items())[:8]) or "none"
        lines.append(
            f"  {name:5s} {s.clips} clips, {s.captions} captions: OOV tokens {100 * s.oov_token_rate:.2f}% "
            f"({s.oov_tokens}/{s.tokens}), captions with OOV {100 * s.oov_caption_rate:.2f}%, "
            f"empty {s.empty_captions}, truncated {s.truncated_captions}; top OOV: {top}"
        )
        lines.append(f"        -> {s.path}")
    return "\n".join(lines)
