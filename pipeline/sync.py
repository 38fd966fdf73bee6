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
* a complete walk with no rejected records ends ``success``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlite_utils import Database

from pipeline import guardrails, schema, store
from pipeline.changes import ChangeSet, StoredState, ids_needing_fields, plan_changes
from pipeline.client import ComfyControlClient, Page
from pipeline.errors import ComfySyncError, ForeignAccountError, StorageError
from pipeline.records import KNOWN_STATUSES, Rejection, RunnerRecord, parse_runner
from pipeline.settings import Settings
from pipeline.walk import WalkResult, pages_needed, walk_all_pages

log = logging.getLogger(__name__)

#: Called after each page with (pages read, pages expected in this walk, runners seen).
ProgressCallback = Callable[[int, int, int], None]


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

    @property
    def changed(self) -> int:
        return self.created + self.updated + self.deleted + self.restored


class _Collector:
    """Parses each page as it arrives; the latest sighting of a runner wins."""

    def __init__(self, key: bytes, store_header_values: bool, on_progress: ProgressCallback | None):
        self.key = key
        self.store_header_values = store_header_values
        self.on_progress = on_progress
        self.records: dict[str, tuple[int, RunnerRecord]] = {}
        self.rejections: list[tuple[int, Rejection]] = []
        self.pages_in_walk = 0
        self.walk = 0

    def __call__(self, page: Page, walk: int) -> None:
        if walk != self.walk:
            self.walk, self.pages_in_walk = walk, 0
        for position, raw in enumerate(page.runners):
            parsed = parse_runner(
                raw,
                page=page.number,
                position=position,
                redaction_key=self.key,
                store_header_values=self.store_header_values,
            )
            if isinstance(parsed, Rejection):
                self.rejections.append((walk, parsed))
            else:
                self.records[parsed.id] = (walk, parsed)
        self.pages_in_walk += 1
        if self.on_progress is not None:
            expected = pages_needed(page.total, page.per_page)
            self.on_progress(self.pages_in_walk, expected, len(self.records))

    def seen_in(self, walk: int) -> set[str]:
        """Ids last seen in walk number ``walk`` (all of that walk's, while it is the latest)."""
        return {runner_id for runner_id, (n, _) in self.records.items() if n == walk}

    def final(self, walk: WalkResult) -> tuple[dict[str, RunnerRecord], list[Rejection], set[str]]:
        """What to apply: the last walk's sightings if it is complete, else all sightings.

        The third value holds the ids a confirmed walk spares: seen by the complete walk
        before the last, missed by the last, so not proven gone.
        """
        if walk.complete:
            records = {i: rec for i, (n, rec) in self.records.items() if n == walk.walks}
        else:
            records = {i: rec for i, (_, rec) in self.records.items()}
        rejections = [rej for n, rej in self.rejections if n == walk.walks]
        spared = self.seen_in(walk.walks - 1) if walk.confirmed else set()
        return records, rejections, spared


def run_sync(
    settings: Settings,
    *,
    client: ComfyControlClient | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    db: Database | None = None,
    on_progress: ProgressCallback | None = None,
) -> SyncSummary:
    """Mirror the account into the store once. Raises a ComfySyncError subclass on failure.

    ``client``, ``transport`` and ``db`` are seams for tests and embedding: by default the
    client and database are built from ``settings``.
    """
    started = time.monotonic()
    settings = settings.validated()
    if db is not None:
        return _sync_into(db, settings, client, transport, on_progress, started)
    db = schema.open_store(settings.db_path)
    try:
        return _sync_into(db, settings, client, transport, on_progress, started)
    finally:
        db.close()


