"""The ``comfysync`` command. The only module that knows about click and exit codes.

Errors from the library arrive as ``pipeline.errors`` classes, each carrying its exit code;
``main`` turns them into one line on stderr (a traceback only with ``--debug``), shown through
``pipeline.printable`` like every log line and every value printed for people, so text from
upstream can never drive the terminal or forge a line. Heavy modules are imported inside the
commands so ``comfysync --help`` starts instantly.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from pipeline import __version__
from pipeline.config import (
    ACCOUNT_NAME,
    ACCOUNT_NAME_FORMS,
    CONFIG_ENV,
    Account,
    Key,
    find_config,
    load_config,
)
from pipeline.errors import ComfySyncError, ConfigurationError, RunnerNotFoundError
from pipeline.printable import PrintableFormatter, printable, printable_json, printable_lines
from pipeline.settings import (
    CHANGE_KINDS,
    DEFAULT_BASE_URL,
    DEFAULT_DB_PATH,
    DEFAULT_EXPORT_DIR,
    DEMO_DB_PATH,
    EXPORT_FORMATS,
    MAX_PER_PAGE,
    PING_STYLES,
    SNAPSHOT_WHEN,
    Settings,
    is_loopback_host,
    refuse_blank_path,
)
from pipeline.store.keyfile import KEY_ENV

if TYPE_CHECKING:
    from pipeline.outputs.objects import ObjectPath
    from pipeline.read.changelog import RunnerHistory
    from pipeline.read.overview import SyncRun
    from pipeline.store.sqlite import Database
    from pipeline.sync.run import SyncSummary

_debug = False
FC = TypeVar("FC", bound=Callable[..., Any])
T = TypeVar("T")
#: The cap of counts a user gives (runs to show, runs to make, snapshots to keep): beyond any
#: real need, and far inside what SQLite and the scheduler can hold.
MANY = 1_000_000_000


def _shown(value: object) -> str:
    """A value quoted for an error line: repr (so control characters stay visible), shortened."""
    text = repr(value if isinstance(value, str) else str(value))
    return text if len(text) <= 60 else text[:50] + "...'"


def _number_text(number: float) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


class Number(click.FloatRange):
    """A finite number between two bounds, both required: an unbounded one would reach SQLite
    or the scheduler as a number they cannot hold. Refused in plain words, not click's.
    ``min_open``: strictly above the lower bound."""

    name = "number"
    whole = False

    def __init__(self, min: float, max: float, *, min_open: bool = False) -> None:
        super().__init__(min, max, min_open=min_open)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        kind, what = (int, "a whole number") if self.whole else (float, "a number")
        try:
            number = kind(str(value).strip()) if isinstance(value, bool | str) else value
        except ValueError:
            self.fail(f"{_shown(value)} is not {what}", param, ctx)
        if not ((self.whole or math.isfinite(number)) and self._within(number)):
            low, high = _number_text(self.min or 0), _number_text(self.max or 0)
            wanted = f"above {low} and at most" if self.min_open else f"between {low} and"
            self.fail(f"{_shown(value)} must be {wanted} {high}", param, ctx)
        return kind(number)

    def _within(self, value: float) -> bool:
        assert self.min is not None and self.max is not None
        above_min = self.min < value if self.min_open else self.min <= value
        return above_min and value <= self.max

    def _describe_range(self) -> str:  # the [range] --help shows
        low, high = _number_text(self.min or 0), _number_text(self.max or 0)
        return f"{low}<x<={high}" if self.min_open else f"{low}-{high}"


class WholeNumber(Number):
    """A whole number between two bounds."""

    name = "integer"
    whole = True


class FilePath(click.Path):
    """A file or folder path the operating system can take: not empty, no NUL byte, and no
    name longer than file systems hold (each would fail later, deep in a sync or a write)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            # click would turn '' into Path('.'), the current folder: refused before that.
            if param is None:
                refuse_blank_path(value, "a path", required=True)
            else:  # named by its long form: --output, not -o
                refuse_blank_path(value, max(param.opts, key=len), required=param.required)
            if "\x00" in value:
                self.fail(f"{_shown(value)} contains a NUL byte", param, ctx)
            try:
                encoded = os.fsencode(value)
            except UnicodeError:
                self.fail(f"{_shown(value)} cannot be a file name here", param, ctx)
            if len(encoded) >= 4096 or any(len(part) > 255 for part in encoded.split(b"/")):
                self.fail(f"{_shown(value)} is too long for a file path", param, ctx)
        return super().convert(value, param, ctx)


class ExportLocation(FilePath):
    """A local folder (a Path, checked as FilePath does), or an object-store URL such as
    ``s3://bucket/prefix`` (an ObjectPath; its endpoint is bound by ``_settings``)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and "://" in value:
            from pipeline.outputs.objects import ObjectPath, is_url

            if is_url(value):
                try:
                    return ObjectPath.parse(value)
                except ConfigurationError as exc:
                    self.fail(exc.message, param, ctx)
        return super().convert(value, param, ctx)


class LoopbackHost(click.ParamType[str, str]):
    """A host ``is_loopback_host`` calls this machine: the simulator serves fake secrets without
    TLS and must never listen beyond it (the simulator checks the same again)."""

    name = "host"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value)
        if not is_loopback_host(text):
            self.fail(
                f"{_shown(text)} is not a loopback address (127.0.0.1, ::1 or localhost)",
                param,
                ctx,
            )
        return text


def _enable_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    global _debug
    if value:
        _debug = True
        # Our loggers and httpx's request lines; never httpcore's, which dumps raw headers.
        logging.getLogger("pipeline").setLevel(logging.DEBUG)
        logging.getLogger("jobs").setLevel(logging.DEBUG)
        logging.getLogger("httpx").setLevel(logging.INFO)
    return value


def db_option(
    help_text: str,
    *,
    dir_okay: bool = True,
    envvar: str | None = "COMFYSYNC_DB",
    default: Path = DEFAULT_DB_PATH,
) -> Callable[[FC], FC]:
    """``--db`` / COMFYSYNC_DB, the same for every command that works on a database.

    With ``dir_okay`` False click refuses a folder before the command starts; otherwise the
    command refuses it in its own words. The demo, whose database is its own, passes no
    ``envvar``.
    """
    return click.option(
        "--db",
        "db_path",
        type=FilePath(path_type=Path, dir_okay=dir_okay),
        envvar=envvar,
        default=default,
        show_envvar=True,
        help=help_text,
    )


csv_safe_option = click.option(
    "--csv-safe",
    is_flag=True,
    help="In CSV, prefix cells starting with = + - @ tab or CR with ' so that spreadsheets "
    "show them instead of running them (alters the data; see the Exports page of the docs).",
)

s3_endpoint_option = click.option(
    "--s3-endpoint-url",
    envvar="COMFYSYNC_S3_ENDPOINT_URL",
    show_envvar=True,
    default=None,
    metavar="URL",
    help="Endpoint of an S3-compatible store (MinIO, R2) for s3:// locations.",
)


def debug_option(help_text: str) -> Callable[[FC], FC]:
    """``--debug``, described as the command uses it: only some commands make requests."""
    return click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_enable_debug,
        help=help_text,
    )


DEBUG_REQUESTS = "Log every request and show tracebacks."
DEBUG_READS = "Show a traceback with any error."


class _WholeSentenceCommand(click.Command):
    """A command whose line in ``comfysync --help`` is its first sentence, never cut short.

    click shortens a first sentence that is longer than the room left on the line, ending it
    with "..."; a sentence wrapped onto a second line still says what the command does.
    """

    def get_short_help_str(self, limit: int = 45) -> str:
        return super().get_short_help_str(limit=10_000)


class _Group(click.Group):
    command_class = _WholeSentenceCommand

    def get_short_help_str(self, limit: int = 45) -> str:  # as a sub-group's line
        return super().get_short_help_str(limit=10_000)


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.version_option(__version__, prog_name="comfysync")
@debug_option("Show tracebacks; with sync, schedule, demo and simulate, log every request.")
def cli() -> None:
    """Keep an exact, versioned local mirror of a ComfyControl account's runners.

    Start with `comfysync demo` (no account needed), then `comfysync sync`.
    """


def sync_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options of one sync, shared by `sync` and `schedule`; the command gets `settings`.

    One list of options, so a scheduled run is configured exactly like a one-off one. Every
    parameter named like a Settings field goes into ``settings``; the others pass through.
    """

    @functools.wraps(command)
    def with_settings(**options: Any) -> None:
        chosen = _chosen_accounts(options)
        values = {name: options.pop(name) for name in _sync_option_names()}
        if chosen is None:
            command(settings=_settings(values), accounts=[], **options)
            return
        accounts = [(account, _account_settings(account, values)) for account in chosen]
        command(settings=None, accounts=accounts, **options)

    for option in reversed((*_SYNC_OPTIONS, *_ACCOUNT_OPTIONS)):
        with_settings = option(with_settings)
    return with_settings


