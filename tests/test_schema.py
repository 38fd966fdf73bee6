"""The database's shape is a public contract: asserted exactly, and opened safely."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlite_utils import Database

from pipeline.errors import DatabaseError
from pipeline.store.meta import read_meta
from pipeline.store.schema import SCHEMA_VERSION, open_store, open_store_read_only

EXPECTED_SCHEMA = """CREATE TABLE "_sqlite_migrations" (
   "id" INTEGER PRIMARY KEY,
   "migration_set" TEXT,
   "name" TEXT,
   "applied_at" TEXT
);
CREATE UNIQUE INDEX "idx__sqlite_migrations_migration_set_name"
    ON "_sqlite_migrations" ("migration_set", "name");
CREATE TABLE "comfysync_meta" (
   "key" TEXT PRIMARY KEY,
   "value" TEXT
);
CREATE TABLE "runners" (
   "id" TEXT PRIMARY KEY,
   "user_id" TEXT,
   "name" TEXT,
   "status" TEXT,
   "endpoint" TEXT,
   "tags" TEXT,
   "headers" TEXT,
   "created_at" TEXT,
   "updated_at" TEXT,
   "extra" TEXT,
   "first_seen_at" TEXT NOT NULL,
   "deleted_at" TEXT,
   "version" INTEGER NOT NULL,
   "content_hash" TEXT NOT NULL
, "raw_fingerprint" TEXT);
CREATE TABLE "runner_versions" (
   "runner_id" TEXT,
   "version" INTEGER,
   "change" TEXT NOT NULL,
   "changed_fields" TEXT,
   "user_id" TEXT,
   "name" TEXT,
   "status" TEXT,
   "endpoint" TEXT,
   "tags" TEXT,
   "headers" TEXT,
   "created_at" TEXT,
   "updated_at" TEXT,
   "extra" TEXT,
   "content_hash" TEXT,
   "valid_from" TEXT NOT NULL,
   "valid_to" TEXT,
   "sync_id" INTEGER NOT NULL,
   PRIMARY KEY ("runner_id", "version")
);
CREATE INDEX "idx_runner_versions_sync_id"
    ON "runner_versions" ("sync_id");
CREATE INDEX "idx_runner_versions_valid_from"
    ON "runner_versions" ("valid_from");
CREATE TABLE "sync_runs" (
   "id" INTEGER PRIMARY KEY,
   "started_at" TEXT NOT NULL,
   "finished_at" TEXT,
   "status" TEXT NOT NULL,
   "base_url" TEXT,
   "pages" INTEGER,
   "walks" INTEGER,
   "complete" INTEGER,
   "total_reported" INTEGER,
   "runners_seen" INTEGER,
   "created" INTEGER,
   "updated" INTEGER,
   "deleted" INTEGER,
   "restored" INTEGER,
   "unchanged" INTEGER,
   "rejected" INTEGER,
   "warnings" TEXT,
   "error" TEXT
);
CREATE TABLE "rejected_records" (
   "id" INTEGER PRIMARY KEY,
   "sync_id" INTEGER REFERENCES "sync_runs"("id"),
   "page" INTEGER,
   "position" INTEGER,
   "runner_id" TEXT,
   "reason" TEXT,
   "raw_json" TEXT
);
CREATE VIEW "current_runners" AS SELECT id, user_id, name, status, endpoint, tags, headers, created_at, updated_at, extra,
       first_seen_at, version, content_hash
  FROM runners
 WHERE deleted_at IS NULL;
CREATE VIEW "runner_changes" AS SELECT v.runner_id, v.name, v.version, v.change, f.value AS field,
       CASE f.value
         WHEN 'user_id' THEN p.user_id
         WHEN 'name' THEN p.name
         WHEN 'status' THEN p.status
         WHEN 'endpoint' THEN p.endpoint
         WHEN 'tags' THEN p.tags
         WHEN 'headers' THEN p.headers
         WHEN 'created_at' THEN p.created_at
         WHEN 'updated_at' THEN p.updated_at
         WHEN 'extra' THEN p.extra
       END AS old_value,
       CASE f.value
         WHEN 'user_id' THEN v.user_id
         WHEN 'name' THEN v.name
         WHEN 'status' THEN v.status
         WHEN 'endpoint' THEN v.endpoint
         WHEN 'tags' THEN v.tags
         WHEN 'headers' THEN v.headers
         WHEN 'created_at' THEN v.created_at
         WHEN 'updated_at' THEN v.updated_at
         WHEN 'extra' THEN v.extra
       END AS new_value,
       v.valid_from AS changed_at, v.sync_id
  FROM runner_versions AS v
  LEFT JOIN json_each(v.changed_fields) AS f
  LEFT JOIN runner_versions AS p
         ON p.runner_id = v.runner_id AND p.version = v.version - 1;
