"""Fault injection for the simulator: the ways a real API misbehaves, on demand and replayable.

The mirror's whole promise is "never store a wrong picture". That promise can only be tested
against a server that misbehaves the ways real ones do: it fails, throttles, stalls, drops the
connection, sends half a body, changes shape, lies about its total, revokes the token, and keeps
changing underneath a walk. A `FaultPlan` says which of those happen and how often; the
simulator's app asks it, once per request, what to do.

Two kinds of fault, applied in this order on each request:

* **scripted** (`fail_next`, `fail_always`, `once`): exact, for tests that need "page 3 is a 503
  with Retry-After: 1";
* **random** (`fail_rate`, `drop_connections`, `malformed`, `churn`, latency jitter) and the
  `rate_limit` token bucket: for soak runs and the `comfysync simulate` command.

A request that a scripted fault answers gets no random fault on top. Every request draws the
same fixed number of values from the plan's own `random.Random(seed)` whatever happens to it, so
the same seed, settings and request sequence replay the same faults (only `rate_limit` depends on
the wall clock, by nature).

This module is pure decision logic: no Starlette, no sockets. `pipeline.sim.simulator` turns the
decisions into responses. Thread-safe: the loopback server answers on its own thread while a test
scripts faults from the main one.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import orjson

#: Faults that `FaultPlan.once` accepts. "fail" (a page-targeted error status) is an addition to
#: the original list: "page 3 answers 503 once" is the commonest retry test.
ONCE_FAULTS = frozenset(
    {
        "wrong_shape",
        "missing_id",
        "bad_tags",
        "duplicate",
        "lying_total",
        "revoke_token",
        "malformed",
        "drop",
        "fail",
    }
)
#: Faults that rewrite the records of a page; they may combine on one response.
RECORD_FAULTS = ("wrong_shape", "missing_id", "bad_tags", "duplicate", "lying_total")
MALFORMED_KINDS = ("truncated", "not_json")
RANDOM_FAIL_STATUSES = (500, 502, 503)

UNAUTHORIZED_BODY: dict[str, str] = {
    "error": "unauthorized",
    "message": "Invalid or missing authentication token",
}
NOT_JSON_BODY = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"


class ChurnTarget(Protocol):
    """What churn needs from an account (kept as a protocol so this module imports no simulator)."""

    def __len__(self) -> int: ...
    def runner_id_at(self, index: int) -> str: ...
    def create_runner(self, **fields: Any) -> dict[str, Any]: ...
    def update_runner(self, runner_id: str, **fields: Any) -> dict[str, Any]: ...
    def rotate_header(
        self, runner_id: str, header: str = "Authorization", value: str | None = None
    ) -> dict[str, Any]: ...
    def delete_runner(self, runner_id: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Gate:
    """What happens to one request before the account is read.

    `status` set means "answer this error now" (with `headers`, and `body` as the JSON error).
    The `*_roll` values are this request's pre-drawn randomness, spent later by `shape_page`.
    """

    delay_s: float
    churn: int
    churn_seed: int
    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Mapping[str, str] = field(default_factory=dict)
    fault: str = ""
    drop_roll: float = 1.0
    malformed_roll: float = 1.0
    malformed_kind_roll: float = 0.0
    shape_seed: int = 0


@dataclass(frozen=True)
class PageFaults:
    """How one successful page response is to be damaged (all empty = send it as is)."""

    drop: bool = False
    malformed: str | None = None  # one of MALFORMED_KINDS
    records: frozenset[str] = frozenset()  # subset of RECORD_FAULTS
    total_delta: int = 1
    seed: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the faults applied, for the request log."""
        if self.drop:
            return ("drop",)
        if self.malformed is not None:
            return ("malformed",)
        return tuple(name for name in RECORD_FAULTS if name in self.records)


@dataclass(frozen=True)
class _Once:
    fault: str
    page: int | None
    options: Mapping[str, Any]

    def matches(self, page: int | None) -> bool:
        return self.page is None or self.page == page


#: The longest --latency and jitter: a minute per request already stalls any sync, and a far
#: longer one overflows the event loop's timer.
MAX_LATENCY_MS = 60_000


