"""Open a comfysync database and bring its schema up to date, safely.

The table names and columns here are a public contract: exports, Datasette metadata and
users' own SQL depend on them. Migrations only ever move forward; a database whose schema is
newer than this code is refused before anything is written to it, and a SQLite file that
comfysync did not create is never written to at all.

Tables (see README for every column):

* ``runners``: one row per runner ever seen, its current state.
* ``runner_versions``: every version of every runner with validity intervals.
* ``sync_runs``: one row per sync attempt.
* ``rejected_records``: runner objects that could not be stored, with the reason.
* ``comfysync_meta``: schema version and the per-database redaction key.
* ``snapshots``: one row per snapshot file a sync wrote (or failed to write).
* ``runners.raw_fingerprint`` (m005): a keyed digest of each runner as the API last sent it.
* ``account_owners``: every runner owner (``user_id``) the mirror has seen, so a token for
  another account is noticed (m004).

Views and search (``m002_views_and_search``), for people reading the mirror with SQL or
Datasette:

* ``current_runners``: the runners present upstream (``deleted_at`` IS NULL).
* ``runner_changes``: one row per changed field per version, with the old and new value.
* ``runner_tags``: one row per present runner and tag.
* ``runners_fts``: FTS5 over ``runners.name``, ``endpoint`` and ``tags`` (an external-content
  index keyed by the rowid of ``runners``), kept current by ``store.apply_changes`` in the
  same transaction as the changes, not by triggers.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import ComfySyncError, DatabaseError, StorageError
from pipeline.records import KNOWN_STATUSES, TRACKED_FIELDS
from pipeline.settings import DEMO_DB_PATH
from pipeline.sqlite import Database, Migrations

META_TABLE = "comfysync_meta"
BUSY_TIMEOUT_MS = 10_000

migrations = Migrations("comfysync")


@migrations()
def m001_initial(db: Database) -> None:
    text_fields: dict[str, Any] = {name: str for name in TRACKED_FIELDS}
    db.table(META_TABLE).create({"key": str, "value": str}, pk="key")
    db.table(META_TABLE).insert_all(
        [
            {"key": "application", "value": "comfysync"},
            {"key": "redaction_key", "value": secrets.token_hex(32)},
        ]
    )
    db.table("runners").create(
        {
            "id": str,
            **text_fields,
            "first_seen_at": str,
            "deleted_at": str,
            "version": int,
            "content_hash": str,
        },
        pk="id",
        not_null={"version", "content_hash", "first_seen_at"},
    )
    db.table("runner_versions").create(
        {
            "runner_id": str,
            "version": int,
            "change": str,
            "changed_fields": str,
            **text_fields,
            "content_hash": str,
            "valid_from": str,
            "valid_to": str,
            "sync_id": int,
        },
        pk=("runner_id", "version"),
        not_null={"change", "valid_from", "sync_id"},
    )
    db.table("runner_versions").create_index(["sync_id"])
    db.table("runner_versions").create_index(["valid_from"])
    db.table("sync_runs").create(
        {
            "id": int,
            "started_at": str,
            "finished_at": str,
            "status": str,
            "base_url": str,
            "pages": int,
            "walks": int,
            "complete": int,
            "total_reported": int,
            "runners_seen": int,
            "created": int,
            "updated": int,
            "deleted": int,
            "restored": int,
            "unchanged": int,
            "rejected": int,
            "warnings": str,
            "error": str,
        },
        pk="id",
        not_null={"started_at", "status"},
    )
    db.table("rejected_records").create(
        {
            "id": int,
            "sync_id": int,
            "page": int,
            "position": int,
            "runner_id": str,
            "reason": str,
            "raw_json": str,
        },
        pk="id",
        foreign_keys=[("sync_id", "sync_runs", "id")],
    )


#: The ``runners`` columns indexed by ``runners_fts``.
SEARCH_COLUMNS: tuple[str, ...] = ("name", "endpoint", "tags")


def _field_named_by_json_each(alias: str) -> str:
    """A CASE picking the column of ``alias`` that ``f.value`` (a json_each value) names."""
    whens = "".join(f"\n         WHEN '{name}' THEN {alias}.{name}" for name in TRACKED_FIELDS)
    return f"CASE f.value{whens}\n       END"


_CURRENT_RUNNERS = f"""SELECT id, {", ".join(TRACKED_FIELDS)},
       first_seen_at, version, content_hash
  FROM runners
 WHERE deleted_at IS NULL"""

# A created version names every field (old_value NULL), so the new_value rows of one field
# are that field's whole history. A deleted version, or a restoration that changed nothing,
# names no field: the LEFT JOIN keeps it as one row whose field is NULL.
_RUNNER_CHANGES = f"""SELECT v.runner_id, v.name, v.version, v.change, f.value AS field,
       {_field_named_by_json_each("p")} AS old_value,
       {_field_named_by_json_each("v")} AS new_value,
       v.valid_from AS changed_at, v.sync_id
  FROM runner_versions AS v
  LEFT JOIN json_each(v.changed_fields) AS f
  LEFT JOIN runner_versions AS p
         ON p.runner_id = v.runner_id AND p.version = v.version - 1"""

_RUNNER_TAGS = """SELECT r.id AS runner_id, r.name, r.status, t.value AS tag
  FROM runners AS r
  JOIN json_each(r.tags) AS t
 WHERE r.deleted_at IS NULL"""


@migrations()
def m002_views_and_search(db: Database) -> None:
    db.create_view("current_runners", _CURRENT_RUNNERS)
    db.create_view("runner_changes", _RUNNER_CHANGES)
    db.create_view("runner_tags", _RUNNER_TAGS)
    # No triggers: the store re-indexes only the rows a sync changed, set-based, inside the
    # sync's own transaction. enable_fts also indexes the rows an older database already has.
    db.table("runners").enable_fts(list(SEARCH_COLUMNS), create_triggers=False)


@migrations()
def m003_snapshots(db: Database) -> None:
    """The index of snapshot files: what each sync exported, where, and what failed."""
    db.table("snapshots").create(
        {
            "id": int,
            "sync_id": int,
            "format": str,
            "path": str,
            "rows": int,
            "bytes": int,
            "written_at": str,
            "error": str,
        },
        pk="id",
        not_null={"sync_id", "format", "path", "written_at"},
        foreign_keys=[("sync_id", "sync_runs", "id")],
    )


@migrations()
def m004_account_owners(db: Database) -> None:
    """Remember which account the store mirrors: the owners of the runners it has seen.

    Filled from the versions already stored, so an upgraded database is protected from its
    first sync on.
    """
    db.table("account_owners").create(
        {"user_id": str, "first_seen_at": str, "first_sync_id": int},
        pk="user_id",
        not_null={"first_seen_at", "first_sync_id"},
    )
    db.execute(
        "INSERT INTO account_owners (user_id, first_seen_at, first_sync_id) "
        "SELECT user_id, min(valid_from), min(sync_id) FROM runner_versions "
        "WHERE user_id IS NOT NULL GROUP BY user_id"
    )


@migrations()
def m005_raw_fingerprints(db: Database) -> None:
    """``runners.raw_fingerprint``: lets a sync skip parsing runners sent exactly as before.

    NULL for rows stored before it; the next sync fills it in for unchanged runners.
    """
    db.table("runners").add_column("raw_fingerprint", str)


#: The rows ``runners_unusual_status`` indexes, spelled as ``store`` queries them: SQLite
#: uses a partial index only for a query whose WHERE repeats the index's own terms.
UNUSUAL_STATUS = (
    "deleted_at IS NULL AND (status IS NULL OR status NOT IN ("
    + ", ".join(f"'{status}'" for status in sorted(KNOWN_STATUSES))
    + "))"
)


@migrations()
def m006_partial_indexes(db: Database) -> None:
    """Index the few runners every sync asks about: deleted ones and unusual statuses.

    Both are normally none or a handful, yet finding them meant reading the whole
    ``runners`` table twice a sync (0.05 s at 100,000 runners). Partial indexes hold only
    those rows, so they cost nothing to keep while the table grows.
    """
    db.execute("CREATE INDEX runners_deleted ON runners (id) WHERE deleted_at IS NOT NULL")
    db.execute(f"CREATE INDEX runners_unusual_status ON runners (id) WHERE {UNUSUAL_STATUS}")


@migrations()
def m007_page_digests(db: Database) -> None:
    """``page_digests``: the pages the last sync read, so a quiet sync can skip their runners.

    Rewritten by every sync that applies anything (emptied when its walk cannot vouch for
    its pages), so a digest always describes runners as they are stored.
    """
    db.table("page_digests").create(
        {"digest": str, "sync_id": int}, pk="digest", not_null={"sync_id"}
    )


#: Known migrations, in order; the schema version is how many of them a database has.
SCHEMA_VERSION = len(migrations._migrations)


#: Page cache of a writing connection, in KiB. A first sync inserts 100,000 runners under
#: random UUID keys into three B-trees; with SQLite's default 2 MiB cache their index pages
#: keep being spilled and read back (a fifth of the insert time). 32 MiB holds the indexes
#: of 100,000 runners; it is an upper bound, used only as pages are touched, and keeps a
#: first sync's peak memory well under its 300 MB budget.
WRITE_CACHE_KIB = 32768


def _connect(path: Path, *, read_only: bool) -> Database:
    try:
        if read_only:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        else:
            # One sync's transaction is written from two threads in turn (EarlyCreations),
            # never at once: the handover is a join.
            conn = sqlite3.connect(str(path), check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not read_only:
            conn.execute(f"PRAGMA cache_size = -{WRITE_CACHE_KIB}")
    except sqlite3.Error as exc:
        raise sqlite_failure(path, exc) from exc
    return Database(conn)


@contextmanager
def _closed_on_failure(db: Database, path: Path) -> Iterator[None]:
    """Close ``db`` when opening it fails, telling SQLite's failure as one of ours."""
    try:
        yield
    except sqlite3.Error as exc:
        db.close()
        raise sqlite_failure(path, exc) from exc
    except BaseException:
        db.close()
        raise


