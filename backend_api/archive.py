"""The ``wts.h5.zip`` model archive, backend-neutral.

Layout (every member is a plain file; empty payload directories get a directory entry)::

    manifest.json            {"format", "format_version", "backend", "version", "models"}
    manifest.dill            plain pickle of {"models": [...], "version": ..., "backend": ...}
    <model>/params.json      params snapshot (legacy cfg + intensity_scale + _version), JSON
    <model>/params.dill      the same snapshot as a plain pickle (numpy arrays allowed)
    <model>/<payload...>     whatever the writing backend stores (files or directory trees)

The ``.dill`` members keep the outer layout of the reference archives (``ptycho.model_manager``),
so the reference's loader can read our manifest and params; they are written with the standard
:mod:`pickle` (protocol 4), which ``dill.load`` reads too.

Reading never executes code from the archive: JSON is preferred, and a foreign ``.dill`` member
(a TensorFlow or PyTorch archive) goes through :func:`safe_loads`, a restricted unpickler that
builds only plain containers, numbers, strings and numpy arrays of numeric/bool/str dtypes
(:mod:`backend_api.safe_pickle`; the params JSON encoding is :mod:`backend_api.params_codec`,
the error classes :mod:`backend_api.archive_errors`, all re-exported here).
Member names that would escape the extraction folder are refused before anything is written.

Writing is atomic: the zip is written to a temporary file in the target folder and moved into
place with :func:`os.replace`, so a failure leaves a previous archive untouched. Temporary
files and folders carry the writer's PID and host name (``.wts.h5.zip.<pid>@<host>.XXXXXXXX.tmp``)
and are locked while written; the next write into the same folder removes those whose writer is
gone (see :func:`remove_stale_temps`).

Reading checks before it writes anything: the manifest's ``format_version`` must not be newer
than :data:`FORMAT_VERSION`, and every member's declared size, the total and the compression
ratio must stay within :class:`ExtractionLimits` (a zip bomb is refused, not extracted).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import stat
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union


# the project's one atomic writer lives in fileio; re-exported here, where it used to be
from .fileio import atomic_write, remove_stale_temps, writer_temp_dir

# errors, the params JSON codec and the restricted unpickler live in their own modules;
# re-exported here, where callers have always imported them from
from .archive_errors import (
    ArchiveBackendError,
    ArchiveError,
    ArchiveFormatError,
    ArchiveLimitError,
    ArchiveNotFoundError,
    ArchiveVersionError,
    UnsafeArchiveError,
    UnsafePickleError,
)
from .archive_limits import (  # noqa: F401 - the zip-bomb guards of reading; re-exported here
    _KIB,
    _GIB,
    ENV_MAX_MEMBER_BYTES,
    ENV_MAX_TOTAL_BYTES,
    ENV_MAX_RATIO,
    _RATIO_FLOOR_BYTES,
    _COPY_CHUNK,
    _SIZE_UNITS,
    ExtractionLimits,
    _parse_bytes,
    _resolve_limits,
    _fmt_bytes,
    _override_hint,
    _check_member_size,
    _check_sizes,
    _copy_bounded,
    _make_dirs,
    _undo_created,
)
from .params_codec import params_from_json, params_to_json
from .safe_pickle import _to_plain, safe_loads

__all__ = [
    "ARCHIVE_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "REQUIRED_PARAMS",
    "ArchiveError",
    "ArchiveFormatError",
    "ArchiveVersionError",
    "ArchiveNotFoundError",
    "ArchiveLimitError",
    "ExtractionLimits",
    "ArchiveBackendError",
    "UnsafeArchiveError",
    "UnsafePickleError",
    "ModelEntry",
    "ExtractedModel",
    "ArchiveContents",
    "write_archive",
    "read_archive",
    "read_manifest",
    "safe_loads",
    "params_to_json",
    "params_from_json",
    "detect_backend",
    "resolve_archive_path",
    "atomic_write",
    "remove_stale_temps",
    "writer_temp_dir",
]

ARCHIVE_NAME = "wts.h5.zip"
#: identifies our manifest.json schema (independent of the backend's own ``version`` string)
FORMAT_NAME = "backend_api/wts.h5.zip"
FORMAT_VERSION = 1
#: keys a params snapshot must hold so that any backend can rebuild the architecture
REQUIRED_PARAMS = ("N", "gridsize", "intensity_scale")

_MANIFEST_JSON = "manifest.json"
_MANIFEST_DILL = "manifest.dill"
_PARAMS_JSON = "params.json"
_PARAMS_DILL = "params.dill"
_RESERVED_MODEL_FILES = frozenset({_PARAMS_JSON, _PARAMS_DILL})
_PICKLE_PROTOCOL = 4  # what the reference's dill wrote; numpy arrays pickle via _reconstruct
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed so that equal content gives equal bytes



# --------------------------------------------------------------------------------------------
# public data classes

FileSource = Union[bytes, bytearray, memoryview, "os.PathLike[str]", str]


@dataclass(frozen=True)
class ModelEntry:
    """One model to store.

    params: the params snapshot (the full legacy cfg plus ``intensity_scale``); must hold
        ``N``, ``gridsize`` and ``intensity_scale``. Values: None, bool, int, float, complex,
        str, Path, numpy arrays/scalars (or anything with ``__array__``), and lists, tuples and
        str-keyed dicts of these.
    files: member name (relative, ``/``-separated) -> ``bytes`` or a filesystem path. A path to
        a directory is stored recursively under ``<model>/<name>/...``.
    """

    params: Mapping[str, Any]
    files: Mapping[str, FileSource] = field(default_factory=dict)


@dataclass(frozen=True)
class ExtractedModel:
    """A model read back: its name, its params snapshot (``_version`` removed) and the folder
    (``dest_dir/<name>``) holding its extracted files."""

    name: str
    params: dict
    dir: Path


@dataclass(frozen=True)
class ArchiveContents:
    """Result of :func:`read_archive`.

    backend: tag of the backend that wrote the archive (``'jax'``, ``'tensorflow'``,
        ``'pytorch'``, a third-party name, or ``'unknown'``).
    version: the manifest's ``version`` string.
    models: name -> :class:`ExtractedModel`, in manifest order.
    manifest: the normalised manifest dict; path: the archive; root: the extraction folder.
    """

    backend: str
    version: str
    models: dict
    manifest: dict
    path: Path
    root: Path



# --------------------------------------------------------------------------------------------
# member names


_DRIVE = re.compile(r"^[A-Za-z]:")


def _check_relative(name: str, what: str) -> tuple[str, ...]:
    """Split a '/'-separated relative name, refusing anything that could escape its root."""
    if not isinstance(name, str) or not name:
        raise UnsafeArchiveError(f"{what} {name!r}: expected a non-empty relative name")
    if "\x00" in name or "\\" in name or name.startswith("/") or _DRIVE.match(name):
        raise UnsafeArchiveError(
            f"{what} {name!r} is absolute or not a plain '/'-separated relative name"
        )
    parts = tuple(p for p in name.rstrip("/").split("/"))
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeArchiveError(f"{what} {name!r} has an empty, '.' or '..' component")
    return parts


def _check_model_name(name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(f"model name {name!r}: expected str, got {type(name).__name__}")
    try:
        parts = _check_relative(name, "model name")
    except UnsafeArchiveError as exc:
        raise ValueError(str(exc)) from None
    if len(parts) != 1:
        raise ValueError(f"model name {name!r} must not contain '/'")
    if name in (_MANIFEST_JSON, _MANIFEST_DILL) or name.startswith("."):
        raise ValueError(f"model name {name!r} is reserved or hidden")
    return name


# --------------------------------------------------------------------------------------------
# writing


def resolve_archive_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/wts.h5.zip`` when ``path`` is an existing directory."""
    p = Path(path)
    return p / ARCHIVE_NAME if p.is_dir() else p


