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


class _Global:
    """An admitted global as the stream sees it: calling it runs `fn`, which checks its
    arguments. Anything else a stream may do to a global (BUILD a state into it, set its
    attributes, NEWOBJ it) is refused: a data file changes nothing of this module."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a state given to a global")

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError("an attribute set on a global")


def _no_ndarray_call(*args: Any) -> Any:
    raise pickle.UnpicklingError("numpy.ndarray called, not handed to _reconstruct")


_NDARRAY = _Global(_no_ndarray_call)  # `numpy.ndarray`: only handed to `_reconstruct`


class _U1:
    """`numpy.dtype('u1')` as the stream builds it; its state must be uint8's own (a
    state that says fields, a subarray or object flags is refused, never given to NumPy)."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def __setstate__(self, state: Any) -> None:
        # version 3: (3, byteorder, subarray, names, fields, elsize, alignment, flags);
        # version 4 adds the metadata
        plain = (None, None, None, -1, -1, 0)
        ok = isinstance(state, tuple) and len(state) in (8, 9) and state[1] in ("|", "<", ">", "=")
        if ok and len(state) == 8:
            ok = state[0] == 3 and state[2:] == plain
        elif ok:
            ok = state[0] == 4 and state[2:8] == plain and state[8] in (None, {})
        if self.done or not ok:
            raise pickle.UnpicklingError(f"a uint8 dtype with the state {state!r:.80}")
        self.done = True


class _Uint8Array(np.ndarray):
    """The array `_reconstruct` makes; its state (version 1: shape, dtype, order, bytes) is
    checked before NumPy sees it: a `_U1` dtype and exactly the bytes the shape needs."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 4:
            state = (1, *state)
        ok = isinstance(state, tuple) and len(state) == 5 and state[0] == 1
        if ok:
            _, shape, dtype, fortran, raw = state
            if isinstance(raw, str):  # Python 2's str, read as latin-1 (NumPy does the same)
                raw = raw.encode("latin1")
            ok = (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)
                  and type(dtype) is _U1 and type(fortran) is bool and type(raw) is bytes
                  and self.shape == (0,) and len(raw) == int(np.prod(shape, dtype=object)))
        if not ok:
            raise pickle.UnpicklingError("a uint8 array with an unexpected state")
        super().__setstate__((1, shape, np.dtype(np.uint8), fortran, raw))


def _reconstruct(cls: object, shape: object, typecode: object) -> np.ndarray:
    """`numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`: an empty array whose
    state (shape, dtype, bytes) the stream then sets, checked by `_Uint8Array`."""
    if cls is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise pickle.UnpicklingError("an array reconstruction with unexpected arguments")
    return np.ndarray((0,), np.uint8).view(_Uint8Array)


def _dtype(name: object, align: object = False, copy: object = False) -> _U1:
    if not (isinstance(name, str) and name in _UINT8) or type(align) not in (bool, int) or align:
        raise pickle.UnpicklingError(f"an array of {name!r:.40}, not of uint8")
    return _U1()


def _encode(text: object, encoding: object = "latin1") -> bytes:
    """`_codecs.encode(str, 'latin1')`: how Python 3 pickles bytes under protocol 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("a _codecs.encode call other than (str, 'latin1')")
    return text.encode("latin1")


_ADMITTED: dict[tuple[str, str], object] = {
    **{(m, "_reconstruct"): _Global(_reconstruct) for m in _NUMPY_CORE},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Global(_dtype),
    ("_codecs", "encode"): _Global(_encode),
}


def _plain(obj: Any, seen: dict[int, Any]) -> Any:
    """The loaded object with each `_Uint8Array` a plain uint8 array (a `_U1` left bare:
    refused), through dicts, lists and tuples."""
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, _Uint8Array):
        return np.asarray(obj).view(np.ndarray)
    if isinstance(obj, _U1 | _Global):
        raise pickle.UnpicklingError("a bare dtype or global in the data")
    if isinstance(obj, dict):
        seen[id(obj)] = obj
        for k in list(obj):
            obj[k] = _plain(obj[k], seen)
    elif isinstance(obj, list):
        seen[id(obj)] = obj
        obj[:] = [_plain(x, seen) for x in obj]
    elif isinstance(obj, tuple):
        seen[id(obj)] = tuple(_plain(x, seen) for x in obj)
        return seen[id(obj)]
    return obj


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
        return _plain(_DataUnpickler(io.BytesIO(data), encoding="latin1").load(), {})
    except _Refused as err:
        raise BadInputError(
            f"{path}: its pickle names the global {err}, which {what} does not hold; refused "
            "(nothing it names was imported or run)") from None
    except Exception as err:  # a damaged pickle raises many kinds
        raise BadInputError(f"{path}: not readable as {what} ({type(err).__name__}: "
                            f"{err})".replace("\n", " ")) from None
