"""The params.yaml schema: one pydantic model per stage section, validated on load.

Unknown keys are refused (a typo must not silently fall back to a default), and
every error names the offending key, e.g. ``train.lr: Input should be greater than 0``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from atric.errors import ConfigError

PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitSizes(Section):
    train: int = Field(1000, ge=1)
    val: int = Field(250, ge=1)
    test: int = Field(250, ge=1)


class SynthParams(Section):
    """The embedded default corpus (see atric.corpus.synth)."""

    clips: SplitSizes = SplitSizes()
    min_duration: float = Field(5.0, gt=0)
    max_duration: float = Field(8.0, gt=0)
    max_events: int = Field(3, ge=1)
    noise_db: float = -35.0

    @model_validator(mode="after")
    def _durations_ordered(self) -> "SynthParams":
        if self.min_duration > self.max_duration:
            raise ValueError("min_duration must be <= max_duration")
        return self


# The default corpus's folder, and the seed layout's folders of the two public corpora.
SYNTH_DATASET = "SynthCaps"
SEED_DATASETS = {"clotho": "CLOTHO", "audiocaps": "AudioCaps"}


class DataParams(Section):
    """Where the raw corpus is and which folder under ``root`` it becomes.

    ``dataset`` names the folder ``<root>/<dataset>``. Left out, it defaults by
    source: SynthCaps, CLOTHO or AudioCaps (the seed folders). Set explicitly, it is
    kept (e.g. a subset "ClothoSmall"; the Index style follows the folder name: CSV
    only for AudioCaps), except that the synthetic corpus's folder with a real source
    is refused rather than rewritten: dvc.yaml templates outs from the literal
    ``${data.dataset}``, so a silent rename would make DVC and prepare disagree.
    A seed name is not refused here for another source (precomputed seed features
    train without ``prepare``); ``prepare`` refuses to write one corpus into another's
    seed folder.
    """

    source: Literal["synth", "clotho", "audiocaps"] = "synth"
    dataset: str = Field(SYNTH_DATASET, min_length=1)
    raw_dir: str = "data/raw"
    root: str = "data"
    sample_rate: int = Field(16000, ge=8000)
    seed: int = 0
    synth: SynthParams = SynthParams()

    @model_validator(mode="before")
    @classmethod
    def _dataset_default_by_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dataset" not in data:
            source = data.get("source", "synth")
            if isinstance(source, str) and source in SEED_DATASETS:
                data = {**data, "dataset": SEED_DATASETS[source]}
        return data

    @model_validator(mode="after")
    def _dataset_matches_source(self) -> "DataParams":
        if self.source in SEED_DATASETS and self.dataset == SYNTH_DATASET:
            raise ValueError(
                f"dataset {SYNTH_DATASET!r} is the synthetic corpus's folder but source is "
                f"{self.source!r}; set data.dataset to {SEED_DATASETS[self.source]!r} (the seed "
                "layout) or a name of your own"
            )
        return self


class FeaturesParams(Section):
    """Common extraction settings plus one mapping per expert (``features.logmel: {...}``).

    Per-expert mappings are extra keys so that DVC can depend on ``features.<expert>``
    alone; each expert validates its own mapping (atric.features).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    experts: list[str] = ["logmel", "aisfx"]
    device: str = "auto"
    batch_size: int = Field(16, ge=1)
    on_error: Literal["raise", "skip"] = "raise"

    def expert_settings(self, name: str) -> dict[str, Any]:
        value = (self.model_extra or {}).get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"features.{name}: expected a mapping of settings, got {value!r}")
        return dict(value)


class Word2VecParams(Section):
    """``text.vectors: train``: gensim Word2Vec on the training captions (seeded, one worker)."""

    vector_size: int = Field(100, ge=1)
    window: int = Field(5, ge=1)
    min_count: int = Field(1, ge=1)
    epochs: int = Field(20, ge=1)
    sg: Literal[0, 1] = 1  # skip-gram: better than CBOW on a corpus of a few thousand captions
    seed: int = 0


class TextParams(Section):
    vectors: str = "glove-6b-50d"
    max_words: int = Field(20, ge=1)
    cache_dir: str = "data/cache"
    on_empty: Literal["raise", "unk"] = "raise"
    word2vec: Word2VecParams = Word2VecParams()


class TrainParams(Section):
    experts: list[str] = ["logmel"]
    pooling: str = "netrvlad"
    # The pipeline's run matrix: features.experts x train.poolings (dvc.yaml `matrix`).
    poolings: list[str] = ["mean", "max", "lstm", "netvlad", "netrvlad"]
    text_pooling: str = "netvlad"
    embed_dim: int = Field(256, ge=1)
    audio_clusters: int = Field(12, ge=1)
    text_clusters: int = Field(20, ge=1)
    ghost_clusters: int = Field(0, ge=0)
    lstm_hidden: int = Field(512, ge=1)
    fusion: Literal["uniform", "text_weighted"] = "uniform"
    loss: Literal["max_margin", "infonce"] = "max_margin"
    margin: float = Field(0.2, ge=0)
    temperature: float = Field(0.07, gt=0)
    optimizer: Literal["ranger", "adamw"] = "ranger"
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    lr_step_gamma: float = Field(0.95, gt=0, le=1)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=2)
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = False
    max_frames: dict[str, int] = {}
    cache_in_ram: Literal["auto", "yes", "no"] = "auto"
    num_workers: int = Field(0, ge=0)
    models_dir: str = "models"
    metrics_dir: str = "metrics"


class EvaluateParams(Section):
    split: Literal["val", "test"] = "test"
    checkpoint: Literal["best", "last"] = "best"


class Params(Section):
    data: DataParams = DataParams()
    features: FeaturesParams = FeaturesParams()
    text: TextParams = TextParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    # Sections owned by later stages are validated by those stages.
    tune: dict[str, Any] = {}
    search: dict[str, Any] = {}
    report: dict[str, Any] = {}


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid params:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=0.003`` -> (["train", "lr"], 0.003); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=0.003")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    return parts, yaml.safe_load(raw)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    result = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return result


def load_params(path: str | Path = PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    """Read, override and validate params; raises ConfigError naming the key."""
    path = Path(path)
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    else:
        raw = {}
    raw = apply_overrides(raw, overrides or [])
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(path))) from exc


def flatten(params: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params -> {"train.lr": 0.01, ...}, as MLflow and DVC name them."""
    data = params.model_dump() if isinstance(params, BaseModel) else params
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