def _sync_into(
    db: Database,
    settings: Settings,
    client: ComfyControlClient | None,
    transport: httpx.AsyncBaseTransport | None,
    on_progress: ProgressCallback | None,
    started: float,
) -> SyncSummary:
    sync_id = store.begin_run(db, base_url=settings.base_url, started_at=store.utc_timestamp())
    try:
        stored = store.load_stored_states(db)
        present = {runner_id for runner_id, state in stored.items() if not state.deleted}
        collector = _Collector(schema.redaction_key(db), settings.store_header_values, on_progress)

        def needs_confirmation(walk_number: int) -> bool:
            # Would this complete walk delete anything (that the mass-deletion guard allows)?
            seen = collector.seen_in(walk_number)
            missing = len(present - seen)
            mass = _mass_deletion(settings, missing, len(present), len(seen))
            return missing > 0 and mass is None

        walk = asyncio.run(_walk(settings, client, transport, collector, needs_confirmation))
        records, rejections, spared = collector.final(walk)
        summary = _decide_and_apply(
            db, settings, sync_id, walk, stored, records, rejections, spared, started
        )
    except BaseException as exc:
        error = exc.message if isinstance(exc, ComfySyncError) else _describe(exc)
        try:
            store.record_failed_run(db, sync_id, error=error, finished_at=store.utc_timestamp())
        except StorageError as unrecorded:  # a full disk: the first failure is the news
            log.warning("%s", unrecorded)
        raise
    return summary


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted before anything was applied"
    return f"unexpected {type(exc).__name__}; nothing was applied"


async def _walk(
    settings: Settings,
    client: ComfyControlClient | None,
    transport: httpx.AsyncBaseTransport | None,
    collector: _Collector,
    needs_confirmation: Callable[[int], bool],
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
            retry_after_cap=settings.retry_after_cap,
            transport=transport,
        )
    async with client:
        return await walk_all_pages(
            client,
            per_page=settings.per_page,
            concurrency=settings.concurrency,
            max_walks=settings.max_walks,
            on_page=collector,
            needs_confirmation=needs_confirmation,
        )


def _decide_and_apply(
    db: Database,
    settings: Settings,
    sync_id: int,
    walk: WalkResult,
    stored: dict[str, StoredState],
    records: dict[str, RunnerRecord],
    rejections: list[Rejection],
    spared: set[str],
    started: float,
) -> SyncSummary:
    owners = {record.user_id for record in records.values()}
    known_owners = store.load_known_owners(db)
    if guardrails.is_foreign_account(known_owners, owners):
        raise ForeignAccountError(guardrails.foreign_account_message(owners, known_owners))
    complete = walk.complete and not rejections
    warnings = list(_warnings(walk, rejections, records))
    stored_fields = store.load_stored_fields(db, ids_needing_fields(stored, records.values()))
    changes = plan_changes(
        stored, stored_fields, records, deletions_allowed=complete, spared=spared
    )
    present = sum(1 for state in stored.values() if not state.deleted)
    mass_deletion = _mass_deletion(settings, len(changes.deleted), present, len(records))
    if mass_deletion is not None:
        changes = changes.without_deletions()
        warnings.append(mass_deletion)
    elif changes.deletions_withheld:
        because = (
            "the walk before the last one still saw them (the next sync decides)"
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
        runners_seen=len(records),
        rejected=len(rejections),
        warnings=tuple(warnings),
    )
    store.apply_changes(
        db,
        changes,
        rejections,
        sync_id=sync_id,
        outcome=outcome,
        applied_at=store.utc_timestamp(),
        owners=owners,
    )
    for warning in warnings:
        log.warning("%s", warning)
    return _summarise(sync_id, outcome, changes, time.monotonic() - started, settings.db_path)


def _mass_deletion(settings: Settings, would_delete: int, present: int, seen: int) -> str | None:
    return guardrails.mass_deletion_reason(
        would_delete,
        present,
        seen,
        max_ratio=settings.max_delete_ratio,
        allowed=settings.allow_mass_delete,
    )


def _warnings(
    walk: WalkResult, rejections: list[Rejection], records: dict[str, RunnerRecord]
) -> list[str]:
    warnings = []
    if not walk.complete:
        warnings.append(f"no complete walk in {walk.walks} attempt(s): " + "; ".join(walk.reasons))
    if rejections:
        warnings.append(
            f"{len(rejections)} runner record(s) could not be stored (see rejected_records)"
        )
    unknown = sum(1 for record in records.values() if record.status not in KNOWN_STATUSES)
    if unknown:
        warnings.append(f"{unknown} runner(s) have a status other than active/disabled")
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
