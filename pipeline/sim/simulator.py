"""A simulated ComfyControl account and `GET /v1/runner`, in process or on a loopback socket.

Why it exists: the mirror must be tested, demonstrated and benchmarked without a real account,
and (more importantly) against the situations a real account produces rarely and unpredictably:
runners created or deleted while a walk is between pages, throttling, broken responses. The
simulator reproduces the documented contract (the vendor's List Runners API reference) exactly,
and takes the liberty the contract leaves (401 body, past-the-end pages, 400 for bad
parameters) in the plainest way; `pipeline.sim.faults` adds the misbehaviour.

Three ways in:

* `SimulatedAccount`: the data, with mutation methods and `before_page` hooks, so a test can
  change the account between two page fetches of one walk;
* `create_app(account)`: the Starlette app, for `httpx.ASGITransport` (no socket);
* `LoopbackServer(account)` / `serve(account)`: uvicorn on 127.0.0.1 only, for end-to-end tests
  and `comfysync simulate`.

Everything is deterministic from a seed, including the mutation clock, so a scenario replays
exactly. Generated endpoints (some private-network `http://` addresses, as in the vendor's
example) are data only: nothing here or in comfysync ever connects to them.
"""

from __future__ import annotations

import asyncio
import bisect
import hmac
import logging
import random
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pipeline.settings import is_loopback_host
from pipeline.sim.faults import UNAUTHORIZED_BODY, FaultPlan, Gate, apply_churn, render_page
from pipeline.source.records import REFERENCE_FIELDS

log = logging.getLogger(__name__)

__all__ = [
    "ConnectionDropped",
    "LoopbackServer",
    "RequestRecord",
    "SimulatedAccount",
    "create_app",
    "serve",
]

#: Newest generated runner is created at BASE_EPOCH; older ones step back a few minutes each.
BASE_EPOCH = 1_717_200_000  # 2024-06-01T00:00:00Z
MAX_PER_PAGE = 100
REQUEST_LOG_SIZE = 10_000

TAG_VOCABULARY = (
    "production", "staging", "development", "gpu-a100", "gpu-h100", "gpu-l4", "cpu",
    "sdxl", "flux", "video", "eu-west", "us-east", "ap-south", "batch", "interactive",
)  # fmt: skip
_ENVIRONMENTS = ("Production", "Staging", "Development", "Research", "Batch")
_KINDS = ("GPU", "CPU", "A100", "H100", "SDXL", "Flux")
_MODELS = ("sdxl", "flux", "sd15", "svd", "comfy", "hunyuan")
_ROLES = ("render", "batch", "preview", "upscale", "train", "api")
_REGIONS = ("eu", "us", "ap", "eu-west", "us-east")
_HOST_WORDS = ("comfy", "render", "gpu", "runner", "studio", "lab", "farm", "node")
_PORTS = ("", "", "", ":8188", ":8443", ":443")
_INTEGER = re.compile(r"-?[0-9]{1,30}")


