"""Numeric precision as an explicit choice (``train.precision``): one name -> autocast + scaler.

``fp32`` runs without autocast everywhere. ``bf16`` autocasts to bfloat16 (CUDA with bf16
support, or the CPU). ``fp16`` autocasts to float16 with a GradScaler and needs CUDA. The name
is part of the run signature, so a run never resumes under another precision without a trace.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import get_args

import torch

from atric.config import PrecisionName
from atric.errors import ConfigError

PRECISIONS: tuple[str, ...] = get_args(PrecisionName)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    name: str
    device_type: str
    dtype: torch.dtype = torch.float32
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, name: str, device: torch.device) -> Precision:
        """The precision ``name`` on ``device``; ConfigError where the device cannot run it."""
        if name not in _DTYPES:
            raise ConfigError(f"train.precision: {name!r} is not one of {', '.join(PRECISIONS)}")
        if name == "fp16" and device.type != "cuda":
            raise ConfigError(f"train.precision: fp16 needs a CUDA device (this run is on {device.type}); use bf16 or fp32")
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision: this GPU has no bfloat16 support; use fp16 or fp32")
        scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None
        return cls(name, device.type, _DTYPES[name], scaler)

    @property
    def enabled(self) -> bool:
        return self.name != "fp32"

    def autocast(self) -> AbstractContextManager[object]:
        if not self.enabled:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


FP32 = Precision("fp32", "cpu")  # no autocast: what evaluation of a checkpoint uses unless told otherwise
