"""`comfysync schedule` as an operator runs it: real processes, the simulator on loopback, signals."""

from __future__ import annotations

import itertools
import json
import re
import signal
import sqlite3
import time

import pytest
from conftest import dump_except_run_log, rows, wait_until

TOKEN = {"COMFYCONTROL_TOKEN": "test-token"}
RUN_LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z comfysync: INFO: run (\d+) (\w+)(.*)"
)


def schedule_args(upstream, *options: str) -> tuple[str, ...]:
    return ("schedule", "--base-url", upstream.url, "--db", "m.db", *options)


def run_lines(stderr: str) -> list[tuple[str, str, str]]:
    return [m.groups() for m in map(RUN_LINE.fullmatch, stderr.splitlines()) if m]


def test_every_1s_with_max_runs_3_makes_exactly_3_runs_and_exits_0(
    serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=30, seed=1)
    started = time.monotonic()
    result = run_cli(*schedule_args(upstream, "--every", "1s", "--max-runs", "3"), env=TOKEN)
    elapsed = time.monotonic() - started

    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert 1.8 < elapsed < 15  # run now, then two ticks one second apart
    assert rows(tmp_path / "m.db", "SELECT id, status, created, unchanged FROM sync_runs") == [
        (1, "success", 30, 0),
        (2, "success", 0, 30),
        (3, "success", 0, 30),
    ]
    lines = run_lines(result.stderr)
    assert [(n, status) for n, status, _ in lines] == [
        ("1", "success"),
        ("2", "success"),
        ("3", "success"),
    ]
    assert lines[0][2].startswith(
        ": sync 1, 30 runners (complete), created 30, updated 0, deleted 0, restored 0, "
        "unchanged 0, rejected 0, in "
    )
    assert re.search(r"; next run at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", lines[1][2])
    assert lines[2][2].endswith("; no next run (--max-runs 3 reached)")
    assert result.stderr.splitlines()[-1].endswith(
        "INFO: schedule stopped after 3 run(s): --max-runs 3 reached"
    )


def test_503_for_two_runs_then_recovery_two_failed_then_success_and_it_goes_on(
    serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=20, seed=2)
    upstream.account.faults.fail_next(4, status=503)  # --max-retries 1: 2 requests per run
    result = run_cli(
        *schedule_args(upstream, "--every", "1s", "--max-runs", "4", "--max-retries", "1"),
        env=TOKEN,
    )
    assert result.exit_code == 0, result.stderr
    assert rows(tmp_path / "m.db", "SELECT status FROM sync_runs ORDER BY id") == [
        ("failed",),
        ("failed",),
        ("success",),
        ("success",),
    ]
    assert [status for _, status, _ in run_lines(result.stderr)] == [
        "failed",
        "failed",
        "success",
        "success",
    ]
    failures = [line for line in result.stderr.splitlines() if "run failed:" in line]
    assert len(failures) == 2
    assert all(
        "WARNING: run failed: ComfyControl failed on page 1 after 2 attempts (HTTP 503)" in line
        for line in failures
    )


def test_max_consecutive_failures_stops_the_schedule_with_exit_4(serve_account, run_cli, tmp_path):
    upstream = serve_account(runners=5)
    upstream.account.faults.fail_always(503)
    result = run_cli(
        *schedule_args(
            upstream, "--every", "1s", "--max-retries", "0", "--max-consecutive-failures", "2"
        ),
        env=TOKEN,
    )
    assert result.exit_code == 4, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "comfysync: error: 2 runs failed in a row (--max-consecutive-failures); the last: "
        "ComfyControl failed on page 1 after 1 attempts (HTTP 503); nothing was applied, "
        "try again later"
    )
    assert rows(tmp_path / "m.db", "SELECT status FROM sync_runs") == [("failed",), ("failed",)]


