"""The one write path into a comfysync database, and the reads the sync needs.

Invariants this module guarantees:

* ``apply_changes`` writes a sync's runners, versions, rejected records and its run-log row
  in one transaction: all of it lands or none of it does. New runners may already have been
  written into that same transaction during the walk (``pipeline.store.early``); it commits
  them with the rest, or a rollback takes them back with the rest.
* Unchanged runners are never rewritten; a quiet re-sync writes only its run-log row.
* Versions of a runner are numbered 1, 2, 3, ... with ``valid_from``/``valid_to`` intervals
  that touch end to end; exactly one version, the current one, has ``valid_to`` NULL.
* A deleted runner keeps its row with ``deleted_at`` set and gets a ``deleted`` version that
  repeats its last known fields; a runner that comes back gets a ``restored`` version.
* ``record_snapshots`` indexes the snapshot files a sync wrote after its changes were
  committed; it never touches the sync's own rows.
* ``runners_fts`` indexes exactly the current ``name``, ``endpoint`` and ``tags`` of every row
  of ``runners`` (deleted runners stay searchable), and changes in the same transaction.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import orjson

from pipeline.errors import StorageError
from pipeline.source.records import TRACKED_FIELDS, RunnerRecord
from pipeline.store.changeset import ChangeSet, Decision, Revision, StoredState
from pipeline.store.schema import (
    ABANDONED_RUN_ERROR,
    SEARCH_COLUMNS,
    UNUSUAL_STATUS,
)
from pipeline.store.sqlite import Database

if TYPE_CHECKING:
    from pipeline.outputs.snapshot import SnapshotFile

_FIELDS = ", ".join(TRACKED_FIELDS)
_MARKS = ", ".join("?" for _ in TRACKED_FIELDS)
_ASSIGN = ", ".join(f"{name} = ?" for name in TRACKED_FIELDS)
_ALL_FIELDS_JSON = orjson.dumps(list(TRACKED_FIELDS)).decode()
_CHUNK = 500
#: Values bound per runner row inserted, and rows per INSERT (below SQLite's variable limit).
_INSERT_WIDTH = len(TRACKED_FIELDS) + 4
_ROWS_PER_INSERT = 2000
_VARIABLE_LIMIT = sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER
_SEARCH = ", ".join(SEARCH_COLUMNS)


def load_present_fingerprints(db: Database) -> dict[str, str | None]:
    """id -> raw fingerprint of every present runner: all a quiet sync compares against.

    SQLite writes them as one JSON object and orjson reads it back, both in C: cheaper than
    building the dict row by row from a cursor.
    """
    [(text,)] = db.execute(
        "SELECT json_group_object(id, raw_fingerprint) FROM runners WHERE deleted_at IS NULL"
    )
    fingerprints: dict[str, str | None] = orjson.loads(text)
    return fingerprints


def load_page_digests(db: Database) -> set[str]:
    """Digests of the pages the last applied sync read and vouched for (``page_digests``)."""
    return {row[0] for row in db.execute("SELECT digest FROM page_digests")}


def load_stored_states(db: Database, ids: Sequence[str]) -> dict[str, StoredState]:
    """What the store knows of the given runners (those the walk parsed), in one query."""
    if not ids:
        return {}
    rows = db.execute(
        "SELECT r.id, r.content_hash, r.deleted_at IS NOT NULL, r.version, r.raw_fingerprint "
        "FROM json_each(?) AS wanted JOIN runners AS r ON r.id = wanted.value",
        [orjson.dumps(ids).decode()],
    )
    return {row[0]: StoredState(row[1], bool(row[2]), row[3], row[4]) for row in rows}


def load_deleted_ids(db: Database) -> set[str]:
    """Runners the store holds as deleted."""
    return {
        row[0]
        for row in db.execute(
            "SELECT id FROM runners INDEXED BY runners_deleted WHERE deleted_at IS NOT NULL"
        )
    }


def load_unknown_status_ids(db: Database) -> set[str]:
    """Present runners whose status is neither active nor disabled (normally none)."""
    return {
        row[0]
        for row in db.execute(
            f"SELECT id FROM runners INDEXED BY runners_unusual_status WHERE {UNUSUAL_STATUS}"
        )
    }


def load_stored_fields(db: Database, ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """The tracked fields of the given runners, for naming what changed."""
    fields: dict[str, dict[str, str]] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        marks = ", ".join("?" for _ in chunk)
        cursor = db.execute(f"SELECT id, {_FIELDS} FROM runners WHERE id IN ({marks})", chunk)
        for row in cursor:
            fields[row[0]] = dict(zip(TRACKED_FIELDS, row[1:], strict=True))
    return fields


def load_known_owners(db: Database) -> set[str]:
    """The owners (``user_id``) of every runner this store has ever mirrored."""
    return {row[0] for row in db.execute("SELECT user_id FROM account_owners")}


def begin_run(db: Database, *, base_url: str, started_at: str) -> int:
    """Record a sync as ``running`` and return its id (committed at once: survives a crash).

    Raises StorageError if SQLite cannot write (a full disk), before anything else happened.
    """
    try:
        with db.atomic():
            cursor = db.execute(
                "INSERT INTO sync_runs (started_at, status, base_url) VALUES (?, 'running', ?)",
                [started_at, base_url],
            )
    except sqlite3.OperationalError as exc:
        raise StorageError(f"could not write the database ({exc}); nothing was applied") from exc
    return int(cursor.lastrowid or 0)


def record_failed_run(db: Database, sync_id: int, *, error: str, finished_at: str) -> None:
    """Mark a run ``failed``: the only write a failed sync makes (StorageError if it cannot)."""
    try:
        with db.atomic():
            db.execute(
                "UPDATE sync_runs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                [finished_at, error, sync_id],
            )
    except sqlite3.OperationalError as exc:
        raise StorageError(f"could not record the failed run ({exc})") from exc


def close_abandoned_runs(db: Database, *, finished_at: str) -> int:
    """Mark ``failed`` every run still ``running``, and return how many there were.

    Only call it holding the database's sync lock: then no other sync is live, so a
    ``running`` row is one whose process died mid-sync (its changes, never committed, were
    rolled back by SQLite), and the run log should say so rather than "running" forever.
    """
    with db.atomic():
        cursor = db.execute(
            "UPDATE sync_runs SET status = 'failed', finished_at = ?, error = ? "
            "WHERE status = 'running'",
            [finished_at, ABANDONED_RUN_ERROR],
        )
    return int(cursor.rowcount)


def apply_changes(
    db: Database,
    decision: Decision,
    *,
    sync_id: int,
    applied_at: str,
    finished_at: str | None = None,
    written_early: Collection[str] = (),
) -> None:
    """Write a sync's decision and close its run-log row, in one transaction.

    ``written_early`` are the ids of the runners already written during the walk
    (``pipeline.store.early``, finished), in the transaction this call commits: those the
    decision does not keep as written (``ChangeSet.created_early``) are taken back.
    ``applied_at`` is every change's time, ``finished_at`` (default ``applied_at``) closes
    the run-log row.
    Raises StorageError (and leaves the database as it was) if SQLite cannot write.
    """
    conn = db.conn
    changes, outcome = decision.changes, decision.outcome
    try:
        reindexed = _ids_to_reindex(changes)
        with _transaction(db):
            conn.executemany(
                "INSERT OR IGNORE INTO account_owners (user_id, first_seen_at, first_sync_id) "
                "VALUES (?, ?, ?)",
                [(owner, applied_at, sync_id) for owner in sorted(decision.owners)],
            )
            if len(changes.created_early) < len(written_early):
                kept = set(changes.created_early)
                _remove_created([i for i in written_early if i not in kept], conn)
            insert_created(conn, changes.created, sync_id, applied_at)
            # An external-content FTS5 entry is removed by repeating the values it indexed,
            # so the old entries go before the rows change and the new ones go in after.
            _update_search_index(conn, reindexed, "remove")
            _insert_revisions(conn, changes.updated, "updated", sync_id, applied_at)
            _insert_revisions(conn, changes.restored, "restored", sync_id, applied_at)
            _update_search_index(conn, reindexed, "add")
            _mark_deleted(conn, changes.deleted, sync_id, applied_at)
            _refingerprint(conn, changes.refingerprinted)
            conn.execute("DELETE FROM page_digests")
            conn.executemany(
                "INSERT OR IGNORE INTO page_digests (digest, sync_id) VALUES (?, ?)",
                [(digest, sync_id) for digest in decision.page_digests],
            )
            conn.executemany(
                "INSERT INTO rejected_records (sync_id, page, position, runner_id, reason, "
                "raw_json) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (sync_id, r.page, r.position, r.runner_id, r.reason, r.raw_json)
                    for r in decision.rejections
                ],
            )
            conn.execute(
                "UPDATE sync_runs SET finished_at = ?, status = ?, pages = ?, walks = ?, "
                "complete = ?, total_reported = ?, runners_seen = ?, created = ?, updated = ?, "
                "deleted = ?, restored = ?, unchanged = ?, rejected = ?, warnings = ? "
                "WHERE id = ?",
                [
                    finished_at or applied_at,
                    outcome.status,
                    outcome.pages,
                    outcome.walks,
                    int(outcome.complete),
                    outcome.total_reported,
                    outcome.runners_seen,
                    changes.created_count,
                    len(changes.updated),
                    len(changes.deleted),
                    len(changes.restored),
                    changes.unchanged,
                    outcome.rejected,
                    orjson.dumps(list(outcome.warnings)).decode() if outcome.warnings else None,
                    sync_id,
                ],
            )
    except sqlite3.OperationalError as exc:
        raise StorageError(f"could not write the database ({exc}); nothing was applied") from exc


@contextmanager
def _transaction(db: Database) -> Iterator[None]:
    """The sync's transaction: the one its early writes began, or a new one."""
    if not db.conn.in_transaction:
        with db.atomic():
            yield
        return
    try:
        yield
        db.conn.commit()
    except BaseException:
        db.conn.rollback()
        raise


