"""The params.yaml schema: one pydantic model per stage section, validated on load.

Unknown keys are refused (a typo must not silently fall back to a default), and
every error names the offending key, e.g. ``train.lr: Input should be greater than 0``.

Why one module of this size: the whole params schema in one file, so that every default and every param's role is written once.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atric.errors import ConfigError

PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    # inf/nan are never valid settings (train.lr: .inf would only surface as a NaN loss).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SplitSizes(Section):
    train: int = Field(800, ge=1)
    val: int = Field(200, ge=1)
    test: int = Field(200, ge=1)


class SynthParams(Section):
    """The embedded default corpus (see atric.corpus.synth)."""

    clips: SplitSizes = SplitSizes()
    min_duration: float = Field(4.0, gt=0)
    max_duration: float = Field(7.0, gt=0)
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

    # seed: data.raw_dir holds the original's seed layout (Index/, AudioExpert/, TextEmbeddings/),
    # imported as it is (atric.corpus.seed): no audio is decoded, no caption re-embedded.
    source: Literal["synth", "clotho", "audiocaps", "seed"] = "synth"
    dataset: str = Field(SYNTH_DATASET, min_length=1)
    raw_dir: str = "data/raw"
    root: str = "data"
    sample_rate: int = Field(16000, ge=8000)
    max_audio_seconds: float = Field(600.0, gt=0)  # prepare refuses longer clips (bounded decoding work)
    # skip: prepare leaves a clip whose audio is missing, unreadable or truncated out of the
    # corpus and lists it with its reason in manifest.json; raise: it is an error.
    on_error: Literal["raise", "skip"] = "raise"
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
        if self.source == "seed" and self.dataset == SYNTH_DATASET:
            raise ValueError(
                f"dataset {SYNTH_DATASET!r} is the synthetic corpus's folder but source is 'seed'; set "
                "data.dataset to the seed layout's dataset (CLOTHO, AudioCaps or a name of your own)"
            )
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
    max_words: int = Field(32, ge=1)  # the original used 20; SynthCaps' three-event captions run longer
    cache_dir: str = "data/cache"
    on_empty: Literal["raise", "unk"] = "raise"
    word2vec: Word2VecParams = Word2VecParams()


# ---------------------------------------------------------------- train params and their roles
# Every train.* field says once, next to its default, what it is:
#   result   changes what a run computes: a DVC dependency of the train stage and part of the
#            checkpoint signature (a last.pt trained otherwise is not resumed)
#   run      which run it is (experts, pooling): in the signature; the DVC matrix passes it on
#            each stage's command line instead of as a params dependency
#   schedule a DVC dependency but deliberately not in the signature: epochs (the schedule steps
#            per epoch, so a longer run continues a shorter one)
#   runtime  where and how fast it runs, and the pipeline's matrix: neither
# dvc.yaml's train params and the run signature are derived from these (tests/test_config.py
# checks dvc.yaml against ``train_dvc_params()``).
Role = Literal["result", "run", "schedule", "runtime"]
PoolingName = Literal["mean", "max", "lstm", "netvlad", "netrvlad", "seqtransf"]
LossName = Literal["max_margin", "infonce"]
FusionName = Literal["uniform", "text_weighted"]
OptimizerName = Literal["ranger", "adamw"]
PrecisionName = Literal["fp32", "bf16", "fp16"]
SamplingName = Literal["clip", "pairs"]
SchedulerName = Literal["step", "noam"]


def _role(role: Role, default: Any, **kwargs: Any) -> Any:
    return Field(default, json_schema_extra={"role": role}, **kwargs)


class TrainParams(Section):
    experts: list[str] = _role("run", ["logmel"], min_length=1)
    pooling: PoolingName = _role("run", "netrvlad")
    # The pipeline's run matrix: features.experts x train.poolings (dvc.yaml `matrix`).
    poolings: list[PoolingName] = _role("runtime", ["mean", "max", "lstm", "netvlad", "netrvlad"], min_length=1)
    # Beside the matrix: each run again with these seeds (<expert>-<pooling>-seed<k>), and one run
    # over all of features.experts with text-weighted fusion per pooling here (fused-<pooling>).
    extra_seeds: list[int] = _role("runtime", [])
    fused_poolings: list[PoolingName] = _role("runtime", ["netrvlad"])
    text_pooling: PoolingName = _role("result", "netvlad")
    embed_dim: int = _role("result", 256, ge=1)
    audio_clusters: int = _role("result", 12, ge=1)
    text_clusters: int = _role("result", 20, ge=1)
    ghost_clusters: int = _role("result", 0, ge=0)
    lstm_hidden: int = _role("result", 128, ge=1)  # the paper: 2048; CPU LSTMs are slow
    transformer_width: int = _role("result", 512, ge=2)  # seqtransf, as the original's code
    transformer_heads: int = _role("result", 4, ge=1)
    fusion: FusionName = _role("result", "uniform")
    loss: LossName = _role("result", "max_margin")
    margin: float = _role("result", 0.2, ge=0)
    temperature: float = _role("result", 0.07, gt=0)
    optimizer: OptimizerName = _role("result", "ranger")
    lr: float = _role("result", 0.01, gt=0)
    weight_decay: float = _role("result", 1e-3, ge=0)
    lr_step_gamma: float = _role("result", 0.95, gt=0, le=1)
    # step: StepLR (lr_step_gamma each epoch, the paper); noam: linear warm-up over warmup_steps
    # optimiser steps, then decay as 1/sqrt(step), peaking at lr (the original's seqTransf runs)
    scheduler: SchedulerName = _role("result", "step")
    warmup_steps: int = _role("result", 100, ge=1)
    epochs: int = _role("schedule", 12, ge=1)  # the paper: 20
    batch_size: int = _role("result", 128, ge=2)
    seed: int = _role("result", 0)
    precision: PrecisionName = _role("result", "fp32")  # atric.precision: autocast dtype and scaler
    # Padded length: a duration for every expert (frames = seconds / the hop its feature file
    # records); null: the dataset's whole clip (AudioCaps 10 s, CLOTHO 30 s), else the 95th
    # percentile of the train clips. max_frames.<expert> (frames) overrides it per expert.
    max_seconds: float | None = _role("result", None, gt=0)
    max_frames: dict[str, int] = _role("result", {})
    # clip: the original's batches (one item per clip with all its captions, caption similarities
    # averaged per clip before the loss); pairs: one item per (clip, caption).
    sampling: SamplingName = _role("result", "pairs")
    device: str = _role("runtime", "auto")
    cache_in_ram: Literal["auto", "yes", "no"] = _role("runtime", "auto")
    num_workers: int = _role("runtime", 0, ge=0)
    threads: int | None = _role("runtime", None, ge=1)  # torch CPU threads; null: device.default_threads()
    models_dir: str = _role("runtime", "models")
    metrics_dir: str = _role("runtime", "metrics")

    @field_validator("cache_in_ram", mode="before")
    @classmethod
    def _yaml_yes_no(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted yes/no as a boolean: accept the documented spelling as written.
        return {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "TrainParams":
        if self.transformer_width % self.transformer_heads:
            raise ValueError(
                f"transformer_width {self.transformer_width} is not a multiple of transformer_heads {self.transformer_heads}"
            )
        return self

    @field_validator("experts")
    @classmethod
    def _distinct_experts(cls, experts: list[str]) -> list[str]:
        if len(set(experts)) != len(experts):
            raise ValueError(f"duplicate expert names in {experts}")
        return experts


def train_keys(*roles: Role) -> tuple[str, ...]:
    """The train.* fields of the given roles, in schema order."""
    return tuple(
        name
        for name, info in TrainParams.model_fields.items()
        if (info.json_schema_extra or {}).get("role") in roles
    )


def signature_keys() -> tuple[str, ...]:
    """train.* keys in a run's checkpoint signature."""
    return train_keys("result", "run")


