"""The seed on-disk layout: every format round-trips, and bad or unsafe input is refused."""

from __future__ import annotations

import json
import pathlib
import pickle

import h5py
import numpy as np
import pandas as pd
import pytest

from atric.errors import DataError
from atric.layout import (
    Clip,
    FeatureFile,
    Layout,
    Manifest,
    ManifestClip,
    read_index,
    read_legacy_text_pickle,
    read_manifest,
    read_text_attrs,
    read_text_embeddings,
    write_features,
    write_index,
    write_manifest,
    write_text_embeddings,
)

FIVE = ("a dog barks", "then, a car passes", "rain \"falls\" softly", "ünïcode caption", "a bird sings")


def _clips() -> list[Clip]:
    # Caption order differs per clip so a reader that sorted captions would fail.
    return [Clip("b.wav", FIVE), Clip("a.wav", tuple(reversed(FIVE))), Clip("c, 3.wav", FIVE[1:] + FIVE[:1])]


# ---------------------------------------------------------------- Index files
@pytest.mark.parametrize("suffix", ["json", "csv"])
def test_index_round_trip_keeps_clip_and_caption_order(tmp_path: pathlib.Path, suffix: str) -> None:
    path = tmp_path / "Index" / f"val.{suffix}"
    write_index(path, _clips(), "val")
    assert read_index(path, "val") == _clips()


