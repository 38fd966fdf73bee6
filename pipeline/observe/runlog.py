"""Failures in a row, read from the run log: the one memory that survives between cron runs.

Each ``comfysync sync`` from cron is a new process, so nothing an earlier run noticed can be
kept in memory. The run log (``sync_runs``) already says everything needed: a streak of
failures is the ``failed`` rows since the last ``success`` or ``partial`` one (a partial sync
did mirror the fleet, so it ends a streak). A run still ``running`` neither counts nor ends one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.store.sqlite import Database

#: Outcomes that end a streak of failures: the sync reached the store.
GOOD_OUTCOMES = ("success", "partial")


def failures_in_a_row(db: Database, *, up_to: int | None = None) -> int:
    """How many runs failed in a row, ending with run ``up_to`` (default: the newest run)."""
    if up_to is None:
        (up_to,) = db.execute("SELECT coalesce(max(id), 0) FROM sync_runs").fetchone()
    (count,) = db.execute(
        "SELECT count(*) FROM sync_runs WHERE status = 'failed' AND id <= ? AND id > "
        "coalesce((SELECT max(id) FROM sync_runs WHERE status IN (?, ?) AND id <= ?), 0)",
        [up_to, *GOOD_OUTCOMES, up_to],
    ).fetchone()
    return int(count)


def newest_run_id(db: Database) -> int:
    """The id of the newest run in the log, 0 when there is none."""
    (newest,) = db.execute("SELECT coalesce(max(id), 0) FROM sync_runs").fetchone()
    return int(newest)


def run_status(db: Database, sync_id: int) -> str | None:
    """The stored status of run ``sync_id``, None if there is no such run."""
    row = db.execute("SELECT status FROM sync_runs WHERE id = ?", [sync_id]).fetchone()
    return None if row is None else str(row[0])
