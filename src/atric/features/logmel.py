"""Log-mel spectrogram expert (librosa), the paper's simplest audio expert.

Defaults: 16 kHz, 128 mel bands, hop 0.1 s and window 0.2 s, i.e. 10 frames per
second, so a 5-8 s clip gives 50-80 frames. The window is twice the hop so every
sample is seen by two frames (no gaps between frames at this coarse rate).
Values are absolute dB (ref 1.0, no top_db clipping): loudness stays in the feature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import librosa
import numpy as np
import torch
from pydantic import Field, model_validator

from atric.features.base import (
    NO_CHECKPOINT,
    AudioExpert,
    ExpertSettings,
    MelProjection,
    pad_to_min_length,
    parse_settings,
)


class LogMelSettings(ExpertSettings):
    sample_rate: int = Field(16000, ge=4000)
    n_mels: int = Field(128, ge=1)
    hop_seconds: float = Field(0.1, gt=0)
    win_seconds: float = Field(0.2, gt=0)
    fmin: float = Field(0.0, ge=0)
    fmax: float | None = None  # None: Nyquist

    @model_validator(mode="after")
    def _check(self) -> LogMelSettings:
        if self.fmax is not None and not self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError("need fmin < fmax <= sample_rate / 2")
        return self


class LogMel(AudioExpert):
    name = "logmel"

    def __init__(self, settings: Mapping[str, Any], device: torch.device) -> None:
        self.config = parse_settings(self.name, settings, LogMelSettings)
        self.device = torch.device("cpu")  # librosa runs on the CPU; it is far faster than real time
        self.sample_rate = self.config.sample_rate
        self.dim = self.config.n_mels
        self.hop_length = max(1, round(self.config.hop_seconds * self.sample_rate))
        self.n_fft = max(1, round(self.config.win_seconds * self.sample_rate))
        self.hop_seconds = self.hop_length / self.sample_rate
        self.checkpoint_hash = NO_CHECKPOINT
        self._mel = MelProjection(
            librosa.filters.mel(
                sr=self.sample_rate,
                n_fft=self.n_fft,
                n_mels=self.config.n_mels,
                fmin=self.config.fmin,
                fmax=self.config.fmax,
            )
        )

    def settings(self) -> dict[str, Any]:
        return self.config.model_dump()

    def _one(self, waveform: np.ndarray) -> np.ndarray:
        # A clip shorter than one window is zero-padded to one window (T >= 1, no librosa warning).
        y = pad_to_min_length(waveform, self.n_fft)
        spec = np.abs(librosa.stft(y, n_fft=self.n_fft, hop_length=self.hop_length, center=True)) ** 2
        mel = self._mel(spec)  # sparse, exact in float64: the same on any core count
        logmel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
        return np.ascontiguousarray(logmel.T, dtype=np.float32)  # [T, n_mels]

    def embed(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self._one(w) for w in waveforms]
