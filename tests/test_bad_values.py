"""Every bad value of every option of every command: exit 2 and one line, before anything starts.

The table is derived from the click tree, so a new option cannot slip in unchecked: each
parameter must be listed in VALIDATION, either as validated by its (bounded) click type or by
a named validator with values of its own. Hostile values come from the parameter's type, from
its validator and from a generic list, and each is fed to ``pipeline.cli.main`` in process (the
same error mapping as the console script); a few real subprocesses check the same end to end.
Valid values may run: every run is kept on loopback (a closed port or a read-only mirror) and
bounded (``schedule --max-runs 1``, ``browse --metadata-out -``, a simulator that does not serve).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import uvicorn
from conftest import free_port

from pipeline import cli as cli_module
from pipeline.cli import cli

#: The commands that take --config, --account and --all.
ACCOUNT_COMMANDS = ("sync", "schedule", "status", "runs", "history", "changes", "export", "browse")
#: How each parameter's bad values are refused. "type": its click type (a bounded number, a
#: choice, a path, a flag); any other name: the validator that reads that kind of text.
VALIDATION: dict[tuple[str, str], str] = {
    **{
        (command, name): "type"
        for command in ("sync", "schedule")
        for name in (
            "db_path",
            "per_page",
            "concurrency",
            "max_walks",
            "timeout",
            "max_retries",
            "max_retry_after",
            "allow_http",
            "store_header_values",
            "export_dir",
            "export_formats",
            "no_export",
            "keep_snapshots",
            "snapshot",
            "csv_safe",
            "max_delete_ratio",
            "allow_mass_delete",
            "notify_after_failures",
            "ping_style",
            "metrics_file",
        )
    },
    **{
        (command, name): validator
        for command in ("sync", "schedule")
        for name, validator in (
            ("notify", "notify"),  # pipeline.observe.notify.Notifiers
            ("notify_on", "words"),  # Settings.validated
            ("notify_changes", "words"),
            ("notify_fields", "words"),
            ("ping_url", "ping_url"),  # Settings.validated
            ("s3_endpoint_url", "endpoint"),  # Settings.validated
            ("iceberg", "catalog"),  # Settings.validated
            ("iceberg_warehouse", "location"),  # Settings.validated
            ("iceberg_account", "account"),  # pipeline.config.ACCOUNT_NAME
        )
    },
    ("status", "s3_endpoint_url"): "endpoint",  # used only for an s3:// folder
    ("schedule", "metrics_port"): "type",
    ("schedule", "metrics_host"): "metrics_host",  # bound by prometheus_client at start
    ("status", "check"): "type",
    ("status", "max_age"): "duration",  # pipeline.times.duration_seconds
    ("status", "max_failures"): "type",
    ("sync", "base_url"): "url",  # Settings.validated
    ("sync", "token"): "token",  # Settings.validated
    ("sync", "as_json"): "type",
    ("sync", "quiet"): "type",
    ("schedule", "base_url"): "url",
    ("schedule", "token"): "token",
    ("schedule", "every"): "every",  # jobs.triggers.parse_every
    ("schedule", "cron"): "cron",  # jobs.triggers.parse_cron
    ("schedule", "jitter"): "type",
    ("schedule", "timezone_name"): "timezone",  # jobs.triggers.parse_timezone
    ("schedule", "run_now"): "type",
    ("schedule", "max_runs"): "type",
    ("schedule", "max_consecutive_failures"): "type",
    ("schedule", "log_format"): "type",
    ("simulate", "host"): "type",
    ("simulate", "port"): "type",
    ("simulate", "runners"): "type",
    ("simulate", "seed"): "type",
    ("simulate", "token"): "token",  # the bearer token the simulator accepts
    ("simulate", "fail_rate"): "type",
    ("simulate", "rate_limit"): "type",
    ("simulate", "latency"): "latency",  # pipeline.sim.faults.parse_latency
    ("simulate", "drop_connections"): "type",
    ("simulate", "malformed"): "type",
    ("simulate", "churn"): "type",
    ("export", "output"): "type",
    ("export", "as_of"): "instant",  # pipeline.read.history.parse_instant
    ("export", "include_deleted"): "type",
    ("export", "all_versions"): "type",
    ("export", "csv_safe"): "type",
    ("export", "db_path"): "type",
    ("demo", "db_path"): "type",
    ("status", "db_path"): "type",
    ("status", "export_dir"): "type",
    ("status", "as_json"): "type",
    ("runs", "db_path"): "type",
    ("runs", "limit"): "type",
    ("runs", "run_status"): "type",
    ("runs", "as_json"): "type",
    ("history", "runner"): "runner",  # pipeline.read.changelog.resolve_runner
    ("history", "db_path"): "type",
    ("history", "as_json"): "type",
    ("changes", "since"): "since",  # pipeline.read.changelog.parse_since
    ("changes", "db_path"): "type",
    ("changes", "as_json"): "type",
    ("browse", "db_path"): "type",
    ("browse", "port"): "type",
    ("browse", "metadata_out"): "type",
    # The configuration file's accounts (pipeline.config), on every command that has them.
    **{
        (command, name): kind
        for command in ACCOUNT_COMMANDS
        for name, kind in (
            ("config_path", "type"),
            ("account_names", "account"),  # pipeline.config.ACCOUNT_NAME
            ("all_accounts", "type"),
        )
    },
    ("sync", "max_parallel"): "type",
    ("accounts", "config_path"): "type",
    ("accounts", "as_json"): "type",
}

#: Tried on every parameter that takes a value. No absolute file paths: a valid one would be
#: written to. NUL bytes only reach the in-process runs (an argv cannot hold them).
GENERIC = [
    "",
    " ",
    "abc",
    "-1",
    "0",
    "1.5",
    "99999999999999999999",
    "-99999999999999999999",
    "1e309",
    "nan",
    "inf",
    "-inf",
    "\x00",
    "a\x00b",
    "x" * 5000,
    "a\nb",
    "-",
    "\u00e9\U0001f4a5",
    "http://[::1",
    "99999999999d",
    "..",
    "/",
    "a/" * 300 + "x",
]

BY_VALIDATOR = {
    "url": [
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",
        "http://127.0.0.1:-1",
        "http://127.0.0.1:abc",
        "http://127.0.0.1:",
        "http://[::1",
        "http://[::1]:99999",
        "http://[zz]:1",
        "http://::1:1",
        "http://user:secret@127.0.0.1:1",
        "http://127.0.0.1:1/#fragment",
        "http://127.0.0.1:1/?page=2",
        "http://127 .0.0.1:1",
        "http:// 127.0.0.1:1",
        "http://127.0.0.1:1/a b",
        "http://127.0.0.1:1\n",
        "http://127.0.0.1\x00:1",
        "http://%00:1",
        "http://..:1",
        "http://localhost.:1",
        "http://" + "a" * 300 + ".localhost:1",
        "http://xn--zz.localhost:1",
        "http://\u2603.localhost:1",
        "http://-a.localhost:1",
        "ftp://127.0.0.1:1",
        "https://",
        "127.0.0.1:1",
    ],
    "token": ["a\nb", "a\rb", "tok\u00e9n", "a\x7fb", "\t", "Bearer x"],
    "every": ["0s", "-1s", "1y", "1.5h", "1d1h", "99999999999999999999s", "999999999999d", "366d"],
    "cron": [
        "* * * * * *",
        "99 * * * *",
        "*/0 * * * *",
        "0 0 * * 8",
        "* * 31 2 *",
        "0 0 * * 99999999999999999999",
        "*/99999999999999999999 * * * *",
        "0 0 1-99999999999999999999 * *",
    ],
    "timezone": ["Mars/Olympus_Mons", "../../etc/passwd", "/etc/localtime", "UTC\x00", "Etc/"],
    "latency": ["5:", ":5", "1:2:3", "99999999999999999", "5:99999999999999999", "-5", "5:-1"],
    "instant": [
        "0001-01-01T00:00+01:00",
        "9999-12-31T23:59-01:00",
        "2026-13-01",
        "2026-02-30",
        "99999-01-01",
        "2026-11-28T25:00",
    ],
    "since": [
        "0001-01-01T00:00+01:00",
        "9999-12-31T23:59-01:00",
        "99999999999999d",
        "999999999w",
        "2026-13-01",
        "-5d",
        "1y",
    ],
    "runner": ["%", "_", "'; DROP TABLE runners; --", "*"],
    "account": ["a b", "a/b", "a.b", "x" * 65, "\u00e9t\u00e9", "[accounts]", "a\tb"],
    "notify": [
        "nosuch://x",
        "json://",
        "json://user:secret@",
        "mailto://",
        "json://[::1",
        "json://127.0.0.1:99999/x",
        "slack://",
    ],
    "words": ["never", "failure,nope", "FAILURE", "changes:deleted", "status;endpoint", "\u00e9"],
    "ping_url": [
        "http://127.0.0.1:99999",
        "http://[::1",
        "http://127.0.0.1:1/a b",
        "http://127.0.0.1:1\n",
        "ftp://127.0.0.1:1",
        "https://",
        "hc-ping.com/uuid",
        "http://xn--zz.localhost:1",
    ],
    "endpoint": [
        "minio:9000",
        "ftp://127.0.0.1:1",
        "http://",
        "http://127.0.0.1:99999",
        "http://a b",
    ],
    "catalog": ["data/catalog.db", "sqlite:", "://", "sqlite://\x00"],
    "location": ["s3://", "s3:///x", "nosuch://bucket/x", "s3://b//x"],
    "metrics_host": ["256.0.0.1", "no such host", "::1::", "example.invalid"],
    "duration": ["0s", "-1s", "1y", "1.5h", "2h30m", "99999999999999999999s"],
}


#: Nothing listens there: a connection to it is refused at once.
CLOSED = f"http://127.0.0.1:{free_port()}"
_SYNC_BASE = {
    "--base-url": CLOSED,
    "--max-retries": "0",
    "--timeout": "5",
    "--db": "m.db",
}


def base_options(command: str, mirror: Path) -> dict[str, str]:
    """Options under which a command's valid values run quickly, locally, and then stop."""
    if command == "sync":
        return dict(_SYNC_BASE)
    if command == "schedule":
        return {
            **_SYNC_BASE,
            "--every": "1d",
            "--max-runs": "1",
            "--max-consecutive-failures": "1",
        }
    if command == "export":
        return {"--output": "out.csv", "--db": str(mirror)}
    if command == "browse":
        return {"--db": str(mirror), "--metadata-out": "-"}
    if command in ("status", "runs", "history", "changes"):
        return {"--db": str(mirror)}
    if command == "demo":
        return {"--db": "demo.db"}
    return {}


