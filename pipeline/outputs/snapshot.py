"""The snapshot folder tree: where each sync's files go, how they land, and how old ones go.

Layout (Hive-style, one tree per format, so every reader discovers ``snapshot_date``)::

    <export-dir>/<format>/runners/snapshot_date=YYYY-MM-DD/runners-<sync_id>.<format>

An account of a configuration file (``pipeline.config``) gets its own partition, so the
snapshots of several accounts form one dataset that readers see with an ``account`` column::

    <export-dir>/<format>/runners/account=<name>/snapshot_date=YYYY-MM-DD/runners-<id>.<format>

The date is the UTC day the sync finished. Files land atomically (``write_atomically``):
under a final name there is only ever a complete file. Temporary files are hidden
(``.runners-<id>.<format>.<random>.tmp``), so readers skip them even after a crash, and a
later snapshot sweeps away any that a crash left behind. Pruning only ever deletes files
that match the layout exactly, and never the files the sync has just written.

A folder can be in a bad state (a file or a dead link where a folder belongs, a folder that
refuses new files, a file that cannot be replaced): ``explain_write_failure`` turns the
operating system's error into one line that names the culprit, for the snapshot's error
and for ``comfysync export``'s.

This module knows files and folders only; what goes into a file is ``pipeline/outputs/export.py``'s.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pipeline.settings import EXPORT_FORMATS
from pipeline.times import utc_timestamp

log = logging.getLogger(__name__)

T = TypeVar("T")

_PARTITION = re.compile(r"snapshot_date=\d{4}-\d{2}-\d{2}")
_SNAPSHOT = re.compile(r"runners-(\d+)\.(parquet|csv)")
_TEMPORARY = re.compile(r"\.runners-\d+\.(parquet|csv)\.[0-9a-f]{8}\.tmp")
#: A temporary file this old was left by a crash, not by a writer still at work.
STALE_TEMPORARY_SECONDS = 3600


@dataclass(frozen=True)
class SnapshotFile:
    """One snapshot file a sync wrote, or failed to write (then ``error`` says why)."""

    sync_id: int
    format: str
    path: str
    rows: int | None
    bytes: int | None
    written_at: str
    error: str | None = None


@dataclass(frozen=True)
class SnapshotReport:
    """The files of one sync's snapshot, and the old files pruned after it."""

    files: tuple[SnapshotFile, ...]
    pruned: tuple[str, ...] = ()


def runners_folder(export_dir: Path, fmt: str, account: str | None = None) -> Path:
    """The folder holding the ``snapshot_date=`` partitions of ``fmt`` (of one ``account``)."""
    root = export_dir / fmt / "runners"
    return root if account is None else root / f"account={account}"


def snapshot_path(
    export_dir: Path, fmt: str, *, sync_id: int, snapshot_at: str, account: str | None = None
) -> Path:
    """Where sync ``sync_id``'s ``fmt`` file goes; ``snapshot_at`` is store time text (UTC)."""
    partition = f"snapshot_date={snapshot_at[:10]}"
    return runners_folder(export_dir, fmt, account) / partition / f"runners-{sync_id}.{fmt}"


def account_of(path: Path) -> str | None:
    """The account whose partition a ``snapshot_path`` lies in; None in the single layout."""
    folder = path.parent.parent.name
    return folder.removeprefix("account=") if folder.startswith("account=") else None


def _depth(path: Path) -> int:
    """How many folders a ``snapshot_path`` lies below its export folder."""
    return 4 if account_of(path) is None else 5


def export_dir_of(path: Path) -> Path:
    """The export folder a ``snapshot_path`` lies in: its layout read backwards."""
    return path.parents[_depth(path) - 1]


def place_in_tree(path: Path) -> tuple[str, ...]:
    """Where a ``snapshot_path`` lies below its export folder, wherever that folder now is."""
    return path.parts[-_depth(path) :]