def _account_name(value: str | None, option: str) -> str | None:
    """``value`` if it is an account name (``pipeline.config.ACCOUNT_NAME``), else a usage error."""
    if value is not None and not ACCOUNT_NAME.fullmatch(value):
        raise click.BadParameter(
            f"{_shown(value)}: a name is {ACCOUNT_NAME_FORMS}", param_hint=option
        )
    return value


def _settings(values: dict[str, Any], account: Account | None = None) -> Settings:
    """The Settings of one sync from its option values (``no_export`` clears ``export_dir``)."""
    fields = {name: value for name, value in values.items() if name in _SETTINGS_FIELDS}
    # The key only from the environment: a command line is visible to other users.
    fields["redaction_key"] = os.environ.get(KEY_ENV) or None
    if values["no_export"]:
        fields["export_dir"] = None
    elif values["s3_endpoint_url"] and not isinstance(fields["export_dir"], Path):
        fields["export_dir"] = dataclasses.replace(
            fields["export_dir"], endpoint_url=values["s3_endpoint_url"]
        )
    return Settings(**fields, account=account.name if account else None)


_SYNC_OPTIONS = (
    click.option(
        "--base-url",
        envvar="COMFYCONTROL_BASE_URL",
        default=DEFAULT_BASE_URL,
        show_envvar=True,
        help="ComfyControl API root.",
    ),
    click.option(
        "--token",
        envvar="COMFYCONTROL_TOKEN",
        show_envvar=True,
        default=None,
        show_default=False,
        help="API token (prefer the environment variable: command lines are visible to others).",
    ),
    db_option("SQLite database to sync into."),
    click.option(
        "--per-page",
        type=WholeNumber(1, MAX_PER_PAGE),
        default=MAX_PER_PAGE,
        help="Runners per page request.",
    ),
    click.option(
        "--concurrency",
        type=WholeNumber(1, 32),
        default=4,
        help="Page requests in flight at once.",
    ),
    click.option(
        "--max-walks",
        type=WholeNumber(1, 20),
        default=3,
        help="Walks to try before settling for an incomplete one (no deletions then).",
    ),
    click.option(
        "--timeout",
        type=Number(0.1, 3600),
        default=30.0,
        help="Seconds to wait for each response.",
    ),
    click.option(
        "--max-retries",
        type=WholeNumber(0, 20),
        default=5,
        help="Retries per page on connection errors, timeouts, 429 and 5xx.",
    ),
    click.option(
        "--max-retry-after",
        type=Number(0, 86400),
        default=60.0,
        metavar="SECONDS",
        help="Fail at once (exit 4) when the API asks (Retry-After) to wait longer than this.",
    ),
    click.option(
        "--allow-http",
        is_flag=True,
        help="Allow plain http:// to a non-loopback host (sends the token unencrypted).",
    ),
    click.option(
        "--store-header-values",
        is_flag=True,
        help="Store runner header values in clear instead of redacted (they are secrets).",
    ),
    click.option(
        "--export-dir",
        type=ExportLocation(path_type=Path),
        envvar="COMFYSYNC_EXPORT_DIR",
        default=DEFAULT_EXPORT_DIR,
        show_envvar=True,
        help="Folder for the snapshot files written after each sync, or an object-store "
        "URL (s3://bucket/prefix; credentials from the AWS environment or profile).",
    ),
    s3_endpoint_option,
    click.option(
        "--format",
        "export_formats",
        type=click.Choice(EXPORT_FORMATS),
        multiple=True,
        default=EXPORT_FORMATS,
        help="Snapshot format; repeat for several.",
    ),
    click.option("--no-export", is_flag=True, help="Write no snapshot files after the sync."),
    click.option(
        "--keep-snapshots",
        type=WholeNumber(1, MANY),
        default=None,
        metavar="N",
        help="Delete the oldest snapshot files beyond the N newest per format (default: keep all).",
    ),
    click.option(
        "--snapshot",
        type=click.Choice(SNAPSHOT_WHEN),
        default="changed",
        help="Write every snapshot file from the store after every sync (always), or only "
        "when the fleet changed since the latest files, on a new day, or when those are "
        "missing or damaged, patching the latest files when they are in place (changed).",
    ),
    csv_safe_option,
    click.option(
        "--iceberg",
        metavar="CATALOG_URI",
        default=None,
        help="After each sync, commit the fleet, its versions and the run log to Apache "
        "Iceberg tables in this catalog (sqlite:///data/catalog.db, or a REST catalog's URL).",
    ),
    click.option(
        "--iceberg-warehouse",
        metavar="LOCATION",
        default=None,
        show_default="iceberg/ beside the database",
        help="Where the Iceberg tables' files go: a folder or s3://bucket/prefix.",
    ),
    click.option(
        "--iceberg-account",
        metavar="NAME",
        callback=lambda ctx, param, value: _account_name(value, "--iceberg-account"),
        default=None,
        show_default="the config file's account, else the database's identifier",
        help="The account column of this database's rows in the Iceberg tables.",
    ),
    click.option(
        "--max-delete-ratio",
        type=Number(0, 1),
        default=0.5,
        help="Withhold all deletions (run ends partial) if more than this share of the present "
        "runners would be marked deleted; an empty listing always counts.",
    ),
    click.option(
        "--allow-mass-delete",
        is_flag=True,
        help="Apply deletions this once even beyond --max-delete-ratio.",
    ),
    # -- what a sync tells the outside world (pipeline.observe; docs/operations.md) --
    click.option(
        "--notify",
        multiple=True,
        envvar="COMFYSYNC_NOTIFY",
        show_envvar=True,
        metavar="URL",
        help="Apprise URL to notify (Slack, ntfy, Discord, email, json://...); repeatable. "
        "Prefer the environment variable (space- or comma-separated): URLs carry credentials.",
    ),
    click.option(
        "--notify-on",
        callback=lambda ctx, param, value: _words(value),
        default="failure,recovery",
        metavar="EVENTS",
        help="When to notify, comma-separated: failure (after --notify-after-failures failed "
        "runs in a row, once), recovery (the first good run after that), changes.",
    ),
    click.option(
        "--notify-after-failures",
        type=WholeNumber(1, MANY),
        default=1,
        metavar="N",
        help="Send the failure notice when this many runs have failed in a row.",
    ),
    click.option(
        "--notify-changes",
        callback=lambda ctx, param, value: _words(value),
        default=",".join(CHANGE_KINDS),
        metavar="KINDS",
        help="Which changes a change notice reports: created, updated, deleted, restored, "
        "disabled (a runner whose status became disabled).",
    ),
    click.option(
        "--notify-fields",
        callback=lambda ctx, param, value: _words(value),
        default="",
        show_default="any",
        metavar="FIELDS",
        help="Report updates and restorations only when they change one of these fields "
        "(e.g. status,endpoint).",
    ),
    click.option(
        "--ping-url",
        envvar="COMFYSYNC_PING_URL",
        show_envvar=True,
        default=None,
        metavar="URL",
        help="Dead man's switch: ping URL/start, then URL or URL/fail with the outcome "
        "(Healthchecks); prefer the environment variable.",
    ),
    click.option(
        "--ping-style",
        type=click.Choice(PING_STYLES),
        default=PING_STYLES[0],
        help="How --ping-url is called: healthchecks, or an uptime-kuma push URL.",
    ),
    click.option(
        "--metrics-file",
        type=FilePath(path_type=Path, dir_okay=False),
        default=None,
        help="After each sync, write Prometheus metrics to this file, atomically "
        "(node_exporter textfile format).",
    ),
)


