"""The extraction driver: a manifest split -> one HDF5 feature file per expert.

Resumable and never corrupt. Clips are streamed in batches; each finished batch
becomes one shard ``<expert>.h5.parts/shard_XXXXX.h5`` beside the output, written
to a temp name and renamed, so a shard exists only when complete. A rerun reuses
clips found in complete shards (and in an existing output) whose params hash and
audio fingerprint still match, computes the rest, then merges everything into the
output through a temp file and a rename, and removes the shards.

Per clip we record the audio file's fingerprint (size and content hash), so an edited or
regenerated audio file is recomputed while untouched clips are reused. The fingerprint
stored with a clip is the hash of the very bytes that were decoded (each file is read
once, in the decoding thread). A file is hashed beforehand only to decide whether its clip
can be reused, i.e. when an output or shard with the same params hash holds it: never in a
``dvc repro``, since DVC removes a stage's outputs before running it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
from tqdm import tqdm

from atric.atomic import atomic_path, output_error, write_bytes_atomic
from atric.audio import load_audio
from atric.config import Params
from atric.device import resolve_device
from atric.errors import DataError
from atric.features.base import AudioExpert, build_expert, params_hash
from atric.layout import SPLITS, Layout, Manifest, ManifestClip, check_feature_array, read_manifest

# Bump when the extraction code changes its output for the same settings and weights.
# 2: mel products exact in float64 (thread-count independent), aisfx's batch norms folded
#    into its convolutions: values differ from version 1 by float32 rounding (~1e-6 relative).
FORMAT_VERSION = 2
SHARD_GLOB = "shard_*.h5"
FINGERPRINT_ATTR = "audio_fingerprint"

OnError = Literal["raise", "skip"]


@dataclass
class ExtractReport:
    expert: str
    split: str
    path: Path
    clips: int = 0  # clips in the split
    computed: int = 0
    reused: int = 0  # taken from shards of an interrupted run or from the previous output
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (clip id, reason)
    silent: list[str] = field(default_factory=list)  # clips computed here whose audio is all zeros
    up_to_date: bool = False
    audio_seconds: float = 0.0  # audio computed in this run
    compute_seconds: float = 0.0

    def summary(self) -> str:
        if self.up_to_date:
            return f"{self.expert}/{self.split}: up to date ({self.clips} clips) {self.path}"
        speed = (
            f", {self.audio_seconds / self.compute_seconds:.1f}x real time"
            if self.compute_seconds > 0 and self.audio_seconds > 0
            else ""
        )
        text = (
            f"{self.expert}/{self.split}: {self.clips - len(self.skipped)} clips written to {self.path} "
            f"({self.computed} computed, {self.reused} reused{speed})"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} skipped: " + ", ".join(c for c, _ in self.skipped[:10])
            text += " ..." if len(self.skipped) > 10 else ""
        if self.silent:
            # Kept (a silent recording is a valid clip), but worth knowing: its features are constant.
            text += f"; {len(self.silent)} silent (all-zero audio): " + ", ".join(self.silent[:10])
            text += " ..." if len(self.silent) > 10 else ""
        return text


def work_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def audio_fingerprint(path: Path) -> str:
    """Size and a hash of the file's bytes: not its mtime, which differs between two checkouts of
    the same corpus and would make the feature files (DVC outputs) differ byte for byte."""
    try:
        digest = hashlib.blake2b(digest_size=16)
        size = 0
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
        return f"{size}:{digest.hexdigest()}"
    except OSError:
        return "missing"


def bytes_fingerprint(data: bytes) -> str:
    """``audio_fingerprint`` of a file whose bytes are ``data``."""
    return f"{len(data)}:{hashlib.blake2b(data, digest_size=16).hexdigest()}"


class _Fingerprints:
    """Clip id -> audio fingerprint, each hashed only when first asked for.

    Reuse decisions ask only for the clips found in an output or shard made with the same
    params hash, so a fresh run (and every ``dvc repro``, which removes a stage's outputs
    first) or a run with new settings hashes nothing up front; clips computed in this run
    get the hash of the bytes their decoding read (``record``).
    """

    def __init__(self, paths: dict[str, Path]) -> None:
        self._paths = paths
        self._known: dict[str, str] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __contains__(self, clip_id: object) -> bool:
        return clip_id in self._paths

    def get(self, clip_id: str) -> str | None:
        if clip_id not in self._paths:
            return None
        if clip_id not in self._known:
            self._known[clip_id] = audio_fingerprint(self._paths[clip_id])
        return self._known[clip_id]

    def __getitem__(self, clip_id: str) -> str:
        value = self.get(clip_id)
        if value is None:
            raise KeyError(clip_id)
        return value

    def record(self, clip_id: str, fingerprint: str) -> None:
        self._known[clip_id] = fingerprint


def _describe(expert: AudioExpert) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, **expert.describe()}


def _log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


class _Done:
    """Where each already-computed clip lives: the previous output or a complete shard."""

    def __init__(self) -> None:
        self.source: dict[str, Path] = {}

    def scan(self, path: Path, phash: str, fingerprints: _Fingerprints) -> bool:
        """Register the usable clips in ``path``; False if its params hash differs."""
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("params_hash") != phash:
                return False
            dim = h5.attrs.get("dim")
            bad = []
            for clip_id, node in h5.items():
                if fingerprints.get(clip_id) == node.attrs.get(FINGERPRINT_ATTR):
                    if _reusable(node, None if dim is None else int(dim)):
                        self.source[clip_id] = path
                    else:
                        bad.append(clip_id)
        if bad:
            _log(
                f"{path}: {len(bad)} clip(s) fail re-validation (shape, dim or NaN/inf), e.g. {bad[0]!r}; recomputing them"
            )
        return True


def _reusable(node: object, dim: int | None) -> bool:
    """A stored clip is reused only if it is still a finite float [T >= 1, dim] array."""
    if not isinstance(node, h5py.Dataset) or node.ndim != 2 or node.shape[0] < 1 or node.dtype.kind != "f":
        return False
    if dim is not None and node.shape[1] != dim:
        return False
    return bool(np.isfinite(node[()]).all())


def _previous_output(output: Path, phash: str, fingerprints: _Fingerprints, done: _Done) -> bool:
    """Reuse an existing output's clips; True if it already holds exactly the split's clips."""
    if not output.exists():
        return False
    try:
        if not done.scan(output, phash, fingerprints):
            _log(f"{output}: made with other settings or weights; recomputing")
            return False
        with h5py.File(output, "r") as h5:
            exact = set(h5.keys()) == set(fingerprints)
    except OSError as exc:
        _log(f"{output}: unreadable ({exc}); recomputing")
        return False
    return exact and all(done.source.get(c) == output for c in fingerprints)


def _scan_shards(parts: Path, phash: str, fingerprints: _Fingerprints, done: _Done) -> None:
    if not parts.is_dir():
        return
    shards = sorted(parts.glob(SHARD_GLOB))
    for shard in shards:
        try:
            matches = done.scan(shard, phash, fingerprints)
        except OSError as exc:  # renamed only when complete, so this is disk damage: redo its clips
            _log(f"{shard}: unreadable ({exc}); its clips will be recomputed")
            continue
        if not matches:
            _log(f"{parts}: partial results were made with other settings or weights; starting over")
            for clip_id in [c for c, source in done.source.items() if source.parent == parts]:
                del done.source[clip_id]
            shutil.rmtree(parts)
            return
    if shards:
        reused = sum(1 for p in done.source.values() if p.parent == parts)
        _log(f"{parts}: resuming an interrupted run ({reused} clips already done)")


def _next_shard_index(parts: Path) -> int:
    indices = [int(p.stem.split("_")[1]) for p in parts.glob(SHARD_GLOB) if p.stem.split("_")[1].isdigit()]
    return max(indices, default=-1) + 1


Loaded = tuple[ManifestClip, "np.ndarray | DataError", str]  # clip, waveform or error, fingerprint


def _load_clip(manifest: Manifest, clip: ManifestClip, sample_rate: int) -> Loaded:
    """Read the file once: its fingerprint is the hash of exactly the bytes decoded."""
    path = manifest.audio_path(clip)
    try:
        data = path.read_bytes()
    except OSError as exc:  # the messages load_audio gives
        reason = "audio file not found" if isinstance(exc, FileNotFoundError) else f"cannot read audio: {exc}"
        return clip, DataError(f"{path} (clip {clip.clip_id!r}): {reason}"), "missing"
    try:
        waveform = load_audio(path, sample_rate, clip.clip_id, data=data)
    except DataError as exc:
        return clip, exc, "missing"
    return clip, waveform, bytes_fingerprint(data)


def _load_batch(manifest: Manifest, clips: Sequence[ManifestClip], sample_rate: int) -> list[Loaded]:
    return [_load_clip(manifest, clip, sample_rate) for clip in clips]


def _prefetched(
    manifest: Manifest, batches: list[list[ManifestClip]], sample_rate: int
) -> Iterator[list[Loaded]]:
    """Decode the next batch in a thread while the expert works on this one."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future[Any] | None = None
        for i in range(len(batches)):
            current = pending.result() if pending else _load_batch(manifest, batches[i], sample_rate)
            pending = (
                pool.submit(_load_batch, manifest, batches[i + 1], sample_rate)
                if i + 1 < len(batches)
                else None
            )
            yield current


