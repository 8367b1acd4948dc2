"""Captions for the synthetic corpus: events, their order, overlap and modifiers in varied words.

A caption names every event of its clip (a synonym of its type), joins consecutive events
with an order word ("then", "followed by", "before", "after", "preceded by") or an overlap
word ("while", "as", "at the same time", "simultaneously", "together with"), and usually
mentions each event's modifier ("loudly", "a faint ...", "in the distance", "briefly").

Held-out wording: every possible caption string is assigned to either train or val/test by a
stable hash of its text, and generation keeps only strings of the clip's side. Val/test
captions therefore never appear verbatim in train, whatever the corpus size, and both sides
share one vocabulary and one template distribution.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from atric.corpus.events import EVENT_TYPES
from atric.layout import EVAL_CAPTIONS_PER_CLIP, Manifest

CAPTIONS_PER_CLIP = EVAL_CAPTIONS_PER_CLIP  # every clip, so val/test clips meet the protocol
ADJECTIVES = {
    "loud": ("loud",),
    "quiet": ("faint", "quiet", "soft"),
    "distant": ("distant", "faraway"),
    "briefly": ("brief", "short"),
}
ADVERBS = {
    "loud": ("loudly",),
    "quiet": ("quietly", "faintly", "softly"),
    "distant": ("in the distance", "far away", "from afar"),
    "briefly": ("briefly", "for a moment"),
}
MODIFIER_MENTION_PROBABILITY = 0.8  # real captions do not always say how loud a sound was

# Connective words, as the tests parse them: phrases of events must contain none of these.
FORWARD_WORDS = ("then", "followed by", "before", "later", "first")
REVERSE_WORDS = ("after", "preceded by")
OVERLAP_WORDS = ("while", "as", "at the same time", "simultaneously", "together with")

SINGLE_TEMPLATES = (
    "{A_s}",
    "{A_np} can be heard",
    "there is {A_np}",
    "you can hear {A_np}",
    "the sound of {A_np}",
    "{A_np} is heard",
    "{A_np}",
)
# {A_*} is the earlier part (one event or the caption so far), {B_*} the next event.
THEN_TEMPLATES = (
    "{A_s}, then {B_s}",
    "{A_np} followed by {B_np}",
    "{A_s} before {B_s}",
    "{A_s} and then {B_s}",
    "{A_s}, and later {B_s}",
    "{A_np}, then {B_np}",
)
THEN_FIRST_JOIN = ("first {A_s}, then {B_s}",)  # "first" must open the caption
# Mentioning the later event first is only unambiguous when it ends the caption.
THEN_REVERSED_LAST_JOIN = ("{B_s} after {A_s}",)
THEN_TWO_EVENTS = ("after {A_np}, {B_s}", "{B_s}, preceded by {A_np}")
OVERLAP_TEMPLATES = (
    "{A_s} while {B_s}",
    "{A_s} as {B_s}",
    "{A_s} and at the same time {B_s}",
    "{A_np} together with {B_np}",
    "{A_s}, while at the same time {B_s}",
    "{A_np} simultaneously with {B_np}",
)
# The connective always stands between the two events it joins (never trailing after both),
# so that "A and B at the same time before C" cannot arise.
OVERLAP_TWO_EVENTS = ("{B_s} while {A_s}", "{B_s} as {A_s}")

EVAL_SHARE = 3  # one caption string in EVAL_SHARE belongs to val/test
MAX_TRIES = 400


@dataclass(frozen=True)
class CaptionEvent:
    type: str
    onset: float
    duration: float
    modifier: str | None

    @property
    def end(self) -> float:
        return self.onset + self.duration


def event_relations(events: Sequence[CaptionEvent]) -> list[str]:
    """For events sorted by onset: "then" or "overlap" between each one and the one before.

    "then" means the event starts after every earlier one has ended; "overlap" that it starts
    while the previous one still sounds. Anything else is a planning bug.
    """
    relations = []
    for i in range(1, len(events)):
        latest_end = max(e.end for e in events[:i])
        if events[i].onset >= latest_end:
            relations.append("then")
        elif events[i].onset < events[i - 1].end:
            relations.append("overlap")
        else:
            raise ValueError(f"event {i} overlaps an earlier event but not the one before it: {events}")
    return relations


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def _noun_phrase(event: CaptionEvent, rng: np.random.Generator, mention_modifier: bool) -> str:
    adjective = ""
    if event.modifier and mention_modifier:
        adjective = _pick(rng, ADJECTIVES[event.modifier]) + " "
    return _pick(rng, EVENT_TYPES[event.type].noun_phrases).format(adj=adjective)


def _clause(event: CaptionEvent, rng: np.random.Generator, mention_modifier: bool) -> str:
    clause = _pick(rng, EVENT_TYPES[event.type].clauses)
    if event.modifier and mention_modifier:
        clause += " " + _pick(rng, ADVERBS[event.modifier])
    return clause


def _realise(event: CaptionEvent, rng: np.random.Generator) -> dict[str, str]:
    mention = bool(rng.random() < MODIFIER_MENTION_PROBABILITY)
    return {"s": _clause(event, rng, mention), "np": _noun_phrase(event, rng, mention)}


def _finish(text: str) -> str:
    # Articles follow the word that ended up after them ("a loud engine", "an alarm").
    text = re.sub(r"\ba (?=[aeiou])", "an ", text)
    text = re.sub(r"\ban (?=[b-df-hj-np-tv-z])", "a ", text)
    return text[0].upper() + text[1:] + "."


def compose_caption(events: Sequence[CaptionEvent], rng: np.random.Generator) -> str:
    """One caption for events sorted by onset."""
    relations = event_relations(events)
    first = _realise(events[0], rng)
    if len(events) == 1:
        return _finish(_pick(rng, SINGLE_TEMPLATES).format(A_s=first["s"], A_np=first["np"]))
    so_far = first
    opened_with_first = False  # "first A, then B" cannot be wrapped as "C after first A ..."
    for i in range(1, len(events)):
        is_first, is_last = i == 1, i == len(events) - 1
        if relations[i - 1] == "then":
            options = list(THEN_TEMPLATES)
            options += THEN_FIRST_JOIN if is_first and not is_last else ()
            options += THEN_REVERSED_LAST_JOIN if is_last and not opened_with_first else ()
            options += THEN_FIRST_JOIN + THEN_TWO_EVENTS if is_first and is_last else ()
        else:
            options = list(OVERLAP_TEMPLATES) + list(OVERLAP_TWO_EVENTS if is_first and is_last else ())
        template = _pick(rng, options)
        opened_with_first = opened_with_first or template in THEN_FIRST_JOIN
        nxt = _realise(events[i], rng)
        text = template.format(A_s=so_far["s"], A_np=so_far["np"], B_s=nxt["s"], B_np=nxt["np"])
        so_far = {"s": text, "np": text}
    return _finish(so_far["s"])


def is_eval_caption(caption: str) -> bool:
    """Which side of the held-out split a caption string belongs to (stable across runs)."""
    digest = hashlib.blake2b(caption.strip().lower().encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % EVAL_SHARE == 0


def make_captions(
    events: Sequence[CaptionEvent], split: str, rng: np.random.Generator, count: int = CAPTIONS_PER_CLIP
) -> list[str]:
    """``count`` distinct captions from the clip's side of the held-out split.

    Short single-event clips have few possible strings; if fewer than ``count`` distinct ones
    turn up, the found ones repeat (still never crossing sides).
    """
    want_eval = split != "train"
    found: list[str] = []
    for _ in range(MAX_TRIES):
        caption = compose_caption(events, rng)
        if is_eval_caption(caption) == want_eval and caption not in found:
            found.append(caption)
            if len(found) == count:
                return found
    if not found:
        raise RuntimeError(f"no {split} caption found for events {events} in {MAX_TRIES} tries")
    return [found[k % len(found)] for k in range(count)]


def heldout_overlap(manifest: Manifest) -> float:
    """Fraction of val/test captions that appear verbatim in train (0.0 when there are none)."""
    train = {caption for clip in manifest.split("train") for caption in clip.captions}
    held_out = [
        caption for split in ("val", "test") for clip in manifest.split(split) for caption in clip.captions
    ]
    if not held_out:
        return 0.0
    return sum(caption in train for caption in held_out) / len(held_out)