def _archive_file(path: str | os.PathLike) -> Path:
    """:func:`resolve_archive_path`, with a clear error for a folder that holds no archive."""
    folder = Path(path)
    p = resolve_archive_path(folder)
    if p != folder and not p.exists():
        raise ArchiveNotFoundError(
            f"Model archive not found: {p} ({folder} is a directory without a {ARCHIVE_NAME} "
            "model archive)"
        )
    return p


def bundle_archive_path(model_dir: str | os.PathLike) -> Path:
    """``model_dir/wts.h5.zip``, checked as the reference's ``load_inference_bundle`` does.

    ValueError when ``model_dir`` does not exist or is not a directory; FileNotFoundError
    naming ``wts.h5.zip`` when the archive is missing.
    """
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ValueError(f"Model directory does not exist: {model_dir}")
    if not model_dir.is_dir():
        raise ValueError(f"Model path is not a directory: {model_dir}")
    archive_path = model_dir / ARCHIVE_NAME
    if not archive_path.is_file():
        raise ArchiveNotFoundError(
            f"Model archive not found: {archive_path} (expected {ARCHIVE_NAME} in {model_dir})"
        )
    return archive_path


def _payload_members(model: str, key: str, src: Any) -> list[tuple[str, Any]]:
    """(arcname, bytes | Path | None for an empty dir) for one ``files`` item, checked."""
    _check_relative(key, f"model {model!r} file name")
    if key.rstrip("/") in _RESERVED_MODEL_FILES:
        raise ValueError(f"model {model!r}: file name {key!r} is reserved for the params snapshot")
    base = f"{model}/{key.rstrip('/')}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return [(base, bytes(src))]
    if not isinstance(src, (str, os.PathLike)):
        raise ValueError(
            f"model {model!r} file {key!r}: expected bytes or a path, got {type(src).__name__}"
        )
    p = Path(src)
    if p.is_symlink():
        raise ValueError(f"model {model!r} file {key!r}: {p} is a symlink; store real files")
    if p.is_file():
        return [(base, p)]
    if not p.is_dir():
        raise FileNotFoundError(f"model {model!r} file {key!r}: {p} does not exist")
    out: list[tuple[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames.sort()
        d = Path(dirpath)
        rel = d.relative_to(p).as_posix()
        prefix = base if rel == "." else f"{base}/{rel}"
        for name in sorted(dirnames):
            if (d / name).is_symlink():
                raise ValueError(f"model {model!r} file {key!r}: {d / name} is a symlink")
        for name in sorted(filenames):
            f = d / name
            if f.is_symlink() or not f.is_file():
                raise ValueError(f"model {model!r} file {key!r}: {f} is not a regular file")
            out.append((f"{prefix}/{name}", f))
        if not filenames and not dirnames:
            out.append((prefix + "/", None))  # keep empty folders (checkpoint layouts need them)
    return out


def _zipinfo(name: str, is_dir: bool = False) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    if is_dir:
        info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
        info.compress_type = zipfile.ZIP_STORED
    else:
        info.external_attr = (stat.S_IFREG | 0o644) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _add_member(zf: zipfile.ZipFile, name: str, src: Any) -> None:
    if src is None:
        zf.writestr(_zipinfo(name, is_dir=True), b"")
    elif isinstance(src, bytes):
        zf.writestr(_zipinfo(name), src)
    else:
        with open(src, "rb") as fin, zf.open(_zipinfo(name), "w") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)


def write_archive(
    path: str | os.PathLike,
    models: Mapping[str, ModelEntry],
    *,
    backend: str,
    version: str,
) -> Path:
    """Write a ``wts.h5.zip`` archive atomically and return its path.

    path: the archive file (parents are created), or an existing directory, in which case
        ``path/wts.h5.zip`` is written.
    models: model name -> :class:`ModelEntry`, in the order to list them (the reference order
        is ``autoencoder``, ``diffraction_to_obj``).
    backend: tag of the writing backend (``'jax'``, ...); version: the backend's format string.

    Everything is validated before the temporary file is created; a failure while writing
    removes the temporary file and leaves any previous archive at ``path`` untouched.
    """
    if not isinstance(backend, str) or not backend:
        raise ValueError(f"backend: expected a non-empty str, got {backend!r}")
    if not isinstance(version, str) or not version:
        raise ValueError(f"version: expected a non-empty str, got {version!r}")
    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"models: expected a non-empty mapping name -> ModelEntry, got {models!r}")

    members: list[tuple[str, Any]] = []
    names = [_check_model_name(n) for n in models]
    manifest = {"models": names, "version": version, "backend": backend}
    manifest_json = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **manifest}
    members.append((_MANIFEST_JSON, json.dumps(manifest_json, indent=1).encode()))
    members.append((_MANIFEST_DILL, pickle.dumps(manifest, protocol=_PICKLE_PROTOCOL)))
    for name in names:
        entry = models[name]
        if not isinstance(entry, ModelEntry):
            raise ValueError(f"models[{name!r}]: expected a ModelEntry, got {type(entry).__name__}")
        if not isinstance(entry.params, Mapping):
            raise ValueError(f"models[{name!r}].params: expected a dict")
        missing = [k for k in REQUIRED_PARAMS if k not in entry.params]
        if missing:
            raise ValueError(
                f"models[{name!r}].params lacks required keys {missing}; a loader needs N, "
                "gridsize and intensity_scale to rebuild the model"
            )
        params = dict(entry.params)
        params.setdefault("_version", version)
        members.append((f"{name}/{_PARAMS_JSON}", params_to_json(params).encode()))
        plain = _to_plain(params, f"[{name!r}]")
        members.append((f"{name}/{_PARAMS_DILL}", pickle.dumps(plain, protocol=_PICKLE_PROTOCOL)))
        if not isinstance(entry.files, Mapping):
            raise ValueError(f"models[{name!r}].files: expected a mapping name -> bytes | path")
        for key, src in entry.files.items():
            members.extend(_payload_members(name, key, src))
    seen: set[str] = set()
    for arcname, _ in members:
        if arcname.rstrip("/") in seen:
            raise ValueError(f"archive member {arcname!r} would be written twice")
        seen.add(arcname.rstrip("/"))

    target = resolve_archive_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as fh:
        with zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            for arcname, src in members:
                _add_member(zf, arcname, src)
    return target


