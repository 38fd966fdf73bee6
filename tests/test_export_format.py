"""The file formats themselves: types, CSV text, --csv-safe, odd timestamps, empty exports."""

from __future__ import annotations

import csv
import json
import sqlite3
from datetime import UTC, date, datetime
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from export_helpers import FLEET_ORDER
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigurationError
from pipeline.outputs.export import (
    FLEET_SCHEMA,
    HISTORY_SCHEMA,
    ExportRows,
    format_for_path,
    write_export_file,
)
from pipeline.read.history import FLEET_COLUMNS, fleet_query, instant_text, parse_instant

SNAPSHOT_AT = "2026-02-03T04:05:06.789012Z"


def fleet_row(runner_id: str, **fields: object) -> tuple[object, ...]:
    """One row as the store's fleet query yields it (FLEET_COLUMNS order, all text)."""
    values: dict[str, object] = {
        "id": runner_id,
        "user_id": "u-1",
        "name": "runner",
        "status": "active",
        "endpoint": "https://gpu.example.com",
        "tags": '["gpu"]',
        "headers": '{"Authorization":"redacted:0123456789ab"}',
        "created_at": "2024-01-15T10:30:00Z",
        "updated_at": "2024-01-15T10:30:00Z",
        "extra": '{"region":"eu","weight":1.5}',
        "first_seen_at": "2026-02-01T00:00:00.000001Z",
        "deleted_at": None,
        "version": 1,
        "content_hash": "ab" * 32,
    }
    values.update(fields)
    return tuple(values.values())


def stored_fleet(tmp_path: Path, rows: list[tuple[object, ...]], sync_id: int = 7) -> ExportRows:
    """``rows`` in a ``runners`` table of their own, read as the exports read the store."""
    db = sqlite3.connect(
        tmp_path / f"fleet-{len(list(tmp_path.iterdir()))}.db", check_same_thread=False
    )
    db.execute(f"CREATE TABLE runners ({', '.join(FLEET_COLUMNS)})")
    db.executemany(f"INSERT INTO runners VALUES ({', '.join('?' * len(FLEET_COLUMNS))})", rows)
    query = fleet_query(include_deleted=True)
    return ExportRows(FLEET_SCHEMA, db, query, sync_id=sync_id, snapshot_at=SNAPSHOT_AT)


def export(
    tmp_path: Path, name: str, rows: list[tuple[object, ...]], csv_safe: bool = False
) -> Path:
    path = tmp_path / name
    written = write_export_file(path, format_for_path(path), stored_fleet(tmp_path, rows), csv_safe)
    assert written == len(rows)
    return path


def csv_records(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+1+1", "'+1+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tcmd", "'\tcmd"),
        ("\rcmd", "'\rcmd"),
        ("a=b", "a=b"),
        (" =not first", " =not first"),
        ("ünïcode ✓", "ünïcode ✓"),
        ("", ""),
    ],
)
def test_csv_safe_prefixes_exactly_the_cells_a_spreadsheet_would_run(tmp_path, name, expected):
    row = fleet_row("r1", name=name, endpoint="-endpoint", status="@status")
    [plain] = csv_records(export(tmp_path, "plain.csv", [row]))
    [safe] = csv_records(export(tmp_path, "safe.csv", [row], csv_safe=True))
    assert plain["name"] == name
    assert safe["name"] == expected
    assert (safe["endpoint"], safe["status"]) == ("'-endpoint", "'@status")
    assert {k: v for k, v in safe.items() if k not in ("name", "endpoint", "status")} == {
        k: v for k, v in plain.items() if k not in ("name", "endpoint", "status")
    }


