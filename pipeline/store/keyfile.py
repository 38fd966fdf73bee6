"""The redaction key: kept beside the database in a file only its owner can read, never inside.

Header secrets are stored as ``redacted:`` + an HMAC under this key, and ``raw_fingerprint``
and page digests are keyed with it too. Whoever holds the key can test guessed secrets
against those digests offline, so the key must not travel with the database (a copy, a
backup, a Datasette publication). It lives in ``<database file>.key`` (e.g.
``data/comfysync.db.key``): 64 hex digits and a newline, mode 0600, created by the first
sync. ``COMFYSYNC_REDACTION_KEY`` (hex) overrides that file. The database keeps only the
key's id (``redaction_key_id`` in ``comfysync_meta``), a one-way digest of the key that says
nothing about any secret, so a sync under another key is refused instead of reporting every
header as changed.

The file sits beside the database file as SQLite resolves it (where its ``-wal`` goes), so
every command finds the same file from an open connection.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import secrets
import sqlite3
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigurationError, DatabaseError, StorageError
from pipeline.store.meta import META_TABLE, read_meta

if TYPE_CHECKING:
    from pipeline.store.sqlite import Database

KEY_ENV = "COMFYSYNC_REDACTION_KEY"
KEY_SUFFIX = ".key"
#: The ``comfysync_meta`` row that names the key a database was made with.
KEY_ID_META = "redaction_key_id"
#: Where databases made before the key moved out kept the key itself (see schema m009).
LEGACY_KEY_META = "redaction_key"
KEY_BYTES = 32
_KEY_ID_MESSAGE = b"comfysync key id"
_KEY_HINT = 'such as the output of: python -c "import secrets; print(secrets.token_hex(32))"'


def key_id(key: bytes) -> str:
    """The id stored in the database: 16 hex digits of HMAC-SHA256(key, "comfysync key id").

    A digest of a fixed message, so it tells the key apart from another without helping
    anyone test guesses of a header secret.
    """
    return hmac.new(key, _KEY_ID_MESSAGE, hashlib.sha256).hexdigest()[:16]


def parse_key(text: str) -> bytes:
    """The key written as hex text (surrounding whitespace ignored); ValueError if it is not
    one of at least KEY_BYTES bytes."""
    key = bytes.fromhex(text.strip())
    if len(key) < KEY_BYTES:
        raise ValueError("too short")
    return key


def check_env_key(text: str) -> bytes:
    """``parse_key`` for COMFYSYNC_REDACTION_KEY, with a message that never quotes it."""
    try:
        return parse_key(text)
    except ValueError:
        raise ConfigurationError(
            f"{KEY_ENV} must be a key of at least {2 * KEY_BYTES} hex digits ({KEY_BYTES} "
            f"bytes), {_KEY_HINT}"
        ) from None


def database_file(db: Database) -> Path:
    """The file of ``db``'s main database, as SQLite resolved it."""
    for _, name, file in db.execute("PRAGMA database_list"):
        if name == "main" and file:
            return Path(file)
    raise DatabaseError("an in-memory database has no redaction key file")


