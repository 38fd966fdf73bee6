"""Operations as an operator wires them up: notifications through Apprise to a real webhook,
dead man's switch pings, Prometheus metrics (textfile and a running schedule's /metrics) and
`status --check`. Every sync is the CLI as a real process against the simulator on loopback;
every receiver is a real HTTP server on 127.0.0.1 (conftest's `receiver`)."""

from __future__ import annotations

import json
import re
import signal
import time

import httpx
import pytest
from conftest import free_port, rows, wait_until
from prometheus_client.parser import text_string_to_metric_families

TOKEN = {"COMFYCONTROL_TOKEN": "test-token"}


def sync_args(upstream, *options: str) -> tuple[str, ...]:
    return ("sync", "--base-url", upstream.url, "--db", "m.db", "--no-export", *options)


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and labels, parsed by prometheus_client."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def active_runners(account) -> list[dict]:
    return sorted(
        (r for r in account.list_runners() if r["status"] == "active"), key=lambda r: r["name"]
    )


def test_a_change_notice_reports_exactly_the_changes_the_filter_asks_for(
    serve_account, run_cli, receiver
):
    upstream = serve_account(runners=15, seed=41)
    assert run_cli(*sync_args(upstream), env=TOKEN).exit_code == 0
    disabled, deleted, renamed, retagged = active_runners(upstream.account)[:4]
    upstream.account.update_runner(disabled["id"], status="disabled")
    upstream.account.delete_runner(deleted["id"])
    upstream.account.rename_runner(renamed["id"], "renamed\x1b[2J")  # an update, filtered out
    upstream.account.update_runner(retagged["id"], tags=["moved"])  # likewise

    hook = f"json://127.0.0.1:{receiver.port}/hook"
    result = run_cli(
        *sync_args(upstream, "--notify-on", "changes", "--notify-changes", "disabled,deleted"),
        env={**TOKEN, "COMFYSYNC_NOTIFY": hook},
    )

    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    [notice] = receiver.posted_json("/hook")
    assert notice["type"] == "info"
    assert notice["title"] == "comfysync: 2 runner change(s) (1 deleted, 1 disabled)"
    assert notice["message"].splitlines() == [
        "sync 2: 2 runner change(s): 1 deleted, 1 disabled",
        f"- deleted: {deleted['name']} [{deleted['id']}]",
        f"- disabled: {disabled['name']} [{disabled['id']}] (status active -> disabled)",
    ]


def test_updates_filtered_by_field_and_names_escaped(serve_account, run_cli, receiver):
    upstream = serve_account(runners=10, seed=42)
    assert run_cli(*sync_args(upstream), env=TOKEN).exit_code == 0
    renamed, retagged = active_runners(upstream.account)[:2]
    upstream.account.rename_runner(renamed["id"], "evil\x1b]0;owned\x07\nforged line")
    upstream.account.update_runner(retagged["id"], tags=["moved"])

    result = run_cli(
        *sync_args(upstream, "--notify-on", "changes", "--notify-fields", "name"),
        "--notify", f"json://127.0.0.1:{receiver.port}/hook",
        env=TOKEN,
    )  # fmt: skip

    assert result.exit_code == 0, result.stderr
    [notice] = receiver.posted_json("/hook")
    assert notice["message"].splitlines() == [
        "sync 2: 1 runner change(s): 1 updated",
        f"- updated: evil\\u001b]0;owned\\u0007\\nforged line [{renamed['id']}] "
        f"(name {renamed['name']} -> evil\\u001b]0;owned\\u0007\\nforged line)",
    ]


