"""Strict-JSON encoding of a params snapshot (``<model>/params.json`` in a model archive).

A snapshot is a ``dict`` with ``str`` keys whose values are None, bool, int, float, complex,
str, ``os.PathLike``, numpy scalars/arrays (dtype kinds of
:data:`backend_api.safe_pickle.ALLOWED_KINDS`) or lists/tuples/dicts of these. JSON has no
arrays, tuples, complex numbers or NaN, so those become one-key marker objects (see
:func:`params_to_json`); the marker keys are reserved and refused as params keys. Decoding
raises :class:`~backend_api.archive_errors.ArchiveFormatError` on anything malformed.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .archive_errors import ArchiveError, ArchiveFormatError
from .safe_pickle import _check_array

__all__ = ["params_to_json", "params_from_json"]

_ND = "__ndarray__"
_TUPLE = "__tuple__"
_COMPLEX = "__complex__"
_FLOAT = "__float__"
_MARKERS = frozenset({_ND, _TUPLE, _COMPLEX, _FLOAT})


def _float_to_json(x: float) -> Any:
    # keep the file strict JSON: NaN/inf are not JSON numbers
    if math.isfinite(x):
        return x
    return {_FLOAT: "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


def _to_jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _float_to_json(float(value))
    if isinstance(value, complex):
        return {_COMPLEX: [_float_to_json(value.real), _float_to_json(value.imag)]}
    if isinstance(value, np.generic) and not isinstance(value, np.void):
        return _to_jsonable(value.item(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray) or (
        hasattr(value, "__array__") and not isinstance(value, (Mapping, list, tuple))
    ):
        arr = _check_array(np.asarray(value), where)
        if arr.dtype.itemsize > 1 and arr.dtype.byteorder in ("=", ">", "<"):
            arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        data = np.ascontiguousarray(arr).tobytes(order="C")
        return {
            _ND: base64.b64encode(data).decode("ascii"),
            "dtype": arr.dtype.str,
            "shape": [int(s) for s in arr.shape],
        }
    if isinstance(value, tuple):
        return {_TUPLE: [_to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(
                    f"params{where}: key {k!r} has type {type(k).__name__}; archive params "
                    "need str keys"
                )
            if k in _MARKERS:
                raise ValueError(f"params{where}: key {k!r} is reserved by the archive encoding")
            out[k] = _to_jsonable(v, f"{where}[{k!r}]")
        return out
    raise ValueError(
        f"params{where}: cannot store a value of type {type(value).__module__}."
        f"{type(value).__qualname__} in an archive params snapshot; expected None, bool, int, "
        "float, complex, str, Path, a numpy array/scalar, or a list/tuple/dict of these"
    )


def _decode_marker(obj: dict) -> Any:
    keys = set(obj)
    if _ND in obj and keys == {_ND, "dtype", "shape"}:
        try:
            dtype = np.dtype(str(obj["dtype"]))
        except TypeError as exc:
            raise ArchiveFormatError(f"params.json: bad array dtype {obj['dtype']!r}") from exc
        _check_array(np.empty(0, dtype), "")
        shape = tuple(int(s) for s in obj["shape"])
        data = base64.b64decode(obj[_ND].encode("ascii"), validate=True)
        if any(s < 0 for s in shape) or len(data) != math.prod(shape) * dtype.itemsize:
            raise ArchiveFormatError(
                f"params.json: array of shape {shape} and dtype {dtype} needs "
                f"{math.prod(shape) * dtype.itemsize} bytes, got {len(data)}"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    if keys == {_TUPLE}:
        return tuple(obj[_TUPLE])
    if keys == {_COMPLEX}:
        re_, im_ = obj[_COMPLEX]
        return complex(re_, im_)
    if keys == {_FLOAT}:
        text = obj[_FLOAT]
        if text not in ("nan", "inf", "-inf"):
            raise ArchiveFormatError(f"params.json: bad non-finite float {text!r}")
        return float(text)
    return obj


def params_to_json(params: Mapping[str, Any]) -> str:
    """Encode a params snapshot as strict JSON text.

    numpy arrays become ``{"__ndarray__": base64 of the little-endian C-order bytes, "dtype":
    dtype.str, "shape": [...]}`` (complex included); tuples ``{"__tuple__": [...]}``; complex
    scalars ``{"__complex__": [re, im]}``; NaN/inf ``{"__float__": "nan"|"inf"|"-inf"}``; Paths
    and numpy scalars their plain Python value. Raises ValueError naming the offending key.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"params: expected a dict, got {type(params).__name__}")
    return json.dumps(_to_jsonable(params, ""), indent=1, sort_keys=True, allow_nan=False)


def params_from_json(text: str | bytes) -> dict:
    """Inverse of :func:`params_to_json` (arrays come back as writable numpy arrays)."""
    try:
        out = json.loads(text, object_hook=_decode_marker)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, ArchiveError):
            raise
        raise ArchiveFormatError(f"params.json is not valid: {exc}") from exc
    if not isinstance(out, dict):
        raise ArchiveFormatError(f"params.json: expected a JSON object, got {type(out).__name__}")
    return out
