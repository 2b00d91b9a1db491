"""Limits on what reading a ``wts.h5.zip`` may cost: the zip-bomb guards.

Before anything is extracted, every member's declared size, the total and the compression
ratio are checked against :class:`ExtractionLimits` (defaults 2 GiB per member, 4 GiB in all,
ratio 200 above 1 MiB; each overridable by an environment variable naming a size such as
``64K`` or ``3G``), and extraction copies at most the declared size, so a lying header is
caught too. A refused archive raises :class:`~backend_api.archive_errors.ArchiveLimitError`
naming the member, the size and the variable that would allow it. Used by
:mod:`backend_api.archive`, which re-exports the public names.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .archive_errors import ArchiveFormatError, ArchiveLimitError



_KIB = 1 << 10
_GIB = 1 << 30
#: environment variables overriding the :class:`ExtractionLimits` defaults (see there)
ENV_MAX_MEMBER_BYTES = "PINN_ARCHIVE_MAX_MEMBER_BYTES"
ENV_MAX_TOTAL_BYTES = "PINN_ARCHIVE_MAX_TOTAL_BYTES"
ENV_MAX_RATIO = "PINN_ARCHIVE_MAX_RATIO"
# Members at most this large are not ratio-checked: a small block of zeros legitimately
# compresses ~1000:1, and the size limits already bound what small members can cost.
_RATIO_FLOOR_BYTES = 1 << 20
_COPY_CHUNK = 1 << 20
_SIZE_UNITS = {"": 1, "k": _KIB, "m": _KIB**2, "g": _KIB**3, "t": _KIB**4}


@dataclass(frozen=True)
class ExtractionLimits:
    """What :func:`read_archive` agrees to extract, checked on the declared sizes before
    anything is written (and on the real data while extracting).

    max_member_bytes: largest uncompressed member (default 2 GiB).
    max_total_bytes: sum of all uncompressed members (default 4 GiB).
    max_ratio: largest uncompressed/compressed size of a member over 1 MiB (default 200).

    Why these defaults: a jax model archive at N=128 (n_filters_scale 2) holds ~35 MB
    uncompressed, its largest member ~15 MB, and its worst compression ratio is ~40 (the JSON
    params snapshot; Orbax's array data do not compress, ratio ~1). The limits leave a factor
    of >100 for bigger models, yet refuse a zip bomb (deflate reaches ~1030:1 on zeros) before
    it fills a disk.

    Overrides: pass ``limits=ExtractionLimits(...)`` to :func:`read_archive` (and the loaders
    that call it), or set ``PINN_ARCHIVE_MAX_MEMBER_BYTES`` / ``PINN_ARCHIVE_MAX_TOTAL_BYTES``
    (bytes, or with a K/M/G/T binary suffix, e.g. ``8G``) / ``PINN_ARCHIVE_MAX_RATIO`` (a
    number); the variables are read when no ``limits`` are passed (:meth:`from_env`).
    """

    max_member_bytes: int = 2 * _GIB
    max_total_bytes: int = 4 * _GIB
    max_ratio: float = 200.0

    def __post_init__(self) -> None:
        # math.inf switches a check off
        for name in ("max_member_bytes", "max_total_bytes"):
            v = getattr(self, name)
            if not ((isinstance(v, int) and not isinstance(v, bool) and v > 0) or v == math.inf):
                raise ValueError(f"ExtractionLimits.{name}: expected a positive int (bytes), got {v!r}")
        v = self.max_ratio
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"ExtractionLimits.max_ratio: expected a positive number, got {v!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ExtractionLimits":
        """The defaults, overridden by the ``PINN_ARCHIVE_MAX_*`` variables that are set."""
        env = os.environ if environ is None else environ
        kw: dict[str, Any] = {}
        for var, name in ((ENV_MAX_MEMBER_BYTES, "max_member_bytes"), (ENV_MAX_TOTAL_BYTES, "max_total_bytes")):
            if env.get(var, "").strip():
                kw[name] = _parse_bytes(env[var], var)
        if env.get(ENV_MAX_RATIO, "").strip():
            try:
                kw["max_ratio"] = float(env[ENV_MAX_RATIO])
            except ValueError:
                raise ValueError(f"${ENV_MAX_RATIO}={env[ENV_MAX_RATIO]!r}: expected a positive number") from None
            if not kw["max_ratio"] > 0:
                raise ValueError(f"${ENV_MAX_RATIO}={env[ENV_MAX_RATIO]!r}: expected a positive number")
        return cls(**kw)


def _parse_bytes(text: str, var: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if m is None or float(m[1]) <= 0:
        raise ValueError(f"${var}={text!r}: expected a positive size in bytes, e.g. 4294967296 or 4G")
    return int(float(m[1]) * _SIZE_UNITS[m[2].lower()])


def _resolve_limits(limits: ExtractionLimits | None) -> ExtractionLimits:
    if limits is None:
        return ExtractionLimits.from_env()
    if not isinstance(limits, ExtractionLimits):
        raise ValueError(f"limits: expected an ExtractionLimits or None, got {type(limits).__name__}")
    return limits


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", _GIB), ("MiB", _KIB**2), ("KiB", _KIB)):
        if n >= size:
            return f"{n / size:.3g} {unit} ({int(n)} bytes)"
    return f"{int(n)} bytes"


def _override_hint(field_name: str, var: str) -> str:
    return f"if the archive is trusted, raise it with limits=ExtractionLimits({field_name}=...) or ${var}"


def _check_member_size(info: zipfile.ZipInfo, path: Path, limits: ExtractionLimits) -> None:
    """Refuse a member whose declared size or compression ratio is over ``limits``."""
    if info.is_dir():
        return
    size = info.file_size
    if size > limits.max_member_bytes:
        raise ArchiveLimitError(
            f"{path}: member {info.filename!r} declares {_fmt_bytes(size)} uncompressed, over the "
            f"per-member limit of {_fmt_bytes(limits.max_member_bytes)}; nothing was extracted ("
            + _override_hint("max_member_bytes", ENV_MAX_MEMBER_BYTES) + ")"
        )
    if size > _RATIO_FLOOR_BYTES:
        ratio = size / info.compress_size if info.compress_size > 0 else math.inf
        if ratio > limits.max_ratio:
            raise ArchiveLimitError(
                f"{path}: member {info.filename!r} expands {info.compress_size} -> {size} bytes "
                f"(ratio {ratio:.0f}), over the compression-ratio limit of {limits.max_ratio:g} "
                "(a zip bomb?); nothing was extracted ("
                + _override_hint("max_ratio", ENV_MAX_RATIO) + ")"
            )


def _check_sizes(infos: Mapping[str, zipfile.ZipInfo], path: Path, limits: ExtractionLimits) -> None:
    """All members' declared sizes and ratios, then their total, against ``limits``."""
    total = 0
    for info in infos.values():
        _check_member_size(info, path, limits)
        total += 0 if info.is_dir() else info.file_size
    if total > limits.max_total_bytes:
        raise ArchiveLimitError(
            f"{path}: its {len(infos)} members declare {_fmt_bytes(total)} uncompressed in total, "
            f"over the limit of {_fmt_bytes(limits.max_total_bytes)}; nothing was extracted ("
            + _override_hint("max_total_bytes", ENV_MAX_TOTAL_BYTES) + ")"
        )


def _copy_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dst: BinaryIO, path: Path) -> None:
    """Decompress one member into ``dst`` in bounded chunks, stopping with an error as soon as
    the data run past the member's declared size (the declared size is what was checked)."""
    limit = info.file_size
    written = 0
    try:
        with zf.open(info) as src:
            while True:
                chunk = src.read(min(_COPY_CHUNK, limit - written + 1))
                if not chunk:
                    return
                written += len(chunk)
                if written > limit:
                    raise ArchiveLimitError(
                        f"{path}: member {info.filename!r} decompresses to more than the {limit} "
                        "bytes it declares (corrupt or crafted archive); extraction stopped"
                    )
                dst.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise ArchiveFormatError(
            f"{path}: member {info.filename!r} cannot be extracted (truncated or corrupt "
            f"archive): {exc}"
        ) from exc


def _make_dirs(folder: Path, created: list[Path]) -> None:
    """``mkdir -p folder``, recording each folder made (outermost first) in ``created``."""
    missing = []
    for d in (folder, *folder.parents):
        if d.is_dir():
            break
        missing.append(d)
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        created.append(d)


def _undo_created(created: list[Path]) -> None:
    """Remove what a failed extraction made, innermost first (folders only when empty)."""
    for p in reversed(created):
        try:
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
        except OSError:
            pass


