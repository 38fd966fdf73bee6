"""A sync SIGKILLed at seeded random moments never leaves a half-applied or damaged store.

Each trial copies one store (600 runners mirrored, then 400 created, 100 renamed and 20
deleted upstream), starts a real `comfysync sync` process on it through
tests/crash_harness.py (the unmodified CLI, with a line on stderr when the phase begins and,
for the apply transaction, SQLite slowed so the transaction lasts about a second), waits for
the phase to begin, sleeps a delay drawn from the trial's seed, and sends SIGKILL. Then:

* `PRAGMA integrity_check` is `ok`;
* the store equals the state before that sync (byte for byte, every table but the run log)
  or the state after it (what a sync left that ran to the end, times and run ids aside),
  never a mix; and the run log agrees (`running` before, `success` after);
* the next sync completes and leaves the state after.

Twelve trials run by default (five in the walk, five inside the apply transaction, two just
after it committed); `pytest -m slow tests/test_crashes.py` runs 36 more. Adding a phase
(export, once it exists) is one line in PHASES.
"""

from __future__ import annotations

import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, cli_environment, dump_except_run_log, rows
from test_properties import check_history

from pipeline.records import TRACKED_FIELDS
from pipeline.settings import Settings
from pipeline.simulator import LoopbackServer, SimulatedAccount
from pipeline.sync import run_sync

HARNESS = REPO / "tests" / "crash_harness.py"


@dataclass(frozen=True)
class Phase:
    """Where to aim: the function whose run is the phase, how to make it last, what it leaves.

    The kill comes a seeded delay after the harness's ``begins`` line (or, with
    ``aim_after``, after its ``ends`` line, inside a pause the harness adds there).
    ``leaves`` is the state a kill there must leave: "before" the sync (nothing committed
    yet) or "after" it (the one transaction committed).
    """

    target: str  # module:function, where the CLI looks it up
    harness_flags: tuple[str, ...] = ()
    leaves: str = "before"
    latency_ms: float = 0.0  # the simulator's, so the walk lasts long enough to be hit
    aim_after: bool = False
    command: tuple[str, ...] = ("sync", "--base-url", "{url}", "--token", "t", "--db", "{db}")
    trials: int = 5  # in the default suite; -m slow adds three times as many


PHASES = {
    "walk": Phase("pipeline.sync:walk_all_pages", latency_ms=40),
    "apply": Phase("pipeline.store:apply_changes", ("--slow-sqlite",)),
    "after-apply": Phase("pipeline.store:apply_changes", ("--pause-after", "1"), "after", aim_after=True, trials=2),
}  # fmt: skip


def mirror_state(db: Path) -> dict[str, list[tuple[object, ...]]]:
    """The store without times and run ids: what the syncs decided, not when."""
    fields = ", ".join(TRACKED_FIELDS)
    return {
        "runners": rows(
            db,
            f"SELECT id, {fields}, deleted_at IS NULL, version, content_hash FROM runners "
            "ORDER BY id",
        ),
        "runner_versions": rows(
            db,
            f"SELECT runner_id, version, change, changed_fields, {fields}, content_hash, "
            "valid_to IS NULL FROM runner_versions ORDER BY runner_id, version",
        ),
        "rejected_records": rows(
            db, "SELECT page, position, runner_id, reason, raw_json FROM rejected_records"
        ),
        "account_owners": rows(db, "SELECT user_id FROM account_owners ORDER BY user_id"),
        "comfysync_meta": rows(db, "SELECT key, value FROM comfysync_meta ORDER BY key"),
    }


@dataclass
class HarnessRun:
    process: subprocess.Popen[bytes]
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for(self, line: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.stderr():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"never saw {line!r}: {self.stderr()}")
            time.sleep(0.002)


