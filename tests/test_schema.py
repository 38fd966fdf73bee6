"""The database's shape is a public contract: asserted exactly, and opened safely."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlite_utils import Database

from pipeline.errors import DatabaseError
from pipeline.schema import SCHEMA_VERSION, open_store, open_store_read_only, read_meta

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
);
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
CREATE TABLE "account_owners" (
   "user_id" TEXT PRIMARY KEY,
   "first_seen_at" TEXT NOT NULL,
   "first_sync_id" INTEGER NOT NULL
);"""


def test_a_new_database_has_exactly_the_documented_schema(tmp_path: Path):
    db = open_store(tmp_path / "new.db")
    assert db.schema == EXPECTED_SCHEMA
    assert db.journal_mode == "wal"
    assert read_meta(db, "schema_version") == str(SCHEMA_VERSION) == "2"
    assert read_meta(db, "application") == "comfysync"
    assert len(bytes.fromhex(read_meta(db, "redaction_key") or "")) == 32


def test_opening_again_is_idempotent_and_keeps_the_redaction_key(tmp_path: Path):
    first = open_store(tmp_path / "m.db")
    key = read_meta(first, "redaction_key")
    first.close()
    again = open_store(tmp_path / "m.db")
    assert again.schema == EXPECTED_SCHEMA and read_meta(again, "redaction_key") == key
    assert again.execute("SELECT count(*) FROM _sqlite_migrations").fetchone() == (2,)


def test_each_database_gets_its_own_redaction_key(tmp_path: Path):
    keys = {read_meta(open_store(tmp_path / f"{n}.db"), "redaction_key") for n in range(3)}
    assert len(keys) == 3


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
