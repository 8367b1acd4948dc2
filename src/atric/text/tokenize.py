"""Tokenisation, applied identically to every caption and query.

Tokenisation (``tokenize``), applied identically to every caption and query:
  * Unicode NFKC, lower case, curly quotes folded to ``'``.
  * Words are runs of letters/digits; in-word hyphens are kept (``high-pitched`` is a
    GloVe word); everything else (punctuation, underscores, symbols) separates words.
  * Clitics are split the Penn-Treebank way, as GloVe 6B was tokenised:
    ``dog's -> dog 's``, ``don't -> do n't``, ``they're -> they 're``. Other in-word
    apostrophes stay (``o'clock``); leading/trailing ones are dropped (``dogs' -> dogs``).
"""

from __future__ import annotations

import re
import unicodedata

TOKENIZER_VERSION = "atric-tok-1"  # bump when tokenisation changes: part of cache keys and HDF5 attrs

# ---------------------------------------------------------------- tokenisation
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})
_WORD = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*")
_CLITICS = ("s", "re", "ve", "ll", "d", "m")


def _split_clitic(word: str) -> list[str]:
    if word.endswith("n't") and len(word) > 3:
        return [word[:-3], "n't"]
    head, sep, tail = word.rpartition("'")
    if sep and tail in _CLITICS and head:
        return [head, "'" + tail]
    return [word]


def tokenize(caption: str, max_words: int | None = None) -> list[str]:
    """Lower-cased words of a caption (see the module docstring); at most ``max_words``."""
    text = unicodedata.normalize("NFKC", caption).translate(_APOSTROPHES).lower()
    tokens: list[str] = []
    for word in _WORD.findall(text):
        tokens.extend(_split_clitic(word) if "'" in word else [word])
    return tokens if max_words is None else tokens[:max_words]


