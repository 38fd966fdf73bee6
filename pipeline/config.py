"""``comfysync.toml``: every account described once, so one command can act on all of them.

The file holds a ``[defaults]`` table and one ``[accounts.NAME]`` table per account. Its keys
are the sync options' names (``per_page`` for ``--per-page``, ``db`` for ``--db``); which keys
exist, what each takes and how it is checked comes from the caller as a table of ``Key``
(the command line builds it from its own sync options), so an option added there is a key
here with no new code. This module adds what only a file has: the table grammar, the token
given by reference (``token_env``, ``token_file``) or in the file (only if the file is private),
a schedule per account, and one database per account.

Precedence, highest first: command line, environment, ``[accounts.NAME]``, ``[defaults]``,
built-in defaults. The first two are the command line's to apply (it knows where each value
came from); ``Account.options`` holds only what the file gave. Relative paths in the file are
read from the file's folder, so the file means the same from any working directory.

Every problem is a ConfigurationError (exit 2) naming the file, the table and key, and what
is expected. A token's value never appears in a message or a ``repr``.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigurationError
from pipeline.settings import DEFAULT_EXPORT_DIR
from pipeline.times import duration_seconds

CONFIG_ENV = "COMFYSYNC_CONFIG"
DEFAULT_CONFIG_PATH = Path("comfysync.toml")
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
ACCOUNT_NAME_FORMS = "1-64 letters, digits, '-' or '_'"
#: The three ways to give an account's token; at most one per account.
TOKEN_KEYS = ("token_env", "token_file", "token")
#: What a ``schedule`` table may say; exactly one of them.
SCHEDULE_KEYS = ("every", "cron")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Key:
    """One setting the file may give: the option parameter it sets, and its check.

    ``convert`` turns the TOML value into the option's value, or raises ValueError whose
    text says what is expected; ``is_path`` values are read from the file's folder.
    """

    field: str
    convert: Callable[[Any], Any]
    is_path: bool = False


@dataclass(frozen=True)
class Account:
    """One ``[accounts.NAME]`` table, resolved over ``[defaults]``.

    ``options`` maps option parameter names to what the file gave (``db_path`` and
    ``export_dir`` always: ``data/NAME.db`` and ``data/exports`` beside the file by
    default). ``token_source`` says where the token is looked for, for ``config check``;
    ``token`` is None when it was not found there.
    """

    name: str
    options: Mapping[str, Any]
    token_source: str
    token: str | None = field(default=None, repr=False)
    schedule: Mapping[str, str] = field(default_factory=dict)

    @property
    def db_path(self) -> Path:
        path: Path = self.options["db_path"]
        return path


@dataclass(frozen=True)
class Config:
    """A checked configuration file and its accounts, in the file's order."""

    path: Path
    accounts: tuple[Account, ...]

    def select(self, names: Iterable[str]) -> tuple[Account, ...]:
        """The accounts called ``names`` (every one if none), in the file's order; a name the
        file does not have is a ConfigurationError listing those it has."""
        wanted = list(dict.fromkeys(names))
        known = {account.name: account for account in self.accounts}
        for name in wanted:
            if name not in known:
                raise ConfigurationError(
                    f"{self.path} has no account {name!r}; its accounts: {', '.join(known)}"
                )
        if not wanted:
            return self.accounts
        return tuple(account for account in self.accounts if account.name in wanted)


