"""``comfysync demo``: the whole product in thirty seconds, with no account and no network.

It starts the bundled simulator on a free loopback port, syncs, changes a few runners
upstream (one created, one renamed, one header secret rotated, one deleted), syncs again and
shows what the mirror recorded. It goes through ``run_sync`` like every other entry point,
snapshots included: they go to ``exports/<database name>`` beside the database
(``data/exports/demo``), never into the tree of a real mirror.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from pipeline import schema
from pipeline.changelog import changes_in_sync
from pipeline.keyfile import key_path_for
from pipeline.settings import EXPORT_FORMATS, Settings
from pipeline.simulator import LoopbackServer, SimulatedAccount
from pipeline.sync import SyncSummary, run_sync

DEMO_RUNNERS = 250
DEMO_SEED = 1


def _remove_database(path: Path) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


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
    """Run the demo into ``db_path`` (recreated, with its snapshots), printing each step."""
    export_dir = demo_export_dir(db_path)
    _remove_database(db_path)
    _remove_snapshots(export_dir)
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
        echo(
            "2. upstream:    created "
            f"{created['name']!r}, renamed {old_name!r}, rotated a header secret of "
            f"{account.get_runner(rotated_id)['name']!r}, deleted {deleted['name']!r}"
        )

        second = run_sync(settings)
        echo(f"3. second sync: {_counts(second)}")

    db = schema.open_store_read_only(db_path)
    try:
        for change in changes_in_sync(db, second.sync_id):
            names = ", ".join(field.field for field in change.fields)
            fields = f"  [{names}]" if change.change == "updated" else ""
            echo(f"   {change.change:<9} {change.runner_id[:8]}  {change.name}{fields}")
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
