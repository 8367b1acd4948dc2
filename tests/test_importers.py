"""Clotho v2 and AudioCaps release trees -> Manifest; every kind of broken input is named.

The tree builders here are reused by tests/test_prepare.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from atric.corpus.audiocaps import read_audiocaps
from atric.corpus.clotho import read_clotho
from atric.errors import DataError
from atric.layout import SPLITS

RATE = 16000
CLOTHO_RELEASE = {"development": "train", "validation": "val", "evaluation": "test"}
CAPTION_COLUMNS = [f"caption_{i}" for i in range(1, 6)]


def write_tone(path: Path, seconds: float, rate: int = RATE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(seconds * rate))) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)


def clotho_captions(file_name: str) -> list[str]:
    return [f"caption {k} of {file_name}, with a comma" for k in range(1, 6)]


def make_clotho_tree(raw: Path, clips_per_split: int = 2) -> dict[str, dict[str, float]]:
    """A tiny Clotho v2 release; returns split -> {file_name: duration}."""
    expected: dict[str, dict[str, float]] = {}
    for r, (release, split) in enumerate(CLOTHO_RELEASE.items()):
        rows, durations = [], {}
        for i in range(clips_per_split):
            name = f"{release} sound {i}.wav"
            durations[name] = 0.1 * (r * clips_per_split + i + 1)
            write_tone(raw / release / name, durations[name])
            rows.append([name, *clotho_captions(name)])
        frame = pd.DataFrame(rows, columns=["file_name", *CAPTION_COLUMNS])
        frame.to_csv(raw / f"clotho_captions_{release}.csv", index=False)
        expected[split] = durations
    return expected


# AudioCaps: audio in every folder the lookup rule admits, in every accepted format.
AUDIOCAPS_AUDIO = {
    "train": {"tr_wav": "audio/tr_wav.wav", "tr_flac": "audio/tr_flac.flac", "-tr_ogg": "-tr_ogg.ogg"},
    "val": {"va_mp3": "audio/val/va_mp3.mp3", "va_wav": "audio/va_wav.wav"},
    "test": {"te_wav": "test/te_wav.wav", "te_flac": "audio/te_flac.flac"},
}


def audiocaps_captions(clip_id: str, split: str) -> list[str]:
    count = 1 if split == "train" and clip_id != "tr_flac" else 5  # one train clip has several
    return [f"{clip_id} caption {k}" for k in range(count)]


def make_audiocaps_tree(raw: Path) -> dict[str, dict[str, float]]:
    """A tiny AudioCaps release; returns split -> {youtube_id: duration}."""
    expected: dict[str, dict[str, float]] = {}
    cap_id = 100
    for s, split in enumerate(SPLITS):
        rows, durations = [], {}
        for i, (clip_id, rel) in enumerate(AUDIOCAPS_AUDIO[split].items()):
            durations[clip_id] = 0.25 * (s * 3 + i + 1)
            write_tone(raw / rel, durations[clip_id])
        # Round robin over clips: a clip's rows are not adjacent (grouping must not rely on
        # adjacency) but stay in caption order.
        for k in range(5):
            for clip_id in AUDIOCAPS_AUDIO[split]:
                captions = audiocaps_captions(clip_id, split)
                if k < len(captions):
                    cap_id += 1
                    rows.append([str(cap_id), clip_id, "30.0" if k else "30", captions[k]])
        frame = pd.DataFrame(rows, columns=["audiocap_id", "youtube_id", "start_time", "caption"])
        frame.to_csv(raw / f"{split}.csv", index=False)
        expected[split] = durations
    return expected


# ---------------------------------------------------------------- Clotho
def test_clotho_import(tmp_path: Path) -> None:
    expected = make_clotho_tree(tmp_path)
    manifest = read_clotho(tmp_path, sample_rate=44100)
    assert (manifest.dataset, manifest.source, manifest.sample_rate) == ("CLOTHO", "clotho", 44100)
    assert manifest.audio_root == str(tmp_path)
    for release, split in CLOTHO_RELEASE.items():
        clips = manifest.split(split)
        assert [c.clip_id for c in clips] == list(expected[split])  # CSV order kept
        for clip in clips:
            assert clip.captions == tuple(clotho_captions(clip.clip_id))
            assert clip.audio == f"{release}/{clip.clip_id}"
            assert manifest.audio_path(clip).is_file()
            assert clip.duration == pytest.approx(expected[split][clip.clip_id], abs=1e-6)


def _clotho_csv(raw: Path, release: str) -> pd.DataFrame:
    return pd.read_csv(raw / f"clotho_captions_{release}.csv", dtype=str, keep_default_na=False)


def _save_clotho_csv(raw: Path, release: str, frame: pd.DataFrame) -> None:
    frame.to_csv(raw / f"clotho_captions_{release}.csv", index=False)


def _clotho_missing_column(raw: Path) -> list[str]:
    _save_clotho_csv(raw, "validation", _clotho_csv(raw, "validation").drop(columns=["caption_5"]))
    return ["clotho_captions_validation.csv", "missing column(s) caption_5"]


def _clotho_missing_audio(raw: Path) -> list[str]:
    (raw / "development" / "development sound 1.wav").unlink()
    return [str(raw / "development" / "development sound 1.wav"), "'development sound 1.wav'", "not found"]


def _clotho_unreadable_audio(raw: Path) -> list[str]:
    path = raw / "evaluation" / "evaluation sound 0.wav"
    path.write_bytes(b"RIFF but not really audio" * 10)
    return [str(path), "'evaluation sound 0.wav'", "cannot read audio"]


def _clotho_zero_length_audio(raw: Path) -> list[str]:
    sf.write(raw / "validation" / "validation sound 0.wav", np.zeros(0, np.float32), RATE)
    return [str(raw / "validation" / "validation sound 0.wav"), "'validation sound 0.wav'", "zero length"]


def _clotho_empty_caption(raw: Path) -> list[str]:
    frame = _clotho_csv(raw, "validation")
    frame.loc[1, "caption_3"] = "  "
    _save_clotho_csv(raw, "validation", frame)
    return ["clotho_captions_validation.csv line 3", "'validation sound 1.wav'", "empty caption_3"]


def _clotho_listed_twice(raw: Path) -> list[str]:
    frame = _clotho_csv(raw, "development")
    _save_clotho_csv(raw, "development", pd.concat([frame, frame.iloc[[0]]]))
    return ["clotho_captions_development.csv line 4", "'development sound 0.wav' is listed twice"]


def _clotho_id_in_two_splits(raw: Path) -> list[str]:
    frame = _clotho_csv(raw, "evaluation")
    frame.loc[0, "file_name"] = "development sound 0.wav"
    _save_clotho_csv(raw, "evaluation", frame)
    write_tone(raw / "evaluation" / "development sound 0.wav", 0.1)
    return [
        "clotho_captions_evaluation.csv line 2",
        "'development sound 0.wav' is listed twice",
        "clotho_captions_development.csv line 2",
    ]


def _clotho_missing_csv(raw: Path) -> list[str]:
    (raw / "clotho_captions_evaluation.csv").unlink()
    return [str(raw / "clotho_captions_evaluation.csv"), "file not found"]


@pytest.mark.parametrize(
    "break_tree",
    [
        _clotho_missing_column,
        _clotho_missing_audio,
        _clotho_unreadable_audio,
        _clotho_zero_length_audio,
        _clotho_empty_caption,
        _clotho_listed_twice,
        _clotho_id_in_two_splits,
        _clotho_missing_csv,
    ],
)
def test_clotho_bad_input(tmp_path: Path, break_tree: Callable[[Path], list[str]]) -> None:
    make_clotho_tree(tmp_path)
    expected = break_tree(tmp_path)
    with pytest.raises(DataError) as err:
        read_clotho(tmp_path, sample_rate=RATE)
    for text in expected:
        assert text in str(err.value)


def test_clotho_reports_every_problem_at_once(tmp_path: Path) -> None:
    make_clotho_tree(tmp_path)
    (tmp_path / "development" / "development sound 0.wav").unlink()
    (tmp_path / "evaluation" / "evaluation sound 1.wav").unlink()
    with pytest.raises(DataError) as err:
        read_clotho(tmp_path, sample_rate=RATE)
    message = str(err.value)
    assert message.startswith("2 problems in the Clotho release")
    assert "development sound 0.wav" in message and "evaluation sound 1.wav" in message


# ---------------------------------------------------------------- AudioCaps
def test_audiocaps_import_every_folder_and_format(tmp_path: Path) -> None:
    expected = make_audiocaps_tree(tmp_path)
    # A second copy of a clip in a lossy format beside the wav: the wav wins.
    write_tone(tmp_path / "audio" / "tr_wav.mp3", 2.0)
    manifest = read_audiocaps(tmp_path, sample_rate=RATE)
    assert (manifest.dataset, manifest.source, manifest.sample_rate) == ("AudioCaps", "audiocaps", RATE)
    for split in SPLITS:
        clips = manifest.split(split)
        assert sorted(c.clip_id for c in clips) == sorted(expected[split])
        for clip in clips:
            assert clip.audio == AUDIOCAPS_AUDIO[split][clip.clip_id]
            assert list(clip.captions) == audiocaps_captions(clip.clip_id, split)
            assert clip.extra == {"start_time": 30.0}
            # mp3 encoders pad a few ms; the header frame count of lossless files is exact.
            tol = 0.06 if clip.audio.endswith((".mp3", ".ogg")) else 1e-6
            assert clip.duration == pytest.approx(expected[split][clip.clip_id], abs=tol)


def _ac_csv(raw: Path, split: str) -> pd.DataFrame:
    return pd.read_csv(raw / f"{split}.csv", dtype=str, keep_default_na=False)


def _ac_save(raw: Path, split: str, frame: pd.DataFrame) -> None:
    frame.to_csv(raw / f"{split}.csv", index=False)


def _ac_missing_column(raw: Path) -> list[str]:
    _ac_save(raw, "train", _ac_csv(raw, "train").drop(columns=["start_time"]))
    return [str(raw / "train.csv"), "missing column(s) start_time"]


def _ac_missing_audio(raw: Path) -> list[str]:
    (raw / "audio" / "va_wav.wav").unlink()
    return [str(raw / "audio" / "va_wav.wav"), "'va_wav'", "not found"]


def _ac_unreadable_audio(raw: Path) -> list[str]:
    (raw / "audio" / "tr_flac.flac").write_bytes(b"\x00garbage" * 50)
    return [str(raw / "audio" / "tr_flac.flac"), "'tr_flac'", "cannot read audio"]


def _ac_zero_length_audio(raw: Path) -> list[str]:
    sf.write(raw / "test" / "te_wav.wav", np.zeros(0, np.float32), RATE)
    return [str(raw / "test" / "te_wav.wav"), "'te_wav'", "zero length"]


def _ac_four_captions(raw: Path) -> list[str]:
    frame = _ac_csv(raw, "val")
    drop = frame.index[frame["youtube_id"] == "va_mp3"][-1]
    _ac_save(raw, "val", frame.drop(index=drop))
    return [str(raw / "val.csv"), "val clip 'va_mp3' has 4 captions", "exactly 5"]


def _ac_six_captions(raw: Path) -> list[str]:
    frame = _ac_csv(raw, "test")
    extra = frame[frame["youtube_id"] == "te_flac"].iloc[[0]].assign(audiocap_id="999")
    _ac_save(raw, "test", pd.concat([frame, extra]))
    return [str(raw / "test.csv"), "test clip 'te_flac' has 6 captions"]


def _ac_empty_caption(raw: Path) -> list[str]:
    frame = _ac_csv(raw, "train")
    row = frame.index[frame["youtube_id"] == "tr_wav"][0]
    frame.loc[row, "caption"] = ""
    _ac_save(raw, "train", frame)
    return [f"{raw / 'train.csv'} line {row + 2}", "'tr_wav' has an empty caption"]


def _ac_id_in_two_splits(raw: Path) -> list[str]:
    frame = _ac_csv(raw, "test")
    frame.loc[frame["youtube_id"] == "te_wav", "youtube_id"] = "tr_wav"
    _ac_save(raw, "test", frame)
    return [str(raw / "test.csv"), "'tr_wav' is also in the train split", str(raw / "train.csv")]


def _ac_duplicate_audiocap_id(raw: Path) -> list[str]:
    frame = _ac_csv(raw, "val")
    frame.loc[3, "audiocap_id"] = frame.loc[0, "audiocap_id"]
    _ac_save(raw, "val", frame)
    return [f"{raw / 'val.csv'} line 5", f"audiocap_id {frame.loc[0, 'audiocap_id']} is listed twice"]


def _ac_two_start_times(raw: Path) -> list[str]:
    frame = _ac_csv(raw, "train")
    extra = frame[frame["youtube_id"] == "-tr_ogg"].assign(audiocap_id="998", start_time="40")
    _ac_save(raw, "train", pd.concat([frame, extra]))
    return [str(raw / "train.csv"), "'-tr_ogg' is listed with start_time 40", "30"]


@pytest.mark.parametrize(
    "break_tree",
    [
        _ac_missing_column,
        _ac_missing_audio,
        _ac_unreadable_audio,
        _ac_zero_length_audio,
        _ac_four_captions,
        _ac_six_captions,
        _ac_empty_caption,
        _ac_id_in_two_splits,
        _ac_duplicate_audiocap_id,
        _ac_two_start_times,
    ],
)
def test_audiocaps_bad_input(tmp_path: Path, break_tree: Callable[[Path], list[str]]) -> None:
    make_audiocaps_tree(tmp_path)
    expected = break_tree(tmp_path)
    with pytest.raises(DataError) as err:
        read_audiocaps(tmp_path, sample_rate=RATE)
    for text in expected:
        assert text in str(err.value)


def test_missing_raw_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="AudioCaps raw folder not found"):
        read_audiocaps(tmp_path / "nope", sample_rate=RATE)
    with pytest.raises(DataError, match="Clotho raw folder not found"):
        read_clotho(tmp_path / "nope", sample_rate=RATE)