def write_atomically(path: Path, write: Callable[[Path], T]) -> T:
    """Create ``path`` through ``write(temporary path)``, so it is never seen half-written.

    The temporary file sits in the same folder (so the rename cannot cross file systems)
    and is hidden (a leading ``.`` and a ``.tmp`` suffix: pandas, pyarrow and DuckDB's
    ``*.parquet`` globs skip it). It is fsynced, renamed over ``path``, and the folder is
    fsynced so the rename survives a power cut. If anything fails, the temporary file is
    removed and the exception propagates; ``path`` keeps whatever it held before.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():  # found now, before the work, rather than by the final rename
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # Created here (exclusively, with the umask's permissions) so that a folder we cannot
    # write to fails with the operating system's own error, before any work is done.
    temporary.touch(exist_ok=False)
    try:
        result = write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # some platforms cannot open or fsync a folder
        _fsync(path.parent)
    return result


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_snapshot_files(
    export_dir: Path,
    formats: Iterable[str],
    *,
    sync_id: int,
    snapshot_at: str,
    write: Callable[[Path, str], int],
    account: str | None = None,
) -> tuple[SnapshotFile, ...]:
    """Write one file per format with ``write(temporary path, format) -> rows``, atomically.

    A format that fails is reported in its SnapshotFile (``error``) and does not stop the
    others: a snapshot is a by-product of a sync and must never fail it.
    """
    files = tuple(
        _write_one(
            snapshot_path(
                export_dir, fmt, sync_id=sync_id, snapshot_at=snapshot_at, account=account
            ),
            fmt,
            sync_id=sync_id,
            write=write,
        )
        for fmt in dict.fromkeys(formats)
    )
    _remove_stale_temporaries(export_dir, account)
    return files


def _write_one(
    path: Path, fmt: str, *, sync_id: int, write: Callable[[Path, str], int]
) -> SnapshotFile:
    try:
        rows = write_atomically(path, lambda temporary: write(temporary, fmt))
        size = path.stat().st_size
    except Exception as exc:
        log.debug("snapshot %s failed", path, exc_info=True)
        return SnapshotFile(
            sync_id, fmt, str(path), None, None, utc_timestamp(), _describe(exc, path)
        )
    return SnapshotFile(sync_id, fmt, str(path), rows, size, utc_timestamp())


def _describe(exc: Exception, path: Path) -> str:
    if isinstance(exc, OSError):
        return f"could not write {path}: {explain_write_failure(exc, path)}"
    # Anything else may quote the data it choked on (header values can be kept in clear).
    return f"could not write {path}: unexpected {type(exc).__name__} (--debug shows it)"


_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)


def explain_write_failure(exc: OSError, path: Path) -> str:
    """Why ``path`` could not be written (by ``write_atomically``), in words that name the culprit.

    A file or a dead symbolic link where one of its folders belongs; a folder that refuses
    new files; a file already at ``path`` that cannot be replaced, or a folder there;
    otherwise the operating system's reason (a full disk), with the path it concerns when
    that is not ``path`` or its temporary file.
    """
    reason = exc.strerror or str(exc)
    blocker = not_a_folder(path.parent)
    if blocker is not None:
        return blocker
    if exc.errno == errno.EISDIR:
        return f"{path} is a folder, not a file"
    if exc.errno in _REFUSED:
        if exc.filename2 is not None and Path(exc.filename2) == path:
            return f"{path} cannot be replaced ({reason})"
        refusing = Path(exc.filename).parent if exc.filename else path.parent
        return f"the folder {refusing} does not accept new files ({reason})"
    where = Path(exc.filename) if isinstance(exc.filename, str) else None
    if where is not None and where != path and where.parent != path.parent:
        return f"{where}: {reason}"
    return reason


def not_a_folder(folder: Path) -> str | None:
    """The first of ``folder`` and its ancestors, outermost first, that is there but is not
    a folder (or a link to one), described (``data/exports is a file, not a folder``); None
    if there is none, whether ``folder`` exists or not."""
    for candidate in (*reversed(folder.parents), folder):
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            return None  # nothing further down exists either
        except OSError:
            continue
        if stat.S_ISDIR(mode) or candidate.is_dir():  # a folder, or a link to one
            continue
        if stat.S_ISLNK(mode):
            return f"{candidate} is a symbolic link that leads to no folder"
        return f"{candidate} is a file, not a folder"
    return None


def snapshot_files(
    export_dir: Path, fmt: str, account: str | None = None
) -> list[tuple[int, Path]]:
    """The ``fmt`` snapshot files in the tree as (sync_id, path), newest first.

    Newest by snapshot date, then by sync id: sync ids alone would mislead when the files of
    another database, or of this one before it was restored from a backup, share the tree.
    """
    root = runners_folder(export_dir, fmt, account)
    found = []
    for partition in _listing(root):
        if not _PARTITION.fullmatch(partition.name) or not partition.is_dir():
            continue
        for path in _listing(partition):
            match = _SNAPSHOT.fullmatch(path.name)
            if match and match.group(2) == fmt and path.is_file():
                found.append((int(match.group(1)), path))
    return sorted(found, key=lambda item: (item[1].parent.name, item[0]), reverse=True)


def prune_snapshots(
    export_dir: Path, keep: int, *, spare: Iterable[Path] = (), account: str | None = None
) -> tuple[str, ...]:
    """Delete each format's snapshot files beyond the ``keep`` newest, never one in ``spare``.

    ``spare`` is the snapshot just written: however the tree looks (a stray file with a
    higher sync id, a clock set back), pruning must not delete what the sync has just made.
    Emptied date folders are removed too. A file that cannot be deleted is logged and left;
    pruning never fails the sync it follows.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1")
    spared = set(spare)
    pruned = []
    for fmt in EXPORT_FORMATS:
        for _, path in snapshot_files(export_dir, fmt, account)[keep:]:
            if path in spared:
                continue
            try:
                path.unlink()
            except OSError as exc:
                log.warning("could not prune old snapshot %s: %s", path, exc.strerror or exc)
                continue
            pruned.append(str(path))
            with contextlib.suppress(OSError):  # not empty yet: other files remain
                path.parent.rmdir()
    return tuple(pruned)


def _remove_stale_temporaries(export_dir: Path, account: str | None) -> None:
    deadline = time.time() - STALE_TEMPORARY_SECONDS
    for fmt in EXPORT_FORMATS:
        for partition in _listing(runners_folder(export_dir, fmt, account)):
            for path in _listing(partition):
                if _TEMPORARY.fullmatch(path.name):
                    with contextlib.suppress(OSError):
                        if path.stat().st_mtime < deadline:
                            path.unlink()


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:  # absent, or not a folder
        return []
