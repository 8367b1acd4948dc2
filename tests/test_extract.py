"""The extraction driver: end to end, resume, never-corrupt output, bad clips, the CLI."""

from __future__ import annotations

import os
import runpy
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import yaml

from atric.audio import load_audio
from atric.errors import DataError
from atric.features import build_expert
from atric.features import extract as extract_module
from atric.features.base import AudioExpert
from atric.features.extract import FINGERPRINT_ATTR, audio_fingerprint, extract_features, work_dir
from atric.layout import FeatureFile, Layout, Manifest, ManifestClip, read_manifest, write_manifest

SR = 16000
DATASET = "Tiny"


def make_corpus(root: Path, durations: Sequence[float] = (0.6, 1.0, 0.3, 1.4, 0.8, 0.5, 1.2)) -> Layout:
    """Noise clips c0..cN in root/raw and a manifest putting them all in the train split."""
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    clips = []
    for i, seconds in enumerate(durations):
        sf.write(raw / f"c{i}.wav", (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32), SR)
        clips.append(ManifestClip(f"c{i}", "train", f"c{i}.wav", seconds, ("a sound",)))
    layout = Layout(DATASET, root)
    write_manifest(layout.manifest_path, Manifest(DATASET, "synth", SR, str(raw), tuple(clips)))
    return layout


class Counting(AudioExpert):
    """Wraps an expert; counts clips embedded and can fail on a chosen call (a simulated crash)."""

    def __init__(
        self, inner: AudioExpert, fail_on_call: int | None = None, nan_for_length: int | None = None
    ):
        self.inner = inner
        self.name, self.sample_rate, self.dim = inner.name, inner.sample_rate, inner.dim
        self.hop_seconds, self.checkpoint_hash, self.device = (
            inner.hop_seconds,
            inner.checkpoint_hash,
            inner.device,
        )
        self.calls = 0
        self.clips = 0
        self.fail_on_call = fail_on_call
        self.nan_for_length = nan_for_length

    def settings(self) -> dict:
        return self.inner.settings()

    def embed(self, waveforms):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        self.clips += len(waveforms)
        out = self.inner.embed(waveforms)
        if self.nan_for_length is not None:
            out = [
                np.full_like(o, np.nan) if w.shape[0] == self.nan_for_length else o
                for o, w in zip(out, waveforms)
            ]
        return out


@pytest.fixture(scope="module")
def logmel() -> AudioExpert:
    return build_expert("logmel", {})


def read_all(path: Path) -> dict[str, np.ndarray]:
    with FeatureFile(path, dim=128) as features:
        clip_ids = features.keys()
        return {k: features[k] for k in clip_ids}


def run(layout: Layout, expert: AudioExpert, **kwargs):
    kwargs.setdefault("batch_size", 2)
    kwargs.setdefault("on_error", "raise")
    return extract_features(
        read_manifest(layout.manifest_path), layout, expert, "train", progress=False, **kwargs
    )


