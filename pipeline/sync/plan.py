"""Decide what a sync changes: a pure comparison of what the walk saw with what the store holds.

No SQL and no HTTP here: ``decide`` takes plain values and returns a ``Decision`` (the change
plan of ``plan_changes``, the run outcome, the warnings) that
``pipeline.store.write.apply_changes`` writes in one transaction. Keeping the decision pure is
what lets the deletion rule (delete only what a complete walk missed and a re-read of its page
proved gone) be tested alone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import ForeignAccountError
from pipeline.settings import Settings
from pipeline.source.records import KNOWN_STATUSES, TRACKED_FIELDS, Rejection, RunnerRecord
from pipeline.store.changeset import ChangeSet, Decision, Revision, RunOutcome, StoredState
from pipeline.sync import guardrails

if TYPE_CHECKING:
    from pipeline.source.walk import WalkResult
    from pipeline.sync.collector import Sightings


@dataclass(frozen=True)
class StoredPicture:
    """What the store holds that a decision compares the walk with: the present runners, the
    states of those the walk parsed (see ``plan_changes``), the fields ``ids_needing_fields``
    named, every owner ever mirrored, and the present runners of an unusual status."""

    present: Collection[str]
    states: Mapping[str, StoredState]
    fields: Mapping[str, Mapping[str, str]]
    known_owners: Collection[str]
    unusual_status: Collection[str]


def ids_needing_fields(
    stored: Mapping[str, StoredState], seen: Mapping[str, RunnerRecord]
) -> list[str]:
    """Ids whose stored fields must be loaded to name what changed (hash differs, or deleted).

    Only runners both stored and seen can need them, so the loop runs over the (usually far
    fewer) stored ones: none at all on a first sync.
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
    gone: Collection[str] = (),
    seen_unchanged: Collection[str] = (),
    seen_written: Collection[str] = (),
) -> ChangeSet:
    """Compare the walk with the store.

    ``seen`` holds the runners the walk parsed; ``seen_unchanged`` the ids it did not need
    to parse because their raw fingerprint matched a present runner's stored one, or their
    page's digest matched the last sync's (``pipeline.sync.collector`` decides);
    ``seen_written`` the new runners already written during the walk as it saw them.
    ``stored`` must hold the state of every stored runner in ``seen``; ``present`` is every
    stored runner not deleted (by default, those of ``stored``). ``stored_fields`` must hold
    the fields of every id ``ids_needing_fields`` named.
    Guarantees: a runner the walk saw is never deleted; an unchanged runner produces no
    change; a present runner absent from the walk is deleted only when ``deletions_allowed``
    (which the caller grants only for a complete walk) and it is in ``gone`` (a re-read of
    its page proved it gone); each one not deleted counts as withheld.
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
    # Set arithmetic in C over the present ids, then sorted: the few missing ones come out
    # in the same order whatever order the sets kept.
    missing = sorted(
        runner_id
        for runner_id in _as_set(present) - _as_set(seen_unchanged)
        if runner_id not in seen and runner_id not in seen_written
    )
    if deletions_allowed:
        gone = _as_set(gone)
        changes.deleted.extend(runner_id for runner_id in missing if runner_id in gone)
    withheld = len(missing) - len(changes.deleted)
    return ChangeSet(
        created=changes.created,
        created_early=seen_written,
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


def to_recheck(present: AbstractSet[str], seen: AbstractSet[str], settings: Settings) -> list[str]:
    """The present runners a complete walk missed, whose pages are re-read before any is
    deleted; none when the mass-deletion guard would withhold them anyway."""
    missing = present - seen
    if not missing or _mass_deletion(settings, len(missing), len(present), len(seen)):
        return []
    return sorted(missing)


def decide(
    walk: WalkResult, seen: Sightings, stored: StoredPicture, settings: Settings
) -> Decision:
    """What a sync writes, from its walk and what the store holds: changes, outcome, warnings.

    Raises ForeignAccountError when every runner seen belongs to an owner the store never
    mirrored. Deletes only runners the complete walk missed that its re-read proved gone
    (``walk.gone``), and none at all when that walk rejected records or when they are a
    mass deletion; withheld ones make the run ``partial``.
    """
    records, rejections = seen.parsed, seen.rejections
    owners = seen.owners.union(record.user_id for record in records.values())
    # An unchanged runner's owner is a known one (every stored runner's owner was recorded
    # with it), so a walk that saw any is not of a foreign account.
    if not seen.unchanged and guardrails.is_foreign_account(stored.known_owners, owners):
        raise ForeignAccountError(guardrails.foreign_account_message(owners, stored.known_owners))
    complete = walk.complete and not rejections
    unknown_statuses = sum(1 for record in records.values() if record.status not in KNOWN_STATUSES)
    unknown_statuses += seen.unusual_written
    unknown_statuses += len(_as_set(stored.unusual_status) & seen.unchanged)
    warnings = _warnings(walk, rejections, unknown_statuses)
    changes = plan_changes(
        stored.states,
        stored.fields,
        records,
        present=stored.present,
        deletions_allowed=complete,
        gone=walk.gone,
        seen_unchanged=seen.unchanged,
        seen_written=seen.written,
    )
    # What the complete walk missed, proven gone or not: the guard weighs the walk's picture.
    would_delete = len(changes.deleted) + changes.deletions_withheld if complete else 0
    mass_deletion = _mass_deletion(settings, would_delete, len(stored.present), seen.count)
    if mass_deletion is not None:
        changes = changes.without_deletions()
        warnings.append(mass_deletion)
    elif changes.deletions_withheld:
        because = (
            "a re-read of their pages did not prove them gone (the next sync decides)"
            if complete
            else "the walk was not proven complete"
        )
        warnings.append(
            f"{changes.deletions_withheld} runner(s) missing from the walk were NOT marked "
            f"deleted because {because}"
        )
    outcome = RunOutcome(
        status="success" if complete and not changes.deletions_withheld else "partial",
        pages=walk.pages_fetched,
        walks=walk.walks,
        complete=complete,
        total_reported=walk.total_reported,
        runners_seen=seen.count,
        rejected=len(rejections),
        warnings=tuple(warnings),
    )
    # Pages are vouched for only when they hold exactly the runners left present (none
    # withheld from deletion), which is what lets the next sync trust a walk of them alone.
    pages = () if changes.deletions_withheld else tuple(seen.pages)
    return Decision(changes, outcome, tuple(rejections), owners, pages)


def _mass_deletion(settings: Settings, would_delete: int, present: int, seen: int) -> str | None:
    return guardrails.mass_deletion_reason(
        would_delete,
        present,
        seen,
        max_ratio=settings.max_delete_ratio,
        allowed=settings.allow_mass_delete,
    )


def _warnings(
    walk: WalkResult, rejections: Sequence[Rejection], unknown_statuses: int
) -> list[str]:
    warnings = []
    if not walk.complete:
        warnings.append(f"no complete walk in {walk.walks} attempt(s): " + "; ".join(walk.reasons))
    if rejections:
        warnings.append(
            f"{len(rejections)} runner record(s) could not be stored (see rejected_records)"
        )
    if unknown_statuses:
        warnings.append(f"{unknown_statuses} runner(s) have a status other than active/disabled")
    return warnings
