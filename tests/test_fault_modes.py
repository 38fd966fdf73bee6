"""Each simulator fault mode, end to end: a real sync over a real loopback socket.

The random modes run in a `comfysync simulate` process, with its flags as a user types them;
the one-off faults, which have no flag, are scripted with `FaultPlan.once` on a
`LoopbackServer`. The syncs are `run_sync`, the function behind `comfysync sync`, in this
process with short retry waits (the CLI's own error-to-exit mapping is tested in
test_cli_sync.py; the exit code here is the one the raised error carries). Every row asserts
three things: the fault really fired (the simulator's `--debug` trace or request log names it),
the outcome (exit code and run status), and what was applied. Syncs use concurrency 1, so the
request sequence, and with it every seeded fault, is the same on every run: the figures below
are exact, not ranges (the one exception is `--rate-limit`, which answers by the wall clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SimulatorProcess, rows, spawn_simulator

from pipeline.errors import ComfySyncError
from pipeline.settings import Settings
from pipeline.sync.run import run_sync

RUNNERS = 120
PER_PAGE = 20


def sync_settings(base_url: str, token: str | None, db: Path, **options: object) -> Settings:
    defaults: dict[str, object] = {
        "per_page": PER_PAGE,
        "concurrency": 1,
        "max_retries": 3,
        "retry_wait_initial": 0.01,
        "retry_wait_max": 0.05,
    }
    return Settings(base_url=base_url, token=token, db_path=db, **(defaults | options))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Outcome:
    """What one sync produced: exit code, run status, walks, and what landed in the store."""

    exit_code: int
    status: str
    walks: int
    created: int
    updated: int
    deleted: int
    rejected: int
    present: int


def run_and_record(settings: Settings) -> tuple[Outcome, str]:
    """Sync; return the outcome as the run log and runners table record it, and the error."""
    exit_code, error = 0, ""
    try:
        run_sync(settings)
    except ComfySyncError as exc:
        exit_code, error = exc.exit_code, exc.message
    [run] = rows(
        settings.db_path,
        "SELECT status, coalesce(walks, 0), coalesce(created, 0), coalesce(updated, 0), "
        "coalesce(deleted, 0), coalesce(rejected, 0) FROM sync_runs ORDER BY id DESC LIMIT 1",
    )
    [(present,)] = rows(settings.db_path, "SELECT count(*) FROM runners WHERE deleted_at IS NULL")
    status, *counts = run
    return Outcome(exit_code, str(status), *(int(str(n)) for n in (*counts, present))), error


# -- random faults: `comfysync simulate` flags ----------------------------------------------------

#: mode -> (simulate flags, what the simulator's trace shows when the fault fired, outcome).
RANDOM_FAULT_MODES: dict[str, tuple[tuple[str, ...], str, Outcome]] = {
    "--fail-rate 0.3": (("--fail-rate", "0.3"), "[fail_rate]", Outcome(0, "success", 1, 120, 0, 0, 0, 120)),
    "--fail-rate 1": (("--fail-rate", "1"), "[fail_rate]", Outcome(4, "failed", 0, 0, 0, 0, 0, 0)),
    "--rate-limit 2": (("--rate-limit", "2"), "429 [rate_limit]", Outcome(0, "success", 1, 120, 0, 0, 0, 120)),
    "--latency 30:20": (("--latency", "30:20"), " delay ", Outcome(0, "success", 1, 120, 0, 0, 0, 120)),
    "--drop-connections 0.3": (("--drop-connections", "0.3"), "[drop]", Outcome(0, "success", 1, 120, 0, 0, 0, 120)),
    "--drop-connections 1": (("--drop-connections", "1"), "[drop]", Outcome(4, "failed", 0, 0, 0, 0, 0, 0)),
    "--malformed 0.3": (("--malformed", "0.3"), "[malformed]", Outcome(0, "success", 1, 120, 0, 0, 0, 120)),
    "--malformed 1": (("--malformed", "1"), "[malformed]", Outcome(4, "failed", 0, 0, 0, 0, 0, 0)),
    "--churn 1.5": (("--churn", "1.5"), " churn ", Outcome(0, "partial", 3, 121, 0, 0, 0, 121)),
}  # fmt: skip
#: Every random mode at once, twice with one seed and once with another: the replay check.
ALL_RANDOM = (
    "--fail-rate", "0.2", "--drop-connections", "0.15", "--malformed", "0.15",
    "--churn", "0.5", "--latency", "2:2",
)  # fmt: skip
REPLAYS = {"seed 4": "4", "seed 4 again": "4", "seed 1": "1"}


@dataclass
class FlagRun:
    simulator: SimulatorProcess
    outcome: Outcome
    error: str
    db: Path


@pytest.fixture(scope="module")
def flag_runs(tmp_path_factory: pytest.TempPathFactory):
    """Every flag row: a simulate process of its own (all started at once), then its sync."""
    plans = {name: ("5", flags, 3) for name, (flags, _, _) in RANDOM_FAULT_MODES.items()}
    plans |= {name: (seed, ALL_RANDOM, 6) for name, seed in REPLAYS.items()}
    folders = {name: tmp_path_factory.mktemp("flags") for name in plans}
    simulators = {
        name: spawn_simulator(
            folders[name], "--runners", str(RUNNERS), "--seed", seed, "--debug", *flags
        )
        for name, (seed, flags, _) in plans.items()
    }
    try:
        runs = {}
        for name, simulator in simulators.items():
            db = folders[name] / "m.db"
            settings = sync_settings(
                simulator.wait_until_listening(), "demo-token", db, max_retries=plans[name][2]
            )
            outcome, error = run_and_record(settings)
            runs[name] = FlagRun(simulator, outcome, error, db)
        yield runs
    finally:
        for simulator in simulators.values():
            simulator.stop()


@pytest.mark.parametrize("mode", RANDOM_FAULT_MODES)
def test_a_random_fault_mode_through_a_real_sync(mode: str, flag_runs) -> None:
    _, evidence, expected = RANDOM_FAULT_MODES[mode]
    run = flag_runs[mode]
    trace = run.simulator.trace()
    assert any(evidence in line for line in trace), trace
    assert run.outcome == expected, run.error
    if expected.exit_code:
        assert run.error.startswith("ComfyControl failed on page 1 after 4 attempts (")
        assert run.error.endswith("); nothing was applied, try again later")
    if expected.status == "partial":
        [(warnings,)] = rows(run.db, "SELECT warnings FROM sync_runs")
        assert "no complete walk in 3 attempt(s)" in str(warnings)


def test_a_seed_replays_the_same_faults_and_the_same_sync(flag_runs) -> None:
    first, again, other = (flag_runs[name] for name in REPLAYS)
    faults = " ".join(first.simulator.trace())
    for fault in ("[fail_rate]", "[drop]", "[malformed]", " churn ", " delay "):
        assert fault in faults  # the replay covers every random mode
    assert first.simulator.trace() == again.simulator.trace()
    assert other.simulator.trace() != first.simulator.trace()

    def mirror(run: FlagRun) -> list[tuple[object, ...]]:
        return rows(
            run.db,
            "SELECT id, name, status, updated_at, deleted_at IS NULL, version FROM runners "
            "ORDER BY id",
        )

    assert (first.outcome, first.error) == (again.outcome, again.error)
    assert mirror(first) == mirror(again)
    assert mirror(other) != mirror(first)


# -- one-off faults: scripted on the in-process API -----------------------------------------------

#: fault -> (FaultPlan.once calls, the fault name in the request log, outcome). The account has
#: 120 runners mirrored; then one is created, one renamed and one deleted upstream, so a
#: runner deleted is looked for once more (a re-read of its page) before it is deleted.
ONE_OFF_FAULTS: dict[str, tuple[tuple[tuple[str, dict[str, object]], ...], str, Outcome]] = {
    "a page with the wrong shape": ((("wrong_shape", {"page": 2}),), "wrong_shape", Outcome(4, "failed", 0, 0, 0, 0, 0, 120)),
    "a record missing id, once": ((("missing_id", {"page": 3}),), "missing_id", Outcome(0, "success", 2, 1, 1, 1, 0, 120)),
    "a record missing id, every walk": ((("missing_id", {"page": 3}),) * 3, "missing_id", Outcome(0, "partial", 3, 1, 1, 0, 1, 121)),
    "a record with tags not a list (no deletion on that walk)": ((("bad_tags", {"page": 2}),), "bad_tags", Outcome(0, "partial", 1, 1, 1, 0, 1, 121)),
    "a duplicated record": ((("duplicate", {"page": 2}),), "duplicate", Outcome(0, "success", 2, 1, 1, 1, 0, 120)),
    "a total that lies": ((("lying_total", {"page": 4}),), "lying_total", Outcome(0, "success", 2, 1, 1, 1, 0, 120)),
    "a 401 that starts mid-walk": ((("revoke_token", {"page": 3}),), "revoke_token", Outcome(3, "failed", 0, 0, 0, 0, 0, 120)),
    "a 503 with Retry-After: 1": ((("fail", {"page": 2, "status": 503, "headers": {"Retry-After": "1"}}),), "fail", Outcome(0, "success", 1, 1, 1, 1, 0, 120)),
}  # fmt: skip


@pytest.mark.parametrize("fault", ONE_OFF_FAULTS)
def test_a_one_off_fault_through_a_real_sync(fault: str, serve_account, db_path) -> None:
    calls, logged, expected = ONE_OFF_FAULTS[fault]
    upstream = serve_account(runners=RUNNERS, seed=5)
    account = upstream.account
    settings = sync_settings(upstream.url, account.token, db_path)
    run_sync(settings)
    ids = account.runner_ids()
    account.create_runner()
    account.rename_runner(ids[30], "renamed upstream")
    account.delete_runner(ids[70])
    account.requests.clear()
    for name, options in calls:
        account.faults.once(name, **options)

    outcome, error = run_and_record(settings)

    assert account.faults.pending == 0
    assert logged in {f for request in account.requests for f in request.faults}
    assert outcome == expected, error
    if expected.exit_code == 4:
        assert error.endswith("nothing was applied")
    if expected.exit_code == 3:
        assert error.startswith("ComfyControl answered 401 on page 3: the token was rejected")
    if expected.status == "partial":
        [(warnings,)] = rows(db_path, "SELECT warnings FROM sync_runs ORDER BY id DESC LIMIT 1")
        assert "could not be stored (see rejected_records)" in str(warnings)
        assert "were NOT marked deleted" in str(warnings)