# --------------------------------------------------------------------------------------------
# reading


_SIGNATURES = (
    (b"\x89HDF\r\n\x1a\n", "it is an HDF5 file (e.g. Keras .h5 weights), not a zip archive"),
    (b"\x93NUMPY", "it is a numpy .npy file, not a zip archive"),
    (b"\x80", "it is a bare pickle, not a zip archive"),
    (b"\x1f\x8b", "it is a gzip file, not a zip archive"),
    (b"PK\x03\x04", "it starts like a zip archive but is truncated or corrupt (its central "
                     "directory is missing or damaged)"),
)


def _describe_non_zip(path: Path, size: int) -> str:
    """What a file that zipfile cannot open looks like, for the error message."""
    if size == 0:
        return "the file is empty"
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the 4096-byte boundary
            return "its content is not a zip archive"
    return "it is a text file, not a zip archive"


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise ArchiveNotFoundError(f"Model archive not found: {path}")
    if path.is_dir():
        raise ArchiveFormatError(f"{path} is a directory, expected a {ARCHIVE_NAME} file")
    try:
        return zipfile.ZipFile(path, "r")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        size = path.stat().st_size
        raise ArchiveFormatError(
            f"{path} ({size} bytes) is not a readable zip archive: {_describe_non_zip(path, size)}; "
            f"expected a {ARCHIVE_NAME} model archive ({type(exc).__name__}: {exc})"
        ) from exc


