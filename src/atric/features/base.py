"""The audio-expert interface, the registry, and what every expert shares.

An expert turns mono float32 waveforms at its own sample rate into one float32
[T, D] sequence per clip. Adding an expert is one module plus one line in
``EXPERTS`` below. Factories import their module lazily so that building the
registry never imports every model.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from atric.errors import CheckpointError, ConfigError

NO_CHECKPOINT = "none"


class ExpertSettings(BaseModel):
    """Base of every expert's ``features.<expert>`` mapping: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


S = TypeVar("S", bound=ExpertSettings)


def parse_settings(name: str, settings: Mapping[str, Any] | None, schema: type[S]) -> S:
    """Validate ``features.<name>``; errors name the key and list the valid ones."""
    valid = ", ".join(schema.model_fields) or "(none)"
    try:
        return schema.model_validate(dict(settings or {}))
    except ValidationError as exc:
        lines = [f"features.{name}: invalid settings:"]
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown setting; valid settings are: {valid}")
            else:
                lines.append(f"  {key}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from exc


class AudioExpert(ABC):
    """One feature extractor. Subclasses set the attributes in ``__init__``."""

    name: str
    sample_rate: int  # waveforms passed to ``embed`` are mono at this rate
    dim: int  # D
    hop_seconds: float  # audio time per output frame
    checkpoint_hash: str  # sha256 of the weights file, or "none"
    device: torch.device

    @abstractmethod
    def embed(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]:
        """A batch of mono float32 waveforms -> one float32 [T, D] per waveform (T >= 1)."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Every setting that changes the output (goes into the extraction params hash)."""

    def describe(self) -> dict[str, Any]:
        """What identifies this expert's output: stored in the feature file and hashed."""
        return {
            "expert": self.name,
            "sample_rate": int(self.sample_rate),
            "dim": int(self.dim),
            "hop_seconds": float(self.hop_seconds),
            "checkpoint_hash": self.checkpoint_hash,
            "settings": self.settings(),
        }


ExpertFactory = Callable[[Mapping[str, Any], torch.device], AudioExpert]


def _lazy(module: str, cls: str) -> ExpertFactory:
    def factory(settings: Mapping[str, Any], device: torch.device) -> AudioExpert:
        expert_cls = getattr(importlib.import_module(f"atric.features.{module}"), cls)
        return expert_cls(settings, device)

    factory.__qualname__ = f"{module}.{cls}"
    return factory


EXPERTS: dict[str, ExpertFactory] = {
    "logmel": _lazy("logmel", "LogMel"),
    "aisfx": _lazy("aisfx", "AiSfx"),
    "yamnet": _lazy("yamnet", "Yamnet"),
    "panns_cnn10": _lazy("panns", "PannsCnn10"),
    "panns_cnn14": _lazy("panns", "PannsCnn14"),
    "vggish": _lazy("vggish", "VGGish"),
}


def build_expert(
    name: str, settings: Mapping[str, Any] | None = None, device: torch.device | str = "cpu"
) -> AudioExpert:
    """The expert ``name`` configured by ``settings`` (its ``features.<name>`` mapping)."""
    if name not in EXPERTS:
        raise ConfigError(f"unknown audio expert {name!r}; valid experts are: {', '.join(EXPERTS)}")
    return EXPERTS[name](settings or {}, torch.device(device))


# ---------------------------------------------------------------- shared helpers
def pad_to_min_length(waveform: np.ndarray, min_samples: int) -> np.ndarray:
    """Zero-pad at the end so every clip yields at least one frame (silence adds no event)."""
    waveform = np.asarray(waveform, dtype=np.float32).reshape(-1)
    if waveform.shape[0] >= min_samples:
        return waveform
    return np.pad(waveform, (0, min_samples - waveform.shape[0]))


class MelProjection:
    """Power spectrogram [bins, frames] -> mel [bands, frames] (float32), for one fixed filterbank.

    A sparse product accumulated in float64, then rounded once to float32. Mel filterbanks are
    about 98% zeros, so this is 10-40x less work than the dense float32 matmul it replaces,
    and it is reproducible: scipy's sparse product is one single-threaded loop in a fixed
    order, and since a product of two float32 numbers is exact in float64 and a band sums a
    few dozen non-negative ones, each value is the exact sum rounded once (another summation
    order changes a value only if it lies within ~1e-15 of a float32 rounding boundary). A
    BLAS matmul splits its sums by thread instead: with OpenBLAS, the features changed with
    the machine's core count, so feature files (DVC outputs) differed between machines.
    """

    def __init__(self, basis: np.ndarray) -> None:
        from scipy.sparse import csr_array  # scipy comes with librosa, which builds every filterbank

        basis = np.asarray(basis, dtype=np.float32)  # the filterbank as float32, as it was stored before
        self.shape = basis.shape
        self._matrix = csr_array(basis.astype(np.float64))

    def __call__(self, power: np.ndarray) -> np.ndarray:
        if power.ndim != 2 or power.shape[0] != self.shape[1]:
            raise ValueError(f"expected a [{self.shape[1]}, frames] power spectrogram, got {power.shape}")
        return (self._matrix @ np.ascontiguousarray(power, dtype=np.float64)).astype(np.float32)


def embed_equal_lengths(
    inputs: Sequence[np.ndarray], forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device
) -> list[np.ndarray]:
    """``forward`` over batches of equal-length inputs; one output per input, in input order.

    Inputs of different lengths never share a forward pass (zero padding would leak into
    the last frames through the convolutions), so an output never depends on which clips
    share its batch.
    """
    results: list[np.ndarray | None] = [None] * len(inputs)
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(inputs):
        groups.setdefault(x.shape[0], []).append(i)
    with torch.inference_mode():
        for members in groups.values():
            batch = torch.from_numpy(np.stack([inputs[i] for i in members])).to(device)
            out = forward(batch).float().cpu().numpy()
            for row, i in enumerate(members):
                results[i] = np.ascontiguousarray(out[row])
    return [r for r in results if r is not None]


def embed_in_chunks(
    parts: Sequence[np.ndarray],
    forward: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    chunk: int,
) -> list[np.ndarray]:
    """``forward`` over every clip's independent items (patches, blocks) together, ``chunk``
    items per pass (bounds memory, not the output); returns each clip's output rows."""
    if not parts:
        return []
    stacked = np.concatenate(parts)
    with torch.inference_mode():
        flat = np.concatenate(
            [
                forward(torch.from_numpy(stacked[i : i + chunk]).to(device)).float().cpu().numpy()
                for i in range(0, stacked.shape[0], chunk)
            ]
        )
    bounds = np.cumsum([0, *(p.shape[0] for p in parts)])
    return [np.ascontiguousarray(flat[a:b]) for a, b in itertools.pairwise(bounds)]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def params_hash(description: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def load_torch_file(path: Path, safe_globals: Sequence[Any] = ()) -> Any:
    """``torch.load`` that never runs code from the file (weights_only=True, always)."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        reason = next((line.strip() for line in first if "Unsupported" in line), first[-1] if first else "")
        raise CheckpointError(
            f"{path}: refused to load: the file holds more than tensors and plain containers "
            f"(weights_only=True; {reason}). Only load weight files from a source you trust, "
            "saved as a state_dict."
        ) from exc
    except Exception as exc:  # truncated zips, garbage bytes, etc. raise many types
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {exc}") from exc


def extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state_dict or one nested under "model" (PANNs) or "state_dict"."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: expected a state_dict (name -> tensor), optionally under 'model', "
            f"got {type(obj).__name__}"
        )
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def load_weights(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    path: Path,
    *,
    ignore_prefixes: Sequence[str] = (),
    show: int = 5,
) -> None:
    """Strict load with an error listing the first few missing/unexpected/misshaped keys.

    The model may live on the meta device; afterwards it holds the file's tensors (on the CPU).
    """
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if keys:
            more = f" and {len(keys) - show} more" if len(keys) > show else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:show])}{more}")
    if problems:
        raise CheckpointError(
            f"{path}: does not match the {type(model).__name__} architecture: " + "; ".join(problems)
        )
    # assign=True: models are built on the meta device (no wasted random init), so the
    # loaded tensors become the parameters; cast to the model's dtypes (e.g. fp16 files).
    model.load_state_dict({k: state[k].to(v.dtype) for k, v in expected.items()}, strict=True, assign=True)


def load_pretrained(
    build: Callable[[], torch.nn.Module],
    path: Path,
    device: torch.device,
    *,
    safe_globals: Sequence[Any] = (),
    state_dict: Callable[[Any, Path], Mapping[str, torch.Tensor]] = extract_state_dict,
) -> torch.nn.Module:
    """``build()``'s network holding the weights of ``path`` (loaded strictly), on ``device``, in eval mode.

    The network is built on the meta device (the weights come from the file: no wasted random
    init); ``state_dict`` turns what the file holds into the network's state_dict.
    """
    state = state_dict(load_torch_file(path, safe_globals), path)
    with torch.device("meta"):
        model = build()
    load_weights(model, state, path)
    return model.to(device).eval()


def checkpoint_path(name: str, value: str | None, where_to_get: str) -> Path:
    """The weights file named by ``features.<name>.checkpoint``; CheckpointError if absent."""
    if not value:
        raise ConfigError(
            f"features.{name}.checkpoint: required (a path to the pretrained weights; {where_to_get})"
        )
    path = Path(value).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"{path}: {name} weights not found (features.{name}.checkpoint). {where_to_get}"
        )
    return path