def test_timestamps_in_any_iso_shape_become_utc_microseconds_in_both_formats(tmp_path):
    shapes = {
        "z": "2024-01-15T10:30:00Z",
        "offset": "2024-01-15T12:30:00+02:00",
        "naive": "2024-01-15T10:30:00",  # taken as UTC
        "nanoseconds": "2024-01-15T10:30:00.123456789Z",  # truncated to microseconds
    }
    rows = [fleet_row(key, created_at=value, updated_at=value) for key, value in shapes.items()]
    table = pq.read_table(export(tmp_path, "t.parquet", rows))
    created = dict(
        zip(table.column("id").to_pylist(), table.column("created_at").to_pylist(), strict=True)
    )
    exact = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
    assert created == {
        "z": exact,
        "offset": exact,
        "naive": exact,
        "nanoseconds": exact.replace(microsecond=123456),
    }
    text = {r["id"]: r["created_at"] for r in csv_records(export(tmp_path, "t.csv", rows))}
    assert text == {
        "z": "2024-01-15T10:30:00.000000Z",
        "offset": "2024-01-15T10:30:00.000000Z",
        "naive": "2024-01-15T10:30:00.000000Z",
        "nanoseconds": "2024-01-15T10:30:00.123456Z",
    }


def test_every_file_has_the_explicit_schema_and_json_text_in_csv(tmp_path):
    rows = [
        fleet_row("r1", deleted_at="2026-02-02T00:00:00.000000Z", version=3),
        fleet_row("r2", tags="[]", headers="{}", extra="{}"),
    ]
    table = pq.read_table(export(tmp_path, "f.parquet", rows))
    assert table.schema.equals(FLEET_SCHEMA) and table.column_names == FLEET_ORDER
    first, second = table.to_pylist(maps_as_pydicts="strict")
    assert (first["sync_id"], first["snapshot_at"]) == (
        7,
        datetime(2026, 2, 3, 4, 5, 6, 789012, tzinfo=UTC),
    )
    assert first["tags"] == ["gpu"] and second["tags"] == []
    assert (
        first["headers"] == {"Authorization": "redacted:0123456789ab"} and second["headers"] == {}
    )
    assert first["extra"] == '{"region":"eu","weight":1.5}'  # JSON text: any shape the API sent
    assert first["version"] == 3 and first["deleted_at"] == datetime(2026, 2, 2, tzinfo=UTC)
    assert second["deleted_at"] is None

    one, two = csv_records(export(tmp_path, "f.csv", rows))
    assert list(one) == FLEET_ORDER
    assert (one["sync_id"], one["snapshot_at"], one["version"]) == ("7", SNAPSHOT_AT, "3")
    assert json.loads(one["tags"]) == ["gpu"]
    assert json.loads(one["headers"]) == {"Authorization": "redacted:0123456789ab"}
    assert json.loads(one["extra"]) == {"region": "eu", "weight": 1.5}
    assert two["deleted_at"] == "" and two["tags"] == "[]"


def test_a_map_stored_with_spaces_is_read_as_well(tmp_path):
    spaced = '{ "Authorization" : "redacted:0123456789ab" ,  "X-Team":"a b" }'
    [row] = pq.read_table(
        export(tmp_path, "f.parquet", [fleet_row("r1", headers=spaced)])
    ).to_pylist(maps_as_pydicts="strict")
    assert row["headers"] == {"Authorization": "redacted:0123456789ab", "X-Team": "a b"}


def test_an_empty_fleet_is_a_valid_file_with_the_schema(tmp_path):
    table = pq.read_table(export(tmp_path, "empty.parquet", []))
    assert table.num_rows == 0 and table.schema.equals(FLEET_SCHEMA)
    assert (tmp_path / "empty.csv").exists() is False
    assert export(tmp_path, "empty.csv", []).read_text().splitlines() == [
        ",".join(f'"{name}"' for name in FLEET_ORDER)
    ]


def test_the_schemas_follow_the_order_in_which_the_store_queries_yield_columns():
    from pipeline.read.history import VERSION_COLUMNS

    assert FLEET_SCHEMA.names == ["sync_id", "snapshot_at", *FLEET_COLUMNS] == FLEET_ORDER
    assert HISTORY_SCHEMA.names == list(VERSION_COLUMNS)


@pytest.mark.parametrize(
    ("name", "fmt"), [("a.parquet", "parquet"), ("b.csv", "csv"), ("C.PARQUET", "parquet")]
)
def test_the_format_comes_from_the_suffix(name, fmt):
    assert format_for_path(Path(name)) == fmt


