"""The params JSON codec (backend_api.params_codec); the round-trip property moved from
tests/test_archive.py (same assertions)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from backend_api import archive as A
from backend_api import params_codec
from backend_api.archive_errors import ArchiveFormatError
from backend_api.safe_pickle import safe_loads


@settings(max_examples=40, deadline=None)
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from(
            [np.float32, np.float64, np.complex64, np.complex128, np.int32, np.int64, np.bool_,
             np.uint8, np.dtype(">f4"), np.dtype("<U3")]
        ),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
    )
)
def test_array_encoding_round_trips_json_and_pickle(arr):
    back = A.params_from_json(A.params_to_json({"a": arr}))["a"]
    assert back.shape == arr.shape and back.dtype.newbyteorder("=") == arr.dtype.newbyteorder("=")
    np.testing.assert_array_equal(back, arr)
    for proto in (2, 4, 5):
        again = safe_loads(pickle.dumps({"a": arr}, protocol=proto))["a"]
        assert type(again) is np.ndarray and again.shape == arr.shape
        np.testing.assert_array_equal(again, arr)


def test_archive_re_exports_the_codec():
    assert A.params_to_json is params_codec.params_to_json
    assert A.params_from_json is params_codec.params_from_json


def test_markers_for_tuples_complex_and_non_finite_floats():
    params = {"t": (1, (2, "x")), "c": 1 - 2j, "n": float("nan"), "i": -math.inf, "l": [None]}
    text = params_codec.params_to_json(params)
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    back = params_codec.params_from_json(text)
    assert back["t"] == (1, (2, "x")) and back["c"] == 1 - 2j and back["l"] == [None]
    assert math.isnan(back["n"]) and back["i"] == -math.inf


@pytest.mark.parametrize(
    "params, match",
    [
        ({"__tuple__": 1}, "reserved"),
        ({1: 2}, "str keys"),
        ({"o": np.array([1], dtype=object)}, "dtype object"),
        ({"f": print}, "cannot store"),
    ],
)
def test_unstorable_params_are_refused_naming_the_key(params, match):
    with pytest.raises(ValueError, match=match):
        params_codec.params_to_json(params)


@pytest.mark.parametrize(
    "text",
    [
        "[1]",
        "{",
        '{"a": {"__float__": "big"}}',
        '{"a": {"__ndarray__": "AAAA", "dtype": "<f8", "shape": [2]}}',
    ],
)
def test_malformed_params_json_is_a_format_error(text):
    with pytest.raises(ArchiveFormatError):
        params_codec.params_from_json(text)
