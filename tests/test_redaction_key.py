"""The redaction key lives beside the database in a 0600 file (or in the environment), never in it.

With the key, every `redacted:` value, `raw_fingerprint` and page digest could be checked
offline against guessed header secrets; so the database (and anything serving it, such as
Datasette) holds only the key's id. Every test runs the CLI as a real process against the
simulator on loopback and reads the real files it leaves.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import CliResult, dump_except_run_log, key_file, rows

KEY_ENV = "COMFYSYNC_REDACTION_KEY"


def key_id(key: bytes) -> str:
    """The documented id: the first 16 hex digits of HMAC-SHA256(key, "comfysync key id")."""
    return hmac.new(key, b"comfysync key id", hashlib.sha256).hexdigest()[:16]


def redacted(value: str, key: bytes) -> str:
    return "redacted:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:12]


def meta(db: Path) -> dict[str, str]:
    return {str(k): str(v) for k, v in rows(db, "SELECT key, value FROM comfysync_meta")}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("simulate-"))


@contextmanager
def umask(value: int) -> Iterator[None]:
    """Run the CLI processes started inside under ``value`` (a child inherits the umask)."""
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def upstream(serve_account) -> Any:
    return serve_account(runners=30, seed=13)


@pytest.fixture
def sync(run_cli, upstream):
    """`comfysync sync --json` of the simulated account into --db (default m.db)."""

    def run(*args: str, db: str = "m.db", env: dict[str, str] | None = None) -> CliResult:
        return run_cli(
            "sync", "--json", "--no-export", "--base-url", upstream.url, "--db", db, *args,
            env={"COMFYCONTROL_TOKEN": "test-token", **(env or {})},
        )  # fmt: skip

    return run


def summary(result: CliResult) -> dict[str, Any]:
    assert result.exit_code == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_a_new_mirror_keeps_its_key_in_a_0600_file_beside_it_and_only_its_id_inside(
    sync, tmp_path: Path, upstream
):
    db = tmp_path / "m.db"
    with umask(0):  # the file must be 0600 whatever the umask allows
        first = summary(sync())
    assert first["created"] == 30
    path = key_file(db)
    assert mode(path) == 0o600
    text = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", text)
    key = bytes.fromhex(text.strip())
    assert meta(db) == {
        "application": "comfysync",
        "schema_version": meta(db)["schema_version"],
        "redaction_key_id": key_id(key),
    }
    # The key in the file is the one the headers were redacted under.
    runner = upstream.account.list_runners()[0]
    [(headers,)] = rows(db, "SELECT headers FROM runners WHERE id = ?", (runner["id"],))
    assert json.loads(str(headers)) == {
        name: redacted(value, key) for name, value in runner["headers"].items()
    }
    for stored in tmp_path.glob("m.db*"):
        if stored != path:
            assert text.strip().encode() not in stored.read_bytes(), stored.name
    assert summary(sync())["unchanged"] == 30
    assert folder_listing(tmp_path) == [
        "m.db",
        "m.db-shm",
        "m.db-wal",
        "m.db.key",
        "m.db.lock",
    ]  # no temporary left


def test_the_key_file_may_link_to_a_private_file_elsewhere(sync, tmp_path: Path):
    db = tmp_path / "m.db"
    summary(sync())
    vault = tmp_path / "vault"
    vault.mkdir()
    key_file(db).rename(vault / "comfysync.key")
    key_file(db).symlink_to(vault / "comfysync.key")
    assert summary(sync())["unchanged"] == 30
    (vault / "comfysync.key").chmod(0o644)  # the target's own mode is what counts
    assert sync().exit_code == 2


def test_a_mirror_that_names_no_key_is_not_given_a_new_one(sync, tmp_path: Path):
    db = tmp_path / "m.db"
    summary(sync())
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("DELETE FROM comfysync_meta WHERE key = 'redaction_key_id'")
    conn.close()
    before = dump_except_run_log(db)
    result = sync()
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        "comfysync: error: m.db holds runners but names no redaction key; it was not made by "
        "this comfysync: pass another --db\n"
    )
    assert dump_except_run_log(db) == before


@pytest.mark.parametrize("bits", [0o640, 0o604, 0o620, 0o602, 0o644])
def test_a_key_file_others_can_use_is_refused_before_anything_is_written(
    sync, tmp_path: Path, bits: int
):
    db = tmp_path / "m.db"
    summary(sync())
    key_file(db).chmod(bits)
    before, listing = dump_except_run_log(db), folder_listing(tmp_path)
    runs = rows(db, "SELECT count(*) FROM sync_runs")
    result = sync()
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"comfysync: error: the redaction key file m.db.key can be read or written by other "
        f"users (mode {bits:04o}); run: chmod 600 m.db.key\n"
    )
    assert dump_except_run_log(db) == before and rows(db, "SELECT count(*) FROM sync_runs") == runs
    assert folder_listing(tmp_path) == listing


def test_a_key_file_that_is_not_a_key_is_refused(sync, tmp_path: Path):
    db = tmp_path / "m.db"
    summary(sync())
    for junk in ("", "not a key\n", "abcd" * 8 + "\n"):  # empty, not hex, too short
        key_file(db).write_text(junk)
        before = dump_except_run_log(db)
        result = sync()
        assert (result.exit_code, result.stdout) == (2, ""), junk
        assert result.stderr.startswith(
            "comfysync: error: the redaction key file m.db.key is not a key "
        ), result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert dump_except_run_log(db) == before


def test_a_different_key_in_the_file_is_refused_and_nothing_is_written(sync, tmp_path: Path):
    db = tmp_path / "m.db"
    summary(sync())
    stored_id = meta(db)["redaction_key_id"]
    key_file(db).write_text(secrets.token_hex(32) + "\n")
    before = hashlib.sha256(db.read_bytes()).hexdigest(), dump_except_run_log(db)
    result = sync()
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.startswith(
        "comfysync: error: the redaction key in m.db.key does not match the one m.db was made "
        f"with (key id {stored_id}); restore m.db.key from your backup"
    ), result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), dump_except_run_log(db)) == before


def test_a_different_key_in_the_environment_is_refused_and_nothing_is_written(sync, tmp_path: Path):
    db = tmp_path / "m.db"
    summary(sync())
    stored_id = meta(db)["redaction_key_id"]
    before = dump_except_run_log(db)
    result = sync(env={KEY_ENV: secrets.token_hex(32)})
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.startswith(
        f"comfysync: error: the redaction key in {KEY_ENV} does not match the one m.db was "
        f"made with (key id {stored_id})"
    ), result.stderr
    assert dump_except_run_log(db) == before


def test_an_existing_mirror_without_its_key_is_refused_and_no_new_key_is_made(sync, tmp_path: Path):
    db = tmp_path / "m.db"
    summary(sync())
    stored_id = meta(db)["redaction_key_id"]
    key_file(db).unlink()
    before, listing = dump_except_run_log(db), folder_listing(tmp_path)
    result = sync()
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.startswith(
        f"comfysync: error: m.db was made with a redaction key (key id {stored_id}) but "
        "m.db.key is missing; restore it from your backup"
    ), result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert dump_except_run_log(db) == before and folder_listing(tmp_path) == listing


def test_the_key_can_come_from_the_environment_instead_of_a_file(sync, tmp_path: Path, upstream):
    db = tmp_path / "m.db"
    key = secrets.token_bytes(32)
    first = summary(sync(env={KEY_ENV: key.hex()}))
    assert first["created"] == 30
    assert not key_file(db).exists()
    assert meta(db)["redaction_key_id"] == key_id(key)
    runner = upstream.account.list_runners()[0]
    [(headers,)] = rows(db, "SELECT headers FROM runners WHERE id = ?", (runner["id"],))
    assert json.loads(str(headers)) == {
        name: redacted(value, key) for name, value in runner["headers"].items()
    }
    again = summary(sync(env={KEY_ENV: key.hex().upper()}))
    assert (again["updated"], again["unchanged"]) == (0, 30)


@pytest.mark.parametrize("value", ["not-hex", "ab" * 31, "abc"])
def test_a_key_in_the_environment_that_is_not_a_key_is_refused(sync, tmp_path: Path, value):
    result = sync(env={KEY_ENV: value})
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"comfysync: error: {KEY_ENV} must be a key of at least 64 hex digits (32 bytes), "
        'such as the output of: python -c "import secrets; print(secrets.token_hex(32))"\n'
    )
    assert value not in result.stderr
    assert folder_listing(tmp_path) == []


# -- databases made before the key moved out ---------------------------------------------------


def make_legacy(db: Path) -> str:
    """Turn a mirror into one as comfysync made it while the key lived in comfysync_meta.

    Returns the key's hex. The key file is removed: the old code never wrote one.
    """
    path = key_file(db)
    conn = sqlite3.connect(db)
    with conn:
        if path.exists():
            key = path.read_text().strip()
            conn.execute("DELETE FROM comfysync_meta WHERE key = 'redaction_key_id'")
            conn.execute(
                "INSERT INTO comfysync_meta (key, value) VALUES ('redaction_key', ?)", (key,)
            )
            conn.execute("DELETE FROM _sqlite_migrations WHERE name = 'm009_redaction_key_out'")
            conn.execute("UPDATE comfysync_meta SET value = '7' WHERE key = 'schema_version'")
            path.unlink()
        [(key,)] = conn.execute("SELECT value FROM comfysync_meta WHERE key = 'redaction_key'")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return str(key)


def everything_but_the_key(db: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = sqlite3.connect(db)
    try:
        tables = [
            str(name)
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT IN ('comfysync_meta', '_sqlite_migrations') ORDER BY name"
            )
        ]
        return {
            table: [tuple(r) for r in conn.execute(f'SELECT * FROM "{table}" ORDER BY rowid')]
            for table in tables
            if not table.startswith("runners_fts_")
        }
    finally:
        conn.close()


def assert_no_trace_of(key: str, folder: Path) -> None:
    """No piece of the key (16 hex digits of it, in either case, or 8 of its raw bytes) is
    in any file of the database but the key file: not even a half-overwritten copy."""
    raw = bytes.fromhex(key)
    pieces = {key[i : i + 16] for i in range(len(key) - 15)}
    for stored in folder.glob("m.db*"):
        if stored.name != "m.db.key":
            content = stored.read_bytes()
            lowered = content.lower()
            assert not [piece for piece in pieces if piece.encode() in lowered], stored.name
            assert not [i for i in range(len(raw) - 7) if raw[i : i + 8] in content], stored.name


def test_an_old_database_has_its_key_moved_out_without_a_trace_and_nothing_else_changes(
    sync, tmp_path: Path
):
    from pipeline.store.schema import open_store

    db = tmp_path / "m.db"
    summary(sync("--store-header-values"))
    summary(sync())  # headers redacted now: a mirror with some history
    key = make_legacy(db)
    before = everything_but_the_key(db)

    # A reader kept open (Datasette, say) keeps the WAL from being checkpointed and removed
    # when the migrating connection closes.
    reader = sqlite3.connect(db)
    reader.execute("SELECT count(*) FROM runners").fetchall()
    open_store(db).close()  # what the next sync does first: migrate
    path = key_file(db)
    assert path.read_text() == key + "\n" and mode(path) == 0o600
    assert meta(db) == {
        "application": "comfysync",
        "schema_version": "10",
        "redaction_key_id": key_id(bytes.fromhex(key)),
        # An upgrade marks the last sync before it: its snapshot files are not reused.
        "snapshots_reusable_after": "2",
    }
    assert everything_but_the_key(db) == before
    assert rows(db, "SELECT name FROM _sqlite_migrations ORDER BY id DESC LIMIT 1") == [
        ("m009_redaction_key_out",)
    ]
    assert_no_trace_of(key, tmp_path)
    reader.close()

    again = summary(sync())
    assert (again["created"], again["updated"], again["unchanged"]) == (0, 0, 30)
    assert_no_trace_of(key, tmp_path)


def test_a_sync_migrates_an_old_database_and_finds_nothing_changed(sync, tmp_path: Path):
    db = tmp_path / "m.db"
    summary(sync())
    key = make_legacy(db)
    again = summary(sync())
    assert (again["created"], again["updated"], again["unchanged"]) == (0, 0, 30)
    assert key_file(db).read_text() == key + "\n" and mode(key_file(db)) == 0o600
    assert "redaction_key" not in meta(db)
    assert_no_trace_of(key, tmp_path)


def test_an_old_database_whose_key_file_already_holds_that_key_migrates(sync, tmp_path: Path):
    db = tmp_path / "m.db"
    summary(sync())
    key = make_legacy(db)
    key_file(db).write_text(key + "\n")
    key_file(db).chmod(0o600)
    assert summary(sync())["unchanged"] == 30
    assert "redaction_key" not in meta(db)


def test_an_old_database_beside_a_different_key_file_is_refused_and_left_as_it_was(
    sync, tmp_path: Path
):
    db = tmp_path / "m.db"
    summary(sync())
    make_legacy(db)
    other = secrets.token_hex(32) + "\n"
    key_file(db).write_text(other)
    key_file(db).chmod(0o600)
    before = dump_except_run_log(db)
    result = sync()
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.startswith(
        "comfysync: error: the redaction key in m.db.key does not match the one m.db was made with"
    ), result.stderr
    assert dump_except_run_log(db) == before
    assert key_file(db).read_text() == other


# -- readers and Datasette ---------------------------------------------------------------------


def test_read_commands_work_without_the_key_and_show_clear_values_without_a_digest(
    sync, run_cli, tmp_path: Path, upstream
):
    db = tmp_path / "m.db"
    summary(sync("--store-header-values"))
    target = upstream.account.runner_ids()[4]
    upstream.account.rotate_header(target, "Authorization", "Bearer rotated")
    assert summary(sync("--store-header-values"))["updated"] == 1
    key = bytes.fromhex(key_file(db).read_text())

    with_key = run_cli("history", target, "--db", "m.db")
    assert with_key.exit_code == 0, with_key.stderr
    assert f'"Authorization":"{redacted("Bearer rotated", key)}"' in with_key.stdout

    # A reader that cannot get at the key: it is gone, not a key, or not this mirror's.
    key_file(db).rename(tmp_path / "elsewhere.key")
    for junk in (None, "not a key\n", secrets.token_hex(32) + "\n"):
        if junk is not None:
            key_file(db).write_text(junk)
            key_file(db).chmod(0o600)
        for args in (
            ("history", target),
            ("changes", "--since", "1d"),
            ("history", "--json", target),
        ):
            result = run_cli(*args, "--db", "m.db")
            assert (result.exit_code, result.stderr) == (0, ""), args
            assert "Bearer rotated" not in result.stdout
            assert re.search(r'\\?"Authorization\\?":\s?\\?"redacted\\?"', result.stdout), args
            assert "redacted:" not in result.stdout.split("updated", 1)[1], args


def serve_every_table(db: Path) -> dict[str, str]:
    """Every row of every table and view of ``db`` as Datasette serves it (its own client)."""
    from datasette.app import Datasette

    from pipeline.read.browse import metadata_for

    async def fetch() -> dict[str, str]:
        datasette = Datasette([str(db)], metadata=metadata_for(db))
        try:
            name = db.stem
            listing = (await datasette.client.get(f"/{name}.json")).json()
            names = [t["name"] for t in listing["tables"]] + [v["name"] for v in listing["views"]]
            assert "comfysync_meta" in names and "runners" in names
            bodies = {}
            for table in names:
                response = await datasette.client.get(f"/{name}/{table}.json?_shape=array")
                assert response.status_code == 200, table
                bodies[table] = response.text
            return bodies
        finally:
            for database in datasette.databases.values():
                database.close()

    return asyncio.run(fetch())


def test_datasette_serves_nothing_that_holds_the_key(sync, tmp_path: Path):
    db = tmp_path / "m.db"
    summary(sync())
    key = key_file(db).read_text().strip()
    served = serve_every_table(db)
    for table, body in served.items():
        assert key not in body.lower(), table
    assert {row["key"] for row in json.loads(served["comfysync_meta"])} == {
        "application",
        "schema_version",
        "redaction_key_id",
    }


def test_the_demo_keeps_its_key_beside_the_demo_database(run_cli, tmp_path: Path):
    result = run_cli("demo", "--db", "data/demo.db")
    assert result.exit_code == 0, result.stderr
    path = tmp_path / "data" / "demo.db.key"
    assert mode(path) == 0o600
    assert "the key is\nin data/demo.db.key, beside the database" in result.stdout
    assert "redaction_key" not in meta(tmp_path / "data" / "demo.db")


def test_settings_never_show_the_key():
    from pipeline.settings import Settings

    key = secrets.token_hex(32)
    assert key not in repr(Settings(redaction_key=key))  # type: ignore[call-arg]
