"""PANNs CNN10 and CNN14 (Kong et al. 2020), re-implemented so their official weights load.

Parameter names follow the official ``audioset_tagging_cnn`` models, including the
frozen STFT-as-convolution and mel matrix of torchlibrosa
(``spectrogram_extractor.stft.conv_real.weight``, ``logmel_extractor.melW``), so
``Cnn10_mAP=0.380.pth`` / ``Cnn14_mAP=0.431.pth`` (``checkpoint["model"]``) load strictly.

Front end: 32 kHz, window 1024, hop 320 (10 ms), 64 mel bands 50-14000 Hz, power to dB.
Output: the frame-level sequence before global pooling. After the conv stack the
feature map is averaged over frequency and smoothed over time with a 3-frame
max + mean (as the PANNs decision-level models do), giving [T, C] with C = 512
(CNN10, 4 time halvings: 0.16 s per frame) or 2048 (CNN14, 5 halvings: 0.32 s per frame).
Clips shorter than the minimum the pooling needs are zero-padded (see ``min_samples``).
Clips of different lengths never share a forward pass: zero padding would leak into
the last frames of the shorter clip through the convolutions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atric.features.base import (
    AudioExpert,
    ExpertSettings,
    checkpoint_path,
    embed_equal_lengths,
    load_pretrained,
    pad_to_min_length,
    parse_settings,
    sha256_file,
)

SAMPLE_RATE = 32000
WINDOW = 1024
HOP = 320
MEL_BINS = 64
FMIN, FMAX = 50.0, 14000.0
WHERE_TO_GET = (
    "Download the official PANNs weights (Cnn10_mAP=0.380.pth, Cnn14_mAP=0.431.pth) from "
    "https://zenodo.org/record/3987831 and set the path in params.yaml."
)


class PannsSettings(ExpertSettings):
    checkpoint: str | None = None


class _STFT(nn.Module):
    """torchlibrosa's STFT as two frozen Conv1d (periodic Hann window, centred, reflect pad)."""

    def __init__(self, n_fft: int, hop: int) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        bins = n_fft // 2 + 1
        window = librosa.filters.get_window("hann", n_fft, fftbins=True)
        dft = np.exp(-2j * np.pi * np.outer(np.arange(n_fft), np.arange(bins)) / n_fft) * window[:, None]
        self.conv_real = nn.Conv1d(1, bins, n_fft, stride=hop, bias=False)
        self.conv_imag = nn.Conv1d(1, bins, n_fft, stride=hop, bias=False)
        self.conv_real.weight.data = torch.tensor(dft.real.T[:, None, :], dtype=torch.float32)
        self.conv_imag.weight.data = torch.tensor(dft.imag.T[:, None, :], dtype=torch.float32)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = F.pad(waveform[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        return self.conv_real(x) ** 2 + self.conv_imag(x) ** 2  # (batch, bins, frames) power


class _Spectrogram(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stft = _STFT(WINDOW, HOP)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.stft(waveform).transpose(1, 2)[:, None]  # (batch, 1, frames, bins)


class _LogMel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        mel = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=WINDOW, n_mels=MEL_BINS, fmin=FMIN, fmax=FMAX)
        self.melW = nn.Parameter(torch.tensor(mel.T, dtype=torch.float32), requires_grad=False)

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        mel = torch.matmul(power, self.melW)
        return 10.0 * torch.log10(torch.clamp(mel, min=1e-10))  # ref 1.0, no top_db


class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)
        for conv in (self.conv1, self.conv2):
            nn.init.xavier_uniform_(conv.weight)

    def forward(self, x: torch.Tensor, pool: tuple[int, int]) -> torch.Tensor:
        x = F.relu_(self.bn1(self.conv1(x)))
        x = F.relu_(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=pool)


class PannsCnn(nn.Module):
    """CNN10 (channels 64..512) or CNN14 (64..2048); the AudioSet heads are kept for strict loading."""

    def __init__(self, channels: Sequence[int], classes: int = 527) -> None:
        super().__init__()
        self.spectrogram_extractor = _Spectrogram()
        self.logmel_extractor = _LogMel()
        self.bn0 = nn.BatchNorm2d(MEL_BINS)
        cins = [1, *channels[:-1]]
        for i, (cin, cout) in enumerate(zip(cins, channels, strict=True), start=1):
            setattr(self, f"conv_block{i}", _ConvBlock(cin, cout))
        self.n_blocks = len(channels)
        self.fc1 = nn.Linear(channels[-1], channels[-1])
        self.fc_audioset = nn.Linear(channels[-1], classes)
        self.dim = channels[-1]
        # The official CNN14 does not pool after its 6th block; CNN10 pools after all 4.
        self.time_stride = 2 ** min(self.n_blocks, 5)

    def feature_map(self, waveform: torch.Tensor) -> torch.Tensor:
        """(batch, samples) -> (batch, C, T): the last conv block's output averaged over frequency."""
        x = self.logmel_extractor(self.spectrogram_extractor(waveform))  # (b, 1, frames, 64)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        for i in range(1, self.n_blocks + 1):
            pool = (2, 2) if i <= 5 else (1, 1)
            x = getattr(self, f"conv_block{i}")(x, pool)
        return x.mean(dim=3)

    def frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """(batch, samples) -> (batch, T, C) frame-level embeddings (what the expert stores)."""
        x = self.feature_map(waveform)
        x = F.max_pool1d(x, 3, stride=1, padding=1) + F.avg_pool1d(x, 3, stride=1, padding=1)
        return x.transpose(1, 2)

    def clip_embedding(self, waveform: torch.Tensor) -> torch.Tensor:
        """(batch, samples) -> (batch, C): the official models' clip ``embedding`` output."""
        x = self.feature_map(waveform)
        return F.relu(self.fc1(x.amax(dim=2) + x.mean(dim=2)))


class _PannsExpert(AudioExpert):
    channels: tuple[int, ...] = ()
    sample_rate = SAMPLE_RATE

    def __init__(self, settings: Mapping[str, Any], device: torch.device) -> None:
        self.config = parse_settings(self.name, settings, PannsSettings)
        self.device = device
        path = checkpoint_path(self.name, self.config.checkpoint, WHERE_TO_GET)
        self.model = load_pretrained(lambda: PannsCnn(self.channels), path, device)
        self.checkpoint_hash = sha256_file(path)
        self.dim = self.model.dim
        self.hop_seconds = HOP * self.model.time_stride / SAMPLE_RATE
        # Enough STFT frames for every 2x pooling to keep at least one frame.
        self.min_samples = HOP * (self.model.time_stride - 1) + 1

    def settings(self) -> dict[str, Any]:
        return {}  # the architecture is fixed; the weights enter through checkpoint_hash

    def embed(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]:
        padded = [pad_to_min_length(w, self.min_samples) for w in waveforms]
        return embed_equal_lengths(padded, self.model.frames, self.device)


class PannsCnn10(_PannsExpert):
    name = "panns_cnn10"
    channels = (64, 128, 256, 512)


class PannsCnn14(_PannsExpert):
    name = "panns_cnn14"
    channels = (64, 128, 256, 512, 1024, 2048)
