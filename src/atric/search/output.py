"""Search results for people: an aligned table."""

from __future__ import annotations

from collections.abc import Sequence

from atric.search.searcher import Hit


def caption_cell(hit: Hit) -> str:
    """The caption, and for a sound query how many other clips have the same caption text."""
    if not hit.other_clips:
        return hit.caption
    return f"{hit.caption} (+{hit.other_clips} other clip{'s' if hit.other_clips > 1 else ''})"


def format_table(hits: Sequence[Hit]) -> str:
    """rank, clip id, split, score, caption as aligned columns."""
    if not hits:
        return "(no results)"
    headers = ("rank", "clip", "split", "score", "caption")
    rows = [(str(h.rank), h.clip_id, h.split, f"{h.score:.4f}", caption_cell(h)) for h in hits]
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(4)]
    right = (True, False, False, True)

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells[:4], widths, right, strict=True)]
        return "  ".join([*parts, cells[4]]).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])