def parameters() -> Iterator[tuple[str, click.Parameter]]:
    for name, command in sorted(cli.commands.items()):
        for param in command.params:
            if param.name is not None and param.expose_value:
                yield name, param


def type_values(param: click.Parameter) -> list[str]:
    """Values at and beyond the edges the parameter's type declares."""
    kind = param.type
    if isinstance(kind, click.IntRange):
        low, high = kind.min, kind.max
        edges = [] if low is None else [str(low - 1)]
        return edges + ([] if high is None else [str(high + 1), str(high * 10)])
    if isinstance(kind, click.FloatRange):
        low, high = kind.min, kind.max
        edges = [] if low is None else [str(low - 0.5), str(low - 1e-9)]
        return edges + ([] if high is None else [str(high + 1e-6), str(high * 1e300)])
    if isinstance(kind, click.Choice):
        return ["nope", *(str(choice).upper() for choice in kind.choices)]
    if isinstance(kind, click.Path):
        return ["no/such/folder/x.db", ".", "./", "m.db/", "x.txt", "x.CSV", ".csv"]
    return []


def hostile_cases() -> Iterator[tuple[str, str, list[str]]]:
    """(command, parameter, args-with-placeholder) for every hostile value of every parameter."""
    for command, param in parameters():
        kind = VALIDATION.get((command, param.name or ""))
        if isinstance(param, click.Option) and param.is_flag:
            for opt in param.opts + param.secondary_opts:
                yield command, param.name or "", [f"{opt}=abc"]
            continue
        values = GENERIC + type_values(param) + BY_VALIDATOR.get(kind or "", [])
        for value in dict.fromkeys(values):
            yield command, param.name or "", [value]


