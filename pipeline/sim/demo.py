"""``comfysync demo``: the whole product in one short run, with no account and no network.

It starts the bundled simulator on a free loopback port, syncs, changes a few runners
upstream (one created, one renamed, one header secret rotated, one deleted), syncs again and
shows what the mirror recorded. It goes through ``run_sync`` like every other entry point,
snapshots included: they go to ``exports/<database name>`` beside the database
(``data/exports/demo``), never into the tree of a real mirror.

Each run starts afresh, so it replaces the database at ``--db``, but only one it made
itself: a demo database carries a ``demo`` row in ``comfysync_meta`` and has only ever
synced from a loopback simulator. Anything else there (a mirror, another program's file, a
folder, a link, a stray ``-wal``, snapshot files it did not write) is refused before
anything is created, and the replacement happens under the database's sync lock, so a demo
never deletes a database a sync is using.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import ComfySyncError, DatabaseError
from pipeline.printable import printable
from pipeline.read.changelog import changes_in_sync
from pipeline.settings import EXPORT_FORMATS, Settings, is_loopback_host
from pipeline.sim.simulator import LoopbackServer, SimulatedAccount
from pipeline.store import meta, schema
from pipeline.store.keyfile import key_path_for
from pipeline.sync.lock import hold_sync_lock
from pipeline.sync.run import SyncSummary, run_sync

DEMO_RUNNERS = 250
DEMO_SEED = 1
#: The ``comfysync_meta`` row that marks a database as the demo's own, safe to replace.
DEMO_META_KEY = "demo"
DEMO_MARK = "comfysync demo"
#: The files SQLite keeps beside a database, which belong to it.
_SIDECARS = ("-journal", "-wal", "-shm")


def _remove_database(path: Path) -> None:
    """Remove a demo database, its SQLite side files and its redaction key file."""
    for suffix in ("", *_SIDECARS):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    key_path_for(path).unlink(missing_ok=True)


def _is_demo_database(path: Path) -> bool:
    """True if ``path`` holds a database the demo made and no one has synced elsewhere into."""
    # Without side files, read the main file as it is, creating none beside it; with them,
    # SQLite needs them to see the latest commits (and creates no others).
    alone = not any(os.path.lexists(f"{path}{suffix}") for suffix in _SIDECARS)
    try:
        db = schema.open_store_read_only(path, immutable=alone)
    except ComfySyncError:
        return False
    try:
        if meta.read_meta(db, DEMO_META_KEY) != DEMO_MARK:
            return False
        hosts = [
            urlsplit(url or "").hostname
            for (url,) in db.execute("SELECT DISTINCT base_url FROM sync_runs")
        ]
        return all(host and is_loopback_host(host) for host in hosts)
    except sqlite3.Error:
        return False
    finally:
        db.close()


def _holds_snapshot_files(export_dir: Path) -> bool:
    trees = [export_dir / fmt / "runners" for fmt in EXPORT_FORMATS]
    return any(p.is_symlink() or not p.is_dir() for tree in trees for p in tree.rglob("*"))


def why_not_replaceable(db_path: Path) -> str | None:
    """Why the demo must not replace what is at ``db_path``, or None if it may.

    It may replace a demo database (with its snapshots), or create one where there is
    nothing: no database, none of its side files, no snapshot files in its export folder.
    """
    try:
        mode: int | None = os.lstat(db_path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if stat.S_ISLNK(mode):
            return (
                f"--db {db_path} is a symbolic link, and the demo replaces only a database "
                "it made itself: pass another --db"
            )
        if stat.S_ISDIR(mode):
            return f"--db {db_path} is a folder: pass another --db, a file path for the demo"
        if not stat.S_ISREG(mode) or not _is_demo_database(db_path):
            return (
                f"{db_path} is not a database made by `comfysync demo`, and the demo would "
                "replace it: pass another --db"
            )
        return None
    for suffix in _SIDECARS:
        if os.path.lexists(f"{db_path}{suffix}"):
            return (
                f"{db_path}{suffix} is there without its database, and the demo would "
                "replace it: pass another --db (or move that file away)"
            )
    if _holds_snapshot_files(demo_export_dir(db_path)):
        return (
            f"{demo_export_dir(db_path)} already holds snapshot files, and no demo database "
            "beside it accounts for them: pass another --db (or move them away)"
        )
    return None


def _start_afresh(db_path: Path, export_dir: Path) -> None:
    """Replace what the demo may replace at ``db_path`` by an empty, marked demo database.

    Checked before the lock is taken (a refusal leaves nothing behind, not even a lock file)
    and again while holding it, when nothing can change under it.
    """
    refusal = why_not_replaceable(db_path)
    if refusal is not None:
        raise DatabaseError(refusal)
    schema.prepare_db_path(db_path)  # a path SQLite cannot take is refused before the lock file
    with hold_sync_lock(db_path):
        refusal = why_not_replaceable(db_path)
        if refusal is not None:
            raise DatabaseError(refusal)
        _remove_database(db_path)
        _remove_snapshots(export_dir)
        db = schema.open_store(db_path)
        try:
            meta.write_meta(db, DEMO_META_KEY, DEMO_MARK)
        finally:
            db.close()


def demo_export_dir(db_path: Path) -> Path:
    """The demo's own snapshot folder: ``data/demo.db`` -> ``data/exports/demo``."""
    return db_path.parent / "exports" / db_path.stem


