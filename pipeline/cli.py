"""The ``comfysync`` command. The only module that knows about click and exit codes.

Errors from the library arrive as ``pipeline.errors`` classes, each carrying its exit code;
``main`` turns them into one line on stderr (a traceback only with ``--debug``). Heavy
modules are imported inside the commands so ``comfysync --help`` starts instantly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline import __version__
from pipeline.errors import ComfySyncError
from pipeline.settings import DEFAULT_BASE_URL, DEFAULT_DB_PATH, MAX_PER_PAGE

if TYPE_CHECKING:
    from pipeline.sync import SyncSummary

_debug = False


def _enable_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    global _debug
    if value:
        _debug = True
        # Our loggers and httpx's request lines; never httpcore's, which dumps raw headers.
        logging.getLogger("pipeline").setLevel(logging.DEBUG)
        logging.getLogger("jobs").setLevel(logging.DEBUG)
        logging.getLogger("httpx").setLevel(logging.INFO)
    return value


debug_option = click.option(
    "--debug",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_enable_debug,
    help="Log every request and show tracebacks.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="comfysync")
@debug_option
def cli() -> None:
    """Keep an exact, versioned local mirror of a ComfyControl account's runners.

    Start with `comfysync demo` (no account needed), then `comfysync sync`.
    """


@cli.command()
@click.option(
    "--base-url",
    envvar="COMFYCONTROL_BASE_URL",
    default=DEFAULT_BASE_URL,
    show_envvar=True,
    help="ComfyControl API root.",
)
@click.option(
    "--token",
    envvar="COMFYCONTROL_TOKEN",
    show_envvar=True,
    default=None,
    show_default=False,
    help="API token (prefer the environment variable: command lines are visible to others).",
)
@click.option(
    "--db",
    "db_path",
    type=click.Path(path_type=Path),
    envvar="COMFYSYNC_DB",
    default=DEFAULT_DB_PATH,
    show_envvar=True,
    help="SQLite database to sync into.",
)
@click.option(
    "--per-page",
    type=click.IntRange(1, MAX_PER_PAGE),
    default=MAX_PER_PAGE,
    help="Runners per page request.",
)
@click.option(
    "--concurrency", type=click.IntRange(1, 32), default=4, help="Page requests in flight at once."
)
@click.option(
    "--max-walks",
    type=click.IntRange(1, 20),
    default=3,
    help="Walks to try before settling for an incomplete one (no deletions); a walk "
    "confirming deletions comes on top.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    help="Seconds to wait for each response.",
)
@click.option(
    "--max-retries",
    type=click.IntRange(0, 20),
    default=5,
    help="Retries per page on connection errors, timeouts, 429 and 5xx.",
)
@click.option(
    "--allow-http",
    is_flag=True,
    help="Allow plain http:// to a non-loopback host (sends the token unencrypted).",
)
@click.option(
    "--store-header-values",
    is_flag=True,
    help="Store runner header values in clear instead of redacted (they are secrets).",
)
@click.option(
    "--max-delete-ratio",
    type=click.FloatRange(0, 1),
    default=0.5,
    help="Withhold all deletions (run ends partial) if more than this share of the present "
    "runners would be marked deleted; an empty listing always counts.",
)
@click.option(
    "--allow-mass-delete",
    is_flag=True,
    help="Apply deletions this once even beyond --max-delete-ratio.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object on stdout.")
@debug_option
def sync(
    base_url: str,
    token: str | None,
    db_path: Path,
    per_page: int,
    concurrency: int,
    max_walks: int,
    timeout: float,
    max_retries: int,
    allow_http: bool,
    store_header_values: bool,
    max_delete_ratio: float,
    allow_mass_delete: bool,
    as_json: bool,
) -> None:
    """Mirror every runner into the database, recording what changed.

    Deletions are only recorded when the walk over all pages is proven complete and would not
    delete a mass of the fleet (--max-delete-ratio); otherwise the run ends `partial` and says
    why. Runners that all belong to another account than the database's are refused. Exit
    codes: 0 success or partial, 2 usage or configuration, 3 authentication, 4 upstream
    failure (nothing applied), 5 locked.
    """
    from pipeline.settings import Settings
    from pipeline.sync import run_sync

    settings = Settings(
        base_url=base_url,
        token=token,
        db_path=db_path,
        per_page=per_page,
        concurrency=concurrency,
        max_walks=max_walks,
        timeout=timeout,
        max_retries=max_retries,
        allow_http=allow_http,
        store_header_values=store_header_values,
        max_delete_ratio=max_delete_ratio,
        allow_mass_delete=allow_mass_delete,
    )
    with _ProgressBar(enabled=sys.stderr.isatty() and not as_json) as progress:
        summary = run_sync(settings, on_progress=progress.update)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(summary), sort_keys=True))
    else:
        click.echo(describe_summary(summary))


def describe_summary(summary: SyncSummary) -> str:
    """The human summary of a sync: what happened, the counts, complete or not, seconds."""
    walk = "complete" if summary.complete else "NOT complete"
    return (
        f"sync {summary.sync_id} {summary.status}: {summary.runners_seen} runners in "
        f"{summary.pages} pages ({summary.walks} walk(s), {walk}) in {summary.seconds:.1f} s\n"
        f"  created {summary.created}, updated {summary.updated}, deleted {summary.deleted}, "
        f"restored {summary.restored}, unchanged {summary.unchanged}, "
        f"rejected {summary.rejected}\n"
        f"  database: {summary.db_path}"
    )


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
@click.option("--host", default="127.0.0.1", help="Loopback address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8188, help="Port (0: any free).")
@click.option("--runners", type=click.IntRange(0), default=250, help="Runners to generate.")
@click.option("--seed", type=int, default=1, help="Seed for the generated runners and faults.")
@click.option("--token", default="demo-token", help="Bearer token the simulator accepts.")
@click.option(
    "--fail-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Probability of a random 500/502/503.",
)
@click.option(
    "--rate-limit",
    type=click.FloatRange(min=0, min_open=True),
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
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Probability of closing the connection mid-response.",
)
@click.option(
    "--malformed",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Probability of a truncated or non-JSON body.",
)
@click.option(
    "--churn",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Expected upstream mutations (create/update/delete) before each request.",
)
@debug_option
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
    """Serve a simulated ComfyControl API on loopback (for demos, tests and benchmarks).

    Every random fault is drawn from --seed: the same seed and the same request sequence (a
    sync with --concurrency 1) replay the same faults; --debug logs each request and what it
    got. --port 0 picks a free port and prints it.
    """
    from pipeline.faults import FaultPlan, parse_latency
    from pipeline.simulator import SimulatedAccount, serve

    latency_ms, jitter_ms = (0.0, 0.0)
    if latency:
        try:
            latency_ms, jitter_ms = parse_latency(latency)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--latency") from exc
    faults = FaultPlan(
        seed=seed,
        fail_rate=fail_rate,
        rate_limit=rate_limit,
        latency_ms=latency_ms,
        latency_jitter_ms=jitter_ms,
        drop_connections=drop_connections,
        malformed=malformed,
        churn=churn,
    )
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
        raise click.ClickException(f"cannot listen on {host}:{port} ({exc.strerror})") from exc


@cli.command()
@click.option(
    "--db",
    "db_path",
    type=click.Path(path_type=Path),
    default=Path("data") / "demo.db",
    help="Demo database (recreated on each run).",
)
@debug_option
def demo(db_path: Path) -> None:
    """Sync a simulated account twice, with changes between, and show what was recorded.

    Needs no account, no token and no network: the simulator runs on loopback.
    """
    from pipeline.demo import run_demo

    run_demo(db_path, echo=click.echo)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI and map errors to exit codes, in one place."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="comfysync: %(levelname)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # stamina logs a bare "stamina.retry_scheduled" warning per retry; the client logs its own.
    logging.getLogger("stamina").setLevel(logging.ERROR)
    try:
        cli.main(args=argv, prog_name="comfysync", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("comfysync: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("comfysync: interrupted; nothing half-applied", err=True)
        sys.exit(130)
    except ComfySyncError as exc:
        if _debug:  # the traceback too, but still the documented exit code
            traceback.print_exc()
        click.echo(f"comfysync: error: {exc.message}", err=True)
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
