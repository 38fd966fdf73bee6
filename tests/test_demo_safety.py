"""`comfysync demo --db PATH` replaces only a database it made itself (issue 13).

Whatever else is at PATH (a mirror, a text file, another program's SQLite file, a folder, a
link, a database's leftover -wal) is refused with exit 2 and one line, and the whole folder
is byte-identical afterwards: no lock file, no snapshot folder, nothing removed.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import rows

from pipeline.settings import Settings
from pipeline.sync.lock import hold_sync_lock
from pipeline.sync.run import run_sync

DB = Path("data") / "demo.db"


def tree(folder: Path) -> dict[str, object]:
    """Everything under ``folder``: each file's bytes, each link's target, each folder."""
    found: dict[str, object] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                found[key] = ("link", os.readlink(path))
            elif path.is_dir():
                found[key] = "folder"
            elif name.endswith("-shm"):
                # SQLite's shared-memory index: every reader, read-only ones too, marks it
                # as it reads. It holds no data; that it is still there is what counts.
                found[key] = "shm"
            else:
                found[key] = path.read_bytes()
    return found


def make_mirror(path: Path, serve_account) -> None:
    upstream = serve_account(runners=7, seed=13)
    run_sync(Settings(base_url=upstream.url, token="test-token", db_path=path))


def make_text(path: Path, serve_account) -> None:
    path.write_text("my notes, not a database\n")


def make_empty_file(path: Path, serve_account) -> None:
    path.write_bytes(b"")


def make_foreign_sqlite(path: Path, serve_account) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO orders (total) VALUES (12.5)")
    conn.close()


def make_folder(path: Path, serve_account) -> None:
    path.mkdir()
    (path / "inside.txt").write_text("kept\n")


def make_link_to_a_file(path: Path, serve_account) -> None:
    target = path.parent / "elsewhere.txt"
    target.write_text("the link's target\n")
    path.symlink_to(target.name)


def make_link_to_a_demo_database(path: Path, serve_account) -> None:
    target = path.parent / "real-demo.db"
    shutil.copy(path.parent / "made-by-demo.db", target)
    path.symlink_to(target.name)


def make_dangling_link(path: Path, serve_account) -> None:
    path.symlink_to("nowhere.db")


def make_orphan_wal(path: Path, serve_account) -> None:
    Path(f"{path}-wal").write_bytes(b"a write-ahead log whose database was moved away")


def make_mirror_synced_into_a_demo_database(path: Path, serve_account) -> None:
    """A demo database someone then pointed `comfysync sync` at for a real account."""
    shutil.copy(path.parent / "made-by-demo.db", path)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO sync_runs (started_at, finished_at, status, base_url) VALUES "
            "('2026-12-01T00:00:00Z', '2026-12-01T00:00:09Z', 'success', "
            "'https://api.comfycontrol.app')"
        )
    conn.close()


def make_foreign_snapshot_folder(path: Path, serve_account) -> None:
    """No database, but exports/demo beside it already holds someone's files."""
    folder = (
        path.parent / "exports" / path.stem / "parquet" / "runners" / "snapshot_date=2026-12-01"
    )
    folder.mkdir(parents=True)
    (folder / "runners-1.parquet").write_bytes(b"not the demo's")


PRE_EXISTING: dict[str, Callable[[Path, object], None]] = {
    "mirror": make_mirror,
    "text file": make_text,
    "empty file": make_empty_file,
    "foreign sqlite": make_foreign_sqlite,
    "folder": make_folder,
    "link to a file": make_link_to_a_file,
    "link to a demo database": make_link_to_a_demo_database,
    "dangling link": make_dangling_link,
    "orphan -wal": make_orphan_wal,
    "demo database a real account was synced into": make_mirror_synced_into_a_demo_database,
    "foreign snapshot folder": make_foreign_snapshot_folder,
}


@pytest.fixture(scope="module")
def demo_database(tmp_path_factory) -> Path:
    """A database made by `comfysync demo`, to copy from."""
    from conftest import run_comfysync

    folder = tmp_path_factory.mktemp("demo")
    result = run_comfysync(folder, "demo")
    assert result.exit_code == 0, result.stderr
    return folder / DB


@pytest.mark.parametrize("kind", PRE_EXISTING)
def test_demo_refuses_what_it_did_not_make_and_leaves_it_byte_identical(
    kind, run_cli, tmp_path, serve_account, demo_database
):
    (tmp_path / "data").mkdir()
    shutil.copy(demo_database, tmp_path / "data" / "made-by-demo.db")
    PRE_EXISTING[kind](tmp_path / DB, serve_account)
    before = tree(tmp_path)

    result = run_cli("demo", "--db", str(DB))

    assert (result.exit_code, result.stdout) == (2, ""), result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("comfysync: error: ") and "pass another --db" in line, line
    assert tree(tmp_path) == before


def test_demo_refuses_a_mirror_whose_wal_is_open_in_another_process(
    run_cli, tmp_path, serve_account
):
    db = tmp_path / DB
    db.parent.mkdir()
    make_mirror(db, serve_account)
    reader = sqlite3.connect(db)  # holds the -wal and -shm open, with a commit not checkpointed
    reader.execute("PRAGMA wal_autocheckpoint = 0")
    with reader:
        reader.execute("UPDATE runners SET name = name || ' (edited)'")
    assert Path(f"{db}-wal").stat().st_size > 0
    shm = f"{DB}-shm"  # SQLite's shared-memory index, which every reader writes to
    before = tree(tmp_path)
    try:
        result = run_cli("demo", "--db", str(DB))
        after = tree(tmp_path)
        assert after.keys() == before.keys()
        assert {**after, shm: None} == {**before, shm: None}
    finally:
        reader.close()
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert rows(db, "SELECT count(*) FROM runners WHERE name LIKE '% (edited)'") == [(7,)]


def test_demo_waits_for_no_one_and_deletes_nothing_while_a_sync_holds_the_database(
    run_cli, tmp_path, demo_database
):
    db = tmp_path / DB
    db.parent.mkdir()
    shutil.copy(demo_database, db)
    with hold_sync_lock(db) as holder:
        before = tree(tmp_path)
        result = run_cli("demo", "--db", str(DB))
        assert tree(tmp_path) == before
    assert (result.exit_code, result.stdout) == (5, "")
    assert result.stderr == (
        f"comfysync: error: another sync is running (pid {holder.pid}, since {holder.since})\n"
    )


def test_a_demo_database_is_marked_and_a_second_demo_replaces_it_and_its_snapshots(
    run_cli, tmp_path
):
    first = run_cli("demo")
    assert first.exit_code == 0, first.stderr
    db = tmp_path / DB
    assert rows(db, "SELECT value FROM comfysync_meta WHERE key = 'demo'") == [("comfysync demo",)]
    exports = tmp_path / "data" / "exports" / "demo"
    stale = exports / "csv" / "runners" / "snapshot_date=2000-01-01" / "runners-9.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("left by the first demo's tree\n")
    unrelated = tmp_path / "data" / "exports" / "notes.txt"
    unrelated.write_text("mine\n")

    second = run_cli("demo")

    assert second.exit_code == 0, second.stderr
    assert second.stdout.splitlines()[4:] == first.stdout.splitlines()[4:]
    assert rows(db, "SELECT id, status FROM sync_runs") == [(1, "success"), (2, "success")]
    assert not stale.exists()
    assert unrelated.read_text() == "mine\n"
    assert sorted(p.name for p in exports.rglob("runners-*")) == [
        "runners-1.csv",
        "runners-1.parquet",
        "runners-2.csv",
        "runners-2.parquet",
    ]
