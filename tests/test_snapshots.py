"""Snapshots after each sync: the Hive-style series, read back as users read it, and never half-written."""

from __future__ import annotations

import errno
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.dataset as ds
import pytest
from conftest import rows, settings_for
from export_helpers import (
    FLEET_ORDER,
    StepClock,
    csv_rows,
    finished_at,
    parquet_rows,
    store_fleet,
)

from pipeline.outputs.export import FLEET_SCHEMA, open_export_file
from pipeline.sync.run import run_sync

DAY_1 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
DAY_2 = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


def tree(folder: Path) -> list[str]:
    """Every file under ``folder``, hidden ones included, relative and sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def two_syncs_on_two_days(upstream, db_path: Path, export_dir: Path) -> list[list[dict]]:
    """Sync on day 1, change the account, sync on day 2; the store's present fleet after each."""
    clock = StepClock(DAY_1)
    settings = settings_for(upstream, db_path, export_dir=export_dir)
    run_sync(settings, clock=clock)
    first = store_fleet(db_path, sync_id=1, snapshot_at=finished_at(db_path, 1))

    account = upstream.account
    ids = account.runner_ids()
    account.rename_runner(ids[1], "renamed on day 2")
    account.update_runner(ids[2], tags=["moved", "gpu-a100"], status="disabled")
    account.rotate_header(ids[3])
    account.delete_runner(ids[4])
    account.create_runner(name="born on day 2")
    clock.jump_to(DAY_2)
    second_summary = run_sync(settings, clock=clock)
    assert (second_summary.updated, second_summary.deleted, second_summary.created) == (3, 1, 1)
    second = store_fleet(db_path, sync_id=2, snapshot_at=finished_at(db_path, 2))
    return [first, second]


def test_two_syncs_make_two_partitions_per_format_that_pandas_pyarrow_and_duckdb_read_exactly(
    serve_account, db_path, tmp_path
):
    upstream = serve_account(runners=140, seed=21)
    export_dir = tmp_path / "exports"
    expected = two_syncs_on_two_days(upstream, db_path, export_dir)
    assert [len(fleet) for fleet in expected] == [140, 140]
    assert expected[0] != expected[1]

    assert tree(export_dir) == [
        "csv/runners/snapshot_date=2026-03-01/runners-1.csv",
        "csv/runners/snapshot_date=2026-03-02/runners-2.csv",
        "parquet/runners/snapshot_date=2026-03-01/runners-1.parquet",
        "parquet/runners/snapshot_date=2026-03-02/runners-2.parquet",
    ]

    # pandas reads the whole series, with snapshot_date from the folder names.
    frame = pd.read_parquet(export_dir / "parquet" / "runners")
    assert list(frame.columns) == [*FLEET_ORDER, "snapshot_date"]
    assert {name: str(frame[name].dtype) for name in ("sync_id", "version")} == {
        "sync_id": "int64",
        "version": "int64",
    }
    for name in ("snapshot_at", "created_at", "updated_at", "first_seen_at", "deleted_at"):
        assert str(frame[name].dtype) == "datetime64[us, UTC]", name
    assert sorted(map(str, frame["snapshot_date"].unique())) == ["2026-03-01", "2026-03-02"]
    by_sync = dict(tuple(frame.groupby("sync_id")))
    for sync_id, fleet in ((1, expected[0]), (2, expected[1])):
        part = by_sync[sync_id]
        assert list(part["id"]) == [runner["id"] for runner in fleet]
        assert set(map(str, part["snapshot_date"])) == {f"2026-03-0{sync_id}"}
        assert [list(tags) for tags in part["tags"]] == [runner["tags"] for runner in fleet]
        assert [dict(h) for h in part["headers"]] == [runner["headers"] for runner in fleet]
        assert list(part["snapshot_at"]) == [runner["snapshot_at"] for runner in fleet]
        assert list(part["updated_at"]) == [runner["updated_at"] for runner in fleet]

    # pyarrow.dataset: the explicit schema, exactly the store's present runners per sync.
    dataset = ds.dataset(export_dir / "parquet" / "runners", partitioning="hive")
    assert dataset.schema.remove(dataset.schema.get_field_index("snapshot_date")).equals(
        FLEET_SCHEMA
    )
    for sync_id, fleet in ((1, expected[0]), (2, expected[1])):
        table = dataset.to_table(filter=ds.field("sync_id") == sync_id)
        assert parquet_rows(table.drop_columns(["snapshot_date"])) == fleet
        assert set(table.column("snapshot_date").to_pylist()) == {f"2026-03-0{sync_id}"}

    # DuckDB over the glob, as the analysis page shows it.
    glob = f"{export_dir}/parquet/runners/**/*.parquet"
    found = duckdb.sql(
        "SELECT CAST(snapshot_date AS VARCHAR), sync_id, count(*), count(DISTINCT id) "
        f"FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY ALL ORDER BY sync_id"
    ).fetchall()
    assert found == [("2026-03-01", 1, 140, 140), ("2026-03-02", 2, 140, 140)]
    renamed = duckdb.sql(
        f"SELECT sync_id, name FROM read_parquet('{glob}', hive_partitioning = true) "
        "WHERE name = 'renamed on day 2'"
    ).fetchall()
    assert renamed == [(2, "renamed on day 2")]

    # Each CSV file, read with pandas, holds the same values as its Parquet twin.
    for sync_id, day, fleet in ((1, "2026-03-01", expected[0]), (2, "2026-03-02", expected[1])):
        csv_file = (
            export_dir / "csv" / "runners" / f"snapshot_date={day}" / f"runners-{sync_id}.csv"
        )
        assert csv_rows(csv_file) == fleet

    # The snapshots table indexes every file, with its size.
    indexed = rows(
        db_path, "SELECT sync_id, format, path, rows, bytes, error FROM snapshots ORDER BY id"
    )
    assert [(r[0], r[1], r[3], r[5]) for r in indexed] == [
        (1, "parquet", 140, None),
        (1, "csv", 140, None),
        (2, "parquet", 140, None),
        (2, "csv", 140, None),
    ]
    for _, _, path, _, size, _ in indexed:
        assert Path(str(path)).is_absolute() and Path(str(path)).stat().st_size == size