def find_config(explicit: Path | None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The configuration file to use: ``--config``, else $COMFYSYNC_CONFIG, else
    ``./comfysync.toml`` if there is one, else None (comfysync works as with no file).

    A file named by the option or the variable must exist: a typo there must not silently
    fall back to single-account use.
    """
    for path, named_by in ((explicit, "--config"), (environ.get(CONFIG_ENV), CONFIG_ENV)):
        if path:
            if not Path(path).is_file():
                raise ConfigurationError(f"{named_by} {path}: no such configuration file")
            return Path(path)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_config(
    path: Path, keys: Mapping[str, Key], environ: Mapping[str, str] = os.environ
) -> Config:
    """Read and check the file at ``path`` against ``keys``; ConfigurationError if anything
    in it is wrong, naming the file, the key and what is expected."""
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path} ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:  # its text names a place, never a value
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from exc
    _refuse_unknown(path, "", document, ("defaults", "accounts"))
    defaults = _table(path, "defaults", document.get("defaults", {}))
    accounts = _table(path, "accounts", document.get("accounts", {}))
    if not accounts:
        raise ConfigurationError(f"{path} has no [accounts.NAME] table; add one per account")
    folder = path.parent
    allowed = (*keys, *TOKEN_KEYS, "schedule")
    _refuse_unknown(path, "[defaults]", defaults, allowed)
    resolved = []
    for name, table in accounts.items():
        if not ACCOUNT_NAME.fullmatch(name):
            raise ConfigurationError(
                f"{path}: [accounts.{name!r}]: an account name is {ACCOUNT_NAME_FORMS}"
            )
        table = _table(path, f"accounts.{name}", table)
        where = f"[accounts.{name}]"
        merged = {**defaults, **table}
        if any(k in table for k in TOKEN_KEYS):  # an account's own token replaces the default
            merged = {k: v for k, v in merged.items() if k not in TOKEN_KEYS or k in table}
        _refuse_unknown(path, where, table, allowed)
        # The built-in folders, read from the file's folder like every path in it.
        options = {
            "db_path": folder / "data" / f"{name}.db",
            "export_dir": folder / DEFAULT_EXPORT_DIR,
        }
        for key, value in merged.items():
            if key in keys:
                options[keys[key].field] = _converted(path, where, key, keys[key], value, folder)
        source, token = _token(path, where, merged, folder, environ)
        schedule = _schedule(path, where, merged.get("schedule"))
        resolved.append(Account(name, options, source, token, schedule))
    _refuse_shared_databases(path, resolved)
    return Config(path, tuple(resolved))


def _table(path: Path, where: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigurationError(f"{path}: {where}: expected a table, not {_kind(value)}")
    return value


def _refuse_unknown(
    path: Path, where: str, table: Mapping[str, Any], allowed: Iterable[str]
) -> None:
    allowed = sorted(allowed)
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            place = f"{where} " if where else ""
            raise ConfigurationError(
                f"{path}: {place}unknown key {key!r}; {hint}expected one of {', '.join(allowed)}"
            )


def _converted(path: Path, where: str, name: str, key: Key, value: object, folder: Path) -> Any:
    try:
        converted = key.convert(value)
    except ValueError as exc:
        wrong = f", not {_kind(value)}" if str(exc).startswith("expected") else ""
        raise ConfigurationError(f"{path}: {where} {name}: {exc}{wrong}") from None
    if key.is_path and isinstance(converted, Path):
        converted = folder / converted.expanduser()
    return converted


def _kind(value: object) -> str:
    """The TOML kind of ``value``, for messages: never the value, which may be a secret."""
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    kinds.update({list: "an array", dict: "a table"})
    return next((text for kind, text in kinds.items() if isinstance(value, kind)), "a date")


def _token(
    path: Path, where: str, table: Mapping[str, Any], folder: Path, environ: Mapping[str, str]
) -> tuple[str, str | None]:
    """Where the account's token comes from, and the token (None: not found there)."""
    given = [key for key in TOKEN_KEYS if key in table]
    if len(given) > 1:
        raise ConfigurationError(
            f"{path}: {where} {given[1]}: give the token one way only, not both "
            f"{given[0]} and {given[1]}"
        )
    if not given:
        return "none", None
    key = given[0]
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{path}: {where} {key}: expected a non-empty string")
    if key == "token_env":
        if not _ENV_NAME.fullmatch(value):
            raise ConfigurationError(
                f"{path}: {where} token_env: expected an environment variable name"
            )
        return f"environment variable {value}", environ.get(value) or None
    if key == "token_file":
        token_path = folder / Path(value).expanduser()
        if not token_path.is_file():
            return f"file {token_path}", None
        _refuse_shared_secret(token_path, f"{path}: {where} token_file: {token_path}")
        return f"file {token_path}", token_path.read_text(encoding="utf-8").strip() or None
    _refuse_shared_secret(path, f"{path}: {where} token")
    return f"the file {path}", value


def _refuse_shared_secret(path: Path, named: str) -> None:
    """ConfigurationError if anyone but the owner may read ``path``, which holds a token."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigurationError(
            f"{named}: the file holding the token is readable by others (mode {mode:04o}); "
            f"run chmod 600 {path}, or give the token with token_env"
        )


def _schedule(path: Path, where: str, value: object) -> dict[str, str]:
    if value is None:
        return {}
    table = _table(path, f"{where} schedule", value)
    _refuse_unknown(path, f"{where} schedule", table, SCHEDULE_KEYS)
    if len(table) != 1:
        raise ConfigurationError(f"{path}: {where} schedule: expected exactly one of every, cron")
    ((key, text),) = table.items()
    if not isinstance(text, str):
        raise ConfigurationError(f"{path}: {where} schedule.{key}: expected a string")
    if key == "every":
        try:
            positive = duration_seconds(text) > 0
        except ValueError:
            positive = False
        if not positive:
            raise ConfigurationError(
                f"{path}: {where} schedule.every: expected an interval such as 30s, 15m, 2h, 1d"
            )
    return {key: text}


def _refuse_shared_databases(path: Path, accounts: list[Account]) -> None:
    owners: dict[Path, str] = {}
    for account in accounts:
        database = account.db_path.resolve()
        if database in owners:
            raise ConfigurationError(
                f"{path}: [accounts.{account.name}] db: {account.db_path} is also account "
                f"{owners[database]}'s database; expected a db of its own for each account"
            )
        owners[database] = account.name
