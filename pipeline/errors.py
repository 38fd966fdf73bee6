"""The errors comfysync raises, and the exit code each one means.

Library code raises these; only ``pipeline/cli.py`` turns them into exits. Each class's
docstring is its default message, and each carries its exit code, so the mapping lives in
exactly one place::

    ComfySyncError                 1  (never raised directly)
    ├── ConfigurationError         2  bad option, missing token, unsafe URL
    │   ├── DatabaseError          2  --db is not a usable comfysync database
    │   ├── ForeignAccountError    2  the token belongs to another account than the store's
    │   ├── ExportError            2  an export file could not be written (nothing left behind)
    │   └── RunnerLookupError      2  no runner, or more than one, matches what was asked
    │       └── RunnerNotFoundError  2  no runner has or had that id, prefix or name
    ├── AuthenticationError        3  the API answered 401/403
    ├── UpstreamError              4  the API failed after retries; nothing was applied
    │   ├── ApiResponseError       4  a page that is not the documented JSON
    │   └── StorageError           4  the local disk failed while applying (nothing applied)
    ├── ScheduleGaveUpError        4  `comfysync schedule`: too many failed runs in a row
    ├── SyncLockedError            5  another sync holds this database; nothing was written
    └── SyncInterruptedError       6  stopped (SIGINT/SIGTERM) before applying; nothing applied

Messages say what happened and what to do next. They never contain a secret: not the
API token, not a header value.
"""

from __future__ import annotations


class ComfySyncError(Exception):
    """comfysync failed."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class ConfigurationError(ComfySyncError):
    """The configuration is not usable; check the options and environment variables."""

    exit_code = 2


class DatabaseError(ConfigurationError):
    """The database is not one comfysync can use."""


class ForeignAccountError(ConfigurationError):
    """These runners belong to another account than the one this database mirrors."""


class ExportError(ConfigurationError):
    """The export could not be written; no file was left under the output path."""


class RunnerLookupError(ConfigurationError):
    """No runner, or more than one, matches; pass a full runner id."""


class RunnerNotFoundError(RunnerLookupError):
    """No runner has or had this id, id prefix or name."""


class AuthenticationError(ComfySyncError):
    """ComfyControl rejected the token; check COMFYCONTROL_TOKEN (or --token)."""

    exit_code = 3


class UpstreamError(ComfySyncError):
    """ComfyControl kept failing after retries; nothing was applied. Try again later."""

    exit_code = 4


class ApiResponseError(UpstreamError):
    """ComfyControl sent a response that is not the documented JSON; nothing was applied."""


class StorageError(UpstreamError):
    """Writing the database failed (disk full or I/O error); nothing was applied."""


class ScheduleGaveUpError(ComfySyncError):
    """The schedule stopped after too many failed runs in a row; see the log and sync_runs."""

    exit_code = 4


class SyncLockedError(ComfySyncError):
    """Another sync is running on this database; try again when it has finished."""

    exit_code = 5


class SyncInterruptedError(ComfySyncError):
    """The sync was stopped (SIGINT or SIGTERM) before applying; nothing was applied."""

    exit_code = 6
