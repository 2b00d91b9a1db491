"""backend_api.fileio: the one atomic writer -- whole files or none, and the mode a plain
open() would give (the umask decides who may read), never mkstemp's 0600."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from backend_api import fileio


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing_it(umask_027):
    assert fileio.current_umask() == 0o027
    assert os.umask(0o027) == 0o027  # still what the fixture set


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_new_files_get_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "wb"):
            pass
        fileio.write_bytes(tmp_path / "atomic", b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "atomic") == _mode(tmp_path / "plain") == 0o666 & ~umask


def test_a_replaced_file_keeps_its_mode(tmp_path, umask_027):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o604)
    fileio.write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o604


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="midway"):
        with fileio.atomic_write(target) as fh:
            fh.write(b"half")
            raise RuntimeError("midway")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_write_json_round_trips_and_refuses_before_writing(tmp_path, umask_027):
    target = tmp_path / "r.json"
    fileio.write_json(target, {"a": [1, 2.5], "b": "x"})
    assert json.loads(target.read_text()) == {"a": [1, 2.5], "b": "x"}
    assert target.read_text().endswith("\n") and _mode(target) == 0o640
    with pytest.raises(TypeError):
        fileio.write_json(tmp_path / "bad.json", {"a": object()})
    assert not (tmp_path / "bad.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    fileio.write_json(tmp_path / "np.json", {"a": np.float32(1.5)}, default=float)
    assert json.loads((tmp_path / "np.json").read_text()) == {"a": 1.5}


def test_every_writer_of_ours_uses_fileio(tmp_path):
    """No module of ours makes its own temporary file for a write (they all go through
    backend_api.fileio, which fixes the mode and cleans up after killed writers)."""
    from pathlib import Path

    root = Path(fileio.__file__).resolve().parents[1]
    offenders = []
    for pkg in ("backend_api", "pinn_jax"):
        for path in (root / pkg).rglob("*.py"):
            if path.name == "fileio.py":
                continue
            text = path.read_text()
            if "mkstemp(" in text or "os.replace(" in text:
                offenders.append(str(path.relative_to(root)))
    assert offenders == []
