"""Clotho v2 release -> Manifest.

The raw folder holds the release as distributed:
```
clotho_captions_development.csv   file_name, caption_1 .. caption_5  (extra columns ignored)
clotho_captions_validation.csv
clotho_captions_evaluation.csv
development/<file_name>  validation/<file_name>  evaluation/<file_name>
```
Release splits map development -> train, validation -> val, evaluation -> test. The clip
id is ``file_name`` itself (extension included), as the original's ``audio_id``. Every
clip has exactly five non-empty captions, in column order.
"""

from __future__ import annotations

from pathlib import Path

from atric.corpus.release import OnError, find_file, open_release, probe_audio, relative_audio_path, release_rows
from atric.layout import Manifest, ManifestClip

CLOTHO_SPLITS = {"development": "train", "validation": "val", "evaluation": "test"}
CLOTHO_CAPTION_COLUMNS = tuple(f"caption_{i}" for i in range(1, 6))


def clotho_csv_path(raw_dir: Path, release_split: str) -> Path:
    return raw_dir / f"clotho_captions_{release_split}.csv"


def read_clotho(
    raw_dir: str | Path, *, sample_rate: int, dataset: str = "CLOTHO", on_error: OnError = "raise"
) -> Manifest:
    """Read and check a Clotho v2 release; DataError names the CSV line or audio file and the clip.

    ``sample_rate`` is the rate extraction resamples to (``data.sample_rate``); files keep theirs.
    """
    raw_dir, problems = open_release(raw_dir, "Clotho", on_error)
    first_seen: dict[str, str] = {}  # clip id -> where it was first listed
    clips: list[ManifestClip] = []
    for release_split, split in CLOTHO_SPLITS.items():
        csv_path = clotho_csv_path(raw_dir, release_split)
        for line, (file_name, *raw_captions) in release_rows(
            csv_path, ("file_name", *CLOTHO_CAPTION_COLUMNS), problems
        ):
            where = f"{csv_path} line {line}"
            clip_id = file_name.strip()
            if not clip_id or "/" in clip_id or "\\" in clip_id:
                problems.add(f"{where}: invalid file_name {file_name!r} (a bare file name is expected)")
                continue
            if clip_id in first_seen:
                problems.add(f"{where}: clip {clip_id!r} is listed twice (first at {first_seen[clip_id]})")
                continue
            first_seen[clip_id] = where
            captions = tuple(c.strip() for c in raw_captions)
            empty = [col for col, c in zip(CLOTHO_CAPTION_COLUMNS, captions, strict=True) if not c]
            if empty:
                problems.add(f"{where}: clip {clip_id!r} has an empty {', '.join(empty)}")
            audio_path = find_file(raw_dir / release_split / clip_id, problems)
            duration = problems.check_clip(clip_id, split, probe_audio, audio_path, clip_id)
            if empty or duration is None:
                continue
            clips.append(
                ManifestClip(
                    clip_id=clip_id,
                    split=split,
                    audio=relative_audio_path(audio_path, raw_dir),
                    duration=duration,
                    captions=captions,
                )
            )
    problems.raise_if_any()
    return Manifest(
        dataset=dataset,
        source="clotho",
        sample_rate=sample_rate,
        audio_root=str(raw_dir),
        clips=tuple(clips),
        skipped=tuple(problems.skipped),
        notes=tuple(problems.notes),
    )