def test_authentication_failures_are_logged_at_error_every_time(serve_account, run_cli):
    upstream = serve_account(runners=5, token="the-real-token")
    result = run_cli(
        *schedule_args(upstream, "--every", "1s", "--max-runs", "2"),
        env={"COMFYCONTROL_TOKEN": "a-wrong-token"},
    )
    assert result.exit_code == 0, result.stderr
    loud = [line for line in result.stderr.splitlines() if " ERROR: " in line]
    assert len(loud) == 2
    for line in loud:
        assert line.endswith(
            "ERROR: AUTHENTICATION FAILED: ComfyControl answered 401 on page 1: the token was "
            "rejected; check COMFYCONTROL_TOKEN (or --token). Every scheduled run will fail "
            "until the token is fixed; the schedule keeps trying."
        )
    assert "a-wrong-token" not in result.stderr and "the-real-token" not in result.stderr


def test_json_log_format_is_one_object_per_line(serve_account, run_cli):
    upstream = serve_account(runners=12, seed=5)
    result = run_cli(
        *schedule_args(upstream, "--every", "1s", "--max-runs", "2", "--log-format", "json"),
        env=TOKEN,
    )
    assert result.exit_code == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    runs = [entry for entry in entries if entry.get("event") == "run"]
    assert [
        {key: run[key] for key in ("run", "status", "sync_id", "runners", "created", "exit_code")}
        for run in runs
    ] == [
        {"run": 1, "status": "success", "sync_id": 1, "runners": 12, "created": 12, "exit_code": 0},
        {"run": 2, "status": "success", "sync_id": 2, "runners": 12, "created": 0, "exit_code": 0},
    ]
    assert runs[0]["next_run_at"] is not None and runs[1]["next_run_at"] is None
    assert all(entry["level"] == "info" and entry["logger"] == "jobs.scheduler" for entry in runs)
    assert all(isinstance(run["seconds"], float) for run in runs)


def test_sigterm_during_a_slow_walk_exits_0_fast_with_nothing_half_written(
    serve_account, run_cli, start_cli, tmp_path
):
    upstream = serve_account(runners=100, seed=7)
    account = upstream.account
    db = tmp_path / "m.db"
    assert run_cli("sync", "--base-url", upstream.url, "--db", "m.db", env=TOKEN).exit_code == 0
    ids = account.runner_ids()
    account.rename_runner(ids[1], "renamed while scheduled")
    account.delete_runner(ids[2])
    account.create_runner(name="created while scheduled")
    before = dump_except_run_log(db)
    account.faults.latency_ms = 300
    requests = len(account.requests)

    proc = start_cli(
        *schedule_args(upstream, "--every", "1h", "--per-page", "10", "--concurrency", "1"),
        env=TOKEN,
    )
    wait_until(lambda: len(account.requests) >= requests + 2)  # mid-walk
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=10)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 0, stderr
    assert "run 1 interrupted (exit 6)" in stderr and "no next run (stop signal received)" in stderr

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    assert dump_except_run_log(db) == before  # no version half-written
    assert rows(db, "SELECT status, error FROM sync_runs ORDER BY id DESC LIMIT 1") == [
        ("failed", "The sync was stopped (SIGINT or SIGTERM) before applying; nothing was applied.")
    ]
    account.faults.latency_ms = 0
    result = run_cli("sync", "--base-url", upstream.url, "--db", "m.db", "--json", env=TOKEN)
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert (summary["created"], summary["updated"], summary["deleted"]) == (1, 1, 1)


