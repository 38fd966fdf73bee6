"""The scheduled job: one sync, exactly as ``comfysync sync`` runs it, as an outcome to count.

There is no second code path: the job calls ``pipeline.observe.watch.observed_sync`` (which
runs ``pipeline.sync.run.run_sync``) with the same Settings the ``sync`` command builds, so a
scheduled run takes the same lock, writes the same run log and the same exports, and sends the
same pings and notifications. What the job adds is what a scheduler needs and a one-off command does
not: a run that fails must never end the schedule, so every error becomes a logged
``SyncAttempt`` instead of an exception.

How each outcome is logged (the run log, ``sync_runs``, has the rest):

* authentication failures at ERROR, every time, saying what to fix: no later run can succeed;
* other failures at ERROR, but an upstream outage after retries at WARNING (it passes);
* a sync skipped because another holds the database at WARNING (nothing was written);
* a run stopped by SIGINT/SIGTERM at INFO: it was asked for.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from pipeline.errors import (
    AuthenticationError,
    ComfySyncError,
    StorageError,
    SyncInterruptedError,
    SyncLockedError,
    UpstreamError,
)
from pipeline.observe.watch import observed_sync
from pipeline.settings import Settings
from pipeline.sync.run import SyncSummary

log = logging.getLogger(__name__)

#: SyncAttempt.status values beyond the run log's own success/partial/failed.
SKIPPED = "skipped"
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class SyncAttempt:
    """What one scheduled attempt did.

    ``status`` is ``success``, ``partial`` or ``failed`` (as in ``sync_runs``), ``skipped``
    (another sync held the database; nothing written) or ``interrupted`` (stopped by a signal;
    recorded as ``failed`` in ``sync_runs``). ``exit_code`` is what ``comfysync sync`` would
    have exited with.
    """

    status: str
    seconds: float
    summary: SyncSummary | None = None
    error: str | None = None
    exit_code: int = 0

    @property
    def counts_as_run(self) -> bool:
        """Whether it reached the database as a run (a skipped tick is not a run)."""
        return self.status != SKIPPED

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def sync_runners(settings: Settings, *, stop: threading.Event | None = None) -> SyncAttempt:
    """Run one sync as ``comfysync sync`` does; log and return its outcome, never raise
    (but for BaseExceptions such as KeyboardInterrupt, which are not a run's outcome)."""
    started = time.monotonic()

    def attempt(status: str, error: ComfySyncError | None = None) -> SyncAttempt:
        return SyncAttempt(
            status=status,
            seconds=round(time.monotonic() - started, 3),
            error=error.message if error is not None else None,
            exit_code=error.exit_code if error is not None else 0,
        )

    try:
        summary = observed_sync(settings, stop=stop)
    except SyncLockedError as exc:
        log.warning("run skipped: %s; trying again at the next tick", exc.message)
        return attempt(SKIPPED, exc)
    except SyncInterruptedError as exc:
        log.info("run stopped: %s", exc.message)
        return attempt(INTERRUPTED, exc)
    except AuthenticationError as exc:
        log.error(
            "AUTHENTICATION FAILED: %s. Every scheduled run will fail until the token is "
            "fixed; the schedule keeps trying.",
            exc.message,
        )
        return attempt("failed", exc)
    except ComfySyncError as exc:
        transient = isinstance(exc, UpstreamError) and not isinstance(exc, StorageError)
        log.log(logging.WARNING if transient else logging.ERROR, "run failed: %s", exc.message)
        return attempt("failed", exc)
    except Exception as exc:
        # The text is left out, as in the CLI: it could quote a secret it was handed.
        log.error(
            "run failed: internal error (%s); run with --debug for a traceback, and please "
            "report it",
            type(exc).__name__,
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        internal = ComfySyncError(f"internal error ({type(exc).__name__})")
        return attempt("failed", internal)
    return SyncAttempt(status=summary.status, seconds=summary.seconds, summary=summary, exit_code=0)
