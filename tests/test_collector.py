"""The sync's page collector: which runners it parses, which it only notes as unchanged, and
that the latest sighting wins, also within one page."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest

from pipeline.source.client import Page
from pipeline.source.records import Rejection, RunnerRecord, fingerprinter
from pipeline.sync.collector import Collector, CollectorAfterRead

KEY = b"k" * 32


def runner(runner_id: Any, name: str = "a") -> dict[str, Any]:
    return {
        "id": runner_id,
        "user_id": "u1",
        "name": name,
        "status": "active",
        "endpoint": "https://example.com",
        "tags": ["x"],
        "headers": {"Authorization": "Bearer s"},
        "created_at": "2024-01-01T00:00:00Z",
        "updated_at": "2024-01-01T00:00:00Z",
    }


def collect(runners: list[Any], stored: dict[str, str | None]) -> Collector:
    collector = Collector(KEY, False, stored, None)
    collector(Page(number=1, per_page=100, runners=runners, total=len(runners)), 1)
    return collector


def fingerprint(raw: Any) -> str:
    value = fingerprinter(KEY, False)(raw)
    assert value is not None
    return value


def test_a_quiet_page_is_all_noted_unchanged_and_nothing_parsed() -> None:
    runners = [runner("r1"), runner("r2")]
    collector = collect(runners, {r["id"]: fingerprint(r) for r in runners})
    assert collector.records == {"r1": (1, None), "r2": (1, None)}
    assert collector.rejections == []


def test_only_runners_whose_fingerprint_differs_are_parsed() -> None:
    runners = [runner("r1"), runner("r2", name="renamed"), runner("r3"), runner(["odd"])]
    stored = {"r1": fingerprint(runner("r1")), "r2": fingerprint(runner("r2")), "r3": None}
    collector = collect(runners, stored)
    assert collector.records["r1"] == (1, None)
    parsed = collector.records["r2"][1]
    assert isinstance(parsed, RunnerRecord) and parsed.name == "renamed"
    assert isinstance(collector.records["r3"][1], RunnerRecord)  # no stored fingerprint yet
    assert [type(rejection) for _, rejection in collector.rejections] == [Rejection]
    assert collector.rejections[0][1].position == 3
    assert list(collector.records) == ["r1", "r2", "r3"]


def test_an_id_twice_on_one_page_keeps_the_later_sighting() -> None:
    stored = {"r1": fingerprint(runner("r1"))}
    changed_then_unchanged = collect([runner("r1", name="new"), runner("r1")], stored)
    assert changed_then_unchanged.records == {"r1": (1, None)}
    unchanged_then_changed = collect([runner("r1"), runner("r1", name="new")], stored)
    record = unchanged_then_changed.records["r1"][1]
    assert isinstance(record, RunnerRecord) and record.name == "new"


def test_pages_that_come_before_the_stored_fingerprints_wait_and_are_handled_in_order() -> None:
    moved, renamed = runner("r2"), runner("r2", name="renamed")
    stored = {"r1": fingerprint(runner("r1")), "r2": fingerprint(moved)}
    reading: Future[dict[str, str | None]] = Future()
    seen: list[tuple[int, int, int]] = []
    made: list[Collector] = []

    def make(read: Any) -> Collector:
        made.append(Collector(KEY, False, read, lambda *progress: seen.append(progress)))
        return made[-1]

    pages = CollectorAfterRead(reading, make)
    pages(Page(number=1, per_page=2, runners=[runner("r1"), moved], total=4), 1)
    pages(Page(number=2, per_page=2, runners=[renamed, runner("r3")], total=4), 1)
    assert made == [] and seen == []  # nothing handled without the fingerprints

    reading.set_result(stored)
    pages(Page(number=3, per_page=2, runners=[], total=4), 1)
    [collector] = made
    assert [pages for pages, _, _ in seen] == [1, 2, 3]  # in the order they came
    assert collector.records["r1"] == (1, None)  # unchanged: its stored fingerprint matched
    record = collector.records["r2"][1]  # the later sighting (page 2) won
    assert isinstance(record, RunnerRecord) and record.name == "renamed"
    assert isinstance(collector.records["r3"][1], RunnerRecord)
    assert set(collector.present) == {"r1", "r2"}


def test_asking_for_the_collector_hands_it_the_pages_that_waited() -> None:
    reading: Future[dict[str, str | None]] = Future()
    pages = CollectorAfterRead(reading, lambda read: Collector(KEY, False, read, None))
    pages(Page(number=1, per_page=100, runners=[runner("r1"), runner(["odd"])], total=2), 1)
    reading.set_result({"r1": fingerprint(runner("r1"))})
    collector = pages.collector()
    assert collector.records == {"r1": (1, None)}
    assert len(collector.rejections) == 1
    assert pages.collector() is collector  # made once


def test_a_failed_read_of_the_fingerprints_fails_the_collector() -> None:
    reading: Future[dict[str, str | None]] = Future()
    pages = CollectorAfterRead(reading, lambda read: Collector(KEY, False, read, None))
    pages(Page(number=1, per_page=100, runners=[runner("r1")], total=1), 1)
    reading.set_exception(OSError("disk gone"))
    with pytest.raises(OSError, match="disk gone"):
        pages(Page(number=2, per_page=100, runners=[runner("r2")], total=2), 1)
