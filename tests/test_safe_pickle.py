"""The restricted unpickler (backend_api.safe_pickle): plain data in, code never run.

Moved from tests/test_archive.py (same assertions); the gadget hunt is tests/test_pickle_gadgets.py.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from backend_api import archive, safe_pickle
from backend_api.archive_errors import ArchiveError, ArchiveFormatError, UnsafePickleError
from backend_api.safe_pickle import safe_loads


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"N": 64, "evil": _RunsCode(marker)}, protocol=4)
    with pytest.raises(UnsafePickleError, match="system"):
        safe_loads(payload)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # also catchable as the pickle error it is
        safe_loads(payload)


@pytest.mark.parametrize(
    "obj",
    [
        np.array([1, "a"], dtype=object),
        np.zeros(2, dtype=[("a", "f4")]),
        np.dtype("O"),
        type,
        print,
        Path.cwd,
    ],
)
def test_non_plain_objects_are_refused(obj):
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(obj, protocol=4))


def test_malformed_pickle_is_a_format_error():
    with pytest.raises(ArchiveFormatError):
        safe_loads(pickle.dumps({"a": 1})[:-3])


# ---------------------------------------------------------------------------------------------
# object arrays (only for NPZ members that upstream stores pickled; never for archives)


def test_object_arrays_only_with_the_flag_and_elements_stay_restricted(tmp_path):
    plain = pickle.dumps(np.array(json.dumps({"a": 1}), dtype=object), protocol=3)
    with pytest.raises(UnsafePickleError, match="object"):
        safe_loads(plain)
    back = safe_loads(plain, allow_object_arrays=True)
    assert back.dtype == object and back.shape == () and json.loads(back.item()) == {"a": 1}
    none = safe_loads(pickle.dumps(np.array(None, dtype=object)), allow_object_arrays=True)
    assert none.item() is None
    marker = tmp_path / "pwned"
    evil = np.empty(2, dtype=object)
    evil[0], evil[1] = "fine", _RunsCode(marker)
    with pytest.raises(UnsafePickleError, match="system"):
        safe_loads(pickle.dumps(evil, protocol=3), allow_object_arrays=True)
    assert not marker.exists()
    # an object array whose data are raw bytes (pointers) is refused even with the flag
    crafted = pickle.dumps(np.zeros(2, np.int64), protocol=3).replace(b"i8", b"O8")
    with pytest.raises(UnsafePickleError):
        safe_loads(crafted, allow_object_arrays=True)


# ---------------------------------------------------------------------------------------------
# the module split keeps the old faces


def test_archive_re_exports_the_unpickler_and_its_error():
    assert archive.safe_loads is safe_pickle.safe_loads
    assert archive.UnsafePickleError is UnsafePickleError
    assert issubclass(UnsafePickleError, ArchiveError)
    assert issubclass(UnsafePickleError, pickle.UnpicklingError)
    assert issubclass(ArchiveError, ValueError)


def test_plain_values_round_trip_through_to_plain():
    params = {"p": Path("a/b"), "x": np.float32(1.5), "t": (1, [2, None]), "c": 1j,
              "a": np.arange(3, dtype=np.int16)}
    back = safe_loads(pickle.dumps(safe_pickle._to_plain(params, ""), protocol=4))
    assert back["p"] == "a/b" and back["x"] == 1.5 and type(back["x"]) is float
    assert back["t"] == (1, [2, None]) and back["c"] == 1j
    assert type(back["a"]) is np.ndarray and back["a"].dtype == np.int16
    with pytest.raises(ValueError, match="cannot pickle"):
        safe_pickle._to_plain({"f": print}, "")
