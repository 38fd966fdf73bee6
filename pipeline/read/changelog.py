"""What changed, as people ask it: the versions of one runner, or every change since a moment.

Read-only: every function takes an open database and only SELECTs. The per-field old and new
values come from the ``runner_changes`` view, so the commands, Datasette and users' own SQL
all see one definition of a change. A created or deleted version lists no fields here (a
creation has no old values; the full record of any version is in ``runner_versions``); an
update or a restoration lists each changed field with its old and new value as stored,
except header values: those are always shown ``redacted:``, exactly as a default mirror stores
them, even in a mirror told to keep them in clear (``--store-header-values``). That choice
puts them in the database and its exports, not on terminals, in cron mail or in logs. A
reader who cannot get at the redaction key (``keyfile.key_for_reading``) sees such values as
``redacted``, without a digest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

from pipeline.errors import ConfigurationError, RunnerLookupError, RunnerNotFoundError
from pipeline.source.records import REDACTED_PREFIX, TRACKED_FIELDS, redact_headers
from pipeline.store.keyfile import key_for_reading
from pipeline.store.sqlite import Database
from pipeline.times import duration_seconds, utc_instant, utc_timestamp

#: How many candidates an ambiguous runner lookup names.
MAX_CANDIDATES_SHOWN = 10

_REDACTED = re.compile(re.escape(REDACTED_PREFIX) + r"[0-9a-f]{12}")
#: A value stored in clear, shown to a reader who has no key to digest it with.
REDACTED_WITHOUT_KEY = REDACTED_PREFIX.rstrip(":")


@dataclass(frozen=True)
class FieldChange:
    """One field of one version: its value before and after, as stored."""

    field: str
    old_value: str | None
    new_value: str | None


@dataclass(frozen=True)
class VersionEntry:
    """One version of one runner: when, what kind of change, and the fields it changed."""

    runner_id: str
    name: str
    version: int
    change: str
    changed_at: str
    sync_id: int
    fields: tuple[FieldChange, ...]


#: What ``resolve_runner`` matched a query with (``Match.by``), in the order it tries them.
BY_ID, BY_ID_PREFIX, BY_NAME, BY_FORMER_NAME = "id", "id prefix", "name", "former name"


@dataclass(frozen=True)
class Match:
    """How a lookup named its runner: ``by`` one of the BY_* kinds; for a former name,
    ``version`` is the last version that had the name."""

    by: str
    version: int | None = None


@dataclass(frozen=True)
class RunnerHistory:
    """A runner's current name and state, every version (oldest first), and how the lookup
    found it (None when it was not looked up)."""

    runner_id: str
    name: str
    deleted_at: str | None
    versions: tuple[VersionEntry, ...]
    matched: Match | None = None


def resolve_runner(db: Database, query: str) -> tuple[str, Match]:
    """The id of the one runner ``query`` names, and how: a full id, a unique id prefix, an
    exact name, or a name it had before.

    A full id always wins. Then every runner whose id starts with ``query`` (ignoring case)
    or whose name is exactly ``query`` is a candidate, deleted runners included. Only when
    there is none are former names looked at (any version's name): a name some runner has
    now means that runner, even if another had it once. One candidate is the answer; none
    or several raise RunnerLookupError (naming them). Messages carry the query and names as
    they are: the CLI escapes the whole line.
    """
    if not query.strip():
        raise RunnerLookupError("give a runner id, a unique id prefix or an exact name")
    exact = db.execute("SELECT id FROM runners WHERE id = ?", [query]).fetchone()
    if exact is not None:
        return str(exact[0]), Match(BY_ID)
    candidates = db.execute(
        "SELECT id, name, name = ? FROM runners WHERE lower(substr(id, 1, ?)) = lower(?) "
        "OR name = ? ORDER BY id",
        [query, len(query), query, query],
    ).fetchall()
    if len(candidates) == 1:
        runner_id, _, by_name = candidates[0]
        return str(runner_id), Match(BY_NAME if by_name else BY_ID_PREFIX)
    if len(candidates) > 1:
        shown = _candidates(f"{row[0]} ({row[1]})" for row in candidates)
        raise RunnerLookupError(
            f"'{query}' matches {len(candidates)} runners: {shown}; pass more of the id"
        )
    return _resolve_former_name(db, query)


def _resolve_former_name(db: Database, query: str) -> tuple[str, Match]:
    formerly = db.execute(
        "SELECT v.runner_id, max(v.version), r.name FROM runner_versions AS v "
        "JOIN runners AS r ON r.id = v.runner_id WHERE v.name = ? "
        "GROUP BY v.runner_id ORDER BY v.runner_id",
        [query],
    ).fetchall()
    if len(formerly) == 1:
        return str(formerly[0][0]), Match(BY_FORMER_NAME, formerly[0][1])
    if not formerly:
        raise RunnerNotFoundError(
            f"no runner has or had the id, id prefix or name '{query}'; "
            "`comfysync changes --since 30d` lists recent ones"
        )
    shown = _candidates(f"{row[0]} ({row[2]}, as v{row[1]})" for row in formerly)
    raise RunnerLookupError(
        f"'{query}' was a former name of {len(formerly)} runners: {shown}; pass the id of one"
    )


def _candidates(descriptions: Iterable[str]) -> str:
    """The first MAX_CANDIDATES_SHOWN runners of an ambiguous lookup, and how many more."""
    listed = list(descriptions)
    more = len(listed) - MAX_CANDIDATES_SHOWN
    return ", ".join(listed[:MAX_CANDIDATES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def runner_history(db: Database, runner_id: str, *, matched: Match | None = None) -> RunnerHistory:
    """Every version of one runner (an id ``resolve_runner`` returned), oldest first, with
    how it was ``matched``."""
    row = db.execute("SELECT name, deleted_at FROM runners WHERE id = ?", [runner_id]).fetchone()
    if row is None:
        raise RunnerLookupError(f"no runner has the id '{runner_id}'")
    versions = _versions(db, runner_id=runner_id)
    return RunnerHistory(runner_id, row[0], row[1], tuple(versions), matched)


def changes_since(db: Database, since: str) -> list[VersionEntry]:
    """Every version recorded at or after ``since`` (a stored timestamp), newest first.

    Versions of one sync share a time; they are ordered by change kind, then name.
    """
    return _versions(db, since=since)


def changes_in_sync(db: Database, sync_id: int) -> list[VersionEntry]:
    """Every version one sync wrote, ordered by change kind, then name."""
    return _versions(db, sync_id=sync_id)


def _versions(
    db: Database,
    *,
    runner_id: str | None = None,
    since: str | None = None,
    sync_id: int | None = None,
) -> list[VersionEntry]:
    """The versions of one runner (oldest first), since a moment (newest first) or of one
    sync (by change kind and name), with their changed fields.

    Two set-based queries, not one per version: the versions, then the field rows of the
    same versions from ``runner_changes`` (whose ``changed_at`` is ``valid_from``).
    """
    params: list[object]
    if runner_id is not None:
        params = [runner_id]
        versions_where, fields_where, order_by = "runner_id = ?", "runner_id = ?", "version"
    elif sync_id is not None:
        params = [sync_id]
        versions_where, fields_where = "sync_id = ?", "sync_id = ?"
        order_by = "change, name, runner_id"
    else:
        params = [since]
        versions_where, fields_where = "valid_from >= ?", "changed_at >= ?"
        order_by = "valid_from DESC, change, name, runner_id, version DESC"
    fields = _changed_fields(db, fields_where, params)
    rows = db.execute(
        "SELECT runner_id, name, version, change, valid_from, sync_id FROM runner_versions "
        f"WHERE {versions_where} ORDER BY {order_by}",
        params,
    ).fetchall()
    return [
        VersionEntry(
            runner_id=row[0],
            name=row[1],
            version=row[2],
            change=row[3],
            changed_at=row[4],
            sync_id=row[5],
            fields=tuple(fields.get((row[0], row[2]), ())),
        )
        for row in rows
    ]


def _changed_fields(
    db: Database, where: str, params: Sequence[object]
) -> dict[tuple[str, int], list[FieldChange]]:
    cursor = db.execute(
        "SELECT runner_id, version, field, old_value, new_value FROM runner_changes "
        f"WHERE {where} AND change IN ('updated', 'restored') AND field IS NOT NULL",
        list(params),
    )
    fields: dict[tuple[str, int], list[FieldChange]] = {}
    keys: list[bytes | None] = []  # looked up once, at the first header change
    for runner_id, version, field, old, new in cursor:
        if field == "headers":
            if not keys:
                keys.append(key_for_reading(db))
            old, new = _redacted_headers(old, keys[0]), _redacted_headers(new, keys[0])
        fields.setdefault((runner_id, version), []).append(FieldChange(field, old, new))
    order = {name: position for position, name in enumerate(TRACKED_FIELDS)}
    for changes in fields.values():
        changes.sort(key=lambda change: order.get(change.field, len(order)))
    return fields


def _redacted_headers(text: str | None, key: bytes | None) -> str | None:
    """Stored ``headers`` JSON with every value kept in clear redacted as the default would
    (or shown as ``redacted`` alone, without a key)."""
    if text is None:
        return None
    headers = orjson.loads(text)
    clear = {
        name: value
        for name, value in headers.items()
        if not (isinstance(value, str) and _REDACTED.fullmatch(value))
    }
    if not clear:
        return text
    hidden = (
        redact_headers(clear, key)
        if key is not None
        else dict.fromkeys(clear, REDACTED_WITHOUT_KEY)
    )
    shown = {**headers, **hidden}
    return orjson.dumps(shown, option=orjson.OPT_SORT_KEYS).decode()


def parse_since(text: str, *, now: datetime | None = None) -> str:
    """The stored-timestamp form of ``--since``: a duration back from now or an ISO moment.

    Durations are ``pipeline.times.duration_seconds``'s: ``90m``, ``24h``, ``7d``, ``2w``. A
    date (``2026-11-01``) means its midnight UTC; a date and time without an offset is UTC.
    """
    value = text.strip()
    try:
        try:
            seconds = duration_seconds(value)
        except ValueError:
            moment = utc_instant(value)
        else:
            moment = (now or datetime.now(UTC)) - timedelta(seconds=seconds)
        # In the try too: a moment near year 1 or 9999 can leave the calendar once in UTC.
        return utc_timestamp(moment)
    except (ValueError, OverflowError) as exc:
        raise ConfigurationError(
            f"--since {text!r} is neither a duration (90m, 24h, 7d) nor an ISO date or "
            "date and time (2026-11-01, 2026-11-01T12:00Z)"
        ) from exc
