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

Each ``data.source`` has one reader in ``IMPORTERS``; what the release readers share is in
``atric.corpus.release``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from atric.config import SEED_DATASETS, DataParams, Params
from atric.corpus.release import SOURCE_LOOKS, Problems, probe_audio, sniff_source
from atric.errors import ConfigError, DataError
from atric.layout import SPLITS, Clip, Layout, Manifest, validate_clips, write_index, write_manifest


# ---------------------------------------------------------------- the stage
def check_dataset_name(data: DataParams) -> None:
    """Refuse to write one corpus into another corpus's seed folder (CLOTHO, AudioCaps)."""
    for source, seed_name in SEED_DATASETS.items():
        if data.dataset == seed_name and data.source not in (source, "seed"):
            raise ConfigError(
                f"data.dataset: {seed_name!r} is the seed folder of the {source} corpus, but "
                f"data.source is {data.source!r}; choose another data.dataset"
            )


def _read_synth(raw_dir: Path, data: DataParams) -> Manifest:
    # Imported lazily: the synthetic corpus module (and its sound renderers) is optional for real corpora.
    from atric.corpus.synth import read_synth_raw

    return read_synth_raw(raw_dir)


def _read_clotho(raw_dir: Path, data: DataParams) -> Manifest:
    from atric.corpus.clotho import read_clotho

    return read_clotho(raw_dir, dataset=data.dataset, sample_rate=data.sample_rate, on_error=data.on_error)


def _read_audiocaps(raw_dir: Path, data: DataParams) -> Manifest:
    from atric.corpus.audiocaps import read_audiocaps

    return read_audiocaps(raw_dir, dataset=data.dataset, sample_rate=data.sample_rate, on_error=data.on_error)


def _read_seed(raw_dir: Path, data: DataParams) -> Manifest:
    from atric.corpus.seed import read_seed_raw

    return read_seed_raw(raw_dir, data.dataset, data.sample_rate)


# data.source -> the reader of that release format (config.DataParams.source lists the same names).
IMPORTERS: dict[str, Callable[[Path, DataParams], Manifest]] = {
    "synth": _read_synth,
    "clotho": _read_clotho,
    "audiocaps": _read_audiocaps,
    "seed": _read_seed,
}


def read_raw(params: Params) -> Manifest:
    """Read ``data.raw_dir`` with the reader for ``data.source``; the manifest is named ``data.dataset``."""
    data = params.data
    reader = IMPORTERS.get(data.source)
    if reader is None:  # config.DataParams admits only the registered sources
        raise ConfigError(f"data.source: unknown source {data.source!r}; valid: {', '.join(IMPORTERS)}")
    looks_like = sniff_source(data.raw_dir)
    if looks_like is not None and looks_like != data.source:
        raise ConfigError(
            f"{data.raw_dir}: this looks like {SOURCE_LOOKS[looks_like]}, but data.source is {data.source!r}: "
            f"set data.source={looks_like} (e.g. dvc exp run -S data.source={looks_like}, or a preset in params/)"
        )
    manifest = reader(Path(data.raw_dir), data)
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


def check_durations(manifest: Manifest, max_seconds: float) -> None:
    """DataError naming the clips longer than ``data.max_audio_seconds``: extraction would decode
    them whole (an hour of audio is GBs of memory), and no retrieval clip is that long."""
    long = [c for c in manifest.clips if c.duration > max_seconds]
    if long:
        shown = ", ".join(f"{manifest.audio_path(c)} ({c.duration:.1f} s)" for c in long[:5])
        more = f" and {len(long) - 5} more" if len(long) > 5 else ""
        raise DataError(
            f"{len(long)} clip(s) longer than data.max_audio_seconds={max_seconds:g}: {shown}{more}; "
            "cut them, drop them from the corpus, or raise data.max_audio_seconds"
        )


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
    check_durations(manifest, params.data.max_audio_seconds)
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
    if manifest.skipped:
        lines.append(f"  skipped {len(manifest.skipped)} clip(s) (data.on_error=skip; listed in the manifest):")
        lines += [f"    {c.split}: {c.reason}" for c in manifest.skipped]
    lines += [f"  note: {note}" for note in manifest.notes]
    return "\n".join(lines)
