"""Did the syncs work? The figures ``comfysync status`` and ``comfysync runs`` show.

Read-only: the database is only SELECTed from, and the snapshot files are only listed.
Snapshots are found by their layout (``pipeline.outputs.snapshot`` owns it), in the
export folder the caller names or, by default, the one the database's syncs recorded writing
to (the ``snapshots`` table), so a database finds its own snapshots wherever they went.
A listed file whose size is not what its sync recorded writing there (``snapshots.bytes``)
was truncated or overwritten since: it is reported as damaged, as are the snapshot files the
latest snapshotting sync could not write, with the reason it recorded. A sync whose fleet
was the latest snapshot's kept those files (``snapshots.same_as_sync_id``): status says so.

A sync that was killed leaves its run-log row ``running`` until the next sync marks it
``failed``. Reading it, these functions show such a row ``interrupted``: only the newest run
can still be going, and only while a sync holds the database's lock (``pipeline.sync.lock``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import ConfigurationError, ExportError
from pipeline.outputs.objects import describe_failure
from pipeline.outputs.snapshot import (
    Location,
    account_of,
    as_location,
    export_dir_of,
    file_size,
    not_a_folder,
    place_in_tree,
    snapshot_files,
)
from pipeline.read.history import RUN_COLUMNS, SnapshotRecord, snapshot_of_sync
from pipeline.settings import DEFAULT_EXPORT_DIR, EXPORT_FORMATS
from pipeline.store.meta import DATABASE_ID, read_meta
from pipeline.store.schema import ABANDONED_RUN_ERROR, schema_version
from pipeline.store.sqlite import Database
from pipeline.sync.lock import sync_lock_is_free
from pipeline.times import utc_instant

#: How a ``running`` row whose sync is no longer going is shown (it is stored unchanged).
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class SyncRun:
    """One row of the run log; counts are None for a run that did not get to apply."""

    id: int
    started_at: str
    finished_at: str | None
    seconds: float | None
    status: str
    base_url: str | None
    complete: bool | None
    pages: int | None
    walks: int | None
    total_reported: int | None
    runners_seen: int | None
    created: int | None
    updated: int | None
    deleted: int | None
    restored: int | None
    unchanged: int | None
    rejected: int | None
    warnings: tuple[str, ...]
    error: str | None


@dataclass(frozen=True)
class DamagedSnapshot:
    """A snapshot file whose size is not what its sync wrote: truncated or overwritten."""

    path: str
    sync_id: int
    bytes: int
    written_bytes: int


@dataclass(frozen=True)
class FailedSnapshot:
    """A snapshot file a sync could not write, and the reason it recorded."""

    sync_id: int
    format: str
    error: str


@dataclass(frozen=True)
class Snapshots:
    """The snapshot files under an export directory: how many, the oldest and the newest;
    those damaged since they were written; those the latest snapshot could not write."""

    export_dir: str
    files: int
    oldest: str | None
    newest: str | None
    damaged: tuple[DamagedSnapshot, ...] = ()
    not_written: tuple[FailedSnapshot, ...] = ()
    #: The files holding the fleet of the latest sync that recorded a snapshot, per format;
    #: ``file_sync_id`` differs from ``sync_id`` when that sync kept an earlier sync's file.
    latest: tuple[SnapshotRecord, ...] = ()


@dataclass(frozen=True)
class MirrorStatus:
    """Everything ``comfysync status`` reports."""

    db_path: str
    size_bytes: int
    schema_version: int
    last_sync: SyncRun | None
    last_success: SyncRun | None
    runners_present: int
    runners_deleted: int
    versions: int
    snapshots: Snapshots
    #: The ``account`` of this database's rows in shared Iceberg tables when no configuration
    #: file names it (``pipeline.store.meta.database_id``); None until a sync commits there.
    database_id: str | None = None


def read_status(
    db: Database,
    db_path: Path,
    export_dir: Location | None = None,
    account: str | None = None,
    s3_endpoint_url: str | None = None,
) -> MirrorStatus:
    """The state of the mirror in ``db`` (opened from ``db_path``) and its snapshot files
    (those in ``account``'s partition, for an account of a configuration file).

    ``size_bytes`` counts the database file and its write-ahead log, both of which hold data.
    Snapshots are listed under ``export_dir``, or else under ``recorded_export_dir(db)``;
    without ``account``, in the partition of the account the latest snapshot was written for,
    if any, so an account's database shows its snapshots when named by ``--db`` alone.
    """
    if export_dir is None:
        export_dir = recorded_export_dir(db)
    if s3_endpoint_url and not isinstance(export_dir, Path):
        export_dir = dataclasses.replace(export_dir, endpoint_url=s3_endpoint_url)
    if account is None:
        row = db.execute(
            "SELECT path FROM snapshots WHERE error IS NULL ORDER BY id DESC LIMIT 1"
        ).fetchone()
        account = account_of(as_location(row[0])) if row else None
    present, deleted = db.execute(
        "SELECT count(*) - count(deleted_at), count(deleted_at) FROM runners"
    ).fetchone()
    (versions,) = db.execute("SELECT count(*) FROM runner_versions").fetchone()
    last = list_runs(db, limit=1, db_path=db_path)
    success = list_runs(db, limit=1, status="success")
    wal = Path(f"{db_path}-wal")
    return MirrorStatus(
        db_path=str(db_path),
        size_bytes=db_path.stat().st_size + (wal.stat().st_size if wal.exists() else 0),
        schema_version=schema_version(db),
        last_sync=last[0] if last else None,
        last_success=success[0] if success else None,
        runners_present=present,
        runners_deleted=deleted,
        versions=versions,
        snapshots=find_snapshots(export_dir, db, account),
        database_id=read_meta(db, DATABASE_ID),
    )


def recorded_export_dir(db: Database) -> Location:
    """The folder the database's latest written snapshot went to, else the default one.

    Shown relative to the current folder when it lies below it, as the user would type it.
    """
    row = db.execute(
        "SELECT path FROM snapshots WHERE error IS NULL ORDER BY id DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return DEFAULT_EXPORT_DIR
    folder = export_dir_of(as_location(row[0]))
    if not isinstance(folder, Path):
        return folder
    try:
        return folder.relative_to(Path.cwd())
    except ValueError:
        return folder


def list_runs(
    db: Database, *, limit: int = 20, status: str | None = None, db_path: Path | None = None
) -> list[SyncRun]:
    """The most recent ``limit`` runs, newest first, optionally only those with ``status``.

    With ``db_path`` (the file ``db`` was opened from), a ``running`` row whose sync is not
    going any more is shown ``interrupted`` (see ``as_seen_now``), and ``status`` may be
    ``interrupted``. Without it, rows are shown as stored.
    """
    if db_path is None:
        return _select_runs(db, limit, status)
    # Asked before reading: a sync that starts after this writes a newer row than it sees.
    sync_live = not sync_lock_is_free(db_path)
    if status in ("running", INTERRUPTED):
        # At most one running row (the newest) is live: one more row covers the other kind.
        found = _select_runs(db, limit + 1, "running")
    else:
        found = _select_runs(db, limit, status)
    (newest_id,) = db.execute("SELECT max(id) FROM sync_runs").fetchone()
    if not sync_live and any(r.id == newest_id and r.status == "running" for r in found):
        sync_live = not sync_lock_is_free(db_path)  # unless a sync started since the first look
    shown = [as_seen_now(run, newest_id=newest_id, sync_live=sync_live) for run in found]
    if status is not None:
        shown = [run for run in shown if run.status == status]
    return shown[:limit]


def as_seen_now(run: SyncRun, *, newest_id: int, sync_live: bool) -> SyncRun:
    """``run`` as it stands now: a ``running`` row is ``interrupted`` unless it is the newest
    run (``newest_id``) and a sync holds the database's lock (``sync_live``)."""
    if run.status != "running" or (run.id == newest_id and sync_live):
        return run
    return dataclasses.replace(run, status=INTERRUPTED, error=ABANDONED_RUN_ERROR)


def _select_runs(db: Database, limit: int, status: str | None) -> list[SyncRun]:
    where, params = ("WHERE status = ?", [status]) if status else ("", [])
    cursor = db.execute(
        f"SELECT {', '.join(RUN_COLUMNS)} FROM sync_runs {where} ORDER BY id DESC LIMIT ?",
        [*params, limit],
    )
    return [_run(dict(zip(RUN_COLUMNS, row, strict=True))) for row in cursor]


def _run(row: dict[str, Any]) -> SyncRun:
    seconds = None
    if row["finished_at"]:
        elapsed = utc_instant(row["finished_at"]) - utc_instant(row["started_at"])
        seconds = round(elapsed.total_seconds(), 3)
    complete = None if row["complete"] is None else bool(row["complete"])
    warnings = tuple(orjson.loads(row["warnings"])) if row["warnings"] else ()
    return SyncRun(**{**row, "complete": complete, "warnings": warnings, "seconds": seconds})


def find_snapshots(
    export_dir: Location, db: Database | None = None, account: str | None = None
) -> Snapshots:
    """The snapshot files of every format, ordered by snapshot date, then sync id, then path.

    Files that do not follow the layout (``snapshot_files``) are not snapshots and are
    ignored. With ``db``, files are checked against the sizes their syncs recorded, and the
    latest snapshot's failures are included. ConfigurationError if ``export_dir`` (or a
    folder above it) is there but is not a folder: there is nothing to list.
    """
    blocker = not_a_folder(export_dir) if isinstance(export_dir, Path) else None
    if blocker is not None:
        raise ConfigurationError(
            f"cannot list the snapshots under --export-dir {export_dir}: {blocker}; "
            "pass the folder the snapshots are written to"
        )
    try:
        found = sorted(
            (path.parent.name, sync_id, str(path))
            for fmt in EXPORT_FORMATS
            for sync_id, path in snapshot_files(export_dir, fmt, account)
        )
    except Exception as exc:  # only an object store's listing can fail here
        if isinstance(export_dir, Path):
            raise
        raise ExportError(
            f"cannot list the snapshots under {export_dir}: {describe_failure(exc)}"
        ) from exc
    damaged: tuple[DamagedSnapshot, ...] = ()
    not_written: tuple[FailedSnapshot, ...] = ()
    latest: tuple[SnapshotRecord, ...] = ()
    if db is not None and _records_kept_files(db):
        (last,) = db.execute("SELECT max(sync_id) FROM snapshots WHERE error IS NULL").fetchone()
        latest = tuple(snapshot_of_sync(db, last).values()) if last is not None else ()
    if db is not None:
        damaged = _damaged(db, [path for *_, path in found], export_dir)
        not_written = tuple(
            FailedSnapshot(*row)
            for row in db.execute(
                "SELECT sync_id, format, error FROM snapshots WHERE error IS NOT NULL "
                "AND sync_id = (SELECT max(sync_id) FROM snapshots) ORDER BY id"
            )
        )
    return Snapshots(
        export_dir=str(export_dir),
        files=len(found),
        oldest=found[0][2] if found else None,
        newest=found[-1][2] if found else None,
        damaged=damaged,
        not_written=not_written,
        latest=latest,
    )


def _endpoint(location: Location) -> str | None:
    return None if isinstance(location, Path) else location.endpoint_url


def _damaged(db: Database, paths: list[str], export_dir: Location) -> tuple[DamagedSnapshot, ...]:
    """The files in ``paths`` whose size differs from what their sync recorded writing.

    Files are matched to the records by their place in the layout (format, date folder,
    name), not by absolute path, so a data folder that was moved or restored elsewhere is
    still checked.
    """
    written_here = " AND same_as_sync_id IS NULL" if _records_kept_files(db) else ""
    written = {
        place_in_tree(as_location(path)): (sync_id, size)
        for path, sync_id, size in db.execute(
            "SELECT path, sync_id, bytes FROM snapshots WHERE error IS NULL" + written_here
        )
    }
    damaged = []
    for path in paths:
        record = written.get(place_in_tree(as_location(path)))
        if record is None:
            continue
        size = file_size(as_location(path, _endpoint(export_dir)))
        if size is None:  # gone since it was listed
            continue
        if size != record[1]:
            damaged.append(DamagedSnapshot(path, record[0], size, record[1]))
    return tuple(damaged)


def _records_kept_files(db: Database) -> bool:
    """Whether the database is new enough to record kept snapshot files (read before a
    sync has upgraded it, it is not)."""
    return "same_as_sync_id" in db.table("snapshots").columns_dict
