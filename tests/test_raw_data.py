"""RawData: the NPZ contract, validation, ptychodus-export quirks, file round trips."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend_api.raw_data import RawData

REQUIRED = ("xcoords", "ycoords", "diff3d", "probeGuess")


def _arrays(M=6, H=8, seed=0):
    r = np.random.RandomState(seed)
    return {
        "xcoords": r.uniform(5, 30, M),
        "ycoords": r.uniform(5, 30, M),
        "xcoords_start": r.uniform(5, 30, M),
        "ycoords_start": r.uniform(5, 30, M),
        "diff3d": r.rand(M, H, H).astype(np.float32),
        "probeGuess": (r.rand(H, H) + 1j * r.rand(H, H)).astype(np.complex64),
        "objectGuess": (r.rand(40, 40) * np.exp(1j * r.rand(40, 40))).astype(np.complex64),
        "scan_index": np.zeros(M, np.int64),
    }


def _make(**over):
    a = _arrays()
    a.update(over)
    return RawData(a["xcoords"], a["ycoords"], a["xcoords_start"], a["ycoords_start"],
                   a["diff3d"], a["probeGuess"], a["scan_index"], objectGuess=a["objectGuess"])


# --------------------------------------------------------------------------------------------
# Loading the reference dataset
# --------------------------------------------------------------------------------------------

def test_from_file_reference_dataset(fixtures_dir):
    raw = RawData.from_file(fixtures_dir / "tf_reference" / "dataset_n64_lines.npz")
    assert len(raw) == 512
    assert raw.diff3d.shape == (512, 64, 64) and raw.diff3d.dtype == np.float32
    assert raw.probeGuess.shape == (64, 64) and raw.probeGuess.dtype == np.complex64
    assert raw.objectGuess.shape == (224, 224)
    assert raw.xcoords.dtype == np.float32  # kept as stored (grouping parity relies on it)
    assert raw.scan_index.dtype == np.int64
    assert raw.metadata is None and raw.Y is None and raw.bad_pixels is None
    assert raw.sample_indices is None and raw.subsample_seed is None


def test_constructor_defaults_and_from_coords_without_pc():
    a = _arrays()
    raw = RawData.from_coords_without_pc(a["xcoords"], a["ycoords"], a["diff3d"],
                                         a["probeGuess"], a["scan_index"])
    np.testing.assert_array_equal(raw.xcoords_start, a["xcoords"])
    np.testing.assert_array_equal(raw.ycoords_start, a["ycoords"])
    assert raw.objectGuess is None
    raw = RawData(a["xcoords"], a["ycoords"], None, None, a["diff3d"], a["probeGuess"], None)
    np.testing.assert_array_equal(raw.scan_index, np.zeros(6, np.int64))
    # integer coordinates are accepted and become float64
    raw = RawData.from_coords_without_pc(np.arange(6), np.arange(6), a["diff3d"],
                                         a["probeGuess"], None)
    assert raw.xcoords.dtype == np.float64


# --------------------------------------------------------------------------------------------
# Validation: every failure is a ValueError naming the key
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", REQUIRED)
def test_from_file_missing_key(tmp_path, key):
    a = _arrays()
    del a[key]
    p = tmp_path / "d.npz"
    np.savez(p, **a)
    with pytest.raises(ValueError, match=f"missing required key '{key}'") as info:
        RawData.from_file(p)
    assert "expected" in str(info.value) and "present:" in str(info.value)


def test_from_file_accepts_diffraction_alias_and_rank4(tmp_path):
    a = _arrays()
    a["diffraction"] = a.pop("diff3d")[..., None]
    p = tmp_path / "d.npz"
    np.savez(p, **a)
    raw = RawData.from_file(p)
    assert raw.diff3d.shape == (6, 8, 8)


def test_from_file_legacy_hwm_layout(tmp_path):
    a = _arrays()
    d = a["diff3d"]
    a["diff3d"] = np.transpose(d, (1, 2, 0))
    p = tmp_path / "d.npz"
    np.savez(p, **a)
    with pytest.warns(UserWarning, match="legacy"):
        raw = RawData.from_file(p)
    np.testing.assert_array_equal(raw.diff3d, d)


def test_from_file_drops_Y_with_wrong_length(tmp_path):
    a = _arrays()
    a["Y"] = np.ones((3, 8, 8), np.complex64)
    p = tmp_path / "d.npz"
    np.savez(p, **a)
    with pytest.warns(UserWarning, match="ignoring Y"):
        raw = RawData.from_file(p)
    assert raw.Y is None


BAD_CASES = [
    ("xcoords", dict(xcoords=np.zeros(5))),                       # length mismatch
    ("ycoords", dict(ycoords=np.zeros(7))),
    ("xcoords_start", dict(xcoords_start=np.zeros(4))),
    ("ycoords_start", dict(ycoords_start=np.zeros((6, 1)))),
    ("xcoords", dict(xcoords=np.zeros((6, 2)))),                  # wrong rank
    ("xcoords", dict(xcoords=np.array(["a"] * 6))),               # wrong dtype
    ("ycoords", dict(ycoords=np.zeros(6, complex))),
    ("xcoords", dict(xcoords=np.array([1, 2, np.nan, 4, 5, 6.0]))),  # non-finite
    ("ycoords_start", dict(ycoords_start=np.array([1, 2, np.inf, 4, 5, 6.0]))),
    ("diff3d", dict(diff3d=np.ones((6, 8, 9), np.float32))),      # non-square
    ("diff3d", dict(diff3d=np.ones((5, 8, 8), np.float32))),      # count mismatch
    ("diff3d", dict(diff3d=np.ones((6, 8), np.float32))),         # rank
    ("diff3d", dict(diff3d=-np.ones((6, 8, 8), np.float32))),     # negative amplitude
    ("diff3d", dict(diff3d=np.full((6, 8, 8), np.nan, np.float32))),
    ("diff3d", dict(diff3d=np.ones((6, 8, 8), np.complex64))),    # complex amplitude
    ("diff3d", dict(diff3d=np.ones((6, 8, 8), bool))),
    ("diff3d", dict(diff3d=-np.ones((6, 8, 8), np.int16))),       # negative counts
    ("probeGuess", dict(probeGuess=np.ones((8, 7), np.complex64))),
    ("probeGuess", dict(probeGuess=np.ones((16, 16), np.complex64))),  # != pattern size
    ("probeGuess", dict(probeGuess=np.ones(8, np.complex64))),
    ("probeGuess", dict(probeGuess=np.full((8, 8), np.nan + 0j, np.complex64))),
    ("probeGuess", dict(probeGuess=np.array([["x"] * 8] * 8))),
    ("objectGuess", dict(objectGuess=np.ones((4, 4, 4), np.complex64))),
    ("objectGuess", dict(objectGuess=np.full((4, 4), np.inf, np.complex64))),
    ("scan_index", dict(scan_index=np.zeros(5, np.int64))),
    ("scan_index", dict(scan_index=np.full(6, 0.5))),
]


@pytest.mark.parametrize("key,over", BAD_CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD_CASES)])
def test_malformed_inputs_rejected(key, over):
    with pytest.raises(ValueError, match=key) as info:
        _make(**over)
    msg = str(info.value)
    # the message says what was expected and what was seen (a shape, dtype or value)
    assert msg.split(":")[0] in {"xcoords", "ycoords", key} and "expected" in msg
    bad = over[key]
    assert (str(bad.shape) in msg or str(bad.dtype) in msg or "non-finite" in msg
            or "negative" in msg or "mode" in msg or "(" in msg), msg


def test_other_constructor_args_validated():
    a = _arrays()
    base = (a["xcoords"], a["ycoords"], None, None, a["diff3d"], a["probeGuess"], None)
    with pytest.raises(ValueError, match="Y"):
        RawData(*base, Y=np.ones((5, 8, 8), np.complex64))
    with pytest.raises(ValueError, match="norm_Y_I"):
        RawData(*base, norm_Y_I=np.ones(3))
    with pytest.raises(ValueError, match="metadata"):
        RawData(*base, metadata=["not", "a", "dict"])
    with pytest.raises(ValueError, match="bad_pixels"):
        RawData(*base, bad_pixels=np.zeros((7, 7), bool))
    with pytest.raises(ValueError, match="bad_pixels"):
        RawData(*base, bad_pixels=np.full((8, 8), 0.5))


@st.composite
def valid_inputs(draw):
    M = draw(st.integers(1, 12))
    H = draw(st.sampled_from([2, 4, 8]))
    fdt = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 10_000))
    r = np.random.RandomState(seed)
    return dict(x=r.uniform(-50, 50, M).astype(fdt), y=r.uniform(-50, 50, M).astype(fdt),
                d=(r.rand(M, H, H) * draw(st.floats(0, 1e3))).astype(draw(st.sampled_from(
                    [np.float32, np.float64]))),
                p=(r.rand(H, H) + 1j * r.rand(H, H)).astype(np.complex64), M=M, H=H)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_inputs())
def test_valid_inputs_accepted(v):
    raw = RawData.from_coords_without_pc(v["x"], v["y"], v["d"], v["p"], None)
    assert len(raw) == v["M"] and raw.diff3d.shape == (v["M"], v["H"], v["H"])
    assert raw.diff3d.dtype == v["d"].dtype  # amplitudes kept as given
    np.testing.assert_array_equal(raw.diff3d, v["d"])
    np.testing.assert_array_equal(raw.xcoords, v["x"])
    assert raw.probeGuess.dtype == np.complex64 and raw.scan_index.dtype == np.int64


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_inputs())
def test_valid_inputs_round_trip_through_npz(v):
    import tempfile
    from pathlib import Path

    raw = RawData.from_coords_without_pc(v["x"], v["y"], v["d"], v["p"], np.arange(v["M"]))
    with tempfile.TemporaryDirectory() as tmp:
        back = RawData.from_file(raw.to_file(Path(tmp) / "r.npz"))
    for key in ("xcoords", "ycoords", "xcoords_start", "ycoords_start", "diff3d", "probeGuess",
                "scan_index"):
        np.testing.assert_array_equal(getattr(back, key), getattr(raw, key), err_msg=key)
        assert getattr(back, key).dtype == getattr(raw, key).dtype, key


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_inputs(), st.sampled_from([np.uint16, np.uint32, np.int32]), st.integers(1, 3),
       st.booleans())
def test_valid_ptychodus_exports_accepted(v, count_dtype, modes, with_index):
    """Integer counts (-> sqrt amplitude), a (modes, H, W) probe and an integer scan index are
    all valid input; each conversion is announced by a UserWarning."""
    counts = np.rint(v["d"] * 100).astype(count_dtype)
    probe = np.stack([v["p"] * (k + 1) for k in range(modes)])
    index = np.arange(v["M"], dtype=np.int32) if with_index else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw = RawData.from_coords_without_pc(v["x"], v["y"], counts, probe, index)
    messages = " | ".join(str(w.message) for w in caught)
    assert "intensity" in messages
    assert ("mode 0" in messages) == (modes > 1)
    assert raw.diff3d.dtype == np.float32
    np.testing.assert_allclose(raw.diff3d, np.sqrt(counts.astype(np.float64)), rtol=1e-6)
    np.testing.assert_array_equal(raw.probeGuess, v["p"])
    assert raw.scan_index.dtype == np.int64 and raw.scan_index.shape == (v["M"],)


FAULT_KEYS = {
    "len_x": "diff3d", "len_y": "ycoords", "len_d": "diff3d", "nonsquare": "diff3d",
    "nan_d": "diff3d", "neg_d": "diff3d", "inf_x": "xcoords", "probe_shape": "probeGuess",
    "cplx_d": "diff3d", "nan_probe": "probeGuess", "str_x": "xcoords", "rank_y": "ycoords",
    "neg_counts": "diff3d", "bool_d": "diff3d", "rank_d": "diff3d", "probe_rank": "probeGuess",
    "len_index": "scan_index", "frac_index": "scan_index", "nan_obj": "objectGuess",
    "rank_obj": "objectGuess",
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_inputs(), st.sampled_from(sorted(FAULT_KEYS)), st.integers(0, 1000))
def test_malformed_inputs_property(v, fault, where):
    x, y, d, p = v["x"].copy(), v["y"].copy(), v["d"].copy(), v["p"].copy()
    M, H = v["M"], v["H"]
    index, obj = None, None
    key = FAULT_KEYS[fault]
    if fault == "len_x":
        x = np.append(x, 1.0)
        y = np.append(y, 1.0)  # coordinates agree with each other; the patterns do not
    elif fault == "len_y":
        y = np.append(y, 1.0)
    elif fault == "str_x":
        x = x.astype(str)
    elif fault == "rank_y":
        y = y[:, None]
    elif fault == "neg_counts":
        d = np.rint(d * 10).astype(np.int32)
        d.reshape(-1)[where % d.size] = -1
    elif fault == "bool_d":
        d = d > 0.5
    elif fault == "rank_d":
        d = d.reshape(M, -1)
    elif fault == "probe_rank":
        p = np.ones((2, 2, H, H), np.complex64)
    elif fault == "len_index":
        index = np.zeros(M + 1, np.int64)
    elif fault == "frac_index":
        index = np.full(M, 0.5)
    elif fault == "nan_obj":
        obj = np.ones((H + 3, H + 3), np.complex64)
        obj.reshape(-1)[where % obj.size] = np.nan
    elif fault == "rank_obj":
        obj = np.ones((2, H, H), np.complex64)
    elif fault == "len_d":
        d = np.concatenate([d, d[:1]])
    elif fault == "nonsquare":
        d = np.concatenate([d, d[:, :1]], axis=1)
    elif fault == "nan_d":
        d.reshape(-1)[where % d.size] = np.nan
    elif fault == "neg_d":
        d.reshape(-1)[where % d.size] = -1.0
    elif fault == "inf_x":
        x[where % M] = np.inf
    elif fault == "probe_shape":
        p = np.ones((H + 1, H + 1), np.complex64)
    elif fault == "cplx_d":
        d = d.astype(np.complex64)
    elif fault == "nan_probe":
        p.reshape(-1)[where % p.size] = np.nan
    with pytest.raises(ValueError, match=key) as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the integer-counts notice before a failure
            RawData.from_coords_without_pc(x, y, d, p, index, objectGuess=obj)
    assert str(info.value).startswith(key + ":") and "expected" in str(info.value)


# --------------------------------------------------------------------------------------------
# ptychodus export quirks
# --------------------------------------------------------------------------------------------

def test_integer_intensity_becomes_amplitude_with_warning():
    a = _arrays()
    counts = np.random.RandomState(3).randint(0, 60000, size=(6, 8, 8)).astype(np.uint16)
    with pytest.warns(UserWarning, match="intensity"):
        raw = RawData.from_coords_without_pc(a["xcoords"], a["ycoords"], counts,
                                             a["probeGuess"], None)
    assert raw.diff3d.dtype == np.float32
    np.testing.assert_allclose(raw.diff3d, np.sqrt(counts.astype(np.float64)), rtol=1e-7)


def test_float_amplitude_no_warning():
    a = _arrays()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RawData.from_coords_without_pc(a["xcoords"], a["ycoords"], a["diff3d"],
                                       a["probeGuess"], None)


def test_multimode_probe_uses_mode_zero():
    a = _arrays()
    modes = np.stack([a["probeGuess"], 2 * a["probeGuess"], 3 * a["probeGuess"]])
    with pytest.warns(UserWarning, match="mode 0"):
        raw = RawData.from_coords_without_pc(a["xcoords"], a["ycoords"], a["diff3d"], modes, None)
    np.testing.assert_array_equal(raw.probeGuess, a["probeGuess"])
    # a single-mode (1, H, W) probe is silently squeezed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = RawData.from_coords_without_pc(a["xcoords"], a["ycoords"], a["diff3d"],
                                             modes[:1], None)
    assert raw.probeGuess.shape == (8, 8)


def test_real_probe_becomes_complex64():
    a = _arrays()
    raw = RawData.from_coords_without_pc(a["xcoords"], a["ycoords"], a["diff3d"],
                                         np.ones((8, 8)), None)
    assert raw.probeGuess.dtype == np.complex64


def test_bad_pixels_zeroed_constructor_and_file(tmp_path):
    a = _arrays()
    mask = np.zeros((8, 8), bool)
    mask[2, 3] = mask[7, 7] = True
    with pytest.warns(UserWarning, match="bad_pixels"):
        raw = RawData.from_coords_without_pc(a["xcoords"], a["ycoords"], a["diff3d"],
                                             a["probeGuess"], None, bad_pixels=mask)
    assert (raw.diff3d[:, mask] == 0).all()
    np.testing.assert_array_equal(raw.diff3d[:, ~mask], a["diff3d"][:, ~mask])
    assert (a["diff3d"][:, mask] > 0).all()  # the caller's array is not modified
    np.testing.assert_array_equal(raw.bad_pixels, mask)
    # from a file key, with integer counts as ptychodus exports them
    a2 = _arrays()
    a2["diff3d"] = np.full((6, 8, 8), 4, np.uint32)
    a2["bad_pixels"] = mask
    p = tmp_path / "ptychodus.npz"
    np.savez(p, **a2)
    with pytest.warns(UserWarning):
        raw = RawData.from_file(p)
    assert (raw.diff3d[:, mask] == 0).all() and (raw.diff3d[:, ~mask] == 2).all()
    # an explicit argument overrides the file's mask
    with pytest.warns(UserWarning):
        raw = RawData.from_file(p, bad_pixels=np.zeros((8, 8), bool))
    assert (raw.diff3d == 2).all()


# --------------------------------------------------------------------------------------------
# Files: round trip, metadata, atomic writes, safe loading
# --------------------------------------------------------------------------------------------

def test_to_file_from_file_round_trip(tmp_path):
    a = _arrays()
    Y = (np.random.RandomState(2).rand(6, 8, 8) + 0j).astype(np.complex64)
    raw = RawData(a["xcoords"], a["ycoords"], a["xcoords_start"], a["ycoords_start"],
                  a["diff3d"], a["probeGuess"], np.arange(6), objectGuess=a["objectGuess"], Y=Y,
                  metadata={"nphotons": 1e6, "physics_parameters": {"nphotons": 1e6}})
    p = raw.to_file(tmp_path / "sub" / "out.npz")
    assert p.exists() and sorted(os.listdir(p.parent)) == ["out.npz"]
    with np.load(p, allow_pickle=False) as z:  # no pickles written
        assert set(z.files) == {"xcoords", "ycoords", "xcoords_start", "ycoords_start", "diff3d",
                                "probeGuess", "scan_index", "objectGuess", "Y", "_metadata"}
    back = RawData.from_file(p)
    for key in ("xcoords", "ycoords", "xcoords_start", "ycoords_start", "diff3d", "probeGuess",
                "scan_index", "objectGuess", "Y"):
        np.testing.assert_array_equal(getattr(back, key), getattr(raw, key), err_msg=key)
        assert getattr(back, key).dtype == getattr(raw, key).dtype, key
    assert back.metadata == {"nphotons": 1e6, "physics_parameters": {"nphotons": 1e6}}


def test_round_trip_without_object_and_reference_dataset(tmp_path, fixtures_dir):
    raw = RawData.from_file(fixtures_dir / "tf_reference" / "dataset_n64_lines.npz")
    raw.objectGuess = None
    back = RawData.from_file(raw.to_file(tmp_path / "x.npz"))
    assert back.objectGuess is None
    np.testing.assert_array_equal(back.diff3d, raw.diff3d)


def test_to_file_failure_keeps_old_file(tmp_path):
    a = _arrays()
    good = RawData.from_coords_without_pc(a["xcoords"], a["ycoords"], a["diff3d"],
                                          a["probeGuess"], None)
    p = good.to_file(tmp_path / "d.npz")
    before = p.read_bytes()
    bad = RawData.from_coords_without_pc(a["xcoords"], a["ycoords"], a["diff3d"],
                                         a["probeGuess"], None)
    bad.metadata = {"x": object()}
    with pytest.raises(ValueError, match="metadata"):
        bad.to_file(p)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["d.npz"]


def test_metadata_numpy_values_serialised(tmp_path):
    a = _arrays()
    raw = RawData.from_coords_without_pc(a["xcoords"], a["ycoords"], a["diff3d"],
                                         a["probeGuess"], None,
                                         metadata={"nphotons": np.float32(1e6), "v": np.arange(3)})
    back = RawData.from_file(raw.to_file(tmp_path / "m.npz"))
    assert back.metadata == {"nphotons": 1e6, "v": [0, 1, 2]}


def test_metadata_json_string(tmp_path):
    a = _arrays()
    p = tmp_path / "m.npz"
    np.savez(p, **a, _metadata=json.dumps({"nphotons": 5e8}))
    assert RawData.from_file(p).metadata == {"nphotons": 5e8}
    np.savez(p, **a, _metadata="not json{")
    with pytest.raises(ValueError, match="_metadata"):
        RawData.from_file(p)


def test_pickled_metadata_read_safely(tmp_path):
    a = _arrays()
    p = tmp_path / "m.npz"
    # upstream style: a JSON string inside an object array (needs pickle to load)
    np.savez(p, **a, _metadata=np.array(json.dumps({"nphotons": 1e9}), dtype=object))
    assert RawData.from_file(p).metadata == {"nphotons": 1e9}


def test_reference_style_none_object_guess(tmp_path):
    # upstream to_file stores objectGuess=None as a pickled 0-d object array
    a = _arrays()
    a["objectGuess"] = np.array(None, dtype=object)
    p = tmp_path / "n.npz"
    np.savez(p, **a)
    assert RawData.from_file(p).objectGuess is None


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("key", ["_metadata", "objectGuess"])
def test_malicious_pickle_refused_and_not_run(tmp_path, key):
    a = _arrays()
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.npz"
    arr = np.empty((), dtype=object)
    arr[()] = _Evil(marker)
    a[key] = arr
    np.savez(p, **a)
    with pytest.raises(ValueError, match=rf"{key}: pickled entry refused.*os\.system|{key}: "
                                         r"pickled entry refused.*posix\.system") as info:
        RawData.from_file(p)
    assert "allow_pickle=True" in str(info.value)
    assert not marker.exists()  # refused before anything ran


class _RawObjectScalar:
    """Pickles as numpy's ``scalar(dtype('O'), raw bytes)``: bytes read as an object pointer."""

    def __reduce__(self):
        from numpy._core.multiarray import scalar

        return (scalar, (np.dtype(object), b"\x00" * np.dtype(object).itemsize))


