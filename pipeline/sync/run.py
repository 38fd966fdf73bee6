"""One sync, wired together: walk the API, decide the changes, apply them in one transaction.

This module only composes the parts (``source.client`` and ``source.walk`` fetch,
``collector`` and ``plan`` decide, ``store.early`` and ``store.write`` write); it contains no
HTTP and no SQL, and leaves the store's connection and threads to the store.
Every entry point (the CLI, the scheduler, the Python API) syncs through ``run_sync``, so
they all share one behaviour:

* a sync that fails before applying records a ``failed`` run and changes nothing else;
* a walk that is not proven complete applies creates and updates but no deletion, and the
  run ends ``partial`` with the reasons in its ``warnings``;
* so does a complete walk that would delete a mass of the fleet (``pipeline.sync.guardrails``);
* runners that all belong to owners the store has never mirrored are refused
  (ForeignAccountError) and nothing is applied;
* a complete walk with no rejected records ends ``success``;
* only one sync at a time writes a database (``pipeline.sync.lock``): a second one raises
  ``SyncLockedError`` before it has written anything, not even its run-log row;
* a sync asked to stop (``stop`` set, e.g. by SIGTERM) is abandoned before it applies
  anything and raises ``SyncInterruptedError``; once applying has begun, it finishes;
* after a ``success`` or ``partial`` sync, when ``settings.export_dir`` is set, the fleet it
  left is written as snapshot files, or the latest files are kept when they hold that very
  fleet. That happens after the changes are committed: a failed snapshot is logged as a
  warning and recorded (``SyncSummary.snapshots``, the ``snapshots`` table), and never
  undoes or fails the sync.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from pipeline.errors import (
    ComfySyncError,
    ConfigurationError,
    StorageError,
    SyncInterruptedError,
)
from pipeline.settings import Settings
from pipeline.source.client import ComfyControlClient, retries_made
from pipeline.source.walk import (
    MissingAfter,
    OnPage,
    WalkResult,
    walk_all_pages,
)
from pipeline.store import keyfile, meta, schema
from pipeline.store import write as store
from pipeline.store.changeset import Decision
from pipeline.store.early import EarlyCreations
from pipeline.store.sqlite import Database
from pipeline.sync.collector import Collector, ProgressCallback, Sightings
from pipeline.sync.lock import hold_sync_lock
from pipeline.sync.plan import StoredPicture, decide, ids_needing_fields, to_recheck
from pipeline.times import utc_timestamp

if TYPE_CHECKING:
    from pipeline.outputs.export import FileWriter
    from pipeline.outputs.objects import ObjectPath
    from pipeline.outputs.snapshot import SnapshotFile
    from pipeline.read.history import SnapshotRecord

log = logging.getLogger(__name__)

#: How often a walk looks at its stop signal; bounds how long a stop takes to act.
STOP_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class SyncSummary:
    """What a sync did, as the run log records it."""

    sync_id: int
    status: str
    complete: bool
    walks: int
    pages: int
    total_reported: int
    runners_seen: int
    created: int
    updated: int
    deleted: int
    restored: int
    unchanged: int
    rejected: int
    warnings: tuple[str, ...]
    seconds: float
    db_path: str
    snapshots: tuple[SnapshotFile, ...] = ()
    snapshots_pruned: tuple[str, ...] = ()
    #: Page requests retried (connection errors, timeouts, 429, 5xx) during the sync.
    retries: int = 0
    #: Rows committed to each Iceberg table (``--iceberg``); empty when none were.
    iceberg_rows: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class _Seams:
    """The injectable parts of one sync, passed down as one value."""

    client: ComfyControlClient | None
    transport: httpx.AsyncBaseTransport | None
    on_progress: ProgressCallback | None
    write_export_file: FileWriter | None
    now: Callable[[], str]
    stop: threading.Event | None


def run_sync(
    settings: Settings,
    *,
    client: ComfyControlClient | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    db: Database | None = None,
    on_progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
    write_export_file: FileWriter | None = None,
    clock: Callable[[], datetime] | None = None,
) -> SyncSummary:
    """Mirror the account into the store once. Raises a ComfySyncError subclass on failure.

    The database's sync lock is held from before the database is opened until the sync's
    last write (snapshots included); SyncLockedError if another sync holds it. ``stop``, once
    set (from a signal handler or another thread), abandons the sync before it applies
    anything: the request or retry wait in flight is cancelled, the run is recorded
    ``failed`` and SyncInterruptedError raised. A stop that comes while applying lets the
    apply finish.

    ``client``, ``transport``, ``db``, ``write_export_file`` (what writes one snapshot
    file's content) and ``clock`` (the times recorded in the store; it must never run
    backwards) are seams for tests and embedding: by default the client and database are
    built from ``settings``, snapshots are written by ``export.write_export_file`` and the
    clock is the system's. A ``db`` passed in must be the one at ``settings.db_path``: that
    is the file the lock guards.
    """
    started = time.monotonic()
    settings = settings.validated()
    now = (lambda: utc_timestamp(clock())) if clock is not None else utc_timestamp
    seams = _Seams(client, transport, on_progress, write_export_file, now, stop)
    schema.prepare_db_path(settings.db_path)  # a bad --db is refused before the lock file
    with hold_sync_lock(settings.db_path):
        if db is not None:
            return _sync_into(db, settings, seams, started)
        readers_had_files = schema.has_wal_files(settings.db_path)
        db = schema.open_store(settings.db_path)
        for_readers = True
        try:
            return _sync_into(db, settings, seams, started)
        except ConfigurationError:
            # Refused (another account, another key): the folder stays as it was found.
            for_readers = readers_had_files
            raise
        finally:
            schema.close_store(db, settings.db_path, for_readers=for_readers)


def _sync_into(db: Database, settings: Settings, seams: _Seams, started: float) -> SyncSummary:
    now = seams.now
    # Before the first write: a database made under another key is refused untouched.
    key = keyfile.key_for_sync(db, env_key=settings.redaction_key)
    store.close_abandoned_runs(db, finished_at=now())
    sync_id = store.begin_run(db, base_url=settings.base_url, started_at=now())
    summary, finished_at = _walk_and_apply(db, settings, seams, started, sync_id, key)
    # Committed: from here on nothing may turn the sync into a failure.
    if settings.export_dir is not None:
        summary = _write_snapshots(
            db, settings.export_dir, settings, summary, finished_at, seams.write_export_file
        )
    if settings.iceberg is not None:
        summary = _commit_to_iceberg(db, settings, summary, finished_at)
    return summary


def _walk_and_apply(
    db: Database, settings: Settings, seams: _Seams, started: float, sync_id: int, key: bytes
) -> tuple[SyncSummary, str]:
    """Walk, decide and apply in one transaction; a failure is recorded and re-raised."""
    now = seams.now
    retries_before = retries_made()
    try:
        # One time for everything this sync changes (its versions' valid_from), taken before
        # the walk because new runners are written while it goes on.
        applied_at = now()
        early = EarlyCreations(db, sync_id=sync_id, applied_at=applied_at)
        collector = Collector(
            key,
            settings.store_header_values,
            lambda: store.load_present_fingerprints(db),
            seams.on_progress,
            early=early,
            deleted_ids=frozenset(store.load_deleted_ids(db)),
            known_pages=store.load_page_digests(db),
        )

        def missing_after(walk_number: int) -> dict[str, str]:
            # What this complete walk would delete, with the created_at that places each
            # one for its re-read.
            if collector.rejected_in(walk_number):
                return {}  # a walk with rejected records deletes nothing: no need to look
            if collector.saw_the_stored_fleet(walk_number):
                return {}
            present = collector.fingerprints.keys()
            missing = to_recheck(present, collector.seen_in(walk_number), settings)
            return early.load_created_at(missing)

        walk = asyncio.run(_walk_unless_stopped(settings, seams, collector, missing_after))
        sightings = collector.final(walk)
        written = early.finish()
        decision = decide(
            walk, sightings, _stored_picture(db, collector, walk, sightings, written), settings
        )
        if seams.stop is not None and seams.stop.is_set():
            raise SyncInterruptedError()  # the last moment a stop can leave the store untouched
        finished_at = now()
        store.apply_changes(
            db,
            decision,
            sync_id=sync_id,
            applied_at=applied_at,
            finished_at=finished_at,
            written_early=written,
        )
    except BaseException as exc:
        early.abandon()
        error = exc.message if isinstance(exc, ComfySyncError) else _describe(exc)
        try:
            store.record_failed_run(db, sync_id, error=error, finished_at=now())
        except StorageError as unrecorded:  # a full disk: the first failure is the news
            log.warning("%s", unrecorded)
        raise
    for warning in decision.outcome.warnings:
        log.warning("%s", warning)
    seconds = time.monotonic() - started
    summary = _summarise(sync_id, decision, seconds, settings.db_path)
    summary = dataclasses.replace(summary, retries=retries_made() - retries_before)
    return summary, finished_at


def _stored_picture(
    db: Database, collector: Collector, walk: WalkResult, seen: Sightings, written: AbstractSet[str]
) -> StoredPicture:
    """What the decision compares the walk with, read from the store."""
    # Runners written early were never in the store: nothing to compare them with.
    states = store.load_stored_states(db, list(seen.parsed.keys() - written))
    return StoredPicture(
        present=(
            seen.unchanged
            if walk.complete and collector.saw_the_stored_fleet(walk.walks)
            else collector.fingerprints.keys()
        ),
        states=states,
        fields=store.load_stored_fields(db, ids_needing_fields(states, seen.parsed)),
        known_owners=store.load_known_owners(db),
        unusual_status=store.load_unknown_status_ids(db),
    )


def _commit_to_iceberg(
    db: Database, settings: Settings, summary: SyncSummary, finished_at: str
) -> SyncSummary:
    """Commit the sync to the Iceberg tables; a failure is a recorded warning, as for a
    snapshot, and the next sync's commit catches the tables up."""
    from pipeline.outputs import iceberg

    assert settings.iceberg is not None
    target = iceberg.IcebergTarget(
        catalog_uri=settings.iceberg,
        warehouse=iceberg.default_warehouse(settings.db_path, settings.iceberg_warehouse),
        account=settings.iceberg_account or settings.account or meta.database_id(db),
        s3_endpoint_url=settings.s3_endpoint_url,
    )
    commit = iceberg.commit_sync(db, target, sync_id=summary.sync_id, finished_at=finished_at)
    if commit.error is None:
        return dataclasses.replace(summary, iceberg_rows=commit.rows)
    log.warning("%s (the sync itself succeeded)", commit.error)
    try:
        store.record_run_afterwards(db, summary.sync_id, warnings=[commit.error], retries=0)
    except StorageError as exc:
        log.warning("%s", exc.message)
    return dataclasses.replace(summary, warnings=(*summary.warnings, commit.error))


