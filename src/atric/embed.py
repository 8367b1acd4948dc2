"""The one embedding path: clips and captions of a split -> embeddings, as training sees them.

Evaluation (the similarity matrix), the search index and the served MLflow model all embed
through here, so the padding rule is the training collate's everywhere: a clip's first
``min(T, max_frames)`` frames are real (mask true), the rest is zero padding (mask false).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from atric.data import BackgroundLoader, ClipCollate, ClipDataset, SplitData, collate_words, pad_frames
from atric.model import RetrievalModel
from atric.precision import FP32, Precision

AudioEmbeddings = dict[str, Tensor]  # expert -> [N, E] float32, unit norm


def clip_loader(
    data: SplitData, *, batch_size: int, num_workers: int = 0, device: torch.device, time_reversed: bool = False
) -> BackgroundLoader:
    """Every clip of ``data`` once, in index order, padded/cut to the split's lengths."""
    return BackgroundLoader(
        ClipDataset(data, time_reversed),
        batch_size=batch_size,
        collate_fn=ClipCollate(data.max_frames),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if num_workers > 0 else None,
    )


@torch.no_grad()
def embed_clips(
    model: RetrievalModel,
    data: SplitData,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    precision: Precision = FP32,
    time_reversed: bool = False,
) -> AudioEmbeddings:
    """expert -> [N, E] clip embeddings (on ``device``), clips in index order."""
    parts: dict[str, list[Tensor]] = {name: [] for name in model.experts}
    if data.cached and not time_reversed:
        batches: Iterable[dict[str, tuple[Tensor, Tensor]]] = _cached_clip_batches(data, batch_size)
    else:
        batches = clip_loader(
            data, batch_size=batch_size, num_workers=num_workers, device=device, time_reversed=time_reversed
        )
    for audio in batches:
        audio = {k: (x.to(device), m.to(device)) for k, (x, m) in audio.items()}
        with precision.autocast():
            embedded = model.encode_audio(audio)
        for name, value in embedded.items():
            parts[name].append(value.float())
    return {name: torch.cat(values) for name, values in parts.items()}


def _cached_clip_batches(data: SplitData, batch_size: int) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """The clip loader's batches, sliced straight from a split cached in RAM (zero-padded to
    ``max_frames`` already; the same tensors ``ClipCollate`` builds)."""
    for start in range(0, len(data), batch_size):
        rows = slice(start, min(start + batch_size, len(data)))
        yield {name: expert.rows(rows) for name, expert in data.experts.items()}


@torch.no_grad()
def embed_captions(
    model: RetrievalModel,
    data: SplitData,
    *,
    device: torch.device,
    batch_size: int,
    precision: Precision = FP32,
) -> tuple[AudioEmbeddings, Tensor]:
    """(expert -> [M, E] caption embeddings, fusion weights [M, X]), captions in clip-major order."""
    parts: dict[str, list[Tensor]] = {name: [] for name in model.experts}
    weights: list[Tensor] = []
    for words, mask in DataLoader(data.words, batch_size=batch_size, collate_fn=collate_words):
        with precision.autocast():
            embeddings, w = model.encode_text(words.to(device), mask.to(device))
        # float32 even under autocast: ranks hinge on small differences.
        for name in model.experts:
            parts[name].append(embeddings[name].float())
        weights.append(w.float())
    return {name: torch.cat(values) for name, values in parts.items()}, torch.cat(weights)


@torch.no_grad()
def split_similarity(
    model: RetrievalModel,
    data: SplitData,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    precision: Precision = FP32,
    time_reversed: bool = False,
) -> np.ndarray:
    """sim [n_captions, n_clips] (float32): row i is caption i in clip-major order, so with 5
    captions per clip row i belongs to clip i // 5 (the evaluation protocol's order)."""
    was_training = model.training
    model.eval()
    try:
        audio = embed_clips(
            model, data, device=device, batch_size=batch_size, num_workers=num_workers, precision=precision,
            time_reversed=time_reversed,
        )
        text, weights = embed_captions(model, data, device=device, batch_size=batch_size, precision=precision)
        rows = []
        for start in range(0, weights.shape[0], batch_size):
            chunk = {k: v[start : start + batch_size] for k, v in text.items()}
            rows.append(model.similarity((chunk, weights[start : start + batch_size]), audio).cpu())
        return torch.cat(rows).numpy()
    finally:
        model.train(was_training)


def frames_to_batch(
    frames: Mapping[str, np.ndarray | Tensor], max_frames: Mapping[str, int]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Whole clips' frames (expert -> [T, D], or [B, T, D] rows of one length) -> the padded
    (x, mask) batch the model takes, cut to ``max_frames`` exactly as the training collate cuts."""
    batch = {}
    for name, value in frames.items():
        array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        rows = [array] if array.ndim == 2 else list(array)
        batch[name] = pad_frames([np.asarray(r, np.float32) for r in rows], int(max_frames[name]))
    return batch