# Params outside ``train`` that the train stage depends on (the text branch's input vectors).
TRAIN_STAGE_OTHER_PARAMS = ("text.vectors",)


def train_dvc_params() -> list[str]:
    """The params list of dvc.yaml's train stage: exactly what can change a trained model."""
    return [*TRAIN_STAGE_OTHER_PARAMS, *(f"train.{k}" for k in train_keys("result", "schedule"))]


class EvaluateParams(Section):
    split: Literal["val", "test"] = "test"
    checkpoint: Literal["best", "last"] = "best"


class SearchParams(Section):
    """The ``index`` stage and ``src/search.py``: where indexes live and how they are queried."""

    # Outside models_dir/<run>/ (the train stage's DVC outputs): one <run>.h5 per indexed run.
    index_dir: str = "indexes"
    splits: list[Literal["train", "val", "test"]] = Field(["train", "val", "test"], min_length=1)
    top_k: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=1)  # clips/captions per forward pass while indexing
    # A query is one small matmul: the CPU answers before a GPU would have been set up.
    device: str = "cpu"
    hit_rate_k: int = Field(10, ge=1)  # caption_hit_rate's k, printed by the index stage


# train.* keys a search may not vary: those that change no result, epochs (the tuner's own
# budget; pruning decides) and list/dict params. ``pooling`` may be a categorical dimension.
UNTUNABLE_KEYS = frozenset(train_keys("runtime", "schedule")) | {"experts", "max_frames"}