def _words(value: str) -> tuple[str, ...]:
    """A comma- or space-separated option value as its words."""
    return tuple(word for word in value.replace(",", " ").split() if word)


_SETTINGS_FIELDS = frozenset(field.name for field in dataclasses.fields(Settings))
#: Which accounts of the configuration file (pipeline.config) a command acts on.
_ACCOUNT_OPTIONS = (
    click.option(
        "--config",
        "config_path",
        type=FilePath(path_type=Path, dir_okay=False),
        default=None,
        show_default=f"${CONFIG_ENV}, else ./comfysync.toml if there",
        help="Configuration file naming the accounts (see docs/accounts.md).",
    ),
    click.option(
        "--account",
        "account_names",
        multiple=True,
        metavar="NAME",
        help="Act on this account of the configuration file; repeat for several.",
    ),
    click.option(
        "--all",
        "all_accounts",
        is_flag=True,
        help="Act on every account of the configuration file.",
    ),
)


@cli.command()
@sync_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="Print only errors and warnings (for cron mail).")
@click.option(
    "--max-parallel",
    type=WholeNumber(1, 32),
    default=2,
    help="With several accounts: how many sync at once, each under its own lock.",
)
@debug_option(DEBUG_REQUESTS)
def sync(
    settings: Settings | None,
    accounts: list[tuple[Account, Settings | ConfigurationError]],
    as_json: bool,
    quiet: bool,
    max_parallel: int,
) -> None:
    """Mirror every runner into the database, recording what changed.

    Deletions are only recorded when the walk over all pages is proven complete and would not
    delete a mass of the fleet (--max-delete-ratio); otherwise the run ends `partial` and says
    why. Runners that all belong to another account than the database's are refused. Then
    the fleet is written as snapshot files (Parquet and CSV) under --export-dir; a snapshot
    that fails is a warning, never a failed sync. One sync at a time per database. SIGINT or
    SIGTERM stops it before it applies anything (or lets the apply it is in finish).

    With a configuration file, --account NAME or --all syncs its accounts, --max-parallel at
    once; each line (each --json object) names its account, one failing does not stop the
    others, and the exit code is the worst of theirs.

    Exit codes: 0 success or partial, 2 usage or configuration, 3 authentication, 4 upstream
    failure or full disk (nothing applied), 5 another sync is running, 6 stopped by a signal
    (nothing applied).
    """
    from pipeline.observe.watch import observed_sync
    from pipeline.sync.stopping import stop_on_signals

    if as_json and quiet:
        raise click.UsageError("--json and --quiet cannot be combined")
    if settings is None:
        chosen = {account.name: settings for account, settings in accounts}
        _sync_accounts(chosen, max_parallel=max_parallel, as_json=as_json, quiet=quiet)
        return
    show_progress = sys.stderr.isatty() and not (as_json or quiet)
    with stop_on_signals() as stop, _ProgressBar(enabled=show_progress) as progress:
        summary = observed_sync(settings, on_progress=progress.update, stop=stop)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(summary), sort_keys=True))
    elif not quiet:
        click.echo(describe_summary(summary))


@cli.command()
@sync_options
@click.option(
    "--every", metavar="N[s|m|h|d|w]", help="Sync at this interval: 30s, 15m, 2h, 1d, 1w."
)
@click.option(
    "--cron",
    metavar="'M H DOM MON DOW'",
    help="Sync on a standard 5-field crontab, e.g. '*/15 * * * *' (weekday 0 = Sunday).",
)
@click.option(
    "--jitter",
    type=WholeNumber(0, 86_400),  # a day: runs later than that are no longer "on the schedule"
    default=0,
    metavar="SECONDS",
    help="Delay each run by a random 0..SECONDS (spreads many mirrors' load).",
)
@click.option(
    "--timezone",
    "timezone_name",
    default="UTC",
    help="Time zone (IANA name) in which --cron is read and next run times are shown.",
)
@click.option(
    "--run-now/--no-run-now", default=True, help="Sync once at start, then on the schedule."
)
@click.option(
    "--max-runs",
    type=WholeNumber(1, MANY),
    default=None,
    show_default="never",
    help="Stop (exit 0) after this many runs; skipped ticks do not count.",
)
@click.option(
    "--max-consecutive-failures",
    type=WholeNumber(1, MANY),
    default=None,
    show_default="never",
    help="Stop with exit 4 after this many failed runs in a row.",
)
@click.option(
    "--metrics-port",
    type=WholeNumber(0, 65535),
    default=None,
    help="Serve Prometheus metrics on this port at /metrics (0: any free port, logged).",
)
@click.option("--metrics-host", default="127.0.0.1", help="Address --metrics-port listens on.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    help="Log lines on stderr: text, or json (one object per line, for log shippers).",
)
@debug_option(DEBUG_REQUESTS)
def schedule(
    settings: Settings | None,
    accounts: list[tuple[Account, Settings | ConfigurationError]],
    every: str | None,
    cron: str | None,
    jitter: int,
    timezone_name: str,
    run_now: bool,
    max_runs: int | None,
    max_consecutive_failures: int | None,
    metrics_port: int | None,
    metrics_host: str,
    log_format: str,
) -> None:
    """Sync on a schedule, in the foreground, until SIGINT or SIGTERM.

    Takes every `sync` option, plus exactly one of --every or --cron; with a configuration
    file's accounts (--account, --all), each runs on its own `schedule` from the file in one
    process, with its own counts, unless --every or --cron is given for all. Runs never overlap,
    with each other or with any other sync of the database (a tick that finds one running
    is skipped). A failed run is logged and recorded, and the schedule goes on. After each
    run it logs one line: status, counts, duration, next run time. SIGINT or SIGTERM: no
    new run starts, a run in progress stops before applying (or finishes its apply), exit 0.
    """
    from jobs.log_format import configure_logging
    from jobs.scheduler import run_account_schedules, run_schedule

    metrics = None if metrics_port is None else (metrics_host, metrics_port)
    if settings is None:  # each account on its own schedule, unless the command line sets one
        if metrics is not None and len(accounts) > 1:
            raise click.UsageError(
                "--metrics-port serves one database's metrics: pick one account with --account"
            )
        plans = {}
        for account, chosen in accounts:
            if isinstance(chosen, ConfigurationError):
                raise chosen
            given = {"every": every, "cron": cron} if every or cron else account.schedule
            plan = _schedule_plan(
                given.get("every"),
                given.get("cron"),
                jitter,
                timezone_name,
                run_now,
                max_runs,
                max_consecutive_failures,
                metrics,
                account=account.name,
            )
            plans[account.name] = (chosen, plan)
        configure_logging(log_format)
        if metrics is not None:  # the one account, with its metrics served
            run_schedule(*plans.popitem()[1])
        else:
            run_account_schedules(plans)
        return
    plan = _schedule_plan(
        every, cron, jitter, timezone_name, run_now, max_runs, max_consecutive_failures, metrics
    )
    configure_logging(log_format)
    run_schedule(settings, plan)


