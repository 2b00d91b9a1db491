"""The error classes of the model archive and its readers (``backend_api.archive``,
``backend_api.safe_pickle``, ``backend_api.params_codec``).

They live in their own module so that the unpickler and the params codec can raise archive
errors without importing the archive layout (which imports them). Every class is re-exported
from :mod:`backend_api.archive`, where callers catch them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

__all__ = [
    "ArchiveError",
    "ArchiveFormatError",
    "ArchiveVersionError",
    "ArchiveNotFoundError",
    "ArchiveLimitError",
    "UnsafeArchiveError",
    "UnsafePickleError",
    "ArchiveBackendError",
]


class ArchiveError(ValueError):
    """Base class of every archive problem (a ``ValueError``)."""


class ArchiveFormatError(ArchiveError):
    """Not a zip, truncated/corrupt, missing manifest or params, malformed content."""


class ArchiveVersionError(ArchiveFormatError):
    """The manifest's ``format_version`` is newer than this reader knows.

    Attributes: ``path``, ``found`` (the archive's format version), ``supported``
    (:data:`FORMAT_VERSION`).
    """

    def __init__(self, message: str, *, path: Path, found: int, supported: int) -> None:
        super().__init__(message)
        self.path = path
        self.found = found
        self.supported = supported


class ArchiveNotFoundError(ArchiveError, FileNotFoundError):
    """No archive at the given path (also a ``FileNotFoundError``, as it always was)."""


class ArchiveLimitError(ArchiveError):
    """A member's declared size, the archive's total size or a member's compression ratio is
    over the :class:`ExtractionLimits` (or a member decompresses to more than it declares)."""


class UnsafeArchiveError(ArchiveError):
    """A member name that would land outside the extraction folder, or a symlink member."""


class UnsafePickleError(ArchiveError, pickle.UnpicklingError):
    """A pickle asked for something other than plain data (a class or callable not allowed)."""


class ArchiveBackendError(ArchiveError):
    """The archive was written by another backend than the one loading it.

    Attributes: ``path``, ``writer`` (backend that wrote it), ``loader`` (backend loading it).
    """

    def __init__(self, message: str, *, path: Path, writer: str, loader: str) -> None:
        super().__init__(message)
        self.path = path
        self.writer = writer
        self.loader = loader