def test_a_write_interrupted_mid_file_leaves_no_file_under_its_final_name_and_the_sync_succeeds(
    serve_account, db_path, tmp_path, caplog
):
    upstream = serve_account(runners=60, seed=22)
    export_dir = tmp_path / "exports"

    class HalfThenDiskFull:
        """Writes the whole Parquet file, then cuts it in half and reports a full disk."""

        def __init__(self, path: Path, fmt: str, schema, csv_safe: bool) -> None:
            self.path = path
            self.file = open_export_file(path, fmt, schema, csv_safe)

        def write(self, batch) -> None:
            self.file.write(batch)

        def close(self) -> int:
            self.file.close()
            data = self.path.read_bytes()
            self.path.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    def half_then_disk_full(path: Path, fmt: str, schema, csv_safe: bool):
        if fmt != "parquet":
            return open_export_file(path, fmt, schema, csv_safe)
        return HalfThenDiskFull(path, fmt, schema, csv_safe)

    with caplog.at_level(logging.WARNING, logger="pipeline"):
        summary = run_sync(
            settings_for(upstream, db_path, export_dir=export_dir),
            write_export_file=half_then_disk_full,
        )

    assert summary.status == "success" and summary.created == 60
    day = finished_at(db_path, 1)[:10]
    # Only the CSV file: no Parquet under its final name, no temporary file left behind.
    assert tree(export_dir) == [f"csv/runners/snapshot_date={day}/runners-1.csv"]
    assert (export_dir / "parquet" / "runners" / f"snapshot_date={day}").is_dir()
    assert rows(db_path, "SELECT status FROM sync_runs") == [("success",)]
    assert rows(db_path, "SELECT count(*) FROM runners") == [(60,)]
    [(fmt, count, size, error), csv_row] = rows(
        db_path, "SELECT format, rows, bytes, error FROM snapshots ORDER BY id"
    )
    assert (fmt, count, size) == ("parquet", None, None)
    assert str(error).startswith("could not write ") and str(error).endswith(
        ": No space left on device"
    )
    assert csv_row == ("csv", 60, (export_dir / tree(export_dir)[0]).stat().st_size, None)
    assert [f.error for f in summary.snapshots if f.error] == [error]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"snapshot not written (the sync itself succeeded): {error}"
    ]


