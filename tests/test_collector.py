"""The sync's page collector: which runners it parses, which it only notes as unchanged, and
that the latest sighting wins, also within one page."""

from __future__ import annotations

from typing import Any

from pipeline.source.client import Page
from pipeline.source.records import Rejection, RunnerRecord, fingerprinter, page_digester
from pipeline.source.walk import WalkResult
from pipeline.sync.collector import WRITTEN, Collector

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


class Written:
    """Stands in for the store's early writes: remembers what it was handed."""

    def __init__(self) -> None:
        self.added: list[RunnerRecord] = []
        self.written: dict[str, str] = {}

    def add(self, records: list[RunnerRecord]) -> None:
        self.added.extend(records)
        self.written.update((record.id, record.fingerprint) for record in records)


def test_a_runner_written_early_is_only_noted_and_seeing_it_again_as_sent_adds_nothing() -> None:
    early = Written()
    collector = Collector(KEY, False, {}, None, early=early)  # type: ignore[arg-type]
    collector(Page(number=1, per_page=2, runners=[runner("r1"), runner("r2")], total=3), 1)
    assert collector.records == {"r1": (1, WRITTEN), "r2": (1, WRITTEN)}  # no record kept
    assert [record.id for record in early.added] == ["r1", "r2"]

    changed = runner("r2", name="renamed")
    collector(Page(number=1, per_page=2, runners=[runner("r1"), changed], total=2), 2)
    assert collector.records["r1"] == (2, WRITTEN)
    record = collector.records["r2"][1]  # unlike its early write: kept whole, to settle
    assert isinstance(record, RunnerRecord) and record.name == "renamed"
    assert len(early.added) == 2  # nothing written twice

    walk = WalkResult(complete=True, walks=2, pages_fetched=2, total_reported=2, reasons=())
    seen = collector.final(walk)
    assert (seen.written, set(seen.parsed), seen.count, seen.owners) == (
        {"r1"}, {"r2"}, 2, frozenset({"u1"})
    )  # fmt: skip


def test_the_stored_fingerprints_are_read_only_when_a_page_needs_them() -> None:
    reads: list[int] = []
    runners = [runner("r1"), runner("r2")]
    stored = {r["id"]: fingerprint(r) for r in runners}
    bodies = [b'{"runners": [1], "total": 2}', b'{"runners": [2], "total": 2}']
    vouched = {page_digester(KEY)(body) for body in bodies}

    def read() -> dict[str, str | None]:
        reads.append(1)
        return stored

    def walk(collector: Collector, pages: list[bytes]) -> Collector:
        for number, (body, one) in enumerate(zip(pages, runners, strict=False), 1):
            collector(Page(number=number, per_page=1, runners=[one], total=2, body=body), 1)
        return collector

    known = walk(Collector(KEY, False, read, None, known_pages=vouched), bodies)
    assert known.saw_the_stored_fleet(1) and reads == []
    assert known.records == {"r1": (1, None), "r2": (1, None)}

    # The last sync vouched for a page this walk did not read: not the stored fleet.
    fewer = walk(Collector(KEY, False, read, None, known_pages=vouched), bodies[:1])
    assert not fewer.saw_the_stored_fleet(1) and reads == []
    assert set(fewer.fingerprints) == {"r1", "r2"} and reads == [1]

    unknown = walk(Collector(KEY, False, read, None, known_pages=vouched), [bodies[0], b"new"])
    assert not unknown.saw_the_stored_fleet(1) and reads == [1, 1]
    assert unknown.records == {"r1": (1, None), "r2": (1, None)}  # compared, then noted
