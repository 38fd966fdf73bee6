"""The decision: a pure function of the walk, what it saw and what the store holds, returning
the plan, the run outcome and its warnings; a deletion needs a complete walk AND a re-read
that proved the runner gone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import ForeignAccountError
from pipeline.settings import Settings
from pipeline.source.records import Rejection, RunnerRecord, parse_runner
from pipeline.source.walk import WalkResult
from pipeline.store.changeset import StoredState
from pipeline.sync.collector import Sightings
from pipeline.sync.plan import StoredPicture, decide, plan_changes

SETTINGS = Settings(base_url="http://127.0.0.1", token="t", db_path=Path("unused.db"))
NOT_PROVEN = (
    "runner(s) missing from the walk were NOT marked deleted because a re-read of their "
    "pages did not prove them gone (the next sync decides)"
)


def record(runner_id: str, owner: str = "u", status: str = "active") -> RunnerRecord:
    raw = {
        "id": runner_id, "user_id": owner, "name": "n", "status": status,
        "endpoint": "https://e.example.com", "tags": [], "headers": {},
        "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z",
    }  # fmt: skip
    parsed = parse_runner(raw, page=1, position=0, redaction_key=b"k")
    assert isinstance(parsed, RunnerRecord)
    return parsed


def walk(complete: bool = True, gone: frozenset[str] = frozenset(), walks: int = 1) -> WalkResult:
    reasons = () if complete else ("the head of the list changed during the walk",)
    return WalkResult(complete, walks, 3, 10, reasons, gone=gone)


def sightings(
    unchanged: set[str], parsed: dict[str, RunnerRecord] | None = None, rejections=()
) -> Sightings:
    return Sightings(parsed or {}, unchanged, list(rejections), ["digest"])


def store_of(present: str, unusual: str = "") -> StoredPicture:
    """A store holding the present runners named by the letters of ``present``, all unchanged."""
    return StoredPicture(
        present=set(present),
        states={},
        fields={},
        known_owners={"u"},
        unusual_status=set(unusual),
    )


def test_a_runner_the_complete_walk_missed_and_the_re_read_proved_gone_is_deleted():
    decision = decide(
        walk(gone=frozenset("e")), sightings(set("abcd")), store_of("abcde"), SETTINGS
    )
    assert decision.changes.deleted == ["e"]
    assert (decision.outcome.status, decision.outcome.warnings) == ("success", ())
    assert (decision.page_digests, decision.owners) == (("digest",), frozenset())


def test_a_missed_runner_the_re_read_did_not_prove_gone_is_never_deleted_whatever_the_reason():
    # However the walk came to prove nothing (the re-read found it, could not place it, or
    # was never made), an absence alone deletes nothing.
    for gone in (frozenset(), frozenset("z"), frozenset("a")):
        decision = decide(walk(gone=gone), sightings(set("abcd")), store_of("abcde"), SETTINGS)
        assert (decision.changes.deleted, decision.changes.deletions_withheld) == ([], 1)
        assert decision.outcome.status == "partial"
        assert decision.outcome.warnings == (f"1 {NOT_PROVEN}",)


def test_an_incomplete_walk_deletes_nothing_even_what_it_calls_gone():
    decision = decide(
        walk(complete=False, gone=frozenset("e"), walks=2),
        sightings(set("abcd")),
        store_of("abcde"),
        SETTINGS,
    )
    assert decision.changes.deleted == []
    assert decision.outcome.status == "partial" and not decision.outcome.complete
    assert decision.outcome.warnings == (
        "no complete walk in 2 attempt(s): the head of the list changed during the walk",
        "1 runner(s) missing from the walk were NOT marked deleted because the walk was not "
        "proven complete",
    )


def test_a_mass_deletion_is_withheld_with_its_reason_instead_of_the_not_proven_one():
    # The walk asks nothing re-read when the guard would refuse: nothing is proven gone.
    decision = decide(walk(), sightings(set("ab")), store_of("abcdefghij"), SETTINGS)
    assert (decision.changes.deleted, decision.changes.deletions_withheld) == ([], 8)
    assert decision.outcome.status == "partial"
    assert decision.outcome.warnings == (
        "8 of the 10 present runners (80%) would be marked deleted, more than "
        "--max-delete-ratio 0.5 allows; no deletion was applied; if they really are gone, "
        "sync again with --allow-mass-delete",
    )
    allowed = dataclasses.replace(SETTINGS, allow_mass_delete=True)
    proven = frozenset("cdefghij")
    decision = decide(walk(gone=proven), sightings(set("ab")), store_of("abcdefghij"), allowed)
    assert decision.changes.deleted == sorted(proven) and decision.outcome.status == "success"


def test_the_outcome_counts_the_walk_the_sightings_and_the_rejections():
    rejection = Rejection(2, 4, "x", "id is missing", "{}")
    new = record("n", status="paused")
    decision = decide(
        walk(gone=frozenset("e")),
        sightings(set("abcd"), {"n": new}, [rejection]),
        store_of("abcde", unusual="ab"),
        SETTINGS,
    )
    assert decision.outcome == dataclasses.replace(
        decision.outcome,
        status="partial",
        pages=3,
        walks=1,
        complete=False,
        total_reported=10,
        runners_seen=5,
        rejected=1,
    )
    assert decision.changes.created == [new] and decision.changes.deleted == []
    assert decision.rejections == (rejection,) and decision.owners == frozenset({"u"})
    assert decision.outcome.warnings == (
        "1 runner record(s) could not be stored (see rejected_records)",
        "3 runner(s) have a status other than active/disabled",
        "1 runner(s) missing from the walk were NOT marked deleted because the walk was not "
        "proven complete",
    )


def test_runners_all_of_owners_the_store_never_mirrored_are_refused():
    with pytest.raises(ForeignAccountError, match="another account"):
        decide(
            walk(), sightings(set(), {"x": record("x", owner="stranger")}), store_of(""), SETTINGS
        )
    # One unchanged runner is enough to show it is this account.
    decision = decide(
        walk(), sightings({"a"}, {"x": record("x", owner="stranger")}), store_of("a"), SETTINGS
    )
    assert decision.owners == frozenset({"stranger"})


def test_the_decision_is_a_frozen_value():
    decision = decide(walk(), sightings(set("a")), store_of("a"), SETTINGS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.outcome = decision.outcome  # type: ignore[misc]


ids = st.sets(st.sampled_from("abcdefgh"))


@given(present=ids, seen=ids, unchanged=ids, gone=ids, complete=st.booleans())
def test_deleted_is_exactly_the_present_runners_missed_and_proven_gone(
    present, seen, unchanged, gone, complete
):
    unchanged &= present  # only present runners are ever recognised unchanged
    stored = {i: StoredState(record(i).content_hash, False, 1) for i in present}
    plan = plan_changes(
        stored,
        {},
        {i: record(i) for i in seen},
        deletions_allowed=complete,
        gone=gone,
        seen_unchanged=unchanged,
    )
    missing = present - seen - unchanged
    assert plan.deleted == (sorted(missing & gone) if complete else [])
    assert plan.deletions_withheld == len(missing) - len(plan.deleted)
