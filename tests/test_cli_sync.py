"""`comfysync sync` as a user runs it: a real process against the simulator on loopback."""

from __future__ import annotations

import hashlib
import json
import sqlite3

from conftest import rows

from pipeline.store.schema import SCHEMA_VERSION


def test_sync_prints_a_summary_and_records_the_run(serve_account, run_cli, tmp_path):
    upstream = serve_account(runners=230, seed=11)
    result = run_cli("sync", "--base-url", upstream.url, env={"COMFYCONTROL_TOKEN": "test-token"})
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sync 1 success: 230 runners in 3 pages (1 walk(s), complete) in ")
    day = rows(
        tmp_path / "data" / "comfysync.db", "SELECT substr(finished_at, 1, 10) FROM sync_runs"
    )[0][0]
    assert lines[1:] == [
        "  created 230, updated 0, deleted 0, restored 0, unchanged 0, rejected 0",
        "  database: data/comfysync.db",
        f"  snapshot: data/exports/parquet/runners/snapshot_date={day}/runners-1.parquet (230 rows)",
        f"  snapshot: data/exports/csv/runners/snapshot_date={day}/runners-1.csv (230 rows)",
    ]
    assert result.stderr == ""
    assert rows(tmp_path / "data" / "comfysync.db", "SELECT count(*) FROM runners") == [(230,)]


