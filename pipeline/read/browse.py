"""``comfysync browse``: Datasette on the mirror, with metadata that explains every column.

The metadata ships inside the package (``datasette_metadata.json``). Datasette keys a
database's metadata by the database's name, which is its file name without the extension,
so the bundled section (written for ``comfysync.db``) is re-keyed for the file being served.

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
from collections.abc import Callable
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
    try:
        import uvicorn
        from datasette.app import Datasette
    except ImportError as exc:
        raise ConfigurationError(INSTALL_HINT) from exc

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                on_start()

    with listen_on(port) as sock:
        datasette = Datasette(
            [str(db_path)], metadata=metadata_for(db_path), settings=DATASETTE_SETTINGS
        )
        # What `datasette serve` does before serving: the plugins' startup hooks.
        asyncio.run(datasette.invoke_startup())
        config = uvicorn.Config(
            datasette.app(), host=HOST, port=port, log_level="info", lifespan="on"
        )
        # uvicorn re-raises the Ctrl+C it has handled; uvicorn.run swallows it the same way.
        with contextlib.suppress(KeyboardInterrupt):
            AnnouncingServer(config).run(sockets=[sock])
