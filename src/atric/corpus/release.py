"""What the release importers (Clotho, AudioCaps) share: problem collection, release CSVs,
audio header probes and manifest-relative paths."""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import pandas as pd

from atric.audio import audio_duration
from atric.errors import DataError
from atric.layout import SkippedClip

OnError = Literal["raise", "skip"]

MAX_REPORTED_PROBLEMS = 10
T = TypeVar("T")


class Problems:
    """Collects what is wrong across a whole corpus, so one run names every broken file
    (up to ``MAX_REPORTED_PROBLEMS``) instead of only the first of thousands.

    A problem of one clip's audio (``clip_problem``) is an error under ``on_error: raise`` and,
    under ``skip``, leaves that clip out: it is listed in ``skipped`` (and the manifest) instead.
    ``notes`` are things worth saying that are not problems (a file name matched under Unicode
    normalization)."""

    def __init__(self, what: str, on_error: OnError = "raise") -> None:
        self.what = what
        self.on_error = on_error
        self.items: list[str] = []
        self.skipped: list[SkippedClip] = []
        self.notes: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def check(self, fn: Callable[..., T], *args: object) -> T | None:
        """Run ``fn``; a DataError becomes a recorded problem and None."""
        try:
            return fn(*args)
        except DataError as exc:
            self.add(str(exc))
            return None

    def clip_problem(self, clip_id: str, split: str, message: str) -> None:
        if self.on_error == "skip":
            self.skipped.append(SkippedClip(clip_id, split, message))
        else:
            self.add(message)

    def check_clip(self, clip_id: str, split: str, fn: Callable[..., T], *args: object) -> T | None:
        """``check`` for one clip's audio: under ``skip`` a DataError skips the clip."""
        try:
            return fn(*args)
        except DataError as exc:
            self.clip_problem(clip_id, split, str(exc))
            return None

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise DataError(self.items[0])
        shown = self.items[:MAX_REPORTED_PROBLEMS]
        more = len(self.items) - len(shown)
        lines = [f"{len(self.items)} problems in {self.what}:", *(f"  {m}" for m in shown)]
        if more:
            lines.append(f"  ... and {more} more")
        if self.on_error == "raise":
            lines.append("  (data.on_error=skip leaves clips whose audio is bad out, and lists them)")
        raise DataError("\n".join(lines))


def read_release_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """A release CSV as strings (empty cells stay ""), with the required columns present."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        # dtype=str and no NA parsing: ids like "NA" or "001" and empty captions stay as written.
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from exc
    frame.columns = [str(c).strip() for c in frame.columns]  # some exports pad header names
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(frame.columns)}"
        )
    return frame


def open_release(raw_dir: str | Path, corpus: str, on_error: OnError = "raise") -> tuple[Path, Problems]:
    """A release's raw folder (DataError when absent) and the Problems found reading it."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: {corpus} raw folder not found (data.raw_dir)")
    return raw_dir, Problems(f"the {corpus} release in {raw_dir}", on_error)


def find_file(path: Path, problems: Problems) -> Path:
    """``path``, or the file of its folder whose name is the same under Unicode normalization
    (NFC): a release written on macOS stores names decomposed (NFD) while its CSV has them
    composed. A match that needed it is noted; no match returns ``path`` (reported missing)."""
    if path.exists() or not path.parent.is_dir():
        return path
    wanted = unicodedata.normalize("NFC", path.name)
    listing = _nfc_listing(path.parent)
    match = listing.get(wanted)
    if match is None:
        return path
    form = "NFD" if unicodedata.is_normalized("NFD", match) else "another form"
    problems.notes.append(
        f"{path.parent / match}: listed as {path.name!r}; matched under Unicode normalization "
        f"(the name on disk is {form}, the listing NFC)"
    )
    return path.parent / match


@functools.lru_cache(maxsize=64)
def _nfc_listing(folder: Path) -> dict[str, str]:
    return {unicodedata.normalize("NFC", entry.name): entry.name for entry in folder.iterdir()}


def release_rows(path: Path, columns: Sequence[str], problems: Problems) -> list[tuple[int, tuple[str, ...]]]:
    """(file line, values of ``columns``) per data row of a release CSV; no rows is a problem."""
    frame = read_release_csv(path, columns)
    if frame.empty:
        problems.add(f"{path}: no clips listed")
    rows = frame[list(columns)].itertuples(index=False, name=None)
    return [(csv_line(row), values) for row, values in enumerate(rows)]


def csv_line(row: int) -> int:
    """The 1-based line of data row ``row`` (0-based) in a CSV with one header line."""
    return row + 2


def probe_audio(path: Path, clip_id: str) -> float:
    """Header check (no decoding): the file exists, is readable and has frames; returns seconds."""
    duration = audio_duration(path, clip_id)  # DataError naming file and clip if missing/unreadable
    if not duration > 0:
        raise DataError(f"{path} (clip {clip_id!r}): audio file has zero length")
    return duration


def relative_audio_path(path: Path, audio_root: Path) -> str:
    """Manifest audio paths are POSIX and relative to the manifest's ``audio_root``."""
    return path.relative_to(audio_root).as_posix()


# What each data.source looks like on disk, for naming the likely fix when it does not match.
SOURCE_LOOKS = {
    "synth": "the embedded default corpus (captions.json + audio/)",
    "clotho": "a Clotho release (clotho_captions_<split>.csv)",
    "audiocaps": "an AudioCaps release ({train,val,test}.csv with youtube_id)",
    "seed": "a seed layout (Index/ with AudioExpert/ or TextEmbeddings/)",
}


def sniff_source(raw_dir: str | Path) -> str | None:
    """The ``data.source`` that ``raw_dir``'s files look like, or None when none fits."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        return None
    if (raw_dir / "captions.json").is_file() and (raw_dir / "audio").is_dir():
        return "synth"
    if any(raw_dir.glob("clotho_captions_*.csv")):
        return "clotho"
    for split in ("train", "val", "test"):
        path = raw_dir / f"{split}.csv"
        if path.is_file():
            with path.open(encoding="utf-8", errors="replace") as fh:
                if "youtube_id" in fh.readline():
                    return "audiocaps"
    if (raw_dir / "Index").is_dir() and ((raw_dir / "AudioExpert").is_dir() or (raw_dir / "TextEmbeddings").is_dir()):
        return "seed"
    return None
