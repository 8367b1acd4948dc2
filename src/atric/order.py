"""Does a model use temporal order? The mirror-pair order metric.

The default corpus (``atric.corpus.synth``) generates clips 2k and 2k+1 of a split with the
same event types in a different order. For such a pair, a caption that states its clip's
order ("a dog barks, then a car passes") should score its own clip above the mirror ("a car
passes, then a dog barks"); an order-blind model (mean or max pooling) cannot tell them apart
by order and is right half of the time, up to the other cues the two renderings differ in
(modifiers, loudness, durations).

    order_accuracy = 100 * mean over captions of both clips of every multi-event pair of
                     [sim(caption, own clip) > sim(caption, mirror)]   (a tie counts 1/2)

Single-event pairs have no order and are skipped. Overlapping events ("A while B") are kept:
the later one still starts inside the earlier one, so the audio has an order, but overlap
captions only mostly state it ("B while A" is also generated for two events). So the
metric is also given over the captions of *sequential* clips only (no overlap: every
connective is "then"-like and names the full order): ``order_accuracy_sequential``.

Pairs come from the manifest's per-clip ``events`` (onset order); a corpus without events
(Clotho, AudioCaps) has no pairs and gets no order metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from atric.corpus.captions import CaptionEvent, event_relations
from atric.errors import DataError
from atric.layout import EVAL_CAPTIONS_PER_CLIP, Layout, Manifest, ManifestClip, read_index, read_manifest


@dataclass(frozen=True)
class MirrorPair:
    """Two clips with the same event types in a different order; ``*_sequential``: no overlap."""

    first: str
    second: str
    first_sequential: bool
    second_sequential: bool


def _events(clip: ManifestClip) -> list[CaptionEvent]:
    try:
        events = [
            CaptionEvent(str(e["type"]), float(e["onset"]), float(e["duration"]), e.get("modifier"))
            for e in clip.extra.get("events", [])
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"manifest clip {clip.clip_id!r}: events need type, onset, duration ({exc!r})"
        ) from exc
    return sorted(events, key=lambda e: e.onset)


def _is_sequential(events: Sequence[CaptionEvent]) -> bool:
    try:
        return all(relation == "then" for relation in event_relations(events))
    except ValueError:  # an event overlapping an earlier one but not the one before: not sequential
        return False


def mirror_pairs(manifest: Manifest, split: str) -> list[MirrorPair]:
    """The split's multi-event mirror pairs: clips 2k and 2k+1 in manifest order whose event
    types are the same multiset in a different order (the generator's rule, checked here, so
    that a manifest without that structure simply yields no pairs)."""
    clips = manifest.split(split)
    pairs = []
    for a, b in zip(clips[0::2], clips[1::2], strict=False):
        events_a, events_b = _events(a), _events(b)
        types_a, types_b = [e.type for e in events_a], [e.type for e in events_b]
        if len(types_a) < 2 or sorted(types_a) != sorted(types_b) or types_a == types_b:
            continue
        pairs.append(MirrorPair(a.clip_id, b.clip_id, _is_sequential(events_a), _is_sequential(events_b)))
    return pairs


def order_accuracy(
    sim: np.ndarray,
    own: np.ndarray,
    mirror: np.ndarray,
    captions_per_clip: int = EVAL_CAPTIONS_PER_CLIP,
) -> tuple[float, int]:
    """(percent of captions of clips ``own`` scoring their clip above clip ``mirror``, captions
    counted) for a [captions_per_clip * N, N] matrix whose row i belongs to clip i // cpc.

    ``own`` and ``mirror`` are clip column indices of equal length (list both directions of a
    pair to count both clips' captions). A tie counts as half right.
    """
    sim = np.asarray(sim)
    own, mirror = np.asarray(own, dtype=int), np.asarray(mirror, dtype=int)
    if sim.ndim != 2 or sim.shape[0] != captions_per_clip * sim.shape[1]:
        raise DataError(f"similarity matrix has shape {sim.shape}: expected [{captions_per_clip} * N, N]")
    if own.shape != mirror.shape or own.ndim != 1:
        raise DataError(f"own and mirror clip indices differ in shape: {own.shape} vs {mirror.shape}")
    if own.size == 0:
        raise DataError("order_accuracy: no clip pairs given")
    n_clips = sim.shape[1]
    if own.min() < 0 or mirror.min() < 0 or max(own.max(), mirror.max()) >= n_clips:
        raise DataError(f"clip index out of range for {n_clips} clips")
    rows = own[:, None] * captions_per_clip + np.arange(captions_per_clip)[None, :]  # [P, cpc]
    own_scores = sim[rows, own[:, None]]
    mirror_scores = sim[rows, mirror[:, None]]
    right = (own_scores > mirror_scores) + 0.5 * (own_scores == mirror_scores)
    return float(100.0 * right.mean()), int(right.size)


def order_metrics(
    sim: np.ndarray,
    layout_or_manifest: Layout | Manifest,
    split: str,
    clip_ids: Sequence[str] | None = None,
) -> dict[str, float]:
    """Order metrics of a split's [5N, N] similarity matrix; {} when the split has no mirror pairs
    (a corpus without per-clip events, or a layout without a manifest).

    ``clip_ids`` is the clips' column order; by default the split's Index file (a Layout: the
    order ``atric.data.open_split`` uses) or the manifest's order (a Manifest). Keys:
    order_accuracy (percent, chance 50), order_pairs, order_captions, and over sequential
    clips only order_accuracy_sequential, order_sequential_captions (when there are any).
    """
    if isinstance(layout_or_manifest, Layout):
        if not layout_or_manifest.manifest_path.exists():  # seed-layout inputs: no events, no pairs
            return {}
        manifest = read_manifest(layout_or_manifest.manifest_path)
        if clip_ids is None:
            clip_ids = [c.clip_id for c in read_index(layout_or_manifest.index_path(split), split)]
    else:
        manifest = layout_or_manifest
        if clip_ids is None:
            clip_ids = [c.clip_id for c in manifest.split(split)]
    pairs = mirror_pairs(manifest, split)
    if not pairs:
        return {}
    sim = np.asarray(sim)
    if sim.ndim != 2 or sim.shape[1] != len(clip_ids):
        raise DataError(
            f"{split}: similarity matrix has shape {sim.shape} but the split has {len(clip_ids)} clips"
        )
    column = {clip_id: i for i, clip_id in enumerate(clip_ids)}
    missing = [c for p in pairs for c in (p.first, p.second) if c not in column]
    if missing:
        raise DataError(
            f"{split}: manifest clip(s) {', '.join(missing[:3])} are not in the split's clip list"
        )
    # Both directions: each clip's captions against its mirror.
    own = [column[p.first] for p in pairs] + [column[p.second] for p in pairs]
    mirror = [column[p.second] for p in pairs] + [column[p.first] for p in pairs]
    sequential = np.array([p.first_sequential for p in pairs] + [p.second_sequential for p in pairs])
    accuracy, captions = order_accuracy(sim, np.array(own), np.array(mirror))
    out: dict[str, float] = {
        "order_accuracy": accuracy,
        "order_pairs": float(len(pairs)),
        "order_captions": float(captions),
    }
    if sequential.any():
        seq_accuracy, seq_captions = order_accuracy(
            sim, np.array(own)[sequential], np.array(mirror)[sequential]
        )
        out["order_accuracy_sequential"] = seq_accuracy
        out["order_sequential_captions"] = float(seq_captions)
    return out
