"""The pretrained sound-effects CNN shipped by the ``aisfx`` package, run as a sequence model.

aisfx (the "X-Sequential-CE" model of its ISMIR paper) embeds one 100-frame block of a
44.1 kHz, 96-band log-mel spectrogram (hop 1024, so about 2.3 s) into 512 numbers:
four conv blocks, mean over frequency, max over time. We slide that block over the
clip with a step of ``block_step_frames`` spectrogram frames (default 24, about
0.56 s), so a clip becomes a [T, 512] sequence.

Two ways to run it (``mode``):
- ``shared`` (default): the conv stack runs once over the whole clip and each
  window's embedding is the max over its 12 (= 100 / 8) positions of the
  frequency-averaged feature map. Cost does not grow with overlap: about 3x faster
  than ``blocks`` at step 24 on a CPU. Windows see their real neighbours instead
  of zero padding at the block edges, so embeddings differ slightly from
  ``blocks`` (cosine about 0.93-0.98 on test sounds). The step must be a multiple
  of 8 frames (the conv stack's time stride).
- ``blocks``: every window goes through the network on its own, exactly as the
  package evaluates a block; cost grows as 1 / step.

Front end: the package's own librosa path (peak-normalised audio, HTK mel with
unit-sum bands, log10(10000 * power + 1), scaled by the package's "original"
min/max 0..9.4578). That path returns (mels, time); the network wants (time, mels).
The mel product is ``MelProjection`` (sparse, exact in float64: thread-count independent).

Inference: the package's weights with each batch norm folded into its convolution and, on
a CPU, oneDNN's blocked layout kept through the stack (``_InferenceConvStack``); outputs
equal the package's modules up to float32 rounding (about 1e-6 relative).

Lengths: blocks start every step and cover the whole clip; the last block, and
a clip shorter than one block (2.3 s), are zero-padded (a zero spectrogram frame
is silence after the log), so every clip gives T >= 1 and
T = 1 + ceil(max(0, frames - 100) / step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from atric.errors import CheckpointError, ConfigError
from atric.features.base import (
    AudioExpert,
    ExpertSettings,
    MelProjection,
    embed_equal_lengths,
    embed_in_chunks,
    extract_state_dict,
    load_pretrained,
    pad_to_min_length,
    parse_settings,
    sha256_file,
)

SAMPLE_RATE = 44100
N_FFT = 2048
HOP = 1024
MEL_BINS = 96
BLOCK_FRAMES = 100
SPEC_MAX = 9.457798957824707  # aisfx's "original" normalisation: (spec - 0) / (max - 0)
INSTALL_HINT = 'install it with `pip install --no-deps "aisfx==0.1.2"` (the Makefile does)'


TIME_STRIDE = 8  # three 2x2 poolings in the conv stack
BLOCK_POSITIONS = BLOCK_FRAMES // TIME_STRIDE  # 12 feature-map positions per block, as in blocks mode


class AiSfxSettings(ExpertSettings):
    mode: Literal["shared", "blocks"] = "shared"
    block_step_frames: int = Field(24, ge=1, le=BLOCK_FRAMES)
    peak_normalize: bool = True  # as the package does before its spectrogram
    checkpoint: str | None = None  # None: the weights inside the installed aisfx package
    max_blocks_per_forward: int = Field(64, ge=1)  # blocks mode: bounds memory, not the output

    @model_validator(mode="after")
    def _step_fits_mode(self) -> AiSfxSettings:
        if self.mode == "shared" and self.block_step_frames % TIME_STRIDE:
            raise ValueError(
                f"block_step_frames must be a multiple of {TIME_STRIDE} in mode 'shared' "
                f"(got {self.block_step_frames}); use e.g. {max(TIME_STRIDE, self.block_step_frames // 8 * 8)} "
                "or mode 'blocks'"
            )
        return self


def _package_checkpoint() -> Path:
    try:
        import aisfx.inference
    except ImportError as exc:
        raise ConfigError(f"expert aisfx needs the aisfx package: {INSTALL_HINT} ({exc})") from exc
    return Path(aisfx.inference.get_path_modelWeights())


def _numpy_safe_globals() -> list[Any]:
    """The numpy scalar/dtype types the aisfx checkpoint pickles (its dataset->class-count table)."""
    import numpy.dtypes

    scalar = np._core.multiarray.scalar  # type: ignore[attr-defined]
    allowed: list[Any] = [(scalar, "numpy.core.multiarray.scalar"), scalar, np.dtype]
    allowed += [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    return allowed


def _embedding_state(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The embedding network's state_dict from what the package's weights file holds."""
    # The package saves (state_dict of its CrossNet, dataset table); we keep only the
    # embedding network (the classifier heads are per-training-dataset).
    state = loaded[0] if isinstance(loaded, (tuple, list)) else loaded
    state = extract_state_dict(state, path)
    if any(k.startswith("embedding_net.") for k in state):
        state = {
            k.removeprefix("embedding_net."): v for k, v in state.items() if k.startswith("embedding_net.")
        }
    return state


