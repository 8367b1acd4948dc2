"""Unpickling the original's own input files (``TextEmbeddings/w2v_<split>.pkl``) without running code.

A restricted unpickler admits only plain containers, numbers, strings and numpy arrays; any
other class (a ``__reduce__`` payload, say) is refused before it is constructed.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from atric.errors import DataError

# Only plain containers and numpy arrays may come out of a legacy pickle.
_SAFE_PICKLE_GLOBALS = {
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "str"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "complex"),
    ("builtins", "bytes"),
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    # Protocol 5 (Python 3.8+ HIGHEST_PROTOCOL) rebuilds arrays with frombuffer+reshape.
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.dtypes", "Float32DType"),
    ("numpy.dtypes", "Float64DType"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise DataError(
            f"{self._source}: refused to unpickle {module}.{name}: legacy text embeddings may hold "
            "only dicts, lists, tuples, strings, numbers and numpy arrays"
        )


def restricted_load(path: Path) -> Any:
    """Unpickle ``path`` admitting only the globals above; DataError for anything else."""
    try:
        with path.open("rb") as fh:
            return _RestrictedUnpickler(fh, path).load()
    except DataError:
        raise
    except Exception as exc:  # truncated or garbage pickle streams raise many types
        raise DataError(f"{path}: not a readable pickle: {exc!r}") from exc
