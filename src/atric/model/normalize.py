"""L2 normalisation along the last dimension with a hand-written backward.

Same values as ``F.normalize(x, dim=-1)`` (bitwise: the same norm, clamp and division), and the
same gradient to float rounding, in about half the time: autograd differentiates F.normalize
through the expanded division and the norm (six full-size operations), while the gradient of
y = x / ||x|| is one projection, (g - y <g, y>) / ||x||. The model normalises every pooled text
and clip vector and NetVLAD's clusters on every step, a tenth of a training step's time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

EPS = 1e-12  # F.normalize's


class _L2Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        denominator = norm.clamp_min(EPS)
        y = x / denominator
        ctx.save_for_backward(y, denominator, norm > EPS)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        y, denominator, unclamped = ctx.saved_tensors
        # Where the norm was clamped (a zero row), y = x / EPS is linear in x: no projection.
        along = (grad * y).sum(dim=-1, keepdim=True) * unclamped
        return (grad - y * along) / denominator


def l2_normalize(x: Tensor) -> Tensor:
    """``x / max(||x||, 1e-12)`` over the last dimension; zero rows stay zero."""
    return _L2Normalize.apply(x)


class _L2NormalizeBlocks(torch.autograd.Function):
    """y = x / (d_k G) for x [B, K, D]: d_k = max(||x_k||, EPS) per block, G = max(||x / d||, EPS)
    over the whole row, computed from the K block norms instead of a second pass over x."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [B, K, 1]
        denominator = norm.clamp_min(EPS)
        block = norm / denominator  # ||x_k / d_k||: 1, or below 1 for a clamped (near-zero) block
        whole = torch.linalg.vector_norm(block, dim=1, keepdim=True)  # [B, 1, 1]
        whole_denominator = whole.clamp_min(EPS)
        y = x / (denominator * whole_denominator)
        ctx.save_for_backward(y, denominator, whole_denominator, norm > EPS, whole > EPS, block)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        y, denominator, whole_denominator, unclamped, whole_unclamped, block = ctx.saved_tensors
        # The two projections of l2_normalize's backward, outer then per block, folded into
        # grad * a_k - y * c_k with per-block scalars (tests/test_pooling.py checks it against
        # autograd through two l2_normalize calls).
        along_block = (grad * y).sum(dim=-1, keepdim=True)  # <g, y>_k
        along = along_block.sum(dim=1, keepdim=True) * whole_unclamped  # <g, y> over the row
        share = (block / whole_denominator) ** 2  # <y, y>_k
        scale = 1.0 / (denominator * whole_denominator)
        within = whole_denominator * unclamped * (along_block - along * share)
        correction = (along / whole_denominator + within) / denominator
        return torch.addcmul(grad * scale, y, correction, value=-1.0)


def l2_normalize_blocks(x: Tensor) -> Tensor:
    """``l2_normalize(l2_normalize(x).flatten(1))`` for x [B, K, D] (NetVLAD's intra- then
    whole-vector normalisation), shaped like x: the same values to float rounding, the second
    norm taken from the K block norms, and one backward pass where autograd makes eight."""
    return _L2NormalizeBlocks.apply(x)
