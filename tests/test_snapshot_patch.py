"""A sync's snapshot patched from the latest file is the file a write from the store makes,
byte for byte; whatever makes the latest file untrustworthy sends the format back to the
store; and a patching sync never loads pandas."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pandas as pd
import pytest
from conftest import settings_for
from export_helpers import StepClock, finished_at
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.outputs import export, series
from pipeline.read import history
from pipeline.read.history import FLEET_COLUMNS, SnapshotRecord, snapshot_of_sync
from pipeline.store.schema import open_store_read_only
from pipeline.sync.run import run_sync

DAY = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
PATCHED = "patched the {} snapshot"


def written_from_store(db_path: Path, sync_id: int, out: Path, csv_safe: bool = False) -> dict:
    """Sync ``sync_id``'s snapshot files as a write from the store makes them (no base)."""
    db = open_store_read_only(db_path)
    try:
        report = series.export_snapshots(
            out,
            sync_id=sync_id,
            snapshot_at=finished_at(db_path, sync_id),
            db=db,
            csv_safe=csv_safe,
        )
    finally:
        db.close()
    return {f.format: Path(f.path).read_bytes() for f in report.files}


def sync_files(summary) -> dict[str, bytes]:
    return {f.format: Path(f.path).read_bytes() for f in summary.snapshots}


@pytest.mark.parametrize("csv_safe", [False, True])
def test_each_change_a_sync_applies_is_patched_into_the_file_a_full_write_makes(
    serve_account, db_path, tmp_path, caplog, csv_safe
):
    upstream = serve_account(runners=230, seed=71)
    account = upstream.account
    settings = settings_for(
        upstream, db_path, export_dir=tmp_path / "exports", per_page=50, csv_safe=csv_safe
    )
    clock = StepClock(DAY)
    run_sync(settings, clock=clock)
    ids = account.runner_ids()
    gone = account.get_runner(ids[7])
    changes = [
        lambda: account.rename_runner(ids[0], "=SUM(A1) renamed"),
        lambda: account.rotate_header(ids[1]),
        lambda: account.delete_runner(ids[7]),
        lambda: account.create_runner(name='brand new, "quoted"\nand two lines'),
        lambda: account.update_runner(ids[2], tags=["a", "b"], headers={}),
        lambda: account.create_runner(**{**gone, "name": "back again"}),  # a restoration
    ]
    for number, change in enumerate(changes, start=2):
        change()
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="pipeline.outputs.series"):
            summary = run_sync(settings, clock=clock)
        assert summary.created + summary.updated + summary.deleted + summary.restored == 1
        assert [f.error for f in summary.snapshots] == [None, None]
        for fmt in ("parquet", "csv"):
            assert PATCHED.format(fmt) in caplog.text
        expected = written_from_store(db_path, number, tmp_path / f"full-{number}", csv_safe)
        assert sync_files(summary) == expected
    # The series reads as before: one file per sync, each with that sync's runners.
    frame = pd.read_parquet(tmp_path / "exports" / "parquet" / "runners")
    assert frame.groupby("sync_id").size().to_dict() == {
        1: 230,
        2: 230,
        3: 230,
        4: 229,
        5: 230,
        6: 230,
        7: 231,
    }


def test_a_change_made_by_syncs_without_a_snapshot_is_patched_in_too(
    serve_account, db_path, tmp_path, caplog
):
    upstream = serve_account(runners=40, seed=72)
    export_dir = tmp_path / "exports"
    settings = settings_for(upstream, db_path, export_dir=export_dir)
    run_sync(settings)
    ids = upstream.account.runner_ids()
    upstream.account.rename_runner(ids[3], "changed while not exporting")
    run_sync(settings_for(upstream, db_path, export_dir=None))
    upstream.account.delete_runner(ids[5])
    with caplog.at_level(logging.DEBUG, logger="pipeline.outputs.series"):
        third = run_sync(settings)
    assert "2 runners changed since sync 1" in caplog.text
    assert sync_files(third) == written_from_store(db_path, 3, tmp_path / "full")


def _execute(db_path: Path, statement: str) -> None:
    with sqlite3.connect(db_path) as db:
        db.execute(statement)
    db.close()