CASES = list(hostile_cases())


def case_id(case: tuple[str, str, list[str]]) -> str:
    command, name, (value,) = case
    return f"{command}-{name}-{ascii(value)[:40]}"


def test_every_parameter_of_every_command_declares_how_bad_values_are_refused():
    for command, param in parameters():
        key = (command, param.name or "")
        assert key in VALIDATION, (
            f"`comfysync {command}` {param.opts}: add validation for this parameter (a bounded "
            "click type from pipeline.cli, or a validator) and register it in VALIDATION"
        )
        kind = param.type
        if VALIDATION[key] != "type":
            assert kind == click.STRING, f"{key}: a validated text parameter is read as text"
            assert VALIDATION[key] in BY_VALIDATOR, f"{key}: no hostile values for its validator"
        elif (isinstance(param, click.Option) and param.is_flag) or isinstance(kind, click.Choice):
            pass
        elif isinstance(kind, click.IntRange | click.FloatRange):
            assert kind.min is not None and kind.max is not None, f"{key}: unbounded {kind}"
            assert isinstance(kind, cli_module.WholeNumber | cli_module.Number), (
                f"{key}: use WholeNumber/Number so the message reads naturally"
            )
        elif isinstance(kind, click.Path):
            assert isinstance(kind, cli_module.FilePath), f"{key}: use FilePath (refuses NUL)"
        elif not isinstance(kind, cli_module.LoopbackHost):
            pytest.fail(f"{key}: {kind!r} does not validate; add a bounded type or a validator")
    registered = set(VALIDATION)
    known = {(command, param.name or "") for command, param in parameters()}
    assert registered == known, (
        f"VALIDATION lists parameters that no longer exist: {registered - known}"
    )


