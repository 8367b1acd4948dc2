"""The synthetic corpus's event types: the caption words of each type (``events.yaml``, data)
joined with its renderer (``atric.corpus.sounds``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from atric.corpus.sounds import EVENT_RMS, RENDERERS, Renderer, render_event

EVENTS_FILE = Path(__file__).with_name("events.yaml")


@dataclass(frozen=True)
class EventType:
    name: str
    noun_phrases: tuple[str, ...]  # "{adj}" marks where an adjective modifier goes
    clauses: tuple[str, ...]  # an adverb modifier is appended at the end
    keywords: tuple[str, ...]  # word stems: every phrase above contains at least one
    duration: tuple[float, float]  # natural duration range in seconds
    render: Renderer


def load_event_types(path: Path = EVENTS_FILE) -> dict[str, EventType]:
    """The event table, in file order (the order decides the corpus); every type needs a renderer."""
    rows = yaml.safe_load(path.read_text(encoding="utf-8"))
    types = {}
    for row in rows:
        name = row["name"]
        if name not in RENDERERS:
            raise KeyError(f"{path}: event type {name!r} has no renderer in atric.corpus.sounds")
        types[name] = EventType(
            name,
            tuple(row["noun_phrases"]),
            tuple(row["clauses"]),
            tuple(row["keywords"]),
            (float(row["duration"][0]), float(row["duration"][1])),
            RENDERERS[name],
        )
    return types


EVENT_TYPES: dict[str, EventType] = load_event_types()

__all__ = ["EVENT_RMS", "EVENT_TYPES", "EventType", "load_event_types", "render_event"]
