"""Writing files so that a reader never sees half of one: the one atomic writer of the project.

Every file pinn-jax and backend_api write (archives, NPZ data, PNG figures, JSON reports,
ptychodus exports) goes through :func:`atomic_write` or its two shorthands :func:`write_bytes`
and :func:`write_json`: the bytes go to a temporary file in the target's folder, are flushed and
fsynced, and the file is moved over the target with :func:`os.replace`, so a crash leaves either
the old file or the new one, never a truncated one. A new file gets the mode ``open()`` would
give it (``0o666 & ~umask``: readable by the group and others under the usual umask), a
replaced file keeps its mode.

Temporary files and folders carry their writer, ``<prefix><pid>@<host>.<8 random chars>
<suffix>``, and are locked while written, so that the next writer into the same folder can
remove the leftovers of a killed one (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

try:  # POSIX advisory locks mark a temporary file as held by a live writer
    import fcntl
except ImportError:  # pragma: no cover - Windows: stale temporaries are then never removed
    fcntl = None

__all__ = [
    "atomic_write",
    "current_umask",
    "remove_stale_temps",
    "write_bytes",
    "write_json",
    "writer_temp_dir",
]


def current_umask() -> int:
    """The process umask, read without changing it (Linux ``/proc/self/status``); elsewhere the
    common default 0o022. (``os.umask`` can only be read by setting it, which races threads.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _finish_atomic(tmp_name: str, target: Path) -> None:
    """Give the temporary file the mode a normally created file would have (``mkstemp`` makes
    it 0600: the file it replaces keeps its mode, a new one gets ``0o666 & ~umask``), move it
    over ``target`` and make the rename durable."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    os.chmod(tmp_name, mode)
    os.replace(tmp_name, target)
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------------------------
# temporary files of interrupted writes
#
# A writer killed midway (SIGKILL, power loss) cannot remove its temporary file or folder. Each
# temporary name therefore carries its writer, ``<prefix><pid>@<host>.<8 random chars><suffix>``,
# and the writer holds an exclusive ``flock`` on it while writing. A later writer of the same
# prefix removes an entry only when all of these hold: the name matches our pattern exactly, it
# was made on this host, that PID is not a running process (a zombie counts as gone), and the
# entry can be locked now. The PID check covers the moment between creating the entry and
# locking it; the lock covers a PID that the check cannot see (another PID namespace on the same
# host). Entries of other hosts (a shared file system), of this very process, of a PID that was
# reused, or on a system without ``fcntl`` are kept: a stale file left in place costs disk space,
# removing a live one would break someone's save.

_TEMP_RANDOM = r"[a-z0-9_]{8}"  # what tempfile.mkstemp/mkdtemp put between prefix and suffix
_TEMP_WRITER = r"(?P<pid>[1-9][0-9]{0,9})@(?P<host>[A-Za-z0-9-]{1,63})"


def _host_tag() -> str:
    """This host's name as it appears in temporary names (letters, digits and '-', <= 63)."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63]
    return name or "localhost"


def _writer_tag() -> str:
    return f"{os.getpid()}@{_host_tag()}"


def _lock_held(fd: int) -> bool:
    """Try to take an exclusive flock on ``fd`` without waiting; False when someone holds it
    (or locking is not available here)."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held by another open file; ENOLCK etc.: cannot tell
        return False
    return True


def _pid_running(pid: int) -> bool:
    """Whether ``pid`` is a live process on this host (unknown counts as live)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    try:  # Linux: a killed process nobody has reaped yet is a zombie ('Z'): gone for our purpose
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line.rpartition(")")[2].split()[:1] != ["Z"]


def _temp_pattern(prefix: str, suffix: str) -> re.Pattern:
    return re.compile(re.escape(prefix) + _TEMP_WRITER + r"\." + _TEMP_RANDOM + re.escape(suffix) + r"\Z")


def _remove_if_unlocked(path: Path, is_dir: bool) -> bool:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        if not _lock_held(fd):
            return False
        # still the entry we locked (not replaced by a new writer meanwhile)
        if not os.path.samestat(os.fstat(fd), os.lstat(path)):
            return False
        if is_dir:
            shutil.rmtree(path)
        else:
            os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | os.PathLike, prefix: str, suffix: str = "") -> list[Path]:
    """Remove the temporary files/folders named ``<prefix><pid>@<host>.XXXXXXXX<suffix>`` in
    ``folder`` whose writer is gone (rules above); return the paths removed.

    Only entries matching that pattern exactly are considered, never symlinks or other names;
    errors (an unreadable folder, a vanished entry) are ignored, so a save never fails here.
    """
    if fcntl is None:
        return []
    pattern = _temp_pattern(prefix, suffix)
    here = _host_tag()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or m["host"] != here or _pid_running(int(m["pid"])):
            continue
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            continue
        path = Path(entry.path)
        if _remove_if_unlocked(path, stat.S_ISDIR(mode)):
            removed.append(path)
    return removed


@contextlib.contextmanager
def writer_temp_dir(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A fresh folder ``parent/<prefix><pid>@<host>.XXXXXXXX``, locked while the ``with`` body
    runs and removed afterwards; stale folders of the same prefix are removed first."""
    parent = Path(parent)
    remove_stale_temps(parent, prefix)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{_writer_tag()}.", dir=parent))
    fd = None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        _lock_held(fd)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if fd is not None:
            os.close(fd)



@contextlib.contextmanager
def atomic_write(target: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``target`` for binary writing; on a clean exit flush it to
    disk and move it over ``target`` with :func:`os.replace`.

    If the ``with`` body (or the flush) raises, the temporary file is removed and ``target``
    is left exactly as it was. The parent folder must exist. The file gets the mode of the file
    it replaces, or ``0o666 & ~umask`` for a new one, as ``open()`` would give
    (``mkstemp`` would leave it 0600). The temporary file is
    ``.<target name>.<pid>@<host>.XXXXXXXX.tmp``, locked while written; stale ones of the same
    target left by a killed writer are removed first (:func:`remove_stale_temps`)::

        with atomic_write(path) as fh:
            np.savez(fh, **arrays)
    """
    target = Path(target)
    prefix = f".{target.name}."
    remove_stale_temps(target.parent, prefix, ".tmp")
    fd, tmp_name = tempfile.mkstemp(prefix=prefix + _writer_tag() + ".", suffix=".tmp", dir=target.parent)
    _lock_held(fd)  # released when the file is closed, just before the rename
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _finish_atomic(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically (:func:`atomic_write`); return the path."""
    target = Path(target)
    with atomic_write(target) as fh:
        fh.write(data)
    return target


def write_json(target: str | os.PathLike, obj: Any, *, indent: int | None = 2,
               default: Any = None) -> Path:
    """Write ``obj`` as JSON (UTF-8, a trailing newline) to ``target`` atomically; ``default``
    is passed to :func:`json.dumps` for values it cannot encode. Encoding happens before the
    temporary file is created, so a value that cannot be encoded leaves nothing behind."""
    text = json.dumps(obj, indent=indent, default=default) + "\n"
    return write_bytes(target, text.encode("utf-8"))
