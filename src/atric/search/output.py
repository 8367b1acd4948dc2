"""Search results for people: an aligned table."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from atric.search.searcher import Hit


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (ESC of an escape sequence that clears
    the screen or sets the title, BEL, CR, ...) shown as ``\\x1b``-style escapes, never sent."""
    return "".join(
        repr(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Cf") and ch != " " else ch for ch in text
    )


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
    # Clip ids and captions come from the corpus's files: escaped, so a caption cannot drive the terminal.
    rows = [(str(h.rank), printable(h.clip_id), h.split, f"{h.score:.4f}", printable(caption_cell(h))) for h in hits]
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(4)]
    right = (True, False, False, True)

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells[:4], widths, right, strict=True)]
        return "  ".join([*parts, cells[4]]).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])