def test_an_earlier_file_under_the_final_name_survives_a_failed_rewrite(tmp_path):
    from pipeline.outputs.snapshot import write_atomically

    target = tmp_path / "runners-1.csv"
    target.write_text("the complete earlier file\n")

    def crash(path: Path) -> int:
        path.write_text("half of the new fi")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, crash)
    assert target.read_text() == "the complete earlier file\n"
    assert os.listdir(tmp_path) == ["runners-1.csv"]


def test_an_export_dir_that_is_a_file_is_refused_before_the_sync_starts(
    serve_account, run_cli, tmp_path
):
    """Clearly wrong from the start: exit 2 and one line, nothing synced (issue 13). A folder
    that breaks later, or a file deeper in the tree, is still only a warning."""
    upstream = serve_account(runners=25, seed=23)
    (tmp_path / "not-a-folder").write_text("a file where the export folder should be")
    result = run_cli(
        "sync", "--base-url", upstream.url, "--token", "test-token", "--export-dir", "not-a-folder"
    )
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        "comfysync: error: --export-dir not-a-folder is a file, not a folder; pass a folder "
        "for the snapshot files (or --no-export)\n"
    )
    assert not (tmp_path / "data").exists()
    assert list(upstream.account.requests) == []


def test_keep_snapshots_prunes_the_oldest_files_and_their_emptied_date_folders(
    serve_account, db_path, tmp_path
):
    upstream = serve_account(runners=8, seed=24)
    export_dir = tmp_path / "exports"
    # Files that merely live in the tree are never pruned.
    (export_dir / "csv" / "runners").mkdir(parents=True)
    (export_dir / "csv" / "runners" / "notes.txt").write_text("mine")
    (export_dir / "csv" / "runners" / "snapshot_date=2026-01-01").mkdir()
    (export_dir / "csv" / "runners" / "snapshot_date=2026-01-01" / "runners-old.csv").write_text(
        "x"
    )
    clock = StepClock(DAY_1)
    settings = settings_for(
        upstream,
        db_path,
        export_dir=export_dir,
        keep_snapshots=2,
        export_formats=("csv", "parquet"),
    )
    summaries = []
    for day in range(1, 5):
        clock.jump_to(datetime(2026, 3, day, 12, tzinfo=UTC))
        upstream.account.create_runner(name=f"day {day}")
        summaries.append(run_sync(settings, clock=clock))

    assert tree(export_dir) == [
        "csv/runners/notes.txt",
        "csv/runners/snapshot_date=2026-01-01/runners-old.csv",
        "csv/runners/snapshot_date=2026-03-03/runners-3.csv",
        "csv/runners/snapshot_date=2026-03-04/runners-4.csv",
        "parquet/runners/snapshot_date=2026-03-03/runners-3.parquet",
        "parquet/runners/snapshot_date=2026-03-04/runners-4.parquet",
    ]
    assert not (export_dir / "parquet" / "runners" / "snapshot_date=2026-03-01").exists()
    assert [len(s.snapshots_pruned) for s in summaries] == [0, 0, 2, 2]
    assert summaries[2].snapshots_pruned == (
        str(export_dir / "parquet/runners/snapshot_date=2026-03-01/runners-1.parquet"),
        str(export_dir / "csv/runners/snapshot_date=2026-03-01/runners-1.csv"),
    )
    assert (
        len(pd.read_parquet(export_dir / "parquet" / "runners")) == 11 + 12
    )  # 8 runners, one more each day


def test_pruning_goes_by_date_then_sync_id_and_never_deletes_the_files_just_written(tmp_path):
    from pipeline.outputs.snapshot import prune_snapshots

    runners = tmp_path / "parquet" / "runners"
    layout = [
        "snapshot_date=2026-01-01/runners-40.parquet",  # the database before a restore
        "snapshot_date=2026-02-01/runners-7.parquet",
        "snapshot_date=2026-02-02/runners-8.parquet",  # just written...
        "snapshot_date=2026-02-02/runners-99.parquet",  # ...beside another database's
    ]
    for name in layout:
        (runners / name).parent.mkdir(parents=True, exist_ok=True)
        (runners / name).write_bytes(b"x")
    just_written = runners / layout[2]

    pruned = prune_snapshots(tmp_path, 1, spare=[just_written])

    assert pruned == (str(runners / layout[1]), str(runners / layout[0]))
    assert tree(tmp_path) == [f"parquet/runners/{name}" for name in layout[2:]]


