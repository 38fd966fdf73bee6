"""Read the store's history: the fleet as of any instant, every version, the run log, and
which snapshot file holds the fleet a sync left.

Read-only questions for the exports and the pandas API; nothing here writes. A version is
in force at instant T when ``valid_from <= T`` and ``valid_to`` is NULL or later than T.
Every version a sync writes has the same ``valid_from``: the moment its walk began, after
the previous sync finished (syncs never overlap) and before its own ``finished_at``. So the
fleet as of a sync's ``finished_at`` is exactly what the sync left, and it stays so: later
syncs only close intervals after it. That is why a snapshot or a ``--as-of`` export can be
rebuilt, identically, at any later time.

Times in the store are ISO 8601 UTC text with microseconds and a ``Z``, which sort as text
in time order; an instant is formatted the same way before it is compared.

Queries yield rows in batches of ``BATCH_ROWS`` so an export of a large store streams in
bounded memory; each query is one statement, hence one consistent read of the database.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime

from pipeline.errors import ConfigurationError
from pipeline.source.records import TRACKED_FIELDS
from pipeline.store.meta import META_TABLE, SNAPSHOTS_REUSABLE_AFTER
from pipeline.store.sqlite import Database
from pipeline.times import utc_instant, utc_timestamp

#: A runner's state, as the ``runners`` table holds it and as a past instant rebuilds it.
FLEET_COLUMNS: tuple[str, ...] = (
    "id",
    *TRACKED_FIELDS,
    "first_seen_at",
    "deleted_at",
    "version",
    "content_hash",
)
#: One version of one runner, as ``runner_versions`` holds it.
VERSION_COLUMNS: tuple[str, ...] = (
    "runner_id",
    "version",
    "change",
    "changed_fields",
    *TRACKED_FIELDS,
    "content_hash",
    "valid_from",
    "valid_to",
    "sync_id",
)
RUN_COLUMNS: tuple[str, ...] = (
    "id",
    "started_at",
    "finished_at",
    "status",
    "base_url",
    "pages",
    "walks",
    "complete",
    "total_reported",
    "runners_seen",
    "created",
    "updated",
    "deleted",
    "restored",
    "unchanged",
    "rejected",
    "warnings",
    "error",
)
#: Rows per batch: a batch is held as Python objects (tuples, or JSON text), which cost far
#: more memory than the Arrow columns an export makes of them, so keep few.
BATCH_ROWS = 2_000

Row = tuple[object, ...]


@dataclass(frozen=True)
class Query:
    """One read of the store, kept in parts so that the caller chooses how rows come back.

    ``columns`` pairs each output column with its SQL expression, in output order;
    ``source`` is the rest of the statement (FROM ... ORDER BY ...). ``rows`` returns
    Python tuples; ``json_lines`` one JSON object per row, for readers that parse in C.
    """

    columns: tuple[tuple[str, str], ...]
    source: str
    params: dict[str, object] | list[object] = field(default_factory=list)


def fleet_query(
    at: str | None = None, *, include_deleted: bool = False, touched_after: int | None = None
) -> Query:
    """Every runner, in FLEET_COLUMNS order, sorted by id: present ones unless asked.

    With ``at`` (store time text), as the store knew it then, rebuilt from the versions:
    runners the store had not yet seen are absent, deleted ones come with ``deleted_at``.
    Without, the ``runners`` table as it is; with ``touched_after`` too, only the runners
    a sync after that one changed (``touched_since``).
    """
    if at is None:
        where = [] if include_deleted else ["r.deleted_at IS NULL"]
        params: list[object] = []
        if touched_after is not None:
            where.append(f"r.id IN ({_TOUCHED})")
            params.append(touched_after)
        condition = f"WHERE {' AND '.join(where)}" if where else ""
        columns = tuple((name, f"r.{name}") for name in FLEET_COLUMNS)
        return Query(columns, f"FROM runners AS r {condition} ORDER BY r.id", params)
    if touched_after is not None:
        raise ValueError("touched_after reads the runners table as it is: not with at")
    # first_seen_at is version 1's valid_from (the store sets both from the same clock
    # reading); a deleted version's valid_from is the moment the runner was marked deleted.
    expressions = (
        "v.runner_id",
        *(f"v.{name}" for name in TRACKED_FIELDS),
        "first.valid_from",
        "CASE WHEN v.change = 'deleted' THEN v.valid_from END",
        "v.version",
        "v.content_hash",
    )
    deleted = "" if include_deleted else "AND v.change != 'deleted'"
    source = f"""
