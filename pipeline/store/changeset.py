"""The values the write path takes: what the store knows of a runner, and what a sync writes.

They belong to the store, whose one write path (``pipeline.store.write.apply_changes``)
applies a ``Decision`` in one transaction; the sync's plan (``pipeline.sync.plan``) decides
one from what the walk saw. Plain values: no SQL here.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import NamedTuple

from pipeline.source.records import Rejection, RunnerRecord


class StoredState(NamedTuple):
    """What the store knows of a runner without loading its fields.

    A NamedTuple so that loading one costs a single C call, however large the fleet.
    """

    content_hash: str
    deleted: bool
    version: int
    #: The raw fingerprint of the version stored (None before one was recorded).
    fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class Revision:
    """A new version of a runner already in the store: an update or a restoration."""

    record: RunnerRecord
    changed_fields: tuple[str, ...]


@dataclass(frozen=True)
class ChangeSet:
    """Everything one sync writes; applied all at once or not at all."""

    created: list[RunnerRecord] = field(default_factory=list)
    #: New runners whose rows were already written during the walk, exactly as the walk saw
    #: them (``pipeline.store.early``): ids only, the rows hold the rest.
    created_early: Collection[str] = ()
    updated: list[Revision] = field(default_factory=list)
    restored: list[Revision] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0
    #: Runners a complete walk would have deleted, had deletions been allowed.
    deletions_withheld: int = 0
    #: (id, fingerprint) of unchanged runners whose stored raw fingerprint is out of date
    #: (a database from before fingerprints, or bytes that changed with no content change).
    refingerprinted: list[tuple[str, str]] = field(default_factory=list)

    @property
    def created_count(self) -> int:
        return len(self.created) + len(self.created_early)

    def without_deletions(self) -> ChangeSet:
        """The same changes with every deletion withheld (counted in ``deletions_withheld``)."""
        return ChangeSet(
            created=self.created,
            created_early=self.created_early,
            updated=self.updated,
            restored=self.restored,
            deleted=[],
            unchanged=self.unchanged,
            deletions_withheld=self.deletions_withheld + len(self.deleted),
            refingerprinted=self.refingerprinted,
        )


@dataclass(frozen=True)
class RunOutcome:
    """The run-log figures written together with the changes they describe."""

    status: str
    pages: int
    walks: int
    complete: bool
    total_reported: int
    runners_seen: int
    rejected: int
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    """What one sync writes, all of it or nothing: its changes, its run-log row (warnings
    included), the records it could not store, the owners (``user_id``) it saw, and the
    digests of the pages the store will hold exactly as they were sent."""

    changes: ChangeSet
    outcome: RunOutcome
    rejections: tuple[Rejection, ...] = ()
    owners: frozenset[str] = frozenset()
    page_digests: tuple[str, ...] = ()