def _embedding_net() -> torch.nn.Module:
    try:
        from aisfx.models.cnn2d import EmbeddingNet
    except ImportError as exc:
        raise ConfigError(f"expert aisfx needs the aisfx package: {INSTALL_HINT} ({exc})") from exc
    # The configuration of the package's best model (aisfx.inference.load_bestModel).
    return EmbeddingNet("max", 3, 1, 64)


class AiSfx(AudioExpert):
    name = "aisfx"
    sample_rate = SAMPLE_RATE
    dim = 512

    def __init__(self, settings: Mapping[str, Any], device: torch.device) -> None:
        self.config = parse_settings(self.name, settings, AiSfxSettings)
        self.device = device
        self.step = self.config.block_step_frames
        self.hop_seconds = self.step * HOP / SAMPLE_RATE
        path = Path(self.config.checkpoint) if self.config.checkpoint else _package_checkpoint()
        if not path.is_file():
            raise CheckpointError(f"{path}: aisfx weights not found; {INSTALL_HINT}")
        self.checkpoint_hash = sha256_file(path)
        self.model = load_pretrained(
            _embedding_net, path, device, safe_globals=_numpy_safe_globals(), state_dict=_embedding_state
        )
        self._mel = MelProjection(
            librosa.filters.mel(
                sr=SAMPLE_RATE,
                n_fft=N_FFT,
                n_mels=MEL_BINS,
                fmin=0.0,
                fmax=SAMPLE_RATE / 2,
                htk=True,
                norm=1.0,
            )
        )
        self._stack = _InferenceConvStack(self.model, device)

    def settings(self) -> dict[str, Any]:
        values = self.config.model_dump(exclude={"checkpoint", "max_blocks_per_forward"})
        return values  # the weights enter the hash through checkpoint_hash

    def spectrogram(self, waveform: np.ndarray) -> np.ndarray:
        """[frames, 96] normalised log-mel, as aisfx's librosa path computes it (transposed)."""
        y = np.asarray(waveform, dtype=np.float32).reshape(-1)
        if self.config.peak_normalize:
            peak = float(np.max(np.abs(y))) if y.size else 0.0
            y = y / (peak if peak > 0 else 1.0)
        y = pad_to_min_length(y, N_FFT)  # a clip shorter than one STFT window: pad to one window
        power = np.abs(librosa.stft(y, n_fft=N_FFT, hop_length=HOP, win_length=N_FFT, center=True)) ** 2
        mel = self._mel(power)
        spec = np.log10(mel * 10000.0 + 1.0) / SPEC_MAX
        return np.ascontiguousarray(spec.T, dtype=np.float32)

    def padded_spectrogram(self, waveform: np.ndarray) -> tuple[np.ndarray, int]:
        """The spectrogram zero-padded to exactly cover its windows, and the window count."""
        spec = self.spectrogram(waveform)
        n_windows = 1 + math.ceil(max(0, spec.shape[0] - BLOCK_FRAMES) / self.step)
        padded = np.zeros(((n_windows - 1) * self.step + BLOCK_FRAMES, MEL_BINS), dtype=np.float32)
        padded[: spec.shape[0]] = spec
        return padded, n_windows

    def blocks(self, padded: np.ndarray) -> np.ndarray:
        """[n_windows, 100, 96]: the windows of a padded spectrogram, every ``step`` frames."""
        windows = np.lib.stride_tricks.sliding_window_view(padded, BLOCK_FRAMES, axis=0)[:: self.step]
        return np.ascontiguousarray(windows.transpose(0, 2, 1))  # (n, 96, 100) -> (n, 100, 96)

    def _conv_stack(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, frames, 96) -> (batch, 512, frames // 8): EmbeddingNet before its time max."""
        return self._stack(x)

    def embed(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]:
        padded = [self.padded_spectrogram(w) for w in waveforms]
        if self.config.mode == "blocks":
            return self._embed_blocks([self.blocks(spec) for spec, _ in padded])
        return self._embed_shared(padded)

    def _embed_shared(self, padded: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        step_positions = self.step // TIME_STRIDE

        def windows(batch: torch.Tensor) -> torch.Tensor:
            fmap = self._conv_stack(batch)  # (b, 512, positions)
            return fmap.unfold(2, BLOCK_POSITIONS, step_positions).amax(dim=3).transpose(1, 2)  # (b, n, 512)

        outputs = embed_equal_lengths([spec for spec, _ in padded], windows, self.device)
        return [np.ascontiguousarray(out[:n]) for out, (_, n) in zip(outputs, padded, strict=True)]

    def _embed_blocks(self, blocks: list[np.ndarray]) -> list[np.ndarray]:
        def forward(batch: torch.Tensor) -> torch.Tensor:  # EmbeddingNet.forward: max over time
            return self._conv_stack(batch).amax(dim=2)

        return embed_in_chunks(blocks, forward, self.device, self.config.max_blocks_per_forward)


def _fold_batch_norm(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one convolution that computes bn(conv(x)) in eval mode.

    Folded in float64 and rounded once, so the folded weights are as exact as float32 allows;
    the outputs then differ from conv -> batch norm by rounding only (about 1e-6 relative).
    """
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale[:, None, None, None]
    bias = bn.bias.double() - bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    return weight.float().contiguous(), bias.float().contiguous()


class _InferenceConvStack:
    """aisfx's EmbeddingNet conv blocks for inference: the package's numbers up to float32 rounding.

    Each batch norm is folded into the convolution before it (one pass over the activations
    fewer per layer). On a CPU with oneDNN, activations stay in oneDNN's blocked layout from
    the first convolution to the last (``Tensor.to_mkldnn``), where the package's modules
    convert every activation to and from it around each convolution. Together 15-20% less
    CPU time on 2 cores. A clip's result does not depend on the batch it shares or on the
    thread count (tests check both, bit for bit); channels-last tensors are as fast but
    their results change with the batch size, so they are not used.
    """

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        if getattr(net, "pool_type", "max") != "max":
            raise ConfigError(f"aisfx: unsupported pool type {net.pool_type!r} (expected 'max')")
        blocks = [net.conv_block1, net.conv_block2, net.conv_block3, net.conv_block4]
        self.pools = [True, True, True, False]  # conv_block4 pools (1, 1): no pooling
        self.mkldnn = (
            device.type == "cpu"
            and torch.backends.mkldnn.is_available()
            and hasattr(torch, "mkldnn_convolution")
        )
        self.layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        with torch.no_grad():
            for block in blocks:
                pair = []
                for conv, bn in ((block.conv1, block.bn1), (block.conv2, block.bn2)):
                    if conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1:
                        raise ConfigError(f"aisfx: unexpected convolution {conv}")
                    weight, bias = _fold_batch_norm(conv, bn)
                    pair.append((weight.to(device), bias.to(device)))
                self.layers.append(pair)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.mkldnn and x.is_mkldnn:
            return torch.mkldnn_convolution(x, weight, bias, [1, 1], [1, 1], [1, 1], 1)
        return F.conv2d(x, weight, bias, padding=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, frames, 96) -> (batch, 512, frames // 8)."""
        x = x.unsqueeze(1)
        blocked = self.mkldnn and x.dtype == torch.float32 and torch.backends.mkldnn.enabled
        if blocked:
            x = x.to_mkldnn()
        for pair, pool in zip(self.layers, self.pools, strict=True):
            for weight, bias in pair:
                x = torch.relu_(self._conv(x, weight, bias))
            if pool:
                x = F.max_pool2d(x, kernel_size=(2, 2))
        if blocked:
            x = x.to_dense()
        return x.mean(dim=3)
