"""The ComfyControl HTTP client: one page request, retried politely, checked strictly.

Why its own module: this is the only place that speaks HTTP. It turns every way a request can
go wrong into one of the errors in ``pipeline.errors`` and never lets a bad response pass
for an empty page. Requests go straight to an httpx transport (see ``ComfyControlClient``).
Retries (connection errors, timeouts, 429, 500, 502, 503, 504) use
stamina's exponential backoff with jitter; a ``Retry-After`` header replaces the backoff when
it is a positive number of seconds or a future HTTP date, capped so a hostile value cannot
park the sync for hours, and ignored (backoff as usual) when zero, negative or unparsable.
"""

from __future__ import annotations

import logging
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import httpx
import orjson

from pipeline import __version__
from pipeline.errors import (
    ApiResponseError,
    AuthenticationError,
    ConfigurationError,
    UpstreamError,
)

log = logging.getLogger(__name__)

LIST_PATH = "/v1/runner"
RETRY_STATUSES = frozenset((429, 500, 502, 503, 504))


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
    """A failure worth another attempt; ``retry_after`` is the server's hint, if any."""

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
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds or seconds <= 0:  # NaN or not in the future
        return None
    return seconds


class ComfyControlClient:
    """Fetches pages of ``GET /v1/runner`` over one pooled keep-alive connection set.

    Use as an async context manager. ``transport`` is the test seam: pass
    ``httpx.ASGITransport(app=...)`` to talk to the simulator in-process.

    Why requests go to the transport directly rather than through ``httpx.AsyncClient``: the
    client's per-request machinery (base-URL merging, parameter encoding, cookie jar, auth
    flow, redirects, event hooks) costs about 0.3 ms a request, a third of the CPU of a
    100,000-runner walk, and this client uses none of it. The transport is httpx's own
    (connection pool, timeouts, TLS, httpx's exceptions), and it honours the same
    ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` variables an AsyncClient would.
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
        retry_after_cap: float = 120.0,
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
        self._retry_after_cap = retry_after_cap
        self.requests_sent = 0

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
        """Fetch one page, retrying transient failures; raise a ComfySyncError otherwise.

        The first attempt is made directly; stamina takes over only after it failed
        transiently (its retry loop costs ~20 us a request and its import 12 ms, paid by
        every sync for pages that nearly always arrive at the first attempt).
        """
        try:
            return await self._fetch_once(number, per_page)
        except _RetryableFailure as failure:
            first_failure = failure
        return await self._retry(number, per_page, first_failure)

    async def _retry(self, number: int, per_page: int, first_failure: _RetryableFailure) -> Page:
        """Attempts 2..n of ``fetch_page``: the first failure is handed to stamina as its
        first attempt, so it waits and counts exactly as if it had made that attempt."""
        import stamina

        attempts = self._max_retries + 1
        replay: _RetryableFailure | None = first_failure
        try:
            async for attempt in stamina.retry_context(
                on=self._backoff_for,
                attempts=attempts,
                timeout=None,
                wait_initial=self._wait_initial,
                wait_max=self._wait_max,
                wait_jitter=self._wait_initial,
            ):
                with attempt:
                    if replay is not None:
                        failure, replay = replay, None
                        raise failure
                    return await self._fetch_once(number, per_page)
        except _RetryableFailure as failure:
            error = ApiResponseError if failure.malformed else UpstreamError
            raise error(
                f"ComfyControl failed on page {number} after {attempts} attempts "
                f"({failure}); nothing was applied, try again later"
            ) from failure
        raise AssertionError("unreachable: stamina either returns or raises")

    def _backoff_for(self, exc: Exception) -> bool | float:
        """stamina's hook: retry our transient failures, waiting ``Retry-After`` when given."""
        if not isinstance(exc, _RetryableFailure):
            return False
        log.info("retrying a page request after: %s", exc)
        if exc.retry_after is not None:
            return min(exc.retry_after, self._retry_after_cap)
        return True

    async def _fetch_once(self, number: int, per_page: int) -> Page:
        self.requests_sent += 1
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
            raise _RetryableFailure(
                f"HTTP {status}", parse_retry_after(response.headers.get("Retry-After"))
            )
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
        log.debug("page %d: %d runners, total %d", number, len(runners), total)
        return Page(number=number, per_page=per_page, runners=runners, total=total, body=content)


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


def environment_proxy(url: str) -> str | None:
    """The proxy the environment asks for ``url`` (``HTTPS_PROXY`` etc., minus ``NO_PROXY``)."""
    parts = httpx.URL(url)
    proxies = urllib.request.getproxies_environment()
    if proxies.get("no") and urllib.request.proxy_bypass(parts.host):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")
