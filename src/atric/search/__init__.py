"""Search a trained run: text -> clips and sound -> captions, over a precomputed index
(``index``: building and reading the file; ``searcher``: queries; ``output``: tables)."""

from atric.search.index import IndexReport, SearchIndex, build_index, index_path, load_index
from atric.search.output import format_table
from atric.search.searcher import Hit, QueryError, Searcher, TextResult, caption_hit_rate

__all__ = [
    "Hit",
    "IndexReport",
    "QueryError",
    "SearchIndex",
    "Searcher",
    "TextResult",
    "build_index",
    "caption_hit_rate",
    "format_table",
    "index_path",
    "load_index",
]
