"""Refusals that keep a valid-looking sync from wrecking the mirror: pure decisions, no I/O.

A walk can be complete, every page well-formed, and still be the wrong picture: the API
briefly lists nothing, an outage hides most of the fleet behind a 200, or the token belongs to
another account. Marking thousands of runners deleted (or mirroring a stranger's fleet into
this history) on such a walk is the one mistake a mirror cannot take back quietly, so two
checks stand between the change plan and the store:

* **mass deletion**: a sync that would mark more than ``max_ratio`` of the present fleet
  deleted, or that saw no runner at all while the store holds some, applies its creates and
  updates but no deletion, and says why; the user overrides it for one run.
* **foreign account**: a sync whose runners all belong to owners (``user_id``) this database
  has never mirrored is refused outright; a new database (no owner yet) accepts any.

``pipeline.sync.run`` wires them; they are functions of counts and sets so they are tested alone.
"""

from __future__ import annotations

from collections.abc import Collection


def mass_deletion_reason(
    would_delete: int,
    present: int,
    seen: int,
    *,
    max_ratio: float,
    allowed: bool,
) -> str | None:
    """Why this sync's deletions must be withheld as a mass deletion, or None to apply them.

    ``would_delete`` runners of the ``present`` (not deleted) ones in the store are missing
    from a complete walk that saw ``seen`` runners. More than ``max_ratio`` of ``present``, or
    any deletion when the walk saw nothing at all (an empty listing against a non-empty store,
    whatever the ratio), is a mass deletion unless ``allowed``.
    """
    if allowed or would_delete == 0 or present == 0:
        return None
    remedy = "no deletion was applied; if they really are gone, sync again with --allow-mass-delete"
    if seen == 0:
        return f"the API listed no runners at all but the store holds {present}; {remedy}"
    if would_delete > max_ratio * present:
        return (
            f"{would_delete} of the {present} present runners ({would_delete / present:.0%}) "
            f"would be marked deleted, more than --max-delete-ratio {max_ratio:g} allows; {remedy}"
        )
    return None


def is_foreign_account(known_owners: Collection[str], seen_owners: Collection[str]) -> bool:
    """True when every runner seen belongs to an owner the store has never mirrored.

    A store with no known owner (a new database) accepts any; a walk that saw no runner is
    not foreign (that is the mass-deletion check's business). One known owner among the seen
    is enough: an account's runners may belong to several of its users.
    """
    if not known_owners or not seen_owners:
        return False
    return not set(seen_owners) & set(known_owners)


def foreign_account_message(seen_owners: Collection[str], known_owners: Collection[str]) -> str:
    """The one-line refusal: what was seen, what the store mirrors, and what to do."""
    seen = sorted(seen_owners)
    known = sorted(known_owners)
    return (
        f"the API listed runners of owner {_some(seen)}, but this database mirrors the account "
        f"of owner {_some(known)}: the token is for another account; nothing was applied "
        "(check COMFYCONTROL_TOKEN, or pass a new --db to mirror that account)"
    )


def _some(ids: list[str]) -> str:
    return ids[0] + (f" (and {len(ids) - 1} more)" if len(ids) > 1 else "")