FROM runner_versions AS v
JOIN runner_versions AS first ON first.runner_id = v.runner_id AND first.version = 1
WHERE v.valid_from <= :at AND (v.valid_to IS NULL OR v.valid_to > :at) {deleted}
ORDER BY v.runner_id"""
    return Query(tuple(zip(FLEET_COLUMNS, expressions, strict=True)), source, {"at": at})


#: The runners a sync after the one given (``?``) created, changed, deleted or restored.
_TOUCHED = "SELECT runner_id FROM runner_versions WHERE sync_id > ?"


def touched_since(db: Database, sync_id: int, limit: int) -> list[str] | None:
    """The ids of the runners a sync after ``sync_id`` changed in any way (every change is
    a version); None if there are more than ``limit``."""
    found = [
        row[0]
        for row in db.execute(
            "SELECT DISTINCT runner_id FROM runner_versions "
            "INDEXED BY idx_runner_versions_sync_id WHERE sync_id > ? LIMIT ?",
            [sync_id, limit + 1],
        )
    ]
    return None if len(found) > limit else found


def versions_query(runner_id: str | None = None, *, touched_after: int | None = None) -> Query:
    """Every version in VERSION_COLUMNS order, by runner and version: of one runner if
    ``runner_id``; of the runners a sync after ``touched_after`` changed, if given."""
    where: list[str] = []
    params: list[object] = []
    if runner_id is not None:
        where.append("v.runner_id = ?")
        params.append(runner_id)
    if touched_after is not None:
        where.append(f"v.runner_id IN ({_TOUCHED})")
        params.append(touched_after)
    condition = f"WHERE {' AND '.join(where)}" if where else ""
    columns = tuple((name, f"v.{name}") for name in VERSION_COLUMNS)
    return Query(
        columns, f"FROM runner_versions AS v {condition} ORDER BY v.runner_id, v.version", params
    )


@dataclass(frozen=True)
class SnapshotRecord:
    """The snapshot file, in one format, that holds the fleet sync ``sync_id`` left.

    ``file_sync_id`` is the sync that wrote the file: ``sync_id`` itself, or an earlier sync
    whose fleet this one found unchanged and whose file it kept (``snapshots.same_as_sync_id``).
    ``snapshot_at`` is that file's ``snapshot_at`` (its sync's finish), whose day names its
    ``snapshot_date`` folder. ``path`` is where the file was when the row was recorded.
    """

    sync_id: int
    format: str
    file_sync_id: int
    path: str
    rows: int
    bytes: int
    snapshot_at: str
    #: For a CSV file, whether it was written with ``--csv-safe``; None for Parquet and for
    #: files recorded before the store kept it.
    csv_safe: bool | None


@dataclass(frozen=True)
class AppliedSync:
    """A sync whose changes were committed (``success`` or ``partial``), and when."""

    sync_id: int
    finished_at: str


def parse_instant(value: str | date | datetime) -> datetime:
    """``pipeline.times.utc_instant`` of a value a user gave; ConfigurationError if it names none.

    A date alone means the start of that day, UTC; a time without an offset is UTC.
    """
    try:
        return utc_instant(value.strip() if isinstance(value, str) else value)
    except ValueError:
        text = str(value)
        shown = repr(value) if len(text) <= 60 else repr(text[:50]) + "..."
        raise ConfigurationError(
            f"cannot read {shown} as an ISO 8601 timestamp; use e.g. 2026-11-28 or "
            "2026-11-28T14:30:00Z"
        ) from None


def instant_text(value: str | date | datetime) -> str:
    """The instant as the store writes times, so that it compares correctly as text."""
    return utc_timestamp(parse_instant(value))


def last_applied_sync(db: Database, at: str | None = None) -> AppliedSync | None:
    """The latest sync that committed changes, at or before ``at`` (store time text) if given."""
    sql = "SELECT id, finished_at FROM sync_runs WHERE status IN ('success', 'partial')"
    params: list[str] = []
    if at is not None:
        sql += " AND finished_at <= ?"
        params.append(at)
    row = db.execute(sql + " ORDER BY finished_at DESC, id DESC LIMIT 1", params).fetchone()
    return AppliedSync(int(row[0]), str(row[1])) if row else None


def rows(db: Database, query: Query) -> Iterator[list[Row]]:
    """``query``'s rows as Python tuples, ``BATCH_ROWS`` at a time, from one statement."""
    cursor = db.execute(
        f"SELECT {', '.join(e for _, e in query.columns)} {query.source}", query.params
    )
    while batch := cursor.fetchmany(BATCH_ROWS):
        yield batch


