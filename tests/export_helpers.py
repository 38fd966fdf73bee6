"""What an export must contain, computed independently of pipeline/outputs/export.py, and a test clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import rows

RUNNER_FIELDS = [
    "user_id",
    "name",
    "status",
    "endpoint",
    "tags",
    "headers",
    "created_at",
    "updated_at",
    "extra",
]
FLEET_ORDER = [
    "sync_id",
    "snapshot_at",
    "id",
    *RUNNER_FIELDS,
    "first_seen_at",
    "deleted_at",
    "version",
    "content_hash",
]
HISTORY_ORDER = [
    "runner_id",
    "version",
    "change",
    "changed_fields",
    *RUNNER_FIELDS,
    "content_hash",
    "valid_from",
    "valid_to",
    "sync_id",
]
TIMES = {
    "snapshot_at",
    "created_at",
    "updated_at",
    "first_seen_at",
    "deleted_at",
    "valid_from",
    "valid_to",
}
JSON_VALUES = {"tags", "headers", "changed_fields"}  # extra stays JSON text in every format
INTS = {"sync_id", "version"}


def utc(text: str | None) -> datetime | None:
    if text is None or text == "":
        return None
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


def typed(name: str, value: object) -> object:
    """A stored (text) value as the exports must type it."""
    if value is None:
        return None
    if name in TIMES:
        return utc(str(value))
    if name in JSON_VALUES:
        return json.loads(str(value))
    if name in INTS:
        return int(value)  # type: ignore[call-overload]
    return value


def store_fleet(
    db_path: Path, *, sync_id: int, snapshot_at: str, deleted: bool = False
) -> list[dict]:
    """The runners table (present runners, or all) as fleet-export rows, sorted by id."""
    where = "" if deleted else "WHERE deleted_at IS NULL"
    found = rows(db_path, f"SELECT {', '.join(FLEET_ORDER[2:])} FROM runners {where} ORDER BY id")
    return [
        {
            "sync_id": sync_id,
            "snapshot_at": utc(snapshot_at),
            **{name: typed(name, value) for name, value in zip(FLEET_ORDER[2:], row, strict=True)},
        }
        for row in found
    ]


def store_history(db_path: Path) -> list[dict]:
    found = rows(
        db_path,
        f"SELECT {', '.join(HISTORY_ORDER)} FROM runner_versions ORDER BY runner_id, version",
    )
    return [
        {name: typed(name, value) for name, value in zip(HISTORY_ORDER, row, strict=True)}
        for row in found
    ]


def parquet_rows(source: Path | pa.Table) -> list[dict]:
    table = pq.read_table(source) if isinstance(source, Path) else source
    return table.to_pylist(maps_as_pydicts="strict")


def csv_rows(path: Path) -> list[dict]:
    """A CSV export read with pandas, its JSON text and timestamps parsed back."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return [
        {name: typed(name, value if value != "" else None) for name, value in record.items()}
        for record in frame.to_dict("records")
    ]


def finished_at(db_path: Path, sync_id: int) -> str:
    return str(rows(db_path, "SELECT finished_at FROM sync_runs WHERE id = ?", (sync_id,))[0][0])


class StepClock:
    """A test clock: starts at ``start`` and moves 1 ms per reading; ``jump_to`` moves it on."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now

    def jump_to(self, moment: datetime) -> None:
        assert moment > self.now, "the store's clock must never run backwards"
        self.now = moment
