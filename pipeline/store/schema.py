"""Open a comfysync database and bring its schema up to date, safely.

The table names and columns here are a public contract: exports, Datasette metadata and
users' own SQL depend on them. Migrations only ever move forward; a database whose schema is
newer than this code is refused before anything is written to it, and a SQLite file that
comfysync did not create is never written to at all.

The tables are ``runners`` (each runner's current state), ``runner_versions`` (every
version, with validity intervals), ``sync_runs`` (the run log), ``rejected_records``,
``snapshots``, ``account_owners``, ``page_digests`` and ``comfysync_meta``; the views
``current_runners``, ``runner_changes`` and ``runner_tags``; and ``runners_fts``, kept current
by ``store.write`` in each sync's own transaction. The migrations below say why each came;
docs/data-model.md describes every column.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import ComfySyncError, DatabaseError, StorageError
from pipeline.settings import DEMO_DB_PATH
from pipeline.source.records import (
    KNOWN_STATUSES,
    TRACKED_FIELDS,
    content_hash,
    normalise_timestamp,
    timestamp_text,
)
from pipeline.store import keyfile
from pipeline.store.meta import META_TABLE, SNAPSHOTS_REUSABLE_AFTER, read_meta, write_meta
from pipeline.store.sqlite import Database, Migrations
from pipeline.times import utc_instant

BUSY_TIMEOUT_MS = 10_000

migrations = Migrations("comfysync")

#: ``sync_runs.error`` of a run whose process ended before finishing it (killed, or the
#: power went): set by the next sync, and shown by the read side for such a run.
ABANDONED_RUN_ERROR = (
    "abandoned: the process ended before finishing (killed or power loss); nothing was applied"
)


@migrations()
def m001_initial(db: Database) -> None:
    text_fields: dict[str, Any] = {name: str for name in TRACKED_FIELDS}
    db.table(META_TABLE).create({"key": str, "value": str}, pk="key")
    # Databases made before m009 also got their redaction key here; m009 moves it out.
    db.table(META_TABLE).insert({"key": "application", "value": "comfysync"})
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


#: The rows ``runners_unusual_status`` indexes, spelled as ``store.write`` queries them: SQLite
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
    ``runners`` table twice a sync. Partial indexes hold only those rows, so they cost
    nothing to keep while the table grows.
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


@migrations()
def m008_canonical_timestamps(db: Database) -> None:
    """Runner times in the one stored form, with the content hashes of the rows rewritten.

    Older versions stored ``created_at``/``updated_at`` as the API spelt them, which the
    pandas API could not always read and which made a respelling look like a change. Rows
    already canonical are left untouched, so their hashes stay valid. The raw fingerprints
    are kept: the bytes they vouch for now parse to the values stored here (or, for a date
    alone, are rejected, which a sync only does once they change).
    """
    time_columns = (TRACKED_FIELDS.index("created_at"), TRACKED_FIELDS.index("updated_at"))
    fields = ", ".join(TRACKED_FIELDS)
    assign = ", ".join(f"{name} = ?" for name in TRACKED_FIELDS)
    for table in ("runners", "runner_versions"):
        rewritten = []
        for rowid, *values in db.execute(f"SELECT rowid, {fields} FROM {table}"):
            new_values = list(values)
            for column in time_columns:
                new_values[column] = _legacy_time_in_stored_form(values[column])
            if new_values != values:
                rewritten.append((*new_values, content_hash(tuple(new_values)), rowid))
        db.conn.executemany(
            f"UPDATE {table} SET {assign}, content_hash = ? WHERE rowid = ?", rewritten
        )


def _legacy_time_in_stored_form(value: str | None) -> str | None:
    """A time an older version stored, in the stored form; as it was if it reads as no instant.

    Older versions accepted whatever ``datetime.fromisoformat`` reads, a date alone included,
    which they and every reader took for its midnight UTC: that instant is kept.
    """
    if value is None:
        return None
    try:
        return normalise_timestamp(value)
    except ValueError:
        pass
    try:
        return timestamp_text(utc_instant(value))
    except ValueError:
        return value


@migrations()
def m009_redaction_key_out(db: Database) -> None:
    """Move the redaction key out of the database into its key file, keeping only its id.

    Whoever can read the database must not be able to test guessed header secrets against
    its digests. The row is deleted with ``secure_delete`` on, so SQLite overwrites its
    bytes instead of leaving them in the page's free space, and ``open_store`` then
    checkpoints the WAL, so no copy outlives it there. Nothing else changes. A key file
    that already holds another key raises DatabaseError and the database stays as it was.
    """
    legacy = read_meta(db, keyfile.LEGACY_KEY_META)
    if legacy is None:
        return  # made since: its key never entered the database
    key = bytes.fromhex(legacy)
    keyfile.keep_key(db, key)
    [(secure_delete,)] = db.execute("PRAGMA secure_delete")
    db.execute("PRAGMA secure_delete = ON")
    try:
        db.execute(f"DELETE FROM {META_TABLE} WHERE key = ?", [keyfile.LEGACY_KEY_META])
    finally:
        db.execute(f"PRAGMA secure_delete = {int(secure_delete)}")
    db.table(META_TABLE).insert({"key": keyfile.KEY_ID_META, "value": keyfile.key_id(key)})


@migrations()
def m010_snapshot_reuse(db: Database) -> None:
    """``snapshots.same_as_sync_id`` and ``snapshots.csv_safe``: a sync whose fleet is the
    latest snapshot's reuses that file instead of writing an identical one.

    A reuse is still one row per format, so every sync that applied has its snapshot; the
    CSV flag says how a CSV file was written, since another ``--csv-safe`` makes another file.
    NULL in the rows written before: those files were each their own sync's, of unknown form.
    """
    db.table("snapshots").add_column("same_as_sync_id", int)
    db.table("snapshots").add_column("csv_safe", int)


#: Known migrations, in order; the schema version is how many of them a database has.
SCHEMA_VERSION = len(migrations._migrations)


def has_wal_files(path: Path) -> bool:
    """True if the -wal or -shm file of the database at ``path`` is there."""
    return any(os.path.lexists(f"{path}{suffix}") for suffix in ("-wal", "-shm"))


def _connect(path: Path, *, read_only: bool, immutable: bool = False) -> Database:
    # A connection is used by one thread at a time, but not always by the thread that made
    # it: a sync's transaction is written from two threads in turn (EarlyCreations, handed
    # over by a join), and an export's read runs on a reader thread (export._read_ahead).
    try:
        if read_only:
            flags = "mode=ro&immutable=1" if immutable else "mode=ro"
            target, uri = f"{path.resolve().as_uri()}?{flags}", True
        else:
            target, uri = str(path), False
        conn = sqlite3.connect(target, uri=uri, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    except sqlite3.Error as exc:
        raise sqlite_failure(path, exc, reading=read_only) from exc
    return Database(conn)


@contextmanager
def _closed_on_failure(db: Database, path: Path, *, reading: bool = False) -> Iterator[None]:
    """Close ``db`` when opening it fails, telling SQLite's failure as one of ours."""
    try:
        yield
    except sqlite3.Error as exc:
        db.close()
        raise sqlite_failure(path, exc, reading=reading) from exc
    except BaseException:
        db.close()
        raise


