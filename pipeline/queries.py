"""Read-only questions asked of a comfysync database, shared by the commands that show data."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from pipeline.sqlite import Database


@dataclass(frozen=True)
class VersionChange:
    """One version of one runner, as a line of a change report."""

    runner_id: str
    name: str
    version: int
    change: str
    changed_fields: tuple[str, ...]
    valid_from: str
    sync_id: int


def changes_in_sync(db: Database, sync_id: int) -> list[VersionChange]:
    """Every version a sync wrote, in a stable order (change kind, then name)."""
    rows = db.execute(
        "SELECT runner_id, name, version, change, changed_fields, valid_from, sync_id "
        "FROM runner_versions WHERE sync_id = ? ORDER BY change, name, runner_id",
        [sync_id],
    ).fetchall()
    return [
        VersionChange(
            runner_id=row[0],
            name=row[1],
            version=row[2],
            change=row[3],
            changed_fields=tuple(orjson.loads(row[4] or "[]")),
            valid_from=row[5],
            sync_id=row[6],
        )
        for row in rows
    ]
