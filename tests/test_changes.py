"""The change plan: a pure comparison; deletions only when allowed."""

from __future__ import annotations

from pipeline.source.records import RunnerRecord, parse_runner
from pipeline.store.changeset import Revision, StoredState
from pipeline.sync.plan import ids_needing_fields, plan_changes


def record(runner_id: str, name: str = "n", **overrides: object) -> RunnerRecord:
    raw = {
        "id": runner_id,
        "user_id": "u",
        "name": name,
        "status": "active",
        "endpoint": "https://e.example.com",
        "tags": [],
        "headers": {},
        "created_at": "2024-01-01T00:00:00Z",
        "updated_at": "2024-01-01T00:00:00Z",
        **overrides,
    }
    parsed = parse_runner(raw, page=1, position=0, redaction_key=b"k")
    assert isinstance(parsed, RunnerRecord)
    return parsed


def state(rec: RunnerRecord, deleted: bool = False) -> StoredState:
    return StoredState(rec.content_hash, deleted, 1)


def writes_no_version(plan) -> bool:
    return not (plan.created or plan.updated or plan.restored or plan.deleted)


def test_plan_names_created_updated_restored_deleted_and_unchanged():
    same, old_b, gone, back_old = record("a"), record("b"), record("c"), record("d")
    new_b = record("b", name="renamed")
    back = record("d", tags=["x"])
    stored = {"a": state(same), "b": state(old_b), "c": state(gone), "d": state(back_old, True)}
    seen = {"a": same, "b": new_b, "d": back, "e": record("e")}
    assert ids_needing_fields(stored, seen) == ["b", "d"]
    fields = {"b": old_b.fields(), "d": back_old.fields()}

    plan = plan_changes(stored, fields, seen, deletions_allowed=True, gone={"c"})
    assert plan.created == [seen["e"]]
    assert plan.updated == [Revision(new_b, ("name",))]
    assert plan.restored == [Revision(back, ("tags",))]
    assert plan.deleted == ["c"]
    assert (plan.unchanged, plan.deletions_withheld) == (1, 0)


def test_without_a_proven_walk_nothing_is_deleted_and_the_withheld_count_is_kept():
    kept = record("a")
    plan = plan_changes(
        {"a": state(kept), "z": state(record("z"))},
        {},
        {"a": kept},
        deletions_allowed=False,
        gone={"z"},
    )
    assert plan.deleted == [] and plan.deletions_withheld == 1 and writes_no_version(plan)


def test_an_already_deleted_runner_that_stays_away_is_not_deleted_again():
    plan = plan_changes(
        {"z": state(record("z"), deleted=True)}, {}, {}, deletions_allowed=True, gone={"z"}
    )
    assert plan.deleted == [] and writes_no_version(plan)


def test_a_missing_runner_not_proven_gone_is_not_deleted_but_counted_as_withheld():
    kept = record("a")
    stored = {"a": state(kept), "y": state(record("y")), "z": state(record("z"))}
    plan = plan_changes(stored, {}, {"a": kept}, deletions_allowed=True, gone={"z"})
    assert plan.deleted == ["z"] and plan.deletions_withheld == 1


def test_without_deletions_moves_every_deletion_to_withheld():
    kept = record("a")
    stored = {"a": state(kept), "y": state(record("y")), "z": state(record("z"))}
    plan = plan_changes(
        stored, {}, {"a": kept}, deletions_allowed=True, gone={"y", "z"}
    ).without_deletions()
    assert (plan.deleted, plan.deletions_withheld, plan.unchanged) == ([], 2, 1)


def test_runners_seen_unchanged_by_fingerprint_are_neither_changed_nor_deleted():
    kept, gone = record("a"), record("z")
    stored = {"a": state(kept), "z": state(gone)}
    plan = plan_changes(stored, {}, {}, deletions_allowed=True, gone={"z"}, seen_unchanged={"a"})
    assert (plan.unchanged, plan.deleted, writes_no_version(plan)) == (1, ["z"], False)


def test_an_unchanged_runner_with_a_stale_fingerprint_is_refingerprinted_not_versioned():
    parsed = parse_runner(
        {
            "id": "a",
            "user_id": "u",
            "name": "n",
            "status": "active",
            "endpoint": "https://e.example.com",
            "tags": [],
            "headers": {},
            "created_at": "2024-01-01T00:00:00Z",
            "updated_at": "2024-01-01T00:00:00Z",
        },
        page=1,
        position=0,
        redaction_key=b"k",
    )
    assert isinstance(parsed, RunnerRecord) and parsed.fingerprint
    stale = StoredState(parsed.content_hash, False, 1, fingerprint=None)
    plan = plan_changes({"a": stale}, {}, {"a": parsed}, deletions_allowed=True)
    assert writes_no_version(plan) and plan.unchanged == 1
    assert plan.refingerprinted == [("a", parsed.fingerprint)]


def test_with_nothing_seen_in_the_store_all_is_created_in_order_and_absences_still_count():
    seen = {"e": record("e"), "f": record("f")}
    plan = plan_changes({}, {}, seen, present={"a", "b"}, deletions_allowed=True, gone={"a", "b"})
    assert plan.created == [seen["e"], seen["f"]]
    assert plan.deleted == ["a", "b"]
    assert (plan.updated, plan.restored, plan.unchanged) == ([], [], 0)

    withheld = plan_changes({}, {}, seen, present={"a"}, deletions_allowed=False, gone={"a"})
    assert withheld.created == [seen["e"], seen["f"]] and withheld.deletions_withheld == 1


def test_fields_are_needed_only_for_runners_both_stored_and_seen_that_differ():
    same, changed = record("a"), record("b", name="renamed")
    stored = {"a": state(same), "b": state(record("b")), "gone": state(record("gone"))}
    assert ids_needing_fields(stored, {"a": same, "b": changed, "new": record("new")}) == ["b"]
    assert ids_needing_fields({}, {"a": same}) == []
