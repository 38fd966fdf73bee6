"""One sync at a time per database: an OS file lock on ``<db>.lock``, held for the whole sync.

Two syncs writing one mirror at once would each decide their changes against a store the
other is changing; SQLite's own locks only serialise their transactions, not their
decisions. So every sync (``comfysync sync``, ``comfysync schedule``, the Python API) takes
this lock before it opens the database for writing and keeps it until its last write
(walk, apply, export). A second sync does not wait: it raises ``SyncLockedError`` at once,
having written nothing, and says who holds the lock::

    another sync is running (pid 4242, since 2026-11-28T19:05:12Z)

Why an OS lock (``flock``, through filelock) and not a marker file: the kernel drops it when
its holder dies, however it dies (SIGKILL, the OOM killer, power loss), so a dead sync never
blocks the next one and nothing has to guess whether a marker is stale. The holder writes its
pid and start time into the file after locking it and empties it before unlocking; the file
itself stays (deleting it would let two processes lock two different files of one name),
except when the hold created it and ends in a refusal (ConfigurationError: not a comfysync
database, another account): a refused run leaves no file behind. That file is unlinked while
still locked, and filelock never takes a lock on an unlinked file, so no two holders ever
hold two files of one name.

A reader may ask whether a sync holds the lock (``sync_lock_is_free``: ``status`` and ``runs``
tell a run left ``running`` by a killed sync from a live one). Its probe holds the lock for
an instant and writes nothing, so a sync that finds the lock taken but no live holder
recorded tries again for a moment before it gives up.

Readers (exports, pandas, Datasette, read-only commands) never hold or wait for this lock:
the database is in WAL mode, so they never wait for a sync.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.errors import ConfigurationError, DatabaseError, StorageError, SyncLockedError

LOCK_SUFFIX = ".lock"
#: How long a locked-out sync waits for the holder's details, which the holder writes within
#: microseconds of taking the lock.
HOLDER_WAIT_SECONDS = 0.5


def lock_path_for(db_path: Path) -> Path:
    """The lock file of a database: beside it, named ``<db>.lock``."""
    return db_path.with_name(db_path.name + LOCK_SUFFIX)


@dataclass(frozen=True)
class LockHolder:
    """Who holds a database's sync lock: a process id and when it took the lock (UTC)."""

    pid: int
    since: str

    def encode(self) -> bytes:
        return json.dumps({"pid": self.pid, "since": self.since}).encode()

    @classmethod
    def decode(cls, data: bytes) -> LockHolder | None:
        """The holder recorded in a lock file, or None if it is empty or not ours."""
        try:
            fields = json.loads(data)
            return cls(pid=int(fields["pid"]), since=str(fields["since"]))
        except (ValueError, TypeError, KeyError):
            return None


def read_holder(db_path: Path) -> LockHolder | None:
    """The holder written in a database's lock file (None if free, or not yet written)."""
    try:
        return LockHolder.decode(lock_path_for(db_path).read_bytes())
    except OSError:
        return None


@contextmanager
def hold_sync_lock(db_path: Path) -> Iterator[LockHolder]:
    """Hold the sync lock of ``db_path`` for the ``with`` block, or raise SyncLockedError.

    Never waits and never writes anything but the lock file. Also refuses a second sync of
    the same database from another thread of this process (each hold is its own descriptor).
    """
    path = lock_path_for(db_path)
    me = LockHolder(pid=os.getpid(), since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    held: list[int] = []

    def announce(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        held.append(fd)

    lock = FileLock(
        path,
        blocking=False,
        fallback_to_soft=False,  # a marker file would outlive a killed holder
        preserve_lock_file=True,
        on_acquired=announce,
    )
    created = not os.path.lexists(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _acquire(lock, db_path)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            # The disk's fault, not the configuration's: exit 4, try again once there is room.
            raise StorageError(
                f"cannot take the sync lock {path} ({reason}; is the disk full?); "
                "nothing was applied"
            ) from exc
        raise DatabaseError(
            f"cannot take the sync lock {path} ({reason}); check that its folder is writable"
        ) from exc
    try:
        yield me
    except ConfigurationError:
        if created:  # refused: leave no file this run made (unlinked while still locked)
            with suppress(OSError):
                path.unlink()
        raise
    finally:
        with suppress(OSError):
            os.ftruncate(held[0], 0)
        lock.release()


def _acquire(lock: FileLock, db_path: Path) -> None:
    """Take ``lock`` or raise SyncLockedError, naming the holder.

    A lock taken but with no live holder recorded is a reader's probe (or a holder that has
    not written itself yet): that is retried for HOLDER_WAIT_SECONDS rather than refused.
    """
    deadline = time.monotonic() + HOLDER_WAIT_SECONDS
    while True:
        try:
            lock.acquire()
            return
        except Timeout:
            holder = read_holder(db_path)
            if (holder is not None and _is_alive(holder.pid)) or time.monotonic() >= deadline:
                raise SyncLockedError(_locked_message(holder)) from None
            time.sleep(0.02)


def _is_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _locked_message(holder: LockHolder | None) -> str:
    if holder is None:
        return "another sync is running (pid unknown: it has not written the lock file yet)"
    return f"another sync is running (pid {holder.pid}, since {holder.since})"


def sync_lock_is_free(db_path: Path) -> bool:
    """True if no sync holds the lock of ``db_path`` now (or there is no lock file at all).

    For readers: it never creates or writes the lock file. False when it cannot tell (the
    file cannot be opened, or this system has no ``flock``).
    """
    try:
        import fcntl
    except ImportError:  # no flock here: cannot tell
        return False
    try:
        fd = os.open(lock_path_for(db_path), os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held (EWOULDBLOCK), or flock unsupported: not proven free
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)
