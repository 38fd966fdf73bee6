"""Decide what a sync changes: a pure comparison of what the walk saw with what the store holds.

No SQL and no HTTP here: ``plan_changes`` takes plain values and returns a ``ChangeSet`` that
``pipeline.store.write.apply_changes`` writes in one transaction. Keeping the decision pure is what
lets the deletion rule (never delete unless the walk proved itself complete) be tested alone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from collections.abc import Set as AbstractSet

from pipeline.source.records import TRACKED_FIELDS, RunnerRecord
from pipeline.store.changeset import ChangeSet, Revision, StoredState


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
    page's digest matched the last sync's (the collector in ``pipeline.sync.run`` decides).
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
