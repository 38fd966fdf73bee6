"""The client: what each response becomes (httpx.MockTransport; no server needed)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from pipeline import __version__
from pipeline.errors import ApiResponseError, AuthenticationError, ConfigurationError, UpstreamError
from pipeline.source.client import ComfyControlClient, Page, parse_retry_after

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


def test_retry_after_accepts_seconds_and_http_dates_and_rejects_the_rest():
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after("Sat, 28 Nov 2026 12:00:30 GMT", now=NOW) == 30.0
    for useless in (None, "0", "-3", "soon", "nan", "Sat, 28 Nov 2026 11:00:00 GMT", ""):
        assert parse_retry_after(useless, now=NOW) is None, useless


def fetch(handler, **options) -> Page:
    async def go() -> Page:
        async with ComfyControlClient(
            base_url="https://api.example.test",
            token="tok",
            transport=httpx.MockTransport(handler),
            retry_wait_initial=0.01,
            retry_wait_max=0.02,
            **options,
        ) as client:
            return await client.fetch_page(3, 100)

    return asyncio.run(go())


def test_a_page_is_requested_with_auth_user_agent_and_paging_parameters():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"runners": [{"id": "a"}], "total": 201})

    page = fetch(handler)
    assert page == Page(3, 100, [{"id": "a"}], 201)
    assert json.loads(page.body) == {"runners": [{"id": "a"}], "total": 201}  # as received
    [request] = seen
    assert request.url.path == "/v1/runner"
    assert dict(request.url.params) == {"page": "3", "per_page": "100"}
    assert request.headers["Authorization"] == "Bearer tok"
    assert request.headers["User-Agent"] == f"comfysync/{__version__}"


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_are_not_retried(status):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(status, json={"error": "unauthorized"})

    with pytest.raises(AuthenticationError, match="COMFYCONTROL_TOKEN") as caught:
        fetch(handler)
    assert len(calls) == 1 and "tok" not in str(caught.value).replace("token", "")


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(status):
    answers = iter([httpx.Response(status), httpx.Response(200, json={"runners": [], "total": 0})])
    assert fetch(lambda request: next(answers)).total == 0


def test_connection_errors_and_timeouts_are_retried_then_reported_as_upstream_failure():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectTimeout("slow", request=request)

    with pytest.raises(UpstreamError, match=r"page 3 after 3 attempts .*timed out"):
        fetch(handler, max_retries=2)
    assert len(calls) == 3


def test_a_body_that_is_not_json_is_an_api_error_naming_the_page():
    with pytest.raises(ApiResponseError, match=r"page 3 .*not JSON"):
        fetch(lambda request: httpx.Response(200, text="<html>oops"), max_retries=1)


@pytest.mark.parametrize(
    "body",
    [
        {"items": []},
        {"runners": [], "total": "3"},
        {"runners": {}, "total": 1},
        [1, 2],
        {"runners": [], "total": True},
        {"runners": [], "total": -1},
        {"runners": [], "total": 2**63},
        {"runners": [], "total": 2**64 - 1},
    ],
)
def test_json_of_the_wrong_shape_is_an_api_error_naming_the_page(body):
    with pytest.raises(ApiResponseError, match="page 3"):
        fetch(lambda request: httpx.Response(200, json=body))


def test_other_statuses_are_errors_not_empty_pages():
    with pytest.raises(ApiResponseError, match="HTTP 400 on page 3"):
        fetch(lambda request: httpx.Response(400, json={"error": "bad"}))
    with pytest.raises(ConfigurationError, match="--base-url"):
        fetch(lambda request: httpx.Response(404))


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize(
    "retry_after", ["86400", "61", "1e400", timedelta(hours=1), timedelta(days=30)], ids=str
)
def test_a_retry_after_beyond_the_bound_fails_the_page_at_once(status, retry_after):
    if isinstance(retry_after, timedelta):  # the HTTP-date form, that far from now
        retry_after = format_datetime(datetime.now(UTC) + retry_after, usegmt=True)
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(status, headers={"Retry-After": retry_after})

    began = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        fetch(handler, max_retry_after=60)
    assert time.monotonic() - began < 2 and len(calls) == 1
    assert type(caught.value) is UpstreamError
    assert re.fullmatch(
        r"ComfyControl asked to wait (\d+ s|forever) before retrying page 3 \(Retry-After\), "
        r"more than --max-retry-after 60; nothing was applied, try again later",
        str(caught.value),
    )


def test_the_wait_a_retry_after_asked_for_is_named_when_retries_run_out():
    with pytest.raises(UpstreamError, match=r"after 2 attempts \(HTTP 429, Retry-After 1 s\)"):
        fetch(
            lambda request: httpx.Response(429, headers={"Retry-After": "1"}),
            max_retries=1,
            max_retry_after=60,
        )


def test_the_proxy_comes_from_the_environment_as_httpx_would_take_it(monkeypatch):
    from pipeline.source.client import environment_proxy

    for name in (
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "https_proxy",
        "http_proxy",
        "all_proxy",
        "no_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    assert environment_proxy("https://api.comfycontrol.app/v1/runner") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    assert environment_proxy("https://api.comfycontrol.app/v1/runner") == "http://proxy.corp:3128"
    assert environment_proxy("http://127.0.0.1:8080/v1/runner") is None
    monkeypatch.setenv("NO_PROXY", "comfycontrol.app")
    assert environment_proxy("https://api.comfycontrol.app/v1/runner") is None


def test_every_retry_goes_through_stamina_and_waits_what_retry_after_asked():
    import stamina.instrumentation

    scheduled: list[stamina.instrumentation.RetryDetails] = []
    answers = iter(
        [
            httpx.Response(503, headers={"Retry-After": "1"}),
            httpx.Response(500),
            httpx.Response(200, json={"runners": [], "total": 0}),
        ]
    )
    stamina.instrumentation.set_on_retry_hooks([scheduled.append])
    try:
        began = time.monotonic()
        assert fetch(lambda request: next(answers), max_retries=2).total == 0
        elapsed = time.monotonic() - began
    finally:
        stamina.instrumentation.set_on_retry_hooks(None)
    assert [details.retry_num for details in scheduled] == [1, 2]
    assert scheduled[0].wait_for == 1.0 and scheduled[1].wait_for <= 0.03
    assert [str(details.caused_by) for details in scheduled] == [
        "HTTP 503, Retry-After 1 s",
        "HTTP 500",
    ]
    assert 1.0 <= elapsed < 3


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (httpx.Response(401), AuthenticationError, "answered 401 on page 3"),
        (httpx.Response(400), ApiResponseError, "HTTP 400 on page 3"),
        (httpx.Response(429, headers={"Retry-After": "600"}), UpstreamError, "wait 600 s"),
        (httpx.Response(200, json={"total": 1}), ApiResponseError, "page 3 is not the"),
    ],
)
def test_a_failure_that_is_not_transient_ends_the_retries_at_any_attempt(answer, error, message):
    answers = iter([httpx.Response(503), httpx.Response(502), answer])
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return next(answers)

    with pytest.raises(error, match=message) as caught:
        fetch(handler, max_retries=5)
    assert type(caught.value) is error and len(calls) == 3


def test_a_long_retry_after_is_announced_only_when_it_will_be_waited(monkeypatch, caplog):
    import logging

    import pipeline.source.client

    monkeypatch.setattr(pipeline.source.client, "NOTICEABLE_WAIT_SECONDS", 0.5)
    caplog.set_level(logging.INFO, logger="pipeline.source.client")
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(429, headers={"Retry-After": "1"})

    with pytest.raises(UpstreamError, match=r"after 2 attempts \(HTTP 429, Retry-After 1 s\)"):
        fetch(handler, max_retries=1, max_retry_after=60)
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "pipeline.source.client" and r.levelno == logging.WARNING
    ]
    assert warnings == [
        "ComfyControl asked to wait 1 s before retrying page 3 (Retry-After); waiting"
    ]
    assert len(calls) == 2
