"""Read a TensorFlow 2 checkpoint (tensor bundle) without TensorFlow.

A bundle is ``<prefix>.index`` plus ``<prefix>.data-00000-of-00001``. The index is a
LevelDB-style sorted string table: data blocks of prefix-compressed (key, value)
entries, an index block pointing at them, and a 48-byte footer. The value under the
empty key is a ``BundleHeaderProto``; every other key names a tensor and its value is
a ``BundleEntryProto`` (dtype, shape, shard, offset, size, crc32c). The data file holds
the raw little-endian tensor bytes. We decode the few proto fields by hand (they are
plain varints), and check every block's and every tensor's crc32c, so a damaged file
fails loudly instead of giving wrong weights.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import google_crc32c
import numpy as np

from atric.errors import CheckpointError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER = 5  # 1 byte compression type + 4 bytes masked crc32c
# tensorflow/core/framework/types.proto: the dtypes a weights file can hold.
DTYPES = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("u1"),
    5: np.dtype("<i2"),
    6: np.dtype("i1"),
    9: np.dtype("<i8"),
    10: np.dtype("?"),
    19: np.dtype("<f2"),
}


MAX_INDEX_BYTES = 16 << 20  # YAMNet's is 7 kB; names and offsets only


def _mask(crc: int) -> int:
    """LevelDB/TensorFlow store crc32c 'masked' (rotated and offset)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of a protobuf message: varints as int, bytes fields as bytes."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            fields.append((number, value))
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated length-delimited field")
            fields.append((number, buf[pos : pos + length]))
            pos += length
        elif wire == 5:
            fields.append((number, struct.unpack_from("<I", buf, pos)[0]))
            pos += 4
        elif wire == 1:
            fields.append((number, struct.unpack_from("<Q", buf, pos)[0]))
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return fields


class _Entry:
    """The fields of a BundleEntryProto that locate one tensor."""

    def __init__(self, raw: bytes) -> None:
        self.dtype = 0
        self.shape: list[int] = []
        self.shard = self.offset = self.size = 0
        self.crc32c: int | None = None
        self.sliced = False
        for number, value in _proto_fields(raw):
            if number == 1:
                self.dtype = int(value)  # type: ignore[arg-type]
            elif number == 2:  # TensorShapeProto: repeated Dim dim = 2 {int64 size = 1}
                for sub, dim in _proto_fields(value):  # type: ignore[arg-type]
                    if sub == 2:
                        size = dict(_proto_fields(dim)).get(1, 0)  # type: ignore[arg-type]
                        self.shape.append(int(size))  # type: ignore[arg-type]
            elif number == 3:
                self.shard = int(value)  # type: ignore[arg-type]
            elif number == 4:
                self.offset = int(value)  # type: ignore[arg-type]
            elif number == 5:
                self.size = int(value)  # type: ignore[arg-type]
            elif number == 6:
                self.crc32c = int(value)  # type: ignore[arg-type]
            elif number == 7:
                self.sliced = True