def schema_version(db: Database) -> int:
    """The schema version recorded in the database (0 for one comfysync never set up)."""
    if not db.table(META_TABLE).exists():
        return 0
    row = db.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def sqlite_failure(path: Path, exc: sqlite3.Error) -> ComfySyncError:
    """The error to show for a SQLite failure on ``path``: the disk's fault or the file's.

    A full or failing disk is a StorageError (exit 4: try again once there is room); a file
    that is not a database, is damaged or cannot be written is a DatabaseError (exit 2).
    """
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR"):
        return StorageError(f"cannot use {path} ({exc}; is the disk full?); nothing was applied")
    if name == "SQLITE_NOTADB":
        return DatabaseError(f"{path} is not a SQLite database ({exc}); pass another --db")
    if name == "SQLITE_CORRUPT":
        return DatabaseError(
            f"{path} is damaged ({exc}); restore it from a backup or pass another --db"
        )
    return DatabaseError(f"cannot open {path} for writing ({exc})")


def _check_writable(path: Path) -> None:
    """Refuse a write-protected --db before SQLite quietly opens it read-only.

    SQLite keeps its ``-wal`` and ``-shm`` files beside the database, so the folder must be
    writable too. ``os.access`` answers for the real user, root included (an immutable file
    or a read-only filesystem is not writable even for root).
    """
    if path.exists() and not os.access(path, os.W_OK):
        raise DatabaseError(f"--db {path} is not writable; fix that or pass another --db")
    if path.parent.exists() and not os.access(path.parent, os.W_OK):
        raise DatabaseError(
            f"--db {path} is in a folder that is not writable ({path.parent}; SQLite keeps "
            "its -wal and -shm files there); fix that or pass another --db"
        )


