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

The export folder may also be an object store (``s3://bucket/prefix``, an ``ObjectPath``
from ``pipeline/outputs/objects.py``): the same tree of keys, each written once, complete,
by one upload of a file made locally; no temporary objects, so nothing to sweep.

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, TypeVar

from pipeline.outputs import objects
from pipeline.outputs.objects import ObjectPath
from pipeline.settings import EXPORT_FORMATS
from pipeline.times import utc_timestamp

if TYPE_CHECKING:
    from pipeline.read.history import SnapshotRecord

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Where snapshot files go: a local folder, or a folder (key prefix) in an object store.
Location = Path | ObjectPath

_PARTITION = re.compile(r"snapshot_date=\d{4}-\d{2}-\d{2}")
_SNAPSHOT = re.compile(r"runners-(\d+)\.(parquet|csv)")
_TEMPORARY = re.compile(r"\.runners-\d+\.(parquet|csv)\.[0-9a-f]{8}\.tmp")
#: A temporary file this old was left by a crash, not by a writer still at work.
STALE_TEMPORARY_SECONDS = 3600


@dataclass(frozen=True)
class SnapshotFile:
    """One snapshot file a sync wrote, or failed to write (then ``error`` says why), or kept.

    A sync whose fleet is the latest snapshot's keeps that file instead of writing the same
    fleet again: ``same_as_sync_id`` is then the sync that wrote it, and ``path``, ``rows``
    and ``bytes`` are that file's.
    """

    sync_id: int
    format: str
    path: str
    rows: int | None
    bytes: int | None
    written_at: str
    error: str | None = None
    same_as_sync_id: int | None = None


@dataclass(frozen=True)
class SnapshotReport:
    """The files of one sync's snapshot, and the old files pruned after it."""

    files: tuple[SnapshotFile, ...]
    pruned: tuple[str, ...] = ()


def as_location(text: str, endpoint_url: str | None = None) -> Location:
    """The Location ``text`` names: an ObjectPath for a URL (``s3://...``), else a Path."""
    return ObjectPath.parse(text, endpoint_url) if objects.is_url(text) else Path(text)


def runners_folder(export_dir: Location, fmt: str, account: str | None = None) -> Location:
    """The folder holding the ``snapshot_date=`` partitions of ``fmt`` (of one ``account``)."""
    root = export_dir / fmt / "runners"
    return root if account is None else root / f"account={account}"


def snapshot_path(
    export_dir: Location, fmt: str, *, sync_id: int, snapshot_at: str, account: str | None = None
) -> Location:
    """Where sync ``sync_id``'s ``fmt`` file goes; ``snapshot_at`` is store time text (UTC)."""
    partition = f"snapshot_date={snapshot_at[:10]}"
    return runners_folder(export_dir, fmt, account) / partition / f"runners-{sync_id}.{fmt}"


def account_of(path: Location) -> str | None:
    """The account whose partition a ``snapshot_path`` lies in; None in the single layout."""
    folder = path.parent.parent.name
    return folder.removeprefix("account=") if folder.startswith("account=") else None


def _depth(path: Location) -> int:
    """How many folders a ``snapshot_path`` lies below its export folder."""
    return 4 if account_of(path) is None else 5


def export_dir_of(path: Location) -> Location:
    """The export folder a ``snapshot_path`` lies in: its layout read backwards."""
    return path.parents[_depth(path) - 1]