def _remove_snapshots(export_dir: Path) -> None:
    # The series restarts with the database (sync ids restart at 1).
    for fmt in EXPORT_FORMATS:
        shutil.rmtree(export_dir / fmt / "runners", ignore_errors=True)


def _counts(summary: SyncSummary) -> str:
    return (
        f"{summary.created} created, {summary.updated} updated, {summary.deleted} deleted, "
        f"{summary.restored} restored, {summary.unchanged} unchanged "
        f"({summary.pages} pages, {'complete' if summary.complete else 'NOT complete'}, "
        f"{summary.seconds:.2f} s)"
    )


def run_demo(db_path: Path, *, echo: Callable[[str], None] = print) -> None:
    """Run the demo into ``db_path`` (recreated, with its snapshots), printing each step.

    DatabaseError (exit 2) if something other than a demo database is there; SyncLockedError
    if a sync holds it. Nothing is removed in either case.
    """
    export_dir = demo_export_dir(db_path)
    _start_afresh(db_path, export_dir)
    account = SimulatedAccount(runners=DEMO_RUNNERS, seed=DEMO_SEED, token="demo-token")
    with LoopbackServer(account) as server:
        echo(f"Simulated ComfyControl account: {DEMO_RUNNERS} runners at {server.url}")
        settings = Settings(
            base_url=server.url, token=account.token, db_path=db_path, export_dir=export_dir
        )

        first = run_sync(settings)
        echo(f"1. first sync:  {_counts(first)}")

        ids = account.runner_ids()
        created = account.create_runner(name="demo-new-runner")
        renamed_id, rotated_id, deleted_id = ids[3], ids[7], ids[11]
        old_name = account.get_runner(renamed_id)["name"]
        account.rename_runner(renamed_id, old_name + " (renamed)")
        account.rotate_header(rotated_id)
        deleted = account.delete_runner(deleted_id)
        rotated_name = account.get_runner(rotated_id)["name"]
        echo(
            f"2. upstream:    created '{printable(created['name'])}', renamed "
            f"'{printable(old_name)}', rotated a header secret of '{printable(rotated_name)}', "
            f"deleted '{printable(deleted['name'])}'"
        )

        second = run_sync(settings)
        echo(f"3. second sync: {_counts(second)}")

    db = schema.open_store_read_only(db_path)
    try:
        for change in changes_in_sync(db, second.sync_id):
            names = ", ".join(field.field for field in change.fields)
            fields = f"  [{names}]" if change.change == "updated" else ""
            echo(
                f"   {change.change:<9} {printable(change.runner_id[:8])}  "
                f"{printable(change.name)}{fields}"
            )
    finally:
        db.close()

    echo("")
    echo(f"The mirror is in {db_path}: tables runners, runner_versions, sync_runs.")
    echo("Header secrets are stored redacted (redacted:<hmac>), never in clear; the key is")
    echo(f"in {key_path_for(db_path)}, beside the database and never in it.")
    echo("Open it in pandas:")
    echo(
        '  python -c "import sqlite3, pandas as pd; '
        f"print(pd.read_sql('select * from runner_versions', sqlite3.connect('{db_path}')))\""
    )
    echo("")
    echo(f"Each sync also wrote a snapshot of the fleet, in Parquet and CSV, under {export_dir}:")
    for snapshot in (*first.snapshots, *second.snapshots):
        done = (
            f"({snapshot.rows} rows)"
            if snapshot.error is None
            else f"NOT written: {snapshot.error}"
        )
        echo(f"  {snapshot.path}  {done}")
    echo("Read the database or the snapshot series with pandas:")
    echo(
        '  python -c "from pipeline import RunnerStore; '
        f"print(RunnerStore('{db_path}').runners())\""
    )
    echo(
        '  python -c "import pandas as pd; '
        f"print(pd.read_parquet('{export_dir / 'parquet' / 'runners'}'))\""
    )
    echo("See what changed, or browse it in Datasette (needs the datasette extra):")
    echo(f"  comfysync changes --db {db_path}")
    echo(f"  comfysync browse --db {db_path}")
