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


#: The last sync before the database was last upgraded: its snapshot files, and earlier ones,
#: are never kept or patched from, since a migration may rewrite stored runners without a
#: version (m008 did) and such a file may then not hold what the store holds.
SNAPSHOTS_REUSABLE_AFTER = "snapshots_reusable_after"

#: The key of the database's own identifier (``database_id``).
DATABASE_ID = "database_id"


def database_id(db: Database) -> str:
    """The database's stable identifier, made (random, so no two databases share one) the
    first time it is asked for: the ``account`` of its rows in shared Iceberg tables."""
    import secrets

    known = read_meta(db, DATABASE_ID)
    if known is not None:
        return known
    made = f"db-{secrets.token_hex(6)}"
    with db.atomic():
        write_meta(db, DATABASE_ID, made)
    return made
