"""Run the real `comfysync` CLI with one function instrumented, for the crash tests.

    python tests/crash_harness.py --phase apply --target pipeline.store.write:apply_changes \\
        --slow-sqlite -- sync --base-url http://127.0.0.1:8188 --db m.db

Why it exists: tests/test_crashes.py SIGKILLs a sync at seeded random moments *inside* a
phase (the walk, the apply transaction). To aim, the test must know when the phase begins,
and the phase must last long enough to be hit. So this wrapper, which is test code only and
never part of the `comfysync` command:

* prints ``crash-harness: <phase> begins`` on stderr just before the target function runs,
  and ``crash-harness: <phase> ends after <seconds> s`` when it returns;
* with ``--slow-sqlite``, stretches the target's SQLite work: a progress handler on the
  connection it was given sleeps 1 ms every ``--slow-every`` virtual-machine instructions,
  so a transaction of a few milliseconds lasts about a second and a random kill lands at a
  random point *inside* it (mid-statement, with pages spilled to the WAL or not);
* with ``--slow-sqlite-in module:function``, the same slowing for a target that is given no
  connection: it is installed on the connection passed to that other function when the
  target's run calls it (the export phase: ``pipeline.read.history:json_lines``, which reads
  the fleet the snapshot files are written from, batch by batch, while they are open);
* with ``--sleep-in module:function=SECONDS``, sleeps before every call of that function,
  for a phase whose work is not SQLite's (a snapshot patched from the previous file:
  ``pipeline.outputs.export:_batches``, called once per batch of rows it hands on);
* with ``--set module:NAME=N`` (repeatable), sets an integer constant first: smaller read
  batches and row groups make a snapshot file grow step by step, so a kill can land with
  part of it written;
* with ``--max-page-count-headroom N``, caps the database at its current size plus N pages
  just before the target runs, so it fails with a real SQLITE_FULL (a disk that fills up);
* with ``--pause-after SECONDS``, sleeps after the ends line, so a kill can be aimed just
  after the phase (after the apply transaction committed).

Everything else is the unmodified CLI (`pipeline.cli.main`): its parsing, its sync, its
transaction, its exit codes. The target is replaced where it is looked up, so give the module
that *calls* it (``pipeline.sync.run:walk_all_pages``, ``pipeline.store.write:apply_changes``).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any


def say(line: str) -> None:
    sys.stderr.write(f"crash-harness: {line}\n")
    sys.stderr.flush()


def find_connection(args: tuple[Any, ...], kwargs: dict[str, Any]) -> sqlite3.Connection:
    """The SQLite connection among a call's arguments (a connection or a sqlite-utils db)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, sqlite3.Connection):
            return value
        conn = getattr(value, "conn", None)
        if isinstance(conn, sqlite3.Connection):
            return conn
    raise SystemExit("crash-harness: the target was given no SQLite connection")


def slow_down(conn: sqlite3.Connection, every: int) -> None:
    """Sleep 1 ms every ``every`` SQLite virtual-machine instructions on ``conn``."""
    conn.set_progress_handler(lambda: time.sleep(0.001), every)


def instrument(
    function: Callable[..., Any],
    phase: str,
    *,
    slow_every: int | None,
    max_page_headroom: int | None,
    pause_after: float,
) -> Callable[..., Any]:
    def before(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        if slow_every is not None or max_page_headroom is not None:
            conn = find_connection(args, kwargs)
            if max_page_headroom is not None:
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {pages + max_page_headroom}")
            if slow_every is not None:
                slow_down(conn, slow_every)
        say(f"{phase} begins")
        return time.monotonic()

    def after(started: float) -> None:
        say(f"{phase} ends after {time.monotonic() - started:.3f} s")
        time.sleep(pause_after)

    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            started = before(args, kwargs)
            result = await function(*args, **kwargs)
            after(started)
            return result

        return wrapped_async

    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        started = before(args, kwargs)
        result = function(*args, **kwargs)
        after(started)
        return result

    return wrapped


def slow_connection_of(function: Callable[..., Any], every: int) -> Callable[..., Any]:
    """``function``, slowing the SQLite connection it is given from its first call on."""

    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        slow_down(find_connection(args, kwargs), every)
        return function(*args, **kwargs)

    return wrapped


def sleeping_before(function: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """``function``, sleeping ``seconds`` before each call."""

    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return function(*args, **kwargs)

    return wrapped


def replace(target: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``module:function`` where it is looked up by ``make(the original)``."""
    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    setattr(module, name, make(getattr(module, name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", required=True, help="name printed in the begins/ends lines")
    parser.add_argument("--target", required=True, help="module:function to instrument")
    parser.add_argument("--slow-sqlite", action="store_true")
    parser.add_argument("--slow-sqlite-in", metavar="MODULE:FUNCTION", default=None)
    parser.add_argument("--slow-every", type=int, default=60)
    parser.add_argument("--sleep-in", metavar="MODULE:FUNCTION=SECONDS", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="MODULE:NAME=N")
    parser.add_argument("--max-page-count-headroom", type=int, default=None)
    parser.add_argument("--pause-after", type=float, default=0.0)
    parser.add_argument("cli_args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    for assignment in options.set:
        target, _, value = assignment.partition("=")
        replace(target, lambda _, number=int(value): number)
    replace(
        options.target,
        lambda function: instrument(
            function,
            options.phase,
            slow_every=options.slow_every if options.slow_sqlite else None,
            max_page_headroom=options.max_page_count_headroom,
            pause_after=options.pause_after,
        ),
    )
    if options.slow_sqlite_in:
        replace(options.slow_sqlite_in, lambda f: slow_connection_of(f, options.slow_every))
    if options.sleep_in:
        target, _, seconds = options.sleep_in.partition("=")
        replace(target, lambda f: sleeping_before(f, float(seconds)))
    from pipeline.cli import main as comfysync

    cli_args = options.cli_args[1:] if options.cli_args[:1] == ["--"] else options.cli_args
    comfysync(cli_args)


if __name__ == "__main__":
    main()
