"""One sync at a time per database (issue 4, part 2): real processes, real locks, real kills."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import threading
import time

import pytest
from conftest import rows, wait_until

from pipeline.errors import SyncLockedError
from pipeline.settings import Settings
from pipeline.store.schema import ABANDONED_RUN_ERROR
from pipeline.sync.lock import LockHolder, hold_sync_lock, lock_path_for, read_holder
from pipeline.sync.run import run_sync

SINCE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def slow_walk_args(upstream, db: str = "m.db") -> tuple[str, ...]:
    """A sync that reads one page at a time, so the account's latency makes it slow."""
    return (
        "sync",
        "--base-url",
        upstream.url,
        "--db",
        db,
        "--per-page",
        "10",
        "--concurrency",
        "1",
    )


def test_the_holder_writes_its_pid_and_a_second_hold_is_refused_with_it(db_path):
    with hold_sync_lock(db_path) as me:
        assert me.pid == os.getpid() and re.fullmatch(SINCE, me.since)
        assert read_holder(db_path) == me
        for _ in range(2):  # the refused attempt must not clobber the holder's record
            with pytest.raises(SyncLockedError) as refused, hold_sync_lock(db_path):
                pass
            assert refused.value.message == (
                f"another sync is running (pid {me.pid}, since {me.since})"
            )
            assert refused.value.exit_code == 5
        assert read_holder(db_path) == me
    assert lock_path_for(db_path).read_bytes() == b""  # emptied, left in place
    with hold_sync_lock(db_path):  # and free again
        pass


def test_another_thread_of_the_same_process_is_refused_too(db_path):
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with hold_sync_lock(db_path):
                pass
        except BaseException as exc:
            errors.append(exc)

    with hold_sync_lock(db_path):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
    assert [type(e) for e in errors] == [SyncLockedError]


def test_holder_records_that_are_not_ours_read_as_unknown():
    assert LockHolder.decode(b"") is None
    assert LockHolder.decode(b"garbage") is None
    assert LockHolder.decode(b'{"pid": "x"}') is None
    assert LockHolder.decode(b'{"pid": 7, "since": "T"}') == LockHolder(7, "T")


def test_a_locked_out_sync_writes_nothing_not_even_its_run_log_row(serve_account, db_path):
    upstream = serve_account(runners=5)
    settings = Settings(base_url=upstream.url, token="test-token", db_path=db_path)
    with hold_sync_lock(db_path), pytest.raises(SyncLockedError, match="another sync"):
        run_sync(settings)
    assert not db_path.exists()
    assert list(upstream.account.requests) == []
    assert run_sync(settings).status == "success"  # once released


def test_a_locked_out_cli_sync_exits_5_naming_the_holder(serve_account, run_cli, tmp_path):
    upstream = serve_account(runners=5)
    db = tmp_path / "m.db"
    with hold_sync_lock(db) as me:
        result = run_cli(
            "sync", "--base-url", upstream.url, "--token", "test-token", "--db", "m.db"
        )
    assert (result.exit_code, result.stdout) == (5, "")
    assert result.stderr == (
        f"comfysync: error: another sync is running (pid {me.pid}, since {me.since})\n"
    )
    assert not db.exists()


def test_two_syncs_started_together_one_syncs_the_other_exits_5(serve_account, start_cli, tmp_path):
    upstream = serve_account(runners=60, seed=3)
    upstream.account.faults.latency_ms = 150  # 7 requests: the winner holds the lock ~1 s
    env = {"COMFYCONTROL_TOKEN": "test-token"}
    procs = [start_cli(*slow_walk_args(upstream), env=env) for _ in range(2)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    codes = [proc.returncode for proc in procs]

    assert sorted(codes) == [0, 5], outputs
    winner = procs[codes.index(0)]
    _, loser_err = outputs[codes.index(5)]
    assert re.fullmatch(
        rf"comfysync: error: another sync is running \(pid {winner.pid}, since {SINCE}\)\n",
        loser_err,
    )
    assert rows(tmp_path / "m.db", "SELECT id, status, created FROM sync_runs") == [
        (1, "success", 60)
    ]


def test_a_sigkilled_sync_does_not_block_the_next_and_its_run_is_marked_abandoned(
    serve_account, start_cli, run_cli, tmp_path
):
    upstream = serve_account(runners=100, seed=4)
    account = upstream.account
    account.faults.latency_ms = 200
    env = {"COMFYCONTROL_TOKEN": "test-token"}
    first = start_cli(*slow_walk_args(upstream), env=env)
    db = tmp_path / "m.db"
    wait_until(lambda: len(account.requests) >= 2)  # it holds the lock and is walking

    holder = read_holder(db)
    assert holder is not None and holder.pid == first.pid
    # Readers are never blocked by a sync in progress.
    assert rows(db, "SELECT status FROM sync_runs") == [("running",)]
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)

    account.faults.latency_ms = 0
    started = time.monotonic()
    result = run_cli(*slow_walk_args(upstream), env=env)
    assert result.exit_code == 0, result.stderr
    assert time.monotonic() - started < 10
    assert rows(db, "SELECT id, status, error FROM sync_runs") == [
        (1, "failed", ABANDONED_RUN_ERROR),
        (2, "success", None),
    ]
    assert rows(db, "SELECT count(*) FROM runners") == [(100,)]
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