def schema_version(db: Database) -> int:
    """The schema version recorded in the database (0 for one comfysync never set up)."""
    if not db.table(META_TABLE).exists():
        return 0
    row = db.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def sqlite_failure(path: Path, exc: sqlite3.Error, *, reading: bool = False) -> ComfySyncError:
    """The error to show for a SQLite failure on ``path``: the disk's fault or the file's.

    A full or failing disk is a StorageError (exit 4: try again once there is room); a file
    that is not a database, is damaged or cannot be written (or, ``reading``, read) is a
    DatabaseError (exit 2).
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
    if reading:
        cause = _why_unreadable(path) if name.startswith(_ACCESS_FAILURES) else None
        return DatabaseError(f"cannot read {path}: {cause or exc}")
    return DatabaseError(f"cannot open {path} for writing ({exc})")


#: The files SQLite keeps beside a WAL database, which a reader must find there.
WAL_FILE_SUFFIXES = ("-wal", "-shm")
#: The SQLite errors (extended names too) of a reader refused access to a file.
_ACCESS_FAILURES = ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM")


def _why_unreadable(path: Path) -> str | None:
    """Why a reader who may not write beside ``path`` cannot read it, if that is the cause.

    ``os.access`` answers for the real user, so a root reader is never told this wrongly.
    """
    beside = [path.with_name(path.name + suffix) for suffix in WAL_FILE_SUFFIXES]
    for file in [path, *beside]:
        if file.exists() and not os.access(file, os.R_OK):
            return f"{file.name} is not readable by you; ask its owner to let you read it"
    missing = [suffix for suffix in WAL_FILE_SUFFIXES if not Path(f"{path}{suffix}").exists()]
    if missing and not os.access(path.parent, os.W_OK):
        files = f"{' and '.join(missing)} file{'s are' if len(missing) > 1 else ' is'}"
        return (
            f"its {files} missing and {path.parent} is not writable to create "
            f"{'them' if len(missing) > 1 else 'it'}; the next `comfysync sync` leaves "
            "them for readers"
        )
    return None


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


#: The longest absolute --db SQLite's unix VFS opens: its MAX_PATHNAME (512) less the room
#: for the "-journal" it appends for its side files.
_SQLITE_MAX_PATH = 512 - len("-journal")


#: The first bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"


def _check_is_sqlite(path: Path) -> None:
    """Refuse a file with content that is not a SQLite database.

    SQLite itself refuses most such files, but takes one shorter than its header for an
    empty database and would write over it: a short text file named by mistake would be
    lost. An empty file holds nothing to lose and may become the database.
    """
    try:
        with path.open("rb") as file:
            head = file.read(len(SQLITE_HEADER))
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there yet (its folder is made, or refused, next)
    except OSError as exc:
        raise DatabaseError(f"cannot read --db {path} ({exc.strerror})") from exc
    if head and head != SQLITE_HEADER:
        raise DatabaseError(f"{path} is not a SQLite database; pass another --db")


def prepare_db_path(path: Path) -> None:
    """Check that ``path`` can hold a database comfysync writes, creating its folder if needed.

    Called before anything is written beside the database (the sync lock, the database
    itself), so a bad --db is refused with its own message and leaves no file behind.
    """
    if path.is_dir():
        raise DatabaseError(f"--db {path} is a directory; pass a file path")
    if len(os.fsencode(path.absolute())) > _SQLITE_MAX_PATH:
        # Checked before creating its folders: SQLite would refuse it after they were made.
        raise DatabaseError(f"--db {path} is a path too long for SQLite; pass a shorter one")
    _check_writable(path)
    _check_is_sqlite(path)
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
            if version:  # an upgrade: the snapshot files made so far are not reused
                [(last_sync,)] = db.execute("SELECT coalesce(max(id), 0) FROM sync_runs")
                write_meta(db, SNAPSHOTS_REUSABLE_AFTER, str(last_sync))
            # The pages m009 rewrote (the key scrubbed) replace their old copies in the
            # database file now, and the WAL that saw them is emptied.
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        elif db.journal_mode != "wal":
            db.enable_wal()
    return db


def close_store(db: Database, path: Path, *, for_readers: bool = True) -> None:
    """Close a connection ``open_store`` gave, leaving the -wal and -shm files for readers.

    A user who may read the database but not write its folder can read it only while those
    files exist, and the last connection to close removes them unless it is read-only. So the
    store is checkpointed, a read-only connection joins and closes last. Best effort: should it
    fail, the next sync puts the files back. ``for_readers`` False closes plainly (a refused
    sync leaves the folder as it found it).
    """
    keeper: sqlite3.Connection | None = None
    try:
        if for_readers and db.journal_mode == "wal":
            if not db.conn.in_transaction:
                db.execute("PRAGMA busy_timeout = 0")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            keeper = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            keeper.execute("SELECT count(*) FROM sqlite_master").fetchall()
    except sqlite3.Error:
        pass
    finally:
        db.close()
        if keeper is not None:
            keeper.close()


def open_store_read_only(path: Path, *, immutable: bool = False) -> Database:
    """Open an existing comfysync database without ever writing to it.

    Every reader opens the store here with SQLite's ``mode=ro``, which reads a WAL database
    without write access to its folder as long as its -wal and -shm files exist (``close_store``
    leaves them); without them the reader is told what to do. ``immutable`` (no locks, no side
    files) is only for ``demo``, on a database with no such files whose sync lock it holds.
    """
    if not path.is_file():
        raise DatabaseError(f"no database at {path}; {_how_to_get_one(path)}")
    db = _connect(path, read_only=True, immutable=immutable)
    with _closed_on_failure(db, path, reading=True):
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
