"""The SQL views and the full-text index (migration m002_views_and_search), row by row."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from conftest import rows
from mirror_fixture import Mirror
from sqlite_utils import Database

from pipeline.settings import Settings
from pipeline.store import schema
from pipeline.store.schema import open_store
from pipeline.sync.run import run_sync

FIELDS = (
    "user_id", "name", "status", "endpoint", "tags", "headers", "created_at", "updated_at",
    "extra",
)  # fmt: skip


def search(path: Path, text: str) -> list[str]:
    """Ids of the runners whose name, endpoint or tags match ``text``, as Datasette asks."""
    return [
        str(row[0])
        for row in rows(
            path,
            "SELECT id FROM runners WHERE rowid IN "
            "(SELECT rowid FROM runners_fts WHERE runners_fts MATCH ?) ORDER BY id",
            (text,),
        )
    ]


def assert_index_matches_table(path: Path) -> None:
    """FTS5's own check that the index holds exactly the content table's current values."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("INSERT INTO runners_fts (runners_fts, rank) VALUES ('integrity-check', 1)")
    finally:
        conn.close()
    assert rows(path, "SELECT count(*) FROM runners_fts") == rows(
        path, "SELECT count(*) FROM runners"
    )


def test_current_runners_are_exactly_the_runners_present_upstream(mirror: Mirror):
    found = rows(mirror.path, "SELECT id, name, status, tags FROM current_runners ORDER BY id")
    expected = sorted(
        (r["id"], r["name"], r["status"], json.dumps(r["tags"], separators=(",", ":")))
        for r in mirror.upstream
    )
    assert found == expected
    assert mirror.deleted["id"] not in {row[0] for row in found}


def test_runner_tags_has_one_row_per_present_runner_and_tag(mirror: Mirror):
    found = rows(mirror.path, "SELECT runner_id, name, status, tag FROM runner_tags")
    expected = [
        (r["id"], r["name"], r["status"], tag) for r in mirror.upstream for tag in r["tags"]
    ]
    assert sorted(found) == sorted(expected)
    counts = rows(mirror.path, "SELECT tag, count(*) FROM runner_tags GROUP BY tag")
    assert dict(counts) == Counter(tag for r in mirror.upstream for tag in r["tags"])


def test_runner_changes_of_the_second_sync_are_the_four_known_changes(mirror: Mirror):
    found = rows(
        mirror.path,
        "SELECT runner_id, name, version, change, field, old_value, new_value, changed_at, "
        "sync_id FROM runner_changes WHERE sync_id = 2 ORDER BY runner_id, field",
    )
    at = mirror.applied_at(2)
    renamed, rotated = mirror.renamed_after, mirror.rotated_after
    created = mirror.created
    created_rows = [
        (
            created["id"],
            "fixture-new-runner",
            1,
            "created",
            field,
            None,
            mirror.stored(created["id"], field, 1),
            at,
            2,
        )
        for field in FIELDS
    ]
    expected = [
        *created_rows,
        (mirror.deleted["id"], "flux-batch-ap-8", 2, "deleted", None, None, None, at, 2),
        (renamed["id"], "renamed-runner", 2, "updated", "name", "hunyuan-batch-eu-5",
         "renamed-runner", at, 2),
        (renamed["id"], "renamed-runner", 2, "updated", "updated_at",
         "2024-06-01T00:00:00Z", "2024-06-01T00:00:02Z", at, 2),
        (rotated["id"], "Research H100 Runner 535", 2, "updated", "headers",
         mirror.stored(rotated["id"], "headers", 1), mirror.stored(rotated["id"], "headers", 2),
         at, 2),
        (rotated["id"], "Research H100 Runner 535", 2, "updated", "updated_at",
         "2024-06-01T00:00:00Z", "2024-06-01T00:00:03Z", at, 2),
    ]  # fmt: skip
    assert sorted(found, key=lambda r: (r[0], r[4] or "")) == sorted(
        expected, key=lambda r: (r[0], r[4] or "")
    )
    old_headers, new_headers = (json.loads(str(v)) for v in found_values(mirror, rotated["id"]))
    assert old_headers["Authorization"].startswith("redacted:")
    assert new_headers["Authorization"].startswith("redacted:")
    assert old_headers != new_headers


def found_values(mirror: Mirror, runner_id: str) -> tuple[object, object]:
    [(old, new)] = rows(
        mirror.path,
        "SELECT old_value, new_value FROM runner_changes "
        "WHERE runner_id = ? AND field = 'headers' AND version = 2",
        (runner_id,),
    )
    return old, new


def test_runner_changes_has_every_field_of_every_creation_and_nothing_else_in_sync_1(
    mirror: Mirror,
):
    first = rows(
        mirror.path,
        "SELECT change, field, old_value IS NULL, count(*) FROM runner_changes "
        "WHERE sync_id = 1 GROUP BY change, field ORDER BY field",
    )
    assert first == [("created", field, 1, 12) for field in sorted(FIELDS)]


def test_fts_finds_runners_by_name_endpoint_and_tag(mirror: Mirror):
    by_name = {r["name"]: r["id"] for r in mirror.upstream}
    assert search(mirror.path, '"Research H100 Runner 535"') == [
        by_name["Research H100 Runner 535"]
    ]
    assert search(mirror.path, '"studio-38.example.com"') == [mirror.rotated_after["id"]]
    ever_seen = [*mirror.upstream, mirror.deleted]  # deleted runners stay searchable
    with_flux = sorted(
        r["id"] for r in ever_seen if "flux" in r["tags"] or "flux" in r["name"].lower()
    )
    assert search(mirror.path, "flux") == with_flux