@pytest.fixture
def in_process(tmp_path, monkeypatch, capsys):
    """Run ``main(argv)`` in process in an empty folder; return (exit code, stdout, stderr)."""
    for name in (
        "COMFYCONTROL_BASE_URL",
        "COMFYCONTROL_TOKEN",
        "COMFYSYNC_DB",
        "COMFYSYNC_EXPORT_DIR",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    # `schedule` points the root logger's handlers at its own format: put them back after.
    root = logging.getLogger()
    formatters = [(handler, handler.formatter) for handler in root.handlers]
    levels = {name: logging.getLogger(name).level for name in ("jobs", "apscheduler")}
    capsys.readouterr()

    def run(argv: list[str]) -> tuple[int, str, str]:
        try:
            cli_module.main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    for handler, formatter in formatters:
        handler.setFormatter(formatter)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def assert_refused_cleanly(code: int, stderr: str, folder: Path) -> None:
    assert code != 1, f"internal error: {stderr}"
    assert "Traceback" not in stderr, stderr
    if code == 0:
        return
    lines = stderr.splitlines()
    errors = [line for line in lines if ": error: " in line or "internal error" in line]
    assert lines and lines[-1].startswith("comfysync: error: "), stderr
    if code == 2:
        assert len(lines) == 1, f"more than one line: {stderr!r}"
        left = sorted(p.name for p in folder.iterdir())
        assert left == [], f"refused, yet it left {left} behind: {stderr!r}"
    assert len(errors) <= 1, stderr


@pytest.mark.parametrize("case", CASES, ids=[case_id(case) for case in CASES])
def test_a_hostile_value_is_refused_in_one_line_or_runs_bounded(
    case, in_process, mirror, tmp_path, monkeypatch
):
    command, name, (value,) = case
    if command == "simulate":
        # It would serve until Ctrl+C: everything up to the listening socket is real.
        monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    param = next(p for c, p in parameters() if c == command and p.name == name)
    options = base_options(command, mirror.path)
    if name == "cron":
        del options["--every"]
    if isinstance(param, click.Option) and param.is_flag:
        args = [command, *value_pairs(options), value]
    elif isinstance(param, click.Option):
        for opt in param.opts:
            options.pop(opt, None)
        args = [command, *value_pairs(options), param.opts[-1], value]
    else:  # an argument: history's RUNNER
        args = [command, value, *value_pairs(options)]
    code, _, stderr = in_process(args)
    assert_refused_cleanly(code, stderr, tmp_path)


def value_pairs(options: dict[str, str]) -> list[str]:
    return [item for pair in options.items() for item in pair]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--per-page", "abc"], "'abc' is not a whole number"),
        (["--per-page", "0"], "must be between 1 and 100"),
        (["--per-page", "101"], "must be between 1 and 100"),
        (["--timeout", "soon"], "'soon' is not a number"),
        (["--timeout", "nan"], "must be between"),
    ],
)
def test_numeric_options_say_what_they_want_in_plain_words(in_process, args, message):
    code, _, stderr = in_process(["sync", "--base-url", CLOSED, *args])
    assert code == 2
    assert message in stderr
    assert "integer range" not in stderr and "float range" not in stderr


