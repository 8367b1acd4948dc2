"""Training losses over a batch similarity matrix.

Both losses take ``sim`` [Nt, Na] (captions x clips) and ``caption_clip`` [Nt], where
caption_clip[i] is the column of caption i's clip. Every clip column must have at least
one caption in the batch (a clip with none has no positive and cannot be ranked).
"""

from __future__ import annotations

import math
from typing import Any, get_args

import torch
from torch import Tensor, nn

from atric.config import LossName
from atric.errors import ConfigError, DataError

LOSSES: tuple[str, ...] = get_args(LossName)  # declared once, in the params schema


def _check(sim: Tensor, caption_clip: Tensor) -> Tensor:
    """Validate the pair and return the number of captions per clip, [Na]."""
    if sim.dim() != 2:
        raise DataError(f"loss: sim must be [captions, clips], got shape {tuple(sim.shape)}")
    n_text, n_audio = sim.shape
    if caption_clip.dim() != 1 or caption_clip.shape[0] != n_text:
        raise DataError(
            f"loss: caption_clip must be a 1-D tensor with one entry per sim row ({n_text}), "
            f"got shape {tuple(caption_clip.shape)}"
        )
    if caption_clip.dtype not in (torch.int64, torch.int32):
        raise DataError(f"loss: caption_clip must be an integer tensor, got {caption_clip.dtype}")
    if n_audio == 0:
        raise DataError("loss: the batch has no clips")
    if bool((caption_clip < 0).any()) or bool((caption_clip >= n_audio).any()):
        raise DataError(
            f"loss: caption_clip values must lie in [0, {n_audio}), "
            f"got min {int(caption_clip.min())}, max {int(caption_clip.max())}"
        )
    counts = torch.bincount(caption_clip.long(), minlength=n_audio)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise DataError(f"loss: clip columns {empty} have no caption in the batch")
    return counts


class MaxMarginRankingLoss(nn.Module):
    """Bidirectional max-margin ranking loss, averaged over the off-diagonal pairs.

    Rows of the same clip are averaged first, giving a square clip x clip matrix S.
    Loss = mean over i != j of relu(m - S_ii + S_ij) and relu(m - S_ii + S_ji), i.e. the
    mean of 2*Na*(Na-1) hinge terms, as the original computes it. With a single clip there
    is no negative and the loss is 0 (still attached to the graph).
    """

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        if margin < 0:
            raise ConfigError(f"max_margin margin must be >= 0, got {margin}")
        self.margin = float(margin)

    def forward(self, sim: Tensor, caption_clip: Tensor) -> Tensor:
        counts = _check(sim, caption_clip)
        n_audio = sim.shape[1]
        square = sim.new_zeros(n_audio, n_audio).index_add(0, caption_clip.long(), sim)
        square = square / counts.unsqueeze(1).to(sim.dtype)
        if n_audio < 2:
            return sim.sum() * 0.0
        diagonal = square.diagonal().unsqueeze(1)  # S_ii as a column
        text_to_audio = torch.relu(self.margin - diagonal + square)  # [i, j]: S_ij against S_ii
        audio_to_text = torch.relu(self.margin - diagonal.t() + square)  # [i, j]: S_ij against S_jj
        # The diagonal zeroed rather than the off-diagonal gathered: boolean indexing costs a host
        # sync and a scatter in backward, half of this loss's time on a training step.
        diagonal_mask = torch.eye(n_audio, dtype=torch.bool, device=sim.device)
        total = (text_to_audio + audio_to_text).masked_fill(diagonal_mask, 0.0).sum()
        return total / (2 * n_audio * (n_audio - 1))


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE with a (learnable) temperature.

    t2a: each caption row is a softmax over clips, its own clip the one positive.
    a2t: each clip column is a softmax over captions; ALL captions of that clip are
    positives (-log of the summed positive probability), none of them a negative.
    The scale 1/T is parametrised as log(1/T) and clamped to 1/T <= 100 (as CLIP does).
    """

    MAX_SCALE = 100.0

    def __init__(self, init_temperature: float = 0.07, learnable: bool = True) -> None:
        super().__init__()
        if not init_temperature > 0:
            raise ConfigError(f"infonce init_temperature must be > 0, got {init_temperature}")
        log_scale = torch.tensor(math.log(1.0 / init_temperature), dtype=torch.float32)
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def temperature(self) -> float:
        return 1.0 / float(self.scale().detach())

    def scale(self) -> Tensor:
        return self.log_scale.clamp(max=math.log(self.MAX_SCALE)).exp()

    def forward(self, sim: Tensor, caption_clip: Tensor) -> Tensor:
        _check(sim, caption_clip)
        logits = sim * self.scale().to(sim.dtype)
        targets = caption_clip.long()
        text_to_audio = nn.functional.cross_entropy(logits, targets)
        positive = nn.functional.one_hot(targets, sim.shape[1]).bool()  # [Nt, Na]
        log_all = torch.logsumexp(logits, dim=0)
        log_positive = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=0)
        audio_to_text = (log_all - log_positive).mean()
        return 0.5 * (text_to_audio + audio_to_text)


def merge_caption_similarities(sim: Tensor, caption_clip: Tensor) -> Tensor:
    """[Nt, Na] caption x clip similarities -> [Na, Na]: row c is the mean over clip c's captions
    (the original's ``merge_caption_similiarities = "avg"``); the positives are then the diagonal."""
    clips = sim.shape[1]
    counts = torch.bincount(caption_clip, minlength=clips).clamp_min(1).to(sim.dtype)
    summed = sim.new_zeros(clips, clips).index_add_(0, caption_clip, sim)
    return summed / counts.unsqueeze(1)


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a loss by name ("max_margin" or "infonce") with its keyword arguments."""
    classes = {"max_margin": MaxMarginRankingLoss, "infonce": InfoNCELoss}
    if name not in classes:
        raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    try:
        return classes[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"loss {name!r}: bad arguments {sorted(kwargs)} ({exc})") from exc