class FloatDistribution(Section):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> FloatDistribution:
        _check_bounds(self.low, self.high, self.log, self.step)
        return self


class IntDistribution(Section):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> IntDistribution:
        _check_bounds(self.low, self.high, self.log, None if self.step == 1 else self.step)
        return self


class CategoricalDistribution(Section):
    type: Literal["categorical"]
    # Optuna stores choices as JSON scalars only.
    choices: list[bool | int | float | str | None] = Field(min_length=1)


def _check_bounds(low: float, high: float, log: bool, step: float | None) -> None:
    if low > high:
        raise ValueError(f"low {low} > high {high}")
    if log and low <= 0:
        raise ValueError(f"log: true needs low > 0, got {low}")
    if log and step is not None:
        raise ValueError("log: true and step exclude each other")


SearchDimension = Annotated[
    FloatDistribution | IntDistribution | CategoricalDistribution, Field(discriminator="type")
]


def check_search_dimension(
    key: str, dim: FloatDistribution | IntDistribution | CategoricalDistribution
) -> None:
    """Refuse a dimension that names no tunable train param or leaves its valid range."""
    fields = TrainParams.model_fields
    if key not in fields:
        tunable = ", ".join(sorted(set(fields) - UNTUNABLE_KEYS))
        raise ValueError(f"{key}: not a train.* param (tunable: {tunable})")
    if key in UNTUNABLE_KEYS:
        raise ValueError(f"{key}: cannot be tuned (set it with --set train.{key}=... or a flag)")
    annotation = fields[key].annotation
    if isinstance(dim, CategoricalDistribution):
        values: list[Any] = list(dim.choices)
    elif annotation is int and isinstance(dim, FloatDistribution):
        raise ValueError(f"{key}: an integer param; use type: int")
    elif annotation not in (int, float):
        raise ValueError(f"{key}: not a number; use type: categorical with choices")
    else:
        values = [dim.low, dim.high]
    for value in values:
        try:
            TrainParams.model_validate({key: value})
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise ValueError(f"{key}: {value!r} is not a valid train.{key}: {reason}") from None


class TuneParams(Section):
    """``python src/tune.py`` (atric.ops.tuning): the study, its budget and the search space.

    ``space`` maps train.* param names to distributions, e.g.
    ``lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}``.
    """

    study_name: str | None = Field(None, min_length=1)  # None: <dataset>-<expert>-<pooling>
    storage: str = Field("sqlite:///tune/optuna.db", min_length=1)
    dir: str = "tune"  # trials' checkpoints, best_params.yaml and report under <dir>/<study>/
    n_trials: int = Field(20, ge=1)
    total_trials: bool = False  # n_trials counts for the whole study (all workers), not per worker
    timeout: float | None = Field(None, gt=0)  # seconds; no new trial starts after it
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    seed: int = 0
    startup_trials: int = Field(5, ge=0)  # median pruner: trials finished before any is pruned
    warmup_epochs: int = Field(2, ge=0)  # epochs every trial trains before it can be pruned
    heartbeat_interval: int | None = Field(30, ge=1)  # seconds; None turns failure detection off
    grace_period: int | None = Field(None, ge=1)  # seconds without a heartbeat -> FAIL; None: 2 x interval
    max_retry: int = Field(2, ge=0)  # retries of a trial whose worker died
    max_failures: int = Field(3, ge=1)  # consecutive failed trials that stop a worker
    # A database outage (e.g. a PostgreSQL restart): each storage call is retried with backoff
    # for up to this many seconds, then the worker stops with a clear error.
    storage_retry_seconds: float = Field(120.0, ge=0)
    space: dict[str, SearchDimension] = {}

    @field_validator("space")
    @classmethod
    def _space_names_train_params(cls, space: dict[str, Any]) -> dict[str, Any]:
        for key, dim in space.items():
            check_search_dimension(key, dim)
        return space


