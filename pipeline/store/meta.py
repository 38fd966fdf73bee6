"""``comfysync_meta``: the key/value table that says what a database is.

Its rows name the application, the schema version, the redaction key's id and, for a
database the demo made, the demo's mark. Its own module so that ``schema`` and ``keyfile``
both read it without importing each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI's --help reads no database: sqlite-utils stays unloaded
    from pipeline.store.sqlite import Database

META_TABLE = "comfysync_meta"


def write_meta(db: Database, key: str, value: str) -> None:
    """Set ``key`` in the database's ``comfysync_meta`` table (e.g. the demo's mark)."""
    db.table(META_TABLE).upsert({"key": key, "value": value}, pk="key")


def read_meta(db: Database, key: str) -> str | None:
    row = db.execute(f"SELECT value FROM {META_TABLE} WHERE key = ?", [key]).fetchone()
    return str(row[0]) if row else None
