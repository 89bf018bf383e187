"""A cross-process, cross-host "build once" lock that works on NFS: a lock *file*, not flock.

Concurrent runs (sweep workers, Slurm jobs on several nodes, DDP ranks) share one feature
cache; the first to need an entry builds it and the others wait for it. ``flock``/``fcntl``
locks are unreliable or absent on NFS, so the lock is a file created with
``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFSv3+ servers). It holds the
owner's host, pid and a token; while held, a background thread rewrites it every
``heartbeat`` seconds (through a temporary named like :func:`audiopetl.atomic.atomic_path`'s,
``<lock>.<host>.<pid>.<token>.tmp``, so the leftover of a holder killed mid-beat is swept
with the other temporaries of dead processes). Earlier versions named that temporary
``<lock>.beat-<token>``, with no host or pid to judge it by: such a leftover is stale, and
removed at the next start (:func:`remove_stale_old_heartbeats`), once it has not changed for
``stale_after`` seconds by its file time.

A waiter decides a lock is stale, and takes it over, when

- its owner is on this host and that pid no longer exists (a killed run), or
- the lock file has not changed (mtime and content) for ``stale_after`` seconds of the
  *waiter's own* clock (an owner on another host died, or lost the filesystem).

Only change is compared, never the file's time with ours, so clocks that differ between
hosts or between client and NFS server do not matter. A caller that cannot wait that long
(``audiopetl cache clear``) passes ``judge_by_mtime``: a lock whose file time is more than
``stale_after`` older than this host's clock is stale at once, which trusts the clocks of the
hosts and the file server to agree to well within ``stale_after``. Takeover renames the stale file to a
unique name first (only one waiter's rename succeeds) and then creates a fresh lock.
After acquiring, callers re-check whether the work was done while they waited.

The lock saves work; it is not what keeps results correct. If a holder was wrongly
presumed dead (stalled for longer than ``stale_after``), it and its successor both build,
and since the feature cache writes entries atomically, the last rename leaves one complete
entry either way.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .atomic import process_alive, remove_stale, temporary_name

HEARTBEAT = 10.0  # seconds between heartbeats of a held lock
STALE_AFTER = 120.0  # seconds without a heartbeat after which a lock is taken over
POLL = 0.5  # seconds between checks of a waiter


class LockHeld(TimeoutError):
    """The lock stayed held for the ``timeout`` given; ``owner``: the holder's host, pid and token."""

    def __init__(self, message: str, owner: dict):
        super().__init__(message)
        self.owner = owner


class BuildLock:
    """``with BuildLock(path): ...`` runs the body in at most one process at a time."""

    def __init__(
        self, path: str | os.PathLike, heartbeat: float = HEARTBEAT, stale_after: float = STALE_AFTER,
        poll: float = POLL, timeout: float | None = None, on_wait=None, judge_by_mtime: bool = False,
    ):
        if not stale_after > heartbeat > 0:
            raise ValueError(f"BuildLock needs stale_after > heartbeat > 0, got {stale_after} and {heartbeat}")
        self.path = Path(path)
        self.heartbeat, self.stale_after, self.poll, self.timeout = heartbeat, stale_after, poll, timeout
        self.on_wait = on_wait  # called once with the owner's info when this process has to wait
        self.judge_by_mtime = judge_by_mtime  # also stale: a file time stale_after older than our clock
        self.token = f"{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "time": time.time()}
        return json.dumps(info).encode()

    def _try_create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(self._payload())
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def acquire(self) -> None:
        started = time.monotonic()
        seen, seen_since, told = None, time.monotonic(), False
        while not self._try_create():
            observed = _observe(self.path)
            if observed is None:  # released between our create and our look: try again
                continue
            now = time.monotonic()
            if observed != seen:
                seen, seen_since = observed, now
            owner = _owner(observed[1])
            dead_here = owner.get("host") == socket.gethostname() and not _pid_alive(owner.get("pid"))
            old = self.judge_by_mtime and time.time() - observed[0] / 1e9 > self.stale_after
            if dead_here or old or now - seen_since > self.stale_after:
                self._take_over(observed)
                continue
            if self.timeout is not None and now - started >= self.timeout:
                raise LockHeld(f"{self.path} is held by {owner} for more than {self.timeout:.0f} s", owner)
            if not told and self.on_wait is not None:
                self.on_wait(owner)
                told = True
            time.sleep(self.poll)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()

    def _take_over(self, judged: tuple[int, bytes]) -> None:
        if _observe(self.path) != judged:
            return  # changed since we judged it: a new owner, or the old one came back
        stale = temporary_name(self.path)  # swept like any temporary if we are killed before the unlink
        try:
            os.rename(self.path, stale)  # one waiter wins; the others find a fresh lock or none
        except FileNotFoundError:
            return
        if stale.read_bytes() != judged[1]:
            # Another waiter replaced the stale lock between our look and our rename: give it back.
            try:
                os.link(stale, self.path)
            except FileExistsError:
                pass
        stale.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                if _owner(self.path.read_bytes()).get("token") != self.token:
                    return  # taken over (we were presumed dead): do not touch the new owner's file
                temp = temporary_name(self.path)
                temp.write_bytes(self._payload())
                os.replace(temp, self.path)
            except OSError:
                pass  # a missed beat is harmless; several in a row let a waiter take over

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if _owner(self.path.read_bytes()).get("token") == self.token:
                self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "BuildLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _observe(path: Path) -> tuple[int, bytes] | None:
    try:
        return path.stat().st_mtime_ns, path.read_bytes()
    except FileNotFoundError:
        return None


def _owner(content: bytes) -> dict:
    try:
        owner = json.loads(content)
    except ValueError:
        return {}  # being written: judged by the heartbeat rule only
    return owner if isinstance(owner, dict) else {}


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: let the heartbeat rule decide
    return process_alive(pid)


@dataclass(frozen=True)
class OldHeartbeat:
    """A heartbeat temporary an earlier version's lock left, ``<lock>.beat-<token>``."""

    path: Path
    size_bytes: int
    age: float  # seconds since it last changed: its file time against this host's clock
    stale: bool  # unchanged for longer than the lock's stale_after: no live holder writes it


def find_old_heartbeats(folder: str | os.PathLike, stale_after: float = STALE_AFTER) -> list[OldHeartbeat]:
    """The ``*.lock.beat-*`` files in ``folder`` (not recursive), judged by age: their names
    carry no host or pid. A live holder replaces its heartbeat file within a moment."""
    found = []
    folder = Path(folder)
    for path in sorted(folder.glob("*.lock.beat-*")) if folder.is_dir() else []:
        try:
            info = path.stat()
        except FileNotFoundError:  # replaced meanwhile by its writer
            continue
        age = time.time() - info.st_mtime
        found.append(OldHeartbeat(path, info.st_size, age, age > stale_after))
    return found


def remove_stale_old_heartbeats(folder: str | os.PathLike, stale_after: float = STALE_AFTER) -> list[OldHeartbeat]:
    """Delete the stale :func:`find_old_heartbeats` of ``folder``; returns them."""
    return remove_stale(find_old_heartbeats(folder, stale_after))
