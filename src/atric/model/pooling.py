"""Temporal poolings: a padded sequence [B, T, D] plus a mask [B, T] -> one vector per row.

Every pooling here honours the mask: whatever the padded frames hold (zeros, garbage,
even NaN) cannot change the output, and a clip pooled alone gives the same vector as
the same clip padded inside a batch (in eval mode). The original ignored the mask in
max and NetVLAD pooling; that is the bug fixed here.

A row with no real frame at all pools to the zero vector (denominators are clamped),
so it never produces NaN; callers should not feed such rows (every caption and clip
has at least one frame), but a stray one does not poison the batch.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
from torch import Tensor, nn

from atric.config import PoolingName
from atric.errors import ConfigError, DataError
from atric.model.normalize import EPS, l2_normalize, l2_normalize_blocks

POOLINGS: tuple[str, ...] = get_args(PoolingName)  # the names are declared once, in the params schema


def _check_inputs(x: Tensor, mask: Tensor, input_dim: int) -> Tensor:
    """Validate shapes and return x with its padded frames finite (so NaN garbage cannot leak)."""
    if x.dim() != 3:
        raise DataError(f"pooling input must be [batch, frames, dim], got shape {tuple(x.shape)}")
    if x.shape[-1] != input_dim:
        raise DataError(f"pooling input has feature dim {x.shape[-1]}, the pooling was built for {input_dim}")
    if mask.shape != x.shape[:2]:
        raise DataError(f"pooling mask shape {tuple(mask.shape)} does not match input frames {tuple(x.shape[:2])}")
    if mask.dtype != torch.bool:
        raise DataError(f"pooling mask must be bool (True = real frame), got {mask.dtype}")
    return _finite_padding(x, mask)


def _finite_padding(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with every padded frame finite. Each pooling gives padded frames zero weight (out of
    the weighted sum, -inf in max, after the real frames of a recurrence, masked keys in
    attention, zero assignment in NetVLAD), so finite values there change neither the output nor
    the real frames' gradient, but 0 x NaN is NaN: non-finite padding is zeroed (torch.where, not
    a multiplication, so that NaN/inf becomes an exact 0). On CPU one reading pass first checks
    whether that copy is needed: where() over a broadcast bool mask takes 4-5x a multiplication's
    time, and padding from atric's own loaders is zeros. On an accelerator the copy is cheap and
    the check would be a host sync, so padding is always zeroed there."""
    if x.device.type == "cpu" and bool((torch.isfinite(x.sum(dim=-1)) | mask).all()):
        return x
    return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _frame_counts(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Number of real frames per row as [B, 1], clamped to >= 1 to keep empty rows finite."""
    return mask.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)


def _real_frames_first(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's real frames moved to the front, in their order (a stable sort on "is padding"),
    and the rows' real lengths: what order-aware poolings step over, wherever the mask had holes."""
    batch, frames, dim = x.shape
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return x.gather(1, order.unsqueeze(-1).expand(batch, frames, dim)), mask.sum(dim=1)


class MeanPooling(nn.Module):
    """L2-normalise each frame, average the real frames, L2-normalise the average."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.output_dim = input_dim

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = _check_inputs(x, mask, self.input_dim)
        # One batched product: each real frame weighs 1 / (its norm x the real-frame count),
        # a padded frame 0. No normalised copy of the frames is made (on 31 x 2048 features
        # that copy and its sum were most of the pooling's time). Zero frames add zero (eps).
        norms = torch.linalg.vector_norm(x, dim=-1).clamp_min(EPS)
        weights = mask.to(norms.dtype) / (norms * _frame_counts(mask, norms.dtype))
        pooled = torch.bmm(weights.unsqueeze(1).to(x.dtype), x).squeeze(1)
        return l2_normalize(pooled)


class MaxPooling(nn.Module):
    """Element-wise max over the real frames only (padded frames are set to -inf first).

    The gradient of tied maxima is shared among them (amax's rule)."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.output_dim = input_dim

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = _check_inputs(x, mask, self.input_dim)
        # Padding is finite here, so adding -inf masks it: a broadcast add is several times
        # faster than masked_fill with a bool mask, and amax than max(), which also finds indices.
        padding = torch.where(mask, 0.0, float("-inf")).to(x.dtype).unsqueeze(-1)
        pooled = (x + padding).amax(dim=1)
        # A row without real frames would be all -inf: give it zeros instead.
        has_frames = mask.any(dim=1, keepdim=True)
        return torch.where(has_frames, pooled, torch.zeros((), dtype=x.dtype, device=x.device))


class LSTMPooling(nn.Module):
    """One-layer LSTM over the real frames; output = mean of its hidden states over real frames.

    Real frames are moved to the front of each row (stable, so their order is kept). The LSTM
    then runs over the whole padded batch: it is causal, so the states of a row's real frames
    never see the padding behind them, and the states past a row's length are masked out of
    the mean (and so get no gradient). Same values as packing the batch (to float rounding),
    about twice as fast on CPU: a packed sequence takes a slower per-time-step path.
    """

    def __init__(self, input_dim: int, hidden: int) -> None:
        super().__init__()
        if hidden < 1:
            raise ConfigError(f"lstm_hidden must be >= 1, got {hidden}")
        self.input_dim = input_dim
        self.output_dim = hidden
        self.lstm = nn.LSTM(input_dim, hidden, num_layers=1, batch_first=True)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x, lengths = _real_frames_first(_check_inputs(x, mask, self.input_dim), mask)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # oneDNN's CPU LSTM has no bf16/fp16 kernel on every CPU: run this layer in float32.
            with torch.autocast("cpu", enabled=False):
                hidden, _ = self.lstm(x.float())
        else:
            hidden, _ = self.lstm(x)
        real = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
        hidden = torch.where(real.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
        pooled = hidden.sum(dim=1) / _frame_counts(mask, hidden.dtype)
        return pooled * (lengths > 0).unsqueeze(-1).to(pooled.dtype)


def _sinusoid(frames: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[frames, width] fixed sine/cosine position codes (any length, no learned table)."""
    position = torch.arange(frames, device=device, dtype=torch.float32).unsqueeze(1)
    rate = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    codes = torch.zeros(frames, width, device=device)
    codes[:, 0::2] = torch.sin(position * rate)
    codes[:, 1::2] = torch.cos(position * rate[: width // 2])
    return codes.to(dtype)


class SeqTransfPooling(nn.Module):
    """The original code's sixth pooling (``seqTransf``; the paper does not report it): a
    one-layer transformer encoder over the frames, masked, then the mean over real frames.

    Real frames are moved to the front of each row (in order) so position codes count real
    frames only; padded keys are masked out of attention, so padding cannot change the output.
    """

    def __init__(self, input_dim: int, width: int, heads: int) -> None:
        super().__init__()
        if width < 2 or heads < 1 or width % heads:
            raise ConfigError(f"seqtransf: transformer_width {width} must be >= 2 and a multiple of transformer_heads {heads}")
        self.input_dim = input_dim
        self.output_dim = width
        self.project = nn.Linear(input_dim, width)
        # No dropout: padding must never change the output, in training mode too (tested per pooling).
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x, lengths = _real_frames_first(_check_inputs(x, mask, self.input_dim), mask)
        frames = x.shape[1]
        real = torch.arange(frames, device=x.device).unsqueeze(0) < lengths.clamp(min=1).unsqueeze(1)
        h = self.project(x) + _sinusoid(frames, self.output_dim, x.device, x.dtype)
        out = self.encoder(h, src_key_padding_mask=~real)
        out = out.masked_fill(~real.unsqueeze(-1), 0.0)
        pooled = out.sum(dim=1) / real.sum(dim=1, keepdim=True).to(out.dtype)
        return pooled * (lengths > 0).unsqueeze(-1).to(pooled.dtype)


class NetVLADPooling(nn.Module):
    """NetVLAD (with_centres=True) or NetRVLAD (False) over the real frames.

    Soft assignment = softmax(BatchNorm(x W)) over K + G clusters; the G ghost clusters
    absorb uninformative frames and are dropped after the softmax. BatchNorm sees only
    the real frames (they are gathered before it), so padding cannot shift its batch
    statistics in training or its running statistics.
    """

    def __init__(self, input_dim: int, clusters: int, ghost_clusters: int, *, with_centres: bool) -> None:
        super().__init__()
        if clusters < 1:
            raise ConfigError(f"clusters must be >= 1, got {clusters}")
        if ghost_clusters < 0:
            raise ConfigError(f"ghost_clusters must be >= 0, got {ghost_clusters}")
        self.input_dim = input_dim
        self.clusters = clusters
        self.ghost_clusters = ghost_clusters
        self.with_centres = with_centres
        self.output_dim = clusters * input_dim
        scale = 1.0 / math.sqrt(input_dim)
        self.assign = nn.Parameter(scale * torch.randn(input_dim, clusters + ghost_clusters))
        self.assign_bn = nn.BatchNorm1d(clusters + ghost_clusters)
        if with_centres:
            self.centres = nn.Parameter(scale * torch.randn(clusters, input_dim))
        else:
            self.register_parameter("centres", None)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = _check_inputs(x, mask, self.input_dim)
        batch, frames, _ = x.shape
        real = x[mask]  # [N_real, D]: only real frames reach BatchNorm
        logits = self.assign_bn(real @ self.assign)
        soft = torch.softmax(logits, dim=-1)[:, : self.clusters]  # ghosts dropped after softmax
        assignment = soft.new_zeros(batch, frames, self.clusters)  # soft's dtype: bf16/fp16 under autocast
        assignment[mask] = soft  # padded frames keep weight 0
        vlad = torch.einsum("btk,btd->bkd", assignment, x)  # [B, K, D]
        if self.centres is not None:
            vlad = vlad - assignment.sum(dim=1).unsqueeze(-1) * self.centres.unsqueeze(0)
        # Intra-normalisation per cluster, then the whole vector's, in one pass.
        return l2_normalize_blocks(vlad).reshape(batch, self.output_dim)


def build_pooling(
    name: str,
    input_dim: int,
    *,
    clusters: int,
    ghost_clusters: int,
    lstm_hidden: int,
    transformer_width: int = 0,
    transformer_heads: int = 0,
) -> nn.Module:
    """Build a pooling by name; the module maps (x [B,T,D], mask [B,T]) -> [B, output_dim]."""
    if input_dim < 1:
        raise ConfigError(f"pooling input_dim must be >= 1, got {input_dim}")
    if name == "mean":
        return MeanPooling(input_dim)
    if name == "max":
        return MaxPooling(input_dim)
    if name == "lstm":
        return LSTMPooling(input_dim, lstm_hidden)
    if name == "netvlad":
        return NetVLADPooling(input_dim, clusters, ghost_clusters, with_centres=True)
    if name == "netrvlad":
        return NetVLADPooling(input_dim, clusters, ghost_clusters, with_centres=False)
    if name == "seqtransf":
        return SeqTransfPooling(input_dim, transformer_width, transformer_heads)
    raise ConfigError(f"unknown pooling {name!r}; valid poolings: {', '.join(POOLINGS)}")
