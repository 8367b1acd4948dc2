"""The seed on-disk layout, in one place.

```
data/<Dataset>/AudioExpert/<expert>/<split>/<expert>.h5   one float32 [T, D] dataset per clip id
data/<Dataset>/Index/<split>.csv    AudioCaps style: youtube_id, caption (one row per caption)
data/<Dataset>/Index/<split>.json   Clotho style: {"audios": [{"audio_id", "captions": [{"caption"}]}]}
data/<Dataset>/TextEmbeddings/<vectors>_<split>.h5   ours: ragged per-caption [n_tokens, D]
data/<Dataset>/TextEmbeddings/<vectors>_report.json  embed_captions' OOV report
data/<Dataset>/TextEmbeddings/w2v_<split>.pkl        legacy: read by atric.legacy (restricted unpickler)
data/<Dataset>/manifest.json        clip id -> split, audio path, duration, captions
```
Every writer goes through a temp file and a rename, so a crash leaves the old file or none.

Why one module of this size: every reader and writer of the seed layout's file formats, in one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from atric.atomic import atomic_path, write_text_atomic
from atric.errors import DataError
from atric.legacy import restricted_load

SPLITS = ("train", "val", "test")
EVAL_CAPTIONS_PER_CLIP = 5  # the evaluation protocol needs exactly 5 captions per val/test clip
CSV_STYLE_DATASETS = ("AudioCaps",)
AUDIOCAPS_INDEX_COLUMNS = ("youtube_id", "caption")


@dataclass(frozen=True)
class Clip:
    clip_id: str
    captions: tuple[str, ...]


@dataclass(frozen=True)
class ManifestClip:
    clip_id: str
    split: str
    audio: str  # path of the audio file, relative to the manifest's ``audio_root``
    duration: float
    captions: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the synthetic corpus's event list


@dataclass(frozen=True)
class SkippedClip:
    """A clip of the release left out by ``data.on_error: skip``, and why."""

    clip_id: str
    split: str
    reason: str


@dataclass(frozen=True)
class Manifest:
    dataset: str
    source: str
    sample_rate: int
    audio_root: str
    clips: tuple[ManifestClip, ...]
    skipped: tuple[SkippedClip, ...] = ()
    notes: tuple[str, ...] = ()  # said by prepare, not written (e.g. a name matched under NFC)

    def split(self, split: str) -> list[ManifestClip]:
        return [c for c in self.clips if c.split == split]

    def audio_path(self, clip: ManifestClip) -> Path:
        return Path(self.audio_root) / clip.audio


class Layout:
    """Paths of one dataset under the data root."""

    def __init__(self, dataset: str, root: str | Path = "data") -> None:
        self.dataset = dataset
        self.root = Path(root)

    @property
    def dataset_dir(self) -> Path:
        return self.root / self.dataset

    @property
    def index_style(self) -> str:
        return "csv" if self.dataset in CSV_STYLE_DATASETS else "json"

    def index_path(self, split: str) -> Path:
        _check_split(split)
        return self.dataset_dir / "Index" / f"{split}.{self.index_style}"

    def features_path(self, expert: str, split: str) -> Path:
        _check_split(split)
        return self.dataset_dir / "AudioExpert" / expert / split / f"{expert}.h5"

    @property
    def text_dir(self) -> Path:
        return self.dataset_dir / "TextEmbeddings"

    def text_path(self, vectors: str, split: str) -> Path:
        _check_split(split)
        return self.text_dir / f"{vectors_slug(vectors)}_{split}.h5"

    def text_report_path(self, vectors: str) -> Path:
        """The OOV report of ``vectors``, beside its embedding files."""
        return self.text_dir / f"{vectors_slug(vectors)}_report.json"

    def legacy_text_path(self, split: str) -> Path:
        _check_split(split)
        return self.text_dir / f"w2v_{split}.pkl"

    @property
    def manifest_path(self) -> Path:
        return self.dataset_dir / "manifest.json"

    def corpus_fingerprint(self) -> str:
        """A short hash of the prepared corpus (its three Index files: clip ids and captions), so
        that a run's metrics say which corpus they come from, not only which dataset name."""
        digest = hashlib.sha256()
        for split in SPLITS:
            path = self.index_path(split)
            digest.update(f"{split}\0".encode())
            digest.update(path.read_bytes() if path.is_file() else b"")
        return digest.hexdigest()[:12]


def vectors_slug(vectors: str) -> str:
    """A file-name-safe name for a vectors source (a path becomes its stem)."""
    name = Path(vectors).stem if ("/" in vectors or "." in vectors) else vectors
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _check_clip_id(clip_id: str, where: str) -> None:
    if not clip_id or "/" in clip_id:
        raise DataError(f"{where}: invalid clip id {clip_id!r} (must be non-empty, without '/')")


