"""``comfysync schedule``: APScheduler's BlockingScheduler running the sync job on a trigger.

What it guarantees, and how:

* **Never two syncs at once.** ``max_instances=1`` within the process; across processes the
  database's sync lock (``pipeline.sync.lock``): a tick that finds another sync running is logged
  as skipped, writes nothing, and the schedule waits for the next tick.
* **Late, never stacked.** A tick that comes while a run is still going is skipped (and
  logged), so a run longer than the interval delays the next one instead of queueing more.
  ``coalesce=True`` with ``misfire_grace_time=None``: ticks missed while the machine slept
  collapse into one run, started as soon as it wakes. A late sync is still worth doing,
  while a skipped one would leave the mirror a whole interval staler.
* **Failures do not end it.** Each failed run is logged and recorded ``failed`` in
  ``sync_runs``; only ``--max-consecutive-failures N`` failed runs in a row stop it
  (ScheduleGaveUpError, exit 4).
* **A clean stop.** On SIGINT or SIGTERM no new run starts; a run in progress is abandoned
  before it applies anything, or finishes the apply it is in; then it returns (exit 0).
* **One line per run**: status, counts, duration and the next run time, as text or JSON.
* **Metrics while it runs**: with ``metrics_address``, ``/metrics`` is served from a daemon
  thread for as long as the schedule runs (``pipeline.observe.metrics``).

Threads: the scheduler's loop runs in the main thread, the job in APScheduler's worker
thread, and a small stopper thread shuts the scheduler down when the schedule is finished
(a signal handler must not do that itself: it would interrupt the loop it shuts down).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_SCHEDULER_STARTED
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.blocking import BlockingScheduler

from jobs.sync_runners import SKIPPED, SyncAttempt, sync_runners
from pipeline.errors import ConfigurationError, ScheduleGaveUpError
from pipeline.observe.notify import Notifiers
from pipeline.settings import Settings
from pipeline.sync.stopping import leave_stop_signals_to_the_main_thread, stop_on_signals

log = logging.getLogger(__name__)

JOB_ID = "comfysync-sync"
#: The job: run one sync with these settings, abandoning it once ``stop`` is set.
SyncJob = Callable[..., SyncAttempt]


@dataclass(frozen=True)
class SchedulePlan:
    """When to sync and when to stop. ``trigger`` is an APScheduler trigger (see jobs.triggers)."""

    trigger: Any
    description: str
    timezone: ZoneInfo
    run_now: bool = True
    max_runs: int | None = None
    max_consecutive_failures: int | None = None
    #: (host, port) to serve Prometheus metrics on, or None.
    metrics_address: tuple[str, int] | None = None


def run_schedule(settings: Settings, plan: SchedulePlan, *, job: SyncJob = sync_runners) -> None:
    """Sync on ``plan`` until a signal or ``--max-runs`` (then return), or until
    ``--max-consecutive-failures`` (then raise ScheduleGaveUpError). Main thread only."""
    settings = settings.validated()
    if settings.notify:
        Notifiers(settings.notify)  # a URL Apprise cannot use is refused now, not at each run
    server = _serve_metrics(settings, plan.metrics_address)
    try:
        with stop_on_signals() as stop:
            schedule = _Schedule(settings, plan, job, stop)
            schedule.run()
    finally:
        if server is not None:
            server.shutdown()
    if schedule.gave_up:
        raise ScheduleGaveUpError(
            f"{schedule.consecutive_failures} runs failed in a row "
            f"(--max-consecutive-failures); the last: {schedule.last_error}"
        )


def run_account_schedules(
    schedules: dict[str, tuple[Settings, SchedulePlan]], *, job: SyncJob = sync_runners
) -> None:
    """Run every account of a configuration file on its own plan in one scheduler.

    Each account is one job with its own counts: its ``--max-runs`` or
    ``--max-consecutive-failures`` ends only its job, and the schedule returns once every
    job has ended (or on a signal). ScheduleGaveUpError then if any account gave up. Two
    syncs of one database never overlap: one job per database, one instance per job, and
    the database's lock. Main thread only.
    """
    checked = {}
    for name, (settings, plan) in schedules.items():
        try:
            checked[name] = (settings.validated(), plan)
        except ConfigurationError as exc:  # said for the account it is about
            raise ConfigurationError(f"account {name}: {exc.message}") from exc
    zone = next(iter(checked.values()))[1].timezone
    with stop_on_signals() as stop:
        scheduler = BlockingScheduler(timezone=zone)
        parts = [
            _Schedule(settings, plan, job, stop, scheduler=scheduler, account=name)
            for name, (settings, plan) in checked.items()
        ]

        def shut_down_when_all_finished() -> None:
            leave_stop_signals_to_the_main_thread()
            for part in parts:
                part.finished.wait()
            scheduler.remove_all_jobs()
            scheduler.shutdown(wait=False)

        stopper = threading.Thread(target=shut_down_when_all_finished, daemon=True)
        scheduler.add_listener(lambda event: stopper.start(), EVENT_SCHEDULER_STARTED)
        for part in parts:
            part.add_job()
        scheduler.start()
        for part in parts:
            with part.running:  # a run told to stop is let to end
                pass
    gave_up = [part for part in parts if part.gave_up]
    if gave_up:
        raise ScheduleGaveUpError(
            "; ".join(
                f"account {part.account}: {part.consecutive_failures} runs failed in a row "
                f"(--max-consecutive-failures), the last: {part.last_error}"
                for part in gave_up
            )
        )


def _serve_metrics(settings: Settings, address: tuple[str, int] | None) -> Any:
    """Start the metrics server (None without an address); ConfigurationError if it cannot."""
    if address is None:
        return None
    from pipeline.observe.metrics import serve_metrics

    host, port = address
    try:
        server = serve_metrics(settings.db_path, host=host, port=port)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); "
            "pass another --metrics-port or --metrics-host"
        ) from exc
    bound_host, bound_port = server.server_address[:2]
    log.info("metrics: http://%s:%d/metrics", bound_host, bound_port)
    return server


class _Schedule:
    """The scheduler, the job and what they share: the counts and when to stop.

    With ``account`` (a configuration file's), it is that account's job in a ``scheduler``
    shared with the other accounts, and its log lines name the account.
    """

    def __init__(
        self,
        settings: Settings,
        plan: SchedulePlan,
        job: SyncJob,
        stop: threading.Event,
        *,
        scheduler: BlockingScheduler | None = None,
        account: str | None = None,
    ) -> None:
        self.settings = settings
        self.plan = plan
        self.job = job
        self.stop = stop  # set by a signal: abandon the run in progress
        self.finished = threading.Event()  # no more runs, for whatever reason
        self.finish_reason = ""
        self._finishing = threading.Lock()
        self.running = threading.Lock()  # held while a run is in progress
        self.runs = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.gave_up = False
        self.account = account
        self.job_id = JOB_ID if account is None else f"{JOB_ID}-{account}"
        self.label = "" if account is None else f"account {account}: "
        self.scheduler = scheduler or BlockingScheduler(timezone=plan.timezone)
        self.stopper = threading.Thread(
            target=self._shut_down_when_finished, name="comfysync-schedule-stopper", daemon=True
        )

    def run(self) -> None:
        """Block until the schedule is finished and no run is in progress."""
        self.scheduler.add_listener(lambda event: self.stopper.start(), EVENT_SCHEDULER_STARTED)
        self.add_job()
        self.scheduler.start()  # returns once the stopper has shut it down
        with self.running:  # the run in progress, if any, has been told to stop: let it end
            pass
        log.info("schedule stopped after %d run(s): %s", self.runs, self.finish_reason)

    def add_job(self) -> None:
        """Add the job to the scheduler, and watch for the stop signal."""
        first: dict[str, Any] = {}
        if self.plan.run_now:
            first["next_run_time"] = datetime.now(self.plan.timezone)
        self.scheduler.add_job(
            self._tick,
            trigger=self.plan.trigger,
            id=self.job_id,
            name="comfysync sync",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            **first,
        )
        self.scheduler.add_listener(self._tick_skipped, EVENT_JOB_MAX_INSTANCES)
        watcher = threading.Thread(target=self._watch_signal, daemon=True)
        watcher.start()
        log.info(
            "%sschedule: %s, database %s; first run %s",
            self.label,
            self.plan.description,
            self.settings.db_path,
            "now" if self.plan.run_now else f"at {_when(self._first_tick())}",
        )

    def _watch_signal(self) -> None:
        leave_stop_signals_to_the_main_thread()
        self.stop.wait()
        self._finish("stop signal received")

    def _finish(self, reason: str) -> None:
        with self._finishing:  # the first reason wins
            if not self.finished.is_set():
                self.finish_reason = reason
                self.finished.set()

    def _shut_down_when_finished(self) -> None:
        leave_stop_signals_to_the_main_thread()
        self.finished.wait()
        if self.stop.is_set():
            log.info("stop signal: no new run will start; a run in progress stops before applying")
        self.scheduler.remove_all_jobs()
        self.scheduler.shutdown(wait=False)

    def _first_tick(self) -> datetime | None:
        now = datetime.now(self.plan.timezone)
        return self.plan.trigger.get_next_fire_time(None, now)  # type: ignore[no-any-return]

    def _next_run_time(self) -> datetime | None:
        job = self.scheduler.get_job(self.job_id)
        return None if job is None else job.next_run_time

    def _tick(self) -> None:
        leave_stop_signals_to_the_main_thread()  # a worker thread of the scheduler's pool
        with self.running:
            if self.finished.is_set():
                return
            attempt = self.job(self.settings, stop=self.stop)
            self._count(attempt)
            next_run = None if self.finished.is_set() else self._next_run_time()
            message, fields = describe_attempt(self.runs, attempt, next_run, self.finish_reason)
            if self.account is not None:
                fields["account"] = self.account
            log.info("%s%s", self.label, message, extra={"fields": fields})
            if self.account is not None and self.finished.is_set():  # the others go on
                log.info("%sstopped after %d run(s): %s", self.label, self.runs, self.finish_reason)
                with contextlib.suppress(JobLookupError):
                    self.scheduler.remove_job(self.job_id)

    def _count(self, attempt: SyncAttempt) -> None:
        if not attempt.counts_as_run:
            return
        self.runs += 1
        if attempt.failed:
            self.consecutive_failures += 1
            self.last_error = attempt.error
        elif attempt.summary is not None:
            self.consecutive_failures = 0
        limit = self.plan.max_consecutive_failures
        if limit is not None and self.consecutive_failures >= limit:
            self.gave_up = True
            self._finish(f"--max-consecutive-failures {limit} reached")
        elif self.plan.max_runs is not None and self.runs >= self.plan.max_runs:
            self._finish(f"--max-runs {self.plan.max_runs} reached")

    def _tick_skipped(self, event: Any) -> None:
        if event.job_id != self.job_id:
            return
        log.info(
            "%stick at %s skipped: the previous run is still going (runs never overlap)",
            self.label,
            _when(event.scheduled_run_times[-1]),
        )


def _when(moment: datetime | None) -> str:
    return "none" if moment is None else moment.isoformat(timespec="seconds")


def describe_attempt(
    run: int, attempt: SyncAttempt, next_run: datetime | None, finish_reason: str
) -> tuple[str, dict[str, Any]]:
    """The one log line after a run, and the same facts as fields for the JSON log."""
    summary = attempt.summary
    then = (
        f"next run at {_when(next_run)}"
        if next_run is not None
        else f"no next run ({finish_reason or 'stopping'})"
    )
    fields: dict[str, Any] = {
        "event": "run",
        "run": None if attempt.status == SKIPPED else run,
        "status": attempt.status,
        "seconds": attempt.seconds,
        "exit_code": attempt.exit_code,
        "error": attempt.error,
        "next_run_at": None if next_run is None else next_run.isoformat(),
    }
    if summary is None:
        head = "tick skipped" if attempt.status == SKIPPED else f"run {run} {attempt.status}"
        detail = f" (exit {attempt.exit_code})" if attempt.exit_code else ""
        return f"{head}{detail} in {attempt.seconds:.2f} s; {then}", fields
    counts = {
        "created": summary.created,
        "updated": summary.updated,
        "deleted": summary.deleted,
        "restored": summary.restored,
        "unchanged": summary.unchanged,
        "rejected": summary.rejected,
    }
    fields.update(
        sync_id=summary.sync_id, runners=summary.runners_seen, complete=summary.complete, **counts
    )
    walk = "complete" if summary.complete else "NOT complete"
    listed = ", ".join(f"{name} {count}" for name, count in counts.items())
    message = (
        f"run {run} {summary.status}: sync {summary.sync_id}, {summary.runners_seen} runners "
        f"({walk}), {listed}, in {attempt.seconds:.2f} s; {then}"
    )
    return message, fields
