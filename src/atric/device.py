"""One rule for picking the compute device."""

from __future__ import annotations

import torch

from atric.errors import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present (respecting CUDA_VISIBLE_DEVICES), else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"device: {spec!r} is not a valid torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {spec!r} asked for CUDA but no CUDA device is available")
    return device