def _write_shard(path: Path, phash: str, rows: list[tuple[str, np.ndarray, str]]) -> None:
    """A shard built in memory, then written with one plain write: a full disk is a clean
    OSError (an HDF5 file that fails mid-write left h5py objects that crashed the interpreter)."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.attrs["params_hash"] = phash
        for clip_id, array, fingerprint in rows:
            h5.create_dataset(clip_id, data=array, track_times=False).attrs[FINGERPRINT_ATTR] = fingerprint
    write_bytes_atomic(path, buffer.getbuffer())


def _check_space_for(output: Path, sources: Sequence[Path]) -> None:
    """OutputError before merging when the output's folder has less room than its sources take:
    HDF5 failing mid-write cannot be recovered from cleanly (the process crashed at exit)."""
    need = sum(p.stat().st_size for p in set(sources) if p.exists())
    output.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(output.parent).free
    if need > free:
        raise output_error(OSError(errno.ENOSPC, f"{need} bytes needed, {free} free"), output)


def _merge(
    output: Path,
    order: Sequence[str],
    done: _Done,
    attrs: dict[str, Any],
) -> None:
    """Write the output from its sources in manifest order, through a temp file."""
    handles: dict[Path, h5py.File] = {}
    _check_space_for(output, [source for clip_id in order if (source := done.source.get(clip_id)) is not None])
    try:
        with atomic_path(output) as tmp, h5py.File(tmp, "w") as out:
            for key in sorted(attrs):  # sorted, and no timestamps: byte-identical outputs (issue #14)
                out.attrs[key] = attrs[key]
            for clip_id in order:
                source = done.source.get(clip_id)
                if source is None:
                    continue  # skipped (on_error: skip)
                if source not in handles:
                    handles[source] = h5py.File(source, "r")
                node = handles[source][clip_id]
                data = check_feature_array(node[()], f"{source}:{clip_id}", int(attrs["dim"]))
                if node.dtype == np.float32 and set(node.attrs) == {FINGERPRINT_ATTR}:
                    # HDF5's own object copy (data and attribute as stored): half the time of
                    # writing them again through h5py, and just as deterministic.
                    handles[source].copy(node, out, name=clip_id)
                else:
                    dataset = out.create_dataset(clip_id, data=data, track_times=False)
                    dataset.attrs[FINGERPRINT_ATTR] = node.attrs[FINGERPRINT_ATTR]
            # Close sources before the rename: the previous output may be one of them.
            for handle in handles.values():
                handle.close()
            handles.clear()
    finally:
        for handle in handles.values():
            handle.close()


def _check_clip_ids(clips: Sequence[ManifestClip], where: str) -> None:
    seen: set[str] = set()
    for clip in clips:
        if not clip.clip_id or "/" in clip.clip_id or clip.clip_id in seen:
            raise DataError(f"{where}: clip id {clip.clip_id!r} is empty, contains '/', or is duplicated")
        seen.add(clip.clip_id)


def extract_features(
    manifest: Manifest,
    layout: Layout,
    expert: AudioExpert,
    split: str,
    *,
    batch_size: int = 16,
    on_error: OnError = "raise",
    progress: bool = True,
) -> ExtractReport:
    """Extract ``expert`` features for every clip of ``split`` into ``layout.features_path``.

    on_error "raise": a bad clip (unreadable audio, NaN/inf features) raises DataError
    naming it; shards written so far are kept, so the rerun resumes. "skip": the clip
    is left out of the output and listed in the report.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    output = layout.features_path(expert.name, split)
    clips = manifest.split(split)
    report = ExtractReport(expert.name, split, output, clips=len(clips))
    if not clips:
        raise DataError(f"{layout.manifest_path}: split {split!r} has no clips")
    _check_clip_ids(clips, str(layout.manifest_path))

    description = _describe(expert)
    phash = params_hash(description)
    parts = work_dir(output)
    fingerprints = _Fingerprints({c.clip_id: manifest.audio_path(c) for c in clips})
    done = _Done()
    if _previous_output(output, phash, fingerprints, done):
        report.up_to_date = True
        report.reused = len(clips)
        return report
    _scan_shards(parts, phash, fingerprints, done)
    report.reused = sum(1 for c in clips if c.clip_id in done.source)

    todo = [c for c in clips if c.clip_id not in done.source]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    if todo:
        parts.mkdir(parents=True, exist_ok=True)
    shard_index = _next_shard_index(parts) if todo else 0
    bar = tqdm(
        total=len(todo), unit="clip", desc=f"{expert.name}/{split}", disable=not progress, file=sys.stderr
    )
    try:
        for loaded in _prefetched(manifest, batches, expert.sample_rate):
            good: list[tuple[ManifestClip, np.ndarray]] = []
            for clip, result, fingerprint in loaded:
                if isinstance(result, DataError):
                    _clip_failed(report, clip, result, on_error)
                else:
                    good.append((clip, result))
                    fingerprints.record(clip.clip_id, fingerprint)
            rows: list[tuple[str, np.ndarray, str]] = []
            if good:
                start = time.perf_counter()
                arrays = expert.embed([w for _, w in good])
                report.compute_seconds += time.perf_counter() - start
                if len(arrays) != len(good):
                    raise RuntimeError(
                        f"{expert.name}.embed returned {len(arrays)} arrays for {len(good)} clips"
                    )
                for (clip, wave), array in zip(good, arrays, strict=True):
                    where = f"{expert.name} features of clip {clip.clip_id!r} ({manifest.audio_path(clip)})"
                    try:
                        array = check_feature_array(array, where, expert.dim)
                    except DataError as exc:
                        _clip_failed(report, clip, exc, on_error)
                        continue
                    rows.append((clip.clip_id, array, fingerprints[clip.clip_id]))
                    report.audio_seconds += wave.shape[0] / expert.sample_rate
                    if not np.any(wave):
                        report.silent.append(clip.clip_id)
            if rows:
                shard = parts / f"shard_{shard_index:05d}.h5"
                _write_shard(shard, phash, rows)
                shard_index += 1
                for clip_id, _, _ in rows:
                    done.source[clip_id] = shard
                report.computed += len(rows)
            bar.update(len(loaded))
    finally:
        bar.close()

    if not any(c.clip_id in done.source for c in clips):
        raise DataError(
            f"{expert.name}/{split}: no clip could be extracted ({len(report.skipped)} skipped); "
            f"first error: {report.skipped[0][1] if report.skipped else 'none'}"
        )
    attrs = {
        **{k: v for k, v in description.items() if k != "settings"},
        "settings": json.dumps(description["settings"], sort_keys=True),
        "params_hash": phash,
        "dataset": manifest.dataset,
        "split": split,
        "skipped": json.dumps([c for c, _ in report.skipped]),
    }
    _merge(output, [c.clip_id for c in clips], done, attrs)
    if parts.exists():
        shutil.rmtree(parts)
    return report


