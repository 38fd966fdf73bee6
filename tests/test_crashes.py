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
* the snapshot folder (the previous sync's files were there, and the sync prunes to the
  newest) holds, under every final name, a complete file: each Parquet file reads with
  pyarrow and each CSV file with pandas, with exactly the rows of the fleet its sync left;
  anything else is a hidden temporary file of the layout, which the next sync sweeps once
  it is stale (the test ages them by an hour: a fresh one may be another writer's);
* the next sync completes, leaves the state after and a complete snapshot, and no
  temporary file.

Fifteen trials run by default (five in the walk, five inside the apply transaction, two just
after it committed, three while the snapshot files are written, with SQLite slowed while
the fleet is read so a kill lands inside a file); `pytest -m slow tests/test_crashes.py`
runs 45 more. Adding a phase is one line in PHASES.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import REPO, check_history, cli_environment, dump_except_run_log, rows

from pipeline.outputs.snapshot import STALE_TEMPORARY_SECONDS
from pipeline.settings import Settings
from pipeline.sim.simulator import LoopbackServer, SimulatedAccount
from pipeline.source.records import TRACKED_FIELDS
from pipeline.sync.run import run_sync

HARNESS = REPO / "tests" / "crash_harness.py"
#: The snapshot layout's final file names, and the hidden temporary files they are written as.
FINAL_NAME = re.compile(r"runners-(\d+)\.(parquet|csv)")
TEMPORARY_NAME = re.compile(r"\.runners-\d+\.(parquet|csv)\.[0-9a-f]{8}\.tmp")


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
    #: {exports} is the snapshot folder; the previous sync's files are in it.
    command: tuple[str, ...] = ("sync", "--base-url", "{url}", "--token", "t", "--db", "{db}", "--export-dir", "{exports}", "--keep-snapshots", "1")  # fmt: skip
    #: ``always``: every file written from the store; ``changed``: patched from the last.
    snapshot: str = "changed"
    trials: int = 5  # in the default suite; -m slow adds three times as many


#: Smaller read batches and row groups, so each snapshot file grows step by step.
SMALL_BATCHES = ("--set", "pipeline.read.history:BATCH_ROWS=50", "--set", "pipeline.outputs.export:ROW_GROUP_ROWS=200")  # fmt: skip
PHASES = {
    "walk": Phase("pipeline.sync.run:walk_all_pages", latency_ms=40),
    "apply": Phase("pipeline.store.write:apply_changes", ("--slow-sqlite",)),
    "after-apply": Phase("pipeline.store.write:apply_changes", ("--pause-after", "1"), "after", aim_after=True, trials=2),
    "export": Phase("pipeline.outputs.series:export_snapshots", ("--slow-sqlite-in", "pipeline.read.history:json_lines", *SMALL_BATCHES), "after", trials=3, snapshot="always"),
    "patch": Phase("pipeline.outputs.series:export_snapshots", ("--sleep-in", "pipeline.outputs.export:_batches=0.05", *SMALL_BATCHES), "after", trials=3),
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


def start_harness(phase: str, db: Path, url: str, exports: Path) -> HarnessRun:
    spec = PHASES[phase]
    command = [part.format(url=url, db=db, exports=exports) for part in spec.command]
    command += ["--snapshot", spec.snapshot]
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
    before_exports: Path  # the snapshot folder as the sync before left it
    fleet_rows: dict[int, int]  # the rows of each sync's snapshot, by sync id
    after_state: dict[str, list[tuple[object, ...]]]
    seconds: dict[str, float]  # how long each phase lasted when not killed


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("crash")
    account = SimulatedAccount(runners=600, seed=9, token="t")
    with LoopbackServer(account) as server:
        before, before_exports = folder / "before.db", folder / "before-exports"
        run_sync(
            Settings(base_url=server.url, token="t", db_path=before, export_dir=before_exports)
        )
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
            shutil.copy(f"{before}.key", f"{reference}.key")  # a copy syncs with its key
            run = start_harness(phase, reference, server.url, folder / f"exports-{phase}")
            assert run.process.wait(timeout=120) == 0, run.stderr()
            ends = run.stderr().split(f"crash-harness: {phase} ends after ", 1)[1]
            seconds[phase] = float(ends.split()[0])
            after_states.append(mirror_state(reference))
        assert all(state == after_states[0] for state in after_states)
        present = sum(row[-3] for row in after_states[0]["runners"])  # deleted_at IS NULL
        yield Stores(
            server, before, dump_except_run_log(before), before_exports,
            {1: 600, 2: present, 3: present}, after_states[0], seconds,
        )  # fmt: skip


def trial_params() -> list[object]:
    """Seeds 0..trials-1 of each phase by default, the next 3 x trials behind `slow`."""
    params = []
    for phase, spec in PHASES.items():
        for seed in range(4 * spec.trials):
            marks = pytest.mark.slow if seed >= spec.trials else ()
            params.append(pytest.param(phase, seed, id=f"{phase}-{seed}", marks=marks))
    return params


def kill_delay(phase: str, seed: int, lasts: float) -> float:
    """Seconds into a phase that lasts ``lasts`` to kill at: 2% to 80% of it, drawn from the
    seed; the default trials each from their own equal slice of that, so they spread out."""
    trials = PHASES[phase].trials
    draw = random.Random(f"{phase}-{seed}").random()
    fraction = (seed + draw) / trials if seed < trials else draw
    return (0.02 + 0.78 * fraction) * lasts


def check_snapshot_folder(exports: Path, fleet_rows: dict[int, int]) -> list[Path]:
    """Every file under a final name is complete; return the temporary files left beside them."""
    temporaries = []
    for path in sorted(p for p in exports.rglob("*") if not p.is_dir()):
        if TEMPORARY_NAME.fullmatch(path.name):
            temporaries.append(path)
            continue
        final = FINAL_NAME.fullmatch(path.name)
        assert final, f"neither a snapshot nor a temporary file: {path}"
        if final.group(2) == "parquet":
            count = pq.read_table(path).num_rows
        else:
            count = len(pd.read_csv(path))
        assert count == fleet_rows[int(final.group(1))], f"{path} is incomplete"
    return temporaries


@pytest.mark.parametrize(("phase", "seed"), trial_params())
def test_a_sync_killed_at_a_random_moment_leaves_the_store_before_or_after(
    phase: str, seed: int, stores: Stores, tmp_path: Path
) -> None:
    spec = PHASES[phase]
    stores.server.account.faults.latency_ms = spec.latency_ms
    db, exports = tmp_path / "trial.db", tmp_path / "exports"
    shutil.copy(stores.before, db)
    shutil.copy(f"{stores.before}.key", f"{db}.key")
    shutil.copytree(stores.before_exports, exports)
    delay = kill_delay(phase, seed, 1.0 if spec.aim_after else stores.seconds[phase])

    run = start_harness(phase, db, stores.server.url, exports)
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
    an_hour_ago = time.time() - STALE_TEMPORARY_SECONDS - 60
    for temporary in check_snapshot_folder(exports, stores.fleet_rows):
        os.utime(temporary, (an_hour_ago, an_hour_ago))

    summary = run_sync(
        Settings(
            base_url=stores.server.url, token="t", db_path=db, export_dir=exports, keep_snapshots=1
        )
    )
    assert summary.status == "success"
    assert mirror_state(db) == stores.after_state
    check_history(db)
    assert check_snapshot_folder(exports, stores.fleet_rows) == []
    assert sorted(p.name for p in exports.rglob("runners-*")) == [
        "runners-3.csv",
        "runners-3.parquet",
    ]