def _break_order(path: Path) -> None:
    """Swap two rows of a CSV file: the same size, but its ids out of order."""
    header, first, second, *rest = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([header, second, first, *rest]))


def _garble(path: Path) -> None:
    """Overwrite a file with bytes that are no Parquet, keeping its size."""
    path.write_bytes(b"\x00" * path.stat().st_size)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (
            lambda db, files: _break_order(files["csv"]),
            "not patching the csv snapshot from .*: its ids are not in order",
        ),
        (
            lambda db, files: _execute(db, "UPDATE snapshots SET rows = rows + 1"),
            "not patching the (parquet|csv) snapshot from .*: another row count than recorded",
        ),
        (
            lambda db, files: _garble(files["parquet"]),
            "could not patch the parquet snapshot from ",
        ),
    ],
    ids=["rows out of order", "another row count", "not parquet"],
)
def test_a_latest_file_unlike_its_record_is_written_from_the_store(
    serve_account, db_path, tmp_path, caplog, spoil, message
):
    upstream = serve_account(runners=30, seed=73)
    settings = settings_for(upstream, db_path, export_dir=tmp_path / "exports")
    first = run_sync(settings)
    spoil(db_path, {f.format: Path(f.path) for f in first.snapshots})
    upstream.account.rename_runner(upstream.account.runner_ids()[0], "renamed")
    with caplog.at_level(logging.DEBUG, logger="pipeline.outputs.series"):
        second = run_sync(settings)
    assert any(re.match(message, r.getMessage()) for r in caplog.records)
    assert [f.error for f in second.snapshots] == [None, None]
    assert sync_files(second) == written_from_store(db_path, 2, tmp_path / "full")


def test_too_many_changes_or_snapshot_always_write_from_the_store(
    serve_account, db_path, tmp_path, caplog, monkeypatch
):
    upstream = serve_account(runners=20, seed=74)
    settings = settings_for(upstream, db_path, export_dir=tmp_path / "exports")
    run_sync(settings)
    ids = upstream.account.runner_ids()
    monkeypatch.setattr(series, "MAX_PATCHED_RUNNERS", 2)
    for runner_id in ids[:3]:
        upstream.account.rename_runner(runner_id, "one of three")
    with caplog.at_level(logging.DEBUG, logger="pipeline.outputs.series"):
        second = run_sync(settings)
    assert "not patching the snapshot: over 2 runners changed" in caplog.text
    assert "patched the" not in caplog.text
    assert sync_files(second) == written_from_store(db_path, 2, tmp_path / "full-2")

    upstream.account.rename_runner(ids[0], "just one")
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="pipeline.outputs.series"):
        third = run_sync(
            settings_for(upstream, db_path, export_dir=tmp_path / "exports", snapshot="always")
        )
    assert "patch" not in caplog.text
    assert sync_files(third) == written_from_store(db_path, 3, tmp_path / "full-3")


def test_a_sync_that_patches_its_snapshot_never_loads_pandas(serve_account, db_path, tmp_path):
    # Making an Arrow value from a Python one makes pyarrow import pandas to check its
    # type, which would cost a patching sync more than the patch itself.
    upstream = serve_account(runners=30, seed=75)
    export_dir = tmp_path / "exports"
    run_sync(settings_for(upstream, db_path, export_dir=export_dir))
    upstream.account.rename_runner(upstream.account.runner_ids()[0], "renamed")
    script = (
        "import logging, sys\n"
        "from pipeline.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        "    print('pandas loaded:', 'pandas' in sys.modules, file=sys.stderr)\n"
    )
    command = [
        sys.executable,
        "-c",
        script,
        "--debug",
        "sync",
        "--base-url",
        upstream.url,
        "--db",
        str(db_path),
        "--export-dir",
        str(export_dir),
    ]
    env = {**os.environ, "COMFYCONTROL_TOKEN": upstream.account.token}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "patched the parquet snapshot" in done.stderr
    assert "patched the csv snapshot" in done.stderr
    assert "pandas loaded: False" in done.stderr