def place_in_tree(path: Location) -> tuple[str, ...]:
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
    temporary = _temporary_beside(path)
    try:
        result = write(temporary)
        _land(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise
    return result


def _temporary_beside(path: Path) -> Path:
    """A new, empty, hidden temporary file in ``path``'s folder (made if need be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():  # found now, before the work, rather than by the final rename
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # Created here (exclusively, with the umask's permissions) so that a folder we cannot
    # write to fails with the operating system's own error, before any work is done.
    temporary.touch(exist_ok=False)
    return temporary


def _land(temporary: Path, path: Path) -> None:
    """Put the complete ``temporary`` file in place as ``path``, durably."""
    _fsync(temporary)
    os.replace(temporary, path)
    with contextlib.suppress(OSError):  # some platforms cannot open or fsync a folder
        _fsync(path.parent)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


#: Writes every format's file at once, ``{format: temporary path} -> {format: rows written,
#: or the exception that stopped that file}``: one read of the fleet serves all formats.
FilesWrite = Callable[[Mapping[str, Path]], Mapping[str, "int | Exception"]]


def write_snapshot_files(
    export_dir: Location,
    formats: Iterable[str],
    *,
    sync_id: int,
    snapshot_at: str,
    write: FilesWrite,
    account: str | None = None,
) -> tuple[SnapshotFile, ...]:
    """Write one file per format, all through one call of ``write``, each atomically.

    A format that fails is reported in its SnapshotFile (``error``) and does not stop the
    others: a snapshot is a by-product of a sync and must never fail it. In an object store,
    the files are made in a local temporary folder and then each uploaded whole.
    """
    paths = {
        fmt: snapshot_path(
            export_dir, fmt, sync_id=sync_id, snapshot_at=snapshot_at, account=account
        )
        for fmt in dict.fromkeys(formats)
    }
    if isinstance(export_dir, ObjectPath):
        return _upload_all(paths, sync_id=sync_id, write=write) if paths else ()
    return _write_all(paths, sync_id=sync_id, write=write) if paths else ()


def _write_all(
    paths: Mapping[str, Location], *, sync_id: int, write: FilesWrite
) -> tuple[SnapshotFile, ...]:
    temporaries: dict[str, Path] = {}
    outcome: dict[str, int | Exception] = {}
    try:
        for fmt, path in paths.items():
            assert isinstance(path, Path)
            try:
                temporaries[fmt] = _temporary_beside(path)
            except Exception as exc:
                outcome[fmt] = exc
        if temporaries:
            outcome.update(write(temporaries))
        files = []
        for fmt, path in paths.items():
            assert isinstance(path, Path)
            result = outcome[fmt]
            if not isinstance(result, Exception):
                try:
                    _land(temporaries[fmt], path)
                    files.append(
                        SnapshotFile(
                            sync_id, fmt, str(path), result, path.stat().st_size, utc_timestamp()
                        )
                    )
                    continue
                except Exception as exc:
                    result = exc
            log.debug("snapshot %s failed", path, exc_info=result)
            error = _describe(result, path)
            files.append(SnapshotFile(sync_id, fmt, str(path), None, None, utc_timestamp(), error))
        return tuple(files)
    finally:
        for temporary in temporaries.values():  # gone already once renamed into place
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)


def _upload_all(
    paths: Mapping[str, Location], *, sync_id: int, write: FilesWrite
) -> tuple[SnapshotFile, ...]:
    files = []
    with TemporaryDirectory(prefix="comfysync-") as folder:
        local = {fmt: Path(folder) / path.name for fmt, path in paths.items()}
        outcome = write(local)
        for fmt, path in paths.items():
            result = outcome[fmt]
            if isinstance(result, Exception):
                log.debug("snapshot %s failed", path, exc_info=result)
                error = _describe(result, local[fmt])
                files.append(
                    SnapshotFile(sync_id, fmt, str(path), None, None, utc_timestamp(), error)
                )
                continue
            try:
                assert isinstance(path, ObjectPath)
                size = objects.put_file(local[fmt], path)
            except Exception as exc:
                log.debug("upload of %s failed", path, exc_info=True)
                error = f"could not upload {path}: {objects.describe_failure(exc)}"
                files.append(
                    SnapshotFile(sync_id, fmt, str(path), None, None, utc_timestamp(), error)
                )
                continue
            files.append(SnapshotFile(sync_id, fmt, str(path), result, size, utc_timestamp()))
    return tuple(files)


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
    export_dir: Location, fmt: str, account: str | None = None
) -> list[tuple[int, Location]]:
    """The ``fmt`` snapshot files in the tree as (sync_id, path), newest first.

    Newest by snapshot date, then by sync id: sync ids alone would mislead when the files of
    another database, or of this one before it was restored from a backup, share the tree.
    """
    root = runners_folder(export_dir, fmt, account)
    found: list[tuple[int, Location]] = []
    if isinstance(root, ObjectPath):
        for key in objects.list_files(root):
            match = _SNAPSHOT.fullmatch(key.name)
            if (
                match
                and match.group(2) == fmt
                and key.parent.parent == root
                and _PARTITION.fullmatch(key.parent.name)
            ):
                found.append((int(match.group(1)), key))
        return sorted(found, key=lambda item: (item[1].parent.name, item[0]), reverse=True)
    for partition in _listing(root):
        if not _PARTITION.fullmatch(partition.name) or not partition.is_dir():
            continue
        for path in _listing(partition):
            match = _SNAPSHOT.fullmatch(path.name)
            if match and match.group(2) == fmt and path.is_file():
                found.append((int(match.group(1)), path))
    return sorted(found, key=lambda item: (item[1].parent.name, item[0]), reverse=True)


def file_size(path: Location) -> int | None:
    """The size of the file at ``path`` in bytes; None if it is not there (or unreadable)."""
    if isinstance(path, ObjectPath):
        try:
            return objects.size(path)
        except Exception:  # gone, or the store unreachable: nothing to compare
            log.debug("could not read the size of %s", path, exc_info=True)
            return None
    try:
        return path.stat().st_size
    except OSError:
        return None


def kept_files(
    export_dir: Location,
    latest: Mapping[str, SnapshotRecord],
    formats: Iterable[str],
    *,
    sync_id: int,
    snapshot_at: str,
    csv_safe: bool,
    account: str | None = None,
) -> dict[str, SnapshotFile]:
    """The formats whose latest file (``latest``: ``history.holding_fleet``, the
    files that hold this sync's fleet) sync ``sync_id`` keeps as its own snapshot.

    A file is kept when it is still in place under ``export_dir`` with the size its sync
    recorded, lies in this sync's ``snapshot_date`` folder (so that every day's folder holds
    the fleet) and, for CSV, was written with the same ``csv_safe``. Deciding it reads no
    file's content, so a sync that keeps every format never loads pyarrow.
    """
    kept = {}
    for fmt in formats:
        record = latest.get(fmt)
        path = _keepable(export_dir, record, snapshot_at, csv_safe, account)
        if record is not None and path is not None:
            kept[fmt] = SnapshotFile(
                sync_id,
                fmt,
                str(path),
                record.rows,
                record.bytes,
                utc_timestamp(),
                same_as_sync_id=record.file_sync_id,
            )
    return kept


def _keepable(
    export_dir: Location,
    record: SnapshotRecord | None,
    snapshot_at: str,
    csv_safe: bool,
    account: str | None,
) -> Location | None:
    """Where ``record``'s file is now, if this sync may keep it as its own snapshot."""
    path = _in_place(export_dir, record, csv_safe, account)
    if record is None or path is None:
        return None
    own = snapshot_path(
        export_dir, record.format, sync_id=0, snapshot_at=snapshot_at, account=account
    )
    return path if path.parent == own.parent else None  # another day's folder gets it too


def _in_place(
    export_dir: Location, record: SnapshotRecord | None, csv_safe: bool, account: str | None
) -> Location | None:
    """Where ``record``'s file is now, if it is still there as its sync recorded it (and, for
    CSV, was written with this ``csv_safe``)."""
    if record is None or (record.format == "csv" and record.csv_safe is not csv_safe):
        return None
    # Where the layout puts it under the export folder of this sync, wherever the database
    # recorded it (a copied database and its folder may have moved since).
    path = snapshot_path(
        export_dir,
        record.format,
        sync_id=record.file_sync_id,
        snapshot_at=record.snapshot_at,
        account=account,
    )
    return path if file_size(path) == record.bytes else None


def patch_bases(
    export_dir: Location,
    latest: Mapping[str, SnapshotRecord],
    formats: Iterable[str],
    *,
    csv_safe: bool,
    account: str | None = None,
) -> dict[str, tuple[Path, SnapshotRecord]]:
    """format -> the latest file (``latest``: ``history.latest_snapshots``) in a local
    folder, still in place, from which this sync's file may be patched rather than
    written from the store: its path under ``export_dir``, and its record."""
    bases = {}
    for fmt in formats:
        record = latest.get(fmt)
        path = _in_place(export_dir, record, csv_safe, account)
        if record is not None and isinstance(path, Path):
            bases[fmt] = (path, record)
    return bases


def finish_snapshot(
    export_dir: Location, files: Iterable[SnapshotFile], *, keep: int | None, account: str | None
) -> SnapshotReport:
    """A sync's snapshot report, after pruning to ``keep`` (if given) around its files, and
    sweeping away the temporary files a crash left."""
    files = tuple(files)
    if not isinstance(export_dir, ObjectPath):
        _remove_stale_temporaries(export_dir, account)
    spare = [as_location(f.path) for f in files if f.error is None]
    pruned = (
        prune_snapshots(export_dir, keep, spare=spare, account=account) if keep is not None else ()
    )
    return SnapshotReport(files, pruned)


def prune_snapshots(
    export_dir: Location, keep: int, *, spare: Iterable[Location] = (), account: str | None = None
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
    doomed = [
        path
        for fmt in EXPORT_FORMATS
        for _, path in snapshot_files(export_dir, fmt, account)[keep:]
        if path not in spared
    ]
    objects_doomed = [path for path in doomed if isinstance(path, ObjectPath)]
    if objects_doomed:  # no folders to empty in an object store
        try:
            objects.delete_files(objects_doomed)
        except Exception as exc:
            log.warning("could not prune old snapshots: %s", objects.describe_failure(exc))
            return ()
        return tuple(str(path) for path in objects_doomed)
    pruned = []
    for path in doomed:
        if not isinstance(path, Path):
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
        root = runners_folder(export_dir, fmt, account)
        if not isinstance(root, Path):
            continue
        for partition in _listing(root):
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