def _check_usable(db: Database, path: Path) -> int:
    """Refuse, before any write, a file that is not ours or is newer than this code."""
    tables = db.table_names()
    if tables and META_TABLE not in tables:
        raise DatabaseError(
            f"{path} is a SQLite database that comfysync did not create; "
            "pass a new or comfysync --db path"
        )
    version = schema_version(db)
    if version > SCHEMA_VERSION:
        raise DatabaseError(
            f"{path} has schema version {version}, newer than this comfysync knows "
            f"({SCHEMA_VERSION}); upgrade comfysync (the database was left untouched)"
        )
    return version


def prepare_db_path(path: Path) -> None:
    """Check that ``path`` can hold a database comfysync writes, creating its folder if needed.

    Called before anything is written beside the database (the sync lock, the database
    itself), so a bad --db is refused with its own message and leaves no file behind.
    """
    if path.is_dir():
        raise DatabaseError(f"--db {path} is a directory; pass a file path")
    _check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(f"cannot create the folder of --db {path} ({exc.strerror})") from exc


def open_store(path: Path) -> Database:
    """Open (creating if needed) a comfysync database for writing, migrated to SCHEMA_VERSION.

    Idempotent: safe to call on every sync. Sets WAL mode so readers never block the writer
    and a busy timeout so a second writer waits instead of failing at once.
    """
    prepare_db_path(path)
    db = _connect(path, read_only=False)
    with _closed_on_failure(db, path):
        version = _check_usable(db, path)
        if version < SCHEMA_VERSION:
            db.enable_wal()
            migrations.apply(db)
            db.table(META_TABLE).upsert(
                {"key": "schema_version", "value": str(SCHEMA_VERSION)}, pk="key"
            )
        elif db.journal_mode != "wal":
            db.enable_wal()
    return db


