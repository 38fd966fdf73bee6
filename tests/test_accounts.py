"""Many accounts from one comfysync.toml: sync, schedule, read and export across them.

End to end: simulators on 127.0.0.1 with different seeds, tokens and owners; the CLI as a
real process; the combined snapshot dataset read back with DuckDB and pandas.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import duckdb
import httpx
import pandas as pd
import pytest
from conftest import free_port, get_once_served, present_mirror, rows

TOKENS = {"TOKEN_PROD": "prod-token-1", "TOKEN_STAGING": "staging-token-2"}


def write_config(folder: Path, text: str, mode: int = 0o644) -> Path:
    path = folder / "comfysync.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def three_accounts(serve_account, tmp_path):
    """prod and staging served (other seeds, tokens and owners); eu-west is down."""
    prod = serve_account(runners=37, seed=11, token=TOKENS["TOKEN_PROD"], user_id="owner-prod")
    staging = serve_account(
        runners=23, seed=12, token=TOKENS["TOKEN_STAGING"], user_id="owner-staging"
    )
    (tmp_path / "eu.token").write_text("eu-token-3\n")
    (tmp_path / "eu.token").chmod(0o600)
    write_config(
        tmp_path,
        f"""
[defaults]
export_dir = "exports"
format = "parquet"
max_retries = 0

[accounts.prod]
base_url = "{prod.url}"
token_env = "TOKEN_PROD"

[accounts.staging]
base_url = "{staging.url}"
token_env = "TOKEN_STAGING"
per_page = 10

[accounts.eu-west]
base_url = "http://127.0.0.1:{free_port()}"
token_file = "eu.token"
db = "data/eu.db"
""",
    )
    return {"prod": prod, "staging": staging}


def test_accounts_synced_at_once_each_count_only_their_own_retries(
    serve_account, run_cli, tmp_path
):
    """Two accounts sync on two threads of one process; one retries while the other walks."""
    flaky = serve_account(runners=12, seed=21, token=TOKENS["TOKEN_PROD"], user_id="owner-prod")
    steady = serve_account(
        runners=12, seed=22, token=TOKENS["TOKEN_STAGING"], user_id="owner-staging"
    )
    flaky.account.faults.fail_next(2, status=500)
    recovered = threading.Event()
    flaky.account.before_page.append(lambda page, per_page: recovered.set())
    # The steady account's first page waits until the flaky one's retries are behind it, so
    # its sync spans them.
    steady.account.before_page.append(lambda page, per_page: recovered.wait(timeout=30))
    write_config(
        tmp_path,
        f"""
[defaults]
max_retries = 3

[accounts.flaky]
base_url = "{flaky.url}"
token_env = "TOKEN_PROD"
metrics_file = "flaky.prom"

