"""An upstream that claims the impossible, asks for long waits or redirects: the CLI, end to end.

Each test runs `comfysync sync` as a real subprocess against a server on a loopback socket: the
simulator where its fault plan can play the upstream, a tiny Starlette app where it cannot.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import unicodedata
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import CliResult, cli_environment, dump_except_run_log, rows
from loopback_app import AppServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.sim.simulator import SimulatedAccount

TOKEN = "test-token"
ENV = {"COMFYCONTROL_TOKEN": TOKEN}


def sync_args(url: str, *extra: str) -> list[str]:
    return ["sync", "--base-url", url, "--db", "mirror.db", "--no-export", *extra]


# -- A. a total nothing may be sized by -----------------------------------------------------


class LyingList:
    """Serves ``runners`` honestly until ``claim`` is set; then every page reports ``claim``
    as its total while only the first ``shown`` runners exist (page 1 short, the rest empty)."""

    def __init__(self, runners: list[dict[str, Any]]) -> None:
        self.runners = runners
        self.claim: int | None = None
        self.shown = len(runners)
        self.requests = 0

    def app(self) -> Starlette:
        async def list_runners(request: Request) -> Response:
            self.requests += 1
            page = int(request.query_params.get("page", "1"))
            per_page = int(request.query_params.get("per_page", "10"))
            listed = self.runners[: self.shown]
            chunk = listed[(page - 1) * per_page : page * per_page]
            total = len(listed) if self.claim is None else self.claim
            return JSONResponse({"runners": chunk, "total": total})

        return Starlette(routes=[Route("/v1/runner", list_runners)])


#: Runs the CLI as a grandchild of a small launcher, which reports the CLI's own peak RSS. A
#: child forked straight from pytest would count pytest's own resident pages in its peak.
_MEASURE = """
import os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "pipeline.cli", *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as peak:
    peak.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(folder: Path, *args: str, timeout: float = 60) -> tuple[CliResult, float, int]:
    """Run the CLI; return its result, wall seconds and peak resident memory in bytes.

    The CLI's own rusage, as its launcher reads it with wait4. Its address space is capped so
    that a regression fails this test with a MemoryError instead of taking the machine's
    memory.
    """
    out, err, peak = folder / "cli.out", folder / "cli.err", folder / "cli.peak"
    started = time.monotonic()
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", _MEASURE, str(peak), *args],
            cwd=folder,
            env=cli_environment(ENV),
            stdout=stdout,
            stderr=stderr,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"comfysync {' '.join(args)} ran over {timeout} s")
    seconds = time.monotonic() - started
    result = CliResult(proc.returncode, out.read_text(), err.read_text())
    return result, seconds, int(peak.read_text())


@pytest.mark.parametrize(
    ("claim", "shown"), [(10**9, 0), (10**11, 2), (10**11, 0), (2**63 - 1, 3)], ids=str
)
def test_a_total_of_billions_over_short_pages_ends_fast_small_and_deletes_nothing(
    tmp_path, claim, shown
):
    runners = SimulatedAccount(runners=5, seed=11, token=None).list_runners()
    upstream = LyingList(runners)
    with AppServer(upstream.app()) as server:
        first = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *sync_args(server.url)],
            cwd=tmp_path,
            env=cli_environment(ENV),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert first.returncode == 0, first.stderr
        upstream.claim, upstream.shown, upstream.requests = claim, shown, 0

        result, seconds, peak = run_measured(tmp_path, *sync_args(server.url, "--per-page", "2"))

    assert result.exit_code in (0, 4), result.stderr
    assert "the listing ended short of its total" in result.stderr
    assert str(claim) in result.stderr
    assert "Traceback" not in result.stderr
    db = tmp_path / "mirror.db"
    assert rows(db, "SELECT count(*) FROM runners WHERE deleted_at IS NULL") == [(5,)]
    assert rows(db, "SELECT status FROM sync_runs ORDER BY id DESC LIMIT 1") == [
        ("partial" if result.exit_code == 0 else "failed",)
    ]
    assert seconds < 30  # on a loaded machine; a walk by total would take hours
    assert peak < 200 * 2**20
    assert upstream.requests <= 3 * (1 + 4 + 1)  # per walk: page 1, those in flight, re-read


# -- B. a Retry-After longer than the bound ---------------------------------------------------


@pytest.mark.parametrize("form", ["delta-seconds", "HTTP-date"])
def test_a_retry_after_beyond_the_bound_fails_fast_and_names_the_wait(
    serve_account, run_cli, tmp_path, form
):
    upstream = serve_account(runners=120, seed=5, token=TOKEN)
    assert run_cli(*sync_args(upstream.url), env=ENV).exit_code == 0
    upstream.account.create_runner(name="never applied")
    before = dump_except_run_log(tmp_path / "mirror.db")
    asked = (
        "3600"
        if form == "delta-seconds"
        else format_datetime(datetime.now(UTC) + timedelta(seconds=3600), usegmt=True)
    )
    upstream.account.faults.once("fail", page=2, status=429, headers={"Retry-After": asked})

    started = time.monotonic()
    result = run_cli(*sync_args(upstream.url, "--per-page", "50"), env=ENV, timeout=30)
    elapsed = time.monotonic() - started

    assert result.exit_code == 4, result.stderr
    assert elapsed < 30  # the wait asked for is an hour; retries alone would take minutes
    assert re.fullmatch(
        r"comfysync: error: ComfyControl asked to wait (3600|359\d) s before retrying page 2 "
        r"\(Retry-After\), more than --max-retry-after 60; nothing was applied, try again later\n",
        result.stderr,
    ), result.stderr
    assert dump_except_run_log(tmp_path / "mirror.db") == before