def test_sigint_between_runs_exits_0_without_starting_another(serve_account, start_cli, tmp_path):
    upstream = serve_account(runners=10)
    proc = start_cli(*schedule_args(upstream, "--every", "1h"), env=TOKEN)
    wait_until(lambda: successful_runs(tmp_path / "m.db") == 1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert stderr.splitlines()[-1].endswith(
        "INFO: schedule stopped after 1 run(s): stop signal received"
    )
    assert rows(tmp_path / "m.db", "SELECT status FROM sync_runs") == [("success",)]


def successful_runs(db) -> int:
    if not db.exists():
        return 0
    try:
        return int(rows(db, "SELECT count(*) FROM sync_runs WHERE status = 'success'")[0][0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_a_scheduled_run_and_one_off_syncs_never_overlap(
    serve_account, start_cli, run_cli, tmp_path
):
    upstream = serve_account(runners=40, seed=8)
    upstream.account.faults.latency_ms = 80  # 5 requests per sync at one page at a time
    slow = ("--per-page", "10", "--concurrency", "1")
    schedule = start_cli(
        *schedule_args(upstream, "--every", "1s", "--max-runs", "3", *slow), env=TOKEN
    )
    one_off_codes = []
    deadline = time.monotonic() + 60
    while schedule.poll() is None and time.monotonic() < deadline:
        result = run_cli("sync", "--base-url", upstream.url, "--db", "m.db", *slow, env=TOKEN)
        assert result.exit_code in (0, 5), result.stderr
        one_off_codes.append(result.exit_code)
    _, stderr = schedule.communicate(timeout=30)
    assert schedule.returncode == 0, stderr
    if 0 not in one_off_codes:  # make sure at least one one-off really ran alongside
        assert run_cli("sync", "--base-url", upstream.url, "--db", "m.db", env=TOKEN).exit_code == 0
        one_off_codes.append(0)

    runs = rows(
        tmp_path / "m.db",
        "SELECT started_at, finished_at FROM sync_runs WHERE status = 'success' ORDER BY id",
    )
    assert len(runs) == 3 + one_off_codes.count(0)
    assert rows(tmp_path / "m.db", "SELECT count(*) FROM sync_runs WHERE status != 'success'") == [
        (0,)
    ]
    for (_, finished), (next_started, _) in itertools.pairwise(runs):
        assert str(finished) < str(next_started)  # ISO UTC text sorts as time


EVERY_FORMS = "use a positive whole number and a unit s, m, h, d or w: 30s, 15m, 2h, 1d, 1w"
CRON_FORMS = (
    "use a standard 5-field crontab 'MINUTE HOUR DAY MONTH WEEKDAY', "
    "e.g. '*/15 * * * *' or '0 3 * * 1-5'"
)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (("--every", "0s"), f"Invalid value for '--every': '0s' is not an interval; {EVERY_FORMS}"),
        (
            ("--every", "banana"),
            f"Invalid value for '--every': 'banana' is not an interval; {EVERY_FORMS}",
        ),
        (
            ("--cron", "banana"),
            f"Invalid value for '--cron': 'banana' is not a crontab (it has 1 field(s), not 5); {CRON_FORMS}",
        ),
        (
            ("--cron", "*/15 * * * * *"),
            f"Invalid value for '--cron': '*/15 * * * * *' is not a crontab (it has 6 field(s), not 5); {CRON_FORMS}",
        ),
        (
            ("--cron", "61 * * * *"),
            f"Invalid value for '--cron': '61 * * * *' is not a crontab (Error validating expression '61': the last value (61) is higher than the maximum value (59)); {CRON_FORMS}",
        ),
        (
            ("--every", "15m", "--timezone", "Mars/Olympus_Mons"),
            "Invalid value for '--timezone': unknown time zone 'Mars/Olympus_Mons'; use an IANA time zone name such as UTC, Europe/Berlin or America/New_York",
        ),
        (
            (),
            "pass exactly one of --every (a positive whole number and a unit s, m, h, d or w: 30s, 15m, 2h, 1d, 1w) or --cron (a standard 5-field crontab 'MINUTE HOUR DAY MONTH WEEKDAY', e.g. '*/15 * * * *' or '0 3 * * 1-5')",
        ),
        (
            ("--every", "15m", "--cron", "*/15 * * * *"),
            "pass exactly one of --every (a positive whole number and a unit s, m, h, d or w: 30s, 15m, 2h, 1d, 1w) or --cron (a standard 5-field crontab 'MINUTE HOUR DAY MONTH WEEKDAY', e.g. '*/15 * * * *' or '0 3 * * 1-5')",
        ),
    ],
)
def test_bad_schedules_are_usage_errors_showing_the_accepted_forms(
    run_cli, tmp_path, options, error
):
    result = run_cli("schedule", "--base-url", "http://127.0.0.1:9", "--db", "m.db", *options)
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"comfysync: error: {error} (see 'comfysync schedule --help')\n"
    assert not (tmp_path / "m.db").exists()
