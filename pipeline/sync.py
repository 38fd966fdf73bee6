"""One sync, wired together: walk the API, decide the changes, apply them in one transaction.

This module only composes the parts (``client``/``walk`` fetch, ``records``/``changes``
decide, ``store`` writes); it contains no HTTP and no SQL. Every entry point (the CLI, the
scheduler, the Python API) syncs through ``run_sync``, so they all share one behaviour:

* a sync that fails before applying records a ``failed`` run and changes nothing else;
* a walk that is not proven complete applies creates and updates but no deletion, and the
  run ends ``partial`` with the reasons in its ``warnings``;
* so does a complete walk that would delete a mass of the fleet (``pipeline.guardrails``);
* runners that all belong to owners the store has never mirrored are refused
  (ForeignAccountError) and nothing is applied;
* a complete walk with no rejected records ends ``success``;
* only one sync at a time writes a database (``pipeline.lock``): a second one raises
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
import itertools
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, KeysView, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, cast

import httpx

from pipeline import guardrails, keyfile, schema, store
from pipeline.changes import ChangeSet, ids_needing_fields, plan_changes
from pipeline.client import ComfyControlClient, Page
from pipeline.errors import (
    ComfySyncError,
    ConfigurationError,
    ForeignAccountError,
    StorageError,
    SyncInterruptedError,
)
from pipeline.lock import hold_sync_lock
from pipeline.records import (
    KNOWN_STATUSES,
    Rejection,
    RunnerRecord,
    fingerprinter,
    page_digester,
    parse_runner,
)
from pipeline.settings import Settings
from pipeline.sqlite import Database
from pipeline.walk import (
    MAX_RUNNERS_PER_WALK,
    MissingAfter,
    WalkResult,
    pages_needed,
    string_ids,
    walk_all_pages,
)

if TYPE_CHECKING:
    from pipeline.export import FileWriter
    from pipeline.snapshot import SnapshotFile

log = logging.getLogger(__name__)

#: Called after each page with (pages read, pages expected in this walk, runners seen).
ProgressCallback = Callable[[int, int, int], None]
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
class _Sightings:
    """What the walk saw, ready to compare with the store."""

    #: Runners parsed into records (new, changed, or sent differently than last time).
    parsed: dict[str, RunnerRecord]
    #: Present runners sent exactly as stored (matching raw fingerprint or page digest):
    #: not parsed at all.
    unchanged: set[str]
    rejections: list[Rejection]
    #: Ids the complete walk missed that a re-read did not prove gone: not deleted.
    spared: frozenset[str]
    #: Digests of the pages the store will hold exactly as sent, for the next sync.
    pages: list[str]

    @property
    def count(self) -> int:
        return len(self.parsed) + len(self.unchanged)


class _Collector:
    """Handles each page as it arrives; the latest sighting of a runner wins.

    A page whose digest the last sync recorded (``known_pages``) holds only runners stored
    exactly as sent: they are noted as seen and nothing else. On other pages, a runner whose
    raw fingerprint matches the stored one is only noted as seen; everything else is
    parsed, and a runner the store never held is handed to ``early`` to be written while
    the walk goes on (the final decision can still take it back).

    The stored fingerprints may still be being read when the first pages come: those pages
    wait, in order, in a backlog that the first page after the read (or the first question
    asked of the collector) works through.
    """

    def __init__(
        self,
        key: bytes,
        store_header_values: bool,
        fingerprints: Future[dict[str, str | None]],
        on_progress: ProgressCallback | None,
        early: store.EarlyCreations | None = None,
        deleted_ids: frozenset[str] = frozenset(),
        known_pages: Collection[str] = frozenset(),
    ):
        self.key = key
        self.store_header_values = store_header_values
        #: id -> stored raw fingerprint, for every present runner (once read)
        self.fingerprints: Mapping[str, str | None] = {}
        self._fingerprints_read: Future[dict[str, str | None]] | None = fingerprints
        self._backlog: list[tuple[Page, int]] = []
        self.fingerprint = fingerprinter(key, store_header_values)
        self.on_progress = on_progress
        #: Where runners the store never held go as soon as they are parsed; the stored
        #: runners it holds as deleted are not among those.
        self.early = early
        self.deleted_ids = deleted_ids
        #: id -> (walk number, record; None when the fingerprint showed it unchanged)
        self.records: dict[str, tuple[int, RunnerRecord | None]] = {}
        self.rejections: list[tuple[int, Rejection]] = []
        self.pages_in_walk = 0
        self.walk = 0
        self.known_pages = known_pages
        self.page_digest = page_digester(key, store_header_values)
        #: walk number -> (digests of its pages, runners sighted on them)
        self.pages_read: dict[int, tuple[list[str], int]] = {}

    @property
    def present(self) -> KeysView[str]:
        """The ids of every runner the store holds as present."""
        self._catch_up()
        return self.fingerprints.keys()

    def _catch_up(self) -> None:
        """Wait for the stored fingerprints, then handle the pages that came before them."""
        if self._fingerprints_read is None:
            return
        self.fingerprints = self._fingerprints_read.result()
        self._fingerprints_read = None
        backlog, self._backlog = self._backlog, []
        for page, walk in backlog:
            self(page, walk)

    def __call__(self, page: Page, walk: int) -> None:
        if self._fingerprints_read is not None:
            if not self._fingerprints_read.done():
                self._backlog.append((page, walk))
                return
            self._catch_up()
        if walk != self.walk:
            self.walk, self.pages_in_walk = walk, 0
        runners = page.runners
        ids = string_ids(runners)
        digest = self.page_digest(page.body)
        digests, sighted = self.pages_read.get(walk, ([], 0))
        digests.append(digest)
        self.pages_read[walk] = (digests, sighted + len(runners))
        if digest in self.known_pages and None not in ids:
            self._note_all_unchanged(cast(list[str], ids), walk)
            self._count_page(page)
            return
        fingerprints = list(map(self.fingerprint, runners))
        stored = self.fingerprints.get
        # Positions to parse: everything but a runner whose fingerprint matches the stored
        # one (a quiet page has none, and costs one pass over its ids).
        to_parse = [
            position
            for position, (runner_id, fingerprint) in enumerate(zip(ids, fingerprints, strict=True))
            if runner_id is None or not fingerprint or stored(runner_id) != fingerprint
        ]
        if not to_parse:  # so every id is a string
            self._note_all_unchanged(cast(list[str], ids), walk)
        elif len(set(ids)) < len(ids):  # an id twice on one page: the later sighting wins
            self._sight(page, walk, range(len(runners)), ids, fingerprints)
        else:
            parsing, unchanged = set(to_parse), (walk, None)
            self.records.update(
                (runner_id, unchanged)
                for position, runner_id in enumerate(ids)
                if position not in parsing and runner_id is not None
            )
            self._sight(page, walk, to_parse, ids, fingerprints)
        self._count_page(page)

    def _note_all_unchanged(self, ids: list[str], walk: int) -> None:
        """Every runner on the page sent exactly as stored: noted as seen, in one update."""
        self.records.update(zip(ids, itertools.repeat((walk, None))))

    def _count_page(self, page: Page) -> None:
        self.pages_in_walk += 1
        if self.on_progress is not None:
            # No more than a walk ever reads: a total of billions is no page count to show.
            expected = pages_needed(min(page.total, MAX_RUNNERS_PER_WALK), page.per_page)
            self.on_progress(self.pages_in_walk, expected, len(self.records))

    def _sight(
        self,
        page: Page,
        walk: int,
        positions: Iterable[int],
        ids: list[str | None],
        fingerprints: list[str | None],
    ) -> None:
        """Parse the runners at ``positions`` in order (an unchanged one is only noted)."""
        stored, records, unchanged = self.fingerprints, self.records, (walk, None)
        new: list[RunnerRecord] = []
        for position in positions:
            runner_id, fingerprint = ids[position], fingerprints[position]
            if runner_id is not None and fingerprint and stored.get(runner_id) == fingerprint:
                records[runner_id] = unchanged
                continue
            parsed = parse_runner(
                page.runners[position],
                page=page.number,
                position=position,
                redaction_key=self.key,
                store_header_values=self.store_header_values,
                fingerprint=fingerprint,
            )
            if isinstance(parsed, Rejection):
                self.rejections.append((walk, parsed))
                continue
            records[parsed.id] = (walk, parsed)
            if parsed.id not in stored and parsed.id not in self.deleted_ids:
                new.append(parsed)
        if self.early is not None:
            self.early.add(new)

    def seen_in(self, walk: int) -> set[str]:
        """Ids last seen in walk number ``walk`` (all of that walk's, while it is the latest)."""
        self._catch_up()
        if walk == 1 == self.walk:  # a single walk: every sighting is its own (C-speed copy)
            return set(self.records)
        return {runner_id for runner_id, (n, _) in self.records.items() if n == walk}

    def rejected_in(self, walk: int) -> bool:
        self._catch_up()
        return any(n == walk for n, _ in self.rejections)

    def pages_to_vouch_for(self, walk: WalkResult) -> list[str]:
        """Digests of the last walk's pages, if the store will hold each runner as they sent it.

        That is when the walk was complete, rejected nothing and saw every runner once: a
        runner sighted twice (the list moved under the walk) is stored as its later sighting,
        which the earlier page does not show.
        """
        digests, sighted = self.pages_read.get(walk.walks, ([], 0))
        if not walk.complete or self.rejected_in(walk.walks):
            return []
        return digests if sighted == len(self.seen_in(walk.walks)) else []

    def final(self, walk: WalkResult) -> _Sightings:
        """What to apply: the last walk's sightings if it is complete, else all sightings."""
        self._catch_up()
        last = walk.walks
        parsed: dict[str, RunnerRecord] = {}
        unchanged: set[str] = set()
        for runner_id, (n, record) in self.records.items():
            if walk.complete and n != last:
                continue
            if record is None:
                unchanged.add(runner_id)
            else:
                parsed[runner_id] = record
        return _Sightings(
            parsed=parsed,
            unchanged=unchanged,
            rejections=[rej for n, rej in self.rejections if n == last],
            spared=walk.kept,
            pages=self.pages_to_vouch_for(walk),
        )


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
    now = (lambda: store.utc_timestamp(clock())) if clock is not None else store.utc_timestamp
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
        collector = _Collector(
            key,
            settings.store_header_values,
            store.read_present_fingerprints_aside(db, settings.db_path),
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
    from pipeline import export, history  # pyarrow: loaded only by syncs that export

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
    collector: _Collector,
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
    collector: _Collector,
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
    seen: _Sightings,
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