def test_a_retry_after_within_the_bound_is_waited_out_and_said_while_waiting(
    serve_account, run_cli
):
    upstream = serve_account(runners=120, seed=5, token=TOKEN)
    upstream.account.faults.once("fail", page=2, status=429, headers={"Retry-After": "6"})

    started = time.monotonic()
    result = run_cli(
        *sync_args(upstream.url, "--per-page", "50", "--max-retry-after", "10"),
        env=ENV,
        timeout=30,
    )
    elapsed = time.monotonic() - started

    assert result.exit_code == 0, result.stderr
    assert 6 <= elapsed < 30
    assert result.stderr.splitlines() == [
        "comfysync: WARNING: ComfyControl asked to wait 6 s before retrying page 2 "
        "(Retry-After); waiting"
    ]
    assert result.stdout.startswith("sync 1 success: 120 runners")


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "soon"])
def test_max_retry_after_must_be_a_finite_number_of_seconds(run_cli, bad):
    result = run_cli("sync", "--base-url", "http://127.0.0.1:9", "--max-retry-after", bad)
    assert result.exit_code == 2
    assert "--max-retry-after" in result.stderr and "Traceback" not in result.stderr


def test_settings_refuse_a_negative_or_unbounded_retry_after_bound():
    from pipeline.errors import ConfigurationError
    from pipeline.settings import Settings

    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigurationError, match="--max-retry-after"):
            Settings(base_url="http://127.0.0.1:9", max_retry_after=bad).validated()


# -- C. redirects ------------------------------------------------------------------------------


class Redirecting:
    """Answers every list request with ``status`` and, unless None, that ``Location``."""

    def __init__(self, status: int, location: str | None) -> None:
        self.status = status
        self.location = location

    def app(self) -> Starlette:
        async def list_runners(request: Request) -> Response:
            headers = {} if self.location is None else {"Location": self.location}
            return Response(status_code=self.status, headers=headers)

        return Starlette(routes=[Route("/v1/runner", list_runners)])


class Recording:
    """Another address, where a followed redirect would land: records every request."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    def app(self) -> Starlette:
        async def anything(request: Request) -> Response:
            self.seen.append(dict(request.headers))
            return JSONResponse({"runners": [], "total": 0})

        return Starlette(routes=[Route("/{path:path}", anything)])


def redirected_sync(run_cli, status: int, location: str | None, elsewhere: Recording) -> CliResult:
    with AppServer(Redirecting(status, location).app()) as server:
        return run_cli(*sync_args(server.url), env=ENV, timeout=30)


@pytest.fixture
def elsewhere():
    """A second server on another loopback address (127.0.0.2): another host."""
    recording = Recording()
    with AppServer(recording.app(), host="127.0.0.2") as server:
        recording.url = server.url  # type: ignore[attr-defined]
        yield recording


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_never_followed_and_the_error_names_where_it_points(
    run_cli, elsewhere, status
):
    target = f"{elsewhere.url}/v1/runner?page=1&per_page=100"
    result = redirected_sync(run_cli, status, target, elsewhere)

    assert result.exit_code == 2, result.stderr
    assert result.stderr == (
        f"comfysync: error: ComfyControl answered HTTP {status} on page 1, redirecting to "
        f"'{target}' (Location); redirects are not followed, so the token never goes "
        f"anywhere but --base-url: check --base-url (perhaps {elsewhere.url})\n"
    )
    assert elsewhere.seen == []


def test_a_relative_location_is_named_in_full(run_cli, elsewhere):
    with AppServer(Redirecting(308, "/api/v1/runner?page=1").app()) as server:
        result = run_cli(*sync_args(server.url), env=ENV, timeout=30)
    assert result.exit_code == 2, result.stderr
    assert f"redirecting to '{server.url}/api/v1/runner?page=1' (Location)" in result.stderr
    assert result.stderr.endswith(f"check --base-url (perhaps {server.url}/api)\n")


@pytest.mark.parametrize("status", [301, 302, 307])
def test_a_redirect_without_location_says_so(run_cli, elsewhere, status):
    result = redirected_sync(run_cli, status, None, elsewhere)
    assert result.exit_code == 2, result.stderr
    assert result.stderr == (
        f"comfysync: error: ComfyControl answered HTTP {status} on page 1, a redirect without "
        "a Location; redirects are not followed: check --base-url\n"
    )


@pytest.mark.parametrize(
    "text",
    [
        # C0 and C1 controls (ESC, CSI), a bidi override, a password and the token itself
        f"https://me:pw@evil.example/v1/runner?t={TOKEN}&x=\x1b[2J\u009b31m\u202egnp\u0085n",
        # the same in plain ASCII, a URL httpx can resolve
        f"https://me:pw@evil.example/{TOKEN}/v1/runner?token={TOKEN}",
    ],
    ids=["controls", "ascii"],
)
def test_a_hostile_location_reaches_the_terminal_without_controls_or_secrets(
    run_cli, elsewhere, text
):
    wire = text.encode("utf-8").decode("latin-1")  # Starlette sends header values as latin-1
    result = redirected_sync(run_cli, 301, wire, elsewhere)

    assert result.exit_code == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert TOKEN not in line and "pw@" not in line
    assert not [ch for ch in line if unicodedata.category(ch) in ("Cc", "Cf")]
    assert "evil.example" in line
    assert elsewhere.seen == []