def _schedule_plan(
    every: str | None,
    cron: str | None,
    jitter: int,
    timezone_name: str,
    run_now: bool,
    max_runs: int | None,
    max_consecutive_failures: int | None,
    metrics_address: tuple[str, int] | None = None,
    *,
    account: str | None = None,
) -> Any:
    """The SchedulePlan of ``schedule``'s options (of one account's, with ``account``)."""
    from jobs import triggers
    from jobs.scheduler import SchedulePlan

    if (every is None) == (cron is None):
        wanted = f"--every ({triggers.EVERY_FORMS}) or --cron ({triggers.CRON_FORMS})"
        if account is not None:
            raise click.UsageError(
                f"account {account} has no schedule in the configuration file: give it one "
                f'(schedule = {{ every = "15m" }}) or pass {wanted}'
            )
        raise click.UsageError(f"pass exactly one of {wanted}")
    zone = _parsed(triggers.parse_timezone, timezone_name, "--timezone")
    if every is not None:
        interval = _parsed(triggers.parse_every, every, "--every")
        trigger = triggers.interval_trigger(interval, zone, jitter=jitter)
        description = f"every {every.strip()}"
    else:
        assert cron is not None
        trigger = _parsed(
            lambda text: triggers.parse_cron(text, zone, jitter=jitter), cron, "--cron"
        )
        description = f"cron '{cron}' in {zone.key}"
    if jitter:
        description += f", jitter up to {jitter} s"
    return SchedulePlan(
        trigger=trigger,
        description=description,
        timezone=zone,
        run_now=run_now,
        max_runs=max_runs,
        max_consecutive_failures=max_consecutive_failures,
        metrics_address=metrics_address,
    )


def _parsed(parse: Callable[[str], Any], value: str, option: str) -> Any:
    """``parse(value)``, with its ValueError turned into click's usage error for ``option``."""
    try:
        return parse(value)
    except ValueError as exc:
        raise click.BadParameter(
            str(exc), ctx=click.get_current_context(), param_hint=f"'{option}'"
        ) from None


# -- many accounts from one configuration file (pipeline.config) -----------------------------

#: Options that name one account's upstream or database: from the command line they may
#: apply to one chosen account, never to several at once. Their environment variables stand
#: for the one account of a setup without a file, so they rank below the file's tables.
_ONE_ACCOUNT_ONLY = ("base_url", "token", "db_path")
#: Sync options that are no key of the file: a token has keys of its own, and a mass
#: deletion is allowed once, by hand.
_NOT_IN_FILE = frozenset({"token", "allow_mass_delete"})
#: A file key named after its option where the parameter's name differs (--db, --format).
_FILE_KEY = {"db_path": "db", "export_formats": "format"}


@functools.cache
def _sync_params() -> tuple[click.Option, ...]:
    """The sync options as parameters, read from a command that has them alone."""

    def holder() -> None:
        """Carries the sync options."""

    for option in _SYNC_OPTIONS:
        holder = option(holder)
    params = click.command()(holder).params
    return tuple(param for param in params if isinstance(param, click.Option))


def _sync_option_names() -> list[str]:
    return [param.name for param in _sync_params() if param.name]


def _config_keys() -> dict[str, Key]:
    """The file's keys: one per sync option, checked by the option's own type, so an option
    added to the sync options is a key of the file with no more code."""
    return {
        _FILE_KEY.get(param.name, param.name): Key(
            param.name, functools.partial(_file_value, param), isinstance(param.type, click.Path)
        )
        for param in _sync_params()
        if param.name and param.name not in _NOT_IN_FILE
    }


def _file_value(param: click.Option, value: object) -> Any:
    """``value`` from the file as ``param`` takes it; ValueError saying what it expects."""
    if param.is_flag:
        ok, wanted = isinstance(value, bool), "a boolean"
    elif param.multiple:
        value = [value] if isinstance(value, str) else value
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        wanted = "a string or an array of strings"
    elif isinstance(param.type, Number):
        kinds = (int,) if param.type.whole else (int, float)
        ok = isinstance(value, kinds) and not isinstance(value, bool)
        wanted = "a whole number" if param.type.whole else "a number"
    else:
        ok, wanted = isinstance(value, str), "a string"
    if not ok:
        raise ValueError(f"expected {wanted}")
    try:
        return param.process_value(click.get_current_context(), value)  # its callback too
    except click.BadParameter as exc:
        raise ValueError(exc.message) from None


def _given(name: str) -> bool:
    """Whether the option ``name`` came from the command line or the environment."""
    source = click.get_current_context().get_parameter_source(name)
    return source in (
        click.core.ParameterSource.COMMANDLINE,
        click.core.ParameterSource.ENVIRONMENT,
    )


def _on_command_line(name: str) -> bool:
    source = click.get_current_context().get_parameter_source(name)
    return source == click.core.ParameterSource.COMMANDLINE


def _option_text(name: str) -> str:
    param = next(p for p in click.get_current_context().command.params if p.name == name)
    return max(param.opts, key=len)


def _chosen_accounts(options: dict[str, Any]) -> tuple[Account, ...] | None:
    """The accounts ``--account``/``--all`` choose (popped from ``options``), or None to work
    on one database as without a file: there is no file, or ``--db`` names the database."""
    config_path = options.pop("config_path")
    names, every = options.pop("account_names"), options.pop("all_accounts")
    if names and every:
        raise click.UsageError("pass --account NAME or --all, not both")
    for name in names:
        if not ACCOUNT_NAME.fullmatch(name):
            raise click.BadParameter(
                f"{_shown(name)} is not an account name ({ACCOUNT_NAME_FORMS})",
                param_hint="'--account'",
            )
    path = find_config(config_path)
    if path is None:
        if names or every:
            raise click.UsageError(
                f"--account and --all need a configuration file: pass --config, set "
                f"{CONFIG_ENV} or create ./comfysync.toml"
            )
        return None
    if not (names or every) and _on_command_line("db_path"):
        return None
    chosen = load_config(path, _config_keys()).select(names)
    for name in _ONE_ACCOUNT_ONLY:
        if len(chosen) > 1 and _on_command_line(name):
            raise click.UsageError(
                f"{_option_text(name)} is given but applies to one account; pick one with "
                f"--account, or set it per account in {path}"
            )
    return chosen


