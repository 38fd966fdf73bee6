"""A deletion needs a complete walk and a re-read that proves the runner gone: what happens
when the re-read cannot prove anything.

The hole the re-read closes (a runner sliding across a page boundary while the totals stay
unchanged) is replayed on `MirrorMachine` in test_properties.py, where the machine lives.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import httpx
from conftest import rows

from pipeline.settings import Settings
from pipeline.sim.simulator import SimulatedAccount, create_app
from pipeline.sync.run import run_sync


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
