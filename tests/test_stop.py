"""Stopping a sync cooperatively: abandoned before apply, or allowed to finish it; never half."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from conftest import dump_except_run_log, rows, settings_for, wait_until

from pipeline.errors import SyncInterruptedError
from pipeline.store import schema
from pipeline.sync.run import run_sync

STOPPED = "The sync was stopped (SIGINT or SIGTERM) before applying; nothing was applied."


def test_a_stop_during_the_walk_abandons_it_at_once_and_applies_nothing(serve_account, db_path):
    upstream = serve_account(runners=60, seed=2)
    settings = settings_for(upstream, db_path, per_page=10, concurrency=1)
    run_sync(settings)
    upstream.account.rename_runner(upstream.account.runner_ids()[0], "renamed upstream")
    upstream.account.faults.latency_ms = 400  # 7 requests: about 3 s
    before = dump_except_run_log(db_path)
    stop = threading.Event()
    requests_before = len(upstream.account.requests)

    def stop_after_the_first_page(pages: int, expected: int, runners: int) -> None:
        stop.set()

    started = time.monotonic()
    with pytest.raises(SyncInterruptedError) as stopped:
        run_sync(settings, stop=stop, on_progress=stop_after_the_first_page)
    assert time.monotonic() - started < 2.0  # the request in flight was cancelled
    assert stopped.value.exit_code == 6
    assert len(upstream.account.requests) - requests_before <= 2
    assert dump_except_run_log(db_path) == before
    assert rows(db_path, "SELECT id, status, error FROM sync_runs") == [
        (1, "success", None),
        (2, "failed", STOPPED),
    ]
    upstream.account.faults.latency_ms = 0
    assert run_sync(settings).updated == 1  # the next sync completes


def test_a_stop_after_the_walk_but_before_the_apply_still_applies_nothing(serve_account, db_path):
    upstream = serve_account(runners=30, seed=4)
    stop = threading.Event()
    db = schema.open_store(db_path)

    def stop_while_deciding(statement: str) -> None:
        if statement.startswith("SELECT user_id FROM account_owners"):  # deciding
            stop.set()

    db.conn.set_trace_callback(stop_while_deciding)
    try:
        with pytest.raises(SyncInterruptedError):
            run_sync(settings_for(upstream, db_path), db=db, stop=stop)
    finally:
        db.close()
    assert rows(db_path, "SELECT count(*) FROM runners") == [(0,)]
    assert rows(db_path, "SELECT status, error FROM sync_runs") == [("failed", STOPPED)]


def test_a_stop_that_comes_during_the_apply_lets_the_transaction_finish(serve_account, db_path):
    upstream = serve_account(runners=40, seed=2)
    stop = threading.Event()
    db = schema.open_store(db_path)

    def stop_on_the_first_statement_of_the_apply(statement: str) -> None:
        if statement.startswith("INSERT OR IGNORE INTO account_owners"):
            stop.set()

    db.conn.set_trace_callback(stop_on_the_first_statement_of_the_apply)
    try:
        summary = run_sync(settings_for(upstream, db_path), db=db, stop=stop)
    finally:
        db.close()
    assert stop.is_set()
    assert (summary.status, summary.created) == ("success", 40)
    assert rows(db_path, "SELECT count(*) FROM runners") == [(40,)]
    assert rows(db_path, "SELECT status FROM sync_runs") == [("success",)]


def test_sigterm_stops_a_cli_sync_mid_walk_with_exit_6_and_nothing_applied(
    serve_account, start_cli, run_cli, tmp_path
):
    upstream = serve_account(runners=100, seed=6)
    args = ("sync", "--base-url", upstream.url, "--db", "m.db", "--per-page", "10")
    env = {"COMFYCONTROL_TOKEN": "test-token"}
    assert run_cli(*args, env=env).exit_code == 0
    upstream.account.delete_runner(upstream.account.runner_ids()[3])
    upstream.account.faults.latency_ms = 300
    db = tmp_path / "m.db"
    before = dump_except_run_log(db)
    requests = len(upstream.account.requests)

    proc = start_cli(*args, "--concurrency", "1", env=env)
    wait_until(lambda: len(upstream.account.requests) >= requests + 2)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    stdout, stderr = proc.communicate(timeout=10)
    assert time.monotonic() - sent < 5
    assert (proc.returncode, stdout) == (6, "")
    assert stderr == f"comfysync: error: {STOPPED}\n"
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert dump_except_run_log(db) == before
    assert rows(db, "SELECT status, error FROM sync_runs ORDER BY id DESC LIMIT 1") == [
        ("failed", STOPPED)
    ]
    upstream.account.faults.latency_ms = 0
    result = run_cli(*args, "--json", env=env)
    assert result.exit_code == 0 and '"deleted": 1' in result.stdout
