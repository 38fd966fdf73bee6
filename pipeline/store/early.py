"""New runners written into the sync's transaction while the walk goes on.

Why: on a first sync SQLite's work (rows, versions, search index) takes about as long as the
walk, and SQLite does it with the GIL released; written from a second thread as pages
arrive, it overlaps the walk, which is bound by the main thread's parsing.

The thread and the connection's handover live here and nowhere else. The sync only calls
``add`` as pages arrive, ``finish`` once after the walk, and ``abandon`` on failure; a read
it needs mid-walk (``load_created_at``) waits for the writer itself. Atomicity is unchanged:
the first runner added begins the transaction, ``pipeline.store.write.apply_changes``
commits it with everything else, ``abandon`` rolls it back.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import KeysView, Sequence

from pipeline.errors import StorageError
from pipeline.source.records import RunnerRecord
from pipeline.store.sqlite import Database
from pipeline.store.write import insert_created, load_stored_fields

#: Pages of new runners that may wait for the writer.
QUEUED_BATCHES = 64


class EarlyCreations:
    """Writes runners the store has never held, from a second thread, into one transaction.

    The one question left for the end is whether the final picture keeps them as written;
    ``apply_changes`` replaces those it does not. The writer takes everything queued at once
    when it lags, so it needs the GIL once per batch, not once per row.
    """

    def __init__(self, db: Database, *, sync_id: int, applied_at: str) -> None:
        self._db = db
        self._sync_id = sync_id
        self._applied_at = applied_at
        # Bounded, so that a walk faster than SQLite waits for it rather than holding the
        # records it is ahead by.
        self._queue: queue.Queue[list[RunnerRecord] | None] = queue.Queue(QUEUED_BATCHES)
        self._thread: threading.Thread | None = None
        self._failure: sqlite3.Error | None = None
        #: id -> raw fingerprint of each runner written (the rows hold the rest), so that a
        #: sighting sent the same way again need not be parsed
        self.written: dict[str, str] = {}

    def add(self, records: Sequence[RunnerRecord]) -> None:
        """Queue new runners for writing (the caller guarantees the store never held them).

        A runner already written (seen again, as the list shifted) is not written twice.
        """
        written = self.written
        records = list({r.id: r for r in records if r.id not in written}.values())
        if not records:
            return
        self._raise_failure()
        if self._thread is None:
            try:
                self._db.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StorageError(f"could not write the database ({exc})") from exc
            self._thread = threading.Thread(
                target=self._write_until_done, name="comfysync-early-writes", daemon=True
            )
            self._thread.start()
        written.update((record.id, record.fingerprint) for record in records)
        self._queue.put(records)

    def finish(self) -> KeysView[str]:
        """Wait for every queued runner to be written and hand the connection back to the
        caller's thread; return the ids written. StorageError if one could not be."""
        self._join_writer()
        self._raise_failure()
        return self.written.keys()

    def abandon(self) -> None:
        """Stop writing and roll back everything written (the sync failed or was stopped)."""
        self._join_writer()
        if self._db.conn.in_transaction:
            self._db.conn.rollback()
        self.written = {}

    def load_created_at(self, ids: Sequence[str]) -> dict[str, str]:
        """The stored ``created_at`` of the given runners, read once the writer is done (the
        walk asks after its last page, when the connection may still be the writer's)."""
        self.finish()
        fields = load_stored_fields(self._db, ids)
        return {runner_id: fields[runner_id]["created_at"] for runner_id in ids}

    def _join_writer(self) -> None:
        """Let the writer drain its queue and end: the connection is this thread's again."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise StorageError(
                f"could not write the database ({self._failure}); nothing was applied"
            ) from self._failure

    def _write_until_done(self) -> None:
        while True:
            batch = self._queue.get()
            done = batch is None
            records = batch or []
            while not done:  # everything queued meanwhile goes in the same statements
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                done = more is None
                records.extend(more or [])
            if records and self._failure is None:
                try:
                    insert_created(self._db.conn, records, self._sync_id, self._applied_at)
                except sqlite3.Error as exc:
                    self._failure = exc
            if done:
                return
