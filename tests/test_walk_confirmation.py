"""A deletion needs a complete walk and a re-read that proves the runner gone: the hole
the re-read closes, and what happens when it cannot prove anything.

A runner restored in the middle of the list (under its old ``created_at``) at the moment
another runner on an already-read page is deleted leaves the total, the head of page 1 and the
id count all unchanged, while the runner at the next page boundary slides onto the page just
read: one walk misses it and proves itself complete anyway. Found by reasoning about the
walk's proof; `MirrorMachine` (test_properties.py) flags it when it is replayed here.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import httpx
import test_properties
from conftest import rows
from test_properties import MirrorMachine

from pipeline.settings import Settings
from pipeline.sim.simulator import SimulatedAccount, create_app
from pipeline.sync.run import run_sync


def test_a_burst_that_slides_a_runner_across_a_page_boundary_cannot_get_it_deleted(
    monkeypatch,
):
    monkeypatch.setattr(test_properties, "event", lambda *args: None)  # outside hypothesis
    machine = MirrorMachine()
    try:
        machine.start(runners=30, seed=1, per_page=10, concurrency=1, max_walks=3)
        machine.sync(allow_mass_delete=True)
        machine.mutate("delete", 25)  # goes to the graveyard, to come back at its old place
        machine.sync(allow_mass_delete=True)
        boundary_runner = machine.account.runner_ids()[20]  # first of page 3
        # Just before page 3 is read: a runner on page 2 goes, the old one comes back on page 3.
        machine.change_upstream_during_next_sync(
            at_request=3, burst=[("delete", 15), ("recreate", 0)]
        )
        machine.sync(allow_mass_delete=False)  # asserts: no false deletion, history replays
        machine.versions_replay_to_the_current_rows()
        [(change, sync_id)] = rows(
            machine.db_path,
            "SELECT change, max(sync_id) FROM runner_versions WHERE runner_id = ?",
            (boundary_runner,),
        )
        assert (change, sync_id) == ("created", 1)
        [(walks, deleted, restored, status)] = rows(
            machine.db_path, "SELECT walks, deleted, restored, status FROM sync_runs WHERE id = 3"
        )
        # The boundary runner, missed by the walk, is found by the re-read of its page: kept,
        # and the sync says so (partial). The runner deleted in the burst was seen by the walk.
        assert (walks, deleted, restored, status) == (1, 0, 1, "partial")
        machine.sync(allow_mass_delete=False)
        assert rows(machine.db_path, "SELECT deleted, status FROM sync_runs WHERE id = 4") == [
            (1, "success")
        ]
    finally:
        machine.teardown()


def test_a_missing_runner_whose_page_moved_too_far_to_bracket_it_waits(tmp_path: Path):
    account = SimulatedAccount(runners=12, seed=4, token="t")
    transport = httpx.ASGITransport(app=create_app(account))
    settings = Settings(
        base_url="http://127.0.0.1", token="t", db_path=tmp_path / "m.db", per_page=5
    )
    run_sync(settings, transport=transport)
    gone = account.runner_ids()[7]
    account.delete_runner(gone)
    requests = itertools.count(1)

    def flood_the_head_before_the_re_read(page: int, per_page: int) -> None:
        if next(requests) == 5:  # walk: 3 pages + the closing re-read; then its re-read
            for number in range(120):
                account.create_runner(name=f"burst-{number}")

    account.before_page.append(flood_the_head_before_the_re_read)
    summary = run_sync(settings, transport=transport)

    # Its re-read page now holds only runners newer than it: nothing proves it gone.
    assert (summary.status, summary.walks, summary.complete, summary.deleted) == (
        "partial", 1, True, 0,
    )  # fmt: skip
    assert summary.warnings == (
        "1 runner(s) missing from the walk were NOT marked deleted because a re-read of "
        "their pages did not prove them gone (the next sync decides)",
    )
    assert rows(
        settings.db_path, "SELECT deleted_at IS NULL FROM runners WHERE id = ?", (gone,)
    ) == [(1,)]
    account.before_page.clear()
    again = run_sync(settings, transport=transport)
    assert (again.status, again.deleted, again.created) == ("success", 1, 120)
    assert rows(
        settings.db_path, "SELECT deleted_at IS NULL FROM runners WHERE id = ?", (gone,)
    ) == [(0,)]
