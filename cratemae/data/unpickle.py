"""Reading the pickles that data sets ship (CIFAR's Python version) without running them.

A pickle is a program: each global it names is imported and may be called with arguments
of the file's choosing (`os.system` and a shell command, classically). `load_pickle` runs
only what such a data file needs: dicts, lists, tuples, bytes, strings and numbers, which
need no global, and NumPy's uint8 array reconstruction (`_reconstruct`, `ndarray`,
`dtype`, and `_codecs.encode`, by which Python 3 writes bytes under protocol 2), each
through a stand-in that checks its arguments before touching NumPy. Any other global is
bad input naming the file and the global: nothing it names is imported or called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cratemae.errors import BadInputError
from cratemae.guard import regular_file

__all__ = ["load_pickle"]

_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_UINT8 = ("u1", "uint8", "|u1")


class _ArrayType:
    """Stands for `numpy.ndarray` in the stream: it can only be handed to `_reconstruct`."""


def _reconstruct(cls: object, shape: object, typecode: object) -> np.ndarray:
    """`numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`: an empty array whose
    state (shape, dtype, bytes) the stream then sets; numpy checks the bytes fit."""
    if cls is not _ArrayType or tuple(shape) != (0,) or typecode not in (b"b", "b"):  # type: ignore[arg-type]
        raise pickle.UnpicklingError("an array reconstruction with unexpected arguments")
    return np.ndarray((0,), np.uint8)


def _dtype(name: object, align: object = False, copy: object = False) -> np.dtype:
    if name not in _UINT8:
        raise pickle.UnpicklingError(f"an array of {name!r}, not of uint8")
    return np.dtype("u1", False, True)  # a copy: the stream then sets its state


def _encode(text: object, encoding: object = "latin1") -> bytes:
    """`_codecs.encode(str, 'latin1')`: how Python 3 pickles bytes under protocol 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("a _codecs.encode call other than (str, 'latin1')")
    return text.encode("latin1")


_ADMITTED: dict[tuple[str, str], object] = {
    **{(m, "_reconstruct"): _reconstruct for m in _NUMPY_CORE},
    ("numpy", "ndarray"): _ArrayType,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
}


class _Refused(Exception):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _ADMITTED.get((module, name))
        if found is None:
            raise _Refused(module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a persistent id")


def load_pickle(path: Path, what: str) -> Any:
    """The object pickled in `path` (a Python 2 pickle: its strings read as latin-1, as
    torchvision reads them); bad input naming the file when it holds anything but data.
    `what` says what the file should be, for the message."""
    path = regular_file(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BadInputError(f"{path}: unreadable ({err.strerror})") from None
    try:
        return _DataUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _Refused as err:
        raise BadInputError(
            f"{path}: its pickle names the global {err}, which {what} does not hold; refused "
            "(nothing it names was imported or run)") from None
    except Exception as err:  # a damaged pickle raises many kinds
        raise BadInputError(f"{path}: not a readable {what} ({type(err).__name__}: "
                            f"{err})".replace("\n", " ")) from None