CREATE VIEW "runner_tags" AS SELECT r.id AS runner_id, r.name, r.status, t.value AS tag
  FROM runners AS r
  JOIN json_each(r.tags) AS t
 WHERE r.deleted_at IS NULL;
CREATE VIRTUAL TABLE "runners_fts" USING FTS5 (
    "name", "endpoint", "tags",
    content="runners"
);
CREATE TABLE 'runners_fts_data'(id INTEGER PRIMARY KEY, block BLOB);
CREATE TABLE 'runners_fts_idx'(segid, term, pgno, PRIMARY KEY(segid, term)) WITHOUT ROWID;
CREATE TABLE 'runners_fts_docsize'(id INTEGER PRIMARY KEY, sz BLOB);
CREATE TABLE 'runners_fts_config'(k PRIMARY KEY, v) WITHOUT ROWID;
CREATE TABLE "snapshots" (
   "id" INTEGER PRIMARY KEY,
   "sync_id" INTEGER NOT NULL REFERENCES "sync_runs"("id"),
   "format" TEXT NOT NULL,
   "path" TEXT NOT NULL,
   "rows" INTEGER,
   "bytes" INTEGER,
   "written_at" TEXT NOT NULL,
   "error" TEXT
, "same_as_sync_id" INTEGER, "csv_safe" INTEGER);
CREATE TABLE "account_owners" (
   "user_id" TEXT PRIMARY KEY,
   "first_seen_at" TEXT NOT NULL,
   "first_sync_id" INTEGER NOT NULL
);
CREATE INDEX runners_deleted ON runners (id) WHERE deleted_at IS NOT NULL;
CREATE INDEX runners_unusual_status ON runners (id) WHERE deleted_at IS NULL AND (status IS NULL OR status NOT IN ('active', 'disabled'));
CREATE TABLE "page_digests" (
   "digest" TEXT PRIMARY KEY,
   "sync_id" INTEGER NOT NULL
);"""


def test_a_new_database_has_exactly_the_documented_schema(tmp_path: Path):
    db = open_store(tmp_path / "new.db")
    assert db.schema == EXPECTED_SCHEMA
    assert db.journal_mode == "wal"
    assert read_meta(db, "schema_version") == str(SCHEMA_VERSION) == "10"
    assert read_meta(db, "application") == "comfysync"
    # The redaction key never enters the database: the first sync writes <db>.key.
    assert db.execute("SELECT key FROM comfysync_meta ORDER BY key").fetchall() == [
        ("application",),
        ("schema_version",),
    ]


def test_opening_again_is_idempotent(tmp_path: Path):
    first = open_store(tmp_path / "m.db")
    first.close()
    again = open_store(tmp_path / "m.db")
    assert again.schema == EXPECTED_SCHEMA
    assert again.execute("SELECT count(*) FROM _sqlite_migrations").fetchone() == (10,)


def test_read_only_opening_never_creates_or_writes(tmp_path: Path):
    with pytest.raises(DatabaseError, match="comfysync sync"):
        open_store_read_only(tmp_path / "absent.db")
    assert not (tmp_path / "absent.db").exists()
    open_store(tmp_path / "m.db").close()
    db = open_store_read_only(tmp_path / "m.db")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        db.execute("DELETE FROM runners")


def test_a_foreign_sqlite_database_is_refused_untouched(tmp_path: Path):
    path = tmp_path / "theirs.db"
    Database(path)["notes"].insert({"text": "mine"})
    before = path.read_bytes()
    for opener in (open_store, open_store_read_only):
        with pytest.raises(DatabaseError, match="did not create"):
            opener(path)
    assert path.read_bytes() == before


def test_a_version_1_database_is_upgraded_with_the_snapshots_table_and_keeps_its_rows(
    tmp_path: Path,
):
    from pipeline.store.meta import META_TABLE
    from pipeline.store.schema import migrations

    path = tmp_path / "old.db"
    old = Database(path)
    migrations.apply(old, stop_before="m003_snapshots")
    old.table(META_TABLE).upsert({"key": "schema_version", "value": "1"}, pk="key")
    old.execute(
        "INSERT INTO sync_runs (started_at, status) VALUES ('2026-01-01T00:00:00Z', 'success')"
    )
    old.conn.commit()
    assert "snapshots" not in old.table_names()
    old.close()

    upgraded = open_store(path)
    assert upgraded.schema == EXPECTED_SCHEMA
    assert read_meta(upgraded, "schema_version") == str(SCHEMA_VERSION)
    assert upgraded.execute("SELECT id, status FROM sync_runs").fetchall() == [(1, "success")]