def _write_snapshots(
    db: Database,
    export_dir: Path | ObjectPath,
    settings: Settings,
    summary: SyncSummary,
    applied_at: str,
    write_export_file: FileWriter | None,
) -> SyncSummary:
    """Snapshot the fleet this sync left; report and record failures, never raise them.

    Under the sync's lock nothing else writes the store, so the fleet this sync left is the
    ``runners`` table's present rows, read once for every format. Unless ``--snapshot
    always``, a format whose latest file already holds this fleet keeps it
    (``snapshot.kept_files`` says when), and one whose latest file is in place is patched
    from it (``pipeline.outputs.series``).
    """
    from pipeline.outputs import snapshot
    from pipeline.read import history

    latest: dict[str, SnapshotRecord] = {}
    unchanged: dict[str, SnapshotRecord] = {}
    if settings.snapshot != "always":
        try:
            latest = history.latest_snapshots(db, summary.sync_id)
            unchanged = history.holding_fleet(db, latest, summary.sync_id)
        except Exception as exc:  # whatever stops it, the files are written, as with "always"
            latest = unchanged = {}
            log.debug("could not read the latest snapshot files", exc_info=True)
            log.warning(
                "could not read the latest snapshot files (%s); writing new ones",
                type(exc).__name__,
            )
    formats = tuple(dict.fromkeys(settings.export_formats))
    kept = snapshot.kept_files(
        export_dir,
        unchanged,
        formats,
        sync_id=summary.sync_id,
        snapshot_at=applied_at,
        csv_safe=settings.csv_safe,
        account=settings.account,
    )
    if len(kept) == len(formats):
        report = snapshot.finish_snapshot(
            export_dir, kept.values(), keep=settings.keep_snapshots, account=settings.account
        )
    else:
        from pipeline.outputs import series  # pyarrow: loaded only by syncs that write files

        report = series.export_snapshots(
            export_dir,
            sync_id=summary.sync_id,
            snapshot_at=applied_at,
            db=db,
            formats=formats,
            csv_safe=settings.csv_safe,
            keep=settings.keep_snapshots,
            write=write_export_file,
            account=settings.account,
            kept=kept,
            bases=snapshot.patch_bases(
                export_dir,
                latest,
                [fmt for fmt in formats if fmt not in kept],
                csv_safe=settings.csv_safe,
                account=settings.account,
            ),
        )
    for error in (f.error for f in report.files if f.error):
        log.warning("snapshot not written (the sync itself succeeded): %s", error)
    try:
        store.record_snapshots(db, report.files, csv_safe=settings.csv_safe)
    except StorageError as exc:
        log.warning("%s; the snapshot files themselves are in place", exc.message)
    return dataclasses.replace(summary, snapshots=report.files, snapshots_pruned=report.pruned)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted before anything was applied"
    return f"unexpected {type(exc).__name__}; nothing was applied"


