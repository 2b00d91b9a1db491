"""backend_api.archive: the wts.h5.zip format, safe reading, atomic writing."""

from __future__ import annotations

import json
import os
import pickle
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from backend_api import archive as A
from backend_api.archive import (
    ARCHIVE_NAME,
    ArchiveBackendError,
    ArchiveFormatError,
    ModelEntry,
    UnsafeArchiveError,
    UnsafePickleError,
    read_archive,
    read_manifest,
    safe_loads,
    write_archive,
)

TF_SMALL = Path(__file__).parent / "fixtures" / "tf_archive_small" / "tf_meta_only.zip"


def _params(N=64, **extra):
    rng = np.random.default_rng(0)
    probe = (rng.normal(size=(N, N, 1)) + 1j * rng.normal(size=(N, N, 1))).astype(np.complex64)
    p = {
        "N": N,
        "gridsize": 2,
        "intensity_scale": 988.211669921875,
        "probe": probe,
        "object.big": True,
        "outer_offset_train": None,
        "output_prefix": Path("out/dir"),
        "nphotons": np.float64(1e9),
        "shape_tuple": (1, 2, (3, "x")),
        "nested": {"a": [1, 2.5, None], "c": 1 - 2j},
        "bad_float": float("nan"),
    }
    p.update(extra)
    return p


def _write_payload_tree(root: Path) -> Path:
    tree = root / "ckpt"
    (tree / "state" / "d").mkdir(parents=True)
    (tree / "state" / "d" / "blob").write_bytes(b"\x00\x01binary")
    (tree / "_METADATA").write_text("{}")
    (tree / "empty").mkdir()
    return tree


def _make_archive(tmp_path: Path, backend="jax", version="1.0-jax") -> Path:
    src = tmp_path / "src"
    src.mkdir()
    tree = _write_payload_tree(src)
    single = src / "single.bin"
    single.write_bytes(b"single file")
    models = {
        "autoencoder": ModelEntry(_params(), {"weights.bin": b"abc", "ckpt": tree}),
        "diffraction_to_obj": ModelEntry(_params(), {"one/two.bin": single}),
    }
    return write_archive(tmp_path / "out" / ARCHIVE_NAME, models, backend=backend, version=version)


def _zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _plain_manifest(version="1.0", **extra) -> bytes:
    return pickle.dumps({"models": ["m"], "version": version, **extra}, protocol=4)


def _plain_params(**extra) -> bytes:
    return pickle.dumps({"N": 64, "gridsize": 1, "intensity_scale": 2.0, **extra}, protocol=4)


# ---------------------------------------------------------------------------------------------
# round trip


def test_round_trip_params_files_and_manifest(tmp_path):
    path = _make_archive(tmp_path)
    assert path == tmp_path / "out" / ARCHIVE_NAME and path.is_file()
    contents = read_archive(path, tmp_path / "x", expected_backend="jax")
    assert contents.backend == "jax" and contents.version == "1.0-jax"
    assert list(contents.models) == ["autoencoder", "diffraction_to_obj"]

    ae = contents.models["autoencoder"]
    ref = _params()
    assert ae.name == "autoencoder" and ae.dir == (tmp_path / "x" / "autoencoder").resolve()
    assert set(ae.params) == set(ref)  # '_version' is removed, as the reference loader does
    assert ae.params["probe"].dtype == np.complex64 and ae.params["probe"].shape == (64, 64, 1)
    np.testing.assert_array_equal(ae.params["probe"], ref["probe"])
    assert ae.params["probe"].flags.writeable
    assert ae.params["output_prefix"] == "out/dir"
    assert ae.params["nphotons"] == 1e9 and isinstance(ae.params["nphotons"], float)
    assert ae.params["shape_tuple"] == (1, 2, (3, "x"))
    assert ae.params["nested"] == {"a": [1, 2.5, None], "c": 1 - 2j}
    assert np.isnan(ae.params["bad_float"])
    assert ae.params["intensity_scale"] == 988.211669921875

    assert (ae.dir / "weights.bin").read_bytes() == b"abc"
    assert (ae.dir / "ckpt" / "state" / "d" / "blob").read_bytes() == b"\x00\x01binary"
    assert (ae.dir / "ckpt" / "_METADATA").read_text() == "{}"
    assert (ae.dir / "ckpt" / "empty").is_dir()
    d2o = contents.models["diffraction_to_obj"]
    assert (d2o.dir / "one" / "two.bin").read_bytes() == b"single file"


