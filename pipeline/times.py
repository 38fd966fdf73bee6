"""Time as comfysync stores it: ISO 8601 UTC text with microseconds and a ``Z``.

One owner for the format every stored moment (``valid_from``, ``started_at``, ...) is
written in, so the read side, the write path and the snapshots agree on it.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_timestamp(moment: datetime | None = None) -> str:
    """ISO 8601 UTC with microseconds and a ``Z``: sortable as text, exact as a time."""
    moment = moment or datetime.now(UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
