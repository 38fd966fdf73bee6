"""End-to-end syncs against the simulator on a real loopback socket (issue 2's Done-when)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from conftest import (
    dump_except_run_log,
    expected_mirror,
    present_mirror,
    redaction_key,
    rows,
    settings_for,
)

from pipeline.errors import AuthenticationError, UpstreamError
from pipeline.settings import Settings
from pipeline.sync.run import run_sync


def version_count(db_path: Path) -> int:
    return int(rows(db_path, "SELECT count(*) FROM runner_versions")[0][0])  # type: ignore[arg-type]


def test_1050_runners_are_mirrored_exactly_in_11_pages_and_a_resync_writes_nothing(
    serve_account, db_path
):
    upstream = serve_account(runners=1050, seed=7)
    first = run_sync(settings_for(upstream, db_path))

    assert (first.status, first.complete, first.pages, first.walks) == ("success", True, 11, 1)
    assert (first.created, first.updated, first.deleted, first.unchanged) == (1050, 0, 0, 0)
    assert present_mirror(db_path) == expected_mirror(upstream.account, redaction_key(db_path))
    assert version_count(db_path) == 1050
    page_requests = [r.page for r in upstream.account.requests]
    assert sorted(page_requests) == sorted([*range(1, 12), 1])  # 11 pages + closing re-read

    second = run_sync(settings_for(upstream, db_path))
    assert (second.created, second.updated, second.deleted, second.unchanged) == (0, 0, 0, 1050)
    assert version_count(db_path) == 1050
    assert rows(db_path, "SELECT id, status, pages, complete, created FROM sync_runs") == [
        (1, "success", 11, 1, 1050),
        (2, "success", 11, 1, 0),
    ]


def test_updates_name_exactly_the_changed_fields_deletes_and_restores_are_versions(
    serve_account, db_path
):
    upstream = serve_account(runners=30, seed=2)
    account = upstream.account
    settings = settings_for(upstream, db_path)
    run_sync(settings)
    renamed, rotated, gone = (
        account.runner_ids()[2],
        account.runner_ids()[4],
        account.runner_ids()[9],
    )

    account.rename_runner(renamed, "renamed-runner")
    account.rotate_header(rotated, "Authorization", "Bearer rotated-secret")
    removed = account.delete_runner(gone)
    second = run_sync(settings)
    assert (second.updated, second.deleted, second.created) == (2, 1, 0)

    versions = rows(
        db_path,
        "SELECT runner_id, version, change, changed_fields, valid_to IS NULL, sync_id "
        "FROM runner_versions WHERE sync_id = 2 ORDER BY change, runner_id",
    )
    by_runner = {v[0]: v[1:] for v in versions}
    assert by_runner[renamed] == (2, "updated", '["name","updated_at"]', 1, 2)
    assert by_runner[rotated] == (2, "updated", '["headers","updated_at"]', 1, 2)
    assert by_runner[gone] == (2, "deleted", "[]", 1, 2)
    [(deleted_at, version)] = rows(
        db_path, "SELECT deleted_at, version FROM runners WHERE id = ?", (gone,)
    )
    assert deleted_at is not None and version == 2

    account.create_runner(**removed)  # the same runner comes back
    third = run_sync(settings)
    assert (third.restored, third.created, third.deleted) == (1, 0, 0)
    history = rows(
        db_path,
        "SELECT version, change, valid_from, valid_to FROM runner_versions "
        "WHERE runner_id = ? ORDER BY version",
        (gone,),
    )
    assert [h[:2] for h in history] == [(1, "created"), (2, "deleted"), (3, "restored")]
    # Intervals touch end to end, the current one is open.
    assert history[0][3] == history[1][2] and history[1][3] == history[2][2]
    assert history[2][3] is None
    assert rows(db_path, "SELECT deleted_at FROM runners WHERE id = ?", (gone,)) == [(None,)]
    assert present_mirror(db_path) == expected_mirror(account, redaction_key(db_path))


def test_churn_between_page_fetches_never_deletes_falsely_and_a_quiet_sync_converges(
    serve_account, db_path
):
    upstream = serve_account(runners=450, seed=5)
    account = upstream.account
    before = set(account.runner_ids())
    victims: list[str] = []

    def churn_between_pages(page: int, per_page: int) -> None:
        if page == 3:  # mid-walk: one runner created, an older one deleted
            account.create_runner()
            victim = account.runner_ids()[-1]
            victims.append(victim)
            account.delete_runner(victim)

    account.before_page.append(churn_between_pages)
    churned = run_sync(settings_for(upstream, db_path))

    assert churned.status == "partial" and not churned.complete and churned.walks == 3
    assert churned.deleted == 0
    assert rows(db_path, "SELECT count(*) FROM runners WHERE deleted_at IS NOT NULL") == [(0,)]
    [(complete, warnings)] = rows(db_path, "SELECT complete, warnings FROM sync_runs")
    assert complete == 0 and "no complete walk" in str(warnings)
    # Every runner present upstream before and after the walk is in the store, undeleted.
    still_there = before & set(account.runner_ids())
    assert still_there <= set(present_mirror(db_path))

    account.before_page.clear()
    quiet = run_sync(settings_for(upstream, db_path))
    assert quiet.status == "success" and quiet.complete
    deleted = {
        row[0] for row in rows(db_path, "SELECT id FROM runners WHERE deleted_at IS NOT NULL")
    }
    assert deleted and deleted <= set(victims) and quiet.deleted == len(deleted)
    assert present_mirror(db_path) == expected_mirror(account, redaction_key(db_path))


def test_a_401_fails_with_nothing_applied_but_the_run_log(serve_account, db_path):
    upstream = serve_account(runners=120, seed=3)
    run_sync(settings_for(upstream, db_path))
    upstream.account.rename_runner(upstream.account.runner_ids()[0], "changed upstream")
    before = dump_except_run_log(db_path)

    bad = Settings(base_url=upstream.url, token="wrong-token", db_path=db_path)
    with pytest.raises(AuthenticationError, match="COMFYCONTROL_TOKEN"):
        run_sync(bad)

    assert dump_except_run_log(db_path) == before
    assert rows(db_path, "SELECT status, error FROM sync_runs ORDER BY id DESC LIMIT 1") == [
        (
            "failed",
            "ComfyControl answered 401 on page 1: the token was rejected; "
            "check COMFYCONTROL_TOKEN (or --token)",
        )
    ]


def test_a_500_storm_that_clears_is_retried_to_success(serve_account, db_path):
    upstream = serve_account(runners=250, seed=4)
    upstream.account.faults.fail_next(4, status=500)
    summary = run_sync(settings_for(upstream, db_path, max_retries=5))
    statuses = [r.status for r in upstream.account.requests]
    assert statuses[:5] == [500, 500, 500, 500, 200]
    assert summary.status == "success" and summary.created == 250


def test_a_429_with_retry_after_1_waits_about_a_second(serve_account, db_path):
    upstream = serve_account(runners=20, seed=4)
    upstream.account.faults.fail_next(1, status=429, headers={"Retry-After": "1"})
    started = time.monotonic()
    summary = run_sync(settings_for(upstream, db_path))
    elapsed = time.monotonic() - started
    assert summary.status == "success"
    assert 0.95 <= elapsed < 3.0


def test_a_permanent_503_fails_after_retries_with_nothing_applied(serve_account, db_path):
    upstream = serve_account(runners=150, seed=4)
    run_sync(settings_for(upstream, db_path))
    upstream.account.create_runner(name="never applied")
    upstream.account.faults.fail_always(503)
    before = dump_except_run_log(db_path)

    with pytest.raises(UpstreamError, match="after 3 attempts"):
        run_sync(settings_for(upstream, db_path, max_retries=2))

    assert dump_except_run_log(db_path) == before
    assert [r.status for r in upstream.account.requests][-3:] == [503, 503, 503]
    assert rows(db_path, "SELECT status FROM sync_runs ORDER BY id") == [("success",), ("failed",)]


def test_unchanged_runners_are_recognised_by_fingerprint_and_old_rows_get_one(
    serve_account, db_path
):
    """A quiet sync skips parsing runners sent exactly as before; rows from before
    fingerprints existed (NULL) get one on the next sync without a new version."""
    upstream = serve_account(runners=120, seed=12)
    run_sync(settings_for(upstream, db_path))
    assert rows(db_path, "SELECT count(*) FROM runners WHERE raw_fingerprint IS NULL") == [(0,)]
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE runners SET raw_fingerprint = NULL WHERE rowid % 2 = 0")
    conn.execute("DELETE FROM page_digests")  # nor had such a database page digests
    conn.commit()
    conn.close()

    quiet = run_sync(settings_for(upstream, db_path))
    assert (quiet.unchanged, quiet.updated, quiet.created) == (120, 0, 0)
    assert version_count(db_path) == 120
    assert rows(db_path, "SELECT count(*) FROM runners WHERE raw_fingerprint IS NULL") == [(0,)]

    # Storing header values in clear changes what is stored, so every runner is re-parsed.
    clear = run_sync(settings_for(upstream, db_path, store_header_values=True))
    with_headers = sum(1 for r in upstream.account.list_runners() if r["headers"])
    assert (clear.updated, clear.unchanged) == (with_headers, 120 - with_headers)


def test_records_whose_id_is_not_a_string_are_rejected_not_a_crash(tmp_path):
    good = {
        "id": "550e8400-e29b-41d4-a716-446655440000", "user_id": "u", "name": "ok",
        "status": "active", "endpoint": "https://x.example", "tags": [], "headers": {},
        "created_at": "2024-01-15T10:30:00Z", "updated_at": "2024-01-15T10:30:00Z",
    }  # fmt: skip
    odd = [{**good, "id": ["a", "list"]}, {**good, "id": {"an": "object"}}, {**good, "id": 7}]
    body = {"runners": [good, *odd], "total": 4}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    settings = Settings(base_url="http://127.0.0.1", token="t", db_path=tmp_path / "m.db")

    summary = run_sync(settings, transport=transport)

    assert (summary.status, summary.created, summary.rejected) == ("partial", 1, 3)
    assert (
        rows(settings.db_path, "SELECT reason FROM rejected_records ORDER BY id")
        == [("missing or empty id",)] * 3
    )


def test_a_status_other_than_active_or_disabled_is_warned_about_while_a_present_runner_has_it(
    serve_account, db_path: Path
):
    upstream = serve_account(runners=30, seed=4)
    account = upstream.account
    settings = settings_for(upstream, db_path)
    odd, gone = [runner["id"] for runner in account.list_runners()[:2]]
    account.update_runner(odd, status="maintenance")
    account.update_runner(gone, status="draining")
    warning = "2 runner(s) have a status other than active/disabled"
    assert warning in run_sync(settings).warnings
    # Unchanged (not even parsed) on the next sync, they are still counted from the store.
    assert warning in run_sync(settings).warnings
    account.delete_runner(gone)  # a deleted runner's status no longer matters
    assert run_sync(settings).deleted == 1
    assert "1 runner(s) have a status other than active/disabled" in run_sync(settings).warnings
    account.update_runner(odd, status="active")
    assert run_sync(settings).updated == 1
    assert not run_sync(settings).warnings