def test_index_json_is_clotho_style(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "train.json"
    write_index(path, [Clip("x.wav", ("one", "two"))], "train")
    assert json.loads(path.read_text()) == {
        "audios": [{"audio_id": "x.wav", "captions": [{"caption": "one"}, {"caption": "two"}]}]
    }


def test_index_csv_is_audiocaps_style(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "train.csv"
    write_index(path, [Clip("yt1", ("one", "two")), Clip("yt2", ("three",))], "train")
    frame = pd.read_csv(path, dtype=str)
    assert list(frame.columns) == ["youtube_id", "caption"]
    assert frame.values.tolist() == [["yt1", "one"], ["yt1", "two"], ["yt2", "three"]]


def test_layout_picks_csv_for_audiocaps_only() -> None:
    assert Layout("AudioCaps", "data").index_path("test").as_posix() == "data/AudioCaps/Index/test.csv"
    assert Layout("CLOTHO", "data").index_path("test").as_posix() == "data/CLOTHO/Index/test.json"
    with pytest.raises(DataError, match="unknown split"):
        Layout("CLOTHO").index_path("dev")


def test_val_clip_with_four_captions_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "val.json"
    with pytest.raises(DataError, match=r"val clip 'x.wav' has 4 captions"):
        write_index(path, [Clip("x.wav", FIVE[:4])], "val")
    assert not path.exists()
    # The same file written as train (any count allowed) is refused when read as val.
    write_index(path, [Clip("x.wav", FIVE[:4])], "train")
    with pytest.raises(DataError, match=r"val\.json.*'x.wav' has 4 captions"):
        read_index(path, "val")


def test_empty_caption_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("youtube_id,caption\nyt1,a dog\nyt1,   \n")
    with pytest.raises(DataError, match=r"train\.csv: clip 'yt1' caption 2 is empty"):
        read_index(path, "train")


def test_duplicate_ids_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "train.json"
    entry = {"audio_id": "x.wav", "captions": [{"caption": "a"}]}
    path.write_text(json.dumps({"audios": [entry, entry]}))
    with pytest.raises(DataError, match=r"train\.json: duplicate clip id 'x.wav'"):
        read_index(path, "train")


def test_csv_with_missing_columns_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "test.csv"
    path.write_text("audiocap_id,caption\n1,a dog\n")
    with pytest.raises(DataError, match=r"test\.csv: missing column\(s\) youtube_id"):
        read_index(path, "test")


# ---------------------------------------------------------------- Manifest
def test_manifest_round_trip(tmp_path: pathlib.Path) -> None:
    clips = tuple(
        ManifestClip(
            clip_id=f"c{i}",
            split=split,
            audio=f"{split}/c{i}.wav",
            duration=1.25 + i,
            captions=FIVE,
            extra={"events": [{"kind": "bark", "onset": 0.5}]} if i == 0 else {},
        )
        for i, split in enumerate(["train", "val", "test", "train"])
    )
    manifest = Manifest("SynthCaps", "synth", 16000, "data/raw", clips)
    path = tmp_path / "manifest.json"
    write_manifest(path, manifest)
    back = read_manifest(path)
    assert back == manifest
    assert [c.clip_id for c in back.split("train")] == ["c0", "c3"]
    assert back.audio_path(back.clips[1]) == pathlib.Path("data/raw/val/c1.wav")


# ---------------------------------------------------------------- HDF5 features
def test_features_round_trip(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {"a.wav": rng.normal(size=(7, 4)), "b.wav": rng.normal(size=(1, 4)).astype(np.float32)}
    path = tmp_path / "logmel" / "train" / "logmel.h5"
    count = write_features(path, arrays.items(), {"expert": "logmel", "hop": 0.5, "dim": 4})
    assert count == 2
    with FeatureFile(path, dim=4) as features:
        assert features.attrs == {"expert": "logmel", "hop": 0.5, "dim": 4}
        assert sorted(features.keys()) == ["a.wav", "b.wav"] and len(features) == 2
        assert features.shape("a.wav") == (7, 4)
        for clip_id, array in arrays.items():
            got = features[clip_id]
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, array.astype(np.float32))
        with pytest.raises(DataError, match=r"clip 'zzz' has no features"):
            features["zzz"]
    with h5py.File(path) as h5:  # stored as float32 on disk, not only cast on read
        assert h5["a.wav"].dtype == np.float32


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_feature_dataset_of_wrong_rank_refused(tmp_path: pathlib.Path, shape: tuple[int, ...]) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("clip7", data=np.zeros(shape, np.float32))
    with FeatureFile(path) as features, pytest.raises(DataError) as err:
        features["clip7"]
    message = str(err.value)
    assert str(path) in message and "clip7" in message and f"rank {len(shape)}" in message


def test_nan_features_refused(tmp_path: pathlib.Path) -> None:
    bad = np.ones((3, 2), np.float32)
    bad[1, 0] = np.nan
    path = tmp_path / "f.h5"
    with pytest.raises(DataError, match=r"f\.h5:x.*NaN"):
        write_features(path, [("ok", np.ones((2, 2))), ("x", bad)], {})
    assert not path.exists()  # atomic: nothing half-written
    with h5py.File(path, "w") as h5:  # written by someone else: refused on read too
        h5.create_dataset("x", data=bad)
    with FeatureFile(path) as features, pytest.raises(DataError, match="NaN"):
        features["x"]


# ---------------------------------------------------------------- Text embeddings
def test_text_embeddings_round_trip_ragged(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(1)
    embeddings = {
        "a.wav": [rng.normal(size=(n, 3)).astype(np.float32) for n in (2, 5, 1)],
        "b.wav": [rng.normal(size=(4, 3)).astype(np.float32)],
    }
    captions = {"a.wav": ["x y", "a b c d e", "z"], "b.wav": ["p q r s"]}
    path = tmp_path / "glove_train.h5"
    write_text_embeddings(path, embeddings, {"vectors": "glove-6b-50d", "dim": 3}, captions)
    back = read_text_embeddings(path)
    assert list(back) == ["a.wav", "b.wav"]
    for clip_id, arrays in embeddings.items():
        assert [a.shape for a in back[clip_id]] == [a.shape for a in arrays]
        for got, want in zip(back[clip_id], arrays, strict=True):
            np.testing.assert_array_equal(got, want)
    assert read_text_attrs(path) == {"vectors": "glove-6b-50d", "dim": 3}
    with h5py.File(path) as h5:
        assert [c.decode() for c in h5["captions"][()]] == ["x y", "a b c d e", "z", "p q r s"]


# ---------------------------------------------------------------- Legacy pickle
@pytest.mark.parametrize("protocol", [3, 4, 5])  # 3: the original's Python 3.7 default
def test_legacy_pickle_of_arrays_is_read(tmp_path: pathlib.Path, protocol: int) -> None:
    data = {"a.wav": [np.arange(6, dtype=np.float64).reshape(2, 3), np.ones((1, 3))], 42: [np.zeros((3, 3))]}
    path = tmp_path / "w2v_train.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    back = read_legacy_text_pickle(path)
    assert list(back) == ["a.wav", "42"]
    np.testing.assert_array_equal(back["a.wav"][0], data["a.wav"][0])
    assert back["a.wav"][0].dtype == np.float32 and back["42"][0].shape == (3, 3)
    assert read_text_embeddings(path).keys() == back.keys()  # .pkl dispatches to the same reader


class _TouchOnLoad:
    """Unpickling this calls pathlib.Path(marker).touch(): arbitrary code from a data file."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class _SystemOnLoad:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("payload", [_TouchOnLoad, _SystemOnLoad])
def test_malicious_pickle_does_not_run(tmp_path: pathlib.Path, payload: type) -> None:
    # Control: the payload really does create its marker under a plain pickle.load.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps({"a": [payload(control)]}))
    assert control.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "w2v_val.pkl"
    path.write_bytes(pickle.dumps({"a": [payload(marker)]}))
    with pytest.raises(DataError, match=r"w2v_val\.pkl: refused to unpickle"):
        read_legacy_text_pickle(path)
    assert not marker.exists()


def test_garbage_pickle_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "w2v_test.pkl"
    path.write_bytes(pickle.dumps({"a": [np.ones((2, 2))]})[:-7])
    with pytest.raises(DataError, match=r"w2v_test\.pkl: not a readable pickle"):
        read_legacy_text_pickle(path)


@pytest.mark.parametrize("kind", ["external", "soft", "virtual"])
def test_feature_and_index_files_refuse_values_stored_elsewhere(tmp_path: pathlib.Path, kind: str) -> None:
    """DVC hashes a feature file, not what its links or virtual datasets point to (maybe outside
    the tree): such a clip is refused naming it, never trained on silently."""
    import h5py

    from atric.layout import FeatureFile, local_dataset

    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as h5:
        h5["secret"] = np.ones((3, 4), np.float32)
    path = tmp_path / "features.h5"
    with h5py.File(path, "w") as h5:
        h5["real"] = np.ones((3, 4), np.float32)
        if kind == "external":
            h5["clip"] = h5py.ExternalLink(str(outside), "secret")
        elif kind == "soft":
            h5["clip"] = h5py.SoftLink("/real")
        else:
            layout = h5py.VirtualLayout(shape=(3, 4), dtype=np.float32)
            layout[:] = h5py.VirtualSource(str(outside), "secret", shape=(3, 4))
            h5.create_virtual_dataset("clip", layout)
    words = {"external": r"an external link to .*outside\.h5:secret", "soft": "a soft link to /real",
             "virtual": "a virtual dataset"}[kind]
    with FeatureFile(path) as features:
        assert features["real"].shape == (3, 4)
        with pytest.raises(DataError, match=rf"features\.h5: 'clip' is {words}"):
            features["clip"]
    with h5py.File(path, "r") as h5, pytest.raises(DataError, match=rf"'clip' is {words}"):
        local_dataset(h5, "clip", str(path))
