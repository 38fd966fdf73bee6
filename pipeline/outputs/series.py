"""Each sync's snapshot: its files written from the store, or patched from the latest ones.

A snapshot holds the fleet a sync left, one row per present runner, sorted by id. Most syncs
change a small part of the fleet, so when a format's latest file is still in place
(``snapshot.patch_bases``: a local folder, the size its sync recorded, for CSV the same
``csv_safe``), the new file is made from it: its rows, less the runners changed since it was
written (every change is a version: ``history.touched_since``), plus those runners as the
store holds them now, merged by id, with this sync's ``sync_id`` and ``snapshot_at``. That is
the file a write from the store makes, byte for byte (the tests compare the two), for far
less work: reading the file back is cheap next to reading every runner out of SQLite.

A format is written from the store instead when its file looks other than recorded (another
schema, another row count, ids out of order), when anything else stops the patch, when it is
in an object store, for a ``csv_safe`` CSV file once an id may carry the formula prefix, or
when more than ``MAX_PATCHED_RUNNERS`` runners changed (they are held in memory while the
file is merged). ``--snapshot always`` never patches: every file is written from the store.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.outputs.export import (
    FLEET_SCHEMA,
    Batch,
    ExportRows,
    FileWriter,
    NotPatchable,
    arrow_batches,
    close_quietly,
    open_export_file,
    patched_rows,
    write_export_files,
)
from pipeline.outputs.snapshot import (
    Location,
    SnapshotFile,
    SnapshotReport,
    finish_snapshot,
    write_snapshot_files,
)
from pipeline.read import history
from pipeline.read.history import SnapshotRecord
from pipeline.settings import EXPORT_FORMATS

log = logging.getLogger(__name__)

#: The most changed runners a snapshot is patched with: they are held in memory meanwhile.
MAX_PATCHED_RUNNERS = 50_000


def export_snapshots(
    export_dir: Location,
    *,
    sync_id: int,
    snapshot_at: str,
    db: Any,
    formats: Iterable[str] = EXPORT_FORMATS,
    csv_safe: bool = False,
    keep: int | None = None,
    write: FileWriter | None = None,
    account: str | None = None,
    kept: Mapping[str, SnapshotFile] | None = None,
    bases: Mapping[str, tuple[Path, SnapshotRecord]] | None = None,
) -> SnapshotReport:
    """Write sync ``sync_id``'s snapshot (the ``runners`` table's present rows, which under
    the sync's lock are the fleet it left) in each format, then prune to ``keep`` if given.

    ``kept`` are the formats whose latest file this sync keeps (``snapshot.kept_files``):
    not written again, reported as they are, and never pruned by this sync. ``bases`` are
    the files the others may be patched from (``snapshot.patch_bases``). The store is read
    once for all the formats written from it. Failures are reported in the returned files,
    never raised: a snapshot must not fail the sync it follows.
    """
    formats = tuple(dict.fromkeys(formats))
    kept = kept or {}
    open_file = write or open_export_file
    rows = ExportRows(
        FLEET_SCHEMA, db, history.fleet_query(), sync_id=sync_id, snapshot_at=snapshot_at
    )

    def write_files(temporaries: Mapping[str, Path]) -> dict[str, int | Exception]:
        outcome = _patch(temporaries, bases or {}, rows, csv_safe, open_file)
        rest = {fmt: path for fmt, path in temporaries.items() if fmt not in outcome}
        return {**outcome, **write_export_files(rest, rows, csv_safe, open_file)}

    written = write_snapshot_files(
        export_dir,
        [fmt for fmt in formats if fmt not in kept],
        sync_id=sync_id,
        snapshot_at=snapshot_at,
        write=write_files,
        account=account,
    )
    files = sorted((*written, *kept.values()), key=lambda f: formats.index(f.format))
    return finish_snapshot(export_dir, files, keep=keep, account=account)


def _patch(
    temporaries: Mapping[str, Path],
    bases: Mapping[str, tuple[Path, SnapshotRecord]],
    rows: ExportRows,
    csv_safe: bool,
    open_file: FileWriter,
) -> dict[str, int]:
    """The formats of ``temporaries`` patched from their ``bases``, with the rows written in
    each; a format absent from the result is to be written from the store."""
    patchable = {fmt: bases[fmt] for fmt in temporaries if fmt in bases}
    if not patchable:
        return {}
    after = min(record.file_sync_id for _, record in patchable.values())
    gone = history.touched_since(rows.db, after, MAX_PATCHED_RUNNERS)
    if gone is None:
        log.debug("not patching the snapshot: over %d runners changed", MAX_PATCHED_RUNNERS)
        return {}
    changes = ExportRows(
        FLEET_SCHEMA,
        rows.db,
        history.fleet_query(touched_after=after),
        sync_id=rows.sync_id,
        snapshot_at=rows.snapshot_at,
    )
    changed = list(arrow_batches(changes))

    def patch(fmt: str) -> int | None:
        path, record = patchable[fmt]
        try:
            merged = patched_rows(fmt, path, record.rows, changed, gone, rows, csv_safe)
            written = _write(temporaries[fmt], fmt, merged, csv_safe, open_file)
        except NotPatchable as exc:
            log.debug("not patching the %s snapshot from %s: %s", fmt, path, exc)
            return None
        except Exception as exc:  # unreadable, or a full disk: the store still has the fleet
            log.debug("could not patch the %s snapshot from %s", fmt, path, exc_info=exc)
            return None
        log.debug(
            "patched the %s snapshot from %s: %d runners changed since sync %d",
            fmt,
            path,
            len(gone),
            after,
        )
        return written

    # One thread per format: the files are read, merged and written with the GIL released.
    with ThreadPoolExecutor(len(patchable), thread_name_prefix="patch") as workers:
        done = dict(zip(patchable, workers.map(patch, patchable), strict=True))
    return {fmt: written for fmt, written in done.items() if written is not None}


def _write(
    path: Path, fmt: str, batches: Iterator[Batch], csv_safe: bool, open_file: FileWriter
) -> int:
    file = open_file(path, fmt, FLEET_SCHEMA, csv_safe)
    try:
        for batch in batches:
            file.write(batch)
    except BaseException:
        close_quietly(file)
        raise
    return file.close()