def _checked_infos(zf: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    infos: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        _check_relative(info.filename, f"{path}: member")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeArchiveError(f"{path}: member {info.filename!r} is a symbolic link")
        key = info.filename.rstrip("/")
        if key in infos:
            raise UnsafeArchiveError(f"{path}: member {info.filename!r} appears twice")
        infos[key] = info
    return infos


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path,
                 limits: ExtractionLimits | None = None) -> bytes:
    """A member's bytes, its declared size checked against ``limits`` first."""
    _check_member_size(info, path, _resolve_limits(limits))
    buf = io.BytesIO()
    try:
        _copy_bounded(zf, info, buf, path)
    except OSError as exc:
        raise ArchiveFormatError(
            f"{path}: member {info.filename!r} cannot be read (truncated or corrupt archive): {exc}"
        ) from exc
    return buf.getvalue()


def detect_backend(manifest: Mapping[str, Any], member_names: Any = ()) -> str:
    """The backend that wrote an archive: the manifest's ``backend`` tag, else inferred from the
    reference layouts (torch: version ``'2.0-pytorch'`` / ``model.pth``; TensorFlow: version
    ``'1.0'`` / ``model.keras``), else ``'unknown'``."""
    tag = manifest.get("backend")
    if isinstance(tag, str) and tag:
        return tag
    version = str(manifest.get("version", ""))
    leaves = {str(n).rstrip("/").rsplit("/", 1)[-1] for n in member_names}
    if "pytorch" in version.lower() or "torch" in version.lower() or "model.pth" in leaves:
        return "pytorch"
    if leaves & {"model.keras", "custom_objects.dill", "saved_model.pb"} or version == "1.0":
        return "tensorflow"
    return "unknown"