def format_timestamp(epoch_seconds: int) -> str:
    """ISO 8601, UTC, second precision with `Z`: the contract's timestamp shape."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_seconds))


def _uuid4(rng: random.Random) -> str:
    """A UUID4-shaped string from `rng` (uuid.uuid4 would use the OS entropy, not the seed)."""
    value = rng.getrandbits(128)
    value = (value & ~(0xF << 76)) | (0x4 << 76)  # version 4
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _secret(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def _clone(value: Any) -> Any:
    """Deep copy of JSON data via orjson: also proves that a value given to us is JSON data."""
    return orjson.loads(orjson.dumps(value))


def _copy(value: Any) -> Any:
    """Deep copy of stored JSON data: what callers get, so they can never alter the account.

    Faster than an orjson round trip: the strings are shared, not re-created (they are
    immutable, so sharing them is safe).
    """
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


@dataclass(frozen=True)
class RequestRecord:
    """One request the app answered: parsed page/per_page (None if absent-invalid or not a list
    request), the status sent, and the names of the injected faults that shaped it."""

    page: int | None
    per_page: int | None
    status: int
    faults: tuple[str, ...] = ()


class ConnectionDropped(httpx.RemoteProtocolError):
    """Injected fault: the connection closed in the middle of the response.

    Over a socket, uvicorn closes the connection when the app raises this after sending part of
    the body, and the client sees its own protocol error. In process (`httpx.ASGITransport`) the
    exception reaches the client directly; subclassing httpx's error makes both look the same to
    a client that catches `httpx.TransportError`.
    """


class SimulatedAccount:
    """In-memory ComfyControl account: runners newest first by created_at.

    Stored oldest first (a create is an append; a page is a reversed slice, O(per_page)), with a
    parallel list of created_at for ordered inserts. Stored records are never mutated in place:
    an update replaces the dict, so a page being serialised on the server thread stays a
    consistent snapshot while a test mutates the account. All methods are thread-safe.
    """

    def __init__(
        self,
        *,
        runners: int = 250,
        seed: int = 1,
        token: str | None = "demo-token",
        user_id: str | None = None,
        faults: FaultPlan | None = None,
    ) -> None:
        if runners < 0:
            raise ValueError(f"runners must be >= 0, not {runners}")
        self._rng = random.Random(seed)
        self.token: str | None = token
        self.user_id: str = user_id if user_id is not None else _uuid4(self._rng)
        self.faults: FaultPlan = faults if faults is not None else FaultPlan()
        self.before_page: list[Callable[[int, int], None]] = []
        self.requests: deque[RequestRecord] = deque(maxlen=REQUEST_LOG_SIZE)
        self._lock = threading.RLock()
        self._records: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []  # ids, oldest first
        self._created: list[str] = []  # created_at, parallel to _order
        # The mutation clock starts at the newest generated timestamp; each mutation ticks it.
        self._clock = BASE_EPOCH
        self._generate(runners)

    # -- generation ----------------------------------------------------------------------

    def _generate(self, count: int) -> None:
        created = BASE_EPOCH
        newest_first: list[dict[str, Any]] = []
        for _ in range(count):
            newest_first.append(self._fake_runner(created))
            created -= 60 * self._rng.randint(1, 20)
        for record in reversed(newest_first):
            self._records[record["id"]] = record
            self._order.append(record["id"])
            self._created.append(record["created_at"])

    def _fake_runner(self, created: int) -> dict[str, Any]:
        rng = self._rng
        updated = created
        if rng.random() < 0.4:
            updated = min(BASE_EPOCH, created + rng.randint(1, 30 * 86_400))
        created_at = format_timestamp(created)
        return {
            "id": _uuid4(rng),
            "user_id": self.user_id,
            "name": self._fake_name(),
            "status": "active" if rng.random() < 0.85 else "disabled",
            "endpoint": self._fake_endpoint(),
            "tags": rng.sample(TAG_VOCABULARY, rng.randint(0, 4)),
            "headers": self._fake_headers(),
            "created_at": created_at,
            "updated_at": created_at if updated == created else format_timestamp(updated),
        }

    def _fake_name(self) -> str:
        rng = self._rng
        style = rng.random()
        if style < 0.4:
            number = rng.randint(1, 999)
            return f"{rng.choice(_ENVIRONMENTS)} {rng.choice(_KINDS)} Runner {number:03d}"
        if style < 0.9:
            parts = (rng.choice(_MODELS), rng.choice(_ROLES), rng.choice(_REGIONS))
            return f"{'-'.join(parts)}-{rng.randint(1, 9)}"
        return f"{rng.choice(_ENVIRONMENTS)} Runner"

    def _fake_endpoint(self) -> str:
        rng = self._rng
        if rng.random() < 0.05:
            private = rng.choice(
                (
                    f"192.168.{rng.randint(0, 255)}.{rng.randint(2, 254)}",
                    f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}",
                    f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}",
                )
            )
            return f"http://{private}:8188"
        host = f"{rng.choice(_HOST_WORDS)}-{rng.randint(1, 99)}"
        domain = "example.com" if rng.random() < 0.7 else "example.net"
        return f"https://{host}.{domain}{rng.choice(_PORTS)}"

    def _fake_headers(self) -> dict[str, str]:
        roll = self._rng.random()
        if roll < 0.5:
            return {"Authorization": f"Bearer {_secret(self._rng)}"}
        if roll < 0.7:
            return {"X-Api-Key": _secret(self._rng)}
        return {}

    # -- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._order)

    def list_runners(self) -> list[dict[str, Any]]:
        """Every runner, newest first, as independent copies of the API's runner objects."""
        with self._lock:
            records = [self._records[rid] for rid in reversed(self._order)]
        return list(_copy(records))

    def runner_ids(self) -> list[str]:
        """Every runner id, newest first."""
        with self._lock:
            return self._order[::-1]

    def runner_id_at(self, index: int) -> str:
        """The id at newest-first position `index` (O(1); churn uses it to pick a victim)."""
        with self._lock:
            return self._order[len(self._order) - 1 - index]

    def get_runner(self, runner_id: str) -> dict[str, Any]:
        """A copy of one runner; KeyError if there is none with that id."""
        with self._lock:
            return dict(_copy(self._records[runner_id]))

    def page(self, page: int, per_page: int) -> dict[str, Any]:
        """`{"runners": [...], "total": n}` exactly as the API answers (copies).

        A page past the end has an empty runners list and the same total.
        """
        return dict(_copy(self._page_view(page, per_page)))

    def _page_view(self, page: int, per_page: int) -> dict[str, Any]:
        """The page with the stored records themselves (safe: they are never mutated)."""
        if page < 1 or per_page < 1:
            raise ValueError(f"page and per_page must be >= 1, not {page}, {per_page}")
        with self._lock:
            total = len(self._order)
            end = total - (page - 1) * per_page  # exclusive, in oldest-first positions
            if end <= 0:
                return {"runners": [], "total": total}
            ids = self._order[max(0, end - per_page) : end]
            return {"runners": [self._records[rid] for rid in reversed(ids)], "total": total}

    # -- mutations (each advances the clock by one second) -------------------------------

    def _tick(self) -> str:
        self._clock += 1
        return format_timestamp(self._clock)

    def _check_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(fields) - REFERENCE_FIELDS)
        if unknown:
            raise ValueError(f"not runner fields: {', '.join(unknown)}")
        if not isinstance(fields.get("created_at", ""), str):
            raise ValueError("created_at must be an ISO 8601 string (it orders the runners)")
        return dict(_clone(fields))

    def create_runner(self, **fields: Any) -> dict[str, Any]:
        """Create a runner (the newest, unless `created_at` says otherwise) and return a copy.

        `fields` override the generated ones, including `id` to re-create a deleted runner
        under the same id; ValueError if that id exists.
        """
        with self._lock:
            overrides = self._check_fields(fields)
            now = self._tick()
            record = self._fake_runner(self._clock)
            record.update(created_at=now, updated_at=now)
            record.update(overrides)
            if record["id"] in self._records:
                raise ValueError(f"runner {record['id']} already exists")
            self._insert(record)
            return dict(_copy(record))

    def update_runner(self, runner_id: str, **fields: Any) -> dict[str, Any]:
        """Set `fields` on a runner and bump its updated_at (unless given); returns a copy."""
        with self._lock:
            changes = self._check_fields(fields)
            old = self._records[runner_id]
            if changes.get("id", runner_id) != runner_id:
                raise ValueError("a runner's id cannot change; delete and create instead")
            now = self._tick()
            record = {**old, "updated_at": now, **changes}
            if record["created_at"] != old["created_at"]:
                self._remove(runner_id)
                self._insert(record)
            else:
                self._records[runner_id] = record
            return dict(_copy(record))

    def rename_runner(self, runner_id: str, name: str) -> dict[str, Any]:
        """Give a runner a new name (bumps updated_at)."""
        return self.update_runner(runner_id, name=name)

    def rotate_header(
        self, runner_id: str, header: str = "Authorization", value: str | None = None
    ) -> dict[str, Any]:
        """Give one header of a runner a new secret (generated if None); bumps updated_at."""
        with self._lock:
            if value is None:
                secret = _secret(self._rng)
                value = f"Bearer {secret}" if header.lower() == "authorization" else secret
            headers = self._records[runner_id]["headers"]
            headers = dict(headers) if isinstance(headers, dict) else {}
            headers[header] = value
            return self.update_runner(runner_id, headers=headers)

    def delete_runner(self, runner_id: str) -> dict[str, Any]:
        """Remove a runner and return its last record; KeyError if there is none."""
        with self._lock:
            if runner_id not in self._records:
                raise KeyError(runner_id)
            self._tick()
            return dict(_copy(self._remove(runner_id)))

    def _insert(self, record: dict[str, Any]) -> None:
        # bisect_right: among equal created_at, the later insert counts as newer.
        at = bisect.bisect_right(self._created, record["created_at"])
        self._order.insert(at, record["id"])
        self._created.insert(at, record["created_at"])
        self._records[record["id"]] = record

    def _remove(self, runner_id: str) -> dict[str, Any]:
        record = self._records.pop(runner_id)
        at = bisect.bisect_left(self._created, record["created_at"])
        while self._order[at] != runner_id:
            at += 1
        del self._order[at]
        del self._created[at]
        return record