@pytest.mark.parametrize("name", ["a.xlsx", "a", "a.parquet.gz", "a.json"])
def test_any_other_suffix_is_a_configuration_error(name):
    with pytest.raises(ConfigurationError, match=r"name the file \*\.parquet or \*\.csv"):
        format_for_path(Path(name))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-28", "2026-11-28T00:00:00.000000Z"),
        ("2026-11-28T14:30:00Z", "2026-11-28T14:30:00.000000Z"),
        ("2026-11-28T14:30:00", "2026-11-28T14:30:00.000000Z"),
        ("2026-11-28T16:30:00.5+02:00", "2026-11-28T14:30:00.500000Z"),
        (date(2026, 11, 28), "2026-11-28T00:00:00.000000Z"),
        (datetime(2026, 11, 28, 14, 30), "2026-11-28T14:30:00.000000Z"),
    ],
)
def test_instants_are_read_as_utc(value, expected):
    assert instant_text(value) == expected


@pytest.mark.parametrize("value", ["yesterday", "28/11/2026", "", "2026-13-01"])
def test_an_unreadable_instant_is_a_configuration_error(value):
    with pytest.raises(ConfigurationError, match="as an ISO 8601 timestamp"):
        parse_instant(value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"export_formats": ("xlsx",)}, "--format must be one or more of parquet, csv, not xlsx"),
        ({"export_formats": ()}, "--format must be one or more of parquet, csv, not nothing"),
        ({"keep_snapshots": 0}, "--keep-snapshots must be at least 1"),
    ],
)
def test_export_settings_are_validated_before_anything_runs(options, message):
    from pipeline.settings import Settings

    with pytest.raises(ConfigurationError) as raised:
        Settings(base_url="http://127.0.0.1:9", **options).validated()
    assert raised.value.message == message


def test_small_read_batches_are_gathered_into_row_groups_without_losing_order(
    tmp_path, monkeypatch
):
    import pipeline.outputs.export
    import pipeline.read.history

    monkeypatch.setattr(pipeline.outputs.export, "ROW_GROUP_ROWS", 5)
    monkeypatch.setattr(pipeline.read.history, "BATCH_ROWS", 4)
    fleet = stored_fleet(tmp_path, [fleet_row(f"r{n:02d}") for n in range(12)], sync_id=1)
    path = tmp_path / "groups.parquet"
    assert write_export_file(path, "parquet", fleet) == 12
    parquet = pq.ParquetFile(path)
    groups = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    assert groups == [8, 4]
    assert parquet.read().column("id").to_pylist() == [f"r{n:02d}" for n in range(12)]


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=_TEXT,
    tags=st.none() | st.lists(_TEXT, max_size=3),
    headers=st.none() | st.dictionaries(_TEXT, _TEXT, max_size=3),
    extra=st.dictionaries(_TEXT, _TEXT | st.integers(-(2**63), 2**63 - 1), max_size=2),
)
@example(  # what could break rewriting JSON text: NULs, quotes, backslashes, braces, colons
    name="\x00",
    tags=["\x00", '"'],
    headers={'a":"b': "\\", "\x00": '"}{"', "": '\\"', "k\\": ":", "\u2028": "{}"},
    extra={"\x00": "\\"},
)
def test_any_stored_text_comes_out_of_both_formats_exactly(tmp_path, name, tags, headers, extra):
    def text(value):
        return None if value is None else orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()

    row = fleet_row("r1", name=name, tags=text(tags), headers=text(headers), extra=text(extra))
    folder = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    [parquet] = pq.read_table(export(folder, "f.parquet", [row])).to_pylist(
        maps_as_pydicts="strict"
    )
    assert (parquet["name"], parquet["tags"], parquet["headers"]) == (name, tags, headers)
    assert parquet["extra"] == text(extra)
    [written] = csv_records(export(folder, "f.csv", [row]))
    assert written["name"] == name
    assert (written["tags"], written["headers"]) == (text(tags) or "", text(headers) or "")