# ---------------------------------------------------------------- Index files
def validate_clips(clips: Sequence[Clip], where: str, split: str | None = None) -> None:
    """Duplicate ids, empty captions, and the 5-captions rule for val/test."""
    seen: set[str] = set()
    for clip in clips:
        _check_clip_id(clip.clip_id, where)
        if clip.clip_id in seen:
            raise DataError(f"{where}: duplicate clip id {clip.clip_id!r}")
        seen.add(clip.clip_id)
        if not clip.captions:
            raise DataError(f"{where}: clip {clip.clip_id!r} has no captions")
        for i, caption in enumerate(clip.captions):
            if not isinstance(caption, str) or not caption.strip():
                raise DataError(f"{where}: clip {clip.clip_id!r} caption {i + 1} is empty")
        if split in ("val", "test") and len(clip.captions) != EVAL_CAPTIONS_PER_CLIP:
            raise DataError(
                f"{where}: {split} clip {clip.clip_id!r} has {len(clip.captions)} captions; "
                f"evaluation needs exactly {EVAL_CAPTIONS_PER_CLIP}"
            )


def write_index(path: str | Path, clips: Sequence[Clip], split: str | None = None) -> None:
    path = Path(path)
    validate_clips(clips, str(path), split)
    if path.suffix == ".json":
        doc = {
            "audios": [
                {"audio_id": c.clip_id, "captions": [{"caption": cap} for cap in c.captions]}
                for c in clips
            ]
        }
        write_text_atomic(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    elif path.suffix == ".csv":
        import pandas as pd  # here, not at the top: the training path reads no CSV (0.5 s import)

        rows = [(c.clip_id, cap) for c in clips for cap in c.captions]
        frame = pd.DataFrame(rows, columns=list(AUDIOCAPS_INDEX_COLUMNS))
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    else:
        raise DataError(f"{path}: index files are .json (Clotho style) or .csv (AudioCaps style)")


def read_index(path: str | Path, split: str | None = None) -> list[Clip]:
    """Read a Clotho-style JSON or AudioCaps-style CSV index; captions keep file order."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: index file not found")
    if path.suffix == ".json":
        clips = _read_index_json(path)
    elif path.suffix == ".csv":
        clips = _read_index_csv(path)
    else:
        raise DataError(f"{path}: index files are .json (Clotho style) or .csv (AudioCaps style)")
    validate_clips(clips, str(path), split)
    return clips


def _read_index_json(path: Path) -> list[Clip]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("audios"), list):
        raise DataError(f"{path}: expected an object with an 'audios' list")
    clips = []
    for i, entry in enumerate(doc["audios"]):
        try:
            clip_id = str(entry["audio_id"])
            captions = tuple(c["caption"] for c in entry["captions"])
        except (KeyError, TypeError) as exc:
            raise DataError(
                f"{path}: audios[{i}] needs 'audio_id' and 'captions': [{{'caption': ...}}] ({exc!r})"
            ) from exc
        clips.append(Clip(clip_id, captions))
    return clips


def _read_index_csv(path: Path) -> list[Clip]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from exc
    missing = [c for c in AUDIOCAPS_INDEX_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {list(frame.columns)}")
    grouped: dict[str, list[str]] = {}
    for clip_id, caption in zip(frame["youtube_id"], frame["caption"], strict=True):
        grouped.setdefault(clip_id, []).append(caption)
    return [Clip(k, tuple(v)) for k, v in grouped.items()]


# ---------------------------------------------------------------- Manifest
def write_manifest(path: str | Path, manifest: Manifest) -> None:
    for split in SPLITS:
        clips = [Clip(c.clip_id, c.captions) for c in manifest.split(split)]
        validate_clips(clips, str(path), split)
    doc = {
        "dataset": manifest.dataset,
        "source": manifest.source,
        "sample_rate": manifest.sample_rate,
        "audio_root": manifest.audio_root,
        "clips": [
            {
                "clip_id": c.clip_id,
                "split": c.split,
                "audio": c.audio,
                "duration": c.duration,
                "captions": list(c.captions),
                **({"extra": c.extra} if c.extra else {}),
            }
            for c in manifest.clips
        ],
        # Only when some were skipped: a release without bad files keeps its manifest as before.
        **({"skipped": [dataclasses.asdict(c) for c in manifest.skipped]} if manifest.skipped else {}),
    }
    write_text_atomic(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: manifest not found (run `python src/prepare.py` first)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        clips = tuple(
            ManifestClip(
                clip_id=str(c["clip_id"]),
                split=str(c["split"]),
                audio=str(c["audio"]),
                duration=float(c["duration"]),
                captions=tuple(c["captions"]),
                extra=dict(c.get("extra", {})),
            )
            for c in doc["clips"]
        )
        manifest = Manifest(
            dataset=str(doc["dataset"]),
            source=str(doc["source"]),
            sample_rate=int(doc["sample_rate"]),
            audio_root=str(doc["audio_root"]),
            clips=clips,
            skipped=tuple(SkippedClip(str(c["clip_id"]), str(c["split"]), str(c["reason"])) for c in doc.get("skipped", [])),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: not a valid manifest: {exc!r}") from exc
    for clip in clips:
        _check_split(clip.split)
    return manifest


# ---------------------------------------------------------------- Audio features
def check_feature_array(array: np.ndarray, where: str, dim: int | None = None) -> np.ndarray:
    """Features are finite float [T, D] with T >= 1; returns float32."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise DataError(f"{where}: expected a [T, D] array, got shape {array.shape} (rank {array.ndim})")
    if array.shape[0] < 1:
        raise DataError(f"{where}: empty sequence (T = 0)")
    if dim is not None and array.shape[1] != dim:
        raise DataError(f"{where}: feature dim is {array.shape[1]}, expected {dim}")
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{where}: features must be floating point, got {array.dtype}")
    if not np.isfinite(array).all():
        raise DataError(f"{where}: features contain NaN or inf")
    return array.astype(np.float32, copy=False)


# HDF5 outputs byte-identical for identical content: no object timestamps (h5py's track_times
# is on by default), attributes written in sorted key order. Pass to every create_dataset.
H5_REPRODUCIBLE: dict[str, Any] = {"track_times": False}


def set_attrs(node: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    """Attributes in sorted key order: the same mapping gives the same bytes."""
    for key in sorted(attrs):
        node.attrs[key] = attrs[key]


def write_features(
    path: str | Path, features: Iterable[tuple[str, np.ndarray]], attrs: Mapping[str, Any]
) -> int:
    """Write (clip id, [T, D]) pairs as one dataset per clip id; returns the clip count."""
    path = Path(path)
    count = 0
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        set_attrs(h5, attrs)
        for clip_id, array in features:
            _check_clip_id(clip_id, str(path))
            if clip_id in h5:
                raise DataError(f"{path}: duplicate clip id {clip_id!r}")
            h5.create_dataset(clip_id, data=check_feature_array(array, f"{path}:{clip_id}"), **H5_REPRODUCIBLE)
            count += 1
    return count


def local_dataset(h5: h5py.File | h5py.Group, name: str, where: str) -> h5py.Dataset:
    """``h5[name]`` if it is a dataset whose values are in this file; DataError naming it when
    it is a link (external, or soft), a virtual dataset or raw external storage: those read other
    files, which DVC's hash of this one does not cover (and which may lie outside the tree)."""
    link = h5.get(name, getlink=True)
    if link is None:
        raise DataError(f"{where}: {name!r} not found")
    if isinstance(link, h5py.ExternalLink):
        raise DataError(f"{where}: {name!r} is an external link to {link.filename}:{link.path}; values must be stored in the file")
    if isinstance(link, h5py.SoftLink):
        raise DataError(f"{where}: {name!r} is a soft link to {link.path}; values must be stored under their own name")
    node = h5[name]
    if not isinstance(node, h5py.Dataset):
        raise DataError(f"{where}: {name!r} is a group, expected a dataset")
    if node.is_virtual:
        raise DataError(f"{where}: {name!r} is a virtual dataset (its values live in other files); not accepted")
    if node.external is not None:
        raise DataError(f"{where}: {name!r} keeps its values in external files; not accepted")
    return node


class FeatureFile:
    """Read-only access to one expert/split HDF5 file; opens lazily, one clip at a time."""

    def __init__(self, path: str | Path, dim: int | None = None) -> None:
        self.path = Path(path)
        self.dim = dim
        if not self.path.exists():
            raise DataError(f"{self.path}: feature file not found (run `python src/extract.py`)")
        self._h5: h5py.File | None = None

    def _file(self) -> h5py.File:
        if self._h5 is None:
            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as exc:
                raise DataError(f"{self.path}: not a readable HDF5 file: {exc}") from exc
        return self._h5

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self._file().attrs.items()}

    def keys(self) -> list[str]:
        return list(self._file().keys())

    def __contains__(self, clip_id: str) -> bool:
        return clip_id in self._file()

    def __len__(self) -> int:
        return len(self._file())

    def shape(self, clip_id: str) -> tuple[int, ...]:
        return tuple(self._dataset(clip_id).shape)

    def stored(self, clip_id: str) -> tuple[tuple[int, ...], int | None]:
        """A clip's shape, and the byte offset of its values in the file when they can be read
        without HDF5: one contiguous block of native float32 (as atric's extractors write
        them; chunked, compressed, compact, external or other-typed datasets give None)."""
        dataset = self._dataset(clip_id)
        offset = None
        if dataset.chunks is None and dataset.dtype == np.dtype(np.float32) and dataset.external is None:
            offset = dataset.id.get_offset()  # None while no storage is allocated (compact layout too)
        return tuple(dataset.shape), None if offset is None else int(offset)

    def _dataset(self, clip_id: str) -> h5py.Dataset:
        h5 = self._file()
        if h5.get(clip_id, getlink=True) is None:
            raise DataError(f"{self.path}: clip {clip_id!r} has no features")
        return local_dataset(h5, clip_id, str(self.path))

    def __getitem__(self, clip_id: str) -> np.ndarray:
        return check_feature_array(self._dataset(clip_id)[()], f"{self.path}:{clip_id}", self.dim)

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # h5py handles cannot cross process boundaries (DataLoader workers): reopen lazily.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "dim": self.dim, "_h5": None}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# ---------------------------------------------------------------- Text embeddings
TextEmbeddings = dict[str, list[np.ndarray]]  # clip id -> one [n_tokens, D] array per caption


def write_text_embeddings(
    path: str | Path,
    embeddings: Mapping[str, Sequence[np.ndarray]],
    attrs: Mapping[str, Any],
    captions: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Ragged storage: all token vectors in one [n_tokens, D] array plus offsets.

    ``caption_offsets[c]:caption_offsets[c+1]`` are clip c's captions;
    ``token_offsets[k]:token_offsets[k+1]`` are caption k's rows of ``vectors``.
    """
    path = Path(path)
    clip_ids = list(embeddings)
    arrays: list[np.ndarray] = []
    caption_offsets = [0]
    dim: int | None = None
    for clip_id in clip_ids:
        _check_clip_id(clip_id, str(path))
        for k, array in enumerate(embeddings[clip_id]):
            array = check_feature_array(array, f"{path}:{clip_id} caption {k + 1}", dim)
            dim = array.shape[1]
            arrays.append(array)
        caption_offsets.append(len(arrays))
    token_offsets = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(np.int64)
    vectors = np.concatenate(arrays) if arrays else np.zeros((0, dim or 0), np.float32)
    str_dtype = h5py.string_dtype()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        set_attrs(h5, attrs)
        h5.create_dataset("clip_ids", data=np.array(clip_ids, dtype=object), dtype=str_dtype, **H5_REPRODUCIBLE)
        h5.create_dataset("caption_offsets", data=np.asarray(caption_offsets, np.int64), **H5_REPRODUCIBLE)
        h5.create_dataset("token_offsets", data=token_offsets, **H5_REPRODUCIBLE)
        h5.create_dataset("vectors", data=vectors, **H5_REPRODUCIBLE)
        if captions is not None:
            flat = [cap for clip_id in clip_ids for cap in captions[clip_id]]
            if len(flat) != len(arrays):
                raise DataError(f"{path}: {len(flat)} captions for {len(arrays)} embeddings")
            h5.create_dataset("captions", data=np.array(flat, dtype=object), dtype=str_dtype, **H5_REPRODUCIBLE)


def read_text_embeddings(path: str | Path) -> TextEmbeddings:
    path = Path(path)
    if path.suffix == ".pkl":
        return read_legacy_text_pickle(path)
    if not path.exists():
        raise DataError(f"{path}: text embeddings not found (run `python src/embed_text.py`)")
    try:
        with h5py.File(path, "r") as h5:
            clip_ids = [c.decode() if isinstance(c, bytes) else c for c in h5["clip_ids"][()]]
            caption_offsets = h5["caption_offsets"][()]
            token_offsets = h5["token_offsets"][()]
            vectors = h5["vectors"][()]
    except (OSError, KeyError) as exc:
        raise DataError(f"{path}: not a valid text-embedding file: {exc}") from exc
    result: TextEmbeddings = {}
    for c, clip_id in enumerate(clip_ids):
        result[clip_id] = [
            vectors[token_offsets[k] : token_offsets[k + 1]]
            for k in range(caption_offsets[c], caption_offsets[c + 1])
        ]
    return result


def read_text_attrs(path: str | Path) -> dict[str, Any]:
    with h5py.File(path, "r") as h5:
        return {k: _plain(v) for k, v in h5.attrs.items()}


def read_legacy_text_pickle(path: str | Path) -> TextEmbeddings:
    """Read the original's ``w2v_<split>.pkl`` without running code from it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: legacy text embeddings not found")
    data = restricted_load(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a dict clip id -> list of arrays, got {type(data).__name__}")
    result: TextEmbeddings = {}
    for clip_id, captions in data.items():
        if not isinstance(captions, (list, tuple)):
            raise DataError(f"{path}: clip {clip_id!r}: expected a list of [n_tokens, D] arrays")
        result[str(clip_id)] = [
            check_feature_array(np.asarray(a), f"{path}:{clip_id} caption {k + 1}")
            for k, a in enumerate(captions)
        ]
    return result