def _account_values(account: Account, values: dict[str, Any]) -> dict[str, Any]:
    """The sync option values for ``account``. Precedence, highest first: command line,
    environment, the account's table, [defaults], built-in defaults; the environment of
    ``_ONE_ACCOUNT_ONLY`` comes after [defaults]."""

    def overrides_file(name: str) -> bool:
        return _on_command_line(name) if name in _ONE_ACCOUNT_ONLY else _given(name)

    token_from_file = account.token_source != "none" and not _on_command_line("token")
    merged = {**values, "token": account.token if token_from_file else values["token"]}
    merged.update({k: v for k, v in account.options.items() if not overrides_file(k)})
    return merged


def _account_settings(account: Account, values: dict[str, Any]) -> Settings | ConfigurationError:
    """``account``'s Settings, or why it has none: its token is not where the file says."""
    settings = _settings(_account_values(account, values), account)
    if settings.token is None and account.token_source != "none":
        return ConfigurationError(
            f"no API token for account {account.name}: {account.token_source} is not set"
        )
    return settings


def _labelled(account: str, text: str) -> str:
    return "\n".join(f"{account}: {line}" for line in text.splitlines())


def _account_failed(account: str, exc: ComfySyncError) -> None:
    click.echo(f"comfysync: error: account {account}: {printable(exc.message)}", err=True)


#: The name of a thread syncing one account, before the account's name.
_ACCOUNT_THREAD = "comfysync-account "


class _AccountLogLabel(logging.Filter):
    """Starts the log lines of an account's sync (its warnings) with the account's name."""

    def filter(self, record: logging.LogRecord) -> bool:
        account = (record.threadName or "").removeprefix(_ACCOUNT_THREAD)
        if account != record.threadName and not getattr(record, "account_labelled", False):
            record.msg, record.account_labelled = f"account {account}: {record.msg}", True
        return True


@contextmanager
def _log_filter(label: logging.Filter) -> Iterator[None]:
    """``label`` on every handler of the root logger while the block runs."""
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(label)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(label)


def _sync_accounts(
    accounts: dict[str, Settings | ConfigurationError],
    *,
    max_parallel: int,
    as_json: bool,
    quiet: bool,
) -> None:
    """Sync ``accounts``, ``max_parallel`` at once; each result is shown as it comes, and the
    exit is the worst exit code among them."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from pipeline.observe.watch import observed_sync
    from pipeline.sync.stopping import leave_stop_signals_to_the_main_thread, stop_on_signals

    def sync_one(name: str, settings: Settings | ConfigurationError) -> SyncSummary:
        if isinstance(settings, ConfigurationError):
            raise settings
        threading.current_thread().name = f"{_ACCOUNT_THREAD}{name}"  # see _AccountLogLabel
        try:
            return observed_sync(settings, stop=stop)
        finally:
            threading.current_thread().name = "comfysync-account"

    worst = 0
    label = _AccountLogLabel()
    with (
        _log_filter(label),
        stop_on_signals() as stop,
        ThreadPoolExecutor(
            max_parallel,
            thread_name_prefix="comfysync-account",
            initializer=leave_stop_signals_to_the_main_thread,
        ) as pool,
    ):
        futures = {pool.submit(sync_one, *item): item[0] for item in accounts.items()}
        for future in as_completed(futures):
            name = futures[future]
            try:
                summary = future.result()
            except Exception as exc:
                if not isinstance(exc, ComfySyncError):  # its text could quote a secret
                    if _debug:
                        click.echo(
                            printable_lines("".join(traceback.format_exception(exc))), err=True
                        )
                    exc = ComfySyncError(f"internal error ({type(exc).__name__})")
                worst = max(worst, exc.exit_code)
                _account_failed(name, exc)
                if as_json:
                    failed = {"exit_code": exc.exit_code, "error": exc.message, "status": "failed"}
                    click.echo(json.dumps({"account": name, **failed}, sort_keys=True))
                continue
            if as_json:
                click.echo(
                    json.dumps({"account": name, **dataclasses.asdict(summary)}, sort_keys=True)
                )
            elif not quiet:
                click.echo(_labelled(name, describe_summary(summary)))
    if worst:
        raise click.exceptions.Exit(worst)


@dataclasses.dataclass
class _PerAccount:
    """What a read command prints while it runs once per account: the account it is at, and
    the JSON of every account so far, each object marked with its account."""

    account: str = ""
    collected: list[Any] = dataclasses.field(default_factory=list)
    #: The worst monitoring-plugin code of ``status --check`` across the accounts.
    exit_code: int = 0

    def collect(self, value: Any) -> None:
        items = value if isinstance(value, list) else [value]
        self.collected.extend({"account": self.account, **item} for item in items)


_per_account: _PerAccount | None = None


def _say(text: str) -> None:
    """``text`` on stdout; while a command runs per account, each line starts with its name."""
    click.echo(_labelled(_per_account.account, text) if _per_account else text)


def for_each_account(command: Callable[..., None]) -> Callable[..., None]:
    """``--config``, ``--account`` and ``--all`` on a command that reads one database.

    With accounts chosen, the command runs once per account on the account's database (and
    snapshot folder); its lines start with the account's name and ``--json`` prints one array
    whose objects each say their account. One account failing does not stop the others;
    the exit is the worst exit code. A runner asked for by name or id is looked for in every
    account; only if none has it is that an error.
    """

    @functools.wraps(command)
    def each(**options: Any) -> None:
        global _per_account
        chosen = _chosen_accounts(options)
        if chosen is None:
            command(**options)
            return
        if _on_command_line("db_path"):
            raise click.UsageError(
                "--db cannot be combined with --account or --all: each account's database "
                "is in the configuration file"
            )
        worst, _per_account = 0, _PerAccount()
        not_found: list[tuple[str, ComfySyncError]] = []
        try:
            for account in chosen:
                _per_account.account = account.name
                run = {**options, "db_path": account.db_path}
                if "export_dir" in options and not _given("export_dir"):
                    run["export_dir"] = account.options.get("export_dir")
                if "s3_endpoint_url" in options and not _given("s3_endpoint_url"):
                    run["s3_endpoint_url"] = account.options.get("s3_endpoint_url")
                if "output" in options and len(chosen) > 1:  # a file per account
                    output = options["output"]
                    run["output"] = output.with_name(f"{output.stem}-{account.name}{output.suffix}")
                try:
                    command(**run)
                except RunnerNotFoundError as exc:  # an error only if no account has it
                    not_found.append((account.name, exc))
                except ComfySyncError as exc:
                    worst = max(worst, exc.exit_code)
                    _account_failed(account.name, exc)
            collected, worst = _per_account.collected, max(worst, _per_account.exit_code)
        finally:
            _per_account = None
        if len(not_found) == len(chosen):
            for name, missing in not_found:
                worst = max(worst, missing.exit_code)
                _account_failed(name, missing)
        if options.get("as_json"):
            _echo_json(collected)
        if worst:
            raise click.exceptions.Exit(worst)

    for option in reversed(_ACCOUNT_OPTIONS):
        each = option(each)
    return each


def describe_summary(summary: SyncSummary) -> str:
    """The human summary of a sync: what happened, the counts, complete or not, seconds."""
    walk = "complete" if summary.complete else "NOT complete"
    lines = [
        f"sync {summary.sync_id} {summary.status}: {summary.runners_seen} runners in "
        f"{summary.pages} pages ({summary.walks} walk(s), {walk}) in {summary.seconds:.1f} s",
        f"  created {summary.created}, updated {summary.updated}, deleted {summary.deleted}, "
        f"restored {summary.restored}, unchanged {summary.unchanged}, "
        f"rejected {summary.rejected}",
        f"  database: {printable(summary.db_path)}",
    ]
    for snapshot in summary.snapshots:
        if snapshot.same_as_sync_id is not None:
            lines.append(
                f"  snapshot: {printable(snapshot.path)} ({snapshot.rows} rows; fleet "
                f"unchanged since sync {snapshot.same_as_sync_id}, file kept)"
            )
        elif snapshot.error is None:
            lines.append(f"  snapshot: {printable(snapshot.path)} ({snapshot.rows} rows)")
        else:
            lines.append(f"  snapshot {snapshot.format} NOT written: {printable(snapshot.error)}")
    if summary.snapshots_pruned:
        lines.append(f"  pruned {len(summary.snapshots_pruned)} old snapshot file(s)")
    if summary.iceberg_rows:
        committed = ", ".join(f"{table} {rows}" for table, rows in summary.iceberg_rows.items())
        lines.append(f"  iceberg: committed rows: {committed}")
    return "\n".join(lines)


class _ProgressBar:
    """A click progress bar over pages, shown only on a terminal; restarts for each walk."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.done = 0

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.render_finish()

    def update(self, pages: int, expected: int, runners: int) -> None:
        if not self.enabled:
            return
        if self.bar is None or pages == 1:
            if self.bar is not None:
                self.bar.render_finish()
            self.bar = click.progressbar(
                length=expected, label="pages", file=sys.stderr, show_pos=True
            )
            self.done = 0
        self.bar.label = f"pages ({runners} runners)"
        self.bar.update(pages - self.done)
        self.done = pages


