"""A corrupt snapshot folder: each case a clear one-line outcome, and nothing in it touched.

What a user can find in `--export-dir` (`<format>/runners/snapshot_date=YYYY-MM-DD/
runners-<sync_id>.<format>`): a file, or a link to nowhere, where a folder belongs (the
export folder itself, a `runners` folder, today's `snapshot_date=` folder); a folder that
refuses new files; a file under this sync's final name that cannot be replaced (another
database's); a truncated snapshot and stray files; a stray snapshot with a higher sync id.

Each case starts from a mirror synced once (on 2020-01-01, so its snapshot is in another
date folder than today's) and runs, as real processes:

* `comfysync sync`: its snapshot must never fail it: exit 0, one warning line on stderr per
  file it could not write, naming the culprit, the same reason in the `snapshots` table and
  in `status`; the other format is written;
* `comfysync status`: exit 2 with one line when there is no folder to list, else exit 0
  with the damage and the failures listed;
* `comfysync export -o` into the broken spot: exit 2 with one line, no file left.

Never a traceback, and every file and link that was there is byte for byte as it was (but
what `--keep-snapshots` prunes, which the case says).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import rows, run_comfysync, write_protected
from export_helpers import StepClock

from pipeline.settings import Settings
from pipeline.sim.simulator import LoopbackServer, SimulatedAccount
from pipeline.sync.run import run_sync

RUNNERS = 12
FIRST = "exports/{fmt}/runners/snapshot_date=2020-01-01/runners-1.{fmt}"
TODAY = "exports/{fmt}/runners/snapshot_date={today}"
SECOND = TODAY + "/runners-2.{fmt}"
WARNING = "comfysync: WARNING: snapshot not written (the sync itself succeeded): "


def make_file(path: Path, content: bytes = b"not a folder\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def replace_with_file(path: Path) -> None:
    shutil.rmtree(path)
    make_file(path)


def dead_link(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to("/nonexistent/snapshots")


def truncate_and_litter(exports: Path, today: str) -> None:
    first = exports / "parquet/runners/snapshot_date=2020-01-01/runners-1.parquet"
    first.write_bytes(first.read_bytes()[:1000])  # a copy cut short, under a final name
    make_file(exports / "parquet/runners/notes.txt", b"my notes\n")
    make_file(exports / "csv/runners/snapshot_date=2019-12-31", b"a file, another day\n")
    make_file(exports / "csv/runners/snapshot_date=2020-01-01/runners-x.csv", b"\x00\xff garbage")
    (exports / "parquet/runners/snapshot_date=2019-12-30/runners-7.parquet").mkdir(parents=True)


@dataclass(frozen=True)
class Case:
    """A damage, and what each command must make of it ({today}: today's date, {refused}:
    the operating system's reason for refusing a write-protected path)."""

    corrupt: Callable[[Path, str], None]  # (the export folder, today)
    not_written: dict[str, str]  # format -> the reason `sync` gives (after the file's path)
    status_error: str | None = None  # status cannot list: this one line, exit 2
    export_to: str | None = None  # `export -o` this path fails with `export_error`, exit 2
    export_error: str = ""
    protect: str | None = None  # write-protected (chattr +i) while the commands run
    keep_snapshots: int | None = None
    pruned: tuple[str, ...] = ()  # paths `--keep-snapshots` deletes
    damaged: tuple[str, ...] = ()  # paths `status` reports as damaged
    sync_error: str | None = None  # `sync` refuses to start: this one line, exit 2


CASES = {
    "the export folder is a file": Case(
        lambda exports, _: replace_with_file(exports),
        {},
        sync_error="--export-dir exports is a file, not a folder; pass a folder for the "
        "snapshot files (or --no-export)",
        status_error="cannot list the snapshots under --export-dir exports: exports is a file, "
        "not a folder; pass the folder the snapshots are written to",
        export_to="exports/fleet.parquet",
        export_error="exports is a file, not a folder",
    ),
    "a runners folder is a file": Case(
        lambda exports, _: replace_with_file(exports / "parquet" / "runners"),
        {"parquet": "exports/parquet/runners is a file, not a folder"},
        export_to="exports/parquet/runners/fleet.parquet",
        export_error="exports/parquet/runners is a file, not a folder",
    ),
    "today's snapshot_date entry is a file": Case(
        lambda exports, today: make_file(exports / f"parquet/runners/snapshot_date={today}"),
        {"parquet": f"{TODAY.format(fmt='parquet', today='{today}')} is a file, not a folder"},
        export_to=f"{TODAY.format(fmt='parquet', today='{today}')}/fleet.parquet",
        export_error=f"{TODAY.format(fmt='parquet', today='{today}')} is a file, not a folder",
    ),
    "today's snapshot_date entry is a link to nowhere": Case(
        lambda exports, today: dead_link(exports / f"csv/runners/snapshot_date={today}"),
        {"csv": f"{TODAY.format(fmt='csv', today='{today}')} is a symbolic link that leads to no folder"},
        export_to=f"{TODAY.format(fmt='csv', today='{today}')}/fleet.csv",
        export_error=f"{TODAY.format(fmt='csv', today='{today}')} is a symbolic link that leads to no folder",
    ),
    "a folder that refuses new files": Case(
        lambda exports, today: None,
        {"parquet": "the folder exports/parquet/runners does not accept new files ({refused})"},
        protect="exports/parquet/runners",
        export_to="exports/parquet/runners/fleet.parquet",
        export_error="the folder exports/parquet/runners does not accept new files ({refused})",
    ),
    "a file under this sync's name that cannot be replaced": Case(
        lambda exports, today: make_file(exports.parent / SECOND.format(fmt="csv", today=today), b"theirs"),
        {"csv": f"{SECOND.format(fmt='csv', today='{today}')} cannot be replaced ({{refused}})"},
        protect=SECOND.format(fmt="csv", today="{today}"),
        export_to=SECOND.format(fmt="csv", today="{today}"),
        export_error=f"{SECOND.format(fmt='csv', today='{today}')} cannot be replaced ({{refused}})",
    ),
    "a truncated snapshot and stray files": Case(
        truncate_and_litter, {}, damaged=(FIRST.format(fmt="parquet"),)
    ),
    "a stray snapshot with a higher sync id, and --keep-snapshots 1": Case(
        lambda exports, today: make_file(exports / f"parquet/runners/snapshot_date={today}/runners-99.parquet", b"another database's"),
        {},
        keep_snapshots=1,
        pruned=(FIRST.format(fmt="parquet"), FIRST.format(fmt="csv")),
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def synced_once(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A mirror and its first snapshot (2020-01-01), and the upstream for a second sync."""
    home = tmp_path_factory.mktemp("synced-once")
    with LoopbackServer(SimulatedAccount(runners=RUNNERS, seed=61, token="t")) as server:
        settings = Settings(
            base_url=server.url, token="t", db_path=home / "mirror.db", export_dir=home / "exports"
        )
        run_sync(settings, clock=StepClock(datetime(2020, 1, 1, 12, tzinfo=UTC)))
        yield home, server.url


def entries(folder: Path) -> dict[str, bytes | str]:
    """Every file (its bytes) and link (its target) under ``folder``, or ``folder`` itself."""
    found = {}
    for path in [folder, *(folder.rglob("*") if folder.is_dir() else ())]:
        name = str(path.relative_to(folder.parent))
        if path.is_symlink():
            found[name] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[name] = path.read_bytes()
    return found


def refusal(path: Path) -> str:
    """The reason the operating system gives now for writing into the folder ``path``, or
    for replacing the file ``path``."""
    probe = (path if path.is_dir() else path.parent) / ".probe"
    try:
        probe.touch()
        if not path.is_dir():
            os.replace(probe, path)
    except OSError as exc:
        probe.unlink(missing_ok=True)
        return str(exc.strerror)
    raise AssertionError(f"{path} is not write-protected")


def check_readable(path: Path) -> int:
    return pq.read_table(path).num_rows if path.suffix == ".parquet" else len(pd.read_csv(path))


@pytest.mark.parametrize("name", CASES)
def test_a_corrupt_snapshot_folder(name: str, synced_once, tmp_path: Path) -> None:
    case = CASES[name]
    home, url = synced_once
    shutil.copy(home / "mirror.db", tmp_path / "mirror.db")
    shutil.copy(home / "mirror.db.key", tmp_path / "mirror.db.key")  # a copy syncs with its key
    shutil.copytree(home / "exports", tmp_path / "exports")
    today = datetime.now(UTC).date().isoformat()
    case.corrupt(tmp_path / "exports", today)
    before = entries(tmp_path / "exports")

    def run(*args: str):
        result = run_comfysync(tmp_path, *args, "--db", "mirror.db")
        assert "Traceback" not in result.stderr
        return result

    protected = tmp_path / case.protect.format(today=today) if case.protect else None
    with write_protected(protected) if protected else contextlib.nullcontext():
        refused = refusal(protected) if protected else ""

        def expect(text: str) -> str:
            return text.format(today=today, refused=refused)

        keep = ("--keep-snapshots", str(case.keep_snapshots)) if case.keep_snapshots else ()
        synced = run("sync", "--base-url", url, "--token", "t", "--export-dir", "exports", *keep)
        listed = run("status", "--json", "--export-dir", "exports")
        shown = run("status", "--export-dir", "exports")
        exported = run("export", "-o", expect(case.export_to)) if case.export_to else None

    if case.sync_error:  # clearly wrong: refused before anything starts, nothing written
        assert (synced.exit_code, synced.stdout, synced.stderr) == (
            2, "", f"comfysync: error: {case.sync_error}\n"
        )  # fmt: skip
        assert rows(tmp_path / "mirror.db", "SELECT count(*) FROM sync_runs") == [(1,)]
    # sync: a success, whatever the snapshot met; each file it could not write, one line.
    not_written = {
        fmt: f"could not write {SECOND.format(fmt=fmt, today=today)}: {expect(reason)}"
        for fmt, reason in case.not_written.items()
    }
    if not case.sync_error:
        assert synced.exit_code == 0
        assert synced.stderr.splitlines() == [
            WARNING + not_written[fmt] for fmt in ("parquet", "csv") if fmt in not_written
        ]
        for fmt, error in not_written.items():
            assert f"  snapshot {fmt} NOT written: {error}" in synced.stdout.splitlines()
        assert rows(
            tmp_path / "mirror.db", "SELECT status, created FROM sync_runs WHERE id = 2"
        ) == [("success", 0)]
    recorded = rows(
        tmp_path / "mirror.db", "SELECT format, rows, error FROM snapshots WHERE sync_id = 2"
    )
    assert {fmt: error for fmt, _, error in recorded} == (
        {} if case.sync_error else {fmt: not_written.get(fmt) for fmt in ("parquet", "csv")}
    )
    written = [
        f"exports/{fmt}/runners/snapshot_date={today}/runners-2.{fmt}"
        for fmt, count, _ in recorded
        if count
    ]
    for path in written:
        assert check_readable(tmp_path / path) == RUNNERS

    # Nothing that was there changed, but what pruning was asked to delete.
    after = entries(tmp_path / "exports")
    assert {path: after.get(path) for path in before} == {
        path: None if path in case.pruned else content for path, content in before.items()
    }
    assert set(after) - set(before) == set(written)

    # status: one line and exit 2 when there is nothing to list; the damage listed otherwise.
    if case.status_error:
        assert (listed.exit_code, listed.stdout, listed.stderr) == (
            2, "", f"comfysync: error: {case.status_error}\n"
        )  # fmt: skip
        assert (shown.exit_code, shown.stderr) == (2, listed.stderr)
    else:
        assert (listed.exit_code, listed.stderr, shown.exit_code) == (0, "", 0)
        snapshots = json.loads(listed.stdout)["snapshots"]
        assert snapshots["not_written"] == [
            {"sync_id": 2, "format": fmt, "error": error} for fmt, error in not_written.items()
        ]
        assert [d["path"] for d in snapshots["damaged"]] == list(case.damaged)
        for problem in [*snapshots["damaged"], *snapshots["not_written"]]:
            assert str(problem.get("path", "NOT written")) in " ".join(shown.stdout.split())

    # export -o into the broken spot: one line, exit 2, no file.
    if exported is not None:
        assert (exported.exit_code, exported.stdout, exported.stderr) == (
            2, "", f"comfysync: error: cannot write {expect(case.export_to)}: {expect(case.export_error)}\n"
        )  # fmt: skip
        assert entries(tmp_path / "exports") == after


def test_status_names_a_damaged_snapshot(synced_once, tmp_path: Path) -> None:
    home, _ = synced_once
    shutil.copy(home / "mirror.db", tmp_path / "mirror.db")
    shutil.copytree(home / "exports", tmp_path / "exports")
    first = tmp_path / FIRST.format(fmt="csv")
    written = first.stat().st_size
    first.write_bytes(first.read_bytes()[:100])

    result = run_comfysync(tmp_path, "status", "--db", "mirror.db", "--export-dir", "exports")

    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == [
        f"               DAMAGED (sync 1 wrote {written} bytes, now 100):",
        f"                 {FIRST.format(fmt='csv')}",
    ]
