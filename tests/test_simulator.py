"""The simulator and its faults: the contract of GET /v1/runner, the account, each fault mode.

In process through `httpx.ASGITransport` (async only, so each test runs its own event loop with
`asyncio.run`), and end to end over a real loopback socket with `LoopbackServer`.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any

import httpx
import pytest

from pipeline.settings import is_loopback_host
from pipeline.sim.faults import FaultPlan, parse_latency
from pipeline.sim.simulator import (
    LoopbackServer,
    RequestRecord,
    SimulatedAccount,
    create_app,
    serve,
)

AUTH = {"Authorization": "Bearer demo-token"}
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
RUNNER_KEYS = {
    "id", "user_id", "name", "status", "endpoint", "tags", "headers", "created_at", "updated_at",
}  # fmt: skip


def get_all(
    account: SimulatedAccount,
    requests: list[dict[str, Any]],
    *,
    headers: dict[str, str] | None = AUTH,
    path: str = "/v1/runner",
) -> list[httpx.Response]:
    """Send GET requests (one per params dict) in order to the app in process."""

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(account))
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
            return [await client.get(path, params=params, headers=headers) for params in requests]

    return asyncio.run(run())


def get(account: SimulatedAccount, **params: Any) -> httpx.Response:
    return get_all(account, [params])[0]


def ids_of(response: httpx.Response) -> list[str]:
    return [runner["id"] for runner in response.json()["runners"]]


def statuses(account: SimulatedAccount) -> list[int]:
    return [record.status for record in account.requests]


# -- the contract ------------------------------------------------------------------------------


def test_250_runners_over_three_pages_are_all_distinct_newest_first() -> None:
    account = SimulatedAccount(runners=250)
    pages = get_all(account, [{"page": p, "per_page": 100} for p in (1, 2, 3)])

    assert [r.status_code for r in pages] == [200, 200, 200]
    assert [r.json()["total"] for r in pages] == [250, 250, 250]
    assert [len(r.json()["runners"]) for r in pages] == [100, 100, 50]
    runners = [runner for r in pages for runner in r.json()["runners"]]
    assert len({runner["id"] for runner in runners}) == 250
    created = [runner["created_at"] for runner in runners]
    assert created == sorted(created, reverse=True)
    assert runners == account.list_runners()
    assert pages[0].headers["content-type"] == "application/json"


def test_runner_objects_have_exactly_the_documented_fields_and_shapes() -> None:
    account = SimulatedAccount(runners=300, seed=3)
    runners = account.list_runners()

    for runner in runners:
        assert set(runner) == RUNNER_KEYS
        assert UUID4.fullmatch(runner["id"])
        assert runner["user_id"] == account.user_id
        assert runner["status"] in {"active", "disabled"}
        assert runner["endpoint"].startswith(("https://", "http://"))
        assert isinstance(runner["tags"], list) and len(runner["tags"]) <= 4
        assert all(isinstance(value, str) for value in runner["headers"].values())
        assert TIMESTAMP.fullmatch(runner["created_at"])
        assert TIMESTAMP.fullmatch(runner["updated_at"])
        assert runner["updated_at"] >= runner["created_at"]
    assert UUID4.fullmatch(account.user_id)
    assert runners[0]["created_at"] == "2024-06-01T00:00:00Z"
    # The variety a mirror has to cope with is actually there.
    assert {r["status"] for r in runners} == {"active", "disabled"}
    header_kinds = {tuple(r["headers"]) for r in runners}
    assert {("Authorization",), ("X-Api-Key",), ()} <= header_kinds
    assert any(r["endpoint"].startswith("http://") for r in runners)
    assert any(r["updated_at"] > r["created_at"] for r in runners)


def test_same_seed_gives_the_same_account_and_another_seed_a_different_one() -> None:
    one, same, other = (SimulatedAccount(runners=120, seed=s) for s in (7, 7, 8))

    assert one.list_runners() == same.list_runners()
    assert one.user_id == same.user_id
    assert set(one.runner_ids()).isdisjoint(other.runner_ids())
    assert one.user_id != other.user_id
    assert SimulatedAccount(runners=1, user_id="u-1").list_runners()[0]["user_id"] == "u-1"


def test_missing_or_wrong_token_is_401_with_a_json_body() -> None:
    account = SimulatedAccount(runners=5)
    expected = {"error": "unauthorized", "message": "Invalid or missing authentication token"}

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "demo-token"}):
        response = get_all(account, [{}], headers=headers)[0]
        assert response.status_code == 401
        assert response.json() == expected
    assert statuses(account) == [401, 401, 401]


def test_an_account_without_a_token_needs_no_auth() -> None:
    account = SimulatedAccount(runners=5, token=None)
    assert get_all(account, [{}], headers={})[0].status_code == 200


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"page": "0"}, "page"),
        ({"page": "-1"}, "page"),
        ({"page": "1.5"}, "page"),
        ({"page": ""}, "page"),
        ({"per_page": "0"}, "per_page"),
        ({"per_page": "101"}, "per_page"),
        ({"per_page": "abc"}, "per_page"),
    ],
)
def test_a_bad_page_or_per_page_is_400(params: dict[str, str], name: str) -> None:
    response = get(SimulatedAccount(runners=5), **params)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_parameter"
    assert response.json()["message"].startswith(f"{name} must be an integer")


def test_defaults_are_page_1_and_10_per_page_and_100_is_allowed() -> None:
    account = SimulatedAccount(runners=150)
    default, biggest = get_all(account, [{}, {"per_page": 100}])
    assert ids_of(default) == account.runner_ids()[:10]
    assert ids_of(biggest) == account.runner_ids()[:100]
    assert list(account.requests) == [RequestRecord(1, 10, 200), RequestRecord(1, 100, 200)]


def test_a_page_past_the_end_is_empty_with_the_same_total() -> None:
    account = SimulatedAccount(runners=25)
    assert get(account, page=4, per_page=10).json() == {"runners": [], "total": 25}
    assert get(account, page=10**20, per_page=10).json() == {"runners": [], "total": 25}
    assert account.page(2, 20) == {"runners": account.list_runners()[20:], "total": 25}


def test_unknown_paths_and_methods_answer_json() -> None:
    account = SimulatedAccount(runners=1)
    response = get_all(account, [{}], path="/v1/runners")[0]
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(account))
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
            return await client.post("/v1/runner", headers=AUTH)

    assert asyncio.run(post()).json()["error"] == "method_not_allowed"


# -- the account and its mutations -------------------------------------------------------------


def test_create_makes_the_newest_runner_with_the_next_clock_second() -> None:
    account = SimulatedAccount(runners=10)
    created = account.create_runner(name="brand-new", tags=["flux"])

    assert account.runner_ids()[0] == created["id"]
    assert ids_of(get(account, per_page=1)) == [created["id"]]
    assert created["name"] == "brand-new" and created["tags"] == ["flux"]
    assert created["created_at"] == created["updated_at"] == "2024-06-01T00:00:01Z"
    assert len(account) == 11


def test_update_rename_and_rotate_bump_updated_at_and_keep_the_order() -> None:
    account = SimulatedAccount(runners=10)
    order = account.runner_ids()
    target = order[4]
    before = account.get_runner(target)

    updated = account.update_runner(target, status="disabled")
    renamed = account.rename_runner(target, "renamed runner")
    rotated = account.rotate_header(target)
    keyed = account.rotate_header(target, "X-Api-Key", "k-123")

    assert updated["status"] == "disabled"
    assert updated["updated_at"] == "2024-06-01T00:00:01Z"
    assert renamed["name"] == "renamed runner"
    assert renamed["updated_at"] == "2024-06-01T00:00:02Z"
    assert rotated["headers"]["Authorization"].startswith("Bearer ")
    assert rotated["headers"]["Authorization"] != before["headers"].get("Authorization")
    assert keyed["headers"]["X-Api-Key"] == "k-123"
    assert keyed["updated_at"] == "2024-06-01T00:00:04Z"
    assert keyed["created_at"] == before["created_at"]
    assert account.runner_ids() == order
    assert account.get_runner(target) == keyed


def test_delete_removes_and_recreating_with_the_same_id_makes_it_newest() -> None:
    account = SimulatedAccount(runners=10)
    victim = account.runner_ids()[5]

    deleted = account.delete_runner(victim)
    assert deleted["id"] == victim
    assert victim not in account.runner_ids() and len(account) == 9
    assert victim not in ids_of(get(account, per_page=100))
    with pytest.raises(KeyError):
        account.get_runner(victim)

    again = account.create_runner(id=victim, name=deleted["name"])
    assert account.runner_ids()[0] == victim
    assert again["created_at"] > deleted["created_at"]
    with pytest.raises(ValueError, match="already exists"):
        account.create_runner(id=victim)


def test_mutations_reject_unknown_fields_and_id_changes() -> None:
    account = SimulatedAccount(runners=2)
    with pytest.raises(ValueError, match="not runner fields"):
        account.create_runner(colour="red")
    with pytest.raises(ValueError, match="cannot change"):
        account.update_runner(account.runner_ids()[0], id="other")


def test_a_given_created_at_places_the_runner_in_date_order() -> None:
    account = SimulatedAccount(runners=5)
    old = account.create_runner(created_at="2000-01-01T00:00:00Z")
    assert account.runner_ids()[-1] == old["id"]
    account.update_runner(old["id"], created_at="2030-01-01T00:00:00Z")
    assert account.runner_ids()[0] == old["id"]


def test_returned_records_are_copies() -> None:
    account = SimulatedAccount(runners=3)
    first = account.list_runners()[0]
    first["tags"].append("mine")
    first["headers"]["Authorization"] = "stolen"
    assert account.list_runners()[0] != first


def test_a_seeded_scenario_replays_exactly() -> None:
    def scenario() -> list[dict[str, Any]]:
        account = SimulatedAccount(runners=20, seed=5)
        ids = account.runner_ids()
        account.create_runner()
        account.rotate_header(ids[2])
        account.delete_runner(ids[3])
        return account.list_runners()

    assert scenario() == scenario()


def test_before_page_hooks_run_between_the_pages_of_one_walk() -> None:
    account = SimulatedAccount(runners=250)
    calls: list[tuple[int, int]] = []

    def create_before_page_2(page: int, per_page: int) -> None:
        calls.append((page, per_page))
        if page == 2:
            account.create_runner(name="arrived mid-walk")

    account.before_page.append(create_before_page_2)
    first, second = get_all(account, [{"page": 1, "per_page": 100}, {"page": 2, "per_page": 100}])

    assert calls == [(1, 100), (2, 100)]
    # The create pushed every runner one place down: page 2 repeats page 1's last runner.
    assert ids_of(second)[0] == ids_of(first)[-1]
    assert second.json()["total"] == 251


# -- scripted faults ---------------------------------------------------------------------------


def test_fail_next_answers_the_status_and_headers_then_recovers() -> None:
    account = SimulatedAccount(runners=5)
    account.faults.fail_next(2, status=503, headers={"Retry-After": "1"})
    responses = get_all(account, [{}, {}, {}])

    assert [r.status_code for r in responses] == [503, 503, 200]
    assert responses[0].headers["retry-after"] == "1"
    assert responses[0].json()["error"] == "service_unavailable"
    assert [r.faults for r in account.requests] == [("fail_next",), ("fail_next",), ()]


def test_fail_always_lasts_until_clear() -> None:
    account = SimulatedAccount(runners=5)
    account.faults.fail_always(502)
    assert [r.status_code for r in get_all(account, [{}] * 3)] == [502, 502, 502]
    account.faults.clear()
    assert get(account).status_code == 200


def test_once_wrong_shape_renames_the_runners_key() -> None:
    account = SimulatedAccount(runners=5)
    account.faults.once("wrong_shape")
    shaped, normal = get_all(account, [{}, {}])
    assert set(shaped.json()) == {"items", "total"}
    assert len(shaped.json()["items"]) == 5
    assert set(normal.json()) == {"runners", "total"}


def test_once_missing_id_and_bad_tags_damage_one_record_each() -> None:
    account = SimulatedAccount(runners=20)
    account.faults.once("missing_id")
    account.faults.once("bad_tags")
    runners = get(account).json()["runners"]
    assert sum("id" not in r for r in runners) == 1
    assert sum(isinstance(r["tags"], str) for r in runners) == 1
    # Copies were damaged, not the account.
    assert all("id" in r and isinstance(r["tags"], list) for r in account.list_runners())


def test_once_duplicate_repeats_a_record_on_the_page() -> None:
    account = SimulatedAccount(runners=20)
    account.faults.once("duplicate")
    ids = ids_of(get(account))
    assert len(ids) == 10 and len(set(ids)) == 9


def test_once_lying_total_is_off_by_delta() -> None:
    account = SimulatedAccount(runners=20)
    account.faults.once("lying_total")
    account.faults.once("lying_total", delta=-3)
    assert [r.json()["total"] for r in get_all(account, [{}, {}, {}])] == [21, 17, 20]


def test_once_revoke_token_turns_every_later_request_into_401_until_clear() -> None:
    account = SimulatedAccount(runners=30)
    account.faults.once("revoke_token", page=2)
    walk = get_all(account, [{"page": p} for p in (1, 2, 3, 1)])
    assert [r.status_code for r in walk] == [200, 401, 401, 401]
    assert walk[1].json()["error"] == "unauthorized"
    account.faults.clear()
    assert get(account).status_code == 200


def test_once_faults_wait_for_their_page() -> None:
    account = SimulatedAccount(runners=30)
    account.faults.once("fail", page=3, status=503, headers={"Retry-After": "2"})
    account.faults.once("lying_total", page=2)
    walk = get_all(account, [{"page": p} for p in (1, 2, 3, 3)])
    assert [r.status_code for r in walk] == [200, 200, 503, 200]
    assert [walk[i].json()["total"] for i in (0, 1, 3)] == [30, 31, 30]
    assert walk[2].headers["retry-after"] == "2"
    assert [r.faults for r in account.requests] == [(), ("lying_total",), ("fail",), ()]
    assert account.faults.pending == 0


@pytest.mark.parametrize("kind", ["truncated", "not_json"])
def test_once_malformed_sends_a_200_that_is_not_json(kind: str) -> None:
    account = SimulatedAccount(runners=5)
    account.faults.once("malformed", kind=kind)
    broken, fine = get_all(account, [{}, {}])
    assert broken.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken.content)
    assert fine.json()["total"] == 5


def test_once_drop_breaks_the_response_in_process_too() -> None:
    account = SimulatedAccount(runners=5)
    account.faults.once("drop")
    with pytest.raises(httpx.TransportError):
        get(account)
    assert get(account).status_code == 200
    assert [r.faults for r in account.requests] == [("drop",), ()]


def test_unknown_or_invalid_scripted_faults_are_refused() -> None:
    plan = FaultPlan()
    with pytest.raises(ValueError, match="unknown fault"):
        plan.once("gremlins")
    with pytest.raises(ValueError, match="malformed kind"):
        plan.once("malformed", kind="poetry")
    with pytest.raises(ValueError, match="4xx or 5xx"):
        plan.fail_next(1, status=200)


# -- random faults -----------------------------------------------------------------------------


def test_random_malformed_at_probability_one_breaks_every_body() -> None:
    account = SimulatedAccount(runners=5, faults=FaultPlan(malformed=1.0))
    for response in get_all(account, [{}] * 4):
        assert response.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(response.content)


def test_random_drops_at_probability_one_break_every_response() -> None:
    account = SimulatedAccount(runners=5, faults=FaultPlan(drop_connections=1.0))
    for _ in range(3):
        with pytest.raises(httpx.TransportError):
            get(account)
    assert [r.faults for r in account.requests] == [("drop",)] * 3


def test_rate_limit_answers_429_with_an_integer_retry_after() -> None:
    now = [100.0]
    plan = FaultPlan(rate_limit=2, clock=lambda: now[0])
    account = SimulatedAccount(runners=5, faults=plan)

    burst = get_all(account, [{}] * 3)
    assert [r.status_code for r in burst] == [200, 200, 429]
    assert int(burst[2].headers["retry-after"]) >= 1
    assert burst[2].json()["error"] == "rate_limited"
    now[0] += 1.0
    assert [r.status_code for r in get_all(account, [{}] * 3)] == [200, 200, 429]


def test_latency_adds_time_to_each_request() -> None:
    account = SimulatedAccount(runners=5, faults=FaultPlan(latency_ms=150))
    started = time.perf_counter()
    get_all(account, [{}, {}])
    assert time.perf_counter() - started >= 0.29


def test_churn_changes_the_account_between_requests_deterministically() -> None:
    def churned() -> tuple[list[str], list[str]]:
        account = SimulatedAccount(runners=50, seed=2, faults=FaultPlan(seed=4, churn=2.5))
        before = account.runner_ids()
        assert all(r.status_code == 200 for r in get_all(account, [{}] * 6))
        return before, account.runner_ids()

    before, after = churned()
    assert before != after
    assert churned() == (before, after)


def test_a_seed_replays_the_same_random_fault_sequence() -> None:
    def run(seed: int) -> list[RequestRecord]:
        plan = FaultPlan(seed=seed, fail_rate=0.3, malformed=0.2, churn=0.5)
        account = SimulatedAccount(runners=40, faults=plan)
        get_all(account, [{"page": p % 4 + 1} for p in range(40)])
        return list(account.requests)

    first = run(11)
    assert first == run(11)
    assert first != run(12)
    assert {500, 502, 503} & {r.status for r in first}
    assert any(r.faults == ("malformed",) for r in first)


def test_fault_plans_validate_their_settings_and_parse_cli_values() -> None:
    assert parse_latency("20:5") == (20.0, 5.0)
    assert parse_latency("20") == (20.0, 0.0)
    for bad in ("fast", "-1", "20:x", "nan"):
        with pytest.raises(ValueError):
            parse_latency(bad)
    for settings in ({"fail_rate": 1.5}, {"rate_limit": 0}, {"churn": -1}):
        with pytest.raises(ValueError):
            FaultPlan(**settings)
    plan = FaultPlan.from_flags(seed=3, latency="40:10", fail_rate=0.1)
    assert (plan.seed, plan.latency_ms, plan.latency_jitter_ms, plan.fail_rate) == (3, 40, 10, 0.1)


# -- over a real socket ------------------------------------------------------------------------


def test_a_full_walk_over_a_loopback_socket() -> None:
    account = SimulatedAccount(runners=250)
    with (
        LoopbackServer(account) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
    ):
        assert server.url == f"http://127.0.0.1:{server.port}"
        pages = [client.get("/v1/runner", params={"page": p, "per_page": 100}) for p in (1, 2, 3)]
        unauthorised = client.get("/v1/runner", headers={"Authorization": "Bearer nope"})

    assert [p.status_code for p in pages] == [200, 200, 200]
    assert [r["id"] for p in pages for r in p.json()["runners"]] == account.runner_ids()
    assert unauthorised.status_code == 401


def test_a_dropped_connection_is_a_transport_error_over_a_socket() -> None:
    account = SimulatedAccount(runners=100)
    with (
        LoopbackServer(account) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
    ):
        account.faults.once("drop")
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            client.get("/v1/runner", params={"per_page": 100})
        assert client.get("/v1/runner").status_code == 200


def test_fail_next_with_retry_after_over_a_socket() -> None:
    account = SimulatedAccount(runners=10)
    account.faults.fail_next(1, status=429, headers={"Retry-After": "1"})
    with LoopbackServer(account) as server, httpx.Client(base_url=server.url) as client:
        throttled = client.get("/v1/runner", headers=AUTH)
        ok = client.get("/v1/runner", headers=AUTH)
    assert (throttled.status_code, throttled.headers["retry-after"]) == (429, "1")
    assert ok.status_code == 200


def test_the_loopback_server_stops_cleanly() -> None:
    server = LoopbackServer(SimulatedAccount(runners=1))
    url = server.url
    assert httpx.get(f"{url}/v1/runner", headers=AUTH).status_code == 200
    started = time.perf_counter()
    server.stop()
    assert time.perf_counter() - started < 5
    assert f"comfysync-simulator-{server.port}" not in {t.name for t in threading.enumerate()}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/v1/runner", headers=AUTH)
    server.stop()  # idempotent


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com", "::"])
def test_the_simulator_refuses_to_listen_beyond_loopback(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        LoopbackServer(SimulatedAccount(runners=1), host=host)
    with pytest.raises(ValueError, match="loopback"):
        serve(SimulatedAccount(runners=1), host=host, port=0)


@pytest.mark.parametrize("host", ["LOCALHOST", "Localhost", "127.0.0.2", "::1"])
def test_the_simulator_listens_on_every_host_the_settings_call_loopback(host, run_simulator):
    """One loopback rule: what `sync` trusts as this machine, the simulator may listen on."""
    assert is_loopback_host(host)
    with LoopbackServer(SimulatedAccount(runners=1, token=None), host=host) as server:
        assert httpx.get(f"{server.url}/v1/runner", timeout=10).status_code == 200
    simulator = run_simulator("--host", host, "--token", "")
    assert httpx.get(f"{simulator.url}/v1/runner", timeout=10).status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "example.com", "localhost.example.com", "::"])
def test_the_cli_refuses_every_host_the_settings_do_not_call_loopback(host, run_cli):
    assert not is_loopback_host(host)
    result = run_cli("simulate", "--host", host, "--port", "0")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.startswith("comfysync: error: Invalid value for '--host': ")


# -- scale -------------------------------------------------------------------------------------


def test_100000_runners_generate_quickly_and_pages_stay_cheap() -> None:
    started = time.perf_counter()
    account = SimulatedAccount(runners=100_000)
    assert time.perf_counter() - started < 20  # about 1-2 s; generous for slow CI
    response = get(account, page=1000, per_page=100)
    assert response.json()["total"] == 100_000
    assert ids_of(response) == account.runner_ids()[-100:]


def test_simulate_port_0_announces_the_port_it_got_and_a_busy_port_is_one_line(
    run_simulator, run_cli
) -> None:
    simulator = run_simulator("--runners", "3", "--token", "")
    port = int(simulator.url.rsplit(":", 1)[1])
    assert port > 0
    assert httpx.get(f"{simulator.url}/v1/runner").json()["total"] == 3

    busy = run_cli("simulate", "--port", str(port))
    assert busy.exit_code == 2
    assert busy.stderr == (
        f"comfysync: error: cannot listen on 127.0.0.1:{port} (Address already in use)\n"
    )


def test_simulate_debug_traces_each_request_and_the_faults_it_got(run_simulator) -> None:
    simulator = run_simulator("--runners", "30", "--seed", "3", "--fail-rate", "0.5", "--debug")
    with httpx.Client(base_url=simulator.url, headers=AUTH) as client:
        answered = [client.get("/v1/runner", params={"page": 2}).status_code for _ in range(6)]
    trace = simulator.trace()
    assert [int(line.split(" -> ")[1][:3]) for line in trace] == answered
    assert all(line.startswith("GET /v1/runner page=2 per_page=10 -> ") for line in trace)
    assert any(line.endswith(" [fail_rate]") for line in trace) and 200 in answered


def test_the_listening_socket_disables_nagle_so_keep_alive_responses_are_not_delayed():
    """uvicorn sets no TCP_NODELAY on sockets it is handed; accepted sockets inherit ours."""
    import socket

    from pipeline.sim.simulator import _listening_socket

    sock = _listening_socket("127.0.0.1", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()


def test_simulate_refuses_a_bad_latency_as_a_usage_error(run_cli):
    result = run_cli("simulate", "--latency", "banana")
    assert result.exit_code == 2
    assert "Invalid value for --latency: latency must be MS or MS:JITTER" in result.stderr