@cli.command()
@click.option(
    "--host", type=LoopbackHost(), default="127.0.0.1", help="Loopback address to listen on."
)
@click.option("--port", type=WholeNumber(0, 65535), default=8188, help="Port (0: any free).")
@click.option("--runners", type=WholeNumber(0, 1_000_000), default=250, help="Runners to generate.")
@click.option(
    "--seed",
    type=WholeNumber(0, 2**32 - 1),
    default=1,
    help="Seed for the generated runners and faults.",
)
@click.option("--token", default="demo-token", help="Bearer token the simulator accepts.")
@click.option(
    "--fail-rate",
    type=Number(0, 1),
    default=0.0,
    help="Probability of a random 500/502/503.",
)
@click.option(
    "--rate-limit",
    type=Number(0, 1_000_000, min_open=True),
    default=None,
    help="Requests per second before answering 429 with Retry-After.",
)
@click.option(
    "--latency",
    default=None,
    metavar="MS[:JITTER]",
    help="Milliseconds added to each request, with optional jitter.",
)
@click.option(
    "--drop-connections",
    type=Number(0, 1),
    default=0.0,
    help="Probability of closing the connection mid-response.",
)
@click.option(
    "--malformed",
    type=Number(0, 1),
    default=0.0,
    help="Probability of a truncated or non-JSON body.",
)
@click.option(
    "--churn",
    type=Number(0, 1000),
    default=0.0,
    help="Expected upstream mutations (create/update/delete) before each request.",
)
@debug_option("Log every request it answers, with what it got, and show tracebacks.")
def simulate(
    host: str,
    port: int,
    runners: int,
    seed: int,
    token: str,
    fail_rate: float,
    rate_limit: float | None,
    latency: str | None,
    drop_connections: float,
    malformed: float,
    churn: float,
) -> None:
    """Serve a simulated ComfyControl API on loopback.

    For demos, tests and benchmarks. Every random fault is drawn from --seed: the same seed
    and the same request sequence (a sync with --concurrency 1) replay the same faults;
    --debug logs each request and what it got. --port 0 picks a free port and prints it.
    """
    from pipeline.sim.faults import FaultPlan
    from pipeline.sim.simulator import SimulatedAccount, serve

    try:
        faults = FaultPlan.from_flags(
            seed=seed,
            fail_rate=fail_rate,
            rate_limit=rate_limit,
            latency=latency,
            drop_connections=drop_connections,
            malformed=malformed,
            churn=churn,
        )
    except ValueError as exc:  # the other flags are range-checked by click already
        raise click.BadParameter(str(exc), param_hint="--latency") from exc
    account = SimulatedAccount(runners=runners, seed=seed, token=token or None, faults=faults)

    def announce(base_url: str) -> None:
        # The real URL, so `--port 0` tells the caller which free port it got.
        click.echo(
            f"simulating {runners} runners on {base_url}/v1/runner "
            f"(token {'required' if token else 'not required'}); Ctrl+C stops",
            err=True,
        )

    try:
        serve(account, host=host, port=port, on_ready=announce)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--host") from exc
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port} ({exc.strerror})") from exc


@cli.command()
@for_each_account
@click.option(
    "-o",
    "--output",
    type=FilePath(path_type=Path),
    required=True,
    help="File to write; its suffix, .parquet or .csv, sets the format.",
)
@click.option(
    "--as-of",
    metavar="TIMESTAMP",
    default=None,
    help="The fleet as the store knew it at this instant (ISO 8601, UTC unless an offset is "
    "given; a date alone means its start).",
)
@click.option(
    "--include-deleted", is_flag=True, help="Add runners marked deleted (with deleted_at)."
)
@click.option(
    "--history",
    "all_versions",
    is_flag=True,
    help="Export every version of every runner (change, changed_fields, valid_from, "
    "valid_to, sync_id) instead of one row per runner.",
)
@csv_safe_option
@db_option("SQLite database to export from (opened read-only).")
@debug_option(DEBUG_READS)
def export(
    output: Path,
    as_of: str | None,
    include_deleted: bool,
    all_versions: bool,
    csv_safe: bool,
    db_path: Path,
) -> None:
    """Export runners to one Parquet or CSV file.

    The fleet now, as of an instant (--as-of), or every version (--history). Reads the
    database read-only, so it is safe while a sync runs. The file is written atomically: it
    appears complete or not at all.
    """
    from pipeline.outputs.export import export_file

    result = export_file(
        db_path,
        output,
        as_of=as_of,
        include_deleted=include_deleted,
        all_versions=all_versions,
        csv_safe=csv_safe,
    )
    _say(printable(f"{result.rows} rows written to {result.path} ({result.description})"))


@cli.command()
@db_option(
    "Demo database (recreated on each run); its snapshots go to exports/<name> beside it.",
    envvar=None,
    default=DEMO_DB_PATH,
)
@debug_option(DEBUG_REQUESTS)
def demo(db_path: Path) -> None:
    """Try comfysync on a simulated account: no token needed.

    Syncs it twice, with changes upstream between, and shows what was recorded. Needs no
    account, no token and no network: the simulator runs on loopback.
    """
    from pipeline.sim.demo import run_demo

    run_demo(db_path, echo=click.echo)


