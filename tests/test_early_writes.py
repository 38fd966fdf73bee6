"""New runners are written while the walk goes on (EarlyCreations), inside the sync's one
transaction: what the final picture does not keep as written is taken back, and a sync that
fails after writing some leaves nothing behind. The store module owns the writer thread and
the connection's handover; the sync only adds, finishes once, or abandons."""

from __future__ import annotations

import itertools
from pathlib import Path

import httpx
import pytest
from conftest import rows

from pipeline.errors import AuthenticationError, StorageError
from pipeline.settings import Settings
from pipeline.sim.simulator import SimulatedAccount, create_app
from pipeline.source.records import RunnerRecord
from pipeline.store.early import EarlyCreations
from pipeline.store.schema import open_store
from pipeline.store.write import begin_run
from pipeline.sync.run import run_sync


def synced(tmp_path: Path, runners: int = 12) -> tuple[SimulatedAccount, Settings, object]:
    account = SimulatedAccount(runners=runners, seed=7, token="t")
    transport = httpx.ASGITransport(app=create_app(account))
    settings = Settings(
        base_url="http://127.0.0.1", token="t", db_path=tmp_path / "m.db", per_page=5
    )
    run_sync(settings, transport=transport)
    return account, settings, transport


def during_first_walk(account: SimulatedAccount, change) -> None:
    requests = itertools.count(1)

    def hook(page: int, per_page: int) -> None:
        if next(requests) == 2:  # page 1 of the first walk is read: the new runner with it
            change()

    account.before_page.append(hook)


def search(db_path: Path, words: str) -> list[tuple[str]]:
    return rows(
        db_path,
        "SELECT r.id FROM runners_fts JOIN runners AS r ON r.rowid = runners_fts.rowid "
        "WHERE runners_fts MATCH ?",
        (words,),
    )


def test_a_new_runner_written_early_and_gone_by_the_complete_walk_is_taken_back(tmp_path):
    account, settings, transport = synced(tmp_path)
    doomed = account.create_runner(name="doomed canary")["id"]

    def delete_it_and_move_the_list() -> None:
        account.delete_runner(doomed)
        account.create_runner(name="newcomer")  # the first walk is not complete: walk again

    during_first_walk(account, delete_it_and_move_the_list)
    summary = run_sync(settings, transport=transport)

    assert (summary.walks, summary.complete, summary.created) == (2, True, 1)
    assert rows(settings.db_path, "SELECT count(*) FROM runners WHERE id = ?", (doomed,)) == [(0,)]
    assert rows(
        settings.db_path, "SELECT count(*) FROM runner_versions WHERE runner_id = ?", (doomed,)
    ) == [(0,)]
    assert search(settings.db_path, "doomed") == []
    assert len(search(settings.db_path, "newcomer")) == 1
    assert rows(settings.db_path, "SELECT count(*) FROM runners") == [(13,)]


def test_a_new_runner_that_changed_between_walks_is_stored_as_the_last_walk_saw_it(tmp_path):
    account, settings, transport = synced(tmp_path)
    fresh = account.create_runner(name="first draft")["id"]

    def rename_it_and_move_the_list() -> None:
        account.rename_runner(fresh, "final cut")
        account.create_runner(name="newcomer")

    during_first_walk(account, rename_it_and_move_the_list)
    summary = run_sync(settings, transport=transport)

    assert (summary.walks, summary.complete, summary.created) == (2, True, 2)
    assert rows(
        settings.db_path,
        "SELECT version, change, name FROM runner_versions WHERE runner_id = ?",
        (fresh,),
    ) == [(1, "created", "final cut")]
    assert search(settings.db_path, "draft") == []
    assert search(settings.db_path, "final") == [(fresh,)]


