"""Atomic file writes, shared by feature caches, training checkpoints and adapter files.

Everything is written under a temporary name in the destination's directory, flushed to
disk and renamed over the destination in one step: a reader (or a later run) sees the old
file or the complete new one, never a half-written one, even after a crash or a kill.

A temporary's name carries the host and process id of its writer
(``<name>.<host>.<pid>.<token>.tmp``), so a later start can tell the leftovers of a killed
writer (same host, process gone: :func:`remove_stale_temporaries`) from a file another
live process is writing right now. The build lock's heartbeat and takeover files
(:mod:`audiopetl.buildlock`) are named the same way, so the same sweep removes theirs. Files
are created with mode 0666 minus the umask, like any other file the user creates, so a
shared cache or run folder stays readable.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TEMP = re.compile(r"^(?P<target>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})\.tmp$")


class WriteError(OSError):
    """A file that could not be written, with the path and what to do in the message."""


@dataclass(frozen=True)
class Temporary:
    """A temporary file of :func:`atomic_path` found on disk."""

    path: Path
    host: str
    pid: int
    size_bytes: int

    @property
    def stale(self) -> bool:
        """Its writer is gone: it ran on this host and its process no longer exists.

        (A temporary from another host is never judged: its writer may be alive there.)
        """
        return self.host == _HOST and not process_alive(self.pid)

    @property
    def live_here(self) -> bool:
        """Its writer runs on this host right now (`cache clear` leaves it alone)."""
        return self.host == _HOST and process_alive(self.pid)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def temporary_name(path: Path) -> Path:
    """A fresh temporary name next to ``path`` that names this host and process."""
    return path.with_name(f"{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _create(path: Path) -> Path:
    """A new empty temporary next to ``path``, created with 0666 & ~umask (not mkstemp's 0600)."""
    while True:
        temp = temporary_name(path)
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temp
        except FileExistsError:
            continue


def write_error(path: str | Path, error: BaseException) -> WriteError:
    """One clear error for a failed write of ``path``, with the free space left there."""
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return WriteError(
        f"cannot write {str(path)!r} ({free}): {error}; "
        "check that the folder is writable and the disk is not full, then rerun"
    )


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    Operating-system errors (read-only folder, full disk...) come out as :class:`WriteError`
    naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = _create(path)
    except OSError as error:
        raise write_error(path, error) from error
    mode = stat.S_IMODE(temp.stat().st_mode)  # 0666 & ~umask, as created
    try:
        yield temp
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        if stat.S_IMODE(temp.stat().st_mode) != mode:  # some writers (safetensors) recreate it 0600
            os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise write_error(path, error) from error
        raise


def find_temporaries(folder: str | Path) -> list[Temporary]:
    """The temporaries of :func:`atomic_path` in ``folder`` (not recursive), by name."""
    found = []
    folder = Path(folder)
    if not folder.is_dir():
        return found
    for entry in sorted(folder.iterdir()):
        match = _TEMP.match(entry.name)
        if match is None:
            continue
        try:
            size = entry.stat().st_size
        except OSError:  # removed meanwhile by its writer
            continue
        found.append(Temporary(entry, match["host"], int(match["pid"]), size))
    return found


def remove_stale_temporaries(folder: str | Path) -> list[Temporary]:
    """Delete the temporaries in ``folder`` left by killed processes of this host; returns them."""
    return remove_stale(find_temporaries(folder))


T = TypeVar("T")


def remove_stale(found: list[T]) -> list[T]:
    """Delete the file (``.path``) of every item of ``found`` judged ``.stale``; returns those deleted."""
    removed = []
    for item in found:
        if item.stale:
            try:
                item.path.unlink(missing_ok=True)
            except OSError:  # a read-only folder: leave it, the write that follows says why
                continue
            removed.append(item)
    return removed
