"""Turn raw API runner objects into the rows comfysync stores, with secrets redacted.

Everything here is a plain function over plain values: no HTTP, no SQL. A record is
validated against the vendor's List Runners API reference; fields the reference does not
name are kept in ``extra`` so nothing the API sends is dropped; a record that cannot be
stored becomes a ``Rejection`` that carries the reason and its raw JSON, redacted.

Timestamps: ``created_at`` and ``updated_at`` are stored in one form, ``normalise_timestamp``'s,
whatever ISO 8601 spelling the API used, so every reader (SQL, pandas, Parquet, CSV) sees the
same instant and a respelling of the same instant is not a change.

Secrets: ``headers`` values are credentials for the runner's endpoint, and so is any
user:password in the endpoint URL. Unless the user opts in, each is replaced by
``redacted:`` + the first 12 hex digits of HMAC-SHA256 under a random per-database key, so a
rotated secret still shows up as a change while the secret never reaches the disk.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import orjson

from pipeline.times import assume_utc

#: The record fields comfysync tracks, in the order of the store's columns. A version's
#: ``changed_fields`` names a subset of these.
TRACKED_FIELDS: tuple[str, ...] = (
    "user_id",
    "name",
    "status",
    "endpoint",
    "tags",
    "headers",
    "created_at",
    "updated_at",
    "extra",
)
REFERENCE_FIELDS = frozenset(("id", *TRACKED_FIELDS)) - {"extra"}
KNOWN_STATUSES = frozenset(("active", "disabled"))
REDACTED_PREFIX = "redacted:"
_STRING_FIELDS = ("user_id", "name", "status", "endpoint", "created_at", "updated_at")
_TIMESTAMP_FIELDS = ("created_at", "updated_at")
_dumps = orjson.dumps
_SORT_KEYS = orjson.OPT_SORT_KEYS
_sha256 = hashlib.sha256


def redact_value(value: str, key: bytes) -> str:
    """``redacted:`` + 12 hex digits of HMAC-SHA256(key, value): stable, comparable, one-way."""
    return _redactor(key)(value)


@functools.lru_cache(maxsize=8)
def _redactor(key: bytes) -> Callable[[str], str]:
    """``redact_value`` for one key: the keyed HMAC is set up once and copied per value,
    since a sync redacts many values under the same key."""
    keyed = hmac.new(key, digestmod=hashlib.sha256)

    def redact(value: str) -> str:
        mac = keyed.copy()
        mac.update(value.encode("utf-8"))
        return REDACTED_PREFIX + mac.hexdigest()[:12]

    return redact


def redact_headers(headers: Mapping[str, Any], key: bytes) -> dict[str, str]:
    """Every header value redacted; header names are kept (they say what kind of secret it is)."""
    redact = _redactor(key)
    return {name: redact(_header_text(value)) for name, value in headers.items()}


def redact_endpoint(endpoint: str, key: bytes) -> str:
    """The endpoint URL with any user:password replaced by ``redacted:<hmac>``.

    ``https://bob:hunter2@gpu.example.com/x`` becomes ``https://redacted:1a2b3c4d5e6f@gpu.example.com/x``:
    still a URL, still shows a changed password as a change.
    """
    if "@" not in endpoint:
        return endpoint
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        return redact_value(endpoint, key)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return endpoint
    netloc = f"{redact_value(userinfo, key)}@{hostport}"
    return urlunsplit(parts._replace(netloc=netloc))


_fromisoformat = datetime.fromisoformat
#: Between an ISO 8601 date and its time: "T", or a space as RFC 3339 allows. Python accepts
#: any character there, which would read "2024-01-15+01:00" (a date and an offset) as 01:00.
_DATE_TIME_SEPARATOR = re.compile(r"[Tt ]")
_ORDINAL_DATE = re.compile(r"([0-9]{4})-?([0-9]{3})").fullmatch
#: A year before 0001 or after 9999 (year 0, a signed or a five-digit year).
_YEAR_OUT_OF_RANGE = re.compile(r"0000|[+-][0-9]|[0-9]{5,}-").match
NOT_A_TIMESTAMP = "is not an ISO 8601 timestamp"
DATE_WITHOUT_TIME = "is a date without a time"
#: The instants storable are Python's datetime range in UTC; the readers hold all of them
#: (pandas ``datetime64[us]``, Arrow ``timestamp[us]``), which ``test_timestamps`` checks.
OUT_OF_RANGE = "is outside the years 0001 to 9999 (UTC)"


def normalise_timestamp(text: str) -> str:
    """The stored form of an ISO 8601 timestamp: ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` in UTC.

    Accepts what ``datetime.fromisoformat`` reads (basic or extended format, week dates, a
    comma or a point before the fraction, ``Z`` or any offset) plus ordinal dates, with "T"
    or a space before the time; a time without an offset is UTC, the project's convention.
    Digits below a microsecond are truncated: no reader holds them. Raises ValueError whose
    text is the reason (``NOT_A_TIMESTAMP``, ``DATE_WITHOUT_TIME`` or ``OUT_OF_RANGE``) for
    anything else: a date alone names a day, not an instant.
    """
    try:
        if _fromisoformat(text) is not None and _parsed_is_canonical(text):
            return text  # the usual value, as the API sends it
    except ValueError:
        pass
    day, separator, clock = _split_date_time(text)
    if not separator:
        raise ValueError(DATE_WITHOUT_TIME if _calendar_date(text) else NOT_A_TIMESTAMP)
    calendar_day = _calendar_date(day)
    try:
        if calendar_day is None:
            raise ValueError(text)
        moment = assume_utc(_fromisoformat(f"{calendar_day}T{clock}")).astimezone(UTC)
    except ValueError:
        raise ValueError(OUT_OF_RANGE if _YEAR_OUT_OF_RANGE(text) else NOT_A_TIMESTAMP) from None
    except OverflowError:
        raise ValueError(OUT_OF_RANGE) from None
    return timestamp_text(moment)


def timestamp_text(moment: datetime) -> str:
    """An aware datetime as ``normalise_timestamp`` stores it (UTC, fraction only if any)."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"


def _split_date_time(text: str) -> tuple[str, str, str]:
    found = _DATE_TIME_SEPARATOR.search(text)
    if found is None:
        return text, "", ""
    return text[: found.start()], found.group(), text[found.end() :]


def _calendar_date(text: str) -> str | None:
    """An ISO 8601 date (calendar, week or ordinal) as YYYY-MM-DD; None if it is not one."""
    ordinal = _ORDINAL_DATE(text)
    try:
        if ordinal is None:
            return date.fromisoformat(text).isoformat()
        year, day = int(ordinal.group(1)), int(ordinal.group(2))
        first = date(year, 1, 1)
        found = first + timedelta(days=day - 1)
    except (ValueError, OverflowError):
        return None
    return found.isoformat() if day >= 1 and found.year == year else None


def _header_text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _json_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


class RunnerRecord(NamedTuple):
    """One runner as stored: strings, with ``tags``/``headers``/``extra`` as JSON text.

    The JSON columns are serialised canonically (sorted keys) so equal content always has
    equal text, which makes ``content_hash`` and per-field change detection exact. A
    NamedTuple rather than a frozen dataclass: just as immutable, and cheaper to build, which
    a sync does once per runner it parses.
    """

    id: str
    user_id: str
    name: str
    status: str
    endpoint: str
    tags: str
    headers: str
    created_at: str
    updated_at: str
    extra: str
    content_hash: str
    #: Keyed digest of the raw object as sent (see ``raw_fingerprint``); "" when not computed.
    fingerprint: str = ""

    @property
    def values(self) -> tuple[str, ...]:
        """The tracked fields' values in TRACKED_FIELDS order, as stored."""
        return self[1:10]

    def fields(self) -> dict[str, str]:
        """The tracked fields by name, as stored."""
        return dict(zip(TRACKED_FIELDS, self.values, strict=True))


@dataclass(frozen=True, slots=True)
class Rejection:
    """A runner object that could not be stored, and where it was seen."""

    page: int
    position: int
    runner_id: str | None
    reason: str
    raw_json: str


def content_hash(values: tuple[str, ...]) -> str:
    """SHA-256 over the tracked field values in TRACKED_FIELDS order."""
    return hashlib.sha256(orjson.dumps(values)).hexdigest()


def raw_fingerprint(raw: Any, key: bytes, *, store_header_values: bool = False) -> str | None:
    """A keyed BLAKE2b digest of a raw runner object exactly as the API sent it.

    A runner sent with the same bytes as last time need not be validated, redacted or hashed
    again; the content hash still decides what changed. Keyed (the object holds secrets) and
    bound to the redaction mode. None for an object that cannot be serialised.
    """
    return fingerprinter(key, store_header_values)(raw)


@functools.lru_cache(maxsize=8)
def fingerprinter(key: bytes, store_header_values: bool = False) -> Callable[[Any], str | None]:
    """``raw_fingerprint`` for one key and mode, with the keyed hash set up once.

    Copying a keyed BLAKE2b state is cheaper than building one, and a sync fingerprints
    every runner on a page it has not seen before.
    """
    person = b"clear-headers" if store_header_values else b"redacted"
    keyed = hashlib.blake2b(key=key[:64], person=person, digest_size=16)
    dumps = orjson.dumps

    def fingerprint(raw: Any) -> str | None:
        try:
            body = dumps(raw)
        except TypeError:
            return None
        digest = keyed.copy()
        digest.update(body)
        return digest.hexdigest()

    return fingerprint


def page_digester(key: bytes, store_header_values: bool = False) -> Callable[[bytes], str]:
    """Keyed digest of a list page's body exactly as sent, for ``page_digests``.

    A page whose digest the last sync recorded holds only runners stored exactly as sent, so
    none needs fingerprinting. HMAC-SHA256, keyed and mode-bound like ``raw_fingerprint``, over
    a prefix naming the mode, then the body.
    """
    mode = b"clear" if store_header_values else b"redacted"
    keyed = hmac.new(key, b"comfysync page, headers " + mode + b"\n", hashlib.sha256)

    def digest(body: bytes) -> str:
        mac = keyed.copy()
        mac.update(body)
        return mac.hexdigest()

    return digest


def parse_runner(
    raw: Any,
    *,
    page: int,
    position: int,
    redaction_key: bytes,
    store_header_values: bool = False,
    fingerprint: str | None = None,
) -> RunnerRecord | Rejection:
    """Validate one raw runner object and return the record to store, or why it cannot be.

    ``fingerprint`` is the object's ``raw_fingerprint`` when the caller has it already.
    """
    if type(raw) is dict and _looks_valid(raw):
        created_at, updated_at = raw["created_at"], raw["updated_at"]
    else:
        problem = _describe_problem(raw)
        if problem is not None:
            runner_id = raw.get("id") if isinstance(raw, dict) else None
            return Rejection(
                page=page,
                position=position,
                runner_id=runner_id if isinstance(runner_id, str) else None,
                reason=problem,
                raw_json=redacted_raw_json(raw, redaction_key),
            )
        created_at = normalise_timestamp(raw["created_at"])
        updated_at = normalise_timestamp(raw["updated_at"])
    headers = raw["headers"]
    if store_header_values:
        headers = {name: _header_text(value) for name, value in headers.items()}
    elif headers:
        headers = redact_headers(headers, redaction_key)
    if raw.keys() <= REFERENCE_FIELDS:
        extra_text = "{}"
    else:
        extra_text = _json_text(
            {name: value for name, value in raw.items() if name not in REFERENCE_FIELDS}
        )
    endpoint = raw["endpoint"]
    values = (
        raw["user_id"],
        raw["name"],
        raw["status"],
        redact_endpoint(endpoint, redaction_key) if "@" in endpoint else endpoint,
        _dumps(raw["tags"]).decode(),
        _dumps(headers, option=_SORT_KEYS).decode() if headers else "{}",
        created_at,
        updated_at,
        extra_text,
    )
    return RunnerRecord(
        raw["id"],
        *values,
        _sha256(_dumps(values)).hexdigest(),
        fingerprint
        or raw_fingerprint(raw, redaction_key, store_header_values=store_header_values)
        or "",
    )


def _describe_problem(raw: Any) -> str | None:
    """What makes ``raw`` unstorable (None: nothing), checked field by field."""
    if not isinstance(raw, dict):
        return f"not an object but {type(raw).__name__}"
    runner_id = raw.get("id")
    if not isinstance(runner_id, str) or not runner_id:
        return "missing or empty id"
    for name in _STRING_FIELDS:
        if name not in raw:
            return f"missing field {name!r}"
        if not isinstance(raw[name], str):
            return f"field {name!r} is not a string"
    tags = raw.get("tags")
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        return "field 'tags' is not a list of strings"
    if not isinstance(raw.get("headers"), dict):
        return "field 'headers' is not an object"
    for name in _TIMESTAMP_FIELDS:
        try:
            normalise_timestamp(raw[name])
        except ValueError as exc:
            return f"field {name!r} {exc}"
    return None


def _looks_valid(raw: dict[str, Any]) -> bool:
    """The fast path of ``parse_runner``: True only for a record ``_describe_problem`` passes
    whose timestamps are already canonical, so they are stored as sent."""
    get = raw.get
    runner_id, tags = get("id"), get("tags")
    created, updated = get("created_at"), get("updated_at")
    try:
        return (
            type(runner_id) is str
            and runner_id != ""
            and type(get("user_id")) is str
            and type(get("name")) is str
            and type(get("status")) is str
            and type(get("endpoint")) is str
            and type(get("headers")) is dict
            and type(tags) is list
            and all(type(tag) is str for tag in tags)
            and _fromisoformat(created) is not None  # type: ignore[arg-type]
            and _fromisoformat(updated) is not None  # type: ignore[arg-type]
            and _parsed_is_canonical(created)  # type: ignore[arg-type]
            and _parsed_is_canonical(updated)  # type: ignore[arg-type]
        )
    except (TypeError, ValueError):
        return False


def _parsed_is_canonical(text: str) -> bool:
    """Whether ``text``, which ``fromisoformat`` has read, is in the stored form.

    The stored form is ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, to the second, the form the API sends),
    or with ``.ffffff`` before the ``Z`` when the microseconds are not zero. The parse has
    checked the digits, so the length and the separators at their places prove the form:
    a slice and a comparison, cheaper than a pattern, for a check made twice per runner.
    """
    if len(text) == 20:
        return text[4:20:3] == "--T::Z"
    return (
        len(text) == 27 and text[4:20:3] == "--T::." and text[26] == "Z" and text[20:26] != "000000"
    )


def redacted_raw_json(raw: Any, key: bytes) -> str:
    """The raw object as JSON with its secrets redacted, for the rejected-records table."""
    if isinstance(raw, dict):
        raw = dict(raw)
        headers = raw.get("headers")
        if isinstance(headers, dict):
            raw["headers"] = redact_headers(headers, key)
        elif "headers" in raw:
            raw["headers"] = redact_value(_header_text(headers), key)
        if isinstance(raw.get("endpoint"), str):
            raw["endpoint"] = redact_endpoint(raw["endpoint"], key)
    try:
        return orjson.dumps(raw, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return orjson.dumps(repr(raw)).decode()
