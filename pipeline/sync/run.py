"""One sync, wired together: walk the API, decide the changes, apply them in one transaction.

This module only composes the parts (``source.client`` and ``source.walk`` fetch,
``collector`` and ``plan`` decide, ``store.write`` writes); it contains no HTTP and no SQL.
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
  left is written as snapshot files. That happens after the changes are committed: a failed
  snapshot is logged as a warning and recorded (``SyncSummary.snapshots``, the ``snapshots``
  table), and never undoes or fails the sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from pipeline.errors import (
    ComfySyncError,
    ConfigurationError,
    ForeignAccountError,
    StorageError,
    SyncInterruptedError,
)
from pipeline.settings import Settings
from pipeline.source.client import ComfyControlClient
from pipeline.source.records import (
    KNOWN_STATUSES,
    Rejection,
)
from pipeline.source.walk import (
    MissingAfter,
    WalkResult,
    walk_all_pages,
)
from pipeline.store import keyfile, schema
from pipeline.store import write as store
from pipeline.store.changeset import ChangeSet
from pipeline.store.sqlite import Database
from pipeline.sync import guardrails
from pipeline.sync.collector import Collector, ProgressCallback, Sightings
from pipeline.sync.lock import hold_sync_lock
from pipeline.sync.plan import ids_needing_fields, plan_changes
from pipeline.times import utc_timestamp

if TYPE_CHECKING:
    from pipeline.outputs.export import FileWriter
    from pipeline.outputs.snapshot import SnapshotFile

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

    @property
    def changed(self) -> int:
        return self.created + self.updated + self.deleted + self.restored

    @property
    def snapshot_errors(self) -> tuple[str, ...]:
        """Why snapshot files could not be written (empty when all were)."""
        return tuple(f.error for f in self.snapshots if f.error)


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
    with schema.journal_for_first_sync(db):
        summary, finished_at = _walk_and_apply(db, settings, seams, started, sync_id, key)
    # Committed: from here on nothing may turn the sync into a failure.
    if settings.export_dir is not None:
        summary = _write_snapshots(
            db, settings.export_dir, settings, summary, finished_at, seams.write_export_file
        )
    return summary


def _walk_and_apply(
    db: Database, settings: Settings, seams: _Seams, started: float, sync_id: int, key: bytes
) -> tuple[SyncSummary, str]:
    """Walk, decide and apply in one transaction; a failure is recorded and re-raised."""
    now = seams.now
    try:
        # One time for everything this sync changes (its versions' valid_from), taken before
        # the walk because new runners are written while it goes on.
        applied_at = now()
        early = store.EarlyCreations(db, sync_id=sync_id, applied_at=applied_at)
        collector = Collector(
            key,
            settings.store_header_values,
            store.load_present_fingerprints(db),
            seams.on_progress,
            early=early,
            deleted_ids=frozenset(store.load_deleted_ids(db)),
            known_pages=store.load_page_digests(db),
        )

        def missing_after(walk_number: int) -> dict[str, str]:
            # What this complete walk would delete (if the mass-deletion guard allows it),
            # with the created_at that places each one for its re-read.
            if collector.rejected_in(walk_number):
                return {}  # a walk with rejected records deletes nothing: no need to look
            early.finish()  # the last page is in: the connection is the main thread's again
            seen = collector.seen_in(walk_number)
            present = collector.present
            missing = present - seen
            if not missing or _mass_deletion(settings, len(missing), len(present), len(seen)):
                return {}
            fields = store.load_stored_fields(db, sorted(missing))
            return {runner_id: fields[runner_id]["created_at"] for runner_id in missing}

        with _cyclic_collection_paused():
            walk = asyncio.run(_walk_unless_stopped(settings, seams, collector, missing_after))
            early.finish()
            sightings = collector.final(walk)
            summary, finished_at = _decide_and_apply(
                db, settings, sync_id, walk, collector.present, sightings, seams, started, early
            )
    except BaseException as exc:
        early.abandon()
        error = exc.message if isinstance(exc, ComfySyncError) else _describe(exc)
        try:
            store.record_failed_run(db, sync_id, error=error, finished_at=now())
        except StorageError as unrecorded:  # a full disk: the first failure is the news
            log.warning("%s", unrecorded)
        raise
    return summary, finished_at


@contextlib.contextmanager
def _cyclic_collection_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the walk and the apply.

    Why: a walk allocates millions of short-lived objects (each page's parsed JSON) while it
    holds 100,000 long-lived ones (the sightings), so the collector keeps re-scanning those
    and finds nothing to free: a twentieth of a quiet sync's CPU (and the plan built after
    the walk would set off one more full pass). Reference counting still frees every page
    as soon as it is handled; only cycles wait, and a sync makes few.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _write_snapshots(
    db: Database,
    export_dir: Path,
    settings: Settings,
    summary: SyncSummary,
    applied_at: str,
    write_export_file: FileWriter | None,
) -> SyncSummary:
    """Snapshot the fleet this sync left; report and record failures, never raise them."""
    from pipeline.outputs import export
    from pipeline.read import history  # pyarrow: loaded only by syncs that export

    report = export.export_snapshots(
        export_dir,
        sync_id=summary.sync_id,
        snapshot_at=applied_at,
        read_fleet=lambda: history.fleet_as_of(db, applied_at),
        formats=settings.export_formats,
        csv_safe=settings.csv_safe,
        keep=settings.keep_snapshots,
        write=write_export_file or export.write_export_file,
    )
    for error in (f.error for f in report.files if f.error):
        log.warning("snapshot not written (the sync itself succeeded): %s", error)
    try:
        store.record_snapshots(db, report.files)
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
    collector: Collector,
    missing_after: MissingAfter,
) -> WalkResult:
    """The walk, cancelled (request or retry wait in flight included) as soon as ``stop`` is set.

    Cancelling is safe at any point of a walk: it has written nothing yet.
    """
    walk = asyncio.ensure_future(
        _walk(settings, seams.client, seams.transport, collector, missing_after)
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
    collector: Collector,
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
            on_page=collector,
            missing_after=missing_after,
        )


def _decide_and_apply(
    db: Database,
    settings: Settings,
    sync_id: int,
    walk: WalkResult,
    present: Collection[str],
    seen: Sightings,
    seams: _Seams,
    started: float,
    early: store.EarlyCreations,
) -> tuple[SyncSummary, str]:
    records, rejections = seen.parsed, seen.rejections
    owners = {record.user_id for record in records.values()}
    known_owners = store.load_known_owners(db)
    # An unchanged runner's owner is a known one (every stored runner's owner was recorded
    # with it), so a walk that saw any is not of a foreign account.
    if not seen.unchanged and guardrails.is_foreign_account(known_owners, owners):
        raise ForeignAccountError(guardrails.foreign_account_message(owners, known_owners))
    complete = walk.complete and not rejections
    unknown_statuses = sum(1 for record in records.values() if record.status not in KNOWN_STATUSES)
    unknown_statuses += len(store.load_unknown_status_ids(db) & seen.unchanged)
    warnings = list(_warnings(walk, rejections, unknown_statuses))
    # Runners written early were never in the store: nothing to compare them with.
    stored = store.load_stored_states(db, list(records.keys() - early.written.keys()))
    stored_fields = store.load_stored_fields(db, ids_needing_fields(stored, records))
    changes = plan_changes(
        stored,
        stored_fields,
        records,
        present=present,
        deletions_allowed=complete,
        spared=seen.spared,
        seen_unchanged=seen.unchanged,
    )
    present_count = len(present)
    mass_deletion = _mass_deletion(settings, len(changes.deleted), present_count, seen.count)
    if mass_deletion is not None:
        changes = changes.without_deletions()
        warnings.append(mass_deletion)
    elif changes.deletions_withheld:
        because = (
            "a re-read of their pages did not prove them gone (the next sync decides)"
            if complete
            else "the walk was not proven complete"
        )
        warnings.append(
            f"{changes.deletions_withheld} runner(s) missing from the walk were NOT marked "
            f"deleted because {because}"
        )
    status = "success" if complete and not changes.deletions_withheld else "partial"
    outcome = store.RunOutcome(
        status=status,
        pages=walk.pages_fetched,
        walks=walk.walks,
        complete=complete,
        total_reported=walk.total_reported,
        runners_seen=seen.count,
        rejected=len(rejections),
        warnings=tuple(warnings),
    )
    if seams.stop is not None and seams.stop.is_set():
        raise SyncInterruptedError()  # the last moment a stop can leave the store untouched
    finished_at = seams.now()
    store.apply_changes(
        db,
        changes,
        rejections,
        sync_id=sync_id,
        outcome=outcome,
        applied_at=early.applied_at,
        owners=owners,
        early=early,
        finished_at=finished_at,
        page_digests=seen.pages,
    )
    for warning in warnings:
        log.warning("%s", warning)
    seconds = time.monotonic() - started
    return _summarise(sync_id, outcome, changes, seconds, settings.db_path), finished_at


def _mass_deletion(settings: Settings, would_delete: int, present: int, seen: int) -> str | None:
    return guardrails.mass_deletion_reason(
        would_delete,
        present,
        seen,
        max_ratio=settings.max_delete_ratio,
        allowed=settings.allow_mass_delete,
    )


def _warnings(walk: WalkResult, rejections: list[Rejection], unknown_statuses: int) -> list[str]:
    warnings = []
    if not walk.complete:
        warnings.append(f"no complete walk in {walk.walks} attempt(s): " + "; ".join(walk.reasons))
    if rejections:
        warnings.append(
            f"{len(rejections)} runner record(s) could not be stored (see rejected_records)"
        )
    if unknown_statuses:
        warnings.append(f"{unknown_statuses} runner(s) have a status other than active/disabled")
    return warnings


def _summarise(
    sync_id: int, outcome: store.RunOutcome, changes: ChangeSet, seconds: float, db_path: Path
) -> SyncSummary:
    return SyncSummary(
        sync_id=sync_id,
        status=outcome.status,
        complete=outcome.complete,
        walks=outcome.walks,
        pages=outcome.pages,
        total_reported=outcome.total_reported,
        runners_seen=outcome.runners_seen,
        created=len(changes.created),
        updated=len(changes.updated),
        deleted=len(changes.deleted),
        restored=len(changes.restored),
        unchanged=changes.unchanged,
        rejected=outcome.rejected,
        warnings=outcome.warnings,
        seconds=round(seconds, 3),
        db_path=str(db_path),
    )
