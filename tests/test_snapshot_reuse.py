"""A sync whose fleet is the latest snapshot's keeps that file: when it is skipped, when it is
written, what the store records, and that the series still answers "the fleet at sync N"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.dataset as ds
from conftest import rows, settings_for
from export_helpers import StepClock, csv_rows, finished_at, parquet_rows, store_fleet

from pipeline.read.history import snapshot_of_sync
from pipeline.store.schema import open_store_read_only
from pipeline.sync.run import run_sync

DAY_1 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
DAY_2 = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


def files(export_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``export_dir``, relative, with its inode and mtime (ns)."""
    return {
        str(p.relative_to(export_dir)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(export_dir.rglob("*"))
        if p.is_file()
    }


def recorded(db_path: Path) -> list[tuple[object, ...]]:
    return rows(
        db_path,
        "SELECT sync_id, format, same_as_sync_id, rows, error IS NULL FROM snapshots ORDER BY id",
    )


def fleet_at(db_path: Path, sync_id: int) -> dict[str, tuple[int, str]]:
    db = open_store_read_only(db_path)
    try:
        return {
            fmt: (record.file_sync_id, record.path)
            for fmt, record in snapshot_of_sync(db, sync_id).items()
        }
    finally:
        db.close()


def test_an_unchanged_fleet_keeps_the_latest_files_and_the_store_says_which_hold_it(
    serve_account, db_path, tmp_path
):
    upstream = serve_account(runners=40, seed=61)
    export_dir = tmp_path / "exports"
    clock = StepClock(DAY_1)
    settings = settings_for(upstream, db_path, export_dir=export_dir)
    first = run_sync(settings, clock=clock)
    before = files(export_dir)
    assert len(before) == 2

    second = run_sync(settings, clock=clock)
    third = run_sync(settings, clock=clock)

    assert files(export_dir) == before  # not rewritten: same inodes, same mtimes
    for summary in (second, third):
        assert [(f.format, f.same_as_sync_id, f.rows, f.error) for f in summary.snapshots] == [
            ("parquet", 1, 40, None),
            ("csv", 1, 40, None),
        ]
        assert [f.path for f in summary.snapshots] == [f.path for f in first.snapshots]
    assert recorded(db_path) == [
        (1, "parquet", None, 40, 1),
        (1, "csv", None, 40, 1),
        (2, "parquet", 1, 40, 1),
        (2, "csv", 1, 40, 1),
        (3, "parquet", 1, 40, 1),
        (3, "csv", 1, 40, 1),
    ]
    # The fleet at every sync is answered by a file, and it is that sync's fleet.
    for sync_id in (1, 2, 3):
        found = fleet_at(db_path, sync_id)
        assert {fmt: file_sync for fmt, (file_sync, _) in found.items()} == {
            "parquet": 1,
            "csv": 1,
        }
        expected = store_fleet(db_path, sync_id=1, snapshot_at=finished_at(db_path, 1))
        assert parquet_rows(Path(found["parquet"][1])) == expected
        assert csv_rows(Path(found["csv"][1])) == expected

    # A change is written, by the sync that saw it.
    upstream.account.rename_runner(upstream.account.runner_ids()[0], "renamed")
    fourth = run_sync(settings, clock=clock)
    assert fourth.updated == 1
    assert [(f.same_as_sync_id, f.error) for f in fourth.snapshots] == [(None, None)] * 2
    assert sorted(files(export_dir)) == sorted(
        [*before, *(str(Path(f.path).relative_to(export_dir)) for f in fourth.snapshots)]
    )
    assert fleet_at(db_path, 4)["parquet"][0] == 4

    # Readers see one file per written snapshot, as before.
    frame = pd.read_parquet(export_dir / "parquet" / "runners")
    assert frame.groupby("sync_id").size().to_dict() == {1: 40, 4: 40}
    dataset = ds.dataset(export_dir / "parquet" / "runners", partitioning="hive")
    assert dataset.count_rows() == 80
    glob = f"{export_dir}/parquet/runners/**/*.parquet"
    assert duckdb.sql(
        f"SELECT sync_id, count(*) FROM read_parquet('{glob}', hive_partitioning = true) "
        "GROUP BY ALL ORDER BY 1"
    ).fetchall() == [(1, 40), (4, 40)]


def test_a_new_day_a_deleted_or_truncated_file_and_snapshot_always_are_written(
    serve_account, db_path, tmp_path
):
    upstream = serve_account(runners=30, seed=62)
    export_dir = tmp_path / "exports"
    clock = StepClock(DAY_1)
    settings = settings_for(upstream, db_path, export_dir=export_dir)
    first = run_sync(settings, clock=clock)
    parquet_1, csv_1 = (Path(f.path) for f in first.snapshots)

    # The CSV file deleted, the Parquet file truncated: both written again.
    csv_1.unlink()
    parquet_1.write_bytes(parquet_1.read_bytes()[:100])
    second = run_sync(settings, clock=clock)
    assert [(f.same_as_sync_id, f.error) for f in second.snapshots] == [(None, None)] * 2
    assert [Path(f.path).name for f in second.snapshots] == ["runners-2.parquet", "runners-2.csv"]

    # Only the CSV file gone this time: the Parquet file is kept, the CSV one written.
    Path(second.snapshots[1].path).unlink()
    third = run_sync(settings, clock=clock)
    assert [(f.format, f.same_as_sync_id) for f in third.snapshots] == [
        ("parquet", 2),
        ("csv", None),
    ]

    # --snapshot always writes an unchanged fleet too.
    always = run_sync(settings_for(upstream, db_path, export_dir=export_dir, snapshot="always"))
    assert [(f.same_as_sync_id, f.error) for f in always.snapshots] == [(None, None)] * 2

    # A new UTC day: the day's folder gets the fleet, though nothing changed.
    clock.jump_to(DAY_2)
    next_day = run_sync(settings, clock=clock)
    assert next_day.created + next_day.updated + next_day.deleted == 0
    assert [(f.same_as_sync_id, f.error) for f in next_day.snapshots] == [(None, None)] * 2
    assert all("snapshot_date=2026-03-02" in f.path for f in next_day.snapshots)
    assert [f.same_as_sync_id for f in run_sync(settings, clock=clock).snapshots] == [5, 5]


def test_another_csv_safe_setting_writes_the_csv_file_again(serve_account, db_path, tmp_path):
    upstream = serve_account(runners=10, seed=63)
    export_dir = tmp_path / "exports"
    run_sync(settings_for(upstream, db_path, export_dir=export_dir))
    safe = run_sync(settings_for(upstream, db_path, export_dir=export_dir, csv_safe=True))
    assert [(f.format, f.same_as_sync_id) for f in safe.snapshots] == [
        ("parquet", 1),
        ("csv", None),
    ]
    again = run_sync(settings_for(upstream, db_path, export_dir=export_dir, csv_safe=True))
    assert [f.same_as_sync_id for f in again.snapshots] == [1, 2]
    assert rows(db_path, "SELECT format, csv_safe FROM snapshots WHERE sync_id = 3") == [
        ("parquet", None),
        ("csv", 1),
    ]


def test_a_moved_database_and_export_folder_keep_their_files(serve_account, tmp_path):
    upstream = serve_account(runners=12, seed=64)
    old = tmp_path / "old"
    run_sync(settings_for(upstream, old / "mirror.db", export_dir=old / "exports"))
    new = tmp_path / "new"
    os.rename(old, new)
    moved = run_sync(settings_for(upstream, new / "mirror.db", export_dir=new / "exports"))
    assert [f.same_as_sync_id for f in moved.snapshots] == [1, 1]
    assert all(f.path.startswith(str(new / "exports")) for f in moved.snapshots)
    # Another export folder holds no file of this fleet: written there.
    elsewhere = run_sync(settings_for(upstream, new / "mirror.db", export_dir=tmp_path / "else"))
    assert [f.same_as_sync_id for f in elsewhere.snapshots] == [None, None]


def test_keep_snapshots_never_prunes_the_file_a_kept_snapshot_points_to(
    serve_account, db_path, tmp_path
):
    upstream = serve_account(runners=8, seed=65)
    export_dir = tmp_path / "exports"
    settings = settings_for(
        upstream, db_path, export_dir=export_dir, keep_snapshots=1, export_formats=("parquet",)
    )
    clock = StepClock(DAY_1)
    run_sync(settings, clock=clock)
    # Another database's file, newer by sync id in the same day's folder.
    partition = export_dir / "parquet" / "runners" / "snapshot_date=2026-03-01"
    (partition / "runners-99.parquet").write_bytes(b"not ours")
    kept = run_sync(settings, clock=clock)
    assert [(f.same_as_sync_id, f.error) for f in kept.snapshots] == [(1, None)]
    assert Path(kept.snapshots[0].path).is_file()
    assert sorted(p.name for p in partition.iterdir()) == [
        "runners-1.parquet",
        "runners-99.parquet",
    ]


def test_the_cli_says_when_a_snapshot_was_kept_and_status_shows_it(serve_account, run_cli):
    upstream = serve_account(runners=9, seed=66)
    sync = ("sync", "--base-url", upstream.url, "--token", "test-token")
    assert run_cli(*sync).exit_code == 0
    second = run_cli(*sync)
    assert second.exit_code == 0, second.stderr
    snapshot_lines = [line for line in second.stdout.splitlines() if "snapshot:" in line]
    assert len(snapshot_lines) == 2
    assert all(
        line.endswith("(9 rows; fleet unchanged since sync 1, file kept)") and "runners-1." in line
        for line in snapshot_lines
    )
    as_json = json.loads(run_cli(*sync, "--json").stdout)
    assert [s["same_as_sync_id"] for s in as_json["snapshots"]] == [1, 1]
    status = run_cli("status")
    assert status.exit_code == 0, status.stderr
    assert status.stdout.splitlines()[-1] == (
        "               sync 3: fleet unchanged, kept sync 1's parquet and csv"
    )
    latest = json.loads(run_cli("status", "--json").stdout)["snapshots"]["latest"]
    assert [(r["sync_id"], r["format"], r["file_sync_id"]) for r in latest] == [
        (3, "parquet", 1),
        (3, "csv", 1),
    ]
    always = run_cli(*sync, "--snapshot", "always")
    assert always.exit_code == 0 and "runners-4.parquet (9 rows)" in always.stdout


def test_a_bad_snapshot_value_is_exit_2_in_one_line(run_cli):
    result = run_cli("sync", "--snapshot", "sometimes")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--snapshot" in result.stderr and "sometimes" in result.stderr


def test_a_failed_look_up_of_the_latest_files_writes_new_ones(
    serve_account, db_path, tmp_path, monkeypatch, caplog
):
    import sqlite3

    from pipeline.read import history

    upstream = serve_account(runners=6, seed=67)
    settings = settings_for(upstream, db_path, export_dir=tmp_path / "exports")
    run_sync(settings)

    def broken(db, sync_id):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(history, "latest_snapshots", broken)
    second = run_sync(settings)
    assert second.status == "success"
    assert [(f.same_as_sync_id, f.error) for f in second.snapshots] == [(None, None)] * 2
    assert "could not read the latest snapshot files (OperationalError)" in caplog.text


def test_a_sync_that_keeps_every_file_never_loads_pyarrow(serve_account, db_path, tmp_path):
    # What a scheduled sync of a quiet fleet costs is the walk: not the import of the
    # library that would have written the files.
    upstream = serve_account(runners=30, seed=67)
    export_dir = tmp_path / "exports"
    run_sync(settings_for(upstream, db_path, export_dir=export_dir))
    script = (
        "import sys\n"
        "from pipeline.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        "    print('pyarrow loaded:', 'pyarrow' in sys.modules, file=sys.stderr)\n"
    )
    base = ["sync", "--base-url", upstream.url, "--db", str(db_path)]
    env = {**os.environ, "COMFYCONTROL_TOKEN": upstream.account.token}

    def sync(*more: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", script, *base, "--export-dir", str(export_dir), *more]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)

    quiet = sync()
    assert "file kept" in quiet.stdout and "pyarrow loaded: False" in quiet.stderr
    forced = sync("--snapshot", "always")
    assert "file kept" not in forced.stdout and "pyarrow loaded: True" in forced.stderr
