"""`comfysync export` as a user runs it: a real process, a real store, files read back."""

from __future__ import annotations

import csv
import dataclasses
import shutil
import sqlite3
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import rows, run_comfysync
from export_helpers import (
    FLEET_ORDER,
    HISTORY_ORDER,
    RUNNER_FIELDS,
    csv_rows,
    finished_at,
    parquet_rows,
    store_fleet,
    store_history,
    utc,
)

from pipeline.outputs.export import HISTORY_SCHEMA
from pipeline.sim.simulator import LoopbackServer, SimulatedAccount

FORMULA = '=HYPERLINK("http://x")'


@dataclass(frozen=True)
class Synced:
    data: Path  # the data folder: comfysync.db and exports/
    first_fleet: list[dict]
    renamed: str
    deleted: str

    @property
    def db(self) -> Path:
        return self.data / "comfysync.db"


@pytest.fixture(scope="module")
def store_synced_twice(tmp_path_factory) -> Synced:
    """Two `comfysync sync` runs with changes between them (one runner renamed to a formula).

    Built once for the module; each test gets its own copy of the data folder.
    """
    home = tmp_path_factory.mktemp("synced")
    account = SimulatedAccount(runners=90, seed=31, token="test-token")
    with LoopbackServer(account) as server:
        sync = ("sync", "--base-url", server.url, "--token", "test-token")
        assert run_comfysync(home, *sync).exit_code == 0
        db = home / "data" / "comfysync.db"
        first_fleet = store_fleet(db, sync_id=1, snapshot_at=finished_at(db, 1))
        renamed, deleted = account.runner_ids()[2], account.runner_ids()[6]
        account.rename_runner(renamed, FORMULA)
        account.update_runner(account.runner_ids()[4], tags=["-negative", "+positive", "@at"])
        account.delete_runner(deleted)
        account.create_runner(name="second sync only")
        assert run_comfysync(home, *sync).exit_code == 0
    return Synced(home / "data", first_fleet, renamed, deleted)


@pytest.fixture
def synced_twice(store_synced_twice, tmp_path) -> Synced:
    shutil.copytree(store_synced_twice.data, tmp_path / "data")
    return dataclasses.replace(store_synced_twice, data=tmp_path / "data")


def between_the_syncs(db: Path) -> str:
    first, second = utc(finished_at(db, 1)), utc(finished_at(db, 2))
    assert first is not None and second is not None and first < second
    return (first + (second - first) / 2).isoformat()


def test_as_of_between_the_syncs_is_exactly_the_first_syncs_fleet_and_its_snapshot(
    synced_twice, run_cli, tmp_path
):
    db = synced_twice.db
    at = between_the_syncs(db)
    for name in ("then.parquet", "then.csv"):
        result = run_cli("export", "-o", name, "--as-of", at)
        assert result.exit_code == 0, result.stderr
        assert result.stdout == (
            f"90 rows written to {name} (runners present as of sync 1 at {finished_at(db, 1)})\n"
        )
    assert parquet_rows(tmp_path / "then.parquet") == synced_twice.first_fleet
    assert csv_rows(tmp_path / "then.csv") == synced_twice.first_fleet
    # Rebuilt later from runner_versions, it is the very file the first sync wrote.
    day = finished_at(db, 1)[:10]
    snapshot = tmp_path / "data" / "exports" / "parquet" / "runners" / f"snapshot_date={day}"
    assert pq.read_table(tmp_path / "then.parquet").equals(
        pq.read_table(snapshot / "runners-1.parquet")
    )
    csv_snapshot = tmp_path / "data" / "exports" / "csv" / "runners" / f"snapshot_date={day}"
    assert (tmp_path / "then.csv").read_bytes() == (csv_snapshot / "runners-1.csv").read_bytes()


