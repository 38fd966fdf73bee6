"""The mirror as Apache Iceberg tables (pyiceberg), for engines beyond this machine.

After each sync that applied changes, one commit per table, in the namespace ``comfysync``:

* ``runners``: the fleet this sync left (the snapshot's columns) plus ``account``. The
  account's rows are replaced by one overwrite filtered on ``account``, so a reader sees the
  fleet before the sync or after it, never half of it; other accounts' rows are untouched.
* ``runner_versions``: the SQLite table's rows plus ``account``. The rows of every runner the
  sync touched are replaced (a filtered overwrite in the same commit as the new versions),
  so a ``valid_to`` closed by this sync is exact too.
* ``sync_runs``: the run log rows since the last commit, appended.

Every commit's snapshot summary carries ``comfysync.account`` and ``comfysync.sync-id``: time
travel finds "this account's fleet at sync N" from them, and the next sync learns from them
which runs and versions the tables already hold (so a failed commit is caught up later).
Columns a later comfysync adds are added to the tables (schema evolution, no rewrite).
Header values are what the store holds: redacted unless ``--store-header-values``.

Several processes may commit to the same tables: Iceberg's optimistic concurrency refuses a
commit made on stale metadata, and the commit is then rebuilt on the fresh table and tried
again. pyiceberg and pyarrow are imported inside the functions, so ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.outputs.objects import is_url
from pipeline.read import history

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.store.sqlite import Database

log = logging.getLogger(__name__)

NAMESPACE = "comfysync"
TABLES = ("runners", "runner_versions", "sync_runs")
ACCOUNT_PROPERTY = "comfysync.account"
SYNC_PROPERTY = "comfysync.sync-id"
#: Commits tried per table before giving up: each retry follows a commit that won.
COMMIT_ATTEMPTS = 12


@dataclass(frozen=True)
class IcebergTarget:
    """Where to commit: the catalog's URI, its warehouse, and the rows' ``account``."""

    catalog_uri: str
    warehouse: str
    account: str
    s3_endpoint_url: str | None = None


@dataclass(frozen=True)
class IcebergCommit:
    """What one sync committed: rows written per table (None: the table failed, see error)."""

    rows: dict[str, int]
    error: str | None = None


def catalog_properties(target: IcebergTarget) -> dict[str, str]:
    """The pyiceberg catalog properties for ``target`` (SQL catalog for ``sqlite://`` and
    other SQLAlchemy URIs, REST for ``http(s)://``)."""
    properties = {"uri": target.catalog_uri, "warehouse": target.warehouse}
    if target.catalog_uri.startswith(("http://", "https://")):
        properties["type"] = "rest"
    else:
        properties["type"] = "sql"
        properties["init_catalog_tables"] = "true"
    if target.s3_endpoint_url:
        properties["s3.endpoint"] = target.s3_endpoint_url
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:  # else pyiceberg asks the bucket for it
        properties["s3.region"] = region
    return properties


def load_catalog(target: IcebergTarget) -> Any:
    """The catalog of ``target``, with the ``comfysync`` namespace in it.

    Several processes may open a new SQL catalog at once: the one that loses the race to
    create its tables (or the namespace) tries again and finds them made.
    """
    from pyiceberg.catalog import load_catalog as load
    from pyiceberg.exceptions import NamespaceAlreadyExistsError
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            catalog = load(NAMESPACE, **catalog_properties(target))
            catalog.create_namespace_if_not_exists(NAMESPACE)
            return catalog
        except (OperationalError, IntegrityError, NamespaceAlreadyExistsError):
            if attempt == COMMIT_ATTEMPTS:
                raise
            time.sleep(random.uniform(0.02, 0.1) * attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


def default_warehouse(db_path: Path, warehouse: str | None) -> str:
    """The warehouse location: as given (a URL, or a local folder made absolute), else the
    ``iceberg`` folder beside the database."""
    if warehouse is not None and is_url(warehouse):
        return warehouse
    folder = Path(warehouse) if warehouse is not None else db_path.parent / "iceberg"
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder.as_uri()


def commit_sync(
    db: Database, target: IcebergTarget, *, sync_id: int, finished_at: str
) -> IcebergCommit:
    """Commit sync ``sync_id`` (finished at ``finished_at``) to the three tables.

    Never raises for a failure of the catalog or the warehouse: the sync is committed in
    SQLite already; the error is returned for the run's warnings, and the next sync catches
    the tables up.
    """
    try:
        catalog = load_catalog(target)
        rows = {
            name: _commit_table(catalog, name, db, target, sync_id, finished_at) for name in TABLES
        }
    except Exception as exc:
        log.debug("iceberg commit of sync %s failed", sync_id, exc_info=True)
        return IcebergCommit({}, f"Iceberg tables not updated: {_describe(exc)}")
    return IcebergCommit(rows)


def _describe(exc: BaseException) -> str:
    from pipeline.outputs.objects import describe_failure

    if type(exc).__module__.startswith(("pyiceberg", "sqlalchemy")):
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first_line[:200]}"
    return describe_failure(exc)


def _commit_table(
    catalog: Any, name: str, db: Database, target: IcebergTarget, sync_id: int, finished_at: str
) -> int:
    """One table's commit, rebuilt and retried while other committers win the race."""
    from pyiceberg.exceptions import CommitFailedException
    from sqlalchemy.exc import OperationalError

    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        table = ensure_table(catalog, name)
        try:
            return _WRITERS[name](table, db, target, sync_id, finished_at)
        except (CommitFailedException, OperationalError):
            if attempt == COMMIT_ATTEMPTS:
                raise
            log.debug("iceberg commit to %s lost a race; retrying", name)
            # Jittered: committers that collided must not collide again in step.
            time.sleep(random.uniform(0.02, 0.1) * attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


def ensure_table(catalog: Any, name: str) -> Any:
    """The table ``name``, created (partitioned) if missing, with every column of
    ``arrow_schema(name)`` (those it lacks are added)."""
    from pyiceberg.exceptions import NoSuchTableError, TableAlreadyExistsError
    from pyiceberg.transforms import IdentityTransform, MonthTransform

    identifier = (NAMESPACE, name)
    schema = arrow_schema(name)
    try:
        table = catalog.load_table(identifier)
    except NoSuchTableError:
        try:
            # Created with its partitioning in one commit: no writer ever sees it without.
            creation = catalog.create_table_transaction(identifier, schema=schema)
            with creation.update_spec() as spec:
                spec.add_field("account", IdentityTransform(), "account")
                if name == "runner_versions":
                    spec.add_field("valid_from", MonthTransform(), "valid_from_month")
            creation.commit_transaction()
            table = catalog.load_table(identifier)
        except TableAlreadyExistsError:  # another committer created it first
            table = catalog.load_table(identifier)
    known = set(table.schema().column_names)
    if any(field.name not in known for field in schema):
        # A newer comfysync's columns: added, existing data files stay as they are.
        with table.update_schema() as update:
            update.union_by_name(schema)
        table = catalog.load_table(identifier)
    return table


def committed_sync(table: Any, account: str) -> int | None:
    """The latest comfysync sync id ``account`` committed to ``table``, from its snapshots."""
    found = [
        int(snapshot.summary[SYNC_PROPERTY])
        for snapshot in table.snapshots()
        if snapshot.summary is not None
        and snapshot.summary.get(ACCOUNT_PROPERTY) == account
        and SYNC_PROPERTY in snapshot.summary
    ]
    return max(found, default=None)


def _properties(target: IcebergTarget, sync_id: int) -> dict[str, str]:
    return {ACCOUNT_PROPERTY: target.account, SYNC_PROPERTY: str(sync_id)}


def arrow_schema(name: str) -> pa.Schema:
    """The Arrow schema of the table ``name``: its rows' columns, then ``account``."""
    from pipeline.outputs import export

    schemas = {
        "runners": export.FLEET_SCHEMA,
        "runner_versions": export.HISTORY_SCHEMA,
        "sync_runs": export.RUNS_SCHEMA,
    }
    return schemas[name].append(export.ACCOUNT_FIELD)


def _write_runners(
    table: Any, db: Database, target: IcebergTarget, sync_id: int, finished_at: str
) -> int:
    from pyiceberg.expressions import EqualTo

    from pipeline.outputs.export import FLEET_SCHEMA, ExportRows, arrow_table, with_account

    fleet = arrow_table(
        ExportRows(
            FLEET_SCHEMA,
            db,
            history.fleet_query(finished_at),
            sync_id=sync_id,
            snapshot_at=finished_at,
        )
    )
    data = with_account(fleet, target.account)
    with _no_empty_delete_warning():
        table.overwrite(
            data,
            overwrite_filter=EqualTo("account", target.account),
            snapshot_properties=_properties(target, sync_id),
        )
    return len(data)


@contextlib.contextmanager
def _no_empty_delete_warning() -> Iterator[None]:
    """pyiceberg warns when an overwrite's filter matches no rows: the account's first commit."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Delete operation did not match any records")
        yield


def _write_versions(
    table: Any, db: Database, target: IcebergTarget, sync_id: int, finished_at: str
) -> int:
    """Replace the versions of every runner changed since the account's last commit."""
    from pyiceberg.expressions import And, EqualTo, In

    from pipeline.outputs.export import HISTORY_SCHEMA, ExportRows, arrow_table, with_account

    since = committed_sync(table, target.account)
    if since is None or since >= sync_id:
        # The first commit, or a database younger than the tables' rows for this account
        # (recreated, or restored from a backup): every version, all the account's replaced.
        versions = history.versions_query()
        row_filter: Any = EqualTo("account", target.account)
    else:
        ids = [
            row[0]
            for row in db.execute(
                "SELECT DISTINCT runner_id FROM runner_versions WHERE sync_id > ?", [since]
            )
        ]
        versions = history.versions_query(touched_after=since)
        row_filter = And(EqualTo("account", target.account), In("runner_id", ids)) if ids else None
    data = with_account(arrow_table(ExportRows(HISTORY_SCHEMA, db, versions)), target.account)
    properties = _properties(target, sync_id)
    if row_filter is None:  # nothing changed: an empty commit still records the sync
        table.append(data, snapshot_properties=properties)
    else:
        with _no_empty_delete_warning():
            table.overwrite(data, overwrite_filter=row_filter, snapshot_properties=properties)
    return len(data)


def _write_runs(
    table: Any, db: Database, target: IcebergTarget, sync_id: int, finished_at: str
) -> int:
    """Append the finished runs the table does not hold yet (those after the last commit)."""
    from pyiceberg.expressions import EqualTo

    from pipeline.outputs.export import RUNS_SCHEMA, ExportRows, arrow_table, with_account

    since = committed_sync(table, target.account) or 0
    restart = since >= sync_id  # a database younger than the table's rows: all replaced
    runs = history.runs_query(0 if restart else since, sync_id, finished=True)
    data = with_account(arrow_table(ExportRows(RUNS_SCHEMA, db, runs)), target.account)
    if restart:
        with _no_empty_delete_warning():
            table.overwrite(
                data,
                overwrite_filter=EqualTo("account", target.account),
                snapshot_properties=_properties(target, sync_id),
            )
    else:
        table.append(data, snapshot_properties=_properties(target, sync_id))
    return len(data)


_Writer = Callable[[Any, "Database", IcebergTarget, int, str], int]
_WRITERS: dict[str, _Writer] = {
    "runners": _write_runners,
    "runner_versions": _write_versions,
    "sync_runs": _write_runs,
}