# -- the HTTP app ------------------------------------------------------------------------------


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def parse_page_param(raw: str | None, name: str, default: int, upper: int | None) -> int | str:
    """The integer value of a query parameter (``raw``, None when absent), or the 400 message
    explaining why not."""
    if raw is None:
        return default
    bounds = f"between 1 and {upper}" if upper else ">= 1"
    if not _INTEGER.fullmatch(raw):
        return f"{name} must be an integer {bounds}, not {raw[:40]!r}"
    value = int(raw)
    if value < 1 or (upper is not None and value > upper):
        return f"{name} must be an integer {bounds}, not {value}"
    return value


def _trace_line(
    page: int | None,
    per_page: int | None,
    status: int,
    faults: tuple[str, ...],
    gate: Gate | None,
) -> str:
    """One request as ``comfysync simulate --debug`` logs it: enough to replay a seeded run.

    Names only what the fault plan decided (status, faults, delay, churn); never a header, a
    token or a runner, so the trace can be shared in a bug report.
    """
    line = f"GET /v1/runner page={page} per_page={per_page} -> {status}"
    if faults:
        line += f" [{', '.join(faults)}]"
    if gate is not None and gate.delay_s:
        line += f" delay {gate.delay_s * 1000:.1f} ms"
    if gate is not None and gate.churn:
        line += f" churn {gate.churn}"
    return line