def test_temporary_files_left_by_a_crash_are_invisible_to_readers_and_swept_when_stale(
    serve_account, db_path, tmp_path
):
    upstream = serve_account(runners=5, seed=25)
    export_dir = tmp_path / "exports"
    settings = settings_for(upstream, db_path, export_dir=export_dir, export_formats=("parquet",))
    run_sync(settings)
    partition = next((export_dir / "parquet" / "runners").iterdir())
    stale = partition / ".runners-7.parquet.0a1b2c3d.tmp"
    fresh = partition / ".runners-8.parquet.4e5f6a7b.tmp"
    for leftover in (stale, fresh):
        leftover.write_bytes(b"PAR1 truncated by a crash")
    an_hour_ago = time.time() - 3700
    os.utime(stale, (an_hour_ago, an_hour_ago))

    assert len(pd.read_parquet(export_dir / "parquet" / "runners")) == 5
    assert len(ds.dataset(export_dir / "parquet" / "runners", partitioning="hive").to_table()) == 5
    glob = f"{export_dir}/parquet/runners/**/*.parquet"
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall() == [(5,)]

    run_sync(settings)
    assert not stale.exists() and fresh.exists()  # fresh: perhaps another writer at work


def test_a_partial_sync_is_snapshotted_a_failed_one_is_not_and_no_export_dir_writes_nothing(
    serve_account, db_path, tmp_path
):
    upstream = serve_account(runners=230, seed=26)
    account = upstream.account
    export_dir = tmp_path / "exports"

    def churn(page: int, per_page: int) -> None:
        if page == 2:
            account.create_runner()

    account.before_page.append(churn)
    partial = run_sync(settings_for(upstream, db_path, export_dir=export_dir, max_walks=1))
    account.before_page.clear()
    assert partial.status == "partial"
    assert [(f.format, f.rows, f.error) for f in partial.snapshots] == [
        ("parquet", partial.runners_seen, None),
        ("csv", partial.runners_seen, None),
    ]

    account.faults.fail_always(503)
    with pytest.raises(Exception, match="nothing was applied"):
        run_sync(settings_for(upstream, db_path, export_dir=export_dir, max_retries=0))
    account.faults.clear()
    assert len(tree(export_dir)) == 2
    assert rows(db_path, "SELECT DISTINCT sync_id FROM snapshots") == [(1,)]

    quiet = run_sync(settings_for(upstream, db_path, export_dir=None))
    assert quiet.status == "success" and quiet.snapshots == ()
    assert len(tree(export_dir)) == 2
    assert rows(db_path, "SELECT count(*) FROM snapshots") == [(2,)]


def test_snapshots_never_contain_a_header_secret(serve_account, db_path, tmp_path):
    secret = "HDRSECRET-51c0ffee"
    upstream = serve_account(runners=12, seed=27)
    target = upstream.account.runner_ids()[3]
    upstream.account.update_runner(target, headers={"Authorization": f"Bearer {secret}"})
    export_dir = tmp_path / "exports"
    run_sync(settings_for(upstream, db_path, export_dir=export_dir))
    files = [p for p in export_dir.rglob("*") if p.is_file()]
    assert len(files) == 2
    for path in files:
        assert secret.encode() not in path.read_bytes()
    exported = parquet_rows(next(p for p in files if p.suffix == ".parquet"))
    [headers] = [r["headers"] for r in exported if r["id"] == target]
    assert headers["Authorization"].startswith("redacted:")


def test_sync_json_lists_the_snapshot_files(serve_account, run_cli, tmp_path):
    import json

    upstream = serve_account(runners=7, seed=28)
    result = run_cli(
        "sync", "--json", "--base-url", upstream.url, "--token", "test-token", "--format", "parquet"
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    [snapshot] = summary["snapshots"]
    day = finished_at(tmp_path / "data" / "comfysync.db", 1)[:10]
    assert {k: v for k, v in snapshot.items() if k not in ("bytes", "written_at")} == {
        "sync_id": 1,
        "format": "parquet",
        "path": f"data/exports/parquet/runners/snapshot_date={day}/runners-1.parquet",
        "rows": 7,
        "error": None,
        "same_as_sync_id": None,
    }
    assert snapshot["bytes"] == (tmp_path / snapshot["path"]).stat().st_size
    assert summary["snapshots_pruned"] == []
