"""The mirror-pair order metric (atric.order) on hand-made similarity matrices and manifests."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from atric.config import DataParams, SplitSizes, SynthParams
from atric.corpus.synth import plan_clip
from atric.errors import DataError
from atric.layout import Clip, Layout, Manifest, ManifestClip, write_index, write_manifest
from atric.order import mirror_pairs, order_accuracy, order_metrics

CPC = 5


def event(kind: str, onset: float, duration: float = 1.0) -> dict[str, object]:
    return {"type": kind, "onset": onset, "duration": duration, "gain_db": -6.0, "modifier": None}


def clip(clip_id: str, events: list[dict[str, object]], split: str = "test") -> ManifestClip:
    captions = tuple(f"{clip_id} caption {k}" for k in range(CPC))
    return ManifestClip(clip_id, split, f"{clip_id}.wav", 5.0, captions, {"events": events})


def manifest_of(clips: list[ManifestClip]) -> Manifest:
    return Manifest("Toy", "synth", 16000, "raw", tuple(clips))


# Clips 0/1: dog then car / car then dog (sequential); 2/3: single event (no order);
# 4/5: rain with bell overlapping / bell then rain (4 overlaps, 5 sequential);
# 6/7: same order twice (not a mirror); 8/9: different event types (not a mirror).
TOY = manifest_of(
    [
        clip("c0", [event("dog", 0.1), event("car", 1.5)]),
        clip("c1", [event("car", 0.1), event("dog", 1.5)]),
        clip("c2", [event("bell", 0.5)]),
        clip("c3", [event("bell", 0.2)]),
        clip("c4", [event("rain", 0.1, 2.0), event("bell", 0.8)]),
        clip("c5", [event("bell", 0.1), event("rain", 1.4)]),
        clip("c6", [event("dog", 0.1), event("rain", 1.5)]),
        clip("c7", [event("dog", 0.1), event("rain", 1.5)]),
        clip("c8", [event("dog", 0.1), event("car", 1.5)]),
        clip("c9", [event("dog", 0.1), event("bell", 1.5)]),
    ]
)


def test_mirror_pairs_skip_single_events_same_order_and_other_types() -> None:
    pairs = mirror_pairs(TOY, "test")
    assert [(p.first, p.second) for p in pairs] == [("c0", "c1"), ("c4", "c5")]
    assert [(p.first_sequential, p.second_sequential) for p in pairs] == [(True, True), (False, True)]
    assert mirror_pairs(TOY, "val") == []


def test_order_accuracy_counts_own_above_mirror_and_ties_as_half() -> None:
    n = 2
    sim = np.zeros((CPC * n, n))
    # Clip 0's captions: 3 prefer clip 0, 1 ties, 1 prefers clip 1 -> 3.5 / 5.
    sim[0:5, 0] = [0.9, 0.8, 0.7, 0.5, 0.1]
    sim[0:5, 1] = [0.1, 0.2, 0.3, 0.5, 0.9]
    # Clip 1's captions: all prefer clip 1 -> 5 / 5.
    sim[5:10, 1] = 1.0
    assert order_accuracy(sim, np.array([0]), np.array([1])) == (70.0, 5)
    assert order_accuracy(sim, np.array([1]), np.array([0])) == (100.0, 5)
    assert order_accuracy(sim, np.array([0, 1]), np.array([1, 0])) == (85.0, 10)


def test_an_order_blind_model_scores_exactly_chance() -> None:
    """Mirror clips with identical embeddings (what mean pooling gives for the same frames
    in another order) tie for every caption: exactly 50."""
    rng = np.random.default_rng(0)
    text = rng.standard_normal((CPC * len(TOY.clips), 8))
    audio = rng.standard_normal((len(TOY.clips), 8))
    audio[1] = audio[0]
    audio[5] = audio[4]
    metrics = order_metrics(text @ audio.T, TOY, "test")
    assert metrics["order_accuracy"] == 50.0
    assert metrics["order_pairs"] == 2 and metrics["order_captions"] == 4 * CPC


def test_order_metrics_sequential_subset_and_column_order(tmp_path: Path) -> None:
    """With a Layout the columns follow the split's Index file, whatever the manifest's order."""
    layout = Layout("Toy", tmp_path)
    write_manifest(layout.manifest_path, TOY)
    index_order = ["c5", "c4", "c3", "c2", "c1", "c0", "c6", "c7", "c8", "c9"]
    by_id = {c.clip_id: c for c in TOY.clips}
    write_index(layout.index_path("test"), [Clip(i, by_id[i].captions) for i in index_order], "test")
    col = {clip_id: k for k, clip_id in enumerate(index_order)}
    sim = np.zeros((CPC * len(index_order), len(index_order)))

    def prefer(clip_id: str, target: str, how_many: int) -> None:
        rows = slice(col[clip_id] * CPC, col[clip_id] * CPC + how_many)
        sim[rows, col[target]] = 1.0

    prefer("c0", "c0", 5)  # 5/5 right
    prefer("c1", "c0", 5)  # 0/5 right
    prefer("c4", "c4", 2)  # overlapping clip: 2/5 right, 3 ties -> 3.5/5
    prefer("c5", "c5", 4)  # 4/5 right, 1 tie -> 4.5/5
    metrics = order_metrics(sim, layout, "test")
    assert metrics["order_accuracy"] == pytest.approx(100 * (5 + 0 + 3.5 + 4.5) / 20)
    # Sequential clips only: c0, c1, c5 (c4's bell starts while the rain sounds).
    assert metrics["order_accuracy_sequential"] == pytest.approx(100 * (5 + 0 + 4.5) / 15)
    assert metrics["order_sequential_captions"] == 15


def test_no_pairs_no_metrics_and_bad_shapes_are_errors(tmp_path: Path) -> None:
    real = manifest_of([clip("a", []), clip("b", [])])  # a real corpus: no events
    assert order_metrics(np.zeros((10, 2)), real, "test") == {}
    assert order_metrics(np.zeros((10, 2)), Layout("CLOTHO", tmp_path), "test") == {}  # no manifest
    with pytest.raises(DataError, match="shape"):
        order_metrics(np.zeros((CPC * 9, 9)), TOY, "test")
    with pytest.raises(DataError, match="expected"):
        order_accuracy(np.zeros((7, 2)), np.array([0]), np.array([1]))
    with pytest.raises(DataError, match="out of range"):
        order_accuracy(np.zeros((10, 2)), np.array([0]), np.array([2]))


def test_the_default_generator_makes_mirror_pairs() -> None:
    """Clips planned by atric.corpus.synth: every multi-event pair 2k/2k+1 is found, none else."""
    data = DataParams(synth=SynthParams(clips=SplitSizes(train=2, val=2, test=40)))
    clips = []
    for index in range(40):
        _, events = plan_clip(data, "test", index, np.random.default_rng(index))
        clips.append(clip(f"t{index:02d}", [asdict(e) for e in events]))
    pairs = mirror_pairs(manifest_of(clips), "test")
    multi = [k for k in range(0, 40, 2) if len(clips[k].extra["events"]) > 1]
    assert [p.first for p in pairs] == [f"t{k:02d}" for k in multi]
    assert 5 <= len(pairs) < 20  # single-event pairs exist and are skipped