def test_a_first_sync_that_fails_after_writing_pages_leaves_no_runner(tmp_path):
    account = SimulatedAccount(runners=40, seed=3, token="t")
    transport = httpx.ASGITransport(app=create_app(account))
    settings = Settings(
        base_url="http://127.0.0.1", token="t", db_path=tmp_path / "m.db", per_page=5
    )
    requests = itertools.count(1)

    def revoke_on_page_six(page: int, per_page: int) -> None:
        if next(requests) == 6:
            account.token = "rotated"

    account.before_page.append(revoke_on_page_six)
    with pytest.raises(AuthenticationError):
        run_sync(settings, transport=transport)

    for table in ("runners", "runner_versions", "runners_fts", "account_owners"):
        assert rows(settings.db_path, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert rows(settings.db_path, "SELECT status FROM sync_runs") == [("failed",)]
    account.token = "t"
    account.before_page.clear()
    assert run_sync(settings, transport=transport).created == 40


def early_record(runner_id: str, name: str = "n") -> RunnerRecord:
    return RunnerRecord(runner_id, "u", name, "active", "e", "[]", "{}", "t", "t", "{}", "h")


def test_a_first_sync_walked_twice_keeps_every_early_write_and_its_owners(tmp_path):
    # The second walk sees every runner as the first one wrote it: each is only noted, none
    # is taken back and written again, and the owners are recorded all the same.
    account = SimulatedAccount(runners=12, seed=7, token="t")
    transport = httpx.ASGITransport(app=create_app(account))
    settings = Settings(
        base_url="http://127.0.0.1", token="t", db_path=tmp_path / "m.db", per_page=5
    )
    during_first_walk(account, lambda: account.create_runner(name="newcomer"))
    summary = run_sync(settings, transport=transport)

    assert (summary.walks, summary.complete, summary.created) == (2, True, 13)
    assert rows(settings.db_path, "SELECT count(*), max(version) FROM runner_versions") == [(13, 1)]
    owners = {runner["user_id"] for runner in account.list_runners()}
    assert {owner for (owner,) in rows(settings.db_path, "SELECT user_id FROM account_owners")} == (
        owners
    )
    assert rows(settings.db_path, "SELECT count(*) FROM runners_fts") == [(13,)]


def early_writer(db_path: Path) -> tuple[object, EarlyCreations]:
    db = open_store(db_path)
    sync_id = begin_run(db, base_url="http://127.0.0.1", started_at="2024-01-01T00:00:00Z")
    return db, EarlyCreations(db, sync_id=sync_id, applied_at="2024-01-01T00:00:01Z")


def test_early_writes_stay_uncommitted_until_applied_and_abandon_takes_them_back(tmp_path):
    account, settings, _ = synced(tmp_path)
    db, early = early_writer(settings.db_path)
    stored = account.runner_ids()[:2]
    early.add([early_record("a"), early_record("b")])
    early.add([early_record("b", name="again"), early_record("c")])  # b is written once
    # The walk's last question (what a missing runner's place is) reads the same connection:
    # the store waits for the writer first.
    assert early.load_created_at(stored) == dict(
        rows(
            settings.db_path, "SELECT id, created_at FROM runners WHERE id IN (?, ?)", tuple(stored)
        )
    )
    assert sorted(early.finish()) == ["a", "b", "c"]
    assert sorted(early.finish()) == ["a", "b", "c"]  # finishing again changes nothing
    assert [r[0] for r in db.execute("SELECT name FROM runners WHERE id = 'b'")] == ["n"]
    assert rows(settings.db_path, "SELECT count(*) FROM runners") == [(12,)]  # not committed
    early.abandon()
    assert [r[0] for r in db.execute("SELECT count(*) FROM runners")] == [12]
    assert [r[0] for r in db.execute("SELECT count(*) FROM runner_versions")] == [12]
    db.close()


def test_a_write_the_writer_could_not_make_is_reported_and_nothing_stays(tmp_path):
    account, settings, _ = synced(tmp_path)
    db, early = early_writer(settings.db_path)
    taken = account.runner_ids()[0]
    early.add([early_record("fresh"), early_record(taken)])  # its id is taken: SQLite refuses
    with pytest.raises(StorageError, match="could not write the database"):
        early.load_created_at([taken])
    with pytest.raises(StorageError, match="could not write the database"):
        early.finish()
    early.abandon()
    assert [r[0] for r in db.execute("SELECT count(*) FROM runners")] == [12]
    db.close()


def test_a_sync_that_fails_re_reading_a_missing_runner_leaves_no_early_write(tmp_path):
    account, settings, transport = synced(tmp_path)
    gone = account.runner_ids()[7]
    account.delete_runner(gone)
    for number in range(3):
        account.create_runner(name=f"new-{number}")
    requests = itertools.count(1)

    def revoke_before_the_re_read(page: int, per_page: int) -> None:
        # Hooks run after the token check: from the walk's 4th request (its closing re-read
        # of page 1) on, the next one, the re-read of the missing runner's page, is refused.
        if next(requests) == 4:
            account.token = "rotated"

    account.before_page.append(revoke_before_the_re_read)
    with pytest.raises(AuthenticationError):
        run_sync(settings, transport=transport)

    assert rows(settings.db_path, "SELECT count(*), count(deleted_at) FROM runners") == [(12, 0)]
    assert search(settings.db_path, "new") == []
    assert rows(settings.db_path, "SELECT status FROM sync_runs") == [("success",), ("failed",)]
    assert [r.page for r in account.requests][-2:] == [1, 1]  # the re-read was asked for
