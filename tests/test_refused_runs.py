"""A refused run leaves the folder exactly as it was (issue 13).

Refusals are exit 2 with one line on stderr: a --db that is not a comfysync database or
mirrors another account, an empty --db or --export-dir, an --export-dir that is a file or
the database itself. Nothing is created: no database, no lock file, no snapshot folder.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import rows

from pipeline.errors import ConfigurationError
from pipeline.settings import Settings
from pipeline.sync.run import run_sync


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for a folder)."""
    return {
        str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
        for path in sorted(folder.rglob("*"))
    }


def one_error_line(stderr: str) -> str:
    [line] = stderr.splitlines()
    assert line.startswith("comfysync: error: "), line
    return line.removeprefix("comfysync: error: ")


def text_file(folder: Path, serve_account) -> str:
    (folder / "notes.txt").write_text("my notes\n")
    return "notes.txt"


def short_text_file(folder: Path, serve_account) -> str:
    """Shorter than SQLite's header: SQLite alone would take it for an empty database."""
    (folder / "todo.txt").write_text("x")
    return "todo.txt"


def zeroed_file(folder: Path, serve_account) -> str:
    (folder / "blank.img").write_bytes(bytes(4096))
    return "blank.img"


def foreign_sqlite(folder: Path, serve_account) -> str:
    conn = sqlite3.connect(folder / "app.db")
    with conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    conn.close()
    return "app.db"


def newer_schema(folder: Path, serve_account) -> str:
    mine = serve_account(runners=3, seed=31)
    run_sync(Settings(base_url=mine.url, token="test-token", db_path=folder / "new.db"))
    (folder / "new.db.lock").unlink()
    conn = sqlite3.connect(folder / "new.db")
    with conn:
        conn.execute("UPDATE comfysync_meta SET value = '999' WHERE key = 'schema_version'")
    conn.close()
    return "new.db"


def restored_mirror_of_another_account(folder: Path, serve_account) -> str:
    """A mirror copied from a backup (no lock file beside it), synced with another token."""
    mine = serve_account(runners=4, seed=32)
    made = folder / "made" / "m.db"
    run_sync(Settings(base_url=mine.url, token="test-token", db_path=made))
    shutil.copy(made, folder / "m.db")
    shutil.copy(f"{made}.key", folder / "m.db.key")  # a backup holds the key beside it
    shutil.rmtree(made.parent)
    return "m.db"


REFUSED_DATABASES = {
    "text file": text_file,
    "short text file": short_text_file,
    "zeroed file": zeroed_file,
    "foreign sqlite": foreign_sqlite,
    "newer schema": newer_schema,
    "another account": restored_mirror_of_another_account,
}


@pytest.mark.parametrize("kind", REFUSED_DATABASES)
def test_a_refused_db_leaves_the_folder_as_it_was(kind, run_cli, tmp_path, serve_account):
    db = REFUSED_DATABASES[kind](tmp_path, serve_account)
    theirs = serve_account(runners=3, seed=33)
    before = listing(tmp_path)

    result = run_cli("sync", "--base-url", theirs.url, "--token", "test-token", "--db", db)

    assert (result.exit_code, result.stdout) == (2, ""), result.stderr
    one_error_line(result.stderr)
    after = listing(tmp_path)
    if kind == "another account":  # the refusal is recorded in the run log, as designed
        assert after.keys() == before.keys()
        assert rows(tmp_path / db, "SELECT status FROM sync_runs ORDER BY id") == [
            ("success",),
            ("failed",),
        ]
    else:
        assert after == before


def test_a_lock_file_that_was_there_before_a_refusal_stays(run_cli, tmp_path):
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "notes.txt.lock").write_bytes(b"")
    before = listing(tmp_path)
    result = run_cli("sync", "--base-url", "http://127.0.0.1:9", "--db", "notes.txt")
    assert result.exit_code == 2
    assert listing(tmp_path) == before


EMPTY = ["", "   "]


