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