def record_snapshots(db: Database, files: Iterable[SnapshotFile], *, csv_safe: bool) -> None:
    """Index snapshot files (written, failed or kept) in ``snapshots``, in one transaction.

    Paths are stored absolute, so the index means the same thing whatever directory a later
    reader runs in; object-store URLs (``s3://...``) are absolute already. A CSV file's row
    says whether it was written ``csv_safe`` (a kept one was: it had to match). Raises
    StorageError if SQLite cannot write.
    """
    try:
        with db.atomic():
            db.conn.executemany(
                "INSERT INTO snapshots (sync_id, format, path, rows, bytes, written_at, error, "
                "same_as_sync_id, csv_safe) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        f.sync_id,
                        f.format,
                        f.path if "://" in f.path else os.path.abspath(f.path),
                        f.rows,
                        f.bytes,
                        f.written_at,
                        f.error,
                        f.same_as_sync_id,
                        int(csv_safe) if f.format == "csv" else None,
                    )
                    for f in files
                ],
            )
    except sqlite3.OperationalError as exc:
        raise StorageError(f"could not record the snapshot files ({exc})") from exc


#: ``comfysync_meta``: page requests retried by every sync of the database so far.
RETRIES_META = "retries_total"


def record_run_afterwards(
    db: Database, sync_id: int | None, *, warnings: Sequence[str], retries: int
) -> None:
    """Add what was learnt after a sync ended to its record, in one transaction.

    ``warnings`` (a notifier or a ping that failed) are appended to the run's ``warnings``;
    ``retries`` are added to the database's running count (``RETRIES_META``), which a failed
    sync's run-log row has no column for. Raises StorageError if SQLite cannot write.
    """
    try:
        with db.atomic():
            if warnings and sync_id is not None:
                query = "SELECT warnings FROM sync_runs WHERE id = ?"
                row = db.execute(query, [sync_id]).fetchone()
                if row is not None:
                    known = orjson.loads(row[0]) if row[0] else []
                    db.execute(
                        "UPDATE sync_runs SET warnings = ? WHERE id = ?",
                        [orjson.dumps([*known, *warnings]).decode(), sync_id],
                    )
            if retries:
                db.execute(
                    "INSERT INTO comfysync_meta (key, value) VALUES (?, ?) ON CONFLICT(key) "
                    "DO UPDATE SET value = CAST(value AS INTEGER) + excluded.value",
                    [RETRIES_META, str(retries)],
                )
    except sqlite3.OperationalError as exc:
        raise StorageError(f"could not record what followed the sync ({exc})") from exc


