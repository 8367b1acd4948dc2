"""Gated Embedding Unit (Miech et al.): a linear projection gated by its own context."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from atric.errors import ConfigError
from atric.model.normalize import l2_normalize


class GatedEmbeddingUnit(nn.Module):
    """y = Linear(x); y = y * sigmoid(BN(Linear(y))); return y / ||y||.

    BatchNorm1d needs more than one row per batch in training mode (a torch rule);
    in eval mode any batch size works.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ConfigError(f"GatedEmbeddingUnit dims must be >= 1, got in_dim={in_dim}, out_dim={out_dim}")
        self.in_dim = in_dim
        self.output_dim = out_dim
        self.project = nn.Linear(in_dim, out_dim)
        self.gate = nn.Linear(out_dim, out_dim)
        self.gate_bn = nn.BatchNorm1d(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(x)
        y = y * torch.sigmoid(self.gate_bn(self.gate(y)))
        return l2_normalize(y)