def _clip_failed(report: ExtractReport, clip: ManifestClip, error: DataError, on_error: OnError) -> None:
    if on_error == "raise":
        raise error
    report.skipped.append((clip.clip_id, str(error)))
    _log(f"skipped clip {clip.clip_id!r}: {error}")


def run_extraction(
    params: Params,
    experts: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    progress: bool = True,
) -> list[ExtractReport]:
    """What ``src/extract.py`` does: every requested expert x split, from params.yaml."""
    features = params.features
    names = list(experts or features.experts)
    layout = Layout(params.data.dataset, params.data.root)
    manifest = read_manifest(layout.manifest_path)
    device = resolve_device(features.device)
    # Build all experts first: a bad setting or missing checkpoint fails before any work.
    built = {name: build_expert(name, features.expert_settings(name), device) for name in names}
    reports = []
    for name, expert in built.items():
        for split in splits or SPLITS:
            if not splits and not manifest.split(split):
                print(f"{name}/{split}: no clips in this split; nothing to extract", flush=True)
                continue
            report = extract_features(
                manifest,
                layout,
                expert,
                split,
                batch_size=features.batch_size,
                on_error=features.on_error,
                progress=progress,
            )
            print(report.summary(), flush=True)
            for clip_id, reason in report.skipped:
                print(f"  skipped {clip_id}: {reason}", flush=True)
            reports.append(report)
    return reports
