"""Unpickling the original's own input files (``TextEmbeddings/w2v_<split>.pkl``) without running code.

A restricted unpickler admits only plain containers, numbers, strings and numpy arrays; any
other class (a ``__reduce__`` payload, say) is refused before it is constructed.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

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


# A declared array larger than this is refused before it is allocated: a few bytes of pickle
# can otherwise ask numpy for gigabytes. Real caption embeddings are [n_words, 300] floats.
MAX_ARRAY_BYTES = 64 << 20
_RECONSTRUCTORS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}


class _RestrictedUnpickler(pickle.Unpickler):
    """Protocols 0-5 of plain containers and numpy arrays, Python 2 pickles included.

    ``encoding="latin1"`` reads Python 2 ``str`` (array bytes) byte for byte, as numpy expects;
    ``_codecs.encode`` (how protocols 0-2 carry bytes) is admitted for latin-1 only.
    """

    def __init__(self, file: io.BufferedIOBase, source: Path, max_array_bytes: int) -> None:
        super().__init__(file, encoding="latin1")
        self._source = source
        self._max_array_bytes = max_array_bytes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return self._latin1_encode
        if (module, name) in _RECONSTRUCTORS:
            return self._bounded_reconstruct(super().find_class(module, name))
        if (module, name) in _SAFE_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise DataError(
            f"{self._source}: refused to unpickle {module}.{name}: legacy text embeddings may hold "
            "only dicts, lists, tuples, strings, numbers and numpy arrays"
        )

    def _latin1_encode(self, text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        if encoding.lower().replace("-", "") != "latin1" or not isinstance(text, str):
            raise DataError(f"{self._source}: refused _codecs.encode with encoding {encoding!r} (only latin-1)")
        return text.encode("latin1", errors)

    def _bounded_reconstruct(self, reconstruct: Any) -> Any:
        def bounded(subtype: Any, shape: Any, dtype: Any) -> Any:
            try:
                items = int(np.prod(np.asarray(shape, dtype=np.int64)))
                # The dtype's own size: a sub-array dtype ("(1000,1000)f8") multiplies the shape.
                itemsize = max(8, int(np.dtype(dtype).itemsize))
            except (TypeError, ValueError, OverflowError):
                raise DataError(f"{self._source}: array with an unreadable shape {shape!r} or dtype") from None
            if items < 0 or items * itemsize > self._max_array_bytes:
                raise DataError(
                    f"{self._source}: an array of shape {tuple(np.atleast_1d(shape).tolist())} exceeds the "
                    f"{self._max_array_bytes >> 20} MiB bound for one legacy array; refused before allocating"
                )
            return reconstruct(subtype, shape, dtype)

        return bounded


def restricted_load(path: Path, max_array_bytes: int = MAX_ARRAY_BYTES) -> Any:
    """Unpickle ``path`` admitting only the globals above; DataError for anything else."""
    try:
        with path.open("rb") as fh:
            return _RestrictedUnpickler(fh, path, max_array_bytes).load()
    except DataError:
        raise
    except Exception as exc:  # truncated or garbage pickle streams raise many types
        raise DataError(f"{path}: not a readable pickle: {exc!r}") from exc