def _authorised(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)


class _DroppedResponse(Response):
    """Announce a full body, send a little of it, then break the connection."""

    def __init__(self, body: bytes) -> None:
        super().__init__(body, 200, media_type="application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        partial = bytes(self.body[: max(1, len(self.body) // 3)])
        await send({"type": "http.response.body", "body": partial, "more_body": True})
        raise ConnectionDropped("peer closed connection without sending complete message body")


def create_app(account: SimulatedAccount) -> Starlette:
    """The Starlette app serving `GET /v1/runner` for `account`, with its fault plan applied.

    Order per request: fault gate (latency, churn, scripted/rate-limit/random error statuses),
    then auth (401), then parameters (400), then `before_page` hooks, then the page with any
    page faults. Unknown paths are 404 JSON, other methods 405 JSON.
    """

    def record(
        page: int | None, per_page: int | None, status: int, *faults: str, gate: Gate | None = None
    ) -> None:
        names = tuple(name for name in faults if name)
        account.requests.append(RequestRecord(page, per_page, status, names))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", _trace_line(page, per_page, status, names, gate))

    async def list_runners(request: Request) -> Response:
        query = request.query_params
        page = parse_page_param(query.get("page"), "page", 1, None)
        per_page = parse_page_param(query.get("per_page"), "per_page", 10, MAX_PER_PAGE)
        page_no = page if isinstance(page, int) else None
        per_page_no = per_page if isinstance(per_page, int) else None

        gate: Gate = account.faults.begin(page_no)
        if gate.delay_s:
            await asyncio.sleep(gate.delay_s)
        if gate.churn:
            apply_churn(account, gate.churn, gate.churn_seed)
        if gate.status is not None:
            record(page_no, per_page_no, gate.status, gate.fault, gate=gate)
            return _json(gate.status, dict(gate.body), dict(gate.headers))
        if not _authorised(request, account.token):
            record(page_no, per_page_no, 401, gate=gate)
            return _json(401, UNAUTHORIZED_BODY, {"WWW-Authenticate": "Bearer"})
        for problem in (page, per_page):
            if isinstance(problem, str):
                record(page_no, per_page_no, 400, gate=gate)
                return _json(400, {"error": "invalid_parameter", "message": problem})
        assert page_no is not None and per_page_no is not None
        for hook in list(account.before_page):
            hook(page_no, per_page_no)

        shape = account.faults.shape_page(gate, page_no)
        body, media_type = render_page(account._page_view(page_no, per_page_no), shape)
        record(page_no, per_page_no, 200, *shape.names, gate=gate)
        if shape.drop:
            return _DroppedResponse(body)
        return Response(body, 200, media_type=media_type)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        record(None, None, status)
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "error")
        message = f"{request.method} {request.url.path} is not served; this API is GET /v1/runner"
        return _json(status, {"error": code, "message": message})

    return Starlette(
        routes=[Route("/v1/runner", list_runners, methods=["GET"])],
        exception_handlers={404: http_error, 405: http_error},
    )


