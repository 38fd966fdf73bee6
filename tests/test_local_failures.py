"""The local side failing: a disk that fills up, and a --db that cannot be used.

Each is one clear line on stderr, the documented exit code, and a store left as it was. A full
disk is real: a tiny tmpfs when this process may mount one (tests run as root here), otherwise
a database capped at its size with `PRAGMA max_page_count` (tests/crash_harness.py), which
fails with the same SQLITE_FULL. Write protection is real too: root ignores file modes, so
the file gets the immutable flag (`chattr +i`), or a read-only bind mount where that fails.
(A corrupt snapshot folder: tests/test_corrupt_snapshot_folder.py.)
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import (
    REPO,
    CliResult,
    cli_environment,
    dump_except_run_log,
    quietly,
    rows,
    run_comfysync,
    write_protected,
)

from pipeline.settings import Settings
from pipeline.store.schema import open_store
from pipeline.sync.run import run_sync

FULL = "could not write the database (database or disk is full); nothing was applied"


@contextmanager
def tiny_filesystem(folder: Path, size: str | None) -> Iterator[bool]:
    """``folder`` as a tmpfs of ``size``; yields False (a plain folder) if mounting is refused
    or ``size`` is None."""
    folder.mkdir()
    mounted = size is not None and quietly(
        "mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)
    )
    try:
        yield mounted
    finally:
        if mounted and not quietly("umount", str(folder)):
            quietly("umount", "-l", str(folder))


def fill(folder: Path, *, leave: int) -> Path:
    """Fill the filesystem of ``folder`` until only ``leave`` bytes are free."""
    stats = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))
    return filler


def sync_with_page_cap(folder: Path, url: str, db: Path) -> CliResult:
    """`comfysync sync` with the database capped at its size plus 8 pages once it writes runners
    (the new ones are written as the walk reads them, inside the sync's transaction)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "crash_harness.py"), "--phase", "apply",
         "--target", "pipeline.store.early:insert_created", "--max-page-count-headroom", "8", "--",
         "sync", "--base-url", url, "--token", "test-token", "--db", str(db)],
        cwd=folder, env=cli_environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    stderr = "".join(
        line for line in proc.stderr.splitlines(keepends=True) if "crash-harness" not in line
    )
    return CliResult(proc.returncode, proc.stdout, stderr)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("disk", ["a tiny filesystem", "a database capped by max_page_count"])
def test_a_disk_that_fills_up_during_apply_fails_with_exit_4_and_nothing_applied(
    disk, serve_account, tmp_path
):
    upstream = serve_account(runners=200, seed=3)
    size = "4m" if disk == "a tiny filesystem" else None
    with tiny_filesystem(tmp_path / "disk", size) as mounted:
        db = tmp_path / "disk" / "m.db"
        settings = Settings(base_url=upstream.url, token="test-token", db_path=db)
        run_sync(settings)
        for _ in range(2000):
            upstream.account.create_runner()
        before = dump_except_run_log(db)

        if mounted:
            filler = fill(db.parent, leave=96 * 1024)  # room to start a sync, not to apply it
            result = run_comfysync(
                tmp_path, "sync", "--base-url", upstream.url, "--token", "test-token",
                "--db", str(db),
            )  # fmt: skip
            filler.unlink()  # room to read the database back
        else:
            result = sync_with_page_cap(tmp_path, upstream.url, db)

        assert (result.exit_code, result.stdout) == (4, "")
        assert result.stderr == f"comfysync: error: {FULL}\n"
        assert dump_except_run_log(db) == before
        assert rows(db, "SELECT status, error FROM sync_runs ORDER BY id DESC LIMIT 1") == [
            ("failed", FULL)
        ]
        assert rows(db, "PRAGMA integrity_check") == [("ok",)]

        if mounted:  # a disk already full when the sync starts: no room even to begin
            conn = sqlite3.connect(db)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
            untouched = digest(db)
            filler = fill(db.parent, leave=0)
            result = run_comfysync(
                tmp_path, "sync", "--base-url", upstream.url, "--token", "test-token",
                "--db", str(db),
            )  # fmt: skip
            filler.unlink()
            assert result.exit_code == 4
            # The sync lock (a file beside the database, taken before the database is opened)
            # is the first thing that needs a byte of disk.
            assert result.stderr == (
                f"comfysync: error: cannot take the sync lock {db}.lock (No space left on "
                "device; is the disk full?); nothing was applied\n"
            )
            assert digest(db) == untouched

        assert run_sync(settings).created == 2000  # once there is room, the next sync works


def test_a_db_that_is_not_writable_is_refused_and_left_untouched(run_cli, tmp_path):
    open_store(tmp_path / "m.db").close()
    before = digest(tmp_path / "m.db")
    with write_protected(tmp_path / "m.db"):
        result = run_cli("sync", "--base-url", "http://127.0.0.1:9", "--db", "m.db")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        "comfysync: error: --db m.db is not writable; fix that or pass another --db\n"
    )
    assert digest(tmp_path / "m.db") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.db"]  # no -wal, no -shm


def test_a_db_in_a_folder_that_is_not_writable_is_refused(run_cli, tmp_path):
    (tmp_path / "locked").mkdir()
    with write_protected(tmp_path / "locked"):
        result = run_cli("sync", "--base-url", "http://127.0.0.1:9", "--db", "locked/new.db")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        "comfysync: error: --db locked/new.db is in a folder that is not writable (locked; "
        "SQLite keeps its -wal and -shm files there); fix that or pass another --db\n"
    )
    assert list((tmp_path / "locked").iterdir()) == []


def test_a_damaged_database_is_refused_and_left_untouched(run_cli, tmp_path):
    open_store(tmp_path / "m.db").close()
    damaged = bytearray((tmp_path / "m.db").read_bytes())
    damaged[100:4096] = bytes((i * 7) % 256 for i in range(100, 4096))  # the schema page
    (tmp_path / "m.db").write_bytes(bytes(damaged))

    result = run_cli("sync", "--base-url", "http://127.0.0.1:9", "--db", "m.db")

    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        "comfysync: error: m.db is damaged (database disk image is malformed); restore it "
        "from a backup or pass another --db\n"
    )
    assert (tmp_path / "m.db").read_bytes() == bytes(damaged)


def test_a_db_whose_folder_cannot_be_created_is_one_line(run_cli, tmp_path):
    (tmp_path / "plain-file").write_text("not a folder")
    result = run_cli("sync", "--base-url", "http://127.0.0.1:9", "--db", "plain-file/sub/m.db")
    assert result.exit_code == 2
    assert result.stderr.startswith("comfysync: error: cannot create the folder of --db ")
    assert len(result.stderr.splitlines()) == 1