def _check_format_version(manifest: Mapping[str, Any], path: Path) -> None:
    """Refuse a manifest ``format_version`` that is not an int >= 1, or newer than ours.
    (Reference archives have no ``format_version``: they are the original layout.)"""
    if "format_version" not in manifest:
        return
    found = manifest["format_version"]
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise ArchiveFormatError(
            f"{path}: manifest format_version {found!r} is not a positive integer "
            f"(this reader knows format versions 1..{FORMAT_VERSION})"
        )
    if found > FORMAT_VERSION:
        raise ArchiveVersionError(
            f"{path}: archive format version {found} is newer than this reader supports "
            f"(format version {FORMAT_VERSION}); read it with a newer backend_api/pinn-jax",
            path=path,
            found=found,
            supported=FORMAT_VERSION,
        )


def _manifest_from_zip(zf: zipfile.ZipFile, infos: Mapping[str, zipfile.ZipInfo], path: Path,
                       limits: ExtractionLimits | None = None) -> dict:
    if _MANIFEST_JSON in infos:
        raw = _read_member(zf, infos[_MANIFEST_JSON], path, limits)
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArchiveFormatError(f"{path}: manifest.json is not valid JSON: {exc}") from exc
    elif _MANIFEST_DILL in infos:
        manifest = safe_loads(_read_member(zf, infos[_MANIFEST_DILL], path, limits))
    else:
        raise ArchiveFormatError(
            f"{path} has no manifest.json or manifest.dill at its root: not a PtychoPINN "
            f"{ARCHIVE_NAME} model archive (members: {sorted(infos)[:8]})"
        )
    if not isinstance(manifest, Mapping):
        raise ArchiveFormatError(f"{path}: manifest is a {type(manifest).__name__}, expected a dict")
    _check_format_version(manifest, path)
    models = manifest.get("models")
    if not isinstance(models, (list, tuple)) or not all(isinstance(m, str) for m in models):
        raise ArchiveFormatError(f"{path}: manifest 'models' must be a list of names, got {models!r}")
    if "version" not in manifest:
        raise ArchiveFormatError(f"{path}: manifest has no 'version'")
    out = dict(manifest)
    out["models"] = list(models)
    out["version"] = str(manifest["version"])
    out["backend"] = detect_backend(manifest, infos)
    return out


def read_manifest(path: str | os.PathLike, *, limits: ExtractionLimits | None = None) -> dict:
    """The archive's manifest, normalised, without extracting anything.

    Returns a dict with at least ``models`` (list of str), ``version`` (str) and ``backend``
    (the tag, or the one inferred for reference archives, see :func:`detect_backend`).
    ``path`` may be the archive or the folder holding ``wts.h5.zip``. Errors as
    :func:`read_archive` (only the manifest member is size-checked against ``limits``).
    """
    p = _archive_file(path)
    with _open_zip(p) as zf:
        infos = _checked_infos(zf, p)
        return _manifest_from_zip(zf, infos, p, limits)


def _backend_hint(writer: str, loader: str) -> str:
    if writer == "tensorflow" and loader == "jax":
        return (
            "convert it into a jax archive with `pinn-jax convert <in> <out>` (imports the "
            "TensorFlow weights), or load it with backend='tensorflow' (needs the reference "
            "ptycho package and TensorFlow)"
        )
    if writer == "unknown":
        return "check that the file is a PtychoPINN model archive written by a known backend"
    return (
        f"load it with backend={writer!r} (that backend must be installed), or retrain/save the "
        f"model with backend={loader!r}"
    )


def _check_backend(manifest: Mapping[str, Any], expected: str | None, path: Path) -> None:
    if expected is None:
        return
    if not isinstance(expected, str):
        raise ValueError(f"expected_backend: expected a str or None, got {expected!r}")
    writer = manifest["backend"]
    if writer != expected:
        raise ArchiveBackendError(
            f"{path} was written by the {writer!r} backend (manifest version "
            f"{manifest['version']!r}), but the {expected!r} backend is loading it; "
            + _backend_hint(writer, expected),
            path=path,
            writer=writer,
            loader=expected,
        )