# -- the same, end to end: the console script as a real process ------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["sync", "--base-url", "http://127.0.0.1:99999", "--max-retries", "0"],
        ["sync", "--base-url", "http://[::1"],
        ["sync", "--base-url", "http://user:pw@127.0.0.1:1"],
        ["sync", "--base-url", "http://xn--zz.localhost:1"],
        ["schedule", "--base-url", CLOSED, "--every", "99999999999d"],
        ["schedule", "--base-url", CLOSED, "--every", "1d", "--jitter", "999999999999"],
        ["schedule", "--base-url", CLOSED, "--cron", "* * * * *", "--timezone", "../UTC"],
        ["runs", "--limit", "99999999999999999999"],
        ["changes", "--since", "0001-01-01T00:00+01:00"],
        ["export", "-o", "x.csv", "--as-of", "9999-12-31T23:59-01:00"],
        ["simulate", "--latency", "99999999999999999"],
        ["simulate", "--port", "70000"],
        ["simulate", "--host", "0.0.0.0"],
    ],
)
def test_bad_values_exit_2_in_one_line_before_anything_starts(run_cli, tmp_path, args):
    result = run_cli(*args, "--db", "m.db", timeout=30) if args[0] != "simulate" else run_cli(*args)
    assert (result.exit_code, result.stdout) == (2, ""), result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("comfysync: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no database, lock or run-log row


def test_a_bad_value_in_the_environment_is_refused_like_one_on_the_command_line(run_cli, tmp_path):
    result = run_cli(
        "sync", env={"COMFYCONTROL_BASE_URL": "http://127.0.0.1:99999", "COMFYSYNC_DB": "m.db"}
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("comfysync: error: ") and "99999" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_valid_closed_port_is_an_upstream_failure_recorded_in_the_run_log(run_cli, tmp_path):
    result = run_cli("sync", "--base-url", CLOSED, "--max-retries", "0", "--db", "m.db", timeout=60)
    assert result.exit_code == 4
    assert result.stderr.count("\n") == 1 and "connection failed" in result.stderr
    conn = sqlite3.connect(tmp_path / "m.db")
    try:
        status, error = conn.execute("SELECT status, error FROM sync_runs").fetchone()
    finally:
        conn.close()
    assert status == "failed" and "connection failed" in error and "Group" not in error


@pytest.mark.parametrize(
    "args",
    [
        ["--base-url", "http://user:hunter2@127.0.0.1:99999"],
        ["--base-url", "http://user:hunter2@[::1"],
        ["--base-url", "http://127.0.0.1:1", "--token", "hunter2\n"],
        ["--base-url", "http://127.0.0.1:1", "--token", "hunter2 \u00e9"],
    ],
)
def test_a_refused_url_or_token_never_shows_the_secret_in_it(in_process, args):
    code, _, stderr = in_process(["sync", "--db", "m.db", *args])
    assert code == 2 and stderr.startswith("comfysync: error: ")
    assert "hunter2" not in stderr