def insert_created(
    conn: sqlite3.Connection, created: Sequence[RunnerRecord], sync_id: int, now: str
) -> None:
    """New runners: their rows, first versions and search entries (the apply's, and the
    early writes' during the walk)."""
    if not created:
        return
    last_rowid = conn.execute("SELECT coalesce(max(rowid), 0) FROM runners").fetchone()[0]
    one_row = f"(?, {_MARKS}, ?, NULL, 1, ?, ?)"
    per_statement = max(1, min(_ROWS_PER_INSERT, conn.getlimit(_VARIABLE_LIMIT) // _INSERT_WIDTH))
    for start in range(0, len(created), per_statement):
        chunk = created[start : start + per_statement]
        conn.execute(
            f"INSERT INTO runners (id, {_FIELDS}, first_seen_at, deleted_at, version, "
            "content_hash, raw_fingerprint) VALUES " + ", ".join([one_row] * len(chunk)),
            list(
                itertools.chain.from_iterable(
                    (r.id, *r.values, now, r.content_hash, r.fingerprint or None) for r in chunk
                )
            ),
        )
    # Their first versions are copies of the rows just inserted: one set-based statement
    # instead of binding every value a second time (new rows get rowids above the previous
    # largest, so they are exactly those above it).
    conn.execute(
        f"INSERT INTO runner_versions (runner_id, version, change, changed_fields, {_FIELDS}, "
        f"content_hash, valid_from, valid_to, sync_id) "
        f"SELECT id, 1, 'created', ?, {_FIELDS}, content_hash, ?, NULL, ? "
        "FROM runners WHERE rowid > ? ORDER BY rowid",
        [_ALL_FIELDS_JSON, now, sync_id, last_rowid],
    )
    _index_rows_after(conn, last_rowid)


def _remove_created(ids: Sequence[str], conn: sqlite3.Connection) -> None:
    """Take back runners written early that the sync does not create as written."""
    if not ids:
        return
    _update_search_index(conn, ids, "remove")
    wanted = orjson.dumps(list(ids)).decode()
    conn.execute(
        "DELETE FROM runner_versions WHERE runner_id IN (SELECT value FROM json_each(?))", [wanted]
    )
    conn.execute("DELETE FROM runners WHERE id IN (SELECT value FROM json_each(?))", [wanted])


def _refingerprint(conn: sqlite3.Connection, fingerprints: Sequence[tuple[str, str]]) -> None:
    """Record the raw fingerprint of unchanged runners whose stored one is out of date."""
    conn.executemany(
        "UPDATE runners SET raw_fingerprint = ? WHERE id = ?",
        [(fingerprint, runner_id) for runner_id, fingerprint in fingerprints],
    )


def _close_current_versions(conn: sqlite3.Connection, ids: Iterable[str], now: str) -> None:
    conn.executemany(
        "UPDATE runner_versions SET valid_to = ? WHERE runner_id = ? AND valid_to IS NULL",
        [(now, runner_id) for runner_id in ids],
    )


def _insert_revisions(
    conn: sqlite3.Connection,
    revisions: Sequence[Revision],
    change: str,
    sync_id: int,
    now: str,
) -> None:
    if not revisions:
        return
    _close_current_versions(conn, (rev.record.id for rev in revisions), now)
    conn.executemany(
        f"UPDATE runners SET {_ASSIGN}, content_hash = ?, raw_fingerprint = ?, "
        "deleted_at = NULL, version = version + 1 WHERE id = ?",
        [
            (*r.record.values, r.record.content_hash, r.record.fingerprint or None, r.record.id)
            for r in revisions
        ],
    )
    conn.executemany(
        f"INSERT INTO runner_versions (runner_id, version, change, changed_fields, {_FIELDS}, "
        f"content_hash, valid_from, valid_to, sync_id) "
        f"SELECT id, version, ?, ?, {_FIELDS}, content_hash, ?, NULL, ? "
        "FROM runners WHERE id = ?",
        [
            (change, orjson.dumps(list(rev.changed_fields)).decode(), now, sync_id, rev.record.id)
            for rev in revisions
        ],
    )


def _mark_deleted(conn: sqlite3.Connection, deleted: Sequence[str], sync_id: int, now: str) -> None:
    if not deleted:
        return
    _close_current_versions(conn, deleted, now)
    conn.executemany(
        "UPDATE runners SET deleted_at = ?, version = version + 1 WHERE id = ?",
        [(now, runner_id) for runner_id in deleted],
    )
    conn.executemany(
        f"INSERT INTO runner_versions (runner_id, version, change, changed_fields, {_FIELDS}, "
        f"content_hash, valid_from, valid_to, sync_id) "
        f"SELECT id, version, 'deleted', '[]', {_FIELDS}, content_hash, ?, NULL, ? "
        "FROM runners WHERE id = ?",
        [(now, sync_id, runner_id) for runner_id in deleted],
    )


def _ids_to_reindex(changes: ChangeSet) -> list[str]:
    """Stored runners whose indexed fields this sync changes (a header rotation is not one)."""
    searched = set(SEARCH_COLUMNS)
    return [
        rev.record.id
        for rev in (*changes.updated, *changes.restored)
        if searched.intersection(rev.changed_fields)
    ]


def _index_rows_after(conn: sqlite3.Connection, last_rowid: int) -> None:
    """Index the runners just created: SQLite gives new rows rowids above the previous maximum
    (committed runners are never deleted), so one range scan in rowid order finds them."""
    conn.execute(
        f"INSERT INTO runners_fts (rowid, {_SEARCH}) "
        f"SELECT rowid, {_SEARCH} FROM runners WHERE rowid > ? ORDER BY rowid",
        [last_rowid],
    )


def _update_search_index(conn: sqlite3.Connection, ids: Sequence[str], action: str) -> None:
    """Add (or remove) the ``runners_fts`` entries of ``ids``, from their current rows.

    One statement for all the ids (passed as one JSON array), in rowid order: FTS5 flushes
    its pending terms whenever a rowid goes backwards, so any other order costs far more.
    """
    if not ids:
        return
    command, target = ("'delete', ", "runners_fts, ") if action == "remove" else ("", "")
    conn.execute(
        f"INSERT INTO runners_fts ({target}rowid, {_SEARCH}) "
        f"SELECT {command}rowid, {_SEARCH} FROM runners "
        "WHERE id IN (SELECT value FROM json_each(?)) ORDER BY rowid",
        [orjson.dumps(list(ids)).decode()],
    )