def json_lines(
    db: Database, query: Query, fields: Iterable[tuple[str, str]] | None = None
) -> Generator[bytes, None, None]:
    """``query``'s rows as newline-separated JSON objects, ``BATCH_ROWS`` rows per chunk.

    Each object holds ``fields`` ((key, SQL expression) pairs; by default the query's own
    columns), built by SQLite's ``json_object``: a reader that parses JSON in C (pyarrow's)
    then gets typed columns without a Python object per value. Text that is JSON already
    is embedded as a string unless its expression says otherwise (``json(...)``).
    """
    pairs = ", ".join(f"'{key}', {expression}" for key, expression in fields or query.columns)
    cursor = db.execute(f"SELECT json_object({pairs}) {query.source}", query.params)
    while batch := cursor.fetchmany(BATCH_ROWS):
        yield "\n".join([line for (line,) in batch]).encode()


def runs_query(after: int = 0, up_to: int | None = None, *, finished: bool = False) -> Query:
    """The run log in RUN_COLUMNS order, oldest first: the runs after ``after`` up to
    ``up_to`` included (all by default), only those no longer running if ``finished``."""
    where = ["r.id > ?"]
    params: list[object] = [after]
    if up_to is not None:
        where.append("r.id <= ?")
        params.append(up_to)
    if finished:
        where.append("r.status != 'running'")
    columns = tuple((name, f"r.{name}") for name in RUN_COLUMNS)
    return Query(columns, f"FROM sync_runs AS r WHERE {' AND '.join(where)} ORDER BY r.id", params)


_SNAPSHOT_RECORDS = """
SELECT s.sync_id, s.format, coalesce(s.same_as_sync_id, s.sync_id), s.path, s.rows, s.bytes,
       r.finished_at, s.csv_safe
FROM snapshots AS s JOIN sync_runs AS r ON r.id = coalesce(s.same_as_sync_id, s.sync_id)
WHERE s.error IS NULL AND {where}
ORDER BY s.id
"""


def snapshot_of_sync(db: Database, sync_id: int) -> dict[str, SnapshotRecord]:
    """format -> the snapshot file holding the fleet sync ``sync_id`` left, as recorded.

    Empty when that sync recorded no snapshot file (none asked for, or none written). The
    path is as recorded; the file may have been pruned or moved since.
    """
    found = db.execute(_SNAPSHOT_RECORDS.format(where="s.sync_id = ?"), [sync_id])
    return {record.format: record for record in map(_snapshot_record, found)}


def latest_snapshots(db: Database, sync_id: int) -> dict[str, SnapshotRecord]:
    """format -> the newest snapshot file recorded, written or kept, by a sync before
    ``sync_id``: it holds the fleet its ``file_sync_id`` left. Files made before the
    database's last upgrade are left out (``meta.SNAPSHOTS_REUSABLE_AFTER``)."""
    latest = db.execute(
        _SNAPSHOT_RECORDS.format(
            where="s.id IN (SELECT max(id) FROM snapshots WHERE error IS NULL AND sync_id < ? "
            "AND coalesce(same_as_sync_id, sync_id) > (SELECT coalesce(max(CAST(value AS "
            f"INTEGER)), 0) FROM {META_TABLE} WHERE key = ?) GROUP BY format)"
        ),
        [sync_id, SNAPSHOTS_REUSABLE_AFTER],
    )
    return {record.format: record for record in map(_snapshot_record, latest)}


def holding_fleet(
    db: Database, latest: Mapping[str, SnapshotRecord], sync_id: int
) -> dict[str, SnapshotRecord]:
    """Those of the ``latest_snapshots`` files that hold the fleet sync ``sync_id`` left:
    no sync applied any change between the file's sync and ``sync_id`` included, so the
    runners are exactly the file's."""
    return {
        fmt: record
        for fmt, record in latest.items()
        if not _changed_between(db, record.file_sync_id, sync_id)
    }


def _changed_between(db: Database, after: int, up_to: int) -> bool:
    """Whether a sync after ``after``, up to ``up_to`` included, applied any change."""
    (changes,) = db.execute(
        "SELECT count(*) FROM sync_runs WHERE id > ? AND id <= ? "
        "AND status IN ('success', 'partial') "
        "AND created + updated + deleted + restored > 0",
        [after, up_to],
    ).fetchone()
    return bool(changes)


def _snapshot_record(row: Row) -> SnapshotRecord:
    sync_id, fmt, file_sync_id, path, rows, size, snapshot_at, csv_safe = row
    return SnapshotRecord(
        sync_id=int(sync_id),  # type: ignore[call-overload]
        format=str(fmt),
        file_sync_id=int(file_sync_id),  # type: ignore[call-overload]
        path=str(path),
        rows=int(rows),  # type: ignore[call-overload]
        bytes=int(size),  # type: ignore[call-overload]
        snapshot_at=str(snapshot_at),
        csv_safe=None if csv_safe is None else bool(csv_safe),
    )