# -- reading the mirror: status, runs, history, changes, browse ------------------------------

read_db_option = db_option("SQLite database to read (opened read-only).", dir_okay=False)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")


def _read(db_path: Path, read: Callable[[Database], T]) -> T:
    """``read`` over the database at ``db_path``, opened read-only and closed after."""
    from pipeline.store.schema import open_store_read_only

    with closing(open_store_read_only(db_path)) as db:
        return read(db)


def _show(
    db_path: Path, read: Callable[[Database], Any], describe: Callable[[Any], str], as_json: bool
) -> None:
    """What ``read`` finds, as JSON (every field, every record) or as ``describe``'s text."""
    result = _read(db_path, read)
    if not as_json:
        _say(describe(result))
    elif isinstance(result, list):
        _echo_json([dataclasses.asdict(item) for item in result])
    else:
        _echo_json(dataclasses.asdict(result))


def _echo_json(value: Any) -> None:
    if _per_account is not None:  # printed once, for every account, by for_each_account
        _per_account.collect(value)
        return
    # Exact JSON still, with the controls JSON leaves raw (C1, bidi, separators) escaped.
    click.echo(printable_json(json.dumps(value, indent=2, ensure_ascii=False)))


@cli.command()
@for_each_account
@read_db_option
@click.option(
    "--export-dir",
    type=ExportLocation(path_type=Path),  # not a folder: one line from find_snapshots, exit 2
    envvar="COMFYSYNC_EXPORT_DIR",
    default=None,
    show_default=f"where the database's syncs wrote them, else {DEFAULT_EXPORT_DIR}",
    show_envvar=True,
    help="Folder (or s3://bucket/prefix) to list the snapshot files in.",
)
@s3_endpoint_option
@json_option
@click.option(
    "--check",
    is_flag=True,
    help="Print one monitoring-plugin line and exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
)
@click.option(
    "--max-age",
    default="2h",
    metavar="DURATION",
    help="With --check: CRITICAL when no sync succeeded for this long (30m, 2h, 1d).",
)
@click.option(
    "--max-failures",
    type=WholeNumber(1, MANY),
    default=3,
    help="With --check: CRITICAL at this many failed runs in a row.",
)
@debug_option(DEBUG_READS)
def status(
    db_path: Path,
    export_dir: Path | ObjectPath | None,
    s3_endpoint_url: str | None,
    as_json: bool,
    check: bool,
    max_age: str,
    max_failures: int,
) -> None:
    """Show the mirror's state: last sync, counts, snapshot files.

    With --check, judge it instead, as Nagios, Icinga or Sensu plugins do: one line on stdout,
    exit 0 OK, 1 WARNING (the latest run failed or was partial), 2 CRITICAL (no success
    within --max-age, or --max-failures failed runs in a row), 3 UNKNOWN (no database, or
    one that cannot be read).
    """
    from pipeline.read.overview import read_status
    from pipeline.read.report import describe_status

    age = _parsed(_max_age_seconds, max_age, "--max-age")  # refused even without --check
    account = _per_account.account if _per_account else None
    if check:
        from pipeline.observe.check import check_mirror

        result = check_mirror(db_path, max_age=age, max_failures=max_failures)
        _say(result.line)
        if _per_account is None:
            sys.exit(result.code)  # the plugin codes, whatever main would make of an error
        _per_account.exit_code = max(_per_account.exit_code, result.code)
        return
    _show(
        db_path,
        lambda db: read_status(db, db_path, export_dir, account, s3_endpoint_url),
        describe_status,
        as_json,
    )


def _max_age_seconds(text: str) -> int:
    from pipeline.times import DURATION_UNITS, duration_seconds

    try:
        seconds = duration_seconds(text)
    except ValueError:
        wanted = f"a whole number and {DURATION_UNITS}"
        raise ValueError(f"{_shown(text)} is not a duration: {wanted}") from None
    if not 0 < seconds <= MANY:
        raise ValueError(f"{_shown(text)} must be more than 0s and at most {MANY}s")
    return seconds


@cli.command()
@for_each_account
@read_db_option
@click.option("--limit", type=WholeNumber(1, MANY), default=20, help="Runs to show, newest first.")
@click.option(
    "--status",
    "run_status",
    type=click.Choice(["running", "interrupted", "success", "partial", "failed"]),
    default=None,
    help="Only runs with this status (interrupted: left running by a sync that was killed).",
)
@json_option
@debug_option(DEBUG_READS)
def runs(db_path: Path, limit: int, run_status: str | None, as_json: bool) -> None:
    """Show the run log, newest first, with errors and warnings."""
    from pipeline.read.overview import list_runs
    from pipeline.read.report import describe_runs

    def read(db: Database) -> list[SyncRun]:
        return list_runs(db, limit=limit, status=run_status, db_path=db_path)

    _show(db_path, read, describe_runs, as_json)


@cli.command()
@for_each_account
@click.argument("runner")
@read_db_option
@json_option
@debug_option(DEBUG_READS)
def history(runner: str, db_path: Path, as_json: bool) -> None:
    """Show every version of one runner.

    RUNNER is a full id, a unique id prefix, an exact name, or else a name the runner had
    before (the output says which version had it); an ambiguous one lists the runners it
    matches and exits 2. Updates show each changed field as old -> new (header values stay
    redacted).
    """
    from pipeline.read.changelog import resolve_runner, runner_history
    from pipeline.read.report import describe_history

    def read(db: Database) -> RunnerHistory:
        runner_id, matched = resolve_runner(db, runner)
        return runner_history(db, runner_id, matched=matched)

    _show(db_path, read, describe_history, as_json)


@cli.command()
@for_each_account
@click.option(
    "--since",
    default="24h",
    metavar="DURATION|DATE",
    help="How far back: 90m, 24h, 7d, or an ISO date or date and time (UTC unless it says).",
)
@read_db_option
@json_option
@debug_option(DEBUG_READS)
def changes(since: str, db_path: Path, as_json: bool) -> None:
    """Show every change across all runners since a moment.

    Newest first, in the shape of `comfysync history`.
    """
    from pipeline.read.changelog import changes_since, parse_since
    from pipeline.read.report import describe_changes

    cutoff = parse_since(since)
    result = _read(db_path, lambda db: changes_since(db, cutoff))
    if as_json:
        _echo_json({"since": cutoff, "changes": [dataclasses.asdict(e) for e in result]})
    else:
        _say(describe_changes(result, cutoff))