def test_three_failures_then_a_success_send_one_failure_notice_and_one_recovery(
    serve_account, run_cli, receiver, tmp_path
):
    upstream = serve_account(runners=20, seed=43)
    upstream.account.faults.fail_next(6, status=503)  # --max-retries 1: 2 requests per run
    env = {
        **TOKEN,
        "COMFYSYNC_NOTIFY": f"json://127.0.0.1:{receiver.port}/hook",
        "COMFYSYNC_PING_URL": f"http://127.0.0.1:{receiver.port}/ping/5f1c",
    }
    options = ("--max-retries", "1", "--notify-after-failures", "2", "--metrics-file", "m.prom")
    exits = [run_cli(*sync_args(upstream, *options), env=env).exit_code for _ in range(4)]

    assert exits == [4, 4, 4, 0]
    notices = receiver.posted_json("/hook")
    assert [(n["type"], n["title"]) for n in notices] == [
        ("failure", "comfysync: sync failing (2 failed run(s) in a row)"),
        ("success", "comfysync: sync recovered"),
    ]
    failure = "ComfyControl failed on page 1 after 2 attempts (HTTP 503); nothing was applied, try again later"
    assert notices[0]["message"] == f"2 sync run(s) failed in a row; the last: {failure}"
    assert notices[1]["message"].startswith(
        "sync works again after 3 failed run(s): sync 4 success: 20 runners (complete), "
        "created 20, updated 0, deleted 0, restored 0, rejected 0, in "
    )
    pings = [(r.method, r.path, r.body.decode()) for r in receiver.requests if "/ping/" in r.path]
    assert [(method, path) for method, path, _ in pings] == [
        ("POST", "/ping/5f1c/start"),
        ("POST", "/ping/5f1c/fail"),
    ] * 3 + [("POST", "/ping/5f1c/start"), ("POST", "/ping/5f1c")]
    assert {body for _, path, body in pings if path.endswith("/fail")} == {failure}
    assert pings[-1][2].startswith("sync 4 success: 20 runners (complete), created 20, ")

    metrics = metric_values((tmp_path / "m.prom").read_text())
    assert metrics[("comfysync_sync_runs_total", (("outcome", "failed"),))] == 3
    assert metrics[("comfysync_sync_runs_total", (("outcome", "success"),))] == 1
    assert metrics[("comfysync_retries_total", ())] == 3  # each failed run retried once
    assert metrics[("comfysync_consecutive_failures", ())] == 0
    assert rows(tmp_path / "m.db", "SELECT status, warnings FROM sync_runs") == [
        ("failed", None),
        ("failed", None),
        ("failed", None),
        ("success", None),
    ]


def test_a_notifier_that_is_down_leaves_the_sync_a_success_with_a_warning(
    serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=10, seed=44)
    down = free_port()
    result = run_cli(
        *sync_args(
            upstream, "--notify-on", "changes", "--ping-url", f"http://127.0.0.1:{down}/p/x"
        ),
        env={**TOKEN, "COMFYSYNC_NOTIFY": f"json://user:hunter2@127.0.0.1:{down}/hook"},
    )

    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("sync 1 success: 10 runners")
    warnings = [
        f"changes notification to json://user:****@127.0.0.1:{down}/hook was not delivered",
        f"success ping to http://127.0.0.1:{down}/*** failed (ConnectError)",
    ]
    start = f"start ping to http://127.0.0.1:{down}/*** failed (ConnectError)"
    assert result.stderr.splitlines() == [
        f"comfysync: WARNING: {line}" for line in [start, *warnings]
    ]
    [(status, recorded, created)] = rows(
        tmp_path / "m.db", "SELECT status, warnings, created FROM sync_runs"
    )
    assert (status, json.loads(recorded), created) == ("success", [start, *warnings], 10)
    assert "hunter2" not in result.stderr + recorded


def test_a_notification_url_apprise_cannot_use_is_refused_before_anything(
    serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=5, seed=45)
    result = run_cli(*sync_args(upstream, "--notify", "nosuch://secret@host/x"), env=TOKEN)
    assert result.exit_code == 2
    assert result.stderr == (
        "comfysync: error: --notify URL #1 (nosuch://...) is not a notification URL Apprise "
        "can use; see https://github.com/caronc/apprise/wiki\n"
    )
    assert not (tmp_path / "m.db").exists()


