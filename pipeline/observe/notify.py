"""Notifications through Apprise: a failing mirror, its recovery, and the fleet's changes.

The messages are built here from plain values (``failure_notice``, ``recovery_notice``,
``changes_notice``) and sent by ``Notifiers``, one Apprise service per URL, each with short
timeouts. What a message may say: runner names, ids, change kinds, which fields changed, and
the old and new ``status`` and ``name``; never a field's value otherwise (an endpoint can
hold a password, headers hold tokens), never a URL of ours. Every text from upstream goes
through ``printable``. A URL is only ever shown masked (Apprise's privacy form). A service
that fails is reported as a warning; sending never raises.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigurationError
from pipeline.printable import printable

if TYPE_CHECKING:
    from pipeline.read.changelog import VersionEntry

log = logging.getLogger(__name__)

#: How many runners a change notice names; the rest are counted.
MAX_RUNNERS_LISTED = 20
#: Seconds a notification service gets to connect, and to answer: never long enough to hold
#: up a schedule.
NOTIFY_TIMEOUT = 5.0
#: Fields whose old and new values a change notice shows; the others are only named.
SHOWN_FIELDS = ("name", "status")


@dataclass(frozen=True)
class Notice:
    """One notification: a title, a body, and Apprise's type (info, success, failure)."""

    kind: str
    title: str
    body: str
    notify_type: str


@dataclass(frozen=True)
class RunnerEvent:
    """One runner in a change notice: its kind of change and what changed."""

    kind: str
    runner_id: str
    name: str
    detail: str


def failure_notice(failures: int, outcome: str) -> Notice:
    return Notice(
        kind="failure",
        title=f"comfysync: sync failing ({failures} failed run(s) in a row)",
        body=f"{failures} sync run(s) failed in a row; the last: {printable(outcome)}",
        notify_type="failure",
    )


def recovery_notice(failures: int, outcome: str) -> Notice:
    return Notice(
        kind="recovery",
        title="comfysync: sync recovered",
        body=f"sync works again after {failures} failed run(s): {printable(outcome)}",
        notify_type="success",
    )


def change_events(
    entries: Iterable[VersionEntry], *, kinds: Sequence[str], fields: Sequence[str]
) -> list[RunnerEvent]:
    """The versions a change notice reports, filtered by change kind and changed field.

    ``disabled`` is an update or restoration that set ``status`` to ``disabled``; it is
    reported as such when asked for, else as the update it is. ``fields``, when given, keeps
    only updates and restorations that changed one of them (``disabled`` ones always).
    """
    events = []
    for entry in entries:
        changed = {change.field: change for change in entry.fields}
        status = changed.get("status")
        if "disabled" in kinds and status is not None and status.new_value == "disabled":
            kind = "disabled"
        elif entry.change in kinds and _has_wanted_field(entry.change, changed, fields):
            kind = entry.change
        else:
            continue
        details = [
            f"{name} {printable(str(changed[name].old_value))} -> "
            f"{printable(str(changed[name].new_value))}"
            for name in SHOWN_FIELDS
            if name in changed
        ]
        # updated_at changes with every update: naming it would say nothing.
        others = [name for name in changed if name not in (*SHOWN_FIELDS, "updated_at")]
        if others:
            details.append("changed " + ", ".join(others))
        events.append(
            RunnerEvent(kind, entry.runner_id, printable(entry.name or ""), "; ".join(details))
        )
    return events


def _has_wanted_field(change: str, changed: Iterable[str], fields: Sequence[str]) -> bool:
    """Whether a version passes ``--notify-fields``, which only filters updates and restorations."""
    return change not in ("updated", "restored") or not fields or bool(set(changed) & set(fields))


def changes_notice(sync_id: int, events: Sequence[RunnerEvent]) -> Notice:
    """Counts by kind, then up to MAX_RUNNERS_LISTED runners by name with what changed."""
    counts: dict[str, int] = {}
    for event in events:
        counts[event.kind] = counts.get(event.kind, 0) + 1
    tally = ", ".join(f"{count} {kind}" for kind, count in counts.items())
    lines = [f"sync {sync_id}: {len(events)} runner change(s): {tally}"]
    for event in events[:MAX_RUNNERS_LISTED]:
        detail = f" ({event.detail})" if event.detail else ""
        lines.append(f"- {event.kind}: {event.name} [{event.runner_id}]{detail}")
    if len(events) > MAX_RUNNERS_LISTED:
        lines.append(f"... and {len(events) - MAX_RUNNERS_LISTED} more (comfysync changes)")
    return Notice(
        kind="changes",
        title=f"comfysync: {len(events)} runner change(s) ({tally})",
        body="\n".join(lines),
        notify_type="info",
    )


class Notifiers:
    """The Apprise services named by ``--notify``, loaded once and checked before any sync.

    Each argument may hold several URLs (space- or comma-separated, as Apprise reads them).
    ConfigurationError for a URL Apprise cannot use, naming its position and scheme only.
    """

    def __init__(self, urls: Iterable[str]) -> None:
        import apprise  # loaded only by syncs that notify
        from apprise.utils.parse import parse_urls

        # Apprise's own log lines can quote a service's address; failures are ours to report.
        logging.getLogger("apprise").setLevel(logging.CRITICAL)
        self._services: list[Any] = []
        split = [url for text in urls for url in parse_urls(text)]  # type: ignore[no-untyped-call]
        for number, url in enumerate(split, 1):
            service = apprise.Apprise.instantiate(url, suppress_exceptions=True)
            if service is None:
                scheme = url.partition("://")[0] if "://" in url else "no scheme"
                raise ConfigurationError(
                    f"--notify URL #{number} ({printable(scheme[:20])}://...) is not a "
                    "notification URL Apprise can use; see https://github.com/caronc/apprise/wiki"
                )
            service.socket_connect_timeout = min(
                service.socket_connect_timeout or NOTIFY_TIMEOUT, NOTIFY_TIMEOUT
            )
            service.socket_read_timeout = min(
                service.socket_read_timeout or NOTIFY_TIMEOUT, NOTIFY_TIMEOUT
            )
            self._services.append(service)

    def send(self, notice: Notice) -> list[str]:
        """Send ``notice`` to every service; return a warning for each one that failed."""
        warnings = []
        for service in self._services:
            try:
                delivered = service.notify(
                    body=notice.body, title=notice.title, notify_type=notice.notify_type
                )
            except Exception as exc:  # a notifier must never fail the sync
                delivered, why = False, f" ({type(exc).__name__})"
            else:
                why = ""
            if not delivered:
                # Apprise's masked form, without the query of its own settings.
                shown = printable(service.url(privacy=True).partition("?")[0])
                warnings.append(f"{notice.kind} notification to {shown} was not delivered{why}")
        return warnings
