"""The ``prepare`` stage: a raw corpus (``data.raw_dir``) -> the validated seed layout.

```
data.source = synth     data/raw/captions.json + audio   (atric.corpus.synth)
data.source = clotho    Clotho v2 release                 (atric.corpus.clotho)
data.source = audiocaps AudioCaps CSVs + audio            (atric.corpus.audiocaps)
   --> <root>/<dataset>/Index/{train,val,test}.{json|csv} + <root>/<dataset>/manifest.json
```
Everything is read and checked before anything is written, and the outputs are staged
in a temporary folder and renamed into place only when all of them are complete, so a
failed run leaves the previous Index files and manifest exactly as they were.

Audio is not decoded or resampled here (extraction does that through
``atric.audio.load_audio``); every file's header is read to check it exists, is
readable and is not empty, and to record its duration.

Shared helpers for the importers live here too (``Problems``, ``open_release``,
``release_rows``, ``probe_audio``); the importers are imported lazily by ``read_raw`` so no cycle forms.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pandas as pd

from atric.audio import audio_duration
from atric.config import SEED_DATASETS, DataParams, Params
from atric.errors import ConfigError, DataError
from atric.layout import SPLITS, Clip, Layout, Manifest, validate_clips, write_index, write_manifest

MAX_REPORTED_PROBLEMS = 10
T = TypeVar("T")


class Problems:
    """Collects what is wrong across a whole corpus, so one run names every broken file
    (up to ``MAX_REPORTED_PROBLEMS``) instead of only the first of thousands."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def check(self, fn: Callable[..., T], *args: object) -> T | None:
        """Run ``fn``; a DataError becomes a recorded problem and None."""
        try:
            return fn(*args)
        except DataError as exc:
            self.add(str(exc))
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


def open_release(raw_dir: str | Path, corpus: str) -> tuple[Path, Problems]:
    """A release's raw folder (DataError when absent) and the Problems found reading it."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: {corpus} raw folder not found (data.raw_dir)")
    return raw_dir, Problems(f"the {corpus} release in {raw_dir}")


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


# ---------------------------------------------------------------- the stage
def check_dataset_name(data: DataParams) -> None:
    """Refuse to write one corpus into another corpus's seed folder (CLOTHO, AudioCaps)."""
    for source, seed_name in SEED_DATASETS.items():
        if data.dataset == seed_name and data.source != source:
            raise ConfigError(
                f"data.dataset: {seed_name!r} is the seed folder of the {source} corpus, but "
                f"data.source is {data.source!r}; choose another data.dataset"
            )


def read_raw(params: Params) -> Manifest:
    """Read ``data.raw_dir`` with the reader for ``data.source``; the manifest is named ``data.dataset``."""
    data = params.data
    raw_dir = Path(data.raw_dir)
    if data.source == "synth":
        # Imported lazily: the synthetic corpus module is optional for real-corpus users.
        from atric.corpus.synth import read_synth_raw

        manifest = read_synth_raw(raw_dir)
    elif data.source == "clotho":
        from atric.corpus.clotho import read_clotho

        manifest = read_clotho(raw_dir, dataset=data.dataset, sample_rate=data.sample_rate)
    elif data.source == "audiocaps":
        from atric.corpus.audiocaps import read_audiocaps

        manifest = read_audiocaps(raw_dir, dataset=data.dataset, sample_rate=data.sample_rate)
    else:  # config.DataParams admits only the sources above
        raise ConfigError(f"data.source: unknown source {data.source!r}")
    return dataclasses.replace(manifest, dataset=data.dataset)


def validate_manifest(manifest: Manifest, check_audio: bool = False) -> None:
    """Every clip in one known split, ids unique across splits, the caption rules of
    ``layout.validate_clips`` per split, no empty split, and (``check_audio``) every
    audio file readable and non-empty."""
    problems = Problems(f"the {manifest.source} corpus")
    where = f"{manifest.source} corpus ({manifest.audio_root})"
    first_split: dict[str, str] = {}
    for clip in manifest.clips:
        if clip.split not in SPLITS:
            problems.add(f"{where}: clip {clip.clip_id!r} has unknown split {clip.split!r}")
        elif clip.clip_id in first_split and first_split[clip.clip_id] != clip.split:
            problems.add(
                f"{where}: clip {clip.clip_id!r} is in both {first_split[clip.clip_id]} and "
                f"{clip.split}; a clip belongs to one split"
            )
        first_split.setdefault(clip.clip_id, clip.split)
    for split in SPLITS:
        clips = manifest.split(split)
        if not clips:
            problems.add(f"{where}: the {split} split has no clips")
        index_clips = [Clip(c.clip_id, c.captions) for c in clips]
        problems.check(validate_clips, index_clips, f"{where} {split}", split)
    if check_audio:
        for clip in manifest.clips:
            problems.check(probe_audio, manifest.audio_path(clip), clip.clip_id)
    problems.raise_if_any()


def write_layout(manifest: Manifest, layout: Layout) -> list[Path]:
    """Write the Index files and the manifest; all of them or none. Returns the paths written."""
    dataset_dir = layout.dataset_dir
    dataset_dir.mkdir(parents=True, exist_ok=True)
    # Staging beside the outputs keeps every final rename on one filesystem.
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=dataset_dir))
    try:
        staged: list[tuple[Path, Path]] = []
        for split in SPLITS:
            final = layout.index_path(split)
            tmp = staging / final.relative_to(dataset_dir)
            write_index(tmp, [Clip(c.clip_id, c.captions) for c in manifest.split(split)], split)
            staged.append((tmp, final))
        tmp = staging / layout.manifest_path.relative_to(dataset_dir)
        write_manifest(tmp, manifest)
        staged.append((tmp, layout.manifest_path))  # last: a manifest implies its indexes are in place
        for tmp, final in staged:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [final for _, final in staged]


def prepare_dataset(params: Params) -> Manifest:
    """Read and validate ``data.raw_dir`` as ``data.source``, then write the seed layout
    under ``data.root/data.dataset``. Raises DataError/ConfigError before writing anything."""
    check_dataset_name(params.data)
    manifest = read_raw(params)
    # The importers probe every audio header while reading; the synthetic reader only lists files.
    validate_manifest(manifest, check_audio=params.data.source == "synth")
    write_layout(manifest, Layout(params.data.dataset, params.data.root))
    return manifest


def _hms(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def summarize(manifest: Manifest, layout: Layout | None = None) -> str:
    """Clips, captions and total duration per split, for the stage's console output."""
    target = f" -> {layout.dataset_dir}" if layout is not None else ""
    lines = [f"prepared {manifest.dataset} (source {manifest.source}){target}"]
    for split in SPLITS:
        clips = manifest.split(split)
        captions = sum(len(c.captions) for c in clips)
        duration = sum(c.duration for c in clips)
        lines.append(f"  {split:<5} {len(clips):>7} clips {captions:>8} captions  {_hms(duration)}")
    total = sum(c.duration for c in manifest.clips)
    n_captions = sum(len(c.captions) for c in manifest.clips)
    lines.append(f"  total {len(manifest.clips):>7} clips {n_captions:>8} captions  {_hms(total)}")
    return "\n".join(lines)