@pytest.mark.parametrize("value", EMPTY)
@pytest.mark.parametrize(
    "args",
    [
        ("sync", "--base-url", "http://127.0.0.1:9"),
        ("schedule", "--base-url", "http://127.0.0.1:9", "--every", "1h", "--max-runs", "1"),
        ("status",),
        ("runs",),
        ("history", "some-runner"),
        ("changes",),
        ("export", "-o", "out.csv"),
        ("browse",),
        ("browse", "--metadata-out", "meta.json"),
        ("demo",),
    ],
    ids=lambda args: " ".join(args[:3]),
)
def test_an_empty_db_is_refused_on_every_command(args, value, run_cli, tmp_path):
    before = listing(tmp_path)
    result = run_cli(*args, "--db", value, timeout=60)
    assert (result.exit_code, result.stdout) == (2, ""), result.stderr
    assert one_error_line(result.stderr) == (
        "--db is empty: pass a path, or leave the option out for its default"
    )
    assert listing(tmp_path) == before


@pytest.mark.parametrize("value", EMPTY)
@pytest.mark.parametrize("command", ["sync", "status"])
def test_an_empty_export_dir_is_refused(command, value, run_cli, tmp_path, mirror):
    shutil.copy(mirror.path, tmp_path / "m.db")
    before = listing(tmp_path)
    args = ("--base-url", "http://127.0.0.1:9") if command == "sync" else ()
    result = run_cli(command, *args, "--db", "m.db", "--export-dir", value)
    assert (result.exit_code, result.stdout) == (2, ""), result.stderr
    assert one_error_line(result.stderr) == (
        "--export-dir is empty: pass a path, or leave the option out for its default"
    )
    assert listing(tmp_path) == before


def test_an_export_dir_that_is_a_file_or_the_database_is_refused_before_the_sync(
    run_cli, tmp_path, serve_account
):
    upstream = serve_account(runners=3, seed=34)
    (tmp_path / "exports").write_text("a file, not a folder\n")
    before = listing(tmp_path)
    sync = ("sync", "--base-url", upstream.url, "--token", "test-token")

    into_a_file = run_cli(*sync, "--db", "m.db", "--export-dir", "exports")
    assert (into_a_file.exit_code, into_a_file.stdout) == (2, ""), into_a_file.stderr
    assert one_error_line(into_a_file.stderr) == (
        "--export-dir exports is a file, not a folder; pass a folder for the snapshot files "
        "(or --no-export)"
    )
    under_a_file = run_cli(*sync, "--db", "m.db", "--export-dir", "exports/snapshots")
    assert under_a_file.exit_code == 2, under_a_file.stderr
    assert "under exports, which is a file, not a folder" in one_error_line(under_a_file.stderr)
    for db, export_dir in [("m.db", "m.db"), ("m.db", "./m.db/"), ("m.db", "m.db/snapshots")]:
        into_the_db = run_cli(*sync, "--db", db, "--export-dir", export_dir)
        assert (into_the_db.exit_code, into_the_db.stdout) == (2, ""), into_the_db.stderr
        assert one_error_line(into_the_db.stderr) == (
            f"--export-dir {Path(export_dir)} is the database (--db {db}) or inside it; "
            "pass a folder of its own for the snapshot files"
        )
    assert listing(tmp_path) == before
    assert list(upstream.account.requests) == []


def test_settings_validation_refuses_the_same_export_dirs(tmp_path):
    (tmp_path / "file").write_text("x")
    base = Settings(base_url="http://127.0.0.1:9", db_path=tmp_path / "m.db")
    for export_dir in (Path("  "), tmp_path / "file", tmp_path / "m.db", tmp_path / "m.db" / "s"):
        settings = Settings(**{**base.__dict__, "export_dir": export_dir})
        with pytest.raises(ConfigurationError, match="--export-dir"):
            settings.validated()
    with pytest.raises(ConfigurationError, match="--db is empty"):
        Settings(base_url="http://127.0.0.1:9", db_path=Path(" ")).validated()
    fine = Settings(**{**base.__dict__, "export_dir": tmp_path / "exports"})
    assert fine.validated() is fine
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("export", "--output", " "), "--output is empty: pass a path"),
        (("export", "-o", ""), "--output is empty: pass a path"),
        (
            ("browse", "--metadata-out", ""),
            "--metadata-out is empty: pass a path, or leave the option out for its default",
        ),
    ],
)
def test_every_path_option_refuses_an_empty_value(args, line, run_cli, tmp_path, mirror):
    shutil.copy(mirror.path, tmp_path / "m.db")
    before = listing(tmp_path)
    result = run_cli(*args, "--db", "m.db")
    assert (result.exit_code, result.stdout) == (2, ""), result.stderr
    assert one_error_line(result.stderr) == line
    assert listing(tmp_path) == before