async def _walk_unless_stopped(
    settings: Settings,
    seams: _Seams,
    on_page: OnPage,
    missing_after: MissingAfter,
) -> WalkResult:
    """The walk, cancelled (request or retry wait in flight included) as soon as ``stop`` is set.

    Cancelling is safe at any point of a walk: it has written nothing yet.
    """
    walk = asyncio.ensure_future(
        _walk(settings, seams.client, seams.transport, on_page, missing_after)
    )
    stop = seams.stop
    if stop is None:
        return await walk
    while not stop.is_set():
        done, _ = await asyncio.wait({walk}, timeout=STOP_POLL_SECONDS)
        if done:
            return walk.result()
    walk.cancel()
    await asyncio.wait({walk})
    if not walk.cancelled():
        walk.exception()  # retrieved and dropped: the stop is the news
    raise SyncInterruptedError()


async def _walk(
    settings: Settings,
    client: ComfyControlClient | None,
    transport: httpx.AsyncBaseTransport | None,
    on_page: OnPage,
    missing_after: MissingAfter,
) -> WalkResult:
    if client is None:
        client = ComfyControlClient(
            base_url=settings.base_url,
            token=settings.token,
            timeout=settings.timeout,
            max_retries=settings.max_retries,
            concurrency=settings.concurrency,
            retry_wait_initial=settings.retry_wait_initial,
            retry_wait_max=settings.retry_wait_max,
            max_retry_after=settings.max_retry_after,
            transport=transport,
        )
    async with client:
        return await walk_all_pages(
            client,
            per_page=settings.per_page,
            concurrency=settings.concurrency,
            max_walks=settings.max_walks,
            on_page=on_page,
            missing_after=missing_after,
        )


def _summarise(sync_id: int, decision: Decision, seconds: float, db_path: Path) -> SyncSummary:
    outcome, changes = decision.outcome, decision.changes
    return SyncSummary(
        sync_id=sync_id,
        status=outcome.status,
        complete=outcome.complete,
        walks=outcome.walks,
        pages=outcome.pages,
        total_reported=outcome.total_reported,
        runners_seen=outcome.runners_seen,
        created=changes.created_count,
        updated=len(changes.updated),
        deleted=len(changes.deleted),
        restored=len(changes.restored),
        unchanged=changes.unchanged,
        rejected=outcome.rejected,
        warnings=outcome.warnings,
        seconds=round(seconds, 3),
        db_path=str(db_path),
    )
