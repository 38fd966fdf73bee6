"""RunnerStore: the store as pandas DataFrames with real dtypes, read-only and safe during a sync."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from conftest import rows
from export_helpers import FLEET_ORDER, HISTORY_ORDER, StepClock, store_fleet, store_history

import pipeline
from pipeline.errors import DatabaseError
from pipeline.settings import Settings
from pipeline.sync.run import run_sync

DAY_1 = datetime(2026, 5, 4, 8, 0, tzinfo=UTC)
DAY_2 = datetime(2026, 5, 5, 8, 0, tzinfo=UTC)
RUNNER_COLUMNS = FLEET_ORDER[2:]  # a RunnerStore frame has no sync_id/snapshot_at


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    """A store after two syncs on two days, with an update, a deletion and a creation between."""
    from pipeline.sim.simulator import LoopbackServer, SimulatedAccount

    path = tmp_path_factory.mktemp("frames") / "mirror.db"
    account = SimulatedAccount(runners=70, seed=41, token="t")
    clock = StepClock(DAY_1)
    with LoopbackServer(account) as server:
        settings = Settings(base_url=server.url, token="t", db_path=path)
        run_sync(settings, clock=clock)
        ids = account.runner_ids()
        account.rename_runner(ids[0], "renamed")
        account.delete_runner(ids[1])
        account.create_runner(name="new on day 2")
        clock.jump_to(DAY_2)
        run_sync(settings, clock=clock)
    return path


def as_records(frame: pd.DataFrame) -> list[dict]:
    """A frame as plain Python values, NaT as None, for exact comparison with the store."""
    records = []
    for record in frame.to_dict("records"):
        records.append(
            {
                key: (None if value is pd.NaT else value.to_pydatetime())
                if isinstance(value, pd.Timestamp) or value is pd.NaT
                else value
                for key, value in record.items()
            }
        )
    return records


def without_snapshot_columns(fleet: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("sync_id", "snapshot_at")} for r in fleet]


def parse_json_extra(records: list[dict]) -> list[dict]:
    import json

    return [{**r, "extra": json.loads(r["extra"])} for r in records]


def test_runner_store_is_exported_at_package_level_and_gives_typed_runners(store_path):
    with pipeline.RunnerStore(store_path) as store:
        frame = store.runners()
    assert list(frame.columns) == RUNNER_COLUMNS
    dtypes = {name: str(dtype) for name, dtype in frame.dtypes.items()}
    assert dtypes == {
        "id": "str",
        "user_id": "str",
        "name": "str",
        "status": "str",
        "endpoint": "str",
        "tags": "object",
        "headers": "object",
        "created_at": "datetime64[us, UTC]",
        "updated_at": "datetime64[us, UTC]",
        "extra": "object",
        "first_seen_at": "datetime64[us, UTC]",
        "deleted_at": "datetime64[us, UTC]",
        "version": "int64",
        "content_hash": "str",
    }
    expected = store_fleet(store_path, sync_id=0, snapshot_at="2026-01-01T00:00:00Z")
    assert as_records(frame) == parse_json_extra(without_snapshot_columns(expected))
    assert len(frame) == 70
    assert all(isinstance(t, list) for t in frame["tags"])
    assert all(isinstance(h, dict) for h in frame["headers"])
    assert frame["deleted_at"].isna().all()


def test_include_deleted_adds_the_deleted_runner_with_its_deletion_time(store_path):
    with pipeline.RunnerStore(store_path) as store:
        everyone = store.runners(include_deleted=True)
    assert len(everyone) == 71
    [(deleted_at,)] = rows(
        store_path, "SELECT deleted_at FROM runners WHERE deleted_at IS NOT NULL"
    )
    gone = everyone[everyone["deleted_at"].notna()]
    assert list(gone["deleted_at"]) == [pd.Timestamp(str(deleted_at))]
    assert gone["deleted_at"].iloc[0].date() == DAY_2.date()


@pytest.mark.parametrize(
    "when",
    [
        "2026-05-04T20:00:00Z",
        "2026-05-04T22:00:00+02:00",
        "2026-05-05",  # a date alone: its start, UTC, which is before the second sync
        date(2026, 5, 5),
        datetime(2026, 5, 4, 20, 0),  # naive: UTC
        datetime(2026, 5, 4, 21, 0, tzinfo=timezone(timedelta(hours=1))),
        pd.Timestamp("2026-05-04 20:00", tz="UTC"),
    ],
)
def test_as_of_between_the_syncs_is_the_first_syncs_fleet(store_path, when):
    with pipeline.RunnerStore(store_path) as store:
        then = store.as_of(when)
    assert len(then) == 70
    assert "renamed" not in set(then["name"]) and "new on day 2" not in set(then["name"])
    assert (then["version"] == 1).all()
    assert str(then["created_at"].dtype) == "datetime64[us, UTC]"
    assert list(then.columns) == RUNNER_COLUMNS


def test_as_of_now_equals_the_runners_table_and_before_the_first_sync_is_empty(store_path):
    with pipeline.RunnerStore(store_path) as store:
        now = store.as_of(datetime.now(UTC))
        assert now.equals(store.runners())
        assert store.as_of(DAY_2 + timedelta(days=365), include_deleted=True).equals(
            store.runners(include_deleted=True)
        )
        before = store.as_of("2026-05-04")
    assert before.empty and list(before.columns) == RUNNER_COLUMNS
    assert str(before["updated_at"].dtype) == "datetime64[us, UTC]"


def test_versions_are_every_version_with_lists_and_intervals(store_path):
    with pipeline.RunnerStore(store_path) as store:
        versions = store.versions()
        renamed_id = versions.loc[versions["name"] == "renamed", "runner_id"].iloc[0]
        one = store.versions(renamed_id)
    assert list(versions.columns) == HISTORY_ORDER
    assert str(versions["valid_to"].dtype) == "datetime64[us, UTC]"
    assert str(versions["sync_id"].dtype) == "int64"
    assert len(versions) == 73  # 70 created, 1 updated, 1 deleted, 1 created
    expected = parse_json_extra(store_history(store_path))
    assert as_records(versions) == expected
    assert list(one["version"]) == [1, 2]
    assert list(one["change"]) == ["created", "updated"]
    assert one["changed_fields"].iloc[1] == ["name", "updated_at"]
    assert one["valid_to"].iloc[0] == one["valid_from"].iloc[1] and pd.isna(one["valid_to"].iloc[1])


def test_runs_is_the_run_log_with_real_dtypes_including_a_failed_run(tmp_path):
    from pipeline.sim.simulator import LoopbackServer, SimulatedAccount

    path = tmp_path / "runs.db"
    account = SimulatedAccount(runners=5, seed=42, token="t")
    with LoopbackServer(account) as server:
        settings = Settings(base_url=server.url, token="t", db_path=path, max_retries=0)
        run_sync(settings)
        account.faults.fail_always(503)
        with pytest.raises(pipeline.ComfySyncError):
            run_sync(settings)
    with pipeline.RunnerStore(path) as store:
        runs = store.runs()
    assert list(runs["status"]) == ["success", "failed"]
    assert {
        name: str(runs[name].dtype)
        for name in ("id", "started_at", "complete", "created", "warnings")
    } == {
        "id": "int64",
        "started_at": "datetime64[us, UTC]",
        "complete": "boolean",
        "created": "Int64",
        "warnings": "object",
    }
    assert runs["complete"].iloc[0] == True and pd.isna(runs["complete"].iloc[1])  # noqa: E712
    assert runs["created"].iloc[0] == 5 and pd.isna(runs["created"].iloc[1])
    assert list(runs["error"].fillna("")) == [
        "",
        "ComfyControl failed on page 1 after 1 attempts (HTTP 503); nothing was applied, "
        "try again later",
    ]


def test_runner_store_opens_read_only_and_never_creates_or_changes_a_file(tmp_path, store_path):
    absent = tmp_path / "absent.db"
    with pytest.raises(DatabaseError, match="no database at"):
        pipeline.RunnerStore(absent)
    assert not absent.exists()

    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE notes (text)")
    conn.close()
    with pytest.raises(DatabaseError, match="did not create"):
        pipeline.RunnerStore(foreign)

    digest = hashlib.sha256(store_path.read_bytes()).hexdigest()
    store = pipeline.RunnerStore(store_path)
    store.runners(), store.versions(), store.runs(), store.as_of("2026-05-05")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store._db.execute("DELETE FROM runners")
    store.close()
    assert hashlib.sha256(store_path.read_bytes()).hexdigest() == digest


def test_reading_while_a_sync_holds_the_write_lock_neither_waits_nor_sees_uncommitted_rows(
    store_path,
):
    writer = sqlite3.connect(store_path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE runners SET name = 'uncommitted'")
    try:
        with pipeline.RunnerStore(store_path) as store:
            started = time.monotonic()
            names = set(store.runners()["name"])
            elapsed = time.monotonic() - started
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert "uncommitted" not in names and len(names) > 1
    assert elapsed < 2  # the busy timeout is 10 s: a reader that waited would show it
