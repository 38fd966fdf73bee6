"""``comfysync status --check``: the mirror's health as a monitoring plugin reports it.

One line, ``COMFYSYNC <STATE> - <what> | <perfdata>``, and the exit code Nagios, Icinga,
Sensu and their kind read: 0 OK, 1 WARNING (the newest run failed, or ended partial), 2
CRITICAL (no success within ``max_age``, never one, or ``max_failures`` failed runs in a
row), 3 UNKNOWN (no database, or one that cannot be read). The check only reads.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import ComfySyncError
from pipeline.observe.runlog import GOOD_OUTCOMES, failures_in_a_row
from pipeline.printable import printable
from pipeline.store.schema import open_store_read_only
from pipeline.times import utc_instant

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


@dataclass(frozen=True)
class CheckResult:
    """The plugin's exit code and its one line."""

    code: int
    line: str


def check_mirror(
    db_path: Path, *, max_age: int, max_failures: int, now: datetime | None = None
) -> CheckResult:
    """Judge the mirror at ``db_path``: ``max_age`` seconds since the last success at most,
    fewer than ``max_failures`` failed runs in a row."""
    now = now or datetime.now(UTC)
    try:
        with closing(open_store_read_only(db_path)) as db:
            newest = db.execute(
                "SELECT id, status, error FROM sync_runs WHERE status != 'running' "
                "ORDER BY id DESC LIMIT 1"
            ).fetchone()
            (last_success,) = db.execute(
                "SELECT max(finished_at) FROM sync_runs WHERE status = 'success'"
            ).fetchone()
            (present,) = db.execute(
                "SELECT count(*) FROM runners WHERE deleted_at IS NULL"
            ).fetchone()
            failures = failures_in_a_row(db)
    except ComfySyncError as exc:
        return _result(UNKNOWN, printable(exc.message), "")
    age = None if last_success is None else (now - utc_instant(last_success)).total_seconds()
    perfdata = (
        f"last_success_age={'' if age is None else round(age)}s;;{max_age};0 "
        f"consecutive_failures={failures};;{max_failures};0 runners={present};;;0"
    )
    if failures >= max_failures:
        error = printable(newest[2] or "") if newest else ""
        return _result(CRITICAL, f"{failures} run(s) failed in a row; the last: {error}", perfdata)
    if age is None:
        return _result(CRITICAL, "no sync has ever succeeded", perfdata)
    if age > max_age:
        return _result(
            CRITICAL, f"no successful sync for {_span(age)} (more than {_span(max_age)})", perfdata
        )
    if newest is not None and newest[1] not in GOOD_OUTCOMES:
        error = printable(newest[2] or "")
        return _result(WARNING, f"the latest run (sync {newest[0]}) failed: {error}", perfdata)
    if newest is not None and newest[1] == "partial":
        return _result(
            WARNING, f"the latest run (sync {newest[0]}) was partial; see comfysync runs", perfdata
        )
    return _result(OK, f"last success {_span(age)} ago, {present} runners", perfdata)


def _result(code: int, text: str, perfdata: str) -> CheckResult:
    tail = f" | {perfdata}" if perfdata else ""
    return CheckResult(code, f"COMFYSYNC {STATES[code]} - {text.replace('|', '/')}{tail}")


def _span(seconds: float) -> str:
    """A short length of time for people, rounded down to seconds, minutes, hours or days."""
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size * 2 or (unit == "m" and seconds >= size):
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