@cli.command()
@read_db_option
@click.option(
    "--port", type=WholeNumber(1, 65535), default=8001, help="Port to listen on (127.0.0.1)."
)
@click.option(
    "--metadata-out",
    type=FilePath(path_type=Path, dir_okay=False, allow_dash=True),
    default=None,
    help="Write the Datasette metadata for --db to this file ('-': stdout) and exit.",
)
@_ACCOUNT_OPTIONS[0]
@_ACCOUNT_OPTIONS[1]
@_ACCOUNT_OPTIONS[2]
@debug_option(DEBUG_READS)
def browse(db_path: Path, port: int, metadata_out: Path | None, **accounts: Any) -> None:
    """Open the mirror in Datasette on 127.0.0.1.

    With descriptions of every table and column, default facets and canned queries.
    Needs the datasette extra: pip install 'comfysync[datasette]'. To run Datasette
    yourself, write the metadata out and pass it:

    \b
      comfysync browse --metadata-out metadata.json
      datasette data/comfysync.db --metadata metadata.json

    With a configuration file's accounts (--account, --all), serves each account's database
    under its name, with cross-database queries and the canned query _memory/all_fleets:
    every account's fleet together.
    """
    from pipeline.read import browse as browsing
    from pipeline.read.browse import HOST, database_name, metadata_json, serve, write_metadata

    chosen = _chosen_accounts(accounts)
    if chosen is not None:
        if metadata_out is not None:
            names = [account.name for account in chosen]
            text = json.dumps(browsing.accounts_metadata(names), indent=2, ensure_ascii=False)
            if str(metadata_out) == "-":
                click.echo(text)
                return
            try:
                metadata_out.write_text(text + "\n", encoding="utf-8")
            except OSError as exc:
                raise ConfigurationError(f"cannot write {metadata_out} ({exc.strerror})") from exc
            return
        url = f"http://{HOST}:{port}/_memory/all_fleets"
        browsing.serve_accounts(
            {account.name: account.db_path for account in chosen},
            port=port,
            on_start=lambda: click.echo(printable(f"browse {url} (Ctrl+C stops)"), err=True),
        )
        return
    if metadata_out is not None:
        if str(metadata_out) == "-":
            click.echo(metadata_json(db_path), nl=False)
        else:
            write_metadata(db_path, metadata_out)
            click.echo(
                printable(
                    f"wrote {metadata_out}; run: datasette {db_path} --metadata {metadata_out}"
                ),
                err=True,
            )
        return
    url = f"http://{HOST}:{port}/{database_name(db_path)}"
    serve(
        db_path,
        port=port,
        on_start=lambda: click.echo(printable(f"browse {url} (Ctrl+C stops)"), err=True),
    )


@cli.group(name="config", cls=_Group)
@debug_option(DEBUG_READS)
def config_group() -> None:
    """Check the file that names the accounts (comfysync.toml)."""


@config_group.command(name="check")
@_ACCOUNT_OPTIONS[0]
@debug_option(DEBUG_READS)
def config_check(config_path: Path | None) -> None:
    """Check the configuration file and print every account's resolved settings.

    Tokens show as set or missing, never their value. Anything wrong exits 2 with the file,
    the key and what it expects. Values from the environment are not applied here.
    """
    from jobs import triggers

    path = find_config(config_path)
    if path is None:
        raise ConfigurationError(
            f"no configuration file: pass --config, set {CONFIG_ENV} or create ./comfysync.toml"
        )
    config = load_config(path, _config_keys())
    ctx = click.get_current_context()
    defaults = {
        param.name: param.process_value(ctx, param.get_default(ctx)) if not param.is_flag else False
        for param in _sync_params()
        if param.name
    }
    lines = [f"{path}: {len(config.accounts)} account(s), all valid"]
    for account in config.accounts:
        values = {**defaults, **account.options, "token": account.token}
        settings = _settings(values, account)
        try:  # a stand-in token: a missing one is shown as missing, not refused here
            dataclasses.replace(settings, token=settings.token or "stand-in").validated()
            for kind, text in account.schedule.items():
                if kind == "cron":
                    triggers.parse_cron(text, triggers.parse_timezone("UTC"))
        except (ConfigurationError, ValueError) as exc:
            raise ConfigurationError(f"{path}: [accounts.{account.name}]: {exc}") from None
        lines.append(f"[accounts.{account.name}]")
        token = "set" if account.token else "missing"
        lines.append(f"  token = {token} ({account.token_source})")
        for key, spec in sorted(_config_keys().items()):
            value = values[spec.field]
            shown = ", ".join(value) if isinstance(value, tuple) else value
            lines.append(f"  {key} = {'(not set)' if value is None else shown}")
        schedule = " ".join(f"{k} {v}" for k, v in account.schedule.items()) or "(not set)"
        lines.append(f"  schedule = {schedule}")
    click.echo(printable_lines("\n".join(lines)))


def _status_of(db_path: Path, db: Database) -> Any:
    from pipeline.read.overview import read_status

    return read_status(db, db_path)


@cli.command(name="accounts")
@_ACCOUNT_OPTIONS[0]
@json_option
@debug_option(DEBUG_READS)
def accounts_command(config_path: Path | None, as_json: bool) -> None:
    """List the accounts: last sync, its status, runner counts.

    The accounts are those of the configuration file; one never synced shows as such.
    """
    path = find_config(config_path)
    if path is None:
        raise ConfigurationError(
            f"no configuration file: pass --config, set {CONFIG_ENV} or create ./comfysync.toml"
        )
    found = []
    for account in load_config(path, _config_keys()).accounts:
        row: dict[str, Any] = {"account": account.name, "db": str(account.db_path)}
        row.update(
            last_sync=None, status="never synced", runners_present=None, runners_deleted=None
        )
        if account.db_path.exists():
            status = _read(account.db_path, functools.partial(_status_of, account.db_path))
            last = status.last_sync
            row.update(
                last_sync=last and (last.finished_at or last.started_at),
                status=last.status if last else "never synced",
                runners_present=status.runners_present,
                runners_deleted=status.runners_deleted,
            )
        found.append(row)
    if as_json:
        _echo_json(found)
        return
    width = max(len(row["account"]) for row in found)
    for row in found:
        counts = (
            f"{row['runners_present']} runners ({row['runners_deleted']} deleted)"
            if row["runners_present"] is not None
            else "no runners yet"
        )
        click.echo(
            printable(
                f"{row['account']:<{width}}  {row['status']:<12}  "
                f"last sync {row['last_sync'] or 'never'}  {counts}  {row['db']}"
            )
        )


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI and map errors to exit codes, in one place."""
    # At exit, Python's shutdown collects the cycles of every module it tears down, which is
    # slow after a large sync; with every object frozen first there is nothing to collect
    # (the OS reclaims the memory). Registered to run at interpreter exit, so an embedder
    # that calls main() keeps a working collector until then.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    # pyarrow's default allocator keeps the memory a snapshot frees for later reuse, which a
    # sync never needs: the system allocator hands it back, lowering the peak. Only for this
    # process, and only if the user chose no allocator; read when pyarrow is first used.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("comfysync: %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # stamina logs a bare "stamina.retry_scheduled" warning per retry; the client logs its own.
    logging.getLogger("stamina").setLevel(logging.ERROR)
    try:
        exit_code = cli.main(args=argv, prog_name="comfysync", standalone_mode=False)
        if isinstance(exit_code, int) and exit_code:  # a command's ctx.exit: the accounts' worst
            sys.exit(exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        message = exc.format_message()
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            message += f" (see '{exc.ctx.command_path} --help')"
        click.echo(f"comfysync: error: {printable(message)}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("comfysync: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("comfysync: interrupted; nothing half-applied", err=True)
        sys.exit(130)
    except ComfySyncError as exc:
        if _debug:  # the traceback too, but still the documented exit code
            click.echo(printable_lines(traceback.format_exc().rstrip("\n")), err=True)
        click.echo(f"comfysync: error: {printable(exc.message)}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if _debug:
            raise
        click.echo(
            # The exception's text is left out: it could quote a secret it was handed.
            f"comfysync: internal error ({type(exc).__name__}); "
            "(run again with --debug for a traceback, and please report it)",
            err=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
