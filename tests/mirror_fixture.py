"""A mirror with known history, made the way users make one: syncs against the simulator.

Sync 1 mirrors 12 runners. Upstream, one runner is created, one renamed, one has its header
secret rotated and one is deleted; sync 2 records exactly those four changes. Sync 3 meets a
permanent 503 and fails, so the run log has a failure too. Everything but the wall-clock
times of the syncs is deterministic (seeded simulator), and those times are read back from
the database so tests can still assert outputs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import rows

from pipeline.errors import UpstreamError
from pipeline.settings import Settings
from pipeline.sim.simulator import LoopbackServer, SimulatedAccount
from pipeline.sync.run import run_sync

RUNNERS = 12
SEED = 5


@dataclass(frozen=True)
class Mirror:
    """The database and what happened to it."""

    path: Path
    #: The simulator's runners at the end (present ones), newest first.
    upstream: list[dict[str, Any]]
    created: dict[str, Any]
    renamed_before: dict[str, Any]
    renamed_after: dict[str, Any]
    rotated_before: dict[str, Any]
    rotated_after: dict[str, Any]
    deleted: dict[str, Any]
    #: sync_runs rows by id: started_at, finished_at.
    runs: dict[int, tuple[str, str]]

    def applied_at(self, sync_id: int) -> str:
        """The one time a sync gives all its versions (their valid_from), checked to fall
        within its run: after it started, no later than it finished."""
        [(at, distinct)] = rows(
            self.path,
            "SELECT min(valid_from), count(DISTINCT valid_from) FROM runner_versions "
            "WHERE sync_id = ?",
            (sync_id,),
        )
        started, finished = self.runs[sync_id]
        assert distinct == 1 and started <= at <= finished
        return str(at)

    def stored(self, runner_id: str, column: str, version: int) -> str:
        [(value,)] = rows(
            self.path,
            f"SELECT {column} FROM runner_versions WHERE runner_id = ? AND version = ?",
            (runner_id, version),
        )
        return str(value)


def build_mirror(path: Path) -> Mirror:
    account = SimulatedAccount(runners=RUNNERS, seed=SEED, token="test-token")
    with LoopbackServer(account) as server:
        settings = Settings(
            base_url=server.url,
            token=account.token,
            db_path=path,
            max_retries=0,
            retry_wait_initial=0.01,
        )
        run_sync(settings)
        ids = account.runner_ids()
        renamed_before = account.get_runner(ids[3])
        rotated_before = account.get_runner(ids[7])
        deleted = account.get_runner(ids[10])
        created = account.create_runner(name="fixture-new-runner")
        renamed_after = account.rename_runner(ids[3], "renamed-runner")
        rotated_after = account.rotate_header(ids[7], "Authorization", "Bearer rotated-secret")
        account.delete_runner(ids[10])
        run_sync(settings)
        account.faults.fail_always(503)
        with pytest.raises(UpstreamError):
            run_sync(settings)
        upstream = account.list_runners()
    runs = {
        row[0]: (row[1], row[2])
        for row in rows(path, "SELECT id, started_at, finished_at FROM sync_runs")
    }
    return Mirror(
        path=path,
        upstream=upstream,
        created=created,
        renamed_before=renamed_before,
        renamed_after=renamed_after,
        rotated_before=rotated_before,
        rotated_after=rotated_after,
        deleted=deleted,
        runs=runs,
    )
