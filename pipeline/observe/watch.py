"""``observed_sync``: one sync, with its pings, its notifications and its metrics file.

The ``sync`` command and the scheduler's job both sync through here, so a scheduled run
tells the outside world exactly what a one-off run does. ``run_sync`` stays unaware of it.
The order, and what each step guarantees:

1. the options are checked (an Apprise URL it cannot use is a ConfigurationError, before
   anything starts);
2. the start ping goes out on its own thread while the sync runs, so it never delays it
   (a sync skipped because another holds the database sends nothing: it is no run);
3. after the sync, whatever its outcome: the notifications the run log calls for (a
   failure notice when the streak of failed runs reaches ``notify_after_failures``, once;
   a recovery notice at the first good run after such a streak; a change notice), then the
   finish ping, then the metrics file;
4. each of those that failed is a warning, logged and appended to the run's ``warnings``,
   together with the retries counted (``store.write.record_run_afterwards``). None of them
   can change the sync's outcome: its exception, if any, is re-raised unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field

from pipeline.errors import ComfySyncError, SyncLockedError
from pipeline.observe import runlog
from pipeline.observe.notify import (
    Notice,
    Notifiers,
    change_events,
    changes_notice,
    failure_notice,
    recovery_notice,
)
from pipeline.observe.ping import PING_TIMEOUT, send_ping
from pipeline.settings import Settings
from pipeline.source.client import retries_made
from pipeline.sync.collector import ProgressCallback
from pipeline.sync.run import SyncSummary, run_sync

log = logging.getLogger(__name__)


@dataclass
class _Report:
    """What the steps after a sync found out, to record in its run."""

    warnings: list[str] = field(default_factory=list)

    def add(self, warning: str | None) -> None:
        if warning:
            log.warning("%s", warning)
            self.warnings.append(warning)


def outcome_line(summary: SyncSummary) -> str:
    """A sync's outcome in one line: the body of its ping and of a recovery notice."""
    walk = "complete" if summary.complete else "NOT complete"
    return (
        f"sync {summary.sync_id} {summary.status}: {summary.runners_seen} runners ({walk}), "
        f"created {summary.created}, updated {summary.updated}, deleted {summary.deleted}, "
        f"restored {summary.restored}, rejected {summary.rejected}, in {summary.seconds:.1f} s"
    )


def observed_sync(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    on_progress: ProgressCallback | None = None,
    sync: Callable[..., SyncSummary] = run_sync,
) -> SyncSummary:
    """``run_sync`` with the pings, notifications and metrics file ``settings`` ask for.

    Returns the summary or raises what ``run_sync`` raised (ConfigurationError too, for a
    notification URL Apprise cannot use). ``sync`` is a seam for tests.
    """
    settings = settings.validated()
    notifiers = Notifiers(settings.notify) if settings.notify else None
    if notifiers is None and settings.ping_url is None and settings.metrics_file is None:
        return sync(settings, stop=stop, on_progress=on_progress)
    report = _Report()
    before = _newest_run_id(settings)
    retries_before = retries_made()
    start = _start_ping(settings, report)
    try:
        summary = sync(settings, stop=stop, on_progress=on_progress)
    except SyncLockedError:
        raise  # another sync is running: this was no run, and tells nothing
    except ComfySyncError as exc:
        _after(settings, notifiers, report, start, before, retries_before, None, exc.message)
        raise
    except Exception as exc:
        failure = f"internal error ({type(exc).__name__})"
        _after(settings, notifiers, report, start, before, retries_before, None, failure)
        raise
    _after(
        settings, notifiers, report, start, before, retries_before, summary, outcome_line(summary)
    )
    return summary


def _start_ping(settings: Settings, report: _Report) -> threading.Thread | None:
    url = settings.ping_url
    if url is None:
        return None
    from pipeline.sync.lock import sync_lock_is_free

    if not sync_lock_is_free(settings.db_path):
        return None  # the sync will be refused as locked: no run, no ping
    style = settings.ping_style
    thread = threading.Thread(
        target=lambda: report.add(send_ping(url, "start", "sync started", style=style)),
        name="comfysync-start-ping",
        daemon=True,
    )
    thread.start()
    return thread


