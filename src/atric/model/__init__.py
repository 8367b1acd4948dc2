"""Poolings, the gated embedding unit, expert fusion and the retrieval model."""

from atric.model.gated import GatedEmbeddingUnit
from atric.model.pooling import POOLINGS, build_pooling
from atric.model.retrieval import FUSIONS, RetrievalModel

__all__ = ["FUSIONS", "POOLINGS", "GatedEmbeddingUnit", "RetrievalModel", "build_pooling"]
