"""AudioCaps release -> Manifest.

The raw folder holds the three caption CSVs and the clips downloaded from YouTube:
```
train.csv  val.csv  test.csv    audiocap_id, youtube_id, start_time, caption (one row per caption)
```
The clip id is ``youtube_id``; rows with the same ``youtube_id`` are one clip's captions, in
file order (train has one caption per clip, val and test exactly five).

Audio lookup rule: the clip's file is ``<youtube_id>.<ext>`` with ext one of wav, flac,
ogg, mp3 (matched case-insensitively), searched in these folders, first match wins:
``audio/<split>/``, ``audio/``, ``<split>/``, then the raw folder itself. Within one
folder a lossless format is preferred (wav, flac, ogg, mp3 in that order). Each folder
is listed once, so a corpus of 50,000 clips costs a few directory scans, not 800,000 stats.

Refused: a missing column, an empty youtube_id or caption, an audiocap_id listed twice,
a youtube_id in two splits or listed with two start times (one file cannot hold two
segments), a val/test clip without exactly five captions, missing/unreadable/empty audio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from atric.audio import AUDIO_SUFFIXES
from atric.corpus.release import OnError, open_release, probe_audio, relative_audio_path, release_rows
from atric.layout import EVAL_CAPTIONS_PER_CLIP, SPLITS, Manifest, ManifestClip

AUDIOCAPS_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")


def audiocaps_csv_path(raw_dir: Path, split: str) -> Path:
    return raw_dir / f"{split}.csv"


def audio_search_folders(raw_dir: Path, split: str) -> list[Path]:
    """Where ``<youtube_id>.<ext>`` is looked for, in order (see the module docstring)."""
    return [raw_dir / "audio" / split, raw_dir / "audio", raw_dir / split, raw_dir]


class AudioFinder:
    """Finds ``<stem>.<ext>`` in the search folders; lists each folder once."""

    def __init__(self, raw_dir: Path) -> None:
        self.raw_dir = raw_dir
        self._listings: dict[Path, dict[str, dict[str, str]]] = {}

    def _listing(self, folder: Path) -> dict[str, dict[str, str]]:
        # stem -> {lower-case suffix: actual file name}
        if folder not in self._listings:
            listing: dict[str, dict[str, str]] = {}
            if folder.is_dir():
                for entry in folder.iterdir():
                    suffix = entry.suffix.lower()
                    if suffix in AUDIO_SUFFIXES and entry.is_file():
                        listing.setdefault(entry.stem, {})[suffix] = entry.name
            self._listings[folder] = listing
        return self._listings[folder]

    def find(self, stem: str, split: str) -> Path | None:
        for folder in audio_search_folders(self.raw_dir, split):
            by_suffix = self._listing(folder).get(stem)
            if by_suffix:
                suffix = next(s for s in AUDIO_SUFFIXES if s in by_suffix)
                return folder / by_suffix[suffix]
        return None


@dataclass
class _Pending:
    line: int
    start_time: float
    captions: list[str] = field(default_factory=list)
    has_empty: bool = False


def _parse_start(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def read_audiocaps(
    raw_dir: str | Path, *, sample_rate: int, dataset: str = "AudioCaps", on_error: OnError = "raise"
) -> Manifest:
    """Read and check an AudioCaps release; DataError names the CSV line or audio file and the clip.

    ``sample_rate`` is the rate extraction resamples to (``data.sample_rate``); files keep theirs.
    """
    raw_dir, problems = open_release(raw_dir, "AudioCaps", on_error)
    finder = AudioFinder(raw_dir)
    split_of: dict[str, tuple[str, str]] = {}  # youtube id -> (split, where first listed)
    caption_ids: dict[str, str] = {}  # audiocap_id -> where first listed
    cross_split: set[tuple[str, str]] = set()
    clips: list[ManifestClip] = []
    for split in SPLITS:
        csv_path = audiocaps_csv_path(raw_dir, split)
        pending: dict[str, _Pending] = {}  # insertion order = first appearance in the file
        for line, (caption_id, youtube_id, start_text, caption) in release_rows(
            csv_path, AUDIOCAPS_COLUMNS, problems
        ):
            where = f"{csv_path} line {line}"
            clip_id = youtube_id.strip()
            if not clip_id or "/" in clip_id:
                problems.add(f"{where}: invalid youtube_id {youtube_id!r}")
                continue
            caption_id = caption_id.strip()
            if caption_id in caption_ids:
                problems.add(
                    f"{where}: clip {clip_id!r}: audiocap_id {caption_id} is listed twice "
                    f"(first at {caption_ids[caption_id]})"
                )
                continue
            if caption_id:  # the id is only bookkeeping; an empty one is not an error
                caption_ids[caption_id] = where
            if clip_id in split_of and split_of[clip_id][0] != split:
                if (clip_id, split) not in cross_split:  # once per clip, not once per caption row
                    cross_split.add((clip_id, split))
                    problems.add(
                        f"{where}: clip {clip_id!r} is also in the {split_of[clip_id][0]} split "
                        f"({split_of[clip_id][1]}); a clip belongs to one split"
                    )
                continue
            split_of.setdefault(clip_id, (split, where))
            start = _parse_start(start_text)
            if start is None:
                problems.add(f"{where}: clip {clip_id!r}: start_time {start_text!r} is not a number >= 0")
                continue
            entry = pending.setdefault(clip_id, _Pending(line=line, start_time=start))
            if entry.start_time != start:
                problems.add(
                    f"{where}: clip {clip_id!r} is listed with start_time {start_text} here and "
                    f"{entry.start_time:g} at line {entry.line}; one audio file cannot hold both segments"
                )
                continue
            if not caption.strip():
                problems.add(f"{where}: clip {clip_id!r} has an empty caption")
                entry.has_empty = True
            entry.captions.append(caption.strip())  # kept, so the count below counts rows
        for clip_id, entry in pending.items():
            where = f"{csv_path} line {entry.line}"
            if split != "train" and len(entry.captions) != EVAL_CAPTIONS_PER_CLIP:
                problems.add(
                    f"{where}: {split} clip {clip_id!r} has {len(entry.captions)} captions; "
                    f"evaluation needs exactly {EVAL_CAPTIONS_PER_CLIP}"
                )
                continue
            if entry.has_empty:
                continue  # already reported
            audio_path = finder.find(clip_id, split)
            if audio_path is None:
                expected = raw_dir / "audio" / f"{clip_id}.wav"
                problems.clip_problem(
                    clip_id,
                    split,
                    f"{expected} (clip {clip_id!r}, {where}): audio file not found "
                    f"(looked for {clip_id}{{{','.join(AUDIO_SUFFIXES)}}} in audio/{split}/, audio/, "
                    f"{split}/ and {raw_dir})"
                )
                continue
            duration = problems.check_clip(clip_id, split, probe_audio, audio_path, clip_id)
            if duration is None:
                continue
            clips.append(
                ManifestClip(
                    clip_id=clip_id,
                    split=split,
                    audio=relative_audio_path(audio_path, raw_dir),
                    duration=duration,
                    captions=tuple(entry.captions),
                    extra={"start_time": entry.start_time},
                )
            )
    problems.raise_if_any()
    return Manifest(
        dataset=dataset,
        source="audiocaps",
        sample_rate=sample_rate,
        audio_root=str(raw_dir),
        clips=tuple(clips),
        skipped=tuple(problems.skipped),
        notes=tuple(problems.notes),
    )