def parse_latency(text: str) -> tuple[float, float]:
    """Parse a CLI latency spec, "MS" or "MS:JITTER" (milliseconds), e.g. "20:5" -> (20.0, 5.0).

    Raises ValueError with a message fit for the user on anything else.
    """
    shown = repr(text) if len(text) <= 60 else repr(text[:50]) + "..."
    base, _, jitter = text.strip().partition(":")
    try:
        latency = float(base)
        spread = float(jitter) if jitter else 0.0
    except ValueError:
        raise ValueError(
            f"latency must be MS or MS:JITTER in milliseconds (e.g. 20:5), not {shown}"
        ) from None
    if not all(0 <= value <= MAX_LATENCY_MS for value in (latency, spread)):  # False for nan
        raise ValueError(
            f"latency and jitter must be between 0 and {MAX_LATENCY_MS} ms, not {shown}"
        )
    return latency, spread


def error_body(status: int) -> dict[str, str]:
    """The JSON error body the simulator sends with an injected error status."""
    codes = {429: "rate_limited", 500: "internal_error", 502: "bad_gateway"}
    phrase = HTTPStatus(status).phrase
    code = codes.get(status, phrase.lower().replace(" ", "_").replace("-", "_"))
    return {"error": code, "message": f"Injected fault: {status} {phrase}"}


def _check_status(status: int) -> int:
    if not 400 <= status <= 599:
        raise ValueError(f"an injected error status must be 4xx or 5xx, not {status}")
    return status