def test_end_to_end(tmp_path: Path, logmel: AudioExpert) -> None:
    layout = make_corpus(tmp_path / "data")
    report = run(layout, logmel, batch_size=3)
    path = layout.features_path("logmel", "train")
    assert path == tmp_path / "data" / DATASET / "AudioExpert" / "logmel" / "train" / "logmel.h5"
    assert (report.clips, report.computed, report.reused, report.skipped) == (7, 7, 0, [])
    assert not work_dir(path).exists()
    manifest = read_manifest(layout.manifest_path)
    with FeatureFile(path, dim=128) as features:
        attrs = features.attrs
        assert features.keys() == [f"c{i}" for i in range(7)] or sorted(features.keys()) == [
            f"c{i}" for i in range(7)
        ]
        for clip in manifest.split("train"):
            expected = logmel.embed([load_audio(manifest.audio_path(clip), SR)])[0]
            np.testing.assert_array_equal(features[clip.clip_id], expected)
            assert features.shape(clip.clip_id) == (1 + int(clip.duration * SR) // 1600, 128)
    assert attrs["expert"] == "logmel" and attrs["sample_rate"] == SR and attrs["dim"] == 128
    assert (
        attrs["hop_seconds"] == 0.1 and attrs["checkpoint_hash"] == "none" and len(attrs["params_hash"]) == 64
    )

    again = run(layout, Counting(logmel))
    assert again.up_to_date and again.reused == 7
    # Other settings -> other params hash -> everything recomputed.
    other = Counting(build_expert("logmel", {"hop_seconds": 0.05}))
    report = run(layout, other)
    assert not report.up_to_date and other.clips == 7 and report.computed == 7
    assert read_all(path)["c1"].shape == (21, 128)


def test_resume_after_crash_recomputes_nothing_done(tmp_path: Path, logmel: AudioExpert, capfd) -> None:
    reference = make_corpus(tmp_path / "ref")
    run(reference, logmel)
    expected = read_all(reference.features_path("logmel", "train"))

    layout = make_corpus(tmp_path / "data")
    path = layout.features_path("logmel", "train")
    crashing = Counting(logmel, fail_on_call=3)  # batches of 2: clips c0..c3 finish, then a crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(layout, crashing)
    assert not path.exists()  # never a partial output
    assert sorted(p.name for p in work_dir(path).iterdir()) == ["shard_00000.h5", "shard_00001.h5"]

    resumed = Counting(logmel)
    report = run(layout, resumed)
    assert resumed.clips == 3 and (report.computed, report.reused) == (3, 4)
    assert "resuming an interrupted run (4 clips already done)" in capfd.readouterr().err
    result = read_all(path)
    assert list(result) == list(expected)
    for clip_id, array in expected.items():
        np.testing.assert_array_equal(result[clip_id], array)
    assert not work_dir(path).exists()
    # A resumed run writes the same bytes as an uninterrupted one (DVC hashes them).
    assert path.read_bytes() == reference.features_path("logmel", "train").read_bytes()


def test_shards_from_other_settings_are_discarded(tmp_path: Path, logmel: AudioExpert, capfd) -> None:
    layout = make_corpus(tmp_path / "data")
    with pytest.raises(RuntimeError):
        run(layout, Counting(logmel, fail_on_call=2))
    other = Counting(build_expert("logmel", {"n_mels": 64}))
    report = run(layout, other)
    assert other.clips == 7 and report.reused == 0
    assert "starting over" in capfd.readouterr().err
    with FeatureFile(layout.features_path("logmel", "train"), dim=64) as features:
        assert len(features) == 7 and features.attrs["dim"] == 64


def test_corrupt_clip_raises_naming_it_then_resumes(tmp_path: Path, logmel: AudioExpert) -> None:
    layout = make_corpus(tmp_path / "data")
    bad = tmp_path / "data" / "raw" / "c5.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00garbage")
    with pytest.raises(DataError) as err:
        run(layout, logmel)
    assert "'c5'" in str(err.value) and str(bad) in str(err.value)
    path = layout.features_path("logmel", "train")
    assert not path.exists() and len(list(work_dir(path).glob("shard_*.h5"))) == 2

    sf.write(bad, np.zeros(SR // 2, np.float32), SR)  # the user repairs the file
    counting = Counting(logmel)
    report = run(layout, counting)
    assert counting.clips == 3 and report.reused == 4 and len(read_all(path)) == 7


def test_skip_mode_counts_and_reports(tmp_path: Path, logmel: AudioExpert, capfd) -> None:
    layout = make_corpus(tmp_path / "data")
    (tmp_path / "data" / "raw" / "c2.wav").write_bytes(b"not audio")
    (tmp_path / "data" / "raw" / "c4.wav").unlink()
    nan_clip = int(1.2 * SR)  # c6's length: its features come back NaN
    report = run(layout, Counting(logmel, nan_for_length=nan_clip), on_error="skip")
    assert [c for c, _ in report.skipped] == ["c2", "c4", "c6"]
    assert "not found" in report.skipped[1][1] and "NaN" in report.skipped[2][1]
    assert report.computed == 4 and "3 skipped: c2, c4, c6" in report.summary()
    assert "skipped clip 'c2'" in capfd.readouterr().err
    path = layout.features_path("logmel", "train")
    assert sorted(read_all(path)) == ["c0", "c1", "c3", "c5"]
    with h5py.File(path) as h5:
        assert h5.attrs["skipped"] == '["c2", "c4", "c6"]'

    # Repair c2 and c4: a rerun reuses the 4 clips already in the output and computes c2, c4;
    # c6 still yields NaN, which on_error "raise" refuses, leaving the old output intact.
    for name in ("c2", "c4"):
        sf.write(tmp_path / "data" / "raw" / f"{name}.wav", np.zeros(SR // 4, np.float32), SR)
    before = path.read_bytes()
    counting = Counting(logmel, nan_for_length=nan_clip)
    with pytest.raises(DataError, match="clip 'c6'.*NaN"):
        run(layout, counting, on_error="raise")
    assert counting.clips == 3 and path.read_bytes() == before


def test_short_clip_padded_and_changed_audio_recomputed(tmp_path: Path, logmel: AudioExpert) -> None:
    layout = make_corpus(tmp_path / "data", durations=(0.0005, 0.5, 0.7))  # 8 samples
    path = layout.features_path("logmel", "train")
    run(layout, logmel)
    assert read_all(path)["c0"].shape == (1 + 3200 // 1600, 128)  # padded to one 0.2 s window

    wav = tmp_path / "data" / "raw" / "c1.wav"
    sf.write(wav, np.ones(SR, np.float32) * 0.05, SR)  # edited audio: other size and mtime
    os.utime(wav, ns=(1, 1))
    counting = Counting(logmel)
    report = run(layout, counting)
    assert counting.clips == 1 and (report.computed, report.reused) == (1, 2)
    assert read_all(path)["c1"].shape == (11, 128)
    # Clips reused from the previous output, one recomputed: the bytes of a fresh run.
    fresh = make_corpus(tmp_path / "fresh", durations=(0.0005, 0.5, 0.7))
    shutil.copy(wav, tmp_path / "fresh" / "raw" / "c1.wav")
    run(fresh, logmel)
    assert path.read_bytes() == fresh.features_path("logmel", "train").read_bytes()


def test_fingerprints_are_of_the_decoded_bytes_and_hashed_up_front_only_to_reuse(
    tmp_path: Path, logmel: AudioExpert, monkeypatch
) -> None:
    layout = make_corpus(tmp_path / "data", durations=(0.5, 0.7, 0.3))

    def hashed_up_front(path: Path) -> str:
        raise AssertionError(f"{path} hashed up front: nothing to reuse in a fresh run")

    monkeypatch.setattr(extract_module, "audio_fingerprint", hashed_up_front)
    run(layout, logmel)
    monkeypatch.undo()
    manifest = read_manifest(layout.manifest_path)
    with h5py.File(layout.features_path("logmel", "train")) as h5:
        for clip in manifest.split("train"):
            stored = h5[clip.clip_id].attrs[FINGERPRINT_ATTR]
            assert stored == audio_fingerprint(manifest.audio_path(clip))
            assert stored.startswith(f"{manifest.audio_path(clip).stat().st_size}:")
    assert run(layout, Counting(logmel)).up_to_date  # the rerun hashes up front, and reuses all
    # Other settings: nothing in the output can be reused, so nothing is hashed up front.
    monkeypatch.setattr(extract_module, "audio_fingerprint", hashed_up_front)
    other = Counting(build_expert("logmel", {"n_mels": 64}))
    assert run(layout, other).computed == 3 and other.clips == 3


def test_cli(tmp_path: Path, monkeypatch, capsys) -> None:
    make_corpus(tmp_path / "data", durations=(0.5, 0.6))
    params = {
        "data": {"dataset": DATASET, "root": "data"},
        "features": {"experts": ["logmel"], "batch_size": 1},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    script = str(Path(__file__).resolve().parents[1] / "src" / "extract.py")

    def cli(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["extract.py", *args])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(script, run_name="__main__")
        return int(exit_.value.code or 0)

    assert cli("--no-progress") == 0
    out = capsys.readouterr().out
    assert "logmel/train: 2 clips written" in out and "logmel/val: no clips" in out
    assert Path("data", DATASET, "AudioExpert", "logmel", "train", "logmel.h5").exists()
    assert cli("--expert", "mfcc") == 2
    assert "unknown audio expert 'mfcc'" in capsys.readouterr().err
    assert cli("--expert", "vggish", "--set", "features.vggish.checkpoint=missing.pth") == 2
    assert "missing.pth: vggish weights not found" in capsys.readouterr().err