def test_fts_finds_a_renamed_runner_under_its_new_name_only(mirror: Mirror):
    assert search(mirror.path, "renamed") == [mirror.renamed_after["id"]]
    assert search(mirror.path, "hunyuan") == []
    assert_index_matches_table(mirror.path)


def test_a_deleted_runner_stays_searchable(mirror: Mirror):
    assert search(mirror.path, '"flux-batch-ap-8"') == [mirror.deleted["id"]]


def test_fts_follows_restorations_and_renames_over_many_syncs(serve_account, db_path):
    upstream = serve_account(runners=40, seed=21)
    account = upstream.account
    settings = Settings(base_url=upstream.url, token=account.token, db_path=db_path)
    run_sync(settings)
    ids = account.runner_ids()
    gone = account.delete_runner(ids[5])
    account.update_runner(ids[6], tags=["needle-tag"])
    account.rotate_header(ids[7])  # not an indexed field: no re-index needed
    run_sync(settings)
    assert search(db_path, "needle") == [ids[6]]
    account.create_runner(**{**gone, "name": "back-again"})
    account.update_runner(ids[6], tags=[], endpoint="https://haystack.example.org")
    summary = run_sync(settings)
    assert (summary.restored, summary.updated) == (1, 1)
    assert search(db_path, "needle") == []
    assert search(db_path, "haystack") == [ids[6]]
    assert search(db_path, '"back-again"') == [gone["id"]]
    assert search(db_path, '"' + gone["name"] + '"') == []
    assert_index_matches_table(db_path)


def test_the_index_changes_in_the_same_transaction_as_the_rows(serve_account, db_path):
    upstream = serve_account(runners=20, seed=9)
    account = upstream.account
    settings = Settings(base_url=upstream.url, token=account.token, db_path=db_path)
    run_sync(settings)
    renamed = account.runner_ids()[2]
    account.rename_runner(renamed, "never-applied")
    account.create_runner(name="never-created")
    db = open_store(db_path)
    # The run-log row is the last write of apply_changes: failing it must undo the index too.
    db.execute(
        "CREATE TEMP TRIGGER fail_apply BEFORE UPDATE OF finished_at ON sync_runs "
        "WHEN NEW.status <> 'failed' BEGIN SELECT RAISE(ABORT, 'simulated failure at the end of the apply'); END"
    )
    with pytest.raises(sqlite3.IntegrityError, match="simulated failure"):
        run_sync(settings, db=db)
    db.close()
    assert rows(db_path, "SELECT status FROM sync_runs ORDER BY id") == [("success",), ("failed",)]
    assert search(db_path, "never") == []
    assert rows(db_path, "SELECT count(*) FROM runners_fts") == [(20,)]
    assert_index_matches_table(db_path)
    run_sync(settings)
    assert len(search(db_path, "never")) == 2
    assert_index_matches_table(db_path)


def make_m001_database(path: Path, rows_from: Path) -> None:
    """A database as comfysync made it before m002, holding the mirror in ``rows_from``.

    The rows are copied from a real sync: code that syncs today also maintains the index,
    which an m001 database does not have yet.
    """
    old = Database(path)
    old.enable_wal()
    schema.migrations.apply(old, stop_before="m002_views_and_search")
    old.execute("ATTACH DATABASE ? AS synced", [str(rows_from)])
    with old.atomic():
        old.execute("DELETE FROM comfysync_meta")
        for table in ("comfysync_meta", "runners", "runner_versions", "sync_runs"):
            columns = ", ".join(old.table(table).columns_dict)  # the m001 columns only
            old.execute(f"INSERT INTO main.{table} SELECT {columns} FROM synced.{table}")
        old.execute("UPDATE comfysync_meta SET value = '1' WHERE key = 'schema_version'")
    old.execute("DETACH DATABASE synced")
    assert "runners_fts" not in old.table_names() and old.view_names() == []
    assert schema.schema_version(old) == 1
    old.close()


def test_a_database_made_before_m002_migrates_forward_with_views_and_index(
    serve_account, tmp_path: Path
):
    upstream = serve_account(runners=25, seed=4)
    account = upstream.account
    run_sync(Settings(base_url=upstream.url, token=account.token, db_path=tmp_path / "new.db"))
    path = tmp_path / "old.db"
    make_m001_database(path, tmp_path / "new.db")
    # The key its rows were made under, beside it.
    shutil.copy(tmp_path / "new.db.key", tmp_path / "old.db.key")

    migrated = open_store(path)
    assert schema.schema_version(migrated) == schema.SCHEMA_VERSION == 10
    assert sorted(migrated.view_names()) == ["current_runners", "runner_changes", "runner_tags"]
    migrated.close()
    first = account.list_runners()[0]
    assert search(path, '"' + first["name"] + '"') == [first["id"]]
    assert_index_matches_table(path)
    assert rows(path, "SELECT count(*) FROM current_runners") == [(25,)]
    assert rows(path, "SELECT count(*) FROM runner_changes") == [(25 * len(FIELDS),)]

    # And the next sync keeps the migrated index current.
    account.rename_runner(first["id"], "after-migration")
    summary = run_sync(Settings(base_url=upstream.url, token=account.token, db_path=path))
    assert (summary.updated, summary.unchanged) == (1, 24)
    assert search(path, "migration") == [first["id"]]
    assert search(path, '"' + first["name"] + '"') == []
    assert_index_matches_table(path)


def test_views_are_read_only_and_the_index_is_not_maintained_by_triggers(tmp_path: Path):
    db = open_store(tmp_path / "m.db")
    assert [t.name for t in db.triggers] == []
    with pytest.raises(sqlite3.OperationalError, match="cannot modify current_runners"):
        db.execute("DELETE FROM current_runners")