@dataclass
class FaultPlan:
    """Which faults the simulated API injects, and the state (rng, counters) to inject them.

    The fields are the knobs the `comfysync simulate` flags map onto (see `from_flags`); the
    methods script exact faults for tests. Probabilities are per request, in [0, 1].
    """

    seed: int = 0
    fail_rate: float = 0.0
    rate_limit: float | None = None
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    drop_connections: float = 0.0
    malformed: float = 0.0
    churn: float = 0.0
    #: Seconds clock for the rate limiter; injectable so a test can hold time still.
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    _rng: random.Random = field(init=False, repr=False, compare=False)
    _lock: threading.Lock = field(init=False, repr=False, compare=False)
    _fail_next: list[tuple[int, dict[str, str]]] = field(init=False, repr=False, compare=False)
    _fail_always: int | None = field(init=False, repr=False, compare=False)
    _revoked: bool = field(init=False, repr=False, compare=False)
    _once: list[_Once] = field(init=False, repr=False, compare=False)
    _tokens: float = field(init=False, repr=False, compare=False)
    _last_refill: float | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("fail_rate", "drop_connections", "malformed"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], not {value}")
        if self.rate_limit is not None and not self.rate_limit > 0:
            raise ValueError(f"rate_limit must be > 0 requests/second, not {self.rate_limit}")
        for name in ("latency_ms", "latency_jitter_ms", "churn"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, not {value}")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._fail_next = []
        self._fail_always = None
        self._revoked = False
        self._once = []
        self._tokens = max(1.0, self.rate_limit or 1.0)
        self._last_refill = None

    @classmethod
    def from_flags(
        cls,
        *,
        seed: int = 0,
        fail_rate: float = 0.0,
        rate_limit: float | None = None,
        latency: str | None = None,
        drop_connections: float = 0.0,
        malformed: float = 0.0,
        churn: float = 0.0,
    ) -> FaultPlan:
        """Build a plan from CLI-shaped values (latency as "MS[:JITTER]"); ValueError if bad."""
        latency_ms, jitter_ms = parse_latency(latency) if latency else (0.0, 0.0)
        return cls(
            seed=seed,
            fail_rate=fail_rate,
            rate_limit=rate_limit,
            latency_ms=latency_ms,
            latency_jitter_ms=jitter_ms,
            drop_connections=drop_connections,
            malformed=malformed,
            churn=churn,
        )

    # -- scripted faults -------------------------------------------------------------------

    def fail_next(
        self, count: int, status: int = 500, headers: dict[str, str] | None = None
    ) -> None:
        """Answer the next `count` requests with `status`, a JSON error body and `headers`."""
        _check_status(status)
        with self._lock:
            self._fail_next.extend((status, dict(headers or {})) for _ in range(count))

    def fail_always(self, status: int = 503) -> None:
        """Answer every request from now on with `status`, until `clear()`."""
        _check_status(status)
        with self._lock:
            self._fail_always = status

    def once(self, fault: str, *, page: int | None = None, **options: Any) -> None:
        """Script a one-shot fault for the next request (for page `page`, if given).

        Record faults ("wrong_shape", "missing_id", "bad_tags", "duplicate", "lying_total" with
        `delta=1`) and "malformed" (`kind="truncated"|"not_json"`) and "drop" wait for a request
        that would otherwise succeed; "revoke_token" and "fail" (`status=500`, `headers={}`) fire
        on the next matching request whatever it is. Several pending faults of different kinds
        that match one request all apply to it; two of the same kind take two requests.
        """
        if fault not in ONCE_FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(sorted(ONCE_FAULTS))}")
        if fault == "malformed" and options.get("kind", "truncated") not in MALFORMED_KINDS:
            raise ValueError(f"malformed kind must be one of {MALFORMED_KINDS}")
        if fault == "fail":
            _check_status(int(options.get("status", 500)))
        with self._lock:
            self._once.append(_Once(fault, page, dict(options)))

    def clear(self) -> None:
        """Forget every scripted fault and un-revoke the token (random settings stay)."""
        with self._lock:
            self._fail_next.clear()
            self._fail_always = None
            self._revoked = False
            self._once.clear()

    @property
    def pending(self) -> int:
        """How many scripted one-shot faults (fail_next + once) have not fired yet."""
        with self._lock:
            return len(self._fail_next) + len(self._once)

    # -- per-request decisions (called by the simulator app) -------------------------------

    def begin(self, page: int | None) -> Gate:
        """Decide the fate of one list request before the account is read.

        Draws this request's fixed set of random values, applies scripted then random
        request-level faults, and returns them as a `Gate`.
        """
        with self._lock:
            rng = self._rng
            # Always the same draws, in the same order: replay must not depend on outcomes.
            jitter_roll = rng.random()
            fail_roll = rng.random()
            fail_pick = rng.random()
            drop_roll = rng.random()
            malformed_roll = rng.random()
            malformed_kind_roll = rng.random()
            churn_roll = rng.random()
            sub_seed = rng.getrandbits(32)

            delay_ms = self.latency_ms + (2 * jitter_roll - 1) * self.latency_jitter_ms
            whole, fraction = divmod(self.churn, 1.0)
            common: dict[str, Any] = {
                "delay_s": max(0.0, delay_ms) / 1000.0,
                "churn": int(whole) + (1 if churn_roll < fraction else 0),
                "churn_seed": sub_seed,
                "drop_roll": drop_roll,
                "malformed_roll": malformed_roll,
                "malformed_kind_roll": malformed_kind_roll,
                "shape_seed": sub_seed ^ 0x5EED,
            }

            if self._take_once("revoke_token", page) is not None:
                self._revoked = True
            if self._revoked:
                return Gate(
                    **common,
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                    body=UNAUTHORIZED_BODY,
                    fault="revoke_token",
                )
            if self._fail_always is not None:
                status = self._fail_always
                return Gate(**common, status=status, body=error_body(status), fault="fail_always")
            if self._fail_next:
                status, headers = self._fail_next.pop(0)
                return Gate(
                    **common,
                    status=status,
                    headers=headers,
                    body=error_body(status),
                    fault="fail_next",
                )
            scripted = self._take_once("fail", page)
            if scripted is not None:
                status = int(scripted.options.get("status", 500))
                return Gate(
                    **common,
                    status=status,
                    headers=dict(scripted.options.get("headers") or {}),
                    body=error_body(status),
                    fault="fail",
                )
            retry_after = self._throttle()
            if retry_after is not None:
                return Gate(
                    **common,
                    status=429,
                    headers={"Retry-After": str(retry_after)},
                    body=error_body(429),
                    fault="rate_limit",
                )
            if fail_roll < self.fail_rate:
                status = RANDOM_FAIL_STATUSES[int(fail_pick * len(RANDOM_FAIL_STATUSES))]
                return Gate(**common, status=status, body=error_body(status), fault="fail_rate")
            return Gate(**common)

    def shape_page(self, gate: Gate, page: int) -> PageFaults:
        """Decide how a page about to be sent successfully is damaged (scripted, then random)."""
        with self._lock:
            drop = self._take_once("drop", page)
            if drop is not None:
                return PageFaults(drop=True)
            bad = self._take_once("malformed", page)
            if bad is not None:
                return PageFaults(malformed=str(bad.options.get("kind", "truncated")))
            records: set[str] = set()
            delta = 1
            for name in RECORD_FAULTS:
                taken = self._take_once(name, page)
                if taken is not None:
                    records.add(name)
                    delta = int(taken.options.get("delta", delta))
            if records:
                return PageFaults(
                    records=frozenset(records), total_delta=delta, seed=gate.shape_seed
                )
        if gate.drop_roll < self.drop_connections:
            return PageFaults(drop=True)
        if gate.malformed_roll < self.malformed:
            kind = MALFORMED_KINDS[int(gate.malformed_kind_roll * len(MALFORMED_KINDS))]
            return PageFaults(malformed=kind)
        return PageFaults()

    def _take_once(self, fault: str, page: int | None) -> _Once | None:
        for index, pending in enumerate(self._once):
            if pending.fault == fault and pending.matches(page):
                return self._once.pop(index)
        return None

    def _throttle(self) -> int | None:
        """Token bucket (burst = one second's worth): None if allowed, else Retry-After secs."""
        if self.rate_limit is None:
            return None
        now = self.clock()
        capacity = max(1.0, self.rate_limit)
        if self._last_refill is not None:
            elapsed = max(0.0, now - self._last_refill)
            self._tokens = min(capacity, self._tokens + elapsed * self.rate_limit)
        self._last_refill = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return max(1, math.ceil((1.0 - self._tokens) / self.rate_limit))


