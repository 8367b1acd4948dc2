"""The embedded default corpus: procedurally generated captioned audio (see DESIGN.md).

``synthesize_corpus`` writes ``<raw_dir>/audio/<split>/<clip_id>.wav`` (16-bit PCM mono) and
``<raw_dir>/captions.json``::

    {"format": "atric-synth-v1", "dataset": "SynthCaps", "sample_rate": 16000,
     "params": {...}, "params_hash": "...",
     "clips": [{"clip_id": "synth_train_00000", "split": "train",
                "file": "audio/train/synth_train_00000.wav", "duration": 6.25,
                "captions": [5 strings],
                "events": [{"type": "dog_bark", "onset": 0.5, "duration": 1.2,
                            "gain_db": -6.0, "modifier": "loud"}, ...]}]}

``modifier`` is one of loud, quiet, distant, briefly, or null; ``gain_db`` is relative to the
common event level (RMS -14 dBFS) before the clip is scaled down to avoid clipping.

Determinism: every clip draws from its own numpy SeedSequence keyed by (seed, split, index),
so the same params give byte-identical files and resizing one split leaves the others alone.
Clips 2k and 2k+1 of a split share their event types in different orders, so a model that
ignores temporal order cannot tell them apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from scipy import signal
from tqdm import tqdm

from atric.config import DataParams
from atric.corpus.captions import CaptionEvent, event_relations, heldout_overlap, make_captions
from atric.corpus.events import EVENT_TYPES, render_event
from atric.corpus.sounds import pink_noise
from atric.errors import DataError
from atric.layout import SPLITS, Manifest, ManifestClip

__all__ = ["heldout_overlap", "make_clip", "params_hash", "read_synth_raw", "synthesize_corpus"]

FORMAT = "atric-synth-v1"
DATASET = "SynthCaps"
GENERATOR_VERSION = 1  # bump when the audio or captions change for the same params
CAPTIONS_FILE = "captions.json"
AUDIO_DIR = "audio"

# Probabilities of each modifier (None: the event is described plainly).
MODIFIER_WEIGHTS: dict[str | None, float] = {
    None: 0.5,
    "loud": 0.12,
    "quiet": 0.13,
    "distant": 0.13,
    "briefly": 0.12,
}
GAIN_DB: dict[str | None, tuple[float, float]] = {
    None: (-8.0, -4.0),
    "loud": (-1.5, 0.0),
    "quiet": (-16.0, -12.0),  # still ~7 dB above the default background noise
    "distant": (-12.0, -8.0),
    "briefly": (-8.0, -4.0),
}
BRIEF_DURATION = (0.25, 0.5)
OVERLAP_PROBABILITY = 0.3
THEN_GAP = (0.1, 0.6)  # silence between sequential events, seconds
OVERLAP_START = (0.15, 0.6)  # an overlapping event starts this fraction into the previous one
EDGE_MARGIN = 0.1  # seconds kept free at both ends of a clip
NOISE_DB_SPREAD = 3.0
PEAK_LIMIT = 0.97

_SPLIT_KEYS = {"train": 0, "val": 1, "test": 2}
_PURPOSE_PAIR, _PURPOSE_CLIP = 0, 1


@dataclass(frozen=True)
class SynthEvent:
    type: str
    onset: float
    duration: float
    gain_db: float
    modifier: str | None


@dataclass(frozen=True)
class SynthResult:
    raw_dir: Path
    status: str  # "written" or "up-to-date"
    clips: int
    seconds: float


def params_hash(data: DataParams) -> str:
    """Hash of everything that determines the corpus bytes."""
    return hashlib.sha256(json.dumps(_params_record(data), sort_keys=True).encode()).hexdigest()[:16]


def _params_record(data: DataParams) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "generator_version": GENERATOR_VERSION,
        "sample_rate": data.sample_rate,
        "seed": data.seed,
        "synth": data.synth.model_dump(),
    }


def clip_id(split: str, index: int) -> str:
    return f"synth_{split}_{index:05d}"


def _seed_sequence(seed: int, split: str, index: int, purpose: int) -> np.random.SeedSequence:
    # SeedSequence needs non-negative entropy; spawn keys separate splits, clips and purposes.
    return np.random.SeedSequence(seed % 2**64, spawn_key=(_SPLIT_KEYS[split], index, purpose))


# ---------------------------------------------------------------- planning
def _event_types_for(data: DataParams, split: str, index: int) -> list[str]:
    """Event types in onset order; clips 2k and 2k+1 share a set in different orders."""
    pair_rng = np.random.default_rng(_seed_sequence(data.seed, split, index // 2, _PURPOSE_PAIR))
    names = sorted(EVENT_TYPES)
    max_events = min(data.synth.max_events, len(names))
    # Single events are half as likely as each multi-event count: order is what we want to test.
    weights = np.array([0.5 if k == 1 else 1.0 for k in range(1, max_events + 1)])
    count = int(pair_rng.choice(np.arange(1, max_events + 1), p=weights / weights.sum()))
    types = [names[int(k)] for k in pair_rng.choice(len(names), size=count, replace=False)]
    if index % 2 == 1 and count > 1:
        order = pair_rng.permutation(count)
        while np.array_equal(order, np.arange(count)):
            order = pair_rng.permutation(count)
        types = [types[int(k)] for k in order]
    return types


def plan_clip(
    data: DataParams, split: str, index: int, rng: np.random.Generator
) -> tuple[float, list[SynthEvent]]:
    """Clip duration and its events (sorted by onset) with times rounded to milliseconds."""
    synth = data.synth
    duration = round(float(rng.uniform(synth.min_duration, synth.max_duration)), 2)
    duration = min(max(duration, synth.min_duration), synth.max_duration)
    types = _event_types_for(data, split, index)
    modifier_names = list(MODIFIER_WEIGHTS)
    modifier_p = np.array(list(MODIFIER_WEIGHTS.values()))
    modifiers = [
        modifier_names[int(rng.choice(len(modifier_names), p=modifier_p / modifier_p.sum()))] for _ in types
    ]
    lengths = [
        float(rng.uniform(*(BRIEF_DURATION if m == "briefly" else EVENT_TYPES[t].duration)))
        for t, m in zip(types, modifiers, strict=True)
    ]
    starts = [0.0]
    latest_end = lengths[0]
    for i in range(1, len(types)):
        if rng.random() < OVERLAP_PROBABILITY:
            start = starts[i - 1] + float(rng.uniform(*OVERLAP_START)) * lengths[i - 1]
        else:
            start = latest_end + float(rng.uniform(*THEN_GAP))
        starts.append(start)
        latest_end = max(latest_end, start + lengths[i])
    # Squeeze the whole timeline uniformly if it does not fit: relations survive scaling.
    available = max(duration - 2 * EDGE_MARGIN, duration * 0.5)
    scale = min(1.0, available / latest_end)
    offset = float(rng.uniform(0.0, max(available - latest_end * scale, 0.0))) + (duration - available) / 2
    events = [
        SynthEvent(
            type=t,
            onset=round(offset + s * scale, 3),
            duration=round(max(length * scale, 0.01), 3),
            gain_db=round(float(rng.uniform(*GAIN_DB[m])), 1),
            modifier=m,
        )
        for t, m, s, length in zip(types, modifiers, starts, lengths, strict=True)
    ]
    return duration, events


# ---------------------------------------------------------------- rendering
def _distant(audio: np.ndarray, rng: np.random.Generator, sr: int) -> np.ndarray:
    """Far away: high frequencies absorbed, plus a diffuse reverberant tail."""
    # A gentle first-order slope: high-pitched events (rain, hiss) are muffled, not erased.
    cutoff = min(float(rng.uniform(1200, 3000)), 0.45 * sr)
    dull = signal.sosfilt(signal.butter(1, cutoff, btype="lowpass", fs=sr, output="sos"), audio)
    tail_len = int(rng.uniform(0.3, 0.6) * sr)
    impulse = rng.standard_normal(tail_len) * np.exp(-np.arange(tail_len) / (0.12 * sr))
    wet = signal.fftconvolve(dull, impulse)
    wet *= np.sqrt(np.mean(dull**2) / max(np.mean(wet**2), 1e-12))
    out = 0.6 * wet
    out[: dull.size] += 0.5 * dull
    # Same RMS as the input: "distant" is set by its gain_db, not by how much the filter removed
    # (a low-passed rain would otherwise vanish under the background noise).
    return out * np.sqrt(np.mean(audio**2) / max(float(np.mean(out[: audio.size] ** 2)), 1e-12))


def render_clip(
    duration: float, events: list[SynthEvent], sr: int, noise_db: float, rng: np.random.Generator
) -> np.ndarray:
    """Mix the events over background noise; int16 samples, scaled down only if they would clip."""
    n = round(duration * sr)
    mix = np.zeros(n)
    for event in events:
        audio = render_event(event.type, rng, round(event.duration * sr), sr) * 10 ** (
            event.gain_db / 20
        )
        if event.modifier == "distant":
            audio = _distant(audio, rng, sr)
        start = round(event.onset * sr)
        stop = min(n, start + audio.size)
        mix[start:stop] += audio[: stop - start]
    noise = pink_noise(rng, n)
    noise_level = 10 ** ((noise_db + float(rng.uniform(-NOISE_DB_SPREAD, NOISE_DB_SPREAD))) / 20)
    mix += noise * noise_level / max(float(np.sqrt(np.mean(noise**2))), 1e-12)
    peak = float(np.max(np.abs(mix)))
    if peak > PEAK_LIMIT:
        mix *= PEAK_LIMIT / peak
    return np.round(mix * 32767).astype(np.int16)


def make_clip(data: DataParams, split: str, index: int) -> tuple[dict[str, Any], np.ndarray]:
    """One clip's captions.json record and its int16 samples; depends only on (params, split, index)."""
    plan_seq, render_seq, caption_seq = _seed_sequence(data.seed, split, index, _PURPOSE_CLIP).spawn(3)
    duration, events = plan_clip(data, split, index, np.random.default_rng(plan_seq))
    audio = render_clip(
        duration, events, data.sample_rate, data.synth.noise_db, np.random.default_rng(render_seq)
    )
    caption_events = [CaptionEvent(e.type, e.onset, e.duration, e.modifier) for e in events]
    captions = make_captions(caption_events, split, np.random.default_rng(caption_seq))
    name = clip_id(split, index)
    record = {
        "clip_id": name,
        "split": split,
        "file": f"{AUDIO_DIR}/{split}/{name}.wav",
        "duration": duration,
        "captions": captions,
        "events": [asdict(e) for e in events],
    }
    return record, audio


