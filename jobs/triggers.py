"""When scheduled syncs run: ``--every``, ``--cron`` and ``--timezone`` turned into triggers.

Parsing is kept pure (strings in, values out, ValueError with a message fit for the user) so
that every accepted and refused form is tested without a scheduler or a clock.

One trap is handled here rather than documented away: APScheduler 3 numbers weekdays from
Monday = 0, while crontab numbers them from Sunday = 0 (and 7), so ``CronTrigger.from_crontab``
would run ``0 3 * * 1-5`` ("weekdays at 03:00") from Tuesday to Saturday. ``parse_cron``
rewrites the weekday field into day names, which both agree on, before handing it over.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from pipeline.times import DURATION_UNITS, duration_seconds

EVERY_FORMS = f"a positive whole number and a unit {DURATION_UNITS}: 30s, 15m, 2h, 1d, 1w"
CRON_FORMS = (
    "a standard 5-field crontab 'MINUTE HOUR DAY MONTH WEEKDAY', "
    "e.g. '*/15 * * * *' or '0 3 * * 1-5'"
)
TIMEZONE_FORMS = "an IANA time zone name such as UTC, Europe/Berlin or America/New_York"

#: The longest --every: a year is beyond any real schedule, and a much longer one overflows
#: the dates APScheduler computes.
MAX_EVERY = timedelta(days=365)
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+-]+(?:/[A-Za-z0-9_+-]+)*")
#: Crontab's weekday names, indexed by crontab's numbers (0 and 7 are Sunday).
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_WEEKDAY_TERM = re.compile(r"(\*|\w+)(?:-(\w+))?(?:/(\d+))?")


def parse_every(text: str) -> timedelta:
    """A positive ``pipeline.times`` duration (``15m``, ``1w``) -> timedelta; ValueError if not."""
    try:
        seconds = duration_seconds(text)
    except ValueError:
        seconds = 0
    if seconds == 0:
        raise ValueError(f"{_shown(text)} is not an interval; use {EVERY_FORMS}")
    if seconds > MAX_EVERY.total_seconds():
        raise ValueError(f"{_shown(text)} is longer than {MAX_EVERY.days}d; use {EVERY_FORMS}")
    return timedelta(seconds=seconds)


def _shown(text: str) -> str:
    """``text`` quoted for an error line, shortened: it may be anything a user typed."""
    return repr(text) if len(text) <= 60 else repr(text[:50]) + "..."


def parse_timezone(name: str) -> ZoneInfo:
    """An IANA zone name -> ZoneInfo; ValueError for a name the zone database does not know."""
    # The zone database's own name shape, checked first: ZoneInfo turns the name into a
    # package path, and a deeply nested garbage one exhausts its recursion.
    if len(name) > 64 or not _ZONE_NAME.fullmatch(name):
        raise ValueError(f"unknown time zone {_shown(name)}; use {TIMEZONE_FORMS}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a file
        raise ValueError(f"unknown time zone {_shown(name)}; use {TIMEZONE_FORMS}") from None


def crontab_weekdays(field: str) -> str:
    """Crontab's weekday field rewritten with day names (``1-5`` -> ``mon,tue,wed,thu,fri``).

    Accepts what crontab does: ``*``, numbers 0-7, names, ranges, steps and lists.
    """
    if field == "*":
        return field
    days: set[int] = set()
    for term in field.lower().split(","):
        match = _WEEKDAY_TERM.fullmatch(term)
        if not match:
            raise ValueError(f"weekday {term!r} is not a crontab weekday (0-7 or sun-sat)")
        first, last, step = match.groups()
        if first == "*":
            if last is not None:
                raise ValueError(f"weekday {term!r} is not a crontab weekday (0-7 or sun-sat)")
            start, end = 0, 6
        else:
            start = _weekday_number(first)
            end = _weekday_number(last) if last is not None else (6 if step else start)
        if start > end or (step is not None and int(step) == 0):
            raise ValueError(f"weekday range {term!r} is empty")
        days.update(day % 7 for day in range(start, end + 1, int(step or 1)))
    return ",".join(_CRON_DAYS[day] for day in sorted(days))


def _weekday_number(text: str) -> int:
    if text in _CRON_DAYS:
        return _CRON_DAYS.index(text)
    if text.isdigit() and int(text) <= 7:
        return int(text)
    raise ValueError(f"weekday {text!r} is not a crontab weekday (0-7 or sun-sat)")


def parse_cron(expression: str, timezone: ZoneInfo, *, jitter: int | None = None) -> Any:
    """A standard 5-field crontab -> an APScheduler CronTrigger; ValueError otherwise.

    Unlike Vixie cron, a day-of-month and a weekday given together must BOTH match.
    """
    fields = expression.split()
    try:
        if len(fields) != 5:
            raise ValueError(f"it has {len(fields)} field(s), not 5")
        fields[4] = crontab_weekdays(fields[4])
        trigger = CronTrigger.from_crontab(" ".join(fields), timezone=timezone)
        if trigger.get_next_fire_time(None, datetime.now(timezone)) is None:
            raise ValueError("no date ever matches it")
    except ValueError as exc:
        shown = _shown(expression)
        raise ValueError(f"{shown} is not a crontab ({exc}); use {CRON_FORMS}") from None
    trigger.jitter = jitter or None
    return trigger


def interval_trigger(every: timedelta, timezone: ZoneInfo, *, jitter: int | None = None) -> Any:
    """An APScheduler IntervalTrigger firing every ``every``, first one interval from now."""
    return IntervalTrigger(
        seconds=int(every.total_seconds()), timezone=timezone, jitter=jitter or None
    )
