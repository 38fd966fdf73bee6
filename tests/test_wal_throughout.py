"""Every sync writes through WAL, a store's first one too, so a reader never waits for a sync.

What a user can see of it: the journal mode SQLite records in the database file's header
(bytes 18 and 19: 1 for a rollback journal, 2 for WAL), read here while the sync is walking
and after it ends, and that readers and failures behave as that promises.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from conftest import rows, settings_for

from pipeline.errors import SyncInterruptedError
from pipeline.sync.run import run_sync


def journal_in_header(db_path: Path) -> str:
    with open(db_path, "rb") as database:
        header = database.read(20)
    return {(1, 1): "rollback", (2, 2): "wal"}[(header[18], header[19])]


class JournalWatcher:
    """An on_progress callback noting the journal mode on disk at every page."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.seen: set[str] = set()

    def __call__(self, *progress: int) -> None:
        self.seen.add(journal_in_header(self.db_path))


def test_a_first_sync_writes_through_wal(serve_account, db_path):
    upstream = serve_account(runners=1050, seed=7)
    during = JournalWatcher(db_path)

    summary = run_sync(settings_for(upstream, db_path), on_progress=during)

    assert summary.created == 1050
    assert during.seen == {"wal"}
    assert rows(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert not Path(f"{db_path}-journal").exists()
    assert rows(db_path, "SELECT count(*) FROM runners") == [(1050,)]


def test_a_sync_into_a_store_that_holds_runners_writes_through_wal(serve_account, db_path):
    upstream = serve_account(runners=1050, seed=7)
    run_sync(settings_for(upstream, db_path))
    upstream.account.create_runner(name="newcomer")
    during = JournalWatcher(db_path)

    summary = run_sync(settings_for(upstream, db_path), on_progress=during)

    assert summary.created == 1
    assert during.seen == {"wal"}
    assert journal_in_header(db_path) == "wal"


def test_a_reader_open_beside_a_first_sync_keeps_reading(
    serve_account, db_path
):
    upstream = serve_account(runners=1050, seed=7)
    stopped = threading.Event()
    stopped.set()
    with pytest.raises(SyncInterruptedError):  # creates the store, stores no runner
        run_sync(settings_for(upstream, db_path), stop=stopped)
    reader = sqlite3.connect(db_path)
    try:
        assert reader.execute("SELECT count(*) FROM runners").fetchall() == [(0,)]
        during = JournalWatcher(db_path)

        summary = run_sync(settings_for(upstream, db_path), on_progress=during)

        assert summary.created == 1050
        assert during.seen == {"wal"}
        assert reader.execute("SELECT count(*) FROM runners").fetchall() == [(1050,)]
    finally:
        reader.close()
    assert journal_in_header(db_path) == "wal"


def test_a_first_sync_stopped_mid_walk_applies_nothing(
    serve_account, db_path
):
    upstream = serve_account(runners=1050, seed=7)
    stop = threading.Event()
    during = JournalWatcher(db_path)

    def stop_at_page_five(pages_done: int, *progress: int) -> None:
        during(pages_done, *progress)
        if pages_done >= 5:
            stop.set()

    with pytest.raises(SyncInterruptedError):
        run_sync(settings_for(upstream, db_path), on_progress=stop_at_page_five, stop=stop)

    assert during.seen == {"wal"}
    assert journal_in_header(db_path) == "wal"
    assert rows(db_path, "SELECT count(*) FROM runners") == [(0,)]
    assert rows(db_path, "SELECT count(*) FROM runner_versions") == [(0,)]
    assert rows(db_path, "SELECT status FROM sync_runs") == [("failed",)]

    summary = run_sync(settings_for(upstream, db_path))  # the retry is a first sync too
    assert summary.created == 1050
