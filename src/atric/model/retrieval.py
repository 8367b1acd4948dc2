"""The retrieval model: per-expert audio branches, one text branch, and expert fusion.

Audio: for each expert, pooling -> GatedEmbeddingUnit -> [B, embed_dim] (unit norm).
Text: one shared pooling over the word vectors, then one GatedEmbeddingUnit per expert,
so each expert gets its own text embedding in its own space (Collaborative Experts).
Similarity of caption i and clip j: sum_e w_ie * <t_ie, a_je>, a weighted sum of cosines.
Fusion weights: ``uniform`` (1/E each, the paper's setting) or ``text_weighted``
(a linear layer on the pooled text, softmax over experts, as in Collaborative Experts).
"""

from __future__ import annotations

from typing import Any, get_args

import torch
from torch import Tensor, nn

from atric.config import FusionName
from atric.errors import ConfigError, DataError
from atric.model.gated import GatedEmbeddingUnit
from atric.model.pooling import build_pooling

FUSIONS: tuple[str, ...] = get_args(FusionName)  # declared once, in the params schema

AudioBatch = dict[str, tuple[Tensor, Tensor]]
TextOutput = tuple[dict[str, Tensor], Tensor]


class RetrievalModel(nn.Module):
    """Audio-text retrieval model over one or more audio experts."""

    def __init__(
        self,
        expert_dims: dict[str, int],
        text_dim: int,
        *,
        audio_pooling: str,
        text_pooling: str,
        embed_dim: int,
        audio_clusters: int,
        text_clusters: int,
        ghost_clusters: int,
        lstm_hidden: int,
        fusion: str,
        transformer_width: int = 0,
        transformer_heads: int = 0,
    ) -> None:
        super().__init__()
        if not expert_dims:
            raise ConfigError("expert_dims: at least one audio expert is required")
        for name, dim in expert_dims.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"expert_dims: expert names must be non-empty strings, got {name!r}")
            if int(dim) < 1:
                raise ConfigError(f"expert_dims[{name!r}]: feature dim must be >= 1, got {dim}")
        if text_dim < 1:
            raise ConfigError(f"text_dim must be >= 1, got {text_dim}")
        if embed_dim < 1:
            raise ConfigError(f"embed_dim must be >= 1, got {embed_dim}")
        if fusion not in FUSIONS:
            raise ConfigError(f"unknown fusion {fusion!r}; valid fusions: {', '.join(FUSIONS)}")

        # Sorted so that the module order (and the state_dict, and the fusion-weight columns)
        # does not depend on the order in which a caller listed the experts. A ModuleList is
        # used instead of a ModuleDict because expert names may contain '.' or clash with
        # nn.Module attribute names.
        self.experts: tuple[str, ...] = tuple(sorted(expert_dims))
        self._config: dict[str, Any] = {
            "expert_dims": {name: int(expert_dims[name]) for name in self.experts},
            "text_dim": int(text_dim),
            "audio_pooling": audio_pooling,
            "text_pooling": text_pooling,
            "embed_dim": int(embed_dim),
            "audio_clusters": int(audio_clusters),
            "text_clusters": int(text_clusters),
            "ghost_clusters": int(ghost_clusters),
            "lstm_hidden": int(lstm_hidden),
            "fusion": fusion,
        }
        # Only a seqtransf pooling has these: older checkpoints without them still load.
        if "seqtransf" in (audio_pooling, text_pooling):
            self._config.update(transformer_width=int(transformer_width), transformer_heads=int(transformer_heads))
        shapes = {"transformer_width": transformer_width, "transformer_heads": transformer_heads}
        self.embed_dim = int(embed_dim)
        self.fusion = fusion

        self.audio_poolings = nn.ModuleList(
            build_pooling(
                audio_pooling,
                int(expert_dims[name]),
                clusters=audio_clusters,
                ghost_clusters=ghost_clusters,
                lstm_hidden=lstm_hidden,
                **shapes,
            )
            for name in self.experts
        )
        self.audio_units = nn.ModuleList(
            GatedEmbeddingUnit(pool.output_dim, embed_dim) for pool in self.audio_poolings
        )
        self.text_pooling = build_pooling(
            text_pooling, text_dim, clusters=text_clusters, ghost_clusters=ghost_clusters, lstm_hidden=lstm_hidden,
            **shapes,
        )
        self.text_units = nn.ModuleList(
            GatedEmbeddingUnit(self.text_pooling.output_dim, embed_dim) for _ in self.experts
        )
        # Only the text-weighted fusion has parameters; uniform weights are a constant.
        self.fusion_head = nn.Linear(self.text_pooling.output_dim, len(self.experts)) if fusion == "text_weighted" else None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RetrievalModel:
        """Rebuild a model from ``config()`` output (e.g. stored in a checkpoint)."""
        try:
            kwargs = dict(config)
            expert_dims = kwargs.pop("expert_dims")
            text_dim = kwargs.pop("text_dim")
            return cls(expert_dims, text_dim, **kwargs)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"model config is incomplete or has unknown keys: {exc}") from exc

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-serialisable): enough to rebuild this model."""
        return {key: (dict(value) if isinstance(value, dict) else value) for key, value in self._config.items()}

    def encode_audio(self, audio: AudioBatch) -> dict[str, Tensor]:
        """expert -> (features [B, T, D], mask [B, T]) to expert -> [B, embed_dim], unit norm."""
        missing = [name for name in self.experts if name not in audio]
        extra = [name for name in audio if name not in self.experts]
        if missing or extra:
            raise DataError(
                f"audio experts do not match the model: missing {missing}, unexpected {extra}; "
                f"the model expects {list(self.experts)}"
            )
        sizes = {name: int(audio[name][0].shape[0]) for name in self.experts}
        if len(set(sizes.values())) != 1:
            raise DataError(f"audio experts disagree on the batch size: {sizes}")
        return {
            name: unit(pool(*audio[name]))
            for name, pool, unit in zip(self.experts, self.audio_poolings, self.audio_units)
        }

    def encode_text(self, words: Tensor, mask: Tensor) -> TextOutput:
        """Word vectors [Nt, L, text_dim] + mask -> (expert -> [Nt, embed_dim], weights [Nt, E])."""
        pooled = self.text_pooling(words, mask)
        embeddings = {name: unit(pooled) for name, unit in zip(self.experts, self.text_units)}
        if self.fusion_head is None:
            weights = pooled.new_full((pooled.shape[0], len(self.experts)), 1.0 / len(self.experts))
        else:
            weights = torch.softmax(self.fusion_head(pooled), dim=-1)
        return embeddings, weights

    def similarity(self, text_out: TextOutput, audio_out: dict[str, Tensor]) -> Tensor:
        """[Nt, Na] weighted sum over experts of cosine similarities (embeddings are unit norm)."""
        embeddings, weights = text_out
        sim = None
        for index, name in enumerate(self.experts):
            term = weights[:, index : index + 1] * (embeddings[name] @ audio_out[name].t())
            sim = term if sim is None else sim + term
        assert sim is not None  # at least one expert, enforced in __init__
        return sim

    def forward(self, audio: AudioBatch, words: Tensor, word_mask: Tensor) -> Tensor:
        """Similarity matrix [Nt, Na] between the captions and the clips of a batch."""
        return self.similarity(self.encode_text(words, word_mask), self.encode_audio(audio))