# The store as the exports read it: the runners table, and the versions' sync ids (which
# is all ``history.touched_since`` reads of them).
_ID = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=6)
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
_STATE = st.fixed_dictionaries(
    {
        "name": _TEXT,
        "tags": st.none() | st.lists(_TEXT, max_size=2),
        "headers": st.none() | st.dictionaries(_TEXT, _TEXT, max_size=2),
        "deleted": st.booleans(),
    }
)


def _row(runner_id: str, state: dict, version: int) -> tuple[object, ...]:
    values = {
        "id": runner_id,
        "user_id": "u",
        "name": state["name"],
        "status": "active",
        "endpoint": "=http://x",
        "tags": None if state["tags"] is None else orjson.dumps(state["tags"]).decode(),
        "headers": None
        if state["headers"] is None
        else orjson.dumps(state["headers"], option=orjson.OPT_SORT_KEYS).decode(),
        "created_at": "2024-01-02T03:04:05Z",
        "updated_at": "2024-01-02T03:04:05.123456Z",
        "extra": "{}",
        "first_seen_at": "2026-03-01T10:00:00.000000Z",
        "deleted_at": "2026-03-01T11:00:00.000000Z" if state["deleted"] else None,
        "version": version,
        "content_hash": f"h{version}",
    }
    return tuple(values[name] for name in FLEET_COLUMNS)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    before=st.dictionaries(_ID, _STATE, max_size=12),
    after=st.dictionaries(_ID, _STATE, max_size=12),
    csv_safe=st.booleans(),
)
@example(  # ids whose order differs by bytes and by what a naive comparison might do
    before={
        "a": {"name": "x", "tags": [], "headers": {}, "deleted": False},
        "é": {"name": "\x00", "tags": None, "headers": None, "deleted": False},
        "Z": {"name": "", "tags": ['"'], "headers": {"k": "\n"}, "deleted": False},
    },
    after={
        "ab": {"name": "+1", "tags": [], "headers": {}, "deleted": False},
        "é": {"name": "\r\n", "tags": None, "headers": None, "deleted": False},
    },
    csv_safe=True,
)
def test_any_change_to_any_fleet_patches_into_the_same_bytes(monkeypatch, before, after, csv_safe):
    """``before`` is the fleet the latest files hold; ``after`` changes the runners it names
    (adding, changing, deleting or restoring them); runners it does not name stay as they
    were. Small batches, row groups and CSV blocks make the merge cross every boundary."""
    monkeypatch.setattr(history, "BATCH_ROWS", 3)
    monkeypatch.setattr(export, "ROW_GROUP_ROWS", 5)
    monkeypatch.setattr(export, "CSV_BLOCK_BYTES", 300)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        db = sqlite3.connect(work / "store.db", check_same_thread=False)
        db.execute(f"CREATE TABLE runners ({', '.join(FLEET_COLUMNS)}, PRIMARY KEY (id))")
        db.execute("CREATE TABLE runner_versions (runner_id, sync_id)")
        db.execute("CREATE INDEX idx_runner_versions_sync_id ON runner_versions (sync_id)")
        marks = ", ".join("?" * len(FLEET_COLUMNS))
        db.executemany(
            f"INSERT INTO runners VALUES ({marks})",
            [_row(i, state, 1) for i, state in before.items()],
        )
        db.executemany("INSERT INTO runner_versions VALUES (?, 1)", [(i,) for i in before])
        first = series.export_snapshots(
            work / "exports",
            sync_id=1,
            snapshot_at="2026-03-01T10:00:00.000000Z",
            db=db,
            csv_safe=csv_safe,
        )
        bases = {
            f.format: (
                Path(f.path),
                SnapshotRecord(
                    1, f.format, 1, f.path, f.rows, f.bytes, "2026-03-01T10:00:00.000000Z", csv_safe
                ),
            )
            for f in first.files
        }
        db.executemany(
            f"INSERT OR REPLACE INTO runners VALUES ({marks})",
            [_row(i, state, 2) for i, state in after.items()],
        )
        db.executemany("INSERT INTO runner_versions VALUES (?, 2)", [(i,) for i in after])

        def second(folder: str, **more: object) -> dict[str, bytes]:
            report = series.export_snapshots(
                work / folder,
                sync_id=2,
                snapshot_at="2026-03-02T09:30:00.000000Z",
                db=db,
                csv_safe=csv_safe,
                **more,
            )
            assert [f.error for f in report.files] == [None, None]
            return {f.format: Path(f.path).read_bytes() for f in report.files}

        patched_files = []
        handler = logging.Handler()
        handler.emit = lambda record: patched_files.append(record.getMessage())  # type: ignore[method-assign]
        logger = logging.getLogger("pipeline.outputs.series")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        try:
            patched = second("patched", bases=bases)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(logging.NOTSET)
        # A csv_safe file whose ids may have been prefixed is not patched (they would not
        # be the runners' ids): one that starts with a quote or a formula character.
        present = [i for i, state in {**before, **after}.items() if not state["deleted"]]
        present += [i for i, state in before.items() if not state["deleted"]]
        unsure = csv_safe and any(re.match(r"['=+\-@\t\r]", i) for i in present)
        expected = ["patched the parquet"] if unsure else ["patched the csv", "patched the parquet"]
        assert sorted(m.split(" snapshot")[0] for m in patched_files if "patched" in m) == expected
        assert patched == second("from-store")
        db.close()


