"""A restricted unpickler for the ``.dill`` members of model archives: plain data only.

Why: the reference implementations (TensorFlow ``ptycho.model_manager``, PyTorch) store the
manifest and the params snapshot of a ``wts.h5.zip`` as dill pickles. Unpickling an untrusted
pickle with :mod:`pickle` or ``dill`` runs whatever callable the stream names, so an archive from
a stranger could execute code on ``read_archive``. :func:`safe_loads` reads those members
without ever resolving a real global.

What it builds:

* containers ``dict``, ``list``, ``tuple``, ``set``, ``frozenset``, ``OrderedDict``;
* ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``, ``bytearray``;
* numpy scalars and base-class ``numpy.ndarray`` of the dtype kinds in :data:`ALLOWED_KINDS`
  (bool, int, uint, float, complex, bytes, unicode), from ``ndarray.__reduce__``
  (``_reconstruct`` + BUILD), ``_frombuffer`` (protocol 5) and dill's ``_create_array``;
* TF ``EagerTensor`` (pickled as ``convert_to_tensor(ndarray)``) -> the ndarray itself;
* ``pathlib`` paths -> ``str``;
* with ``allow_object_arrays=True`` only: numpy object arrays whose elements were themselves
  built by these same rules (what ``np.save`` writes for e.g. ``None`` in an object array).

What it refuses (:class:`UnsafePickleError`, an ``ArchiveError`` and a
``pickle.UnpicklingError``):

* every global not in the fixed table ``_SAFE_GLOBALS`` -- each entry there maps to a checked
  stand-in (``_safe_*``), never to the real callable, so e.g. ``builtins.bytes`` cannot be fed
  a file object and ``numpy.dtype`` only a type string;
* persistent ids, and BUILD (object state) on anything but an ndarray or a plain dtype;
* structured, sub-array and object dtypes (object bytes would be read as pointers), array
  subclasses carrying attributes, shapes that are not tuples of non-negative ints, and data
  buffers whose length does not match shape x itemsize (the last one is an
  :class:`ArchiveFormatError`, as is any malformed stream).

BUILD is hooked, which is why the unpickler subclasses the pure-Python ``pickle._Unpickler``
(the C unpickler's BUILD cannot be overridden). The writer side, :func:`_to_plain`, reduces a
params snapshot to exactly the values :func:`safe_loads` rebuilds.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from .archive_errors import ArchiveError, ArchiveFormatError, UnsafePickleError

__all__ = ["ALLOWED_KINDS", "UnsafePickleError", "safe_loads"]

#: dtype kinds an archive may carry: bool, ints, floats, complex, bytes, unicode
ALLOWED_KINDS = frozenset("biufcSU")
_ALLOWED_KINDS = ALLOWED_KINDS  # the private spelling the archive code has always used


def _check_array(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype.kind not in _ALLOWED_KINDS or arr.dtype.fields is not None:
        raise ValueError(
            f"params{where}: numpy arrays of dtype {arr.dtype} cannot be stored in an archive; "
            "expected a bool, integer, float, complex or string dtype"
        )
    return arr


def _to_plain(value: Any, where: str) -> Any:
    """The pickle twin of the JSON encoding: plain Python objects + base-class numpy arrays."""
    if value is None or isinstance(value, (bool, str, int, float, complex)):
        return value
    if isinstance(value, np.generic) and not isinstance(value, np.void):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray) or (
        hasattr(value, "__array__") and not isinstance(value, (Mapping, list, tuple))
    ):
        return np.array(_check_array(np.asarray(value), where), copy=True, subok=False)
    if isinstance(value, tuple):
        return tuple(_to_plain(v, where) for v in value)
    if isinstance(value, list):
        return [_to_plain(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise ValueError(f"params{where}: cannot pickle a value of type {type(value).__name__}")


class _NdarrayToken:
    """Stand-in for ``numpy.ndarray`` inside a pickle: only accepted as ``_reconstruct``'s
    subtype argument, so the class itself is never instantiated by pickle opcodes."""

    def __repr__(self) -> str:
        return "<numpy.ndarray (restricted)>"


_NDARRAY = _NdarrayToken()


def _refuse(what: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"refusing to unpickle {what}: archive pickles may hold only plain containers, "
        "numbers, strings and numpy arrays"
    )


def _checked_dtype(dt: Any, *, allow_object: bool = False) -> np.dtype:
    if not isinstance(dt, np.dtype):
        raise _refuse(f"an array state whose dtype is {type(dt).__name__}")
    if allow_object and dt.kind == "O" and dt.fields is None and dt.subdtype is None:
        return np.dtype(object)
    if dt.kind not in _ALLOWED_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise _refuse(f"an array of dtype {dt}")
    # a fresh dtype from its type string drops whatever flags a crafted BUILD may have set
    return np.dtype(dt.str)


def _safe_dtype(spec: Any, align: Any = False, copy: Any = False, *,
                allow_object: bool = False) -> np.dtype:
    if not isinstance(spec, str):
        raise _refuse(f"numpy.dtype({spec!r})")
    try:
        dt = np.dtype(spec)
    except TypeError as exc:
        raise _refuse(f"numpy.dtype({spec!r})") from exc
    return _checked_dtype(dt, allow_object=allow_object)


def _safe_dtype_or_object(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    return _safe_dtype(spec, align, copy, allow_object=True)


def _checked_shape(shape: Any) -> tuple:
    if not (isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise _refuse(f"an ndarray with shape {shape!r}")
    return shape


def _set_array_state(arr: np.ndarray, state: Any, *, allow_object: bool = False) -> None:
    if not (isinstance(state, tuple) and len(state) in (4, 5)):
        raise _refuse("an ndarray state that is not a (version, shape, dtype, fortran, data) tuple")
    if len(state) == 5:
        version, shape, dt, fortran, data = state
    else:
        shape, dt, fortran, data = state
        version = 1
    shape = _checked_shape(shape)
    if allow_object and isinstance(data, list):
        # An object array: its elements were built by this same restricted unpickler, so they
        # are plain values; only the object dtype itself is allowed on top of the usual ones.
        if _checked_dtype(dt, allow_object=True).kind != "O":
            raise _refuse(f"an ndarray of dtype {dt} whose data is a list")
        if len(data) != math.prod(shape):
            raise ArchiveFormatError(
                f"pickled object array of shape {shape} has {len(data)} elements"
            )
        arr.__setstate__((version, shape, np.dtype(object), bool(fortran), list(data)))
        return
    if not isinstance(data, (bytes, bytearray)):
        # a list here means an object array, whose elements could be anything
        raise _refuse(f"an ndarray whose data is a {type(data).__name__} (object array)")
    dt = _checked_dtype(dt)
    if len(data) != math.prod(shape) * dt.itemsize:
        raise ArchiveFormatError(
            f"pickled ndarray of shape {shape} and dtype {dt} has {len(data)} data bytes"
        )
    arr.__setstate__((version, shape, dt, bool(fortran), bytes(data)))


def _safe_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if subtype is not _NDARRAY:
        raise _refuse(f"numpy _reconstruct of {subtype!r}")
    return np.ndarray((0,), dtype=np.int8)


def _safe_create_array(f: Any, args: Any, state: Any, npdict: Any = None) -> np.ndarray:
    # dill's array reducer: a = f(*args); a.__setstate__(state); a.__dict__.update(npdict)
    if f is not _safe_reconstruct or not isinstance(args, tuple):
        raise _refuse("dill _create_array with a constructor other than numpy _reconstruct")
    if npdict:
        raise _refuse("an ndarray subclass carrying instance attributes")
    arr = _safe_reconstruct(*args)
    _set_array_state(arr, state)
    return arr


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    if not isinstance(buf, (bytes, bytearray)):
        raise _refuse(f"numpy _frombuffer over a {type(buf).__name__}")
    dt = _checked_dtype(dtype)
    shape = _checked_shape(shape)
    if len(buf) != math.prod(shape) * dt.itemsize:
        raise ArchiveFormatError(f"pickled buffer of {len(buf)} bytes for {shape} {dt}")
    return np.frombuffer(bytes(buf), dtype=dt).reshape(shape, order="F" if order == "F" else "C").copy()


def _safe_scalar(dtype: Any, data: Any = None) -> Any:
    dt = _checked_dtype(dtype)
    if not isinstance(data, (bytes, bytearray)) or len(data) != dt.itemsize:
        raise _refuse("a numpy scalar without its raw bytes")
    return np.frombuffer(bytes(data), dtype=dt)[0]


def _tf_convert_to_tensor(value: Any, *args: Any, **kwargs: Any) -> np.ndarray:
    # TF EagerTensor.__reduce__ -> (convert_to_tensor, (ndarray,)): keep the ndarray
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bool, int, float, complex, list, tuple)):
        return _check_array(np.asarray(value), "")
    raise _refuse(f"a TensorFlow tensor built from {type(value).__name__}")


def _path_as_str(*parts: Any) -> str:
    if not all(isinstance(p, str) for p in parts):
        raise _refuse("a pathlib path built from non-strings")
    return str(PurePosixPath(*parts))


def _windows_path_as_str(*parts: Any) -> str:
    if not all(isinstance(p, str) for p in parts):
        raise _refuse("a pathlib path built from non-strings")
    return str(PureWindowsPath(*parts))


def _safe_complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not isinstance(real, (int, float, str)) or not isinstance(imag, (int, float)):
        raise _refuse("complex() of non-numbers")
    return complex(real, imag)


def _safe_set(items: Any = ()) -> set:
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise _refuse(f"set() of a {type(items).__name__}")
    return set(items)


def _safe_frozenset(items: Any = ()) -> frozenset:
    return frozenset(_safe_set(items))


def _safe_bytearray(data: Any = b"", *rest: Any) -> bytearray:
    if isinstance(data, (bytes, bytearray)) and not rest:
        return bytearray(data)
    if isinstance(data, str) and len(rest) == 1 and rest[0] == "latin-1":
        return bytearray(data, "latin-1")  # protocol <= 2 spelling
    raise _refuse("bytearray() of unexpected arguments")


def _safe_codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # protocols 0/1 spell bytes as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _refuse("_codecs.encode of unexpected arguments")
    return text.encode("latin-1")


def _safe_bytes(data: Any = b"", *rest: Any) -> bytes:
    if rest or not isinstance(data, (bytes, bytearray, list, tuple)):
        raise _refuse("bytes() of unexpected arguments")
    if isinstance(data, (list, tuple)) and not all(isinstance(b, int) for b in data):
        raise _refuse("bytes() of non-integers")
    return bytes(data)


def _safe_ordered_dict(items: Any = ()) -> OrderedDict:
    if not isinstance(items, (list, tuple)):
        raise _refuse("OrderedDict() of a non-sequence")
    return OrderedDict(items)


# Exactly the globals a plain-data pickle (ours, numpy's, dill's, the TF reference's params.dill
# and the torch reference's params dict with Path values) refers to; each maps to a checked
# stand-in. Anything else is refused.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("tensorflow.python.framework.ops", "convert_to_tensor"): _tf_convert_to_tensor,
    ("dill._dill", "_create_array"): _safe_create_array,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _safe_dtype,
    ("builtins", "complex"): _safe_complex,
    ("builtins", "set"): _safe_set,
    ("builtins", "frozenset"): _safe_frozenset,
    ("builtins", "bytearray"): _safe_bytearray,
    ("collections", "OrderedDict"): _safe_ordered_dict,
    ("_codecs", "encode"): _safe_codecs_encode,
    ("builtins", "bytes"): _safe_bytes,
    ("pathlib", "Path"): _path_as_str,
    ("pathlib", "PosixPath"): _path_as_str,
    ("pathlib", "PurePath"): _path_as_str,
    ("pathlib", "PurePosixPath"): _path_as_str,
    ("pathlib", "WindowsPath"): _windows_path_as_str,
    ("pathlib", "PureWindowsPath"): _windows_path_as_str,
}
for _np in ("numpy._core", "numpy.core"):  # numpy >= 2 and numpy < 2 spellings
    _SAFE_GLOBALS[(f"{_np}.multiarray", "_reconstruct")] = _safe_reconstruct
    _SAFE_GLOBALS[(f"{_np}.multiarray", "scalar")] = _safe_scalar
    _SAFE_GLOBALS[(f"{_np}.numeric", "_frombuffer")] = _safe_frombuffer
del _np


class _RestrictedUnpickler(pickle._Unpickler):  # the Python implementation: BUILD is hookable
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, *, allow_object_arrays: bool = False) -> None:
        super().__init__(file)
        self._allow_object = bool(allow_object_arrays)

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # protocol 0-2 streams may use Python 2 names (__builtin__.set)
            import _compat_pickle

            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        if self._allow_object and (module, name) == ("numpy", "dtype"):
            return _safe_dtype_or_object
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise _refuse(f"the global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse(f"a persistent id {pid!r}")

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.ndarray):
            _set_array_state(inst, state, allow_object=self._allow_object)
        elif isinstance(inst, np.dtype):
            # dtype reduce is (dtype, (code, align, copy), state); the state of a plain dtype is
            # (version, byteorder, subarray=None, names=None, fields=None, elsize, align, flags).
            # The dtype itself was already checked; re-check that the state keeps it plain.
            if not (isinstance(state, tuple) and len(state) >= 5 and state[2:5] == (None,) * 3):
                raise _refuse("a structured or sub-array numpy dtype")
            if state[1] not in ("<", ">", "|", "="):
                raise _refuse(f"a numpy dtype with byte order {state[1]!r}")
            # Never call dtype.__setstate__ (its flags could mark plain bytes as object
            # pointers); only the byte order matters for a plain dtype, so swap in a fresh one.
            if state[1] in "<>" and inst.itemsize > 1 and state[1] != inst.byteorder:
                new = inst.newbyteorder(state[1])
                self.stack[-1] = new
                for key, value in list(self.memo.items()):
                    if value is inst:
                        self.memo[key] = new
        else:
            raise _refuse(f"object state for a {type(inst).__name__}")

    dispatch[pickle.BUILD[0]] = load_build


def safe_loads(data: bytes | bytearray | memoryview, *, allow_object_arrays: bool = False) -> Any:
    """Unpickle ``data`` without executing code.

    Builds only plain containers (dict, list, tuple, set, frozenset, OrderedDict), numbers,
    strings, bytes, numpy scalars and numpy arrays of bool/int/float/complex/bytes/unicode
    dtypes. TF ``EagerTensor``s (pickled by the reference as ``convert_to_tensor(ndarray)``,
    also through dill's ``_create_array``) become numpy arrays; ``pathlib`` paths become str.
    Any other global, a persistent id, object state or an object-dtype array raises
    :class:`UnsafePickleError`; a malformed stream raises :class:`ArchiveFormatError`.

    ``allow_object_arrays=True`` additionally accepts numpy object arrays pickled by
    ``ndarray.__reduce__`` (what ``np.save`` writes for e.g. a JSON string or ``None`` in an
    object array); their elements go through the same restrictions. Object *scalars* built
    from raw bytes stay refused (those bytes would be read as object pointers).
    """
    try:
        unpickler = _RestrictedUnpickler(
            io.BytesIO(bytes(data)), allow_object_arrays=allow_object_arrays
        )
        return unpickler.load()
    except ArchiveError:
        raise
    except Exception as exc:  # malformed stream: EOFError, struct.error, UnpicklingError, ...
        raise ArchiveFormatError(f"cannot read pickle: {type(exc).__name__}: {exc}") from exc