def key_path_for(db_file: Path) -> Path:
    """The key file of a database file: beside it, named ``<db>.key``."""
    return db_file.with_name(db_file.name + KEY_SUFFIX)


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it (as users typed it)."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def read_key_file(path: Path) -> bytes | None:
    """The key in ``path``, or None if there is no such file.

    Refuses (DatabaseError) a file that others may read or write, one that is not a
    regular file, one that cannot be read and one that is not a key. A symlink is
    followed: it lets the key live elsewhere, and the target's own mode is what is checked.
    """
    shown = _shown(path)
    try:
        # O_NONBLOCK: a FIFO put there is refused below instead of hanging the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as file:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise DatabaseError(f"the redaction key file {shown} is not a regular file")
            permissions = stat.S_IMODE(status.st_mode)
            if permissions & 0o077:
                raise DatabaseError(
                    f"the redaction key file {shown} can be read or written by other users "
                    f"(mode {permissions:04o}); run: chmod 600 {shown}"
                )
            data = file.read(1024)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DatabaseError(
            f"cannot read the redaction key file {shown} ({exc.strerror or exc})"
        ) from exc
    try:
        return parse_key(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise DatabaseError(
            f"the redaction key file {shown} is not a key (it must hold {2 * KEY_BYTES} hex "
            "digits); restore it from your backup"
        ) from None


def create_key_file(path: Path, key: bytes) -> None:
    """Write ``key`` to a new file at ``path``, mode 0600 whatever the umask, never replacing
    one: DatabaseError if a file is there already or the folder refuses it.

    The key is written and synced to a private temporary file that is then hard-linked
    into place, so the file appears complete or not at all, and never over another.
    """
    shown = _shown(path)
    fd, temporary = -1, None
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.fchmod(fd, 0o600)
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.link(temporary, path)
    except FileExistsError:
        raise DatabaseError(
            f"the redaction key file {shown} appeared while it was being created; run again"
        ) from None
    except OSError as exc:
        message = f"cannot create the redaction key file {shown} ({exc.strerror or exc})"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise StorageError(f"{message}; is the disk full? nothing was applied") from exc
        raise DatabaseError(message) from exc
    finally:
        if fd >= 0:
            os.close(fd)
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
    with contextlib.suppress(OSError):  # make the new name durable too
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def keep_key(db: Database, key: bytes) -> None:
    """Make sure the key file of ``db`` holds ``key``, creating it if there is none.

    For moving a key out of a database: DatabaseError if the file holds another key (the
    database is then left as it is, its key still inside).
    """
    path = key_path_for(database_file(db))
    found = read_key_file(path)
    if found is None:
        create_key_file(path, key)
    elif found != key:
        shown = _shown(path)
        raise DatabaseError(
            _mismatch(db, shown, key_id(key), f"move {shown} aside or restore the right one")
        )


def _stored_id(db: Database) -> str | None:
    return read_meta(db, KEY_ID_META)


def _mismatch(db: Database, source: str, stored_id: str, fix: str) -> str:
    name = _shown(database_file(db))
    return (
        f"the redaction key in {source} does not match the one {name} was made with "
        f"(key id {stored_id}); {fix}, or sync into a new --db"
    )


def key_for_sync(db: Database, *, env_key: str | None = None) -> bytes:
    """The key a sync into ``db`` redacts under; makes one for a new database.

    ``env_key`` (COMFYSYNC_REDACTION_KEY's hex) wins over the key file. A database that
    names a key (its id) gets that key or a DatabaseError, before the sync writes
    anything: never a new key, which would make every stored header look changed. A
    database with no runners and no key id gets the key file's key, or a new random key
    written to a new 0600 key file, and its id stored.
    """
    stored = _stored_id(db)
    path = key_path_for(database_file(db))
    key: bytes | None
    if env_key is not None:
        key, source = check_env_key(env_key), KEY_ENV
        fix = f"unset {KEY_ENV} or set it to that key"
    else:
        key, source = read_key_file(path), _shown(path)
        fix = f"restore {source} from your backup"
    if stored is not None:
        if key is None:
            raise DatabaseError(
                f"{_shown(database_file(db))} was made with a redaction key (key id {stored}) "
                f"but {source} is missing; restore it from your backup, or set {KEY_ENV} to "
                "that key (a new key would make every header look changed)"
            )
        if key_id(key) != stored:
            raise DatabaseError(_mismatch(db, source, stored, fix))
        return key
    [(has_runners,)] = db.execute("SELECT EXISTS (SELECT 1 FROM runners)")
    if has_runners:
        raise DatabaseError(
            f"{_shown(database_file(db))} holds runners but names no redaction key; it was "
            "not made by this comfysync: pass another --db"
        )
    if key is None:
        key = secrets.token_bytes(KEY_BYTES)
        create_key_file(path, key)

    db.table(META_TABLE).upsert({"key": KEY_ID_META, "value": key_id(key)}, pk="key")
    return key


def key_for_reading(db: Database) -> bytes | None:
    """The key a read command may redact clear-stored values under, or None; never raises.

    COMFYSYNC_REDACTION_KEY or the key file, whichever holds the key the database names;
    the key itself for a database not yet migrated. A reader may not be the key's owner:
    then it has no key, and shows such values without a digest.
    """
    try:
        return _key_for_reading(db)
    except (ValueError, OSError, DatabaseError, sqlite3.Error):
        return None


def _key_for_reading(db: Database) -> bytes | None:
    legacy = read_meta(db, LEGACY_KEY_META)
    if legacy is not None:
        return parse_key(legacy)
    stored = _stored_id(db)
    if stored is None:
        return None
    candidates: list[bytes | None] = []
    if env := os.environ.get(KEY_ENV):
        with contextlib.suppress(ValueError):
            candidates.append(parse_key(env))
    with contextlib.suppress(DatabaseError):
        candidates.append(read_key_file(key_path_for(database_file(db))))
    return next((key for key in candidates if key is not None and key_id(key) == stored), None)
