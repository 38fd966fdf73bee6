"""``RunnerStore``: a comfysync database as pandas DataFrames with real dtypes.

The analyst's way in: no SQL, no JSON parsing, no time-zone guessing. Every frame has
tz-aware UTC datetimes (``datetime64[us, UTC]``, as in the Parquet exports), ``tags`` and
``changed_fields`` as lists, ``headers`` and ``extra`` as dicts, counts as integers.

The database is opened read-only (``schema.open_store_read_only``): a RunnerStore never
writes, never creates a file, and is safe to use while a sync runs (the store is in WAL
mode, so each query reads the last committed state without waiting for the writer). It
also works for a user who cannot write the database's folder (see open_store_read_only).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from pipeline.read import history
from pipeline.store import schema

_TIME = "datetime64[us, UTC]"
# dtype per column; every column not named here is text (pandas' ``str``).
_RUNNER_TYPES = {
    "tags": "json",
    "headers": "json",
    "extra": "json",
    "created_at": _TIME,
    "updated_at": _TIME,
    "first_seen_at": _TIME,
    "deleted_at": _TIME,
    "version": "int64",
}
_VERSION_TYPES = {
    **_RUNNER_TYPES,
    "changed_fields": "json",
    "valid_from": _TIME,
    "valid_to": _TIME,
    "sync_id": "int64",
}
_COUNTS = ("pages", "walks", "total_reported", "runners_seen", "created", "updated")
_RUN_TYPES = {
    "id": "int64",
    "started_at": _TIME,
    "finished_at": _TIME,
    # Counts and the verdict are NULL while a run is going and for a failed run.
    **dict.fromkeys((*_COUNTS, "deleted", "restored", "unchanged", "rejected"), "Int64"),
    "complete": "boolean",
    "warnings": "json",
}


class RunnerStore:
    """Read a comfysync database into DataFrames. ``RunnerStore("data/demo.db").runners()``.

    Raises DatabaseError if ``path`` is missing or is not a comfysync database. Use it as a
    context manager, or call ``close()``, to release the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._db = schema.open_store_read_only(self.path)

    def __enter__(self) -> RunnerStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def __repr__(self) -> str:
        return f"RunnerStore({str(self.path)!r})"

    def runners(self, include_deleted: bool = False) -> pd.DataFrame:
        """Every runner present upstream now (and those marked deleted if asked), by id."""
        rows = history.rows(self._db, history.fleet_query(include_deleted=include_deleted))
        return _frame(history.FLEET_COLUMNS, rows, _RUNNER_TYPES)

    def as_of(self, when: str | date | datetime, *, include_deleted: bool = False) -> pd.DataFrame:
        """The fleet exactly as the store knew it at ``when``, rebuilt from the versions.

        ``when`` is ISO 8601 text, a date (its start, UTC) or a datetime (naive means UTC);
        the columns are those of ``runners()``.
        """
        at = history.instant_text(when)
        rows = history.rows(self._db, history.fleet_query(at, include_deleted=include_deleted))
        return _frame(history.FLEET_COLUMNS, rows, _RUNNER_TYPES)

    def versions(self, runner_id: str | None = None) -> pd.DataFrame:
        """Every version of every runner (or of one), by runner and version number."""
        rows = history.rows(self._db, history.versions_query(runner_id))
        return _frame(history.VERSION_COLUMNS, rows, _VERSION_TYPES)

    def runs(self) -> pd.DataFrame:
        """The sync run log, oldest first."""
        return _frame(history.RUN_COLUMNS, history.rows(self._db, history.runs_query()), _RUN_TYPES)


def _frame(
    columns: tuple[str, ...], batches: Iterable[list[history.Row]], types: Mapping[str, str]
) -> pd.DataFrame:
    rows = [row for batch in batches for row in batch]
    values: list[Iterable[Any]] = list(zip(*rows, strict=True)) if rows else [()] * len(columns)
    return pd.DataFrame(
        {
            name: _series(column, types.get(name, "str"))
            for name, column in zip(columns, values, strict=True)
        }
    )


def _series(values: Iterable[Any], dtype: str) -> pd.Series:
    if dtype == "json":
        return pd.Series([None if v is None else orjson.loads(v) for v in values], dtype=object)
    if dtype == _TIME:
        text = pd.Series(list(values), dtype=object)
        return pd.to_datetime(text, utc=True, format="ISO8601").astype(_TIME)
    return pd.Series(list(values), dtype=dtype)
