"""The simulator's pages, rendered once, served by a bare asyncio HTTP/1.1 server.

    python -m benchmarks.pages --runners 100000 --port 8811 [--updates 1000 --creates 100
    --deletes 100] [--latency-ms 20]

Why it exists: the Starlette simulator routes, validates and serialises every request, and at
full speed that work takes one of the machine's two cores, so a floor measured against it
includes the simulator's own cost and hides the limit. This server builds the same seeded
account (``benchmarks.simserver.build_account``, same seed and churn options), renders every
``per_page=100`` page to a whole response with orjson at start-up, drops the account, and then
answers a request with a dictionary lookup and one write. Other page sizes (the sync's absence
check asks for small ones) are cut from every runner's JSON, kept once, and cached.

The bodies are byte for byte the simulator's (``tests/test_benchmark_smoke.py`` compares
them); so are its 401, 400, 404 and 405 answers, minus the fault plan, which benchmarks never
use. Requests are parsed as far as httpx and ``benchmarks.wire`` need: a request line and
headers up to a blank line, no bodies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import hmac
from array import array
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

import orjson

from benchmarks.simserver import add_server_options, build_account
from pipeline.sim.faults import UNAUTHORIZED_BODY
from pipeline.sim.simulator import MAX_PER_PAGE, SimulatedAccount, parse_page_param

LIST_PATH = "/v1/runner"
DEFAULT_PER_PAGE = 10  # the simulator's (and the API's) when a request names none
MAX_HEAD_BYTES = 64 * 1024


def response(
    status: int, body: bytes, *, close: bool = False, extra: tuple[str, ...] = ()
) -> bytes:
    """A whole HTTP/1.1 response: status line, headers, blank line, JSON body."""
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *extra,
        *(["Connection: close"] if close else []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def error(status: int, message: dict[str, str], *, close: bool = False,
          extra: tuple[str, ...] = ()) -> bytes:
    return response(status, orjson.dumps(message), close=close, extra=extra)


class PageBook:
    """Every runner's JSON once, and the page responses cut from it (newest first).

    ``per_page=100`` responses are rendered on construction; any other size is rendered on its
    first request and cached. Holds no runner objects, only bytes and offsets.
    """

    def __init__(self, account: SimulatedAccount) -> None:
        self.total = len(account)
        pieces: list[bytes] = []
        self._starts = array("q")  # where runner i's JSON starts in self._runners
        position = 0
        for number in range(1, -(-self.total // MAX_PER_PAGE) + 1):
            for runner in account.page(number, MAX_PER_PAGE)["runners"]:
                piece = orjson.dumps(runner)
                self._starts.append(position)
                pieces.append(piece)
                position += len(piece) + 1  # the comma that joins it to the next
        self._starts.append(position)  # one past the last runner's comma
        self._runners = b",".join(pieces)
        del pieces
        self._tail = b'],"total":' + str(self.total).encode() + b"}"
        self._empty = response(200, b'{"runners":[' + self._tail)
        self._pages: dict[tuple[int, int], bytes] = {}
        for number in range(1, -(-self.total // MAX_PER_PAGE) + 1):
            self.page(number, MAX_PER_PAGE)

    def page(self, number: int, per_page: int) -> bytes:
        """The 200 response for one page; a page past the end lists no runners."""
        key = (number, per_page)
        cached = self._pages.get(key)
        if cached is not None:
            return cached
        first = (number - 1) * per_page
        if first >= self.total:
            return self._empty  # the same bytes for every page past the end: not cached
        last = min(first + per_page, self.total)
        runners = self._runners[self._starts[first] : self._starts[last] - 1]
        rendered = response(200, b'{"runners":[' + runners + self._tail)
        self._pages[key] = rendered
        return rendered


class PageServer:
    """``GET /v1/runner`` over keep-alive HTTP/1.1 from a PageBook, with a bearer token."""

    def __init__(self, book: PageBook, *, token: str, latency_ms: float = 0.0) -> None:
        self.book = book
        self._token = token
        self._delay = latency_ms / 1000

    def answer(self, head: bytes) -> tuple[bytes, bool]:
        """The response to one request head, and whether the connection stays open."""
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3:
            return error(400, {"error": "bad_request", "message": "malformed request"},
                         close=True), False
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        path, _, query_text = target.partition("?")
        if path != LIST_PATH or method != "GET":
            status, code = (404, "not_found") if path != LIST_PATH else (405, "method_not_allowed")
            message = f"{method} {path} is not served; this API is GET /v1/runner"
            return error(status, {"error": code, "message": message}, close=not keep), keep
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), self._token):
            return error(401, UNAUTHORIZED_BODY, close=not keep,
                         extra=("WWW-Authenticate: Bearer",)), keep
        query = dict(parse_qsl(query_text, keep_blank_values=True))
        page = parse_page_param(query.get("page"), "page", 1, None)
        per_page = parse_page_param(
            query.get("per_page"), "per_page", DEFAULT_PER_PAGE, MAX_PER_PAGE
        )
        for problem in (page, per_page):
            if isinstance(problem, str):
                body = {"error": "invalid_parameter", "message": problem}
                return error(400, body, close=not keep), keep
        assert isinstance(page, int) and isinstance(per_page, int)
        rendered = self.book.page(page, per_page)
        if not keep:
            head_end = rendered.index(b"\r\n\r\n")
            rendered = rendered[:head_end] + b"\r\nConnection: close" + rendered[head_end:]
        return rendered, keep

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests on one connection until the client closes it or asks to."""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    body = {"error": "bad_request", "message": "request head too large"}
                    writer.write(error(431, body, close=True))
                    await writer.drain()
                    return
                rendered, keep = self.answer(head[:-4])
                if self._delay:
                    await asyncio.sleep(self._delay)
                writer.write(rendered)
                await writer.drain()
                if not keep:
                    return
        except ConnectionError:
            return
        finally:
            writer.close()

    async def serve(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (loopback only: the pages hold fake secrets) until cancelled.

        asyncio sets TCP_NODELAY on the accepted sockets, so keep-alive answers are not held
        back by delayed ACKs.
        """
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"the page server only listens on loopback, not {host!r}")
        server = await asyncio.start_server(self.handle, host, port, limit=MAX_HEAD_BYTES)
        async with server:
            await server.serve_forever()


def build_book(**account_options: Any) -> PageBook:
    """Build the seeded account, render its pages, and let the account go.

    The collector is paused while the account is built: it would otherwise walk the growing
    heap of runner dictionaries many times over for nothing (none of them is garbage).
    """
    gc.disable()
    try:
        account = build_account(**account_options)
        book = PageBook(account)
        del account
    finally:
        gc.enable()
    gc.collect()
    _return_freed_memory()
    return book


def _return_freed_memory() -> None:
    """Hand the dropped account's memory back to the system (glibc keeps it otherwise).

    Only matters at the large size, where two servers share the machine with the syncs.
    """
    with contextlib.suppress(AttributeError, OSError):  # not glibc: the memory stays here
        ctypes.CDLL(None).malloc_trim(0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_options(parser)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    book = build_book(
        runners=args.runners, seed=args.seed, token=args.token, latency_ms=0.0,
        updates=args.updates, creates=args.creates, deletes=args.deletes,
    )
    server = PageServer(book, token=args.token, latency_ms=args.latency_ms)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a person stops it
        asyncio.run(server.serve(args.host, args.port))


if __name__ == "__main__":
    main()