# ---------------------------------------------------------------- writing
def _corpus_state(raw_dir: Path, expected_hash: str) -> str:
    """ "absent", "same" (identical corpus present) or "other-synth"; refuses anything else."""
    if not raw_dir.exists():
        return "absent"
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: exists and is not a directory; refusing to replace it")
    entries = sorted(os.listdir(raw_dir))
    if not entries:
        return "absent"
    refusal = (
        f"{raw_dir}: holds files that are not a synthesized corpus; refusing to overwrite them. "
        "Move them away, or point data.raw_dir elsewhere (and data.source at clotho/audiocaps "
        "to prepare a real corpus)"
    )
    unexpected = [e for e in entries if e not in (AUDIO_DIR, CAPTIONS_FILE)]
    if unexpected:
        raise DataError(f"{refusal}; unexpected: {', '.join(unexpected[:5])}")
    try:
        doc = json.loads((raw_dir / CAPTIONS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{refusal}; {CAPTIONS_FILE} is missing or unreadable") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"{refusal}; {CAPTIONS_FILE} is not in format {FORMAT!r}")
    if doc.get("params_hash") == expected_hash and all(
        isinstance(c, dict) and (raw_dir / str(c.get("file", ""))).is_file() for c in doc.get("clips", [])
    ):
        return "same"
    return "other-synth"


def synthesize_corpus(data: DataParams, force: bool = False, progress: bool = True) -> SynthResult:
    """Generate the corpus into ``data.raw_dir`` atomically (temp dir beside it, then rename).

    Skips the work if an identical corpus is already there (unless ``force``); refuses, with a
    DataError, to replace a directory that is not a synthesized corpus.
    """
    started = time.perf_counter()
    raw_dir = Path(data.raw_dir)
    expected_hash = params_hash(data)
    state = _corpus_state(raw_dir, expected_hash)
    sizes = data.synth.clips
    total = sizes.train + sizes.val + sizes.test
    if state == "same" and not force:
        return SynthResult(raw_dir, "up-to-date", total, time.perf_counter() - started)

    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{raw_dir.name}.tmp-", dir=raw_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the corpus should be an ordinary directory
    try:
        records = []
        with tqdm(total=total, desc="synthesize", unit="clip", disable=not progress) as bar:
            for split in SPLITS:
                (staging / AUDIO_DIR / split).mkdir(parents=True)
                for index in range(getattr(sizes, split)):
                    record, audio = make_clip(data, split, index)
                    sf.write(
                        staging / record["file"], audio, data.sample_rate, subtype="PCM_16", format="WAV"
                    )
                    records.append(record)
                    bar.update(1)
        doc = {
            "format": FORMAT,
            "dataset": DATASET,
            "sample_rate": data.sample_rate,
            "params": _params_record(data),
            "params_hash": expected_hash,
            "clips": records,
        }
        text = json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        (staging / CAPTIONS_FILE).write_text(text, encoding="utf-8")
        _swap_into_place(staging, raw_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SynthResult(raw_dir, "written", total, time.perf_counter() - started)


def _swap_into_place(staging: Path, raw_dir: Path) -> None:
    # Two renames: a crash between them leaves no raw_dir and the old corpus beside it, never a mix.
    if raw_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{raw_dir.name}.old-", dir=raw_dir.parent))
        old.rmdir()
        os.rename(raw_dir, old)
        os.rename(staging, raw_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, raw_dir)


# ---------------------------------------------------------------- reading
def read_synth_raw(raw_dir: str | Path) -> Manifest:
    """The synthesized corpus as a Manifest (audio paths relative to ``raw_dir``)."""
    raw_dir = Path(raw_dir)
    path = raw_dir / CAPTIONS_FILE
    if not path.exists():
        raise DataError(f"{path}: not found (run `python src/synthesize.py` to generate the corpus)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise DataError(f"{path}: expected format {FORMAT!r}, found {found!r}")
    if not isinstance(doc.get("clips"), list):
        raise DataError(f"{path}: expected a 'clips' list")
    clips = []
    for i, entry in enumerate(doc["clips"]):
        try:
            captions = entry["captions"]
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise TypeError("'captions' must be a list of strings")
            events = entry.get("events", [])
            if not isinstance(events, list):
                raise TypeError("'events' must be a list")
            clip = ManifestClip(
                clip_id=str(entry["clip_id"]),
                split=str(entry["split"]),
                audio=str(entry["file"]),
                duration=float(entry["duration"]),
                captions=tuple(captions),
                extra={"events": events},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(
                f"{path}: clips[{i}] needs clip_id, split, file, duration, captions ({exc!r})"
            ) from exc
        if clip.split not in SPLITS:
            raise DataError(f"{path}: clips[{i}] ({clip.clip_id!r}) has unknown split {clip.split!r}")
        clips.append(clip)
    try:
        sample_rate = int(doc["sample_rate"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: missing or invalid 'sample_rate' ({exc!r})") from exc
    return Manifest(
        dataset=str(doc.get("dataset", DATASET)),
        source="synth",
        sample_rate=sample_rate,
        audio_root=str(raw_dir),
        clips=tuple(clips),
    )


def describe(manifest: Manifest) -> dict[str, Any]:
    """Counts for the CLI summary."""
    return {
        "clips": {split: len(manifest.split(split)) for split in SPLITS},
        "event_types": len({e["type"] for c in manifest.clips for e in c.extra.get("events", [])}),
        "heldout_overlap": heldout_overlap(manifest),
    }


def relations_of(events: list[dict[str, Any]]) -> list[str]:
    """ "then"/"overlap" between consecutive events of a captions.json event list."""
    return event_relations(
        [CaptionEvent(e["type"], e["onset"], e["duration"], e["modifier"]) for e in events]
    )