[accounts.steady]
base_url = "{steady.url}"
token_env = "TOKEN_STAGING"
metrics_file = "steady.prom"
""",
    )

    result = run_cli("sync", "--all", "--max-parallel", "2", "--json", env=TOKENS)

    assert result.exit_code == 0, result.stderr
    assert recovered.is_set()
    objects = {o["account"]: o for o in map(json.loads, result.stdout.splitlines())}
    assert {name: o["retries"] for name, o in objects.items()} == {"flaky": 2, "steady": 0}
    for name, retried in (("flaky", "2"), ("steady", None)):
        # What the retries_total metric reads: each database's own running count.
        assert rows(
            tmp_path / "data" / f"{name}.db",
            "SELECT value FROM comfysync_meta WHERE key = 'retries_total'",
        ) == ([(retried,)] if retried else [])
        assert (tmp_path / f"{name}.prom").is_file()


def test_sync_all_one_down_fails_alone_with_exit_4(three_accounts, run_cli, tmp_path):
    result = run_cli("sync", "--all", "--json", env=TOKENS)

    assert result.exit_code == 4, result.stderr
    objects = {o["account"]: o for o in map(json.loads, result.stdout.splitlines())}
    assert {name: o["status"] for name, o in objects.items()} == {
        "prod": "success",
        "staging": "success",
        "eu-west": "failed",
    }
    assert objects["eu-west"]["exit_code"] == 4
    assert objects["staging"]["pages"] == 3  # per_page 10 from its table
    assert result.stderr.startswith("comfysync: error: account eu-west: ComfyControl failed")
    assert len(result.stderr.splitlines()) == 1
    for name, upstream in three_accounts.items():
        present = present_mirror(tmp_path / "data" / f"{name}.db")
        assert set(present) == set(upstream.account.runner_ids())
        assert {r["user_id"] for r in present.values()} == {f"owner-{name}"}
    assert rows(tmp_path / "data" / "eu.db", "SELECT status FROM sync_runs") == [("failed",)]

    # One Hive-partitioned dataset: every account's rows, with an account column.
    dataset = str(tmp_path / "exports" / "parquet" / "runners")
    counts = duckdb.sql(
        f"SELECT account, count(*) FROM read_parquet('{dataset}/**/*.parquet', "
        "hive_partitioning = true) GROUP BY account ORDER BY account"
    ).fetchall()
    assert counts == [("prod", 37), ("staging", 23)]
    frame = pd.read_parquet(dataset)
    assert frame.groupby("account", observed=True).size().to_dict() == {"prod": 37, "staging": 23}
    assert set(frame[frame.account == "prod"].id) == set(
        three_accounts["prod"].account.runner_ids()
    )

    listed = json.loads(run_cli("accounts", "--json", env=TOKENS).stdout)
    assert [(a["account"], a["status"], a["runners_present"]) for a in listed] == [
        ("prod", "success", 37),
        ("staging", "success", 23),
        ("eu-west", "failed", 0),
    ]


def test_read_commands_name_the_account_of_every_line_and_object(three_accounts, run_cli, tmp_path):
    assert run_cli("sync", "--account", "prod", "--account", "staging", env=TOKENS).exit_code == 0

    status = json.loads(run_cli("status", "--json", "--account", "staging").stdout)
    assert [(s["account"], s["runners_present"], s["snapshots"]["files"]) for s in status] == [
        ("staging", 23, 1)
    ]
    alone = json.loads(run_cli("status", "--json", "--db", "data/staging.db").stdout)
    assert (alone["snapshots"]["files"], alone["snapshots"]["export_dir"]) == (1, "exports")
    runs = run_cli("runs", "--account", "prod", "--account", "staging")
    assert runs.exit_code == 0
    lines = runs.stdout.splitlines()
    assert lines and all(line.startswith(("prod: ", "staging: ")) for line in lines)
    assert {line.split(":")[0] for line in lines} == {"prod", "staging"}
    changes = run_cli("changes", "--json", "--all")
    assert changes.exit_code == 2  # eu-west was never synced: no database, the others shown
    assert changes.stderr.startswith("comfysync: error: account eu-west: ")
    found = json.loads(changes.stdout)
    assert [(c["account"], len(c["changes"])) for c in found] == [("prod", 37), ("staging", 23)]
    runner = three_accounts["prod"].account.runner_ids()[0]
    history = run_cli("history", runner, "--account", "prod", "--account", "staging")
    assert history.exit_code == 0 and history.stdout.startswith("prod: ")
    assert "staging: " not in history.stdout and history.stderr == ""  # only prod has it
    nowhere = run_cli("history", "no-such-runner", "--account", "prod", "--account", "staging")
    assert nowhere.exit_code == 2
    assert [line.split(":")[2] for line in nowhere.stderr.splitlines()] == [
        " account prod",
        " account staging",
    ]

    exported = run_cli("export", "-o", "fleet.csv", "--account", "prod", "--account", "staging")
    assert exported.exit_code == 0, exported.stderr
    assert exported.stdout.startswith("prod: 37 rows written to fleet-prod.csv")
    assert len(pd.read_csv(tmp_path / "fleet-staging.csv")) == 23

    assert run_cli("status", "--all", "--db", "x.db").exit_code == 2
    wrong = run_cli("status", "--account", "nope")
    assert wrong.exit_code == 2
    assert "has no account 'nope'; its accounts: prod, staging, eu-west" in wrong.stderr


def test_precedence_command_line_over_environment_over_account_over_defaults(
    serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=20, seed=13, token=None)
    write_config(
        tmp_path,
        f"""
[defaults]
per_page = 4
export_dir = "file-exports"