# -- serving on loopback ---------------------------------------------------------------------


class _HideInjectedDrops(logging.Filter):
    """uvicorn logs an app exception as an error; an injected drop is intended, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ConnectionDropped))


_DROP_FILTER = _HideInjectedDrops()


def _require_loopback(host: str) -> None:
    """The simulator serves fake secrets with no TLS: it must never listen beyond this host."""
    if not is_loopback_host(host):
        raise ValueError(f"the simulator only listens on loopback (127.0.0.1, ::1), not {host!r}")


def _listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on a loopback address; ``port=0`` picks a free port.

    Bound here rather than by uvicorn so the caller learns the real port before serving.
    Raises ValueError for a non-loopback host and OSError when the port cannot be bound.
    """
    _require_loopback(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this. uvicorn sets no TCP_NODELAY on sockets it is
        # handed, and without it every keep-alive response waits for a delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _base_url(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


def _uvicorn_config(account: SimulatedAccount, **options: Any) -> uvicorn.Config:
    config = uvicorn.Config(
        create_app(account),
        log_level="warning",
        access_log=False,
        lifespan="off",
        http="h11",
        loop="asyncio",
        timeout_graceful_shutdown=2,
        **options,
    )
    # After Config(): it (re)configures uvicorn's loggers when created.
    error_logger = logging.getLogger("uvicorn.error")
    if _DROP_FILTER not in error_logger.filters:
        error_logger.addFilter(_DROP_FILTER)
    return config


class LoopbackServer:
    """The simulator on a real loopback socket, in a background thread; a context manager.

    Starts on construction and returns once the socket accepts connections; `port=0` picks a
    free port, read it back from `.port` / `.url`. `stop()` (or leaving the `with` block) shuts
    uvicorn down and joins its thread. Refuses non-loopback hosts with ValueError.
    """

    def __init__(
        self, account: SimulatedAccount, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.account = account
        self.host = host
        self._sock = _listening_socket(host, port)
        try:
            self.port: int = self._sock.getsockname()[1]
            self._server = uvicorn.Server(_uvicorn_config(self.account))
            self._thread = threading.Thread(
                target=self._server.run,
                kwargs={"sockets": [self._sock]},
                name=f"comfysync-simulator-{self.port}",
                daemon=True,
            )
            self._thread.start()
            deadline = time.monotonic() + 10
            while not self._server.started:
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the simulator server did not start")
                time.sleep(0.005)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. "http://127.0.0.1:54321"."""
        return _base_url(self.host, self.port)

    def stop(self) -> None:
        """Shut down and join the server thread (idempotent)."""
        server = getattr(self, "_server", None)
        thread = getattr(self, "_thread", None)
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout=5)
            if thread.is_alive():
                server.force_exit = True
                thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(
    account: SimulatedAccount,
    *,
    host: str = "127.0.0.1",
    port: int = 8188,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the simulator until interrupted (the `comfysync simulate` command); loopback only.

    ``on_ready(base_url)`` is called once the socket listens, with the real port (so
    ``port=0`` is usable: the caller learns which port was picked).
    """
    sock = _listening_socket(host, port)
    try:
        if on_ready is not None:
            on_ready(_base_url(host, sock.getsockname()[1]))
        uvicorn.Server(_uvicorn_config(account)).run(sockets=[sock])
    finally:
        sock.close()