def test_sync_json_prints_one_object(serve_account, run_cli, tmp_path):
    upstream = serve_account(runners=12, seed=11)
    result = run_cli(
        "sync",
        "--json",
        "--base-url",
        upstream.url,
        "--token",
        "test-token",
        "--db",
        "m.db",
        "--per-page",
        "5",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {k: summary[k] for k in ("status", "created", "pages", "complete", "db_path")} == {
        "status": "success",
        "created": 12,
        "pages": 3,
        "complete": True,
        "db_path": "m.db",
    }


def test_no_token_for_a_remote_api_is_a_usage_error_before_any_request(run_cli):
    result = run_cli("sync", "--base-url", "https://api.comfycontrol.example")
    assert (result.exit_code, result.stdout) == (2, "")
    assert (
        result.stderr == "comfysync: error: no API token: set COMFYCONTROL_TOKEN or pass --token\n"
    )


def test_plain_http_to_a_remote_host_is_refused_without_allow_http(run_cli):
    result = run_cli("sync", "--base-url", "http://api.comfycontrol.example", "--token", "t")
    assert result.exit_code == 2
    assert "refusing plain http:// to api.comfycontrol.example" in result.stderr
    assert "--allow-http" in result.stderr and len(result.stderr.splitlines()) == 1


def test_bad_option_values_are_click_usage_errors(run_cli):
    result = run_cli("sync", "--per-page", "101")
    assert result.exit_code == 2 and "--per-page" in result.stderr


def test_a_rejected_token_exits_3_with_one_line_and_no_traceback(serve_account, run_cli):
    upstream = serve_account(runners=5)
    result = run_cli("sync", "--base-url", upstream.url, "--token", "nope")
    assert result.exit_code == 3
    assert result.stderr == (
        "comfysync: error: ComfyControl answered 401 on page 1: the token was rejected; "
        "check COMFYCONTROL_TOKEN (or --token)\n"
    )


def test_a_permanent_503_exits_4_with_nothing_applied(serve_account, run_cli, tmp_path):
    upstream = serve_account(runners=5)
    upstream.account.faults.fail_always(503)
    result = run_cli(
        "sync",
        "--base-url",
        upstream.url,
        "--token",
        "test-token",
        "--max-retries",
        "1",
        "--db",
        "x.db",
    )
    assert result.exit_code == 4, result.stderr
    assert "after 2 attempts (HTTP 503); nothing was applied" in result.stderr
    assert "Traceback" not in result.stderr and "stamina" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert rows(tmp_path / "x.db", "SELECT count(*) FROM runners") == [(0,)]
    assert rows(tmp_path / "x.db", "SELECT status FROM sync_runs") == [("failed",)]


def test_debug_shows_the_traceback(serve_account, run_cli):
    upstream = serve_account(runners=5)
    result = run_cli("sync", "--debug", "--base-url", upstream.url, "--token", "nope")
    assert result.exit_code == 3 and "Traceback" in result.stderr
    assert result.stderr.endswith(
        "comfysync: error: " + "ComfyControl answered 401 on page 1: "
        "the token was rejected; check COMFYCONTROL_TOKEN (or --token)\n"
    )


def test_a_db_path_that_is_a_directory_is_a_usage_error(run_cli, tmp_path):
    (tmp_path / "adir").mkdir()
    result = run_cli("sync", "--base-url", "http://127.0.0.1:9", "--db", "adir")
    assert result.exit_code == 2
    assert result.stderr == "comfysync: error: --db adir is a directory; pass a file path\n"


def test_a_file_that_is_not_sqlite_is_refused_and_left_untouched(run_cli, tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    result = run_cli("sync", "--base-url", "http://127.0.0.1:9", "--db", "junk.db")
    assert result.exit_code == 2 and "is not a SQLite database" in result.stderr
    assert junk.read_bytes() == b"this is not a database" * 100


def test_a_sqlite_file_comfysync_did_not_create_is_refused(run_cli, tmp_path):
    conn = sqlite3.connect(tmp_path / "other.db")
    conn.execute("CREATE TABLE mine (x)")
    conn.commit()
    conn.close()
    result = run_cli("sync", "--base-url", "http://127.0.0.1:9", "--db", "other.db")
    assert result.exit_code == 2 and "comfysync did not create" in result.stderr


def test_a_newer_schema_is_refused_and_the_file_left_byte_for_byte(
    serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=3)
    assert (
        run_cli(
            "sync", "--base-url", upstream.url, "--token", "test-token", "--db", "m.db"
        ).exit_code
        == 0
    )
    conn = sqlite3.connect(tmp_path / "m.db")
    conn.execute("UPDATE comfysync_meta SET value = '999' WHERE key = 'schema_version'")
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    digest = hashlib.sha256((tmp_path / "m.db").read_bytes()).hexdigest()

    result = run_cli("sync", "--base-url", upstream.url, "--token", "test-token", "--db", "m.db")
    assert result.exit_code == 2
    assert (
        f"schema version 999, newer than this comfysync knows ({SCHEMA_VERSION})" in result.stderr
    )
    assert hashlib.sha256((tmp_path / "m.db").read_bytes()).hexdigest() == digest


def test_secrets_never_reach_the_database_file_its_wal_or_the_output(
    serve_account, run_cli, tmp_path
):
    header_secret = "HDRSECRET-7f3a9c1e5b"
    password = "PWSECRET-2d8e4f6a"
    token = "TOKSECRET-91bc35de"
    upstream = serve_account(runners=40, seed=8, token=token)
    target = upstream.account.runner_ids()[5]
    upstream.account.update_runner(
        target,
        headers={"Authorization": f"Bearer {header_secret}"},
        endpoint=f"https://admin:{password}@gpu.example.com:8443/comfy",
    )
    outputs = []
    assert (
        run_cli(
            "sync", "--base-url", upstream.url, "--db", "s.db", env={"COMFYCONTROL_TOKEN": token}
        ).exit_code
        == 0
    )
    # A reader holding a snapshot keeps each later sync's pages in the WAL (a sync ends by
    # checkpointing only what no reader needs), so they are on disk to be searched.
    reader = sqlite3.connect(tmp_path / "s.db")
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM runners").fetchone()
    for flags in ([], ["--json"], ["--debug"]):
        result = run_cli(
            "sync",
            *flags,
            "--base-url",
            upstream.url,
            "--db",
            "s.db",
            env={"COMFYCONTROL_TOKEN": token},
        )
        assert result.exit_code == 0, result.stderr
        outputs += [result.stdout, result.stderr]
    upstream.account.rotate_header(target, "Authorization", f"Bearer {header_secret}-2")
    result = run_cli(
        "sync",
        "--debug",
        "--base-url",
        upstream.url,
        "--db",
        "s.db",
        env={"COMFYCONTROL_TOKEN": token},
    )
    outputs += [result.stdout, result.stderr]

    files = [p for p in tmp_path.iterdir() if p.name.startswith("s.db")]
    assert any(p.name == "s.db-wal" and p.stat().st_size > 0 for p in files)
    for marker in (header_secret, password, token):
        for path in files:
            assert marker.encode() not in path.read_bytes(), (marker, path.name)
        for text in outputs:
            assert marker not in text
    [(headers, endpoint, version)] = rows(
        tmp_path / "s.db", "SELECT headers, endpoint, version FROM runners WHERE id = ?", (target,)
    )
    assert json.loads(str(headers))["Authorization"].startswith("redacted:")
    assert str(endpoint).startswith("https://redacted:") and version == 2  # rotation is a change
    reader.close()


def test_quiet_prints_nothing_on_success_and_only_warnings_on_a_partial_run(
    serve_account, run_cli
):
    upstream = serve_account(runners=12, seed=3)
    args = ("sync", "--quiet", "--base-url", upstream.url, "--token", "test-token")
    for _ in range(2):  # the first sync, then a re-sync with nothing to change
        result = run_cli(*args)
        assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")
    upstream.account.faults.once("missing_id")
    result = run_cli(*args, "--max-walks", "1")
    assert (result.exit_code, result.stdout) == (0, "")
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("comfysync: WARNING: ") for line in lines)
    assert "1 runner record(s) could not be stored (see rejected_records)" in result.stderr


def test_quiet_and_json_together_are_a_usage_error(run_cli):
    result = run_cli("sync", "--quiet", "--json")
    assert result.exit_code == 2 and "--json and --quiet cannot be combined" in result.stderr
