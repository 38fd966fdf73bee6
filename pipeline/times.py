"""Time as comfysync stores it and as users type it: one owner, so every reader agrees.

Every stored moment (``valid_from``, ``started_at``, ...) is ISO 8601 UTC text with
microseconds and a ``Z`` (``utc_timestamp``). A time read without an offset is UTC
(``assume_utc``, ``utc_instant``): the store keeps every time in UTC, so that is the only
reading that cannot surprise. A length of time (``--since``, ``--every``) is a whole number
and a unit (``duration_seconds``); each option sets its own bounds.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

_DURATION = re.compile(r"\s*(\d+)\s*([smhdw])\s*", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
#: The units of a duration, for the messages that list them.
DURATION_UNITS = "s, m, h, d or w"


def utc_timestamp(moment: datetime | None = None) -> str:
    """ISO 8601 UTC with microseconds and a ``Z``: sortable as text, exact as a time."""
    moment = moment or datetime.now(UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def assume_utc(moment: datetime) -> datetime:
    """``moment``, in UTC if it names no zone; one that does is left as it is."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def utc_instant(value: str | date | datetime) -> datetime:
    """An instant in UTC from ISO 8601 text, a date (its start) or a datetime; ValueError if none.

    Also a ValueError: an offset that carries the instant off the calendar in UTC (near the
    years 1 and 9999), so callers have one error to turn into their own message.
    """
    try:
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if not isinstance(value, datetime):
            value = datetime(value.year, value.month, value.day)
        return assume_utc(value).astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value} is outside the years 0001 to 9999 in UTC") from None


def duration_seconds(text: str) -> int:
    """Seconds in ``30s``, ``15m``, ``2h``, ``7d`` or ``2w``; ValueError for anything else.

    Case and spaces around the number and the unit are ignored. A whole number of seconds
    rather than a timedelta, so a caller can refuse one too long before anything overflows.
    """
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
