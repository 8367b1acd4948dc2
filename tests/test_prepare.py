"""The prepare stage: raw release tree -> seed layout, through the real CLI; all or nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import types
import unicodedata
from pathlib import Path

import pandas as pd
import pytest
import yaml

from atric.config import load_params
from atric.corpus.prepare import prepare_dataset
from atric.errors import ConfigError, DataError
from atric.layout import SPLITS, Layout, Manifest, ManifestClip, read_index, read_manifest
from test_importers import (
    AUDIOCAPS_AUDIO,
    audiocaps_captions,
    clotho_captions,
    make_audiocaps_tree,
    make_clotho_tree,
    write_tone,
)

SRC = Path(__file__).resolve().parents[1] / "src"


def _write_params(tmp_path: Path, **data: object) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"data": {"raw_dir": "raw", "root": "data", **data}}))
    return path


def _run_prepare(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, str(SRC / "prepare.py"), "--params", "params.yaml", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _staging_leftovers(dataset_dir: Path) -> list[Path]:
    return list(dataset_dir.glob(".prepare-*")) + list(dataset_dir.rglob("*.tmp"))


def test_cli_prepares_clotho_as_json(tmp_path: Path) -> None:
    expected = make_clotho_tree(tmp_path / "raw")
    _write_params(tmp_path, source="clotho")  # dataset left out: defaults to CLOTHO
    result = _run_prepare(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "prepared CLOTHO" in result.stdout and "train       2 clips       10 captions" in result.stdout

    layout = Layout("CLOTHO", tmp_path / "data")
    for split in SPLITS:
        path = layout.index_path(split)
        assert path.name == f"{split}.json"
        clips = read_index(path, split)
        assert [c.clip_id for c in clips] == list(expected[split])
        assert all(c.captions == tuple(clotho_captions(c.clip_id)) for c in clips)
    manifest = read_manifest(layout.manifest_path)
    assert (manifest.dataset, manifest.source, manifest.audio_root) == ("CLOTHO", "clotho", "raw")
    assert len(manifest.clips) == 6
    assert all((tmp_path / manifest.audio_path(c)).is_file() for c in manifest.clips)
    assert _staging_leftovers(layout.dataset_dir) == []


def test_cli_prepares_audiocaps_as_csv(tmp_path: Path) -> None:
    make_audiocaps_tree(tmp_path / "raw")
    _write_params(tmp_path, source="synth")  # dataset left out: follows the source
    result = _run_prepare(tmp_path, "--set", "data.source=audiocaps")
    assert result.returncode == 0, result.stderr

    layout = Layout("AudioCaps", tmp_path / "data")
    for split in SPLITS:
        path = layout.index_path(split)
        assert path.name == f"{split}.csv"
        clips = {c.clip_id: c.captions for c in read_index(path, split)}
        assert clips == {k: tuple(audiocaps_captions(k, split)) for k in AUDIOCAPS_AUDIO[split]}
    assert read_manifest(layout.manifest_path).source == "audiocaps"


def test_cli_broken_tree_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    make_clotho_tree(tmp_path / "raw")
    missing = Path("raw") / "validation" / "validation sound 1.wav"
    (tmp_path / missing).unlink()
    _write_params(tmp_path, source="clotho")
    result = _run_prepare(tmp_path)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "CLOTHO" / "Index").exists()
    assert not (tmp_path / "data" / "CLOTHO" / "manifest.json").exists()


def _break_release(raw: Path) -> dict[str, str]:
    """Damage a tiny Clotho release as real releases are damaged; returns clip id -> the words
    its reason must hold. Also stores one good file's name decomposed (NFD), as macOS does."""
    import numpy as np
    import soundfile as sf

    development = raw / "development"
    good = (development / "development sound 0.wav").read_bytes()
    (development / "development sound 0.wav").write_bytes(good[: len(good) // 2])  # cut short
    (development / "development sound 1.wav").write_bytes(b"RIFX" + good[4:])  # damaged header
    frame = pd.read_csv(raw / "clotho_captions_development.csv")
    extra = []
    for name, content in (("noise.mp3", bytes(range(256)) * 12), ("café.wav", None), ("silence.wav", None)):
        if content is not None:
            (development / name).write_bytes(content)
        elif name == "silence.wav":
            sf.write(development / name, np.zeros(8000, dtype="float32"), 16000)
        else:
            write_tone(development / unicodedata.normalize("NFD", name), 0.4)
        extra.append([name, *clotho_captions(name)])
    pd.concat([frame, pd.DataFrame(extra, columns=frame.columns)]).to_csv(
        raw / "clotho_captions_development.csv", index=False
    )
    return {
        "development sound 0.wav": "truncated: its header declares",
        "development sound 1.wav": "cannot read audio:",
        "noise.mp3": "cannot read audio: not a readable mp3 file (unknown format or a damaged header) (decoder: Illegal Audio-MPEG-Header",
    }


def test_a_release_with_bad_files_names_each_reason_or_skips_them(tmp_path: Path) -> None:
    make_clotho_tree(tmp_path / "raw", clips_per_split=3)
    bad = _break_release(tmp_path / "raw")
    _write_params(tmp_path, source="clotho")
    refused = _run_prepare(tmp_path)
    assert refused.returncode == 2, refused.stderr
    # Decoder noise (mpg123's "Note: ..." lines) kept off the terminal; its gist is in the reason.
    assert "Traceback" not in refused.stderr and "Note:" not in refused.stderr
    assert "FutureWarning" not in refused.stderr
    assert f"{len(bad)} problems in the Clotho release" in refused.stderr
    for clip_id, reason in bad.items():
        line = next(row for row in refused.stderr.splitlines() if clip_id in row)
        assert reason in line, line
    assert "data.on_error=skip" in refused.stderr
    assert not (tmp_path / "data" / "CLOTHO" / "manifest.json").exists()

    skipped = _run_prepare(tmp_path, "--set", "data.on_error=skip")
    assert skipped.returncode == 0, skipped.stderr
    assert f"skipped {len(bad)} clip(s)" in skipped.stdout
    assert "matched under Unicode normalization" in skipped.stdout and "NFD" in skipped.stdout
    manifest = read_manifest(tmp_path / "data" / "CLOTHO" / "manifest.json")
    assert {c.clip_id: c.reason for c in manifest.skipped}.keys() == bad.keys()
    assert all(bad[c.clip_id] in c.reason and c.split == "train" for c in manifest.skipped)
    kept = {c.clip_id: c for c in manifest.clips}
    assert not bad.keys() & kept.keys()
    # The CSV's composed name is the clip id; the audio path is the file as stored on disk.
    assert kept["café.wav"].audio == "development/" + unicodedata.normalize("NFD", "café.wav")
    assert kept["silence.wav"].duration == pytest.approx(0.5)


def test_failed_prepare_leaves_previous_outputs_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_clotho_tree(tmp_path / "raw")
    params = load_params(_write_params(tmp_path, source="clotho"))
    prepare_dataset(params)
    layout = Layout("CLOTHO", "data")
    outputs = [*(layout.index_path(s) for s in SPLITS), layout.manifest_path]
    before = {p: p.read_bytes() for p in outputs}

    # A new clip whose audio is empty: everything is refused, nothing is rewritten.
    write_tone(tmp_path / "raw" / "development" / "new.wav", 0.0)
    with open(tmp_path / "raw" / "clotho_captions_development.csv", "a") as fh:
        fh.write("new.wav,a,b,c,d,e\n")
    with pytest.raises(DataError, match=r"new\.wav.*zero length"):
        prepare_dataset(params)
    assert {p: p.read_bytes() for p in outputs} == before

    # A failure while writing (here: the manifest) also leaves the old files in place.
    (tmp_path / "raw" / "development" / "new.wav").unlink()
    write_tone(tmp_path / "raw" / "development" / "new.wav", 0.2)

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("atric.corpus.prepare.write_manifest", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(params)
    assert {p: p.read_bytes() for p in outputs} == before
    assert _staging_leftovers(layout.dataset_dir) == []


def test_dataset_name_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_clotho_tree(tmp_path / "raw")
    # Explicitly the synthetic corpus's folder with a real source: refused, not renamed
    # (dvc.yaml's outs use the literal data.dataset).
    with pytest.raises(ConfigError, match=r"data: .*'SynthCaps' is the synthetic corpus's folder"):
        load_params(_write_params(tmp_path, source="clotho", dataset="SynthCaps"))
    assert load_params(_write_params(tmp_path, source="audiocaps")).data.dataset == "AudioCaps"
    assert load_params(_write_params(tmp_path)).data.dataset == "SynthCaps"
    # A corpus is never written into another corpus's seed folder.
    params = load_params(_write_params(tmp_path, source="clotho", dataset="AudioCaps"))
    with pytest.raises(ConfigError, match="seed folder of the audiocaps corpus"):
        prepare_dataset(params)
    assert not (tmp_path / "data").exists()
    # Any other name is the user's: a Clotho subset under its own folder, JSON indexes.
    params = load_params(_write_params(tmp_path, source="clotho", dataset="ClothoSmall"))
    manifest = prepare_dataset(params)
    assert manifest.dataset == "ClothoSmall"
    assert read_manifest("data/ClothoSmall/manifest.json").dataset == "ClothoSmall"
    assert Path("data/ClothoSmall/Index/test.json").is_file()


def test_synth_source_dispatches_and_probes_audio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The synthetic reader is another module; a stand-in checks dispatch, renaming and the audio check."""
    monkeypatch.chdir(tmp_path)
    calls: list[Path] = []

    def read_synth_raw(raw_dir: Path) -> Manifest:
        calls.append(raw_dir)
        clips = []
        for i, split in enumerate(SPLITS):
            write_tone(raw_dir / "audio" / f"s{i}.wav", 0.1)
            captions = tuple(f"a tone {k}" for k in range(5))
            clips.append(ManifestClip(f"s{i}", split, f"audio/s{i}.wav", 0.1, captions))
        return Manifest("FromCaptionsJson", "synth", 16000, str(raw_dir), tuple(clips))

    fake = types.ModuleType("atric.corpus.synth")
    fake.read_synth_raw = read_synth_raw  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "atric.corpus.synth", fake)
    params = load_params(_write_params(tmp_path, source="synth", dataset="Tones"))

    manifest = prepare_dataset(params)
    assert calls == [Path("raw")]
    assert manifest.dataset == "Tones"  # the folder named in params, not the reader's own name
    assert [c.clip_id for c in read_index("data/Tones/Index/val.json", "val")] == ["s1"]

    # The stand-in rewrites its audio on every call, so break a file after it has run.
    monkeypatch.setattr(fake, "read_synth_raw", lambda raw: _break_after(read_synth_raw(raw), raw))
    with pytest.raises(DataError, match=r"s2\.wav.*clip 's2'"):
        prepare_dataset(params)


def _break_after(manifest: Manifest, raw_dir: Path) -> Manifest:
    (raw_dir / "audio" / "s2.wav").write_bytes(b"")
    return manifest


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_fifo_or_directory_is_refused_as_audio_before_it_is_opened(tmp_path: Path, kind: str) -> None:
    """A FIFO blocked the decoder (and `search.py --audio`) forever: refused by its file type."""
    from atric.audio import audio_duration, load_audio
    from atric.search.searcher import read_query_audio

    path = tmp_path / "sound.wav"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    word = "a FIFO" if kind == "fifo" else "a directory"
    for read in (lambda: audio_duration(path), lambda: load_audio(path, 16000), lambda: read_query_audio(path, 16000, 5.0)):
        with pytest.raises(DataError, match=rf"sound\.wav.*not a regular file \({word}\)"):
            read()
