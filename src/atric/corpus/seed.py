"""``data.source: seed``: the original's own input files are the raw corpus.

``data.raw_dir`` then holds one dataset in the seed layout (ORIGINAL_SPEC.md)::

    <raw_dir>/Index/{train,val,test}.{json|csv}
    <raw_dir>/AudioExpert/<expert>/<split>/<expert>.h5      precomputed [T, D] per clip
    <raw_dir>/TextEmbeddings/w2v_<split>.pkl                 the original's word2vec captions

It is tracked by ``data.dvc`` like any raw corpus, so DVC treats it as an input and no stage
ever writes into it. The pipeline's stages import it instead of computing: ``prepare`` reads
its Index files, ``extract`` copies each expert's features clip by clip after checking them
(shape, dim, finite values, every indexed clip present), and ``embed_text`` with
``text.vectors: w2v`` turns the legacy pickles (restricted unpickler) into atric's HDF5 text
embeddings. No audio is decoded and no caption is re-embedded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from atric.config import Params
from atric.errors import DataError
from atric.text.vectors import PRECOMPUTED as LEGACY_VECTORS
from atric.layout import (
    SPLITS,
    FeatureFile,
    Layout,
    Manifest,
    ManifestClip,
    check_feature_array,
    read_index,
    read_legacy_text_pickle,
    write_features,
    write_text_embeddings,
)

SOURCE = "seed"


class RawSeedLayout(Layout):
    """The seed layout rooted at ``raw_dir`` itself (its Index style follows ``dataset``)."""

    def __init__(self, dataset: str, raw_dir: str | Path) -> None:
        super().__init__(dataset, raw_dir)

    @property
    def dataset_dir(self) -> Path:
        return self.root


def read_seed_raw(raw_dir: Path, dataset: str, sample_rate: int) -> Manifest:
    """The Index files of a seed-layout raw folder as a Manifest (no audio: duration 0)."""
    raw = RawSeedLayout(dataset, raw_dir)
    if not (raw_dir / "Index").is_dir():
        raise DataError(f"{raw_dir}: no Index/ folder: not a seed layout (data.source=seed expects "
                        "Index/, AudioExpert/<expert>/<split>/<expert>.h5 and TextEmbeddings/)")
    clips = []
    for split in SPLITS:
        for clip in read_index(raw.index_path(split), split):
            clips.append(ManifestClip(clip.clip_id, split, "", 0.0, tuple(clip.captions)))
    return Manifest(dataset=dataset, source=SOURCE, sample_rate=sample_rate, audio_root=str(raw_dir), clips=tuple(clips))


def import_features(params: Params, expert: str, split: str) -> Path:
    """Copy ``<raw_dir>/AudioExpert/<expert>/<split>/<expert>.h5`` into the pipeline's layout,
    checking every clip of the split's Index; returns the written path."""
    data = params.data
    layout = Layout(data.dataset, data.root)
    source = RawSeedLayout(data.dataset, data.raw_dir).features_path(expert, split)
    if not source.exists():
        raise DataError(f"{source}: no precomputed {expert} features for the {split} split in the seed layout")
    clip_ids = [c.clip_id for c in read_index(layout.index_path(split), split)]
    with FeatureFile(source) as features:
        present = set(features.keys())
        missing = [c for c in clip_ids if c not in present]
        if missing:
            raise DataError(f"{source}: {len(missing)} clip(s) of the {split} index have no features, e.g. {missing[0]!r}")
        attrs = {k: v for k, v in features.attrs.items() if k != "dim"}
        first = features[clip_ids[0]]
        dim = int(first.shape[1])

        def rows():
            for clip_id in clip_ids:
                yield clip_id, check_feature_array(np.asarray(features[clip_id], np.float32), f"{source}:{clip_id}", dim)

        target = layout.features_path(expert, split)
        write_features(target, rows(), {**attrs, "expert": expert, "dim": dim, "imported_from": str(source)})
    return target


def import_text(params: Params, split: str) -> Path:
    """The original's ``w2v_<split>.pkl`` -> ``TextEmbeddings/w2v_<split>.h5`` (checked against the Index)."""
    data = params.data
    layout = Layout(data.dataset, data.root)
    source = RawSeedLayout(data.dataset, data.raw_dir).legacy_text_path(split)
    embeddings = read_legacy_text_pickle(source)  # restricted unpickler: nothing in the file runs
    clips = read_index(layout.index_path(split), split)
    captions = {}
    for clip in clips:
        arrays = embeddings.get(clip.clip_id)
        if arrays is None:
            raise DataError(f"{source}: clip {clip.clip_id!r} of the {split} index has no caption embeddings")
        if len(arrays) != len(clip.captions):
            raise DataError(
                f"{source}: clip {clip.clip_id!r} has {len(arrays)} caption embeddings, the index {len(clip.captions)} captions"
            )
        captions[clip.clip_id] = list(clip.captions)
    target = layout.text_path(LEGACY_VECTORS, split)
    ordered = {clip.clip_id: embeddings[clip.clip_id] for clip in clips}
    write_text_embeddings(target, ordered, {"vectors": LEGACY_VECTORS, "imported_from": str(source)}, captions=captions)
    return target