def _newest_run_id(settings: Settings) -> int:
    """The newest run before this sync: every run after it is this sync's."""
    from pipeline.store.schema import open_store_read_only

    if not settings.db_path.is_file():
        return 0
    try:
        with closing(open_store_read_only(settings.db_path)) as db:
            return runlog.newest_run_id(db)
    except ComfySyncError:
        return 0  # the sync itself will say what is wrong with the database


def _after(
    settings: Settings,
    notifiers: Notifiers | None,
    report: _Report,
    start: threading.Thread | None,
    before: int,
    retries_before: int,
    summary: SyncSummary | None,
    outcome: str,
) -> None:
    """The steps after a sync (see the module docstring); never raises a ComfySyncError."""
    if start is not None:
        start.join(timeout=3 * PING_TIMEOUT)
    sync_id, notices = _notices(settings, summary, before, outcome)
    if notifiers is not None:
        for notice in notices:
            for warning in notifiers.send(notice):
                report.add(warning)
    if settings.ping_url is not None:
        signal = "fail" if summary is None else "success"
        report.add(send_ping(settings.ping_url, signal, outcome, style=settings.ping_style))
    _record(settings, sync_id, report.warnings, retries_made() - retries_before)
    if settings.metrics_file is not None:
        from pipeline.observe.metrics import write_metrics_file

        problem = write_metrics_file(settings.db_path, settings.metrics_file)
        if problem is not None:
            log.warning("%s", problem)
            _record(settings, sync_id, [problem], 0)


def _notices(
    settings: Settings, summary: SyncSummary | None, before: int, outcome: str
) -> tuple[int | None, list[Notice]]:
    """This sync's run id (None if it never reached the run log) and the notices it calls for."""
    from pipeline.read.changelog import changes_in_sync
    from pipeline.store.schema import open_store_read_only

    if not settings.db_path.is_file():
        return None, []
    try:
        with closing(open_store_read_only(settings.db_path)) as db:
            if summary is not None:
                sync_id: int | None = summary.sync_id
            else:
                row = db.execute("SELECT min(id) FROM sync_runs WHERE id > ?", [before]).fetchone()
                sync_id = row[0]
            if sync_id is None or not settings.notify:
                return sync_id, []
            wanted = settings.notify_on
            threshold = settings.notify_after_failures
            notices = []
            if summary is None and runlog.run_status(db, sync_id) == "failed":
                failures = runlog.failures_in_a_row(db, up_to=sync_id)
                if "failure" in wanted and failures == threshold:
                    notices.append(failure_notice(failures, outcome))
            elif summary is not None:
                failures = runlog.failures_in_a_row(db, up_to=sync_id - 1)
                if "recovery" in wanted and failures >= threshold:
                    notices.append(recovery_notice(failures, outcome))
                if "changes" in wanted:
                    events = change_events(
                        changes_in_sync(db, sync_id),
                        kinds=settings.notify_changes,
                        fields=settings.notify_fields,
                    )
                    if events:
                        notices.append(changes_notice(sync_id, events))
            return sync_id, notices
    except ComfySyncError as exc:
        log.warning("no notification: the run log could not be read (%s)", exc.message)
        return None, []


def _record(settings: Settings, sync_id: int | None, warnings: list[str], retries: int) -> None:
    """Append ``warnings`` to the run's record and add ``retries`` to the database's count."""
    from pipeline.store import schema
    from pipeline.store.write import record_run_afterwards
    from pipeline.sync.lock import hold_sync_lock

    if not (warnings and sync_id is not None) and not retries:
        return
    if not settings.db_path.is_file():
        return
    try:
        with hold_sync_lock(settings.db_path):
            db = schema.open_store(settings.db_path)
            try:
                record_run_afterwards(db, sync_id, warnings=warnings, retries=retries)
            finally:
                schema.close_store(db, settings.db_path)
    except ComfySyncError as exc:  # another sync took the database: the log has the warnings
        log.warning("could not add the warnings above to the run's record: %s", exc.message)
