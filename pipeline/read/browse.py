"""``comfysync browse``: Datasette on the mirror, with metadata that explains every column.

The metadata ships inside the package (``datasette_metadata.json``). Datasette keys a
database's metadata by the database's name, which is its file name without the extension,
so the bundled section (written for ``comfysync.db``) is re-keyed for the file being served.
The accounts of a configuration file are served together, each database under its
account's name, with cross-database queries on and a canned query over every fleet.

Datasette is an optional extra (``pip install 'comfysync[datasette]'``) and the one heavy
dependency of this module, imported only when a server starts. The server listens on
127.0.0.1 only: the mirror is the user's own data, not something to publish by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import socket
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigurationError
from pipeline.store import schema

HOST = "127.0.0.1"
METADATA_RESOURCE = "datasette_metadata.json"
#: The database name the bundled metadata is written for (``data/comfysync.db``).
BUNDLED_DATABASE = "comfysync"
#: The tag facet (runner_tags) runs json_each over every runner: give it more time than
#: Datasette's default, for large mirrors on slow disks (queries keep their default cap).
DATASETTE_SETTINGS = {"facet_time_limit_ms": 1000}
INSTALL_HINT = (
    "Datasette is not installed; install the extra: pip install 'comfysync[datasette]' "
    "(from a checkout: pip install '.[datasette]')"
)


@cache
def _bundled_metadata() -> dict[str, Any]:
    text = resources.files("pipeline.read").joinpath(METADATA_RESOURCE).read_text(encoding="utf-8")
    metadata: dict[str, Any] = json.loads(text)
    return metadata


def database_name(db_path: Path) -> str:
    """The name Datasette gives the database at ``db_path`` (and its URL path)."""
    return db_path.stem


def metadata_for(db_path: Path) -> dict[str, Any]:
    """The bundled metadata, keyed for the database at ``db_path``."""
    metadata = copy.deepcopy(_bundled_metadata())
    databases = metadata["databases"]
    databases[database_name(db_path)] = databases.pop(BUNDLED_DATABASE)
    return metadata


def metadata_json(db_path: Path) -> str:
    """The metadata as the JSON text ``datasette --metadata FILE`` reads."""
    return json.dumps(metadata_for(db_path), indent=2, ensure_ascii=False) + "\n"


#: The most databases Datasette attaches for cross-database queries (SQLite's own limit).
MAX_ACCOUNTS = 10
#: The columns of the fleet query across accounts: the runner, never its header values.
_FLEET_COLUMNS = ("id", "name", "status", "endpoint", "tags", "created_at", "updated_at")


def accounts_metadata(accounts: Iterable[str]) -> dict[str, Any]:
    """The bundled metadata for each account's database (named after the account), and the
    canned query ``all_fleets`` on ``_memory`` that lists every account's present runners."""
    metadata = copy.deepcopy(_bundled_metadata())
    section = metadata["databases"].pop(BUNDLED_DATABASE)
    names = list(accounts)
    columns = ", ".join(_FLEET_COLUMNS)
    union = "\nUNION ALL\n".join(
        f"SELECT '{name}' AS account, {columns} FROM [{name}].runners WHERE deleted_at IS NULL"
        for name in names
    )
    metadata["databases"] = {name: copy.deepcopy(section) for name in names}
    metadata["databases"]["_memory"] = {
        "description": "Every account's database, attached for queries across them.",
        "queries": {
            "all_fleets": {
                "title": "All accounts' fleets",
                "description": "The present runners of every account, with an account column.",
                "sql": f"{union}\nORDER BY account, name",
            }
        },
    }
    return metadata


def write_metadata(db_path: Path, out: Path) -> None:
    """Write the metadata for ``db_path`` to the file ``out``, never over the database itself.

    ConfigurationError if ``out`` is ``db_path`` (or one of its side files): a slip of the
    options must not replace a mirror with a JSON file.
    """
    database = db_path.resolve()
    target = out.resolve()
    own = {database.name + suffix for suffix in ("", "-wal", "-shm", "-journal", ".lock")}
    if target.parent == database.parent and target.name in own:
        raise ConfigurationError(
            f"--metadata-out {out} is the database (--db {db_path}) or one of its files; "
            "pass another file name"
        )
    text = metadata_json(db_path)
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot write {out} ({exc.strerror})") from exc


def listen_on(port: int) -> socket.socket:
    """A socket bound to 127.0.0.1:``port``, or ConfigurationError naming the port.

    Bound here rather than by uvicorn, which reports a port in use by exiting with its own
    status (3, the code comfysync means for authentication) after the app has started.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind((HOST, port))
        sock.listen()
    except OSError as exc:
        sock.close()
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(
            f"cannot listen on {HOST}:{port} ({reason}); pass another --port"
        ) from exc
    return sock


def serve(db_path: Path, *, port: int, on_start: Callable[[], None] = lambda: None) -> None:
    """Serve ``db_path`` read-only with Datasette on 127.0.0.1:``port`` until interrupted.

    Raises DatabaseError if there is no comfysync database there (or it cannot be read),
    and ConfigurationError if Datasette is not installed or the port cannot be listened on;
    nothing is started in those cases. Datasette opens the file itself with SQLite's
    ``mode=ro``, as ``open_store_read_only`` does, so it serves a user who cannot write the
    folder for the same reason. ``on_start`` is called once the server takes requests.
    """
    schema.open_store_read_only(db_path).close()
    Datasette, _ = _datasette_classes()
    with listen_on(port) as sock:
        datasette = Datasette(
            [str(db_path)], metadata=metadata_for(db_path), settings=DATASETTE_SETTINGS
        )
        _run(datasette, sock, port, on_start)


def serve_accounts(
    databases: Mapping[str, Path], *, port: int, on_start: Callable[[], None] = lambda: None
) -> None:
    """Serve every account's database (``databases``: account name -> path) in one Datasette,
    as ``serve`` does one, each under its account's name, with cross-database queries."""
    if len(databases) > MAX_ACCOUNTS:
        raise ConfigurationError(
            f"Datasette joins at most {MAX_ACCOUNTS} databases; pick the accounts to browse "
            "with --account"
        )
    for path in databases.values():
        schema.open_store_read_only(path).close()
    Datasette, Database = _datasette_classes()
    with listen_on(port) as sock:
        datasette = Datasette(
            [], metadata=accounts_metadata(databases), settings=DATASETTE_SETTINGS, crossdb=True
        )
        for name, path in databases.items():
            datasette.add_database(Database(datasette, path=str(path)), name=name, route=name)
        _run(datasette, sock, port, on_start)


def _datasette_classes() -> tuple[Any, Any]:
    """Datasette's app and database classes; ConfigurationError, before anything starts, when
    Datasette or uvicorn (what ``_run`` serves with) is not installed."""
    try:
        import uvicorn  # noqa: F401
        from datasette.app import Datasette
        from datasette.database import Database
    except ImportError as exc:
        raise ConfigurationError(INSTALL_HINT) from exc
    return Datasette, Database


def _run(datasette: Any, sock: socket.socket, port: int, on_start: Callable[[], None]) -> None:
    """Serve ``datasette`` on ``sock`` until interrupted; ``on_start`` once it takes requests."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                on_start()

    # What `datasette serve` does before serving: the plugins' startup hooks.
    asyncio.run(datasette.invoke_startup())
    config = uvicorn.Config(datasette.app(), host=HOST, port=port, log_level="info", lifespan="on")
    # uvicorn re-raises the Ctrl+C it has handled; uvicorn.run swallows it the same way.
    with contextlib.suppress(KeyboardInterrupt):
        AnnouncingServer(config).run(sockets=[sock])