class Params(Section):
    data: DataParams = DataParams()
    features: FeaturesParams = FeaturesParams()
    text: TextParams = TextParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    # Sections owned by later stages are validated by those stages.
    tune: TuneParams = TuneParams()
    search: SearchParams = SearchParams()
    report: dict[str, Any] = {}


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid params:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {key}: {_error_message(err)}")
    return "\n".join(lines)


def _error_message(err: Any) -> str:
    """pydantic's message, except for a name outside a Literal: 'unknown pooling 'avg'; valid: ...'."""
    if err["type"] == "literal_error":
        names = [str(p) for p in err["loc"] if isinstance(p, str)]
        noun = names[-1] if names else "value"
        if isinstance(err["loc"][-1], int):  # an item of a list param: poolings -> pooling
            noun = noun.removesuffix("s")
        valid = err["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        return f"unknown {noun.replace('_', ' ')} {err['input']!r}; valid: {valid}"
    return str(err["msg"]).removeprefix("Value error, ")


MAX_PARAMS_BYTES = 1 << 20  # a params file or preset is a page of settings, never megabytes


class _StrictLoader(yaml.SafeLoader):
    """YAML as DVC reads params: duplicate keys refused (DVC refuses the same file; PyYAML kept
    the last value silently), and no anchors or aliases (nested aliases, "a billion laughs",
    expand a few hundred bytes into gigabytes; no atric param needs them)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "aliases (*name) are not accepted in params: write the value out", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (DVC refuses it; one value per key)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_params_yaml(path: str | Path) -> Any:
    """A params file or preset as plain data; ConfigError naming the file and the line of a
    duplicate key, an alias, bad YAML, or a file too large to be settings."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_PARAMS_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a params file is at most {MAX_PARAMS_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid params YAML: {' '.join(str(exc).split())}") from exc


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=0.003`` -> (["train", "lr"], 0.003); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=0.003")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        return parts, yaml.load(raw, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: not a valid YAML value: {' '.join(str(exc).split())}") from exc


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


def load_params(
    path: str | Path = PARAMS_FILE, overrides: list[str] | None = None, *, must_exist: bool = True
) -> Params:
    """Read, override and validate params; raises ConfigError naming the key.

    A missing file is an error (a typo in ``--params`` must not fall back to the built-in
    defaults) unless ``must_exist=False``: then the defaults plus ``overrides`` are validated.
    """
    path = Path(path)
    if not path.exists() and must_exist:
        raise ConfigError(f"{path}: params file not found")
    if path.exists():
        raw = read_params_yaml(path) or {}
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


def preset_overrides(path: str | Path, params_file: str | Path = PARAMS_FILE) -> list[str]:
    """A preset file (a partial params.yaml) as ``section.key=value`` overrides, validated.

    A key that ``params_file`` does not hold (e.g. ``train.max_frames.logmel`` under an empty
    ``max_frames: {}``) is written ``+key=value``: DVC's ``-S`` refuses to override a key that is
    not there, and appends it with the ``+`` prefix.
    """
    path = Path(path)
    preset = read_params_yaml(path) or {}
    if not isinstance(preset, dict):
        raise ConfigError(f"{path}: a preset is a mapping of params.yaml sections")
    overrides = [f"{key}={_flag_value(value)}" for key, value in flatten(preset).items()]
    load_params(params_file, overrides)  # refuse unknown keys before DVC sees them
    present = set(flatten(read_params_yaml(params_file) or {}))
    return [f"{'' if text.split('=', 1)[0] in present else '+'}{text}" for text in overrides]


def _flag_value(value: Any) -> str:
    """A YAML value without spaces, so ``$(python src/preset.py ...)`` splits into whole flags."""
    if isinstance(value, list):
        return "[" + ",".join(_flag_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if any(ch.isspace() for ch in text):
        raise ConfigError(f"preset value {text!r}: values with spaces cannot be passed as -S flags")
    return text