def test_uptime_kuma_pings_carry_the_status_in_the_query(serve_account, run_cli, receiver):
    upstream = serve_account(runners=5, seed=46)
    url = f"http://127.0.0.1:{receiver.port}/api/push/K7s2"
    result = run_cli(
        *sync_args(upstream, "--ping-url", url, "--ping-style", "uptime-kuma"), env=TOKEN
    )
    assert result.exit_code == 0, result.stderr
    [ping] = receiver.requests
    assert ping.method == "GET"
    assert ping.path.startswith("/api/push/K7s2?status=up&msg=sync+1+success%3A+5+runners")


def test_the_metrics_file_counts_what_the_syncs_did(serve_account, run_cli, tmp_path):
    upstream = serve_account(runners=25, seed=47)
    options = ("--per-page", "10", "--metrics-file", "out/comfysync.prom")
    (tmp_path / "out").mkdir()
    assert run_cli(*sync_args(upstream, *options), env=TOKEN).exit_code == 0
    first = active_runners(upstream.account)[0]
    upstream.account.update_runner(first["id"], status="disabled")
    upstream.account.delete_runner(active_runners(upstream.account)[0]["id"])
    assert run_cli(*sync_args(upstream, *options), env=TOKEN).exit_code == 0

    text = (tmp_path / "out" / "comfysync.prom").read_text()
    metrics = metric_values(text)
    statuses = dict(
        rows(
            tmp_path / "m.db",
            "SELECT status, count(*) FROM runners WHERE deleted_at IS NULL GROUP BY 1",
        )
    )
    [(started, finished)] = rows(
        tmp_path / "m.db", "SELECT started_at, finished_at FROM sync_runs WHERE id = 2"
    )
    assert {k: v for k, v in metrics.items() if k[0] == "comfysync_runners"} == {
        ("comfysync_runners", (("status", status),)): count for status, count in statuses.items()
    }
    assert sum(statuses.values()) == 24
    assert metrics[("comfysync_runners_deleted", ())] == 1
    assert metrics[("comfysync_sync_runs_total", (("outcome", "success"),))] == 2
    [(pages,)] = rows(tmp_path / "m.db", "SELECT sum(pages) FROM sync_runs")
    assert metrics[("comfysync_pages_total", ())] == pages >= 3 + 3
    for kind, count in {"created": 25, "updated": 1, "deleted": 1, "restored": 0}.items():
        assert metrics[("comfysync_changes_total", (("kind", kind),))] == count
    assert metrics[("comfysync_sync_duration_seconds_count", ())] == 2
    assert metrics[("comfysync_sync_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    assert metrics[("comfysync_snapshot_write_failures_total", ())] == 0
    assert metrics[("comfysync_database_readable", ())] == 1
    from pipeline.times import utc_instant

    assert metrics[("comfysync_last_sync_start_timestamp_seconds", ())] == pytest.approx(
        utc_instant(started).timestamp()
    )
    assert metrics[("comfysync_last_success_timestamp_seconds", ())] == pytest.approx(
        utc_instant(finished).timestamp()
    )
    assert list(tmp_path.joinpath("out").iterdir()) == [tmp_path / "out" / "comfysync.prom"]


def test_schedule_serves_metrics_over_http_and_pings_like_a_one_off_sync(
    serve_account, start_cli, receiver
):
    upstream = serve_account(runners=12, seed=48)
    port = free_port()
    proc = start_cli(
        "schedule", "--every", "1h", "--base-url", upstream.url, "--db", "m.db", "--no-export",
        "--metrics-port", str(port), "--ping-url", f"http://127.0.0.1:{receiver.port}/p/1",
        env=TOKEN,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"

    def scraped() -> dict | None:
        try:
            response = httpx.get(url, timeout=5)
        except httpx.TransportError:
            assert proc.poll() is None, proc.communicate()
            return None
        metrics = metric_values(response.text)
        done = metrics.get(("comfysync_sync_runs_total", (("outcome", "success"),)))
        return metrics if done == 1 else None

    wait_until(scraped, timeout=30)
    metrics = scraped()
    assert metrics is not None
    assert metrics[("comfysync_changes_total", (("kind", "created"),))] == 12
    assert metrics[("comfysync_consecutive_failures", ())] == 0
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert f"INFO: metrics: http://127.0.0.1:{port}/metrics" in stderr
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=2)
    assert [r.path for r in receiver.requests] == ["/p/1/start", "/p/1"]


def test_schedule_refuses_a_metrics_port_in_use(serve_account, run_cli, receiver):
    upstream = serve_account(runners=3, seed=49)
    result = run_cli(
        "schedule", "--every", "1h", "--base-url", upstream.url, "--db", "m.db",
        "--metrics-port", str(receiver.port),
        env=TOKEN,
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        f"comfysync: error: cannot serve metrics on 127.0.0.1:{receiver.port} (Address already "
        "in use); pass another --metrics-port or --metrics-host"
    )


def test_status_check_exits_with_each_monitoring_plugin_code(serve_account, run_cli):
    upstream = serve_account(runners=8, seed=50)

    def check(*options: str) -> tuple[int, str]:
        result = run_cli("status", "--check", "--db", "m.db", *options)
        assert result.stderr == ""
        return result.exit_code, result.stdout

    code, line = check()
    assert (code, line) == (
        3,
        "COMFYSYNC UNKNOWN - no database at m.db; create one with `comfysync sync` "
        "(or try `comfysync demo`)\n",
    )
    bad_token = {"COMFYCONTROL_TOKEN": "wrong"}
    assert run_cli(*sync_args(upstream), env=bad_token).exit_code == 3
    assert check() == (
        2,
        "COMFYSYNC CRITICAL - no sync has ever succeeded | last_success_age=s;;7200;0 "
        "consecutive_failures=1;;3;0 runners=0;;;0\n",
    )
    assert run_cli(*sync_args(upstream), env=TOKEN).exit_code == 0
    code, line = check()
    assert code == 0
    assert re.match(
        r"COMFYSYNC OK - last success \d+s ago, 8 runners \| last_success_age=\d+s;", line
    )
    assert line.endswith(";;7200;0 consecutive_failures=0;;3;0 runners=8;;;0\n")
    assert run_cli(*sync_args(upstream), env=bad_token).exit_code == 3
    code, line = check()
    assert code == 1
    assert line.startswith(
        "COMFYSYNC WARNING - the latest run (sync 3) failed: ComfyControl answered 401 on page 1"
    )
    code, line = check("--max-failures", "1")
    assert code == 2
    assert line.startswith("COMFYSYNC CRITICAL - 1 run(s) failed in a row; the last: ComfyControl")
    time.sleep(1.1)
    code, line = check("--max-age", "1s")
    assert code == 2
    assert re.match(r"COMFYSYNC CRITICAL - no successful sync for \d+s \(more than 1s\) \| ", line)


def test_status_check_warns_after_a_partial_run(serve_account, run_cli):
    upstream = serve_account(runners=10, seed=51)
    assert run_cli(*sync_args(upstream), env=TOKEN).exit_code == 0
    for runner_id in upstream.account.runner_ids()[:8]:
        upstream.account.delete_runner(runner_id)  # a mass deletion: withheld, run partial
    assert run_cli(*sync_args(upstream), env=TOKEN).exit_code == 0
    result = run_cli("status", "--check", "--db", "m.db")
    assert result.exit_code == 1
    assert result.stdout.startswith(
        "COMFYSYNC WARNING - the latest run (sync 2) was partial; see comfysync runs | "
    )
