"""VGGish (Hershey et al. 2017), re-implemented so torchvggish's weights load.

Parameter names follow ``harritaylor/torchvggish`` (``features.N``, ``embeddings.N``),
so ``vggish-10086976.pth`` loads strictly. Front end as the reference
``vggish_input.waveform_to_examples``: 16 kHz, 25 ms periodic-Hann frames every
10 ms, 512-point FFT magnitude, 64 HTK mel bands 125-7500 Hz (the reference's own
mel matrix), log(mel + 0.01), then 96-frame (0.96 s) patches every
``patch_hop_seconds``. One 128-d embedding per patch (before the reference's
optional PCA/quantisation postprocessing, which is not applied). A clip shorter than
one patch is zero-padded to one patch; the tail that does not fill a patch is
dropped, as in the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from atric.features.base import (
    AudioExpert,
    ExpertSettings,
    MelProjection,
    checkpoint_path,
    embed_in_chunks,
    load_pretrained,
    pad_to_min_length,
    parse_settings,
    sha256_file,
)

SAMPLE_RATE = 16000
WINDOW = 400  # 25 ms
HOP = 160  # 10 ms
FFT = 512
MEL_BINS = 64
FMIN, FMAX = 125.0, 7500.0
LOG_OFFSET = 0.01
PATCH_FRAMES = 96
PATCHES_PER_FORWARD = 64
WHERE_TO_GET = (
    "Download vggish-10086976.pth from "
    "https://github.com/harritaylor/torchvggish/releases and set the path in params.yaml."
)


class VGGishSettings(ExpertSettings):
    checkpoint: str | None = None
    patch_hop_seconds: float = Field(0.96, ge=0.01, le=0.96)


def _hertz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(hz) / 700.0)


def mel_matrix() -> np.ndarray:
    """[257, 64] triangles in the HTK mel domain with the DC bin zeroed (vggish mel_features)."""
    bins = FFT // 2 + 1
    bins_mel = _hertz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, bins))
    edges = np.linspace(_hertz_to_mel(FMIN), _hertz_to_mel(FMAX), MEL_BINS + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    up = (bins_mel[:, None] - lower) / (centre - lower)
    down = (upper - bins_mel[:, None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(up, down))
    weights[0, :] = 0.0
    return weights.astype(np.float32)


def log_mel(waveform: np.ndarray, mel: np.ndarray, offset: float = LOG_OFFSET) -> np.ndarray:
    """[frames, 64] log(mel + offset); frames = 1 + (samples - 400) // 160 (no centring)."""
    frames = np.lib.stride_tricks.sliding_window_view(waveform, WINDOW)[::HOP]
    window = 0.5 - 0.5 * np.cos(2 * np.pi / WINDOW * np.arange(WINDOW))  # periodic Hann
    magnitude = np.abs(np.fft.rfft(frames * window, FFT)).astype(np.float32)
    # Exact in float64 and thread-count independent (a BLAS matmul is not): see MelProjection.
    return np.log(MelProjection(mel.T)(magnitude.T).T + offset)


class VGGishNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for item in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                cin = int(item)
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 4 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 128),
            nn.ReLU(inplace=True),
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(n, 96, 64) log-mel patches -> (n, 128)."""
        x = self.features(patches[:, None])  # (n, 512, 6, 4)
        # Flatten in TensorFlow's (height, width, channel) order, as the ported weights expect.
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        return self.embeddings(x)


class VGGish(AudioExpert):
    name = "vggish"
    sample_rate = SAMPLE_RATE
    dim = 128

    def __init__(self, settings: Mapping[str, Any], device: torch.device) -> None:
        self.config = parse_settings(self.name, settings, VGGishSettings)
        self.device = device
        path = checkpoint_path(self.name, self.config.checkpoint, WHERE_TO_GET)
        self.model = load_pretrained(VGGishNet, path, device)
        self.checkpoint_hash = sha256_file(path)
        self.patch_hop = max(1, round(self.config.patch_hop_seconds * 100))  # in 10 ms frames
        self.hop_seconds = self.patch_hop * HOP / SAMPLE_RATE
        self.min_samples = WINDOW + (PATCH_FRAMES - 1) * HOP
        self._mel = mel_matrix()

    def settings(self) -> dict[str, Any]:
        return {"patch_hop_seconds": self.config.patch_hop_seconds}

    def patches(self, waveform: np.ndarray) -> np.ndarray:
        """[n, 96, 64] log-mel patches of one clip (n >= 1)."""
        spec = log_mel(pad_to_min_length(waveform, self.min_samples), self._mel)
        windows = np.lib.stride_tricks.sliding_window_view(spec, PATCH_FRAMES, axis=0)[:: self.patch_hop]
        return np.array(windows.transpose(0, 2, 1), dtype=np.float32, order="C")  # a writable copy

    def embed(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]:
        # Patches are independent, so all clips' patches share the forward passes; chunks
        # bound the conv activations (64 patches: about 100 MB for the first layer).
        patches = [self.patches(w) for w in waveforms]
        return embed_in_chunks(patches, self.model, self.device, PATCHES_PER_FORWARD)
