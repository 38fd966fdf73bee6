"""The absence proof (pure): a page re-read at one instant proves a runner gone, or says not."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.source.absence import choose_page, judge_page, plan_rechecks
from pipeline.source.client import Page


def stamp(minute: int) -> str:
    return f"2026-01-01T{minute // 60:02d}:{minute % 60:02d}:00Z"


def page_of(runners: list[tuple[str, int]], number: int, per_page: int) -> Page:
    """Page ``number`` of a newest-first list of (id, minute created)."""
    ordered = sorted(runners, key=lambda runner: runner[1], reverse=True)
    chunk = ordered[(number - 1) * per_page : number * per_page]
    body = [{"id": runner_id, "created_at": stamp(minute)} for runner_id, minute in chunk]
    return Page(number, per_page, body, total=len(runners))


def test_a_runner_between_two_others_on_the_page_is_gone():
    page = page_of([("a", 30), ("b", 20), ("c", 10)], 1, 3)
    assert judge_page(page, {"x": stamp(15)}) == ({"x"}, set(), set())


def test_a_runner_on_the_page_is_found():
    page = page_of([("a", 30), ("b", 20), ("c", 10)], 1, 3)
    assert judge_page(page, {"b": stamp(20)}) == (set(), {"b"}, set())


def test_a_runner_past_the_edge_of_a_page_that_does_not_end_the_list_is_not_proven():
    runners = [("a", 40), ("b", 30), ("c", 20), ("d", 10)]
    assert judge_page(page_of(runners, 1, 2), {"x": stamp(25)}) == (set(), set(), {"x"})
    assert judge_page(page_of(runners, 2, 2), {"x": stamp(35)}) == (set(), set(), {"x"})


def test_the_ends_of_the_list_bracket_the_newest_and_the_oldest():
    runners = [("a", 40), ("b", 30), ("c", 20), ("d", 10)]
    assert judge_page(page_of(runners, 1, 2), {"x": stamp(50)}) == ({"x"}, set(), set())
    assert judge_page(page_of(runners, 2, 2), {"x": stamp(5)}) == ({"x"}, set(), set())
    assert judge_page(page_of([], 1, 100), {"x": stamp(5)}) == ({"x"}, set(), set())


def test_a_tie_is_no_bracket_and_a_page_out_of_order_proves_nothing():
    runners = [("a", 30), ("b", 20), ("c", 10)]
    assert judge_page(page_of(runners, 2, 1), {"x": stamp(20)}) == (set(), set(), {"x"})
    shuffled = Page(1, 3, [{"id": "c", "created_at": stamp(10)},
                           {"id": "a", "created_at": stamp(30)}], total=5)  # fmt: skip
    assert judge_page(shuffled, {"x": stamp(20)}) == (set(), set(), {"x"})
    unparsable = Page(1, 3, [{"id": "a", "created_at": "yesterday"}], total=1)
    assert judge_page(unparsable, {"x": stamp(20)}) == (set(), set(), {"x"})


def test_a_page_is_chosen_small_with_room_on_both_sides():
    for first, last in ((44, 45), (99, 100), (500, 500), (5, 6)):
        size, number = choose_page(first, last, 1000)  # type: ignore[misc]
        start, end = (number - 1) * size, number * size - 1
        assert start <= max(first - 10, 0) and min(last + 10, 999) <= end
        assert size <= 3 * (last - first + 21), (first, last, size)
    assert choose_page(0, 0, 0) == (1, 1)
    assert choose_page(10, 400, 1000) is None  # a tie longer than any page


def test_plan_rechecks_places_each_missing_runner_among_its_walk_neighbours():
    walk = [stamp(minute) for minute in range(1000, 0, -1)]  # 1000 runners, newest first
    planned, unplaceable = plan_rechecks({"x": "2026-01-01T08:20:30Z", "y": "garbage"}, walk)
    assert unplaceable == {"y"}
    [((size, number), ids)] = planned.items()
    place = 1000 - 500  # 500 runners (minutes 501..1000) are newer than 08:20:30
    assert ids == ["x"] and (number - 1) * size <= place - 11 and place + 10 <= number * size - 1


# Soundness, over any list and any page of it: a runner in the list is never "gone".
runner_lists = st.lists(st.integers(0, 40), min_size=0, max_size=60).map(
    lambda minutes: [(f"r{index}", minute) for index, minute in enumerate(minutes)]
)


@given(runner_lists, st.integers(1, 12), st.integers(1, 8), st.data())
def test_no_page_ever_proves_a_present_runner_gone(runners, per_page, number, data):
    page = page_of(runners, number, per_page)
    present = data.draw(st.sampled_from(runners)) if runners else None
    looked_for = {"ghost": stamp(data.draw(st.integers(0, 41)))}
    if present is not None:
        looked_for[present[0]] = stamp(present[1])
    gone, found, unproven = judge_page(page, looked_for)
    assert present is None or present[0] not in gone
    assert gone | found | unproven == set(looked_for)


@given(runner_lists, st.integers(0, 41))
def test_a_planned_page_of_a_still_list_proves_a_missing_runner_gone(runners, minute):
    ordered = sorted(runners, key=lambda runner: runner[1], reverse=True)
    walk = [stamp(m) for _, m in ordered]
    planned, unplaceable = plan_rechecks({"ghost": stamp(minute)}, walk)
    ties = sum(1 for _, m in runners if m == minute)
    if unplaceable:
        assert ties > 90  # only a tie longer than any page is out of reach
        return
    [((size, number), _)] = planned.items()
    assert judge_page(page_of(runners, number, size), {"ghost": stamp(minute)})[0] == {"ghost"}


def test_a_page_with_odd_ids_still_judges_the_runners_looked_for():
    odd = [{"id": ["x"], "created_at": stamp(30)}, 5, {"id": "a", "created_at": stamp(10)}]
    page = Page(1, 5, odd, total=3)
    assert judge_page(page, {"z": stamp(20)}) == (set(), set(), {"z"})  # not ordered: unproven
