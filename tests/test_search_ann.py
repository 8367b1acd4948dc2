"""Approximate clip search (atric.search.ann) and caption collapsing, on synthetic indexes.

No model is trained here: the index holds clustered unit-norm clip embeddings (a Gaussian
mixture, as real embeddings cluster) and the searcher is given embedded queries directly
(``top_clips``, ``top_captions``), so each test runs in well under a second. The on-disk
path through the index stage is tested on a trained run in test_search.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors

from atric.errors import DataError
from atric.model import RetrievalModel
from atric.search import Hit, Searcher, SearchIndex, format_table
from atric.search.ann import NPROBE, ApproximateIndex, ann_path, clip_rows
from atric.text import KeyedVectorSource

DIM = 32
CLIPS = 4000
THRESHOLD = 1000  # lowered from EXACT_BELOW so a few thousand clips take the approximate path
SPLITS = np.array(["train"] * 2600 + ["val"] * 600 + ["test"] * 800, dtype=object)

pytestmark = pytest.mark.usefixtures("one_thread")


def mixture(rng: np.random.Generator, centres: np.ndarray, count: int, spread: float = 0.6) -> np.ndarray:
    """Unit-norm draws around random centres: each row is a centre plus Gaussian noise."""
    rows = centres[rng.integers(0, len(centres), count)]
    rows = rows + spread * rng.standard_normal((count, DIM)).astype(np.float32) / np.sqrt(DIM)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def synthetic_index(audio: np.ndarray, captions: list[str] | None = None) -> SearchIndex:
    """An index of clips [1, N, E] (one expert); one caption a clip unless given."""
    clips = audio.shape[1]
    captions = captions if captions is not None else [f"caption {i}" for i in range(clips)]
    per_clip = len(captions) // clips
    return SearchIndex(
        clip_ids=[f"clip_{i:05d}" for i in range(clips)],
        splits=SPLITS[:clips] if clips == len(SPLITS) else np.array(["train"] * clips, dtype=object),
        audio=audio,
        caption_offsets=np.arange(0, clips * per_clip + 1, per_clip),
        captions=captions,
        caption_text=np.zeros((1, len(captions), audio.shape[2]), np.float32),
        caption_weights=np.ones((len(captions), 1), np.float32),
        attrs={"experts": json.dumps(["fa"]), "indexed_splits": json.dumps(["train", "val", "test"])},
    )


def searcher_of(index: SearchIndex) -> Searcher:
    model = RetrievalModel(
        {"fa": 4},
        4,
        audio_pooling="mean",
        text_pooling="mean",
        embed_dim=DIM,
        audio_clusters=2,
        text_clusters=2,
        ghost_clusters=0,
        lstm_hidden=4,
        fusion="uniform",
    )
    return Searcher(model, KeyedVectorSource("none", KeyedVectors(4)), index, max_words=8)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return {"clips": mixture(rng, centres, CLIPS)[None], "queries": mixture(rng, centres, 64)}


@pytest.fixture(scope="module")
def ann(data: dict[str, np.ndarray]) -> ApproximateIndex:
    return ApproximateIndex.build(clip_rows(data["clips"]), exact_below=THRESHOLD)


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def counting(monkeypatch: pytest.MonkeyPatch, ann: ApproximateIndex) -> list[int]:
    """Count the approximate index's searches (to know which path answered)."""
    calls: list[int] = []
    search = ann.search

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return search(*args, **kwargs)

    monkeypatch.setattr(ann, "search", spy)
    return calls


