"""Decide what a sync changes: a pure comparison of what the walk saw with what the store holds.

No SQL and no HTTP here: ``plan_changes`` takes plain values and returns a ``ChangeSet`` that
``pipeline.store.apply_changes`` writes in one transaction. Keeping the decision pure is what
lets the deletion rule (never delete unless the walk proved itself complete) be tested alone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import NamedTuple

from pipeline.records import TRACKED_FIELDS, RunnerRecord


class StoredState(NamedTuple):
    """What the store knows of a runner without loading its fields.

    A NamedTuple so that loading 100,000 of them costs one C call each.
    """

    content_hash: str
    deleted: bool
    version: int
    #: The raw fingerprint of the version stored (None before one was recorded).
    fingerprint: str | None = None

    def matches(self, fingerprint: str | None) -> bool:
        """True when the API sent exactly what this present runner was stored from."""
        return not self.deleted and fingerprint is not None and fingerprint == self.fingerprint


@dataclass(frozen=True, slots=True)
class Revision:
    """A new version of a runner already in the store: an update or a restoration."""

    record: RunnerRecord
    changed_fields: tuple[str, ...]


@dataclass(frozen=True)
class ChangeSet:
    """Everything one sync writes; applied all at once or not at all."""

    created: list[RunnerRecord] = field(default_factory=list)
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
    def is_empty(self) -> bool:
        return not (self.created or self.updated or self.restored or self.deleted)

    def without_deletions(self) -> ChangeSet:
        """The same changes with every deletion withheld (counted in ``deletions_withheld``)."""
        return ChangeSet(
            created=self.created,
            updated=self.updated,
            restored=self.restored,
            deleted=[],
            unchanged=self.unchanged,
            deletions_withheld=self.deletions_withheld + len(self.deleted),
            refingerprinted=self.refingerprinted,
        )


def ids_needing_fields(
    stored: Mapping[str, StoredState], seen: Mapping[str, RunnerRecord]
) -> list[str]:
    """Ids whose stored fields must be loaded to name what changed (hash differs, or deleted).

    Only runners both stored and seen can need them, so the loop runs over the (usually far
    fewer) stored ones: none at all on a first sync of 100,000 runners.
    """
    needed = []
    for runner_id, state in stored.items():
        record = seen.get(runner_id)
        if record is not None and (state.deleted or state.content_hash != record.content_hash):
            needed.append(runner_id)
    return needed


def changed_fields(old: Mapping[str, str], new: RunnerRecord) -> tuple[str, ...]:
    """The tracked fields whose stored values differ, in column order."""
    pairs = zip(TRACKED_FIELDS, new.values, strict=True)
    return tuple(name for name, value in pairs if old.get(name) != value)


def plan_changes(
    stored: Mapping[str, StoredState],
    stored_fields: Mapping[str, Mapping[str, str]],
    seen: Mapping[str, RunnerRecord],
    *,
    present: Collection[str] | None = None,
    deletions_allowed: bool,
    spared: Collection[str] = (),
    seen_unchanged: Collection[str] = (),
) -> ChangeSet:
    """Compare the walk with the store.

    ``seen`` holds the runners the walk parsed; ``seen_unchanged`` the ids it did not need
    to parse because their raw fingerprint matched a present runner's stored one, or their
    page's digest matched the last sync's (the collector in ``pipeline.sync`` decides).
    ``stored`` must hold the state of every stored runner in ``seen``; ``present`` is every
    stored runner not deleted (by default, those of ``stored``). ``stored_fields`` must hold
    the fields of every id ``ids_needing_fields`` named.
    Guarantees: a runner the walk saw is never deleted; an unchanged runner produces no
    change; runners absent from the walk are deleted only when ``deletions_allowed``
    (which the caller grants only for a complete walk), and never when ``spared`` (ids an
    earlier complete walk of the same sync saw); each one not deleted counts as withheld.
    """
    changes = ChangeSet()
    unchanged = len(seen_unchanged)
    to_compare: Mapping[str, RunnerRecord] = seen
    if not stored:  # nothing seen was stored before (a first sync): all created, in C
        changes.created.extend(seen.values())
        to_compare = {}
    for runner_id, record in to_compare.items():
        state = stored.get(runner_id)
        if state is None:
            changes.created.append(record)
        elif state.deleted:
            old = stored_fields[runner_id]
            changes.restored.append(Revision(record, changed_fields(old, record)))
        elif state.content_hash != record.content_hash:
            old = stored_fields[runner_id]
            changes.updated.append(Revision(record, changed_fields(old, record)))
        else:
            unchanged += 1
            if record.fingerprint and record.fingerprint != state.fingerprint:
                changes.refingerprinted.append((runner_id, record.fingerprint))
    if present is None:
        present = [runner_id for runner_id, state in stored.items() if not state.deleted]
    # Set arithmetic in C over the 100,000 present ids, then sorted: the few missing ones
    # come out in the same order whatever order the sets kept.
    missing = sorted(
        runner_id
        for runner_id in _as_set(present) - _as_set(seen_unchanged)
        if runner_id not in seen
    )
    if deletions_allowed:
        spared = set(spared)
        changes.deleted.extend(runner_id for runner_id in missing if runner_id not in spared)
    withheld = len(missing) - len(changes.deleted)
    return ChangeSet(
        created=changes.created,
        updated=changes.updated,
        restored=changes.restored,
        deleted=changes.deleted,
        unchanged=unchanged,
        deletions_withheld=withheld,
        refingerprinted=changes.refingerprinted,
    )


def _as_set(ids: Collection[str]) -> AbstractSet[str]:
    """``ids`` as a set, without copying one that already is (a set or a dict's keys)."""
    return ids if isinstance(ids, AbstractSet) else set(ids)