def test_the_latest_files_of_a_sync_are_what_the_store_records(serve_account, db_path, tmp_path):
    """The patch starts from what ``history.latest_snapshots`` names: the newest file per
    format, written or kept, with the sync whose fleet it holds."""
    upstream = serve_account(runners=10, seed=76)
    settings = settings_for(upstream, db_path, export_dir=tmp_path / "exports")
    run_sync(settings)
    run_sync(settings)  # keeps sync 1's files
    db = open_store_read_only(db_path)
    try:
        latest = history.latest_snapshots(db, 3)
        assert {fmt: (r.sync_id, r.file_sync_id) for fmt, r in latest.items()} == {
            "parquet": (2, 1),
            "csv": (2, 1),
        }
        assert latest == snapshot_of_sync(db, 2)
    finally:
        db.close()


def test_files_made_before_an_upgrade_are_neither_kept_nor_patched_from(
    serve_account, db_path, tmp_path, caplog
):
    """A migration may rewrite stored runners without a version (m008 respelled times and
    rehashed rows), so the files made before it may not hold what the store holds."""
    from pipeline.store import schema
    from pipeline.store.meta import META_TABLE, SNAPSHOTS_REUSABLE_AFTER, read_meta

    # An upgrade marks the last sync before it (a new database has no mark).
    old = tmp_path / "old.db"
    legacy = schema.Database(old)
    schema.migrations.apply(legacy, stop_before="m010_snapshot_reuse")
    legacy.table(META_TABLE).upsert({"key": "schema_version", "value": "9"}, pk="key")
    for _ in range(2):
        legacy.execute(
            "INSERT INTO sync_runs (started_at, status) VALUES ('2026-01-01', 'success')"
        )
    legacy.conn.commit()
    legacy.close()
    for path, mark in ((old, "2"), (tmp_path / "new.db", None)):
        db = schema.open_store(path)
        assert read_meta(db, SNAPSHOTS_REUSABLE_AFTER) == mark
        db.close()

    # Sync 1's files, then an upgrade after it: sync 2 (nothing changed) writes its own
    # files, from the store; sync 3 (one change) is patched from sync 2's.
    upstream = serve_account(runners=20, seed=77)
    settings = settings_for(upstream, db_path, export_dir=tmp_path / "exports")
    run_sync(settings)
    _execute(
        db_path,
        f"INSERT INTO {META_TABLE} (key, value) VALUES ('{SNAPSHOTS_REUSABLE_AFTER}', '1')",
    )
    with caplog.at_level(logging.DEBUG, logger="pipeline.outputs.series"):
        second = run_sync(settings)
    assert [(f.same_as_sync_id, f.error) for f in second.snapshots] == [(None, None)] * 2
    assert "patched" not in caplog.text
    assert sync_files(second) == written_from_store(db_path, 2, tmp_path / "full-2")
    upstream.account.rename_runner(upstream.account.runner_ids()[0], "renamed")
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="pipeline.outputs.series"):
        third = run_sync(settings)
    assert "1 runners changed since sync 2" in caplog.text
    assert sync_files(third) == written_from_store(db_path, 3, tmp_path / "full-3")