def test_object_scalar_from_raw_bytes_refused(tmp_path):
    a = _arrays()
    p = tmp_path / "ptr.npz"
    arr = np.empty((), dtype=object)
    arr[()] = _RawObjectScalar()
    np.savez(p, **a, _metadata=arr)
    with pytest.raises(ValueError, match="_metadata: pickled entry refused"):
        RawData.from_file(p)


def test_from_file_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        RawData.from_file(tmp_path / "nope.npz")


def test_from_files_pair(tmp_path):
    a = _arrays()
    raw = RawData.from_coords_without_pc(a["xcoords"], a["ycoords"], a["diff3d"],
                                         a["probeGuess"], None)
    t = raw.to_file(tmp_path / "train.npz")
    s = raw.to_file(tmp_path / "test.npz")
    tr, te = RawData.from_files(t, s)
    assert len(tr) == len(te) == 6


def test_pickle_of_rawdata_works():
    # ptychodus runs backends in spawned children: RawData must pickle
    a = _arrays()
    raw = RawData.from_coords_without_pc(a["xcoords"], a["ycoords"], a["diff3d"],
                                         a["probeGuess"], None)
    back = pickle.loads(pickle.dumps(raw))
    np.testing.assert_array_equal(back.diff3d, raw.diff3d)


# --------------------------------------------------------------------------------------------
# Files that are not NPZ archives, or damaged ones: DataFileError naming the file
# --------------------------------------------------------------------------------------------