def start_harness(phase: str, db: Path, url: str) -> HarnessRun:
    spec = PHASES[phase]
    command = [part.format(url=url, db=db) for part in spec.command]
    stderr_path = db.with_suffix(".stderr")
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(HARNESS), "--phase", phase, "--target", spec.target,
             *spec.harness_flags, "--", *command],
            cwd=db.parent, env=cli_environment(), stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    return HarnessRun(process, stderr_path)


@dataclass
class Stores:
    """The upstream, the store before the sync under test, and what it looks like after."""

    server: LoopbackServer
    before: Path
    before_dump: list[str]
    after_state: dict[str, list[tuple[object, ...]]]
    seconds: dict[str, float]  # how long each phase lasted when not killed


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("crash")
    account = SimulatedAccount(runners=600, seed=9, token="t")
    with LoopbackServer(account) as server:
        before = folder / "before.db"
        run_sync(Settings(base_url=server.url, token="t", db_path=before))
        ids = account.runner_ids()
        for _ in range(400):
            account.create_runner()
        for runner_id in ids[:100]:
            account.rename_runner(runner_id, f"renamed {runner_id[:8]}")
        for runner_id in ids[200:220]:
            account.delete_runner(runner_id)
        conn = sqlite3.connect(before)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

        seconds, after_states = {}, []
        for phase, spec in PHASES.items():  # one uninterrupted run each: the time to aim at
            if spec.aim_after:
                continue
            account.faults.latency_ms = spec.latency_ms
            reference = folder / f"reference-{phase}.db"
            shutil.copy(before, reference)
            run = start_harness(phase, reference, server.url)
            assert run.process.wait(timeout=120) == 0, run.stderr()
            ends = run.stderr().split(f"crash-harness: {phase} ends after ", 1)[1]
            seconds[phase] = float(ends.split()[0])
            after_states.append(mirror_state(reference))
        assert all(state == after_states[0] for state in after_states)
        yield Stores(server, before, dump_except_run_log(before), after_states[0], seconds)


def trial_params() -> list[object]:
    """Seeds 0..trials-1 of each phase by default, the next 3 x trials behind `slow`."""
    params = []
    for phase, spec in PHASES.items():
        for seed in range(4 * spec.trials):
            marks = pytest.mark.slow if seed >= spec.trials else ()
            params.append(pytest.param(phase, seed, id=f"{phase}-{seed}", marks=marks))
    return params


@pytest.mark.parametrize(("phase", "seed"), trial_params())
def test_a_sync_killed_at_a_random_moment_leaves_the_store_before_or_after(
    phase: str, seed: int, stores: Stores, tmp_path: Path
) -> None:
    spec = PHASES[phase]
    stores.server.account.faults.latency_ms = spec.latency_ms
    db = tmp_path / "trial.db"
    shutil.copy(stores.before, db)
    lasts = 1.0 if spec.aim_after else stores.seconds[phase]
    delay = random.Random(f"{phase}-{seed}").uniform(0.02, 0.8) * lasts

    run = start_harness(phase, db, stores.server.url)
    run.wait_for(f"crash-harness: {phase} {'ends' if spec.aim_after else 'begins'}")
    time.sleep(delay)
    run.process.send_signal(signal.SIGKILL)
    assert run.process.wait(timeout=30) == -signal.SIGKILL
    if not spec.aim_after:
        assert f"{phase} ends" not in run.stderr(), f"the kill after {delay:.3f} s missed it"

    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    [(status,)] = rows(db, "SELECT status FROM sync_runs ORDER BY id DESC LIMIT 1")
    if dump_except_run_log(db) == stores.before_dump:
        assert status == "running"  # the process died before its one transaction committed
        assert spec.leaves == "before"
    else:
        assert mirror_state(db) == stores.after_state, "the store is neither before nor after"
        assert status == "success"  # the run log committed with the changes, not apart
        assert spec.leaves == "after"
    check_history(db)

    summary = run_sync(Settings(base_url=stores.server.url, token="t", db_path=db))
    assert summary.status == "success"
    assert mirror_state(db) == stores.after_state
    check_history(db)
