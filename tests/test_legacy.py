"""The original's own pickles through the restricted unpickler (atric.legacy): every protocol
Python writes, Python 2 numpy pickles, and refusals before anything runs or is allocated."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from atric.errors import DataError
from atric.layout import read_legacy_text_pickle
from atric.legacy import MAX_ARRAY_BYTES, restricted_load

EMBEDDINGS = {
    "clip_a": [np.arange(12, dtype=np.float32).reshape(3, 4), np.full((2, 4), -1.5, np.float32)],
    "clip_b": [np.linspace(0, 1, 8).reshape(2, 4)],  # float64, as older exports hold
}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_reads_back_exactly(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "w2v_train.pkl"
    path.write_bytes(pickle.dumps(EMBEDDINGS, protocol=protocol))
    back = read_legacy_text_pickle(path)
    assert set(back) == set(EMBEDDINGS)
    for clip, arrays in EMBEDDINGS.items():
        assert len(back[clip]) == len(arrays)
        for got, want in zip(back[clip], arrays, strict=True):
            np.testing.assert_allclose(got, want.astype(np.float32))


def _py2_array(raw: bytes, shape: tuple[int, int]) -> bytes:
    """A numpy array as Python 2's cPickle wrote it (protocol 2): the data as a py2 ``str``."""
    def binint(v: int) -> bytes:
        return b"K" + bytes([v])

    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + binint(0) + b"\x85U\x01b\x87R"
        + b"(" + binint(1) + binint(shape[0]) + binint(shape[1]) + b"\x86"
        + b"cnumpy\ndtype\nU\x02f4" + binint(0) + binint(1) + b"\x87R"
        + b"(" + binint(3) + b"U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + binint(0) + b"tb"
        + b"\x89T" + struct.pack("<i", len(raw)) + raw + b"tb"
    )


def test_python2_numpy_pickle_reads_with_latin1_bytes(tmp_path: Path) -> None:
    array = np.array([[0.5, -2.0, 1e-3, 3.0], [255.0, 1.0, -0.0, 7.25]], np.float32)
    raw = array.tobytes()
    assert any(b > 127 for b in raw)  # bytes a default ASCII decoding would reject
    stream = b"\x80\x02}U\x06clip_a](" + _py2_array(raw, array.shape) + b"es."
    path = tmp_path / "w2v_test.pkl"
    path.write_bytes(stream)
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(stream)  # what a plain Python 3 unpickler does with it
    np.testing.assert_array_equal(read_legacy_text_pickle(path)["clip_a"][0], array)


def test_a_tiny_pickle_declaring_a_huge_array_is_refused_before_allocating(tmp_path: Path) -> None:
    huge = 1_000_000_000  # 1 GB of int8 from a ~80-byte file
    stream = (
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ"
        + struct.pack("<i", huge) + b"\x85U\x01b\x87R."
    )
    path = tmp_path / "bomb.pkl"
    path.write_bytes(stream)
    assert path.stat().st_size < 100
    with pytest.raises(DataError, match=rf"bomb\.pkl: an array of shape \({huge},\) exceeds the {MAX_ARRAY_BYTES >> 20} MiB"):
        restricted_load(path)


class Payload:
    def __reduce__(self):  # what a malicious file would do: run a command
        import os

        return (os.system, ("touch /tmp/atric-pwned",))


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (pickle.dumps({"c": [Payload()]}, protocol=2), r"refused to unpickle posix\.system"),
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.", r"only latin-1"),
        (b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.", r"refused to unpickle builtins\.eval"),
        (b"\x80\x02]q\x00", r"not a readable pickle"),
    ],
)
def test_classes_outside_the_allowed_set_are_refused(tmp_path: Path, stream: bytes, message: str) -> None:
    path = tmp_path / "w2v_val.pkl"
    path.write_bytes(stream)
    with pytest.raises(DataError, match=message):
        read_legacy_text_pickle(path)
    assert not Path("/tmp/atric-pwned").exists()


def test_a_pickle_whose_dtype_carries_a_sub_array_shape_is_refused_before_allocating(tmp_path: Path) -> None:
    """shape (200,) of dtype "(1000,1000)f8" is 1.6 GB: the dtype's size counts, not the shape's."""
    import resource

    dtype_body = pickle.dumps(np.dtype(("f8", (1000, 1000))), protocol=2)[2:-1]
    stream = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\xc8\x85" + dtype_body + b"\x87R."
    path = tmp_path / "subarray.pkl"
    path.write_bytes(stream)
    assert path.stat().st_size < 300
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match=r"subarray\.pkl: an array of shape \(200,\) exceeds the 64 MiB bound"):
        restricted_load(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