def apply_churn(target: ChurnTarget, mutations: int, seed: int) -> None:
    """Apply `mutations` random creates/updates/deletes to `target`, deterministically from seed.

    This is what makes page-number pagination lie: every create pushes older runners one place
    down, every delete pulls them one place up, while a walk is between pages.
    """
    rng = random.Random(seed)
    for _ in range(mutations):
        size = len(target)
        action = rng.choice(("create", "update", "delete")) if size else "create"
        if action == "create":
            target.create_runner()
            continue
        runner_id = target.runner_id_at(rng.randrange(size))
        if action == "delete":
            target.delete_runner(runner_id)
        elif rng.random() < 0.5:
            target.rotate_header(runner_id)
        else:
            status = rng.choice(("active", "disabled"))
            target.update_runner(runner_id, status=status)


def render_page(body: dict[str, Any], faults: PageFaults) -> tuple[bytes, str]:
    """Serialise a `{"runners", "total"}` page with record faults / malformation applied.

    Returns (body bytes, media type). Never mutates the records it is given (they are the
    account's own); a damaged record is a copy.
    """
    if faults.malformed == "not_json":
        return NOT_JSON_BODY, "text/html"
    runners: list[dict[str, Any]] = list(body["runners"])
    total: int = body["total"]
    rng = random.Random(faults.seed)
    if runners and "missing_id" in faults.records:
        index = rng.randrange(len(runners))
        runners[index] = {k: v for k, v in runners[index].items() if k != "id"}
    if runners and "bad_tags" in faults.records:
        index = rng.randrange(len(runners))
        tags = runners[index].get("tags")
        joined = ",".join(tags) if isinstance(tags, list) and tags else "production,gpu"
        runners[index] = {**runners[index], "tags": joined}
    if runners and "duplicate" in faults.records:
        # Repeat a record in place of its neighbour: the page keeps its length, so only an
        # id-uniqueness check notices (and the neighbour silently goes missing, as it would
        # when a concurrent create shifts the pages).
        if len(runners) == 1:
            runners.append(runners[0])
        else:
            index = rng.randrange(len(runners) - 1)
            runners[index + 1] = runners[index]
    if "lying_total" in faults.records:
        total += faults.total_delta
    key = "items" if "wrong_shape" in faults.records else "runners"
    data = orjson.dumps({key: runners, "total": total})
    if faults.malformed == "truncated":
        data = data[: max(1, len(data) // 2)]
    return data, "application/json"
