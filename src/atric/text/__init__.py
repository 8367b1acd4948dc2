"""Captions as sequences of word vectors: tokenisation (``tokenize``), word-vector sources
(``vectors``), and embedding a corpus's captions with its OOV report (``captions``)."""

from atric.text.captions import TextReport, embed_caption, embed_captions, embed_split, format_report
from atric.text.tokenize import TOKENIZER_VERSION, tokenize
from atric.text.vectors import (
    GLOVE,
    MINILM,
    NAMED_SOURCES,
    TRAIN,
    KeyedVectorSource,
    Lookup,
    MiniLMSource,
    VectorSource,
    load_glove,
    load_trained,
    load_vectors,
    load_vectors_file,
    sniff_vectors_format,
    train_word2vec,
)

__all__ = [
    "GLOVE",
    "MINILM",
    "NAMED_SOURCES",
    "TOKENIZER_VERSION",
    "TRAIN",
    "KeyedVectorSource",
    "Lookup",
    "MiniLMSource",
    "TextReport",
    "VectorSource",
    "embed_caption",
    "embed_captions",
    "embed_split",
    "format_report",
    "load_glove",
    "load_trained",
    "load_vectors",
    "load_vectors_file",
    "sniff_vectors_format",
    "tokenize",
    "train_word2vec",
]