# ---------------------------------------------------------------- approximate clip search
def test_approximate_recall_against_exact(
    data: dict[str, np.ndarray], ann: ApproximateIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    exact = searcher_of(synthetic_index(data["clips"]))
    approximate = searcher_of(synthetic_index(data["clips"]))
    approximate.index.ann = ann
    calls = counting(monkeypatch, ann)
    queries = torch.from_numpy(data["queries"])
    true_scores, truth = exact.top_clips(queries, 10)
    scores, found = approximate.top_clips(queries, 10)
    assert calls == [1]  # answered by the lists, not by the matmul
    assert ann.info.lists == 63 and ann.nprobe < ann.info.lists  # sqrt(4000): not a full scan
    assert recall(found, truth) >= 0.95
    # The scores of the clips found are their exact inner products, best first.
    rows = clip_rows(data["clips"])
    np.testing.assert_allclose(
        scores.numpy(), np.einsum("bd,bkd->bk", data["queries"], rows[found.numpy()]), atol=1e-5
    )
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    assert scores.dtype == true_scores.dtype and found.dtype == truth.dtype == torch.int64
    # Probing one list finds less: the lists, not a hidden full scan, answered.
    ann.nprobe = 1
    try:
        assert recall(approximate.top_clips(queries, 10)[1], truth) < 0.95
    finally:
        ann.nprobe = NPROBE


def test_split_filters_on_an_approximate_index(
    data: dict[str, np.ndarray], ann: ApproximateIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    exact = searcher_of(synthetic_index(data["clips"]))
    approximate = searcher_of(synthetic_index(data["clips"]))
    approximate.index.ann = ann
    calls = counting(monkeypatch, ann)
    queries = torch.from_numpy(data["queries"])
    # train (2600 clips >= the threshold): the lists, filtered to train.
    _, truth = exact.top_clips(queries, 10, split="train")
    _, found = approximate.top_clips(queries, 10, split="train")
    assert calls == [1] and set(SPLITS[found.numpy().ravel()]) == {"train"}
    assert recall(found, truth) >= 0.95
    # val (600 clips < the threshold): its own clips scanned, exactly as the exact search.
    true_scores, truth = exact.top_clips(queries, 10, split="val")
    scores, found = approximate.top_clips(queries, 10, split="val")
    assert calls == [1] and torch.equal(found, truth)
    np.testing.assert_allclose(scores.numpy(), true_scores.numpy(), atol=1e-6)


def test_too_few_clips_in_the_lists_probed_fall_back_to_a_scan(
    data: dict[str, np.ndarray], ann: ApproximateIndex
) -> None:
    """One list probed holds ~40 train clips: a top 100 of train is filled by scanning."""
    exact = searcher_of(synthetic_index(data["clips"]))
    approximate = searcher_of(synthetic_index(data["clips"]))
    approximate.index.ann = ann
    queries = torch.from_numpy(data["queries"][:4])
    ann.nprobe = 1
    try:
        _, raw = ann.search(data["queries"][:4], 100, SPLITS == "train")
        assert (raw < 0).any()  # what the lists alone give
        scores, found = approximate.top_clips(queries, 100, split="train")
    finally:
        ann.nprobe = NPROBE
    true_scores, truth = exact.top_clips(queries, 100, split="train")
    assert torch.equal(found, truth)
    np.testing.assert_allclose(scores.numpy(), true_scores.numpy(), atol=1e-6)


def test_file_round_trip_is_safe_and_deterministic(
    data: dict[str, np.ndarray], ann: ApproximateIndex, tmp_path: Path
) -> None:
    path = ann_path(tmp_path / "run.h5")
    assert path.name == "run.faiss"
    info = ann.write(path)
    assert info.file == "run.faiss" and info.bytes == path.stat().st_size
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, renamed
    loaded = ApproximateIndex.read(path, info, data["clips"])
    assert isinstance(loaded.index, faiss.IndexIVFFlat) and loaded.info == info
    before = ann.search(data["queries"], 10)
    after = loaded.search(data["queries"], 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    # The same clips build the same index, byte for byte.
    again = ApproximateIndex.build(clip_rows(data["clips"]), exact_below=THRESHOLD)
    assert np.array_equal(faiss.serialize_index(again.index), faiss.serialize_index(ann.index))


def test_a_file_that_is_not_this_index_is_refused(
    data: dict[str, np.ndarray], ann: ApproximateIndex, tmp_path: Path
) -> None:
    path = tmp_path / "run.faiss"
    info = ann.write(path)
    other = data["clips"].copy()
    other[0, ::7] = np.roll(other[0, ::7], 1, axis=0)  # other embeddings, same shapes
    with pytest.raises(DataError, match="holds other clip embeddings"):
        ApproximateIndex.read(path, info, other)
    with pytest.raises(DataError, match="not the approximate index"):
        ApproximateIndex.read(path, info, data["clips"][:, :-1])
    path.write_bytes(path.read_bytes()[: info.bytes // 2])
    with pytest.raises(DataError, match="bytes, the index says"):
        ApproximateIndex.read(path, info, data["clips"])
    path.write_bytes(b"\0" * info.bytes)
    with pytest.raises(DataError, match="not a readable faiss index"):
        ApproximateIndex.read(path, info, data["clips"])
    path.unlink()
    with pytest.raises(DataError, match="approximate index missing"):
        ApproximateIndex.read(path, info, data["clips"])


# ---------------------------------------------------------------- collapsing caption texts
def caption_index() -> tuple[Searcher, torch.Tensor]:
    """12 clips, 2 captions each; caption embeddings by text, so equal texts score equally."""
    texts = {
        "a dog barks": 1.0,
        "rain falls": 0.9,
        "a bell rings": 0.8,
        "a car passes": 0.7,
        "birds sing": 0.6,
    }
    captions = []
    for clip in range(12):
        if clip < 7:
            captions += [
                ["a dog barks", "A  dog barks "][clip % 2],
                "rain falls" if clip == 0 else "a dog barks",
            ]
        elif clip < 9:
            captions += ["rain falls", "a bell rings"]
        else:
            captions += ["a car passes", "birds sing" if clip == 11 else "a car passes"]
    query = torch.zeros(1, DIM)
    query[0, 0] = 1.0
    index = synthetic_index(np.eye(12, DIM, dtype=np.float32)[None], captions)
    index.splits = np.array(["train"] * 8 + ["val"] * 4, dtype=object)
    index.caption_text = np.zeros((1, len(captions), DIM), np.float32)
    for m, caption in enumerate(captions):
        index.caption_text[0, m, 0] = texts[" ".join(caption.split()).lower()]
    return searcher_of(index), query


def test_audio_results_collapse_identical_caption_texts() -> None:
    searcher, query = caption_index()
    hits = searcher.top_captions(query, 3)
    # "a dog barks" is 13 of the 24 captions: without collapsing it would fill the top 3.
    assert [h.caption for h in hits] == ["a dog barks", "rain falls", "a bell rings"]
    assert [h.rank for h in hits] == [1, 2, 3]
    assert [h.score for h in hits] == pytest.approx([1.0, 0.9, 0.8])
    # The first caption of that text in the index (ties), and the other clips that share it:
    # clips 0-6 say it (in two spellings), clip 0 is the hit.
    assert hits[0].clip_id == "clip_00000" and hits[0].other_clips == 6
    assert hits[1].clip_id == "clip_00000" and hits[1].other_clips == 2  # clips 0, 7, 8
    assert hits[2].clip_id == "clip_00007" and hits[2].other_clips == 1
    assert hits[0].to_dict()["other_clips"] == 6
    # Deeper than 4 x k captions: 5 distinct texts exist, all 5 are given; no more than that.
    assert [h.caption for h in searcher.top_captions(query, 5)][-1] == "birds sing"
    assert len(searcher.top_captions(query, 8)) == 5


def test_collapsed_counts_stay_within_the_split() -> None:
    searcher, query = caption_index()
    hits = searcher.top_captions(query, 5, split="val")
    assert [h.caption for h in hits] == ["rain falls", "a bell rings", "a car passes", "birds sing"]
    # "rain falls" is also said of clips 0 and 7, both train; "a car passes" of val's 9, 10, 11.
    assert [h.other_clips for h in hits] == [0, 0, 2, 0]
    assert [h.clip_id for h in hits] == ["clip_00008", "clip_00008", "clip_00009", "clip_00011"]
    assert all(h.split == "val" for h in hits)


def test_table_and_text_hits_show_other_clips_only_for_sound_queries() -> None:
    searcher, query = caption_index()
    table = format_table(searcher.top_captions(query, 3)).splitlines()
    assert table[1].endswith("a dog barks (+6 other clips)")
    assert table[3].endswith("a bell rings (+1 other clip)")
    single = format_table([Hit(1, "c", "val", 0.5, "birds sing", 0)]).splitlines()[1]
    assert single.endswith("birds sing")
    assert "other_clips" not in Hit(1, "c", "val", 0.5, "a text hit").to_dict()


def test_the_table_escapes_control_characters_of_captions_and_clip_ids() -> None:
    """A caption holding terminal escape sequences (clear the screen, set the title) is shown,
    not obeyed."""
    hostile = "a bell\x1b]0;owned\x07 rings\x1b[2J\rthen silence"
    table = format_table([Hit(1, "clip\x1b[31m", "val", 0.5, hostile, 0)])
    assert "\x1b" not in table and "\x07" not in table and "\r" not in table
    assert "a bell\\x1b]0;owned\\x07 rings\\x1b[2J\\rthen silence" in table and "clip\\x1b[31m" in table
    assert "café über" in format_table([Hit(1, "c", "val", 0.5, "café über", 0)])  # printable text as is