def _extract(zf: zipfile.ZipFile, infos: Mapping[str, zipfile.ZipInfo], dest: Path, path: Path) -> None:
    """Write every member under ``dest`` (created if missing). Sizes must have been checked;
    on any failure the files and folders made so far are removed again."""
    root = dest.resolve()
    for info in infos.values():
        target = (root / info.filename.rstrip("/")).resolve()
        if target != root and root not in target.parents:
            raise UnsafeArchiveError(f"{path}: member {info.filename!r} would land outside {root}")
    created: list[Path] = []
    try:
        _make_dirs(root, created)
        for info in infos.values():
            target = root / info.filename.rstrip("/")
            if info.is_dir():
                _make_dirs(target, created)
                continue
            _make_dirs(target.parent, created)
            existed = target.exists()
            with open(target, "wb") as dst:
                if not existed:
                    created.append(target)
                _copy_bounded(zf, info, dst, path)
    except BaseException:
        _undo_created(created)
        raise


def _load_params(zf: zipfile.ZipFile, infos: Mapping[str, zipfile.ZipInfo], model: str, path: Path,
                 limits: ExtractionLimits | None = None) -> dict:
    jname, dname = f"{model}/{_PARAMS_JSON}", f"{model}/{_PARAMS_DILL}"
    if jname in infos:
        params = params_from_json(_read_member(zf, infos[jname], path, limits))
    elif dname in infos:
        params = safe_loads(_read_member(zf, infos[dname], path, limits))
    else:
        raise ArchiveFormatError(f"{path}: model {model!r} has no {_PARAMS_JSON} or {_PARAMS_DILL}")
    if not isinstance(params, dict):
        raise ArchiveFormatError(f"{path}: params of model {model!r} are a {type(params).__name__}")
    missing = [k for k in ("N", "gridsize") if k not in params]
    if missing:
        raise ArchiveFormatError(
            f"{path}: params of model {model!r} are missing required fields {missing}: "
            "Cannot reconstruct model architecture"
        )
    params.pop("_version", None)
    return params


def read_archive(
    path: str | os.PathLike,
    dest_dir: str | os.PathLike,
    *,
    expected_backend: str | None = None,
    limits: ExtractionLimits | None = None,
) -> ArchiveContents:
    """Check, then extract an archive into ``dest_dir`` and read its params snapshots.

    path: the archive, or the folder holding ``wts.h5.zip``. Files of model ``m`` land under
    ``dest_dir/m``. With ``expected_backend``, an archive written by another backend raises
    :class:`ArchiveBackendError` before anything is extracted. ``limits``: the size limits
    (default :meth:`ExtractionLimits.from_env`), checked on every member before anything is
    read or written.

    Errors (all ValueErrors): ArchiveNotFoundError (no archive; also a FileNotFoundError),
    ArchiveFormatError (not a zip, truncated, no manifest, a listed model without params or
    without N/gridsize), ArchiveVersionError (format version newer than ours),
    ArchiveLimitError (a member, the total or a ratio over ``limits``), UnsafeArchiveError
    (absolute/``..``/symlink members), UnsafePickleError (a pickle that is not plain data).
    When extraction fails midway, what it wrote is removed again.
    """
    limits = _resolve_limits(limits)
    p = _archive_file(path)
    dest = Path(dest_dir)
    with _open_zip(p) as zf:
        infos = _checked_infos(zf, p)
        _check_sizes(infos, p, limits)
        manifest = _manifest_from_zip(zf, infos, p, limits)
        _check_backend(manifest, expected_backend, p)
        for name in manifest["models"]:
            try:
                _check_model_name(name)
            except ValueError as exc:
                raise UnsafeArchiveError(f"{p}: manifest lists a bad model name: {exc}") from None
        params = {name: _load_params(zf, infos, name, p, limits) for name in manifest["models"]}
        _extract(zf, infos, dest, p)
    root = dest.resolve()
    models = {
        name: ExtractedModel(name=name, params=params[name], dir=root / name)
        for name in manifest["models"]
    }
    return ArchiveContents(
        backend=manifest["backend"],
        version=manifest["version"],
        models=models,
        manifest=manifest,
        path=p,
        root=root,
    )
