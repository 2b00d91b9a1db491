"""Reading NPZ data files safely: what a path is, and members stored as pickles.

:func:`check_npz_file` looks at a file's first bytes before numpy reads it and names what it is
when it is not an NPZ (text, HDF5, a ``.npy`` under an ``.npz`` name, empty, truncated);
:func:`open_npz` / :func:`read_npz_member` turn numpy's and zipfile's errors into a
:class:`DataFileError` naming the file and the member; ``_load_member`` reads a member the
reference stored as a pickle through the restricted unpickler
(:func:`backend_api.safe_pickle.safe_loads`). Used by :mod:`backend_api.raw_data`, which
re-exports the public names.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .safe_pickle import safe_loads


# ---------------------------------------------------------------------------------------------
# Data files: what a path is, checked by its first bytes before numpy reads it
# ---------------------------------------------------------------------------------------------

class DataFileError(ValueError):
    """A data file that cannot be used: not an NPZ archive, empty, truncated or corrupt, or
    holding values the contract refuses. The message starts with the file's path."""


_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"
# Errors numpy/zipfile/zlib raise on damaged archive bytes.
_CORRUPT_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, struct.error)


def _what_it_is(head: bytes) -> str:
    """A few words naming a non-NPZ file from its first bytes."""
    if head.startswith(_HDF5_MAGIC):
        return "not an NPZ archive: it is an HDF5 file (read it with h5py and save the arrays " \
               "with numpy.savez)"
    if head.startswith(_NPY_MAGIC):
        return ".npy array, not an NPZ archive (a single array saved with numpy.save; the " \
               "contract needs numpy.savez with named arrays)"
    if head.startswith(b"\x1f\x8b"):
        return "not an NPZ archive: it is a gzip file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "not an NPZ archive: it is a text file"
    return f"not an NPZ archive (it starts with the bytes {head[:8]!r})"


def check_npz_file(path) -> Path:
    """Check that ``path`` is a readable NPZ (zip) archive; return it as a ``Path``.

    Raises ``FileNotFoundError`` when it does not exist and :class:`DataFileError` (naming the
    file) when it is a directory, empty, another format (by its magic bytes) or a zip archive
    whose central directory cannot be read (truncated or corrupt).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such NPZ file")
    if path.is_dir():
        raise DataFileError(f"{path}: is a directory, not an NPZ file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise DataFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise DataFileError(f"{path}: empty file (0 bytes), not an NPZ archive")
    if not head.startswith(_ZIP_MAGICS):
        raise DataFileError(f"{path}: {_what_it_is(head)}")
    try:
        with zipfile.ZipFile(path) as zf:
            zf.infolist()
    except _CORRUPT_ERRORS as exc:
        raise DataFileError(f"{path}: truncated or corrupt NPZ: {exc} ({size} bytes)") from None
    return path


def open_npz(path, *, allow_pickle: bool = False):
    """:func:`check_npz_file`, then ``np.load``: an open ``NpzFile`` (use it as a context
    manager). Read members with :func:`read_npz_member` so damaged ones are named."""
    path = check_npz_file(path)
    try:
        return np.load(path, allow_pickle=allow_pickle)
    except _CORRUPT_ERRORS as exc:
        raise DataFileError(f"{path}: truncated or corrupt NPZ: {exc}") from None


def read_npz_member(path, npz, key: str) -> np.ndarray:
    """``npz[key]``, with damaged bytes reported as :class:`DataFileError` naming file and key.

    A pickled (object) member while pickles are not allowed stays a plain ``ValueError``
    naming the key (callers handle it).
    """
    try:
        return npz[key]
    except _CORRUPT_ERRORS as exc:
        raise DataFileError(f"{path}: truncated or corrupt NPZ: array '{key}' cannot be read "
                            f"({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise
        raise DataFileError(f"{path}: truncated or corrupt NPZ: array '{key}' cannot be read "
                            f"({exc})") from None


def map_npz_member(path, key: str) -> np.ndarray | None:
    """A read-only ``np.memmap`` of NPZ member ``key`` when it can be mapped, else None.

    ``np.savez`` stores each array uncompressed as a ``.npy`` file inside the zip, so its bytes
    lie contiguously in the archive: the map starts after the zip local header and the ``.npy``
    header, and only the pages a caller touches are read (a 16 GB scan costs no private memory).
    Compressed members (``np.savez_compressed``), object arrays and members that are not there
    give None (read them with :func:`read_npz_member`). Damaged headers raise
    :class:`DataFileError` naming the file and the member.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            try:
                info = zf.getinfo(f"{key}.npy")
            except KeyError:
                return None
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            with open(path, "rb") as fh:
                fh.seek(info.header_offset)
                local = fh.read(30)
                if len(local) != 30 or local[:4] != b"PK\x03\x04":
                    raise DataFileError(f"{path}: truncated or corrupt NPZ: array '{key}' has no zip "
                                        "local header where the directory says")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                data_start = info.header_offset + 30 + name_len + extra_len
                fh.seek(data_start)
                version = np.lib.format.read_magic(fh)
                reader = {(1, 0): np.lib.format.read_array_header_1_0,
                          (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if reader is None:
                    return None
                shape, fortran, dtype = reader(fh)
                offset = fh.tell()
    except DataFileError:
        raise
    except (ValueError, *_CORRUPT_ERRORS) as exc:
        raise DataFileError(f"{path}: truncated or corrupt NPZ: array '{key}' cannot be mapped "
                            f"({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        return None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + nbytes > data_start + info.file_size:
        raise DataFileError(f"{path}: truncated or corrupt NPZ: array '{key}' ({shape}, {dtype}) does not "
                            "fit in its zip member")
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape),
                     order="F" if fortran else "C")


# ---------------------------------------------------------------------------------------------
# NPZ members that upstream stores as pickles
# ---------------------------------------------------------------------------------------------
def _load_member(path: Path, npz, key: str, allow_pickle: bool):
    """Load one NPZ member; pickled members go through the restricted unpickler."""
    try:
        return read_npz_member(path, npz, key)
    except DataFileError:
        raise
    except ValueError:
        if allow_pickle:
            raise
    try:
        with zipfile.ZipFile(path) as zf:
            raw = zf.read(key + ".npy")
        fp = io.BytesIO(raw)
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(fp)
        else:
            np.lib.format.read_array_header_2_0(fp)
    except (*_CORRUPT_ERRORS, ValueError) as exc:
        raise DataFileError(f"{path}: truncated or corrupt NPZ: array '{key}' cannot be read "
                            f"({type(exc).__name__}: {exc})") from None
    try:
        # The archive's restricted unpickler: plain values and numpy arrays only, never code.
        return safe_loads(fp.read(), allow_object_arrays=True)
    except ValueError as exc:
        raise ValueError(f"{key}: pickled entry refused by the safe loader ({exc}); expected "
                         f"plain values only: re-save the file without pickles or pass "
                         f"allow_pickle=True for a trusted file") from None