def test_dill_members_are_plain_pickles_for_the_reference_loader(tmp_path):
    path = _make_archive(tmp_path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        manifest = pickle.loads(zf.read("manifest.dill"))
        manifest_json = json.loads(zf.read("manifest.json"))
        params = pickle.loads(zf.read("autoencoder/params.dill"))
        json.loads(zf.read("autoencoder/params.json"))  # strict JSON (NaN encoded)
    assert names[:2] == ["manifest.json", "manifest.dill"]
    assert manifest == {
        "models": ["autoencoder", "diffraction_to_obj"],
        "version": "1.0-jax",
        "backend": "jax",
    }
    assert manifest_json["backend"] == "jax" and manifest_json["format_version"] == A.FORMAT_VERSION
    assert params["_version"] == "1.0-jax" and params["N"] == 64 and params["gridsize"] == 2
    assert type(params["probe"]) is np.ndarray and params["probe"].dtype == np.complex64
    assert safe_loads(zipfile.ZipFile(path).read("autoencoder/params.dill"))["N"] == 64


def test_write_into_existing_directory_and_deterministic_bytes(tmp_path):
    models = {"m": ModelEntry({"N": 8, "gridsize": 1, "intensity_scale": 1.0}, {"w": b"1"})}
    d = tmp_path / "bundle"
    d.mkdir()
    p1 = write_archive(d, models, backend="jax", version="v")
    assert p1 == d / ARCHIVE_NAME
    b1 = p1.read_bytes()
    p2 = write_archive(d / ARCHIVE_NAME, models, backend="jax", version="v")
    assert p2.read_bytes() == b1
    assert read_manifest(d) == read_manifest(p1)


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


# ---------------------------------------------------------------------------------------------
# write validation and atomicity


@pytest.mark.parametrize(
    "models, match",
    [
        ({}, "non-empty"),
        ({"m": ModelEntry({"N": 8, "gridsize": 1})}, "intensity_scale"),
        ({"../m": ModelEntry({"N": 8, "gridsize": 1, "intensity_scale": 1.0})}, "'..'"),
        ({"a/b": ModelEntry({"N": 8, "gridsize": 1, "intensity_scale": 1.0})}, "must not contain"),
        ({"m": ModelEntry({"N": 8, "gridsize": 1, "intensity_scale": 1.0, "x": object()})}, "'x'"),
        ({"m": ModelEntry({"N": 8, "gridsize": 1, "intensity_scale": 1.0}, {"params.json": b""})}, "reserved"),
        ({"m": ModelEntry({"N": 8, "gridsize": 1, "intensity_scale": 1.0}, {"/abs": b""})}, "absolute"),
        ({"m": ModelEntry({"N": 8, "gridsize": 1, "intensity_scale": np.array([None])})}, "dtype"),
    ],
)
def test_write_rejects_bad_input_before_writing(tmp_path, models, match):
    with pytest.raises(ValueError, match=match):
        write_archive(tmp_path / ARCHIVE_NAME, models, backend="jax", version="v")
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_keeps_previous_archive(tmp_path, monkeypatch):
    path = _make_archive(tmp_path)
    before = path.read_bytes()
    calls = {"n": 0}
    real = A._add_member

    def flaky(zf, name, src):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full (simulated)")
        return real(zf, name, src)

    monkeypatch.setattr(A, "_add_member", flaky)
    models = {"m": ModelEntry({"N": 8, "gridsize": 1, "intensity_scale": 1.0}, {"a": b"1", "b": b"2"})}
    with pytest.raises(OSError, match="simulated"):
        write_archive(path, models, backend="jax", version="new")
    assert calls["n"] == 4
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [ARCHIVE_NAME]  # no temp left
    assert read_manifest(path)["version"] == "1.0-jax"


# ---------------------------------------------------------------------------------------------
# restricted unpickling


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


def test_code_running_manifest_or_params_in_archive_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = pickle.dumps({"models": ["m"], "version": "1.0", "x": _RunsCode(marker)})
    a = _zip(tmp_path / "a.zip", {"manifest.dill": bad, "m/params.dill": _plain_params()})
    with pytest.raises(UnsafePickleError):
        read_manifest(a)
    b = _zip(
        tmp_path / "b.zip",
        {"manifest.dill": _plain_manifest(), "m/params.dill": _plain_params(evil=_RunsCode(marker))},
    )
    with pytest.raises(UnsafePickleError):
        read_archive(b, tmp_path / "dest")
    assert not marker.exists()
    assert not (tmp_path / "dest").exists()  # refused before extraction


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
# member names


@pytest.mark.parametrize(
    "name", ["../evil.txt", "/abs/evil.txt", "m/../../evil.txt", "C:/evil.txt", "m\\..\\evil.txt"]
)
def test_member_names_escaping_the_folder_are_refused(tmp_path, name):
    members = {"manifest.dill": _plain_manifest(), "m/params.dill": _plain_params(), name: b"x"}
    path = _zip(tmp_path / "bad.zip", members)
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(UnsafeArchiveError):
        read_archive(path, dest)
    with pytest.raises(UnsafeArchiveError):
        read_manifest(path)
    assert not dest.exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()


def test_symlink_member_is_refused(tmp_path):
    path = _zip(
        tmp_path / "link.zip",
        {"manifest.dill": _plain_manifest(), "m/params.dill": _plain_params()},
        symlinks={"m/link": "/etc/passwd"},
    )
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        read_archive(path, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_manifest_listing_a_path_as_model_is_refused(tmp_path):
    manifest = pickle.dumps({"models": ["../m"], "version": "1.0"})
    path = _zip(tmp_path / "x.zip", {"manifest.dill": manifest, "m/params.dill": _plain_params()})
    with pytest.raises(UnsafeArchiveError):
        read_archive(path, tmp_path / "dest")


# ---------------------------------------------------------------------------------------------
# broken files


def test_missing_truncated_and_non_zip_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_archive(tmp_path / "nope.zip", tmp_path / "d")
    good = _make_archive(tmp_path)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.zip"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveFormatError, match="truncated"):
        read_archive(trunc, tmp_path / "d1")
    text = tmp_path / "text.zip"
    text.write_text("this is not a zip file")
    with pytest.raises(ArchiveFormatError, match="not a readable zip"):
        read_manifest(text)
    # a member whose data were damaged after the central directory was written
    corrupt = tmp_path / "corrupt.zip"
    blob = bytearray(data)
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo("autoencoder/ckpt/state/d/blob")
    start = info.header_offset + 30 + len(info.filename.encode())
    blob[start : start + 4] = b"\xff\xff\xff\xff"
    corrupt.write_bytes(bytes(blob))
    with pytest.raises(ArchiveFormatError):
        read_archive(corrupt, tmp_path / "d2")


def test_missing_manifest_or_params(tmp_path):
    no_manifest = _zip(tmp_path / "a.zip", {"m/params.dill": _plain_params()})
    with pytest.raises(ArchiveFormatError, match="no manifest"):
        read_archive(no_manifest, tmp_path / "d")
    no_params = _zip(tmp_path / "b.zip", {"manifest.dill": _plain_manifest()})
    with pytest.raises(ArchiveFormatError, match="params"):
        read_archive(no_params, tmp_path / "d")
    no_n = _zip(
        tmp_path / "c.zip",
        {"manifest.dill": _plain_manifest(), "m/params.dill": pickle.dumps({"gridsize": 1})},
    )
    with pytest.raises(ArchiveFormatError, match="missing required fields.*Cannot reconstruct"):
        read_archive(no_n, tmp_path / "d")


# ---------------------------------------------------------------------------------------------
# backends and the real TensorFlow archive


def test_tf_archive_loaded_by_jax_raises_descriptive_error(tmp_path):
    with pytest.raises(ArchiveBackendError) as info:
        read_archive(TF_SMALL, tmp_path / "d", expected_backend="jax")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.writer == "tensorflow" and err.loader == "jax"
    msg = str(err)
    assert "'tensorflow'" in msg and "'jax'" in msg and "pinn-jax convert <in> <out>" in msg
    assert not (tmp_path / "d").exists()


def test_jax_archive_loaded_by_other_backend(tmp_path):
    path = _make_archive(tmp_path)
    with pytest.raises(ArchiveBackendError, match="written by the 'jax' backend.*'pytorch'.*backend='jax'"):
        read_archive(path, tmp_path / "d", expected_backend="pytorch")


def test_real_tf_manifest_and_params_read_without_tensorflow(tmp_path):
    manifest = read_manifest(TF_SMALL)
    assert manifest == {
        "models": ["autoencoder", "diffraction_to_obj"],
        "version": "1.0",
        "backend": "tensorflow",
    }
    contents = read_archive(TF_SMALL, tmp_path / "tf", expected_backend="tensorflow")
    assert contents.backend == "tensorflow" and contents.version == "1.0"
    for name in ("autoencoder", "diffraction_to_obj"):
        p = contents.models[name].params
        assert len(p) == 73 and "_version" not in p  # 74 keys in params.dill minus _version
        assert p["N"] == 64 and p["gridsize"] == 1 and p["nphotons"] == 1e9
        assert p["intensity_scale"] == 988.211669921875
        assert p["object.big"] is True and p["probe.big"] is True and p["probe.mask"] is False
        assert p["amp_activation"] == "sigmoid" and p["outer_offset_train"] is None
        probe = p["probe"]
        assert type(probe) is np.ndarray and probe.dtype == np.complex64
        assert probe.shape == (64, 64, 1)
        assert abs(np.abs(probe).max() - 2.7234) < 1e-3
        assert (contents.models[name].dir / "model.h5").is_file()
    # the class references in custom_objects.dill are extracted but never unpickled
    raw = (contents.models["autoencoder"].dir / "custom_objects.dill").read_bytes()
    with pytest.raises(UnsafePickleError, match="ptycho"):
        safe_loads(raw)


def test_reference_torch_layout_is_detected(tmp_path):
    members = {
        "manifest.dill": pickle.dumps({"models": ["m"], "version": "2.0-pytorch"}),
        "m/params.dill": _plain_params(model_path=Path("model_dir"), _version="2.0-pytorch"),
        "m/model.pth": b"state",
    }
    path = _zip(tmp_path / "t.zip", members)
    assert read_manifest(path)["backend"] == "pytorch"
    contents = read_archive(path, tmp_path / "d", expected_backend="pytorch")
    assert contents.models["m"].params["model_path"] == "model_dir"
    with pytest.raises(ArchiveBackendError, match="backend='pytorch'"):
        read_archive(path, tmp_path / "d2", expected_backend="jax")


def test_written_archive_is_world_readable_and_keeps_existing_mode(tmp_path):
    models = {"m": ModelEntry({"N": 8, "gridsize": 1, "intensity_scale": 1.0})}
    p = write_archive(tmp_path / ARCHIVE_NAME, models, backend="jax", version="v")
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    os.chmod(p, 0o640)
    write_archive(p, models, backend="jax", version="v2")
    assert stat.S_IMODE(p.stat().st_mode) == 0o640


def test_untagged_unknown_layout_is_reported_as_unknown(tmp_path):
    path = _zip(tmp_path / "u.zip", {"manifest.dill": _plain_manifest("7"), "m/params.dill": _plain_params()})
    assert read_manifest(path)["backend"] == "unknown"
    with pytest.raises(ArchiveBackendError, match="'unknown'.*known backend"):
        read_archive(path, tmp_path / "d", expected_backend="jax")
    assert read_archive(path, tmp_path / "d").models["m"].params["N"] == 64


# ---------------------------------------------------------------------------------------------
# the shared atomic-write helper (archives, RawData.to_file, container NPZs, output PNGs)


def test_atomic_write_replaces_on_success_and_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    with A.atomic_write(target) as fh:
        fh.write(b"first")
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    with pytest.raises(RuntimeError, match="mid-write"):
        with A.atomic_write(target) as fh:
            fh.write(b"partial second version")
            raise RuntimeError("mid-write failure")
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # temporary file removed
    with A.atomic_write(target) as fh:
        fh.write(b"second")
    assert target.read_bytes() == b"second"


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