def test_as_of_reads_dates_offsets_and_instants_before_the_first_sync(
    synced_twice, run_cli, tmp_path
):
    db = synced_twice.db
    first = utc(finished_at(db, 1))
    assert first is not None
    before = (first - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%S")  # no offset: UTC
    result = run_cli("export", "-o", "before.parquet", "--as-of", before)
    assert (
        result.stdout == "0 rows written to before.parquet (no sync had applied changes by then)\n"
    )
    assert pq.read_table(tmp_path / "before.parquet").num_rows == 0
    # A date alone is the start of that day: the day of the first sync has not begun it yet.
    result = run_cli("export", "-o", "day.csv", "--as-of", finished_at(db, 1)[:10])
    assert result.stdout.startswith("0 rows written to day.csv")
    assert (tmp_path / "day.csv").read_text().splitlines() == [
        ",".join(f'"{c}"' for c in FLEET_ORDER)
    ]
    # The same instant as the middle one, written with a +02:00 offset.
    middle = utc(between_the_syncs(db))
    assert middle is not None
    with_offset = (middle + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S.%f+02:00")
    result = run_cli("export", "-o", "offset.parquet", "--as-of", with_offset)
    assert result.stdout.startswith(
        "90 rows written to offset.parquet (runners present as of sync 1"
    )


def test_the_default_is_the_present_fleet_and_include_deleted_adds_the_deleted_runner(
    synced_twice, run_cli, tmp_path
):
    db = synced_twice.db
    assert run_cli("export", "-o", "now.parquet").exit_code == 0
    present = store_fleet(db, sync_id=2, snapshot_at=finished_at(db, 2))
    assert parquet_rows(tmp_path / "now.parquet") == present
    assert len(present) == 90

    result = run_cli("export", "-o", "all.parquet", "--include-deleted")
    assert result.stdout == (
        f"91 rows written to all.parquet "
        f"(runners present or deleted as of sync 2 at {finished_at(db, 2)})\n"
    )
    everyone = store_fleet(db, sync_id=2, snapshot_at=finished_at(db, 2), deleted=True)
    assert parquet_rows(tmp_path / "all.parquet") == everyone
    [gone] = [r for r in everyone if r["id"] == synced_twice.deleted]
    [(deleted_at,)] = rows(db, "SELECT min(valid_from) FROM runner_versions WHERE sync_id = 2")
    assert gone["deleted_at"] == utc(deleted_at) and deleted_at <= finished_at(db, 2)


def test_history_exports_every_version_and_csv_round_trips_to_the_parquet_values(
    synced_twice, run_cli, tmp_path
):
    db = synced_twice.db
    for name in ("history.parquet", "history.csv"):
        result = run_cli("export", "-o", name, "--history")
        assert result.exit_code == 0, result.stderr
        assert result.stdout == f"94 rows written to {name} (every version)\n"
    table = pq.read_table(tmp_path / "history.parquet")
    assert table.schema.equals(HISTORY_SCHEMA) and table.column_names == HISTORY_ORDER
    versions = store_history(db)
    assert len(versions) == 94  # 90 created, 1 more created, 2 updated, 1 deleted
    assert parquet_rows(tmp_path / "history.parquet") == versions
    assert csv_rows(tmp_path / "history.csv") == versions
    renamed = [v for v in versions if v["runner_id"] == synced_twice.renamed]
    assert [(v["version"], v["change"], v["changed_fields"]) for v in renamed] == [
        (1, "created", RUNNER_FIELDS),  # a new runner: every field is new
        (2, "updated", ["name", "updated_at"]),
    ]
    assert renamed[0]["valid_to"] == renamed[1]["valid_from"] and renamed[1]["valid_to"] is None

    # The present fleet, too: CSV read back with pandas equals Parquet, value for value.
    assert run_cli("export", "-o", "now.csv").exit_code == 0
    assert run_cli("export", "-o", "now.parquet").exit_code == 0
    assert csv_rows(tmp_path / "now.csv") == parquet_rows(tmp_path / "now.parquet")


def test_csv_text_conventions(synced_twice, run_cli, tmp_path):
    assert run_cli("export", "-o", "now.csv").exit_code == 0
    raw = (tmp_path / "now.csv").read_bytes()
    raw.decode("utf-8")  # UTF-8
    with open(tmp_path / "now.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    assert table[0] == FLEET_ORDER
    record = dict(zip(table[0], table[1], strict=True))
    assert record["snapshot_at"] == finished_at(synced_twice.db, 2)
    for name in ("created_at", "updated_at", "first_seen_at"):
        assert record[name].endswith("Z") and len(record[name]) == len(
            "2026-01-01T00:00:00.000000Z"
        )
    assert record["deleted_at"] == ""
    assert record["tags"].startswith("[") and record["headers"].startswith("{")
    assert record["extra"] == "{}"


def test_csv_safe_neutralises_a_formula_and_changes_nothing_else(synced_twice, run_cli, tmp_path):
    assert run_cli("export", "-o", "plain.csv").exit_code == 0
    assert run_cli("export", "-o", "safe.csv", "--csv-safe").exit_code == 0

    def cells(name: str) -> dict[str, dict[str, str]]:
        with open(tmp_path / name, newline="", encoding="utf-8") as handle:
            return {r["id"]: r for r in csv.DictReader(handle)}

    plain, safe = cells("plain.csv"), cells("safe.csv")
    renamed = synced_twice.renamed
    assert plain[renamed]["name"] == FORMULA
    assert safe[renamed]["name"] == "'" + FORMULA
    # JSON text starts with [ or {, so the tags inside it are left as they are.
    assert any('"-negative"' in r["tags"] for r in safe.values())
    changed = {
        (runner_id, column)
        for runner_id, record in plain.items()
        for column, value in record.items()
        if safe[runner_id][column] != value
    }
    assert changed == {(renamed, "name")}
    # Parquet keeps the data as it is, whatever the flag.
    assert run_cli("export", "-o", "safe.parquet", "--csv-safe").exit_code == 0
    names = {r["id"]: r["name"] for r in parquet_rows(tmp_path / "safe.parquet")}
    assert names[renamed] == FORMULA


def test_sync_csv_safe_applies_to_the_csv_snapshot(serve_account, run_cli, tmp_path):
    upstream = serve_account(runners=10, seed=32)
    target = upstream.account.runner_ids()[0]
    upstream.account.rename_runner(target, FORMULA)
    sync = ("sync", "--base-url", upstream.url, "--token", "test-token", "--format", "csv")
    assert run_cli(*sync, "--csv-safe", "--export-dir", "safe").exit_code == 0
    assert run_cli(*sync, "--export-dir", "plain", "--db", "other.db").exit_code == 0
    for folder, expected in (("safe", "'" + FORMULA), ("plain", FORMULA)):
        [path] = (tmp_path / folder).rglob("*.csv")
        assert not list((tmp_path / folder).rglob("*.parquet"))
        with open(path, newline="", encoding="utf-8") as handle:
            names = {r["id"]: r["name"] for r in csv.DictReader(handle)}
        assert names[target] == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("-o", "out.xlsx"),
            "cannot tell the format of out.xlsx: name the file *.parquet or *.csv",
        ),
        (
            ("-o", "out.csv", "--db", "absent.db"),
            "no database at absent.db; create one with `comfysync sync` (or try `comfysync demo`)",
        ),
        (
            ("-o", "out.csv", "--db", "theirs.db"),
            "theirs.db is a SQLite database that comfysync did not create; pass a new or comfysync --db path",
        ),
        (
            ("-o", "out.csv", "--as-of", "last tuesday"),
            "cannot read 'last tuesday' as an ISO 8601 timestamp; use e.g. 2026-11-28 or 2026-11-28T14:30:00Z",
        ),
        (("-o", "a-file/out.csv"), "cannot write a-file/out.csv: a-file is a file, not a folder"),
        (("-o", "a-folder.csv"), "cannot write a-folder.csv: a-folder.csv is a folder, not a file"),
        (
            ("-o", "out.csv", "--history", "--as-of", "2026-01-01"),
            "--history exports every version; it cannot be combined with --as-of or --include-deleted",
        ),
    ],
)
def test_usage_errors_exit_2_with_one_line_and_leave_nothing_behind(
    synced_twice, run_cli, tmp_path, args, message
):
    conn = sqlite3.connect(tmp_path / "theirs.db")
    conn.execute("CREATE TABLE mine (x)")
    conn.close()
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder.csv").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())

    result = run_cli("export", *args)
    assert (result.exit_code, result.stdout, result.stderr) == (
        2,
        "",
        f"comfysync: error: {message}\n",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert list((tmp_path / "a-folder.csv").iterdir()) == []


def test_export_while_a_sync_holds_the_write_lock_reads_the_committed_state(
    synced_twice, run_cli, tmp_path
):
    writer = sqlite3.connect(synced_twice.db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE runners SET name = 'uncommitted'")
    writer.execute("UPDATE runner_versions SET name = 'uncommitted'")
    try:
        result = run_cli("export", "-o", "during.parquet", timeout=20)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert result.exit_code == 0, result.stderr
    names = {r["name"] for r in parquet_rows(tmp_path / "during.parquet")}
    assert "uncommitted" not in names and len(names) > 1
    assert rows(synced_twice.db, "SELECT count(*) FROM runners WHERE name = 'uncommitted'") == [
        (0,)
    ]
