"""The sync lock seen from readers and refusals (issue 13).

Readers ask whether a sync holds the lock without creating or writing the lock file, and
their probe never turns a starting sync away. A refused hold leaves no lock file it created.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time

import pytest

from pipeline.errors import DatabaseError, SyncLockedError, UpstreamError
from pipeline.sync.lock import LockHolder, hold_sync_lock, lock_path_for, sync_lock_is_free


def test_a_reader_sees_whether_the_lock_is_held_and_creates_nothing(db_path):
    assert sync_lock_is_free(db_path)
    assert not lock_path_for(db_path).exists()
    with hold_sync_lock(db_path):
        assert not sync_lock_is_free(db_path)
        # The same from another process, as `status` asks it.
        code = (
            "from pathlib import Path; from pipeline.sync.lock import sync_lock_is_free as free; "
            f"print(free(Path({str(db_path)!r})))"
        )
        probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert probe.stdout == "False\n", probe.stderr
    assert sync_lock_is_free(db_path)
    assert lock_path_for(db_path).read_bytes() == b""


def test_a_probe_holding_the_lock_for_an_instant_does_not_turn_a_sync_away(db_path):
    lock_file = lock_path_for(db_path)
    # What a SIGKILLed sync leaves: its record, naming a process that is gone.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock_file.write_bytes(LockHolder(pid=gone.pid, since="2026-12-01T00:00:00Z").encode())
    fd = os.open(lock_file, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a reader's probe, caught mid-way
    releaser = threading.Timer(0.1, lambda: os.close(fd))
    releaser.start()
    started = time.monotonic()
    try:
        with hold_sync_lock(db_path) as me:
            assert me.pid == os.getpid()
    finally:
        releaser.join()
    assert time.monotonic() - started < 2


def test_a_live_holder_is_still_refused_at_once(db_path):
    with hold_sync_lock(db_path):
        started = time.monotonic()
        code = (
            "from pipeline.sync.lock import hold_sync_lock\n"
            f"with hold_sync_lock(__import__('pathlib').Path({str(db_path)!r})): pass"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert "SyncLockedError" in proc.stderr
        assert time.monotonic() - started < 5


def test_a_refused_hold_removes_the_lock_file_it_created_and_only_that(db_path):
    with pytest.raises(DatabaseError), hold_sync_lock(db_path):
        raise DatabaseError("refused")
    assert not lock_path_for(db_path).exists()

    lock_path_for(db_path).write_bytes(b"")  # there before: stays
    with pytest.raises(DatabaseError), hold_sync_lock(db_path):
        raise DatabaseError("refused")
    assert lock_path_for(db_path).exists()

    lock_path_for(db_path).unlink()  # a failure that is not a refusal keeps it
    with pytest.raises(UpstreamError), hold_sync_lock(db_path):
        raise UpstreamError()
    assert lock_path_for(db_path).exists()


def test_after_a_refusal_removed_the_lock_file_the_next_hold_works(db_path):
    with pytest.raises(DatabaseError), hold_sync_lock(db_path):
        raise DatabaseError("refused")
    with hold_sync_lock(db_path), pytest.raises(SyncLockedError), hold_sync_lock(db_path):
        pass
    assert lock_path_for(db_path).exists()
