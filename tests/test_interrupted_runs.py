"""A sync killed mid-walk shows as `interrupted`, not `running`, in `status` and `runs` (issue 13).

The run-log row of a killed sync stays `running` until the next sync marks it `failed`. The
read commands never write, so they tell it apart from a live sync by the sync lock: only the
newest run can be live, and only while a sync holds `<db>.lock`.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import wait_until

from pipeline.read.overview import SyncRun, as_seen_now
from pipeline.store.schema import ABANDONED_RUN_ERROR

SLOW_SYNC = ("--per-page", "10", "--concurrency", "1", "--no-export")


@pytest.fixture
def walking_sync(serve_account, start_cli):
    """A sync of m.db that is walking a slow account (one page at a time), and the account."""
    upstream = serve_account(runners=400, seed=41)
    upstream.account.faults.latency_ms = 300
    sync = start_cli(
        "sync", "--base-url", upstream.url, "--db", "m.db", *SLOW_SYNC,
        env={"COMFYCONTROL_TOKEN": "test-token"},
    )  # fmt: skip
    wait_until(lambda: len(upstream.account.requests) >= 2)  # it holds the lock and walks
    return sync


def read(run_cli, *args: str):
    result = run_cli(*args, "--db", "m.db")
    assert (result.exit_code, result.stderr) == (0, ""), result.stderr
    return result.stdout


def test_a_killed_sync_is_shown_interrupted_by_status_and_runs(walking_sync, run_cli, tmp_path):
    os.kill(walking_sync.pid, signal.SIGKILL)
    walking_sync.wait(timeout=10)
    db = tmp_path / "m.db"
    stored = db.read_bytes()

    status = json.loads(read(run_cli, "status", "--json"))
    assert (status["last_sync"]["id"], status["last_sync"]["status"]) == (1, "interrupted")
    assert status["last_sync"]["error"] == ABANDONED_RUN_ERROR
    text = " ".join(read(run_cli, "status").split())  # unwrapped
    assert "last sync: #1 interrupted" in text and f"error: {ABANDONED_RUN_ERROR}" in text

    [run] = json.loads(read(run_cli, "runs", "--json"))
    assert (run["id"], run["status"], run["error"]) == (1, "interrupted", ABANDONED_RUN_ERROR)
    table = read(run_cli, "runs").splitlines()
    started = run["started_at"][:19].replace("T", " ")
    # Aligned with the header: the longer status takes the room of the seconds it lacks.
    assert table[0].index("secs") + 3 == table[1].index(" -") + 1
    assert table[1] == f"    1  {started}  interrupted  -       -     -     -     -    -    -"
    assert [
        r["id"] for r in json.loads(read(run_cli, "runs", "--status", "interrupted", "--json"))
    ] == [1]
    assert json.loads(read(run_cli, "runs", "--status", "running", "--json")) == []
    # Read-only: the database file and the lock file are as the killed sync left them.
    assert db.read_bytes() == stored
    assert json.loads(Path(f"{db}.lock").read_text())["pid"] == walking_sync.pid


def test_a_sync_that_is_walking_is_shown_running(walking_sync, run_cli):
    status = json.loads(read(run_cli, "status", "--json"))
    assert (status["last_sync"]["status"], status["last_sync"]["error"]) == ("running", None)
    assert "#1 running" in read(run_cli, "status")
    [run] = json.loads(read(run_cli, "runs", "--status", "running", "--json"))
    assert run["id"] == 1
    assert json.loads(read(run_cli, "runs", "--status", "interrupted", "--json")) == []
    assert walking_sync.poll() is None  # the probes did not disturb it
    walking_sync.kill()


def run_row(run_id: int, status: str) -> SyncRun:
    return SyncRun(
        id=run_id, started_at="2026-12-01T00:00:00Z", finished_at=None, seconds=None,
        status=status, base_url=None, complete=None, pages=None, walks=None,
        total_reported=None, runners_seen=None, created=None, updated=None, deleted=None,
        restored=None, unchanged=None, rejected=None, warnings=(), error=None,
    )  # fmt: skip


@pytest.mark.parametrize("sync_live", [True, False])
def test_only_the_newest_run_can_be_running(sync_live):
    runs = [run_row(3, "running"), run_row(2, "success"), run_row(1, "running")]
    shown = [as_seen_now(run, newest_id=3, sync_live=sync_live) for run in runs]
    interrupted = replace(runs[2], status="interrupted", error=ABANDONED_RUN_ERROR)
    newest = (
        runs[0] if sync_live else replace(runs[0], status="interrupted", error=ABANDONED_RUN_ERROR)
    )
    assert shown == [newest, runs[1], interrupted]