def _block(data: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of one table block, after checking its crc."""
    end = offset + size
    if offset < 0 or end + BLOCK_TRAILER > len(data):
        raise ValueError(f"block at {offset} (+{size}) runs past the end of the file")
    contents = data[offset:end]
    kind, stored_crc = data[end], struct.unpack_from("<I", data, end + 1)[0]
    if kind != 0:
        raise ValueError(f"block at {offset} is compressed (type {kind}); only uncompressed tables are read")
    if _mask(google_crc32c.value(contents + bytes([kind]))) != stored_crc:
        raise ValueError(f"block at {offset}: crc32c mismatch (the file is damaged)")
    if size < 4:
        raise ValueError(f"block at {offset} is too short")
    restarts = struct.unpack_from("<I", contents, size - 4)[0]
    limit = size - 4 - 4 * restarts
    if limit < 0:
        raise ValueError(f"block at {offset}: bad restart count {restarts}")
    entries: list[tuple[bytes, bytes]] = []
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(contents, pos)
        unshared, pos = _varint(contents, pos)
        vlen, pos = _varint(contents, pos)
        if shared > len(key) or pos + unshared + vlen > limit:
            raise ValueError(f"block at {offset}: malformed entry")
        key = key[:shared] + contents[pos : pos + unshared]
        pos += unshared
        entries.append((key, contents[pos : pos + vlen]))
        pos += vlen
    return entries


def _handle(raw: bytes, pos: int = 0) -> tuple[int, int, int]:
    offset, pos = _varint(raw, pos)
    size, pos = _varint(raw, pos)
    return offset, size, pos


def read_index(index_path: Path) -> dict[str, _Entry]:
    """Every tensor entry of a bundle's ``.index`` file, by name."""
    if index_path.stat().st_size > MAX_INDEX_BYTES:
        raise ValueError(f"{index_path.stat().st_size} bytes: an index lists names and offsets, at most {MAX_INDEX_BYTES}")
    data = index_path.read_bytes()
    if len(data) < FOOTER_SIZE:
        raise ValueError("shorter than a table footer")
    footer = data[-FOOTER_SIZE:]
    if struct.unpack_from("<Q", footer, FOOTER_SIZE - 8)[0] != TABLE_MAGIC:
        raise ValueError("no sorted-string-table magic number at the end (not a TF checkpoint index)")
    _, _, pos = _handle(footer)  # the metaindex block: unused by bundles
    index_offset, index_size, _ = _handle(footer, pos)
    entries: dict[str, _Entry] = {}
    for _, handle in _block(data, index_offset, index_size):
        offset, size, _ = _handle(handle)
        for key, value in _block(data, offset, size):
            if key:  # the empty key holds the BundleHeaderProto
                entries[key.decode("utf-8")] = _Entry(value)
    return entries


def read_bundle(prefix: str | Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The tensors of the bundle ``prefix`` (``.index`` + ``.data-00000-of-00001``), by name.

    ``names``: only these tensors (each must exist). Numeric dtypes only (strings, such as
    the object graph, are skipped unless asked for, which fails). Raises CheckpointError
    naming the file on anything malformed, truncated or failing its checksum.
    """
    prefix = Path(prefix)
    index_path = prefix.with_name(prefix.name + ".index")
    data_path = prefix.with_name(prefix.name + ".data-00000-of-00001")
    for path in (index_path, data_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: TensorFlow checkpoint file not found")
    try:
        entries = read_index(index_path)
    except (ValueError, struct.error, IndexError) as exc:
        raise CheckpointError(f"{index_path}: not a readable TensorFlow checkpoint index: {exc}") from exc
    if names is None:
        names = [n for n, e in entries.items() if e.dtype in DTYPES]
    missing = [n for n in names if n not in entries]
    if missing:
        raise CheckpointError(f"{index_path}: {len(missing)} tensors missing, e.g. {', '.join(missing[:3])}")
    # Only the tensors' own bytes are read (a padded 3 GB data file once took 3.4 GB of memory),
    # each after its declared size is checked against its shape and the file's size.
    file_size = data_path.stat().st_size
    tensors: dict[str, np.ndarray] = {}
    with data_path.open("rb") as blob:
        for name in names:
            entry = entries[name]
            where = f"{data_path}: tensor {name!r}"
            if entry.dtype not in DTYPES or entry.sliced or entry.shard != 0:
                raise CheckpointError(f"{where}: unsupported (dtype {entry.dtype}, sliced or multi-shard)")
            dtype = DTYPES[entry.dtype]
            count = math.prod(entry.shape)  # exact: a crafted shape cannot overflow into a small size
            if entry.size != count * dtype.itemsize or entry.offset + entry.size > file_size:
                raise CheckpointError(
                    f"{where}: {entry.size} bytes at offset {entry.offset} do not fit shape {entry.shape} "
                    f"in a {file_size}-byte file (truncated or damaged)"
                )
            blob.seek(entry.offset)
            raw = blob.read(entry.size)
            tensors[name] = _tensor(raw, entry, dtype, where)
    return tensors


def _tensor(raw: bytes, entry: _Entry, dtype: np.dtype, where: str) -> np.ndarray:
    """One tensor's checked bytes as an array of its shape."""
    if entry.crc32c is None:  # TensorFlow writes one for every tensor: without it a flipped byte passes
        raise CheckpointError(f"{where}: no crc32c in its index entry (not written by TensorFlow, or damaged)")
    if _mask(google_crc32c.value(raw)) != entry.crc32c:
        raise CheckpointError(f"{where}: crc32c mismatch (the file is damaged)")
    return np.frombuffer(raw, dtype=dtype).reshape(entry.shape).copy()