[accounts.solo]
base_url = "{upstream.url}"
per_page = 5
""",
    )

    def pages(*args: str, env: dict[str, str] | None = None) -> int:
        result = run_cli("sync", "--account", "solo", "--json", *args, env=env)
        assert result.exit_code == 0, result.stderr
        return int(json.loads(result.stdout)["pages"])

    assert pages() == 4  # 20 runners, 5 a page: the account's table beats [defaults]
    assert (tmp_path / "file-exports" / "parquet").is_dir()  # export_dir from [defaults]
    assert pages("--per-page", "10") == 2  # the command line beats the file
    assert pages(env={"COMFYSYNC_EXPORT_DIR": "env-exports"}) == 4  # the environment too
    assert (tmp_path / "env-exports" / "parquet").is_dir()
    # A one-account setup's COMFYSYNC_DB ranks below the file: the account keeps data/solo.db.
    other = tmp_path / "other.db"
    assert pages(env={"COMFYSYNC_DB": str(other)}) == 4
    assert not other.exists()
    assert rows(tmp_path / "data" / "solo.db", "SELECT count(*) FROM sync_runs") == [(4,)]


def test_no_account_chosen_acts_on_all_but_db_alone_means_one_database(
    serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=5, seed=14, token=None)
    write_config(tmp_path, f'[accounts.a]\nbase_url = "{upstream.url}"\nno_export = true\n')
    assert run_cli("sync", "-q").exit_code == 0
    assert rows(tmp_path / "data" / "a.db", "SELECT count(*) FROM runners") == [(5,)]
    alone = run_cli("sync", "-q", "--base-url", upstream.url, "--db", "alone.db", "--no-export")
    assert alone.exit_code == 0
    assert rows(tmp_path / "alone.db", "SELECT count(*) FROM runners") == [(5,)]
    for runner in upstream.account.runner_ids()[:4]:
        upstream.account.delete_runner(runner)
    withheld = run_cli("sync", "-q")  # a mass deletion: the warning names its account
    assert withheld.exit_code == 0
    assert withheld.stderr.startswith("comfysync: WARNING: account a: "), withheld.stderr


def test_schedule_runs_each_account_on_its_own_interval(three_accounts, run_cli, tmp_path):
    config = (tmp_path / "comfysync.toml").read_text()
    config = config.replace(
        'token_env = "TOKEN_PROD"', 'token_env = "TOKEN_PROD"\nschedule = { every = "1s" }'
    ).replace("per_page = 10", 'per_page = 10\nschedule = { every = "2s" }')
    write_config(tmp_path, config)

    result = run_cli(
        "schedule", "--account", "prod", "--account", "staging", "--max-runs", "2",
        "--log-format", "json", env=TOKENS, timeout=60,
    )  # fmt: skip

    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    runs = [(e["account"], e["run"], e["status"]) for e in events if e.get("event") == "run"]
    assert sorted(runs) == [
        ("prod", 1, "success"),
        ("prod", 2, "success"),
        ("staging", 1, "success"),
        ("staging", 2, "success"),
    ]
    for name in ("prod", "staging"):
        log = rows(
            tmp_path / "data" / f"{name}.db",
            "SELECT started_at, finished_at, status FROM sync_runs ORDER BY id",
        )
        assert [status for *_, status in log] == ["success", "success"]
        assert log[0][1] <= log[1][0]  # never two syncs of one database at once
    assert "eu-west" not in result.stderr


def test_schedule_gives_up_on_one_account_only(three_accounts, run_cli, tmp_path):
    result = run_cli(
        "schedule", "--all", "--every", "1s", "--max-runs", "2",
        "--max-consecutive-failures", "1", env=TOKENS, timeout=60,
    )  # fmt: skip
    assert result.exit_code == 4
    assert "account eu-west: stopped after 1 run(s)" in result.stderr
    assert "account prod: run 2 success" in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "comfysync: error: account eu-west: 1 runs failed in a row"
    )


GOOD = '[accounts.a]\nbase_url = "http://127.0.0.1:9"\n'


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[accounts.a\n", "is not valid TOML"),
        ("[defaults]\nper_page = 5\n", "has no [accounts.NAME] table"),
        ("[acounts.a]\n", "unknown key 'acounts'; did you mean 'accounts'?"),
        (GOOD + "per_pag = 5\n", "[accounts.a] unknown key 'per_pag'; did you mean 'per_page'?"),
        ("[defaults]\ncolour = 1\n" + GOOD, "[defaults] unknown key 'colour'"),
        (GOOD + 'per_page = "5"\n', "[accounts.a] per_page: expected a whole number, not a string"),
        (GOOD + "per_page = 500\n", "[accounts.a] per_page: '500' must be between 1 and 100"),
        (GOOD + "timeout = true\n", "[accounts.a] timeout: expected a number"),
        (GOOD + "allow_http = 1\n", "[accounts.a] allow_http: expected a boolean"),
        (GOOD + 'format = ["xml"]\n', "[accounts.a] format: 'xml' is not one of"),
        (GOOD + "db = 3\n", "[accounts.a] db: expected a string"),
        ('[accounts."a b"]\n', "[accounts.'a b']: an account name is"),
        ("[accounts]\na = 1\n", "accounts.a: expected a table, not an integer"),
        (GOOD + '[accounts.b]\ndb = "data/a.db"\n', "[accounts.b] db: data/a.db is also account a"),
        (GOOD + 'token_env = "T"\ntoken_file = "f"\n', "[accounts.a] token_file: give the token"),
        (GOOD + 'token_env = "1-x"\n', "[accounts.a] token_env: expected an environment"),
        (GOOD + 'schedule = { every = "soon" }\n', "[accounts.a] schedule.every: expected"),
        (GOOD + 'schedule = { hourly = "1" }\n', "[accounts.a] schedule unknown key 'hourly'"),
        (GOOD + 'schedule = { cron = "* *" }\n', "[accounts.a]: '* *' is not a crontab"),
        ('[accounts.a]\nbase_url = "ftp://x"\n', "[accounts.a]: --base-url must be an http(s)"),
    ],
)
def test_a_bad_config_exits_2_naming_the_file_and_the_key(run_cli, tmp_path, config, message):
    write_config(tmp_path, config)
    result = run_cli("config", "check")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("comfysync: error: comfysync.toml"), result.stderr
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


def test_every_command_that_reads_the_file_refuses_a_bad_one_alike(run_cli, tmp_path):
    write_config(tmp_path, GOOD + "per_page = 0\n")
    expected = (
        "comfysync: error: comfysync.toml: [accounts.a] per_page: '0' must be between 1 and 100\n"
    )
    for command in (
        ("sync", "--all"),
        ("sync",),
        ("schedule", "--all"),
        ("accounts",),
        ("status", "--account", "a"),
        ("browse", "--all"),
    ):
        result = run_cli(*command)
        assert (result.exit_code, result.stderr) == (2, expected), command


def test_a_token_in_a_file_others_can_read_is_refused(run_cli, tmp_path):
    config = write_config(tmp_path, GOOD + 'token = "in-the-file-token"\n', mode=0o644)
    result = run_cli("config", "check")
    assert result.exit_code == 2
    assert "[accounts.a] token: the file holding the token is readable by others (mode 0644)" in (
        result.stderr
    )
    (tmp_path / "t").write_text("x")
    (tmp_path / "t").chmod(0o640)
    write_config(tmp_path, GOOD + 'token_file = "t"\n')
    assert "(mode 0640)" in run_cli("config", "check").stderr
    config.chmod(0o600)
    write_config(tmp_path, GOOD + 'token = "in-the-file-token"\n', mode=0o600)
    result = run_cli("config", "check")
    assert result.exit_code == 0, result.stderr
    assert "in-the-file-token" not in result.stdout


def test_config_check_shows_resolved_settings_and_tokens_as_set_or_missing(run_cli, tmp_path):
    write_config(
        tmp_path,
        '[defaults]\nconcurrency = 2\n\n[accounts.a]\nbase_url = "https://a.example"\n'
        'token_env = "A_TOKEN"\nschedule = { cron = "0 3 * * 1-5" }\n\n'
        '[accounts.b]\nbase_url = "https://b.example"\ntoken_env = "B_TOKEN"\nconcurrency = 8\n',
    )
    result = run_cli("config", "check", env={"A_TOKEN": "secret-a"})
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert text.splitlines()[0] == "comfysync.toml: 2 account(s), all valid"
    assert "  token = set (environment variable A_TOKEN)" in text
    assert "  token = missing (environment variable B_TOKEN)" in text
    assert "  concurrency = 2\n" in text and "  concurrency = 8\n" in text
    assert "  schedule = cron 0 3 * * 1-5" in text and "  db = data/b.db" in text
    assert "secret-a" not in text

    missing = run_cli("sync", "--account", "b")
    assert missing.exit_code == 2
    assert "account b: no API token for account b: environment variable B_TOKEN is not set" in (
        missing.stderr
    )
    several = run_cli("sync", "--all", "--token", "t")
    assert several.exit_code == 2 and "--token is given but applies to one account" in (
        several.stderr
    )
    # From the environment (a one-account setup's variable) it ranks below the file: b's own
    # token variable is still the one looked for.
    beside = run_cli("sync", "--account", "b", env={"COMFYCONTROL_TOKEN": "t"})
    assert beside.exit_code == 2 and "--token" not in beside.stderr
    assert "environment variable B_TOKEN is not set" in beside.stderr


def test_config_is_found_by_option_then_environment_then_current_folder(run_cli, tmp_path):
    elsewhere = tmp_path / "conf"
    elsewhere.mkdir()
    write_config(elsewhere, '[accounts.far]\nbase_url = "http://127.0.0.1:9"\n')
    by_env = run_cli("accounts", env={"COMFYSYNC_CONFIG": str(elsewhere / "comfysync.toml")})
    assert by_env.stdout.startswith("far  never synced")
    assert os.sep + "conf" + os.sep + "data" + os.sep + "far.db" in by_env.stdout
    assert run_cli("accounts", "--config", "nope.toml").stderr == (
        "comfysync: error: --config nope.toml: no such configuration file\n"
    )
    assert run_cli("accounts").exit_code == 2  # no file here
    assert run_cli("sync", "--all").stderr.startswith(
        "comfysync: error: --account and --all need a configuration file"
    )


def test_browse_serves_every_account_with_queries_across_them(
    three_accounts, run_cli, start_cli, tmp_path
):
    assert run_cli("sync", "--account", "prod", "--account", "staging", env=TOKENS).exit_code == 0
    port = free_port()
    proc = start_cli("browse", "--account", "prod", "--account", "staging", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    fleets = get_once_served(proc, f"{base}/_memory/all_fleets.json?_shape=array").json()
    counted = {name: sum(r["account"] == name for r in fleets) for name in ("prod", "staging")}
    assert counted == {"prod": 37, "staging": 23}
    assert {r["id"] for r in fleets if r["account"] == "prod"} == set(
        three_accounts["prod"].account.runner_ids()
    )
    joined = httpx.get(
        f"{base}/_memory.json",
        params={
            "sql": "SELECT (SELECT count(*) FROM prod.runners) + "
            "(SELECT count(*) FROM staging.runners) AS runners",
            "_shape": "array",
        },
    ).json()
    assert joined == [{"runners": 60}]
    assert httpx.get(f"{base}/staging/runners.json?_shape=array&_size=1").status_code == 200
    proc.terminate()
    assert "browse http://127.0.0.1:" in proc.communicate(timeout=10)[1]


def test_an_option_with_its_own_parsing_reads_the_same_from_the_file(run_cli, tmp_path):
    """A key whose option splits its value (--notify-on) is read as the command line reads it,
    in the file and as a built-in default alike."""
    write_config(
        tmp_path,
        '[defaults]\nnotify_on = "failure, changes"\n\n[accounts.a]\nbase_url = "http://127.0.0.1:9"\n'
        '\n[accounts.b]\nbase_url = "http://127.0.0.1:9"\nnotify_on = "recovery"\n',
    )
    result = run_cli("config", "check")
    assert result.exit_code == 0, result.stderr
    assert "  notify_on = failure, changes\n" in result.stdout
    assert "  notify_on = recovery\n" in result.stdout
    write_config(tmp_path, '[accounts.a]\nbase_url = "http://127.0.0.1:9"\nnotify_on = "never"\n')
    refused = run_cli("config", "check")
    assert refused.exit_code == 2 and "not 'never'" in refused.stderr