from backend_api.raw_data import DataFileError  # noqa: E402


def _good_npz_bytes(tmp_path, compressed=False) -> bytes:
    p = tmp_path / "_src.npz"
    (np.savez_compressed if compressed else np.savez)(p, **_arrays())
    data = p.read_bytes()
    p.unlink()
    return data


def _write_text(path, tmp_path):
    path.write_text("xcoords,ycoords\n1.0,2.0\n")


def _write_hdf5(path, tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        f["diff3d"] = np.ones((2, 4, 4), np.float32)


def _write_npy(path, tmp_path):
    with open(path, "wb") as fh:  # np.save on a path would append ".npy"
        np.save(fh, np.ones((2, 4, 4), np.float32))


def _write_empty(path, tmp_path):
    path.write_bytes(b"")


def _write_truncated(path, tmp_path):
    data = _good_npz_bytes(tmp_path)
    path.write_bytes(data[: len(data) // 2])


def _write_corrupt_member(path, tmp_path):
    """A complete archive whose compressed diff3d bytes are overwritten with zeros."""
    import zipfile

    data = bytearray(_good_npz_bytes(tmp_path, compressed=True))
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("diff3d.npy")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 4
    data[start:start + 64] = b"\0" * 64
    path.write_bytes(bytes(data))


def _write_gzip(path, tmp_path):
    import gzip

    path.write_bytes(gzip.compress(b"not an npz"))


BAD_FILES = {
    # case: (writer, phrase the message must contain)
    "text": (_write_text, "not an NPZ archive: it is a text file"),
    "hdf5": (_write_hdf5, "not an NPZ archive: it is an HDF5 file"),
    "npy": (_write_npy, ".npy array, not an NPZ archive"),
    "empty": (_write_empty, "empty file (0 bytes)"),
    "truncated": (_write_truncated, "truncated or corrupt NPZ"),
    "corrupt_member": (_write_corrupt_member, "truncated or corrupt NPZ: array 'diff3d'"),
    "gzip": (_write_gzip, "not an NPZ archive: it is a gzip file"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_from_file_names_a_bad_file(tmp_path, case):
    """Each non-NPZ or damaged file: a DataFileError (a ValueError) whose message starts with
    the path and says what the file is not; the file is untouched and nothing is written."""
    writer, phrase = BAD_FILES[case]
    path = tmp_path / "data.npz"
    writer(path, tmp_path)
    before = path.read_bytes()
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataFileError) as info:
        RawData.from_file(path)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert phrase in msg, msg
    assert "\n" not in msg
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_from_file_directory_is_named(tmp_path):
    path = tmp_path / "data.npz"
    path.mkdir()
    with pytest.raises(DataFileError, match="is a directory, not an NPZ file") as info:
        RawData.from_file(path)
    assert str(info.value).startswith(f"{path}: ")
    assert list(path.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["data.npz"]


def test_from_file_validation_errors_name_the_file(tmp_path):
    a = _arrays()
    a["diff3d"] = -a["diff3d"]
    path = tmp_path / "neg.npz"
    np.savez(path, **a)
    with pytest.raises(DataFileError, match="diff3d: expected non-negative amplitudes") as info:
        RawData.from_file(path)
    assert str(info.value).startswith(f"{path}: diff3d:")


def test_from_file_missing_key_names_the_file(tmp_path):
    a = _arrays()
    del a["probeGuess"]
    path = tmp_path / "d.npz"
    np.savez(path, **a)
    with pytest.raises(DataFileError, match="missing required key 'probeGuess'") as info:
        RawData.from_file(path)
    assert str(info.value).startswith(f"{path}: ")


def test_empty_zip_archive_is_an_npz_without_keys(tmp_path):
    """An empty zip (b'PK\\x05\\x06') is a valid, empty NPZ: the error lists the missing keys."""
    import zipfile

    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w"):
        pass
    assert path.read_bytes().startswith(b"PK\x05\x06")
    with pytest.raises(DataFileError, match=r"missing required key 'xcoords'.*present: \[\]"):
        RawData.from_file(path)


@pytest.mark.parametrize("case", ["text", "empty", "truncated", "corrupt_member"])
def test_ptychodus_training_npz_names_a_bad_file(tmp_path, case):
    """The ptychodus child's NPZ reader shares the checks."""
    from backend_api.ptychodus.child import load_ptychodus_training_npz

    writer, phrase = BAD_FILES[case]
    path = tmp_path / "train_data.npz"
    writer(path, tmp_path)
    with pytest.raises(DataFileError) as info:
        load_ptychodus_training_npz(path)
    assert str(info.value).startswith(f"{path}: ") and phrase in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["train_data.npz"]


# --------------------------------------------------------------------------------------------
# Zero positions and an all-zero probe
# --------------------------------------------------------------------------------------------

def test_zero_positions_named_in_constructor():
    a = _arrays()
    with pytest.raises(ValueError, match="xcoords: no scan positions") as info:
        RawData.from_coords_without_pc(np.zeros(0), np.zeros(0), np.zeros((0, 8, 8), np.float32),
                                       a["probeGuess"], None)
    assert "reshape" not in str(info.value)


def test_zero_positions_named_from_file(tmp_path):
    a = _arrays()
    a.update(xcoords=np.zeros(0), ycoords=np.zeros(0), xcoords_start=np.zeros(0),
             ycoords_start=np.zeros(0), diff3d=np.zeros((0, 8, 8), np.float32),
             scan_index=np.zeros(0, np.int64))
    path = tmp_path / "empty_scan.npz"
    np.savez(path, **a)
    with pytest.raises(DataFileError, match="xcoords: no scan positions") as info:
        RawData.from_file(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("probe_shape", [(8, 8), (1, 8, 8)])
def test_all_zero_probe_named(probe_shape):
    a = _arrays()
    with pytest.raises(ValueError, match="probeGuess is all zero") as info:
        RawData.from_coords_without_pc(a["xcoords"], a["ycoords"], a["diff3d"],
                                       np.zeros(probe_shape, np.complex64), None)
    assert "non-finite" not in str(info.value)


def test_all_zero_probe_named_from_file(tmp_path):
    a = _arrays()
    a["probeGuess"] = np.zeros((8, 8), np.complex64)
    path = tmp_path / "zero_probe.npz"
    np.savez(path, **a)
    with pytest.raises(DataFileError, match="probeGuess is all zero"):
        RawData.from_file(path)


def test_non_finite_probe_keeps_its_message():
    a = _arrays()
    probe = np.zeros((8, 8), np.complex64)
    probe[3, 3] = np.nan
    with pytest.raises(ValueError, match="probeGuess: expected only finite values") as info:
        RawData.from_coords_without_pc(a["xcoords"], a["ycoords"], a["diff3d"], probe, None)
    assert "all zero" not in str(info.value)
