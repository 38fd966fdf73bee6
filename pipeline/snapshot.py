"""The snapshot folder tree: where each sync's files go, how they land, and how old ones go.

Layout (Hive-style, one tree per format, so every reader discovers ``snapshot_date``)::

    <export-dir>/<format>/runners/snapshot_date=YYYY-MM-DD/runners-<sync_id>.<format>

The date is the UTC day the sync finished. Files land atomically (``write_atomically``):
under a final name there is only ever a complete file. Temporary files are hidden
(``.runners-<id>.<format>.<random>.tmp``), so readers skip them even after a crash, and a
later snapshot sweeps away any that a crash left behind. Pruning only ever deletes files
that match the layout exactly.

This module knows files and folders only; what goes into a file is ``pipeline/export.py``'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pipeline.settings import EXPORT_FORMATS
from pipeline.store import utc_timestamp

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


def snapshot_path(export_dir: Path, fmt: str, *, sync_id: int, snapshot_at: str) -> Path:
    """Where sync ``sync_id``'s ``fmt`` file goes; ``snapshot_at`` is store time text (UTC)."""
    partition = f"snapshot_date={snapshot_at[:10]}"
    return export_dir / fmt / "runners" / partition / f"runners-{sync_id}.{fmt}"


def write_atomically(path: Path, write: Callable[[Path], T]) -> T:
    """Create ``path`` through ``write(temporary path)``, so it is never seen half-written.

    The temporary file sits in the same folder (so the rename cannot cross file systems)
    and is hidden (a leading ``.`` and a ``.tmp`` suffix: pandas, pyarrow and DuckDB's
    ``*.parquet`` globs skip it). It is fsynced, renamed over ``path``, and the folder is
    fsynced so the rename survives a power cut. If anything fails, the temporary file is
    removed and the exception propagates; ``path`` keeps whatever it held before.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
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
) -> tuple[SnapshotFile, ...]:
    """Write one file per format with ``write(temporary path, format) -> rows``, atomically.

    A format that fails is reported in its SnapshotFile (``error``) and does not stop the
    others: a snapshot is a by-product of a sync and must never fail it.
    """
    files = tuple(
        _write_one(export_dir, fmt, sync_id=sync_id, snapshot_at=snapshot_at, write=write)
        for fmt in dict.fromkeys(formats)
    )
    _remove_stale_temporaries(export_dir)
    return files


def _write_one(
    export_dir: Path, fmt: str, *, sync_id: int, snapshot_at: str, write: Callable[[Path, str], int]
) -> SnapshotFile:
    path = snapshot_path(export_dir, fmt, sync_id=sync_id, snapshot_at=snapshot_at)
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
        reason = exc.strerror or str(exc)
        where = exc.filename or path
        return f"could not write {where}: {reason}"
    # Anything else may quote the data it choked on (header values can be kept in clear).
    return f"could not write {path}: unexpected {type(exc).__name__} (--debug shows it)"


def snapshot_files(export_dir: Path, fmt: str) -> list[tuple[int, Path]]:
    """The ``fmt`` snapshot files in the tree as (sync_id, path), newest sync first."""
    root = export_dir / fmt / "runners"
    found = []
    for partition in _listing(root):
        if not _PARTITION.fullmatch(partition.name) or not partition.is_dir():
            continue
        for path in _listing(partition):
            match = _SNAPSHOT.fullmatch(path.name)
            if match and match.group(2) == fmt and path.is_file():
                found.append((int(match.group(1)), path))
    return sorted(found, key=lambda item: (item[0], item[1].parent.name), reverse=True)


def prune_snapshots(export_dir: Path, keep: int) -> tuple[str, ...]:
    """Delete each format's snapshot files beyond the ``keep`` newest (by sync id).

    Emptied date folders are removed too. A file that cannot be deleted is logged and left;
    pruning never fails the sync it follows.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1")
    pruned = []
    for fmt in EXPORT_FORMATS:
        for _, path in snapshot_files(export_dir, fmt)[keep:]:
            try:
                path.unlink()
            except OSError as exc:
                log.warning("could not prune old snapshot %s: %s", path, exc.strerror or exc)
                continue
            pruned.append(str(path))
            with contextlib.suppress(OSError):  # not empty yet: other files remain
                path.parent.rmdir()
    return tuple(pruned)


def _remove_stale_temporaries(export_dir: Path) -> None:
    deadline = time.time() - STALE_TEMPORARY_SECONDS
    for fmt in EXPORT_FORMATS:
        for partition in _listing(export_dir / fmt / "runners"):
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
