"""One writer per artifact name: an exclusive lock held for the whole of `compress run`.

Everything a run writes under its name (`<output>/work/<name>/`, and finally
`<output>/release|rejected|inconclusive/<name>/`) is guarded by one lock file,
`<output>/work/<name>.lock`, taken before any work starts and released when the run ends.
A second run of the same name fails at once (exit 2) naming the holder, or waits for it with
`--wait`.

The lock is `flock(2)` on that file, not the file's existence: the kernel releases it when the
holding process dies, however it dies (`kill -9` included), so a dead run can never block the
next one. The file also records who holds it (pid, host, start time, command), for the error
message; a record found in a file whose lock is free was left by a process that died holding it
(a *stale* lock), and the new run takes over, saying so. The file is never deleted: deleting a
lock file while another process waits on it would let a third process lock a new file of the
same name, and two runs would both hold "the" lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from compress.errors import BadInputError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
POLL_SECONDS = 0.2
WAIT_LOG_SECONDS = 30.0
RECORD_WAIT_SECONDS = 2.0


class LockedError(BadInputError):
    """Another process holds the lock of this artifact name."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to find the process and judge whether to wait for it."""

    pid: int
    host: str
    started: str  # ISO 8601, UTC
    command: str

    @classmethod
    def this_process(cls) -> Holder:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            command=" ".join(sys.argv)[:500],
        )

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started} ({self.command})"


def lock_path(output_root: Path, name: str) -> Path:
    return output_root / "work" / f"{name}{LOCK_SUFFIX}"


def _read_holder(fd: int) -> Holder | None:
    """The record in the lock file, or None when it is empty or unreadable (a crash while it
    was written leaves a torn record; the lock itself is what counts)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        return Holder(**json.loads(raw)) if raw.strip() else None
    except (ValueError, TypeError):
        return None


def _write_holder(fd: int, holder: Holder | None) -> None:
    os.ftruncate(fd, 0)
    if holder is not None:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(asdict(holder)).encode())
    os.fsync(fd)


def _holder_record(fd: int) -> Holder | None:
    """The holder's record; a holder that has just taken the lock writes it a moment later."""
    deadline = time.monotonic() + RECORD_WAIT_SECONDS
    while (holder := _read_holder(fd)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return holder


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _open(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Python opens files non-inheritable: a program this run starts does not keep the lock.
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise BadInputError(f"cannot create the run lock {path}: {exc.strerror}") from None


@contextlib.contextmanager
def artifact_lock(output_root: Path, name: str, *, wait: bool = False) -> Iterator[Holder]:
    """Hold the lock of artifact `name` under `output_root` for the body of the `with`.

    Raises LockedError (exit 2) naming the holder when it is taken and `wait` is False;
    with `wait`, blocks until the holder is done (logging every 30 s whom it waits for)."""
    path = lock_path(output_root, name)
    fd = _open(path)
    try:
        _acquire(fd, path, name, wait)
        stale = _read_holder(fd)
        if stale is not None:
            log.warning(
                "taking over the lock of %s: its holder (%s) ended without releasing it",
                name,
                stale.describe(),
            )
        me = Holder.this_process()
        _write_holder(fd, me)
        try:
            yield me
        finally:
            _write_holder(fd, None)  # an empty record: released cleanly, nothing stale
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, name: str, wait: bool) -> None:
    if _try_lock(fd):
        return
    holder = _holder_record(fd)
    held_by = holder.describe() if holder else "another process (it left no record)"
    if not wait:
        raise LockedError(
            f"{name}: another compress run is writing this artifact: {held_by}; lock {path}. "
            "Wait for it to finish, or pass --wait"
        )
    log.info("%s: waiting for %s to finish (lock %s)", name, held_by, path)
    last_log = time.monotonic()
    while not _try_lock(fd):
        time.sleep(POLL_SECONDS)
        if time.monotonic() - last_log >= WAIT_LOG_SECONDS:
            log.info("%s: still waiting for %s", name, held_by)
            last_log = time.monotonic()
