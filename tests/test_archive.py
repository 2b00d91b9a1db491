"""backend_api.archive: the wts.h5.zip format, safe reading, atomic writing."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from backend_api import archive as A
from backend_api import fileio as F
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
# format version


def _rewrite_member(path: Path, name: str, data: bytes) -> None:
    """Rewrite the archive at ``path`` with member ``name`` replaced by ``data``."""
    with zipfile.ZipFile(path) as zf:
        members = [(info, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, blob in members:
            zf.writestr(info, data if info.filename == name else blob)


def _with_format_version(tmp_path: Path, version) -> Path:
    path = _make_archive(tmp_path)
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    manifest["format_version"] = version
    _rewrite_member(path, "manifest.json", json.dumps(manifest).encode())
    return path


def test_newer_format_version_is_refused_naming_both_versions(tmp_path):
    path = _with_format_version(tmp_path, A.FORMAT_VERSION + 1)
    before = path.read_bytes()
    for read in (lambda: read_manifest(path), lambda: read_archive(path, tmp_path / "dest")):
        with pytest.raises(A.ArchiveVersionError) as err:
            read()
        msg = str(err.value)
        assert str(path) in msg
        assert f"format version {A.FORMAT_VERSION + 1} is newer" in msg
        assert f"(format version {A.FORMAT_VERSION})" in msg
        assert err.value.found == A.FORMAT_VERSION + 1 and err.value.supported == A.FORMAT_VERSION
        assert isinstance(err.value, ArchiveFormatError)
    assert not (tmp_path / "dest").exists()
    assert path.read_bytes() == before


@pytest.mark.parametrize("bad", ["2", 0, -1, True, 1.5, None])
def test_malformed_format_version_is_refused(tmp_path, bad):
    path = _with_format_version(tmp_path, bad)
    with pytest.raises(ArchiveFormatError, match=r"format_version .* is not a positive integer"):
        read_archive(path, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_current_format_version_and_reference_archives_without_one_still_load(tmp_path):
    (tmp_path / "a").mkdir()
    assert read_manifest(_with_format_version(tmp_path / "a", A.FORMAT_VERSION))["backend"] == "jax"
    ref = _zip(tmp_path / "ref.zip", {"manifest.dill": _plain_manifest(), "m/params.dill": _plain_params()})
    assert read_archive(ref, tmp_path / "d").models["m"].params["N"] == 64


# ---------------------------------------------------------------------------------------------
# extraction limits


def _patch_declared_size(path: Path, member: str, size: int, crc: int | None = None) -> None:
    """Overwrite the uncompressed size (and optionally the CRC) that ``member`` declares, in its
    local header and in the central directory, leaving its data as they are."""
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        start_dir = zf.start_dir
    blob[info.header_offset + 22 : info.header_offset + 26] = size.to_bytes(4, "little")
    pos = start_dir
    while blob[pos : pos + 4] == b"PK\x01\x02":
        n, m, k = (int.from_bytes(blob[pos + o : pos + o + 2], "little") for o in (28, 30, 32))
        if blob[pos + 46 : pos + 46 + n].decode() == member:
            blob[pos + 24 : pos + 28] = size.to_bytes(4, "little")
            if crc is not None:
                blob[pos + 16 : pos + 20] = crc.to_bytes(4, "little")
                blob[info.header_offset + 14 : info.header_offset + 18] = crc.to_bytes(4, "little")
            break
        pos += 46 + n + m + k
    else:
        raise AssertionError(f"{member} not in the central directory")
    path.write_bytes(bytes(blob))


def _limits_archive(tmp_path: Path, payload: dict[str, bytes]) -> Path:
    models = {"m": ModelEntry({"N": 8, "gridsize": 1, "intensity_scale": 1.0}, payload)}
    return write_archive(tmp_path / "src" / ARCHIVE_NAME, models, backend="jax", version="v")


def _assert_refused_untouched(path: Path, dest: Path, before: bytes) -> None:
    assert not dest.exists()  # nothing extracted, not even the folder
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [ARCHIVE_NAME]


def test_member_declaring_4_gib_is_refused_before_extraction(tmp_path):
    path = _limits_archive(tmp_path, {"big.bin": b"x" * 1000})
    _patch_declared_size(path, "m/big.bin", 0xFFFF0000)  # ~4 GiB, data still 1000 bytes
    before = path.read_bytes()
    dest = tmp_path / "dest"
    with pytest.raises(A.ArchiveLimitError) as err:
        read_archive(path, dest)
    msg = str(err.value)
    assert str(path) in msg and "'m/big.bin'" in msg and "4294901760 bytes" in msg
    assert "per-member limit" in msg and "max_member_bytes" in msg and A.ENV_MAX_MEMBER_BYTES in msg
    _assert_refused_untouched(path, dest, before)


def test_member_over_a_lowered_member_limit_is_refused(tmp_path):
    path = _limits_archive(tmp_path, {"a.bin": os.urandom(600), "b.bin": os.urandom(100)})
    before = path.read_bytes()
    dest = tmp_path / "dest"
    with pytest.raises(A.ArchiveLimitError, match=r"'m/a.bin' declares 600 bytes .* limit of 500 bytes"):
        read_archive(path, dest, limits=A.ExtractionLimits(max_member_bytes=500))
    _assert_refused_untouched(path, dest, before)


def test_total_over_the_total_limit_is_refused(tmp_path):
    path = _limits_archive(tmp_path, {f"{i}.bin": os.urandom(400) for i in range(4)})
    before = path.read_bytes()
    dest = tmp_path / "dest"
    limits = A.ExtractionLimits(max_member_bytes=500, max_total_bytes=1500)
    with pytest.raises(A.ArchiveLimitError, match=r"declare .*\(1\d\d\d bytes\) uncompressed in total, over the limit of .*\(1500 bytes\).*max_total_bytes"):
        read_archive(path, dest, limits=limits)
    _assert_refused_untouched(path, dest, before)


def test_highly_compressed_member_is_refused_by_the_ratio_limit(tmp_path):
    # 2 MiB of zeros deflate to ~2 KiB: ratio ~1000, over the default 200
    path = _limits_archive(tmp_path, {"zeros.bin": bytes(2 << 20)})
    before = path.read_bytes()
    dest = tmp_path / "dest"
    with pytest.raises(A.ArchiveLimitError, match=r"'m/zeros.bin' expands \d+ -> 2097152 bytes \(ratio \d+\).*200"):
        read_archive(path, dest)
    _assert_refused_untouched(path, dest, before)


def test_member_whose_data_exceed_its_declared_size_is_not_extracted(tmp_path):
    """The declared size is what the limits checked; the real data are 64x larger. zipfile
    stops at the declared size and the CRC then fails: everything extracted so far is removed."""
    data = os.urandom(64 * 1024)
    path = _limits_archive(tmp_path, {"a_first.bin": b"extracted before the liar", "z_liar.bin": data})
    _patch_declared_size(path, "m/z_liar.bin", 1024)
    before = path.read_bytes()
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveFormatError, match="'m/z_liar.bin' cannot be extracted"):
        read_archive(path, dest)
    _assert_refused_untouched(path, dest, before)
    # a destination that already existed is kept, emptied of what the failed extraction wrote
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ArchiveFormatError):
        read_archive(path, dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_bounded_copy_stops_at_the_declared_size():
    """Independent of zipfile's own truncation: a member stream yielding more than the member
    declares is cut off with an error after at most declared + 1 bytes were read."""

    class Liar:
        def __init__(self, payload: bytes) -> None:
            self.stream = io.BytesIO(payload)
            self.asked: list[int] = []

        def open(self, info):
            return self

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n):
            self.asked.append(n)
            return self.stream.read(n)

    info = zipfile.ZipInfo("m/x.bin")
    info.file_size = 100
    liar = Liar(b"y" * 5000)
    out = io.BytesIO()
    with pytest.raises(A.ArchiveLimitError, match="decompresses to more than the 100 bytes it declares"):
        A._copy_bounded(liar, info, out, Path("a.zip"))
    assert len(out.getvalue()) <= 100 and max(liar.asked) <= 101


def test_limits_can_be_raised_by_keyword_and_environment(tmp_path, monkeypatch):
    path = _limits_archive(tmp_path, {"zeros.bin": bytes(2 << 20)})
    contents = read_archive(path, tmp_path / "d1", limits=A.ExtractionLimits(max_ratio=5000))
    assert (contents.models["m"].dir / "zeros.bin").stat().st_size == 2 << 20
    monkeypatch.setenv(A.ENV_MAX_RATIO, "5000")
    assert read_archive(path, tmp_path / "d2").models["m"].params["N"] == 8
    # the environment lowers them too, and an explicit keyword wins over it
    monkeypatch.setenv(A.ENV_MAX_MEMBER_BYTES, "1K")
    with pytest.raises(A.ArchiveLimitError, match="limit of 1 KiB"):
        read_archive(path, tmp_path / "d3")
    assert not (tmp_path / "d3").exists()
    read_archive(path, tmp_path / "d4", limits=A.ExtractionLimits(max_ratio=math.inf))


@pytest.mark.parametrize(
    "var, value",
    [("PINN_ARCHIVE_MAX_MEMBER_BYTES", "lots"), ("PINN_ARCHIVE_MAX_TOTAL_BYTES", "-5"),
     ("PINN_ARCHIVE_MAX_TOTAL_BYTES", "0"), ("PINN_ARCHIVE_MAX_RATIO", "0"), ("PINN_ARCHIVE_MAX_RATIO", "x")],
)
def test_bad_limit_environment_variables_are_named(tmp_path, monkeypatch, var, value):
    path = _limits_archive(tmp_path, {"a.bin": b"1"})
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=f"\\${var}={value!r}"):
        read_archive(path, tmp_path / "d")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("kw", [{"max_member_bytes": 0}, {"max_total_bytes": 1.5}, {"max_ratio": -1},
                                {"max_member_bytes": True}, {"max_ratio": float("nan")}])
def test_bad_extraction_limits_are_refused(kw):
    with pytest.raises(ValueError, match=f"ExtractionLimits.{next(iter(kw))}"):
        A.ExtractionLimits(**kw)


def test_size_suffixes_of_the_environment():
    env = {A.ENV_MAX_MEMBER_BYTES: "3G", A.ENV_MAX_TOTAL_BYTES: "1.5GiB", A.ENV_MAX_RATIO: "50"}
    limits = A.ExtractionLimits.from_env(env)
    assert limits == A.ExtractionLimits(max_member_bytes=3 << 30, max_total_bytes=3 << 29, max_ratio=50.0)
    assert A.ExtractionLimits.from_env({}) == A.ExtractionLimits()


# ---------------------------------------------------------------------------------------------
# files that are not archives


def _bad_model_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """(path, what the message must say) for one kind of file that is not a model archive."""
    p = tmp_path / "model" / ARCHIVE_NAME
    p.parent.mkdir()
    if kind == "text":
        p.write_text("N = 64\ngridsize = 1\n")
        return p, "it is a text file, not a zip archive"
    if kind == "hdf5":
        import h5py

        with h5py.File(p, "w") as h5:
            h5.create_dataset("w", data=np.arange(4))
        return p, "it is an HDF5 file"
    if kind == "npy":
        with open(p, "wb") as fh:
            np.save(fh, np.arange(4))
        return p, "it is a numpy .npy file"
    if kind == "empty":
        p.touch()
        return p, "the file is empty"
    if kind == "truncated":
        (tmp_path / "good").mkdir()
        data = _make_archive(tmp_path / "good").read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p, "it starts like a zip archive but is truncated or corrupt"
    if kind == "binary":
        p.write_bytes(bytes(range(256)) * 4)
        return p, "its content is not a zip archive"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["text", "hdf5", "npy", "empty", "truncated", "binary"])
@pytest.mark.parametrize("given", ["file", "folder"])
def test_a_file_that_is_not_an_archive_is_named(tmp_path, kind, given):
    path, what = _bad_model_file(tmp_path, kind)
    before = path.read_bytes()
    arg = path if given == "file" else path.parent
    for read in (lambda: read_manifest(arg), lambda: read_archive(arg, tmp_path / "dest")):
        with pytest.raises(ArchiveFormatError) as err:
            read()
        msg = str(err.value)
        assert msg.startswith(f"{path} ({len(before)} bytes) is not a readable zip archive: {what}")
        assert "expected a wts.h5.zip model archive" in msg and "\n" not in msg
    assert not (tmp_path / "dest").exists()
    assert path.read_bytes() == before


def test_folder_without_an_archive_is_named(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    for read in (lambda: read_manifest(folder), lambda: read_archive(folder, tmp_path / "dest"),
                 lambda: A.bundle_archive_path(folder)):
        with pytest.raises(A.ArchiveNotFoundError) as err:
            read()
        assert isinstance(err.value, ValueError) and isinstance(err.value, FileNotFoundError)
        assert str(folder / ARCHIVE_NAME) in str(err.value)
    assert "is a directory without a wts.h5.zip" in str(
        pytest.raises(A.ArchiveNotFoundError, read_manifest, folder).value)
    assert not (tmp_path / "dest").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["weights.h5"]


# ---------------------------------------------------------------------------------------------
# stale temporary files of killed writers


def _dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _temp_name(prefix: str, pid: int, host: str | None = None, rand: str = "abcd_123", suffix: str = "") -> str:
    return f"{prefix}{pid}@{host or F._host_tag()}.{rand}{suffix}"


def test_stale_temps_of_a_dead_writer_are_removed_by_the_next_write(tmp_path):
    pid = _dead_pid()
    stale_file = tmp_path / _temp_name(".wts.h5.zip.", pid, suffix=".tmp")
    stale_file.write_bytes(b"half an archive")
    stale_dir = tmp_path / _temp_name(".pinn_jax_save_", pid, rand="zz9_zz9z")
    (stale_dir / "state" / "d").mkdir(parents=True)
    (stale_dir / "state" / "d" / "blob").write_bytes(b"orbax data")
    models = {"m": ModelEntry({"N": 8, "gridsize": 1, "intensity_scale": 1.0}, {"w": b"1"})}
    write_archive(tmp_path, models, backend="jax", version="v")
    assert not stale_file.exists()
    assert stale_dir.is_dir()  # a folder prefix is cleaned by the writer using that prefix
    with A.writer_temp_dir(tmp_path, ".pinn_jax_save_") as mine:
        assert not stale_dir.exists()
        assert mine.name.startswith(f".pinn_jax_save_{os.getpid()}@{F._host_tag()}.")
    assert not mine.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [ARCHIVE_NAME]


def test_temp_of_a_running_writer_is_kept(tmp_path):
    """A temporary file of a process that is still running (here a child that created it and
    sleeps) is kept; once that process is gone the same file is stale and removed."""
    code = textwrap.dedent(f"""
        import os, sys, time
        from backend_api import fileio as F
        name = ".wts.h5.zip." + F._writer_tag() + ".live_123.tmp"
        with open(os.path.join({str(tmp_path)!r}, name), "wb") as fh:
            fh.write(b"being written")
        print(name, flush=True)
        time.sleep(60)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(A.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        name = child.stdout.readline().strip()
        live = tmp_path / name
        assert live.is_file() and f".{child.pid}@" in name
        assert A.remove_stale_temps(tmp_path, ".wts.h5.zip.", ".tmp") == []
        with A.atomic_write(tmp_path / ARCHIVE_NAME) as fh:
            fh.write(b"new")
        assert live.read_bytes() == b"being written"
    finally:
        child.kill()
        child.wait()
    assert A.remove_stale_temps(tmp_path, ".wts.h5.zip.", ".tmp") == [live]
    assert sorted(p.name for p in tmp_path.iterdir()) == [ARCHIVE_NAME]


@pytest.mark.skipif(F.fcntl is None, reason="needs POSIX locks")
def test_temp_locked_by_a_live_writer_is_kept_even_if_its_pid_looks_dead(tmp_path):
    """The lock is the second guard (a writer in another PID namespace of this host)."""
    import fcntl

    held = tmp_path / _temp_name(".wts.h5.zip.", _dead_pid(), suffix=".tmp")
    held.write_bytes(b"locked")
    with open(held, "rb") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        assert A.remove_stale_temps(tmp_path, ".wts.h5.zip.", ".tmp") == []
        assert held.read_bytes() == b"locked"
    assert A.remove_stale_temps(tmp_path, ".wts.h5.zip.", ".tmp") == [held]


def test_foreign_and_unprovable_temps_are_never_touched(tmp_path):
    pid = _dead_pid()
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not ours")
    keep = {
        ".wts.h5.zip.abcd_123.tmp": "file",  # mkstemp name of older versions: no writer in it
        _temp_name(".wts.h5.zip.", pid, host="another-host", suffix=".tmp"): "file",  # shared FS
        _temp_name(".wts.h5.zip.", os.getpid(), suffix=".tmp"): "file",  # this process
        _temp_name(".wts.h5.zip.", pid, suffix=".tmp.bak"): "file",
        _temp_name(".wts.h5.zip.", pid, rand="abc", suffix=".tmp"): "file",
        _temp_name(".wts.h5.zip.", pid, suffix=".tmp") + "x": "file",
        _temp_name(".other.zip.", pid, suffix=".tmp"): "file",
        _temp_name("wts.h5.zip.", pid, suffix=".tmp"): "file",
        _temp_name(".pinn_jax_save_", pid) + ".old": "dir",
        _temp_name(".pinn_jax_saved_", pid): "dir",
        _temp_name(".wts.h5.zip.", pid, rand="link_123", suffix=".tmp"): "symlink",
        _temp_name(".pinn_jax_save_", pid, rand="link_dir"): "symlink",
    }
    for name, kind in keep.items():
        p = tmp_path / name
        if kind == "file":
            p.write_bytes(name.encode())
        elif kind == "dir":
            p.mkdir()
            (p / "inside").write_bytes(b"x")
        else:
            p.symlink_to(outside)
    models = {"m": ModelEntry({"N": 8, "gridsize": 1, "intensity_scale": 1.0})}
    write_archive(tmp_path, models, backend="jax", version="v")
    with A.writer_temp_dir(tmp_path, ".pinn_jax_save_"):
        pass
    assert A.remove_stale_temps(tmp_path, ".wts.h5.zip.", ".tmp") == []
    assert A.remove_stale_temps(tmp_path, ".pinn_jax_save_") == []
    for name, kind in keep.items():
        p = tmp_path / name
        if kind == "file":
            assert p.read_bytes() == name.encode(), name
        elif kind == "dir":
            assert (p / "inside").read_bytes() == b"x", name
        else:
            assert p.is_symlink(), name
    assert outside.read_bytes() == b"not ours"


def test_atomic_write_temp_names_carry_the_writer_and_are_locked(tmp_path):
    target = tmp_path / "f.bin"
    with A.atomic_write(target) as fh:
        (tmp,) = [p for p in tmp_path.iterdir()]
        assert F._temp_pattern(".f.bin.", ".tmp").match(tmp.name)
        assert tmp.name.startswith(f".f.bin.{os.getpid()}@{F._host_tag()}.")
        if F.fcntl is not None:
            with open(tmp, "rb") as other:  # another open file cannot take the lock
                assert not F._lock_held(other.fileno())
        fh.write(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