@contextmanager
def journal_for_first_sync(db: Database) -> Iterator[None]:
    """Write a store's first sync through SQLite's rollback journal, then go back to WAL.

    Why: in WAL mode every page a sync writes goes to the log first and, at the checkpoint,
    into the database again. A first sync writes only new pages (100 MB at 100,000
    runners), and the rollback journal never copies a page past the file's old end, so
    each is written once: about 0.2 s of a 3.5 s first sync of 100,000 runners. Atomicity
    is the same in both modes. Leaving WAL needs the database to itself, so the switch is
    tried without waiting: a store someone else has open stays in WAL (the sync is only
    slower). While the first sync runs, a reader may wait for its commit, as with any
    rollback journal. WAL comes back as the sync ends; should that fail, ``open_store``
    restores it the next time it opens the store.
    """
    if not _store_is_empty(db) or not _set_journal_mode(db, "delete", wait=False):
        yield
        return
    try:
        yield
    finally:
        _set_journal_mode(db, "wal", wait=True)


def _store_is_empty(db: Database) -> bool:
    [(empty,)] = db.execute("SELECT NOT EXISTS (SELECT 1 FROM runners)")
    return bool(empty)


def _set_journal_mode(db: Database, mode: str, *, wait: bool) -> bool:
    """Switch to ``mode`` ("wal" or "delete") with sqlite-utils' own switches, if SQLite can
    at once (or, with ``wait``, within the busy timeout); True if the store is in it now."""
    conn = db.conn
    if conn.in_transaction:
        return False
    if not wait:
        conn.execute("PRAGMA busy_timeout = 0")
    try:
        if mode == "wal":
            db.enable_wal()
        else:
            db.disable_wal()
    except sqlite3.OperationalError:
        pass  # another connection holds the database: it keeps the mode it has
    finally:
        if not wait:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return db.journal_mode == mode


def open_store_read_only(path: Path) -> Database:
    """Open an existing comfysync database without ever writing to it."""
    if not path.is_file():
        raise DatabaseError(f"no database at {path}; {_how_to_get_one(path)}")
    db = _connect(path, read_only=True)
    with _closed_on_failure(db, path):
        if _check_usable(db, path) == 0:
            raise DatabaseError(f"{path} is empty; create it with `comfysync sync`")
    return db


def _how_to_get_one(missing: Path) -> str:
    """The hint after "no database": the demo's database when one is there to read.

    A newcomer who has only run the demo has ``data/demo.db`` and no mirror of their own, so
    the read commands' default ``--db`` finds nothing; point them at the one they have.
    """
    make = "create one with `comfysync sync`"
    if DEMO_DB_PATH.is_file() and missing.resolve() != DEMO_DB_PATH.resolve():
        return f"{make}, or read the demo's: `--db {DEMO_DB_PATH}`"
    return f"{make} (or try `comfysync demo`)"


def read_meta(db: Database, key: str) -> str | None:
    row = db.execute(f"SELECT value FROM {META_TABLE} WHERE key = ?", [key]).fetchone()
    return str(row[0]) if row else None


def redaction_key(db: Database) -> bytes:
    """The random per-database key under which header secrets are HMAC-redacted."""
    value = read_meta(db, "redaction_key")
    if value is None:
        raise DatabaseError("the database has no redaction key; it was not made by comfysync")
    return bytes.fromhex(value)
