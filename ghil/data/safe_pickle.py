"""Read pickled ``.npy`` files (CALVIN's ``auto_lang_ann.npy``) without letting the file run code.

CALVIN stores its language annotations as ``np.save`` of a dict, i.e. a pickle. ``np.load`` with pickles allowed
would call whatever callable the file names, so a crafted dataset could run a command on the training machine.
Here the pickle is read by an unpickler that resolves only the few numpy internals needed to rebuild arrays,
dtypes and numpy scalars; dicts, lists, tuples, strings, bytes, numbers, bools and None need no lookup at all.
Anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) is refused before it can be called.

Usage::

    value = load_npy(path)             # np.ndarray; an object array's elements rebuilt under the allow-list
    ann = load_npy(path).item()        # CALVIN's {"info": {...}, "language": {...}}
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

# (module, name) pairs an array pickle needs. numpy 1.x writes "numpy.core", numpy 2.x "numpy._core"; both are
# accepted (a CALVIN download was pickled by numpy 1.x) and resolved under whichever this numpy provides.
_ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),  # ndarray.__reduce__: allocate an empty array, then __setstate__
    ("numpy.core.multiarray", "scalar"),        # numpy scalars, e.g. np.int64 inside CALVIN's "indx" tuples
    ("numpy.core.numeric", "_frombuffer"),      # arrays pickled with protocol 5
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})
_ALLOWED_TEXT = "dict, list, tuple, str, bytes, numbers, bool, None, numpy arrays, dtypes and scalars"


class PickledFileError(ValueError):
    """A pickled file that cannot be read (truncated, corrupt, not the expected layout); the message names it."""


class UnsafePickleError(PickledFileError):
    """A pickle that names a callable outside the allow-list: the file may have been crafted to run code."""


def _canonical_module(module: str) -> str:
    return "numpy.core" + module[len("numpy._core"):] if module.startswith("numpy._core") else module


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose only resolvable globals are ``_ALLOWED_GLOBALS`` (every callable a pickle can invoke,
    via REDUCE, NEWOBJ, INST or the extension registry, is obtained through ``find_class``)."""

    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> object:
        canonical = _canonical_module(module)
        if (canonical, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self._path}: refusing to unpickle {module}.{name}: this file may only hold {_ALLOWED_TEXT}; "
                "it may have been crafted to run code, so nothing from it was executed")
        if canonical.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + canonical[len("numpy.core"):]  # numpy 2: avoid the deprecated numpy.core shim
        return super().find_class(module, name)

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError(f"{self._path}: refusing a pickle persistent id ({pid!r})")


def restricted_loads(data: bytes, path: str | os.PathLike = "<bytes>") -> object:
    """Unpickle ``data`` under the allow-list; ``path`` only names the source in errors."""
    return _load(io.BytesIO(data), Path(path))


def _load(file: io.BufferedIOBase, path: Path) -> object:
    try:
        return _RestrictedUnpickler(file, path).load()
    except PickledFileError:
        raise
    except Exception as err:  # truncated / corrupt streams raise EOFError, UnpicklingError, ValueError, ...
        raise PickledFileError(f"{path}: corrupt pickle ({type(err).__name__}: {err})") from err


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """``np.load(path)`` of a ``.npy`` file, with object arrays (pickles) rebuilt under the allow-list."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = npy_format.read_array_header_2_0(f)
            else:
                raise PickledFileError(f"{path}: unsupported .npy format version {version}")
            if not dtype.hasobject:
                f.seek(0)
                return np.load(f, allow_pickle=False)
            # np.save pickles an object array as the array itself (ndarray.__reduce__), right after the header.
            array = _load(f, path)
    except PickledFileError:
        raise
    except OSError:
        raise
    except Exception as err:  # a bad magic string or header raises ValueError
        raise PickledFileError(f"{path}: not a readable .npy file ({type(err).__name__}: {err})") from err
    if not isinstance(array, np.ndarray) or array.shape != shape:
        raise PickledFileError(f"{path}: the pickle holds {type(array).__name__} "
                               f"{getattr(array, 'shape', '')}, but the header declares an array of shape {shape}")
    return array
