"""The ComfyControl HTTP client: one page request, retried politely, checked strictly.

Why its own module: this is the only place that speaks HTTP. It turns every way a request can
go wrong into one of the errors in ``pipeline.errors`` and never lets a bad response pass
for an empty page. Requests go straight to an httpx transport (see ``ComfyControlClient``).
Retries (connection errors, timeouts, 429, 500, 502, 503, 504) use
stamina's exponential backoff with jitter; a ``Retry-After`` header replaces the backoff when
it is a positive number of seconds or a future HTTP date, and is ignored (backoff as usual)
when zero, negative or unparsable. A wait longer than ``max_retry_after`` is not waited: the
page fails at once (UpstreamError) naming the wait asked for, so a sync neither sits silent
for an hour nor gives up without saying why. A wait long enough to notice is logged as a
warning while it runs.

**Redirects are never followed.** The token goes only to ``--base-url``; a 3xx answer is a
ConfigurationError (exit 2) naming where its ``Location`` points (resolved against the request,
upstream text quoted so it carries no control character, the token blanked out), so the user
can correct ``--base-url`` knowingly.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import httpx
import orjson
import stamina

from pipeline import __version__
from pipeline.errors import (
    ApiResponseError,
    AuthenticationError,
    ConfigurationError,
    UpstreamError,
)
from pipeline.times import assume_utc

log = logging.getLogger(__name__)

LIST_PATH = "/v1/runner"
RETRY_STATUSES = frozenset((429, 500, 502, 503, 504))
#: The most of a redirect's Location an error message quotes.
MAX_SHOWN_LOCATION = 300
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:)?(//)?[^/?#@]*@")
#: A Retry-After wait longer than this is announced on stderr while it runs.
NOTICEABLE_WAIT_SECONDS = 5.0
#: The largest ``total`` taken at its word (SQLite's largest integer, where the run log keeps
#: it); a larger one could only be recorded by failing after the walk.
MAX_TOTAL = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Page:
    """One answered page: the runner objects exactly as sent, and the ``total`` it reported.

    ``body`` is the response body as received (it holds header secrets: never shown). Two
    pages are equal when they say the same things, however the bytes were spelled.
    """

    number: int
    per_page: int
    runners: list[Any]
    total: int
    body: bytes = field(default=b"", repr=False, compare=False)


class _RetryableFailure(Exception):
    """A failure worth another attempt; ``retry_after`` is the server's hint, if any (the
    bound was already checked when it was read)."""

    def __init__(
        self, description: str, retry_after: float | None = None, *, malformed: bool = False
    ) -> None:
        super().__init__(description)
        self.retry_after = retry_after
        self.malformed = malformed


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or None when it gives no usable wait.

    Accepts delta-seconds and HTTP dates. Zero, negative, past or unparsable values give
    None, so the caller falls back to its own backoff instead of retrying in a tight loop.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = (assume_utc(when) - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds or seconds <= 0:  # NaN or not in the future
        return None
    return seconds


class _Tally(threading.local):
    """A count that only grows, kept per thread."""

    value = 0

    def add(self) -> None:
        self.value += 1


#: Page requests retried, per thread. A sync walks on the thread that runs it, so the
#: difference across a sync is its own even while other accounts sync on other threads.
_RETRIES = _Tally()


def retries_made() -> int:
    """How many page requests the calling thread has retried so far."""
    return _RETRIES.value


class ComfyControlClient:
    """Fetches pages of ``GET /v1/runner`` over one pooled keep-alive connection set.

    Use as an async context manager; ``transport`` is the test seam (e.g.
    ``httpx.ASGITransport(app=...)``). Requests go to httpx's transport directly: an
    ``AsyncClient``'s per-request machinery (cookies, auth flow, redirects, hooks) is paid on
    every page and used by none; the transport keeps the pool, timeouts, TLS and the proxy
    variables.
    """

    def __init__(
        self,
        *,
        base_url: str,
        token: str | None,
        timeout: float = 30.0,
        max_retries: int = 5,
        concurrency: int = 4,
        retry_wait_initial: float = 0.5,
        retry_wait_max: float = 30.0,
        max_retry_after: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._list_url = base_url.rstrip("/") + LIST_PATH
        headers = {
            "User-Agent": f"comfysync/{__version__}",
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
        }
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._headers = httpx.Headers(headers)
        self._extensions = {"timeout": httpx.Timeout(timeout).as_dict()}
        proxy = environment_proxy(self._list_url)
        self._transport = transport or httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            proxy=proxy,
            # Plain http (the loopback simulator) never speaks TLS: skip loading the CA store.
            verify=not (self._list_url.startswith("http://") and proxy is None),
        )
        self._max_retries = max_retries
        self._wait_initial = retry_wait_initial
        self._wait_max = retry_wait_max
        self._max_retry_after = max_retry_after
        self._token = token

    async def __aenter__(self) -> ComfyControlClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def fetch_page(self, number: int, per_page: int) -> Page:
        """Fetch one page, retrying transient failures; raise a ComfySyncError otherwise."""
        attempts = self._max_retries + 1
        attempt_number = 1

        def backoff_for(exc: Exception) -> bool | float:
            return self._backoff_for(exc, number, last=attempt_number >= attempts)

        try:
            async for attempt in stamina.retry_context(
                on=backoff_for,
                attempts=attempts,
                timeout=None,
                wait_initial=self._wait_initial,
                wait_max=self._wait_max,
                wait_jitter=self._wait_initial,
            ):
                attempt_number = attempt.num
                with attempt:
                    return await self._fetch_once(number, per_page)
        except _RetryableFailure as failure:
            error = ApiResponseError if failure.malformed else UpstreamError
            raise error(
                f"ComfyControl failed on page {number} after {attempts} attempts "
                f"({failure}); nothing was applied, try again later"
            ) from failure
        raise AssertionError("unreachable: stamina either returns or raises")

    def _backoff_for(self, exc: Exception, number: int, *, last: bool) -> bool | float:
        """stamina's hook: retry our transient failures, waiting ``Retry-After`` when given.

        Called after every failed attempt, the last one too (stamina checks the attempt count
        after asking), hence ``last``: no wait is announced that will not happen.
        """
        if not isinstance(exc, _RetryableFailure):
            return False
        if not last:
            _RETRIES.add()
        log.info("retrying a page request after: %s", exc)
        if exc.retry_after is None:
            return True
        if exc.retry_after > NOTICEABLE_WAIT_SECONDS and not last:
            log.warning(
                "ComfyControl asked to wait %s before retrying page %d (Retry-After); waiting",
                _wait_text(exc.retry_after),
                number,
            )
        return exc.retry_after

    async def _fetch_once(self, number: int, per_page: int) -> Page:
        request = httpx.Request(
            "GET",
            f"{self._list_url}?page={number}&per_page={per_page}",
            headers=self._headers,
            extensions=self._extensions,
        )
        try:
            response = await self._transport.handle_async_request(request)
            response.request = request
            try:
                await response.aread()
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise _RetryableFailure(f"timed out: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise _RetryableFailure(f"connection failed: {type(exc).__name__}") from exc
        return self._read_page(response, number, per_page)

    def _read_page(self, response: httpx.Response, number: int, per_page: int) -> Page:
        status = response.status_code
        if status in (401, 403):
            raise AuthenticationError(
                f"ComfyControl answered {status} on page {number}: the token was rejected; "
                "check COMFYCONTROL_TOKEN (or --token)"
            )
        if status in RETRY_STATUSES:
            wait = parse_retry_after(response.headers.get("Retry-After"))
            if wait is None:
                raise _RetryableFailure(f"HTTP {status}")
            if not wait <= self._max_retry_after:
                raise UpstreamError(
                    f"ComfyControl asked to wait {_wait_text(wait)} before retrying page "
                    f"{number} (Retry-After), more than --max-retry-after "
                    f"{self._max_retry_after:g}; nothing was applied, try again later"
                )
            raise _RetryableFailure(f"HTTP {status}, Retry-After {_wait_text(wait)}", wait)
        if 300 <= status < 400:
            raise ConfigurationError(self._redirect_message(response, number))
        if status == 404:
            raise ConfigurationError(
                f"{response.url.copy_with(query=None)} was not found (404); check --base-url"
            )
        if status != 200:
            raise ApiResponseError(
                f"ComfyControl answered HTTP {status} on page {number}; nothing was applied"
            )
        content = response.content
        try:
            body = orjson.loads(content)
        except orjson.JSONDecodeError as exc:
            # A truncated or garbled body is usually a network hiccup: worth a retry.
            raise _RetryableFailure("the body was not JSON", malformed=True) from exc
        runners = body.get("runners") if isinstance(body, dict) else None
        total = body.get("total") if isinstance(body, dict) else None
        if not isinstance(runners, list) or not isinstance(total, int) or isinstance(total, bool):
            raise ApiResponseError(
                f"page {number} is not the documented shape (a 'runners' list and an "
                "integer 'total'); nothing was applied"
            )
        if total < 0:
            raise ApiResponseError(f"page {number} reported a negative total; nothing was applied")
        if total > MAX_TOTAL:
            raise ApiResponseError(
                f"page {number} reported a total of {total} runners, more than any store can "
                "count; nothing was applied"
            )
        log.debug("page %d: %d runners, total %d", number, len(runners), total)
        return Page(number=number, per_page=per_page, runners=runners, total=total, body=content)

    def _redirect_message(self, response: httpx.Response, number: int) -> str:
        """Why a redirect stops the sync, and where it points, safe to print.

        Never followed: the request carries the token, and a redirect may lead to another host.
        The Location is upstream text, so it is shown resolved against the request, quoted with
        every non-ASCII or control character escaped, length-capped, and with the token (if
        the server echoed it) blanked out.
        """
        said = f"ComfyControl answered HTTP {response.status_code} on page {number}"
        location = response.headers.get("Location")
        if not location:
            return (
                f"{said}, a redirect without a Location; redirects are not followed: "
                "check --base-url"
            )
        try:
            target: httpx.URL | None = response.request.url.join(location)
        except (httpx.InvalidURL, ValueError, TypeError):
            target = None
        # Userinfo is dropped: it may be a credential, and is no part of a --base-url.
        shown = (
            _USERINFO.sub(r"\1\2", location) if target is None else str(_without_userinfo(target))
        )
        shown = self._blank_token(shown)
        if len(shown) > MAX_SHOWN_LOCATION:
            shown = shown[:MAX_SHOWN_LOCATION] + "..."
        base = _base_url_of(target) if target is not None else None
        hint = f" (perhaps {ascii(base)[1:-1]})" if base and base == self._blank_token(base) else ""
        return (
            f"{said}, redirecting to {shown!a} (Location); redirects are not followed, so "
            f"the token never goes anywhere but --base-url: check --base-url{hint}"
        )

    def _blank_token(self, text: str) -> str:
        if not self._token:
            return text
        for form in {self._token, urllib.parse.quote(self._token, safe="")}:
            text = text.replace(form, "[token]")
        return text


def _without_userinfo(url: httpx.URL) -> httpx.URL:
    return url.copy_with(username=None, password=None)


def _base_url_of(target: httpx.URL) -> str | None:
    """The --base-url a redirect to the runner list suggests, or None if it is not one."""
    if target.scheme not in ("http", "https") or not target.path.endswith(LIST_PATH):
        return None
    root = target.path[: -len(LIST_PATH)] or "/"
    return str(_without_userinfo(target).copy_with(path=root, query=None, fragment=None)).rstrip(
        "/"
    )


def _wait_text(seconds: float) -> str:
    """A wait as the user reads it: whole seconds, rounded up (a date gives fractions)."""
    return f"{math.ceil(seconds)} s" if math.isfinite(seconds) else "forever"


def check_request_url(base_url: str) -> None:
    """ConfigurationError unless httpx can build the list request for ``base_url``.

    httpx reads the host name by IDNA 2008, stricter than Python's own codec: a label such
    as ``xn--zz`` or a symbol would otherwise fail on the first request, inside the walk.
    """
    try:
        _ = httpx.Request("GET", base_url.rstrip("/") + LIST_PATH).url.host
    except (httpx.InvalidURL, ValueError):  # idna's IDNAError is a ValueError
        raise ConfigurationError(
            "--base-url has a host name that is not a valid internationalized domain name"
        ) from None


def is_requestable_url(url: str) -> bool:
    """Whether ``url`` is an http(s) URL httpx can send a request to (a ping URL, say)."""
    if any(char.isspace() or not char.isprintable() for char in url):
        return False
    try:
        parsed = httpx.Request("GET", url).url
        _ = urllib.parse.urlsplit(url).port  # ValueError for a port outside 0-65535
    except (httpx.InvalidURL, ValueError):
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


def environment_proxy(url: str) -> str | None:
    """The proxy the environment asks for ``url`` (``HTTPS_PROXY`` etc., minus ``NO_PROXY``)."""
    parts = httpx.URL(url)
    proxies = urllib.request.getproxies_environment()
    if proxies.get("no") and urllib.request.proxy_bypass(parts.host):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")
