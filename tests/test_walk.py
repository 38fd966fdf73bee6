"""The completeness proof (pure) and the walk's bounds, over the simulator in process."""

from __future__ import annotations

import asyncio
import itertools
import time
import tracemalloc

import httpx
import pytest

from pipeline.sim.simulator import SimulatedAccount, create_app
from pipeline.source.client import ComfyControlClient, Page
from pipeline.source.walk import MAX_RUNNERS_PER_WALK, PageSummary, judge_walk, walk_all_pages


def summary(number: int, total: int, ids: str) -> PageSummary:
    return PageSummary(number, total, tuple(ids))


def test_a_still_picture_is_complete():
    pages = [summary(1, 5, "ab"), summary(2, 5, "cd"), summary(3, 5, "e")]
    assert judge_walk(pages, summary(1, 5, "ab"), per_page=2).complete


def test_an_empty_account_is_complete():
    assert judge_walk([summary(1, 0, "")], summary(1, 0, ""), per_page=100).complete


def test_every_way_a_picture_can_move_is_caught():
    closing = summary(1, 5, "ab")
    cases = {
        "pages reported different totals: [5, 6]": (
            [summary(1, 5, "ab"), summary(2, 6, "cd"), summary(3, 5, "e")],
            closing,
        ),
        "total moved from 5 to 6 during the walk": (
            [summary(1, 5, "ab"), summary(2, 5, "cd"), summary(3, 5, "e")],
            summary(1, 6, "ab"),
        ),
        "the head of the list changed during the walk": (
            [summary(1, 5, "ab"), summary(2, 5, "cd"), summary(3, 5, "e")],
            summary(1, 5, "xa"),
        ),
        "1 runner(s) were seen twice": (
            [summary(1, 5, "ab"), summary(2, 5, "bc"), summary(3, 5, "d")],
            closing,
        ),
        "saw 4 distinct runners but total is 5": (
            [summary(1, 5, "ab"), summary(2, 5, "cd"), summary(3, 5, "")],
            closing,
        ),
        "pages before the last were not full: 2": (
            [summary(1, 5, "ab"), summary(2, 5, "c"), summary(3, 5, "de")],
            closing,
        ),
        "page 1 was not re-read at the end": (
            [summary(1, 5, "ab"), summary(2, 5, "cd"), summary(3, 5, "e")],
            None,
        ),
        "the listing ended short of its total: 3 runners on 2 of the 3 pages that total 5 needs": (
            [summary(1, 5, "ab"), summary(2, 5, "c")],
            closing,
        ),
        "stopped at page 2 of the 3 that total 5 needs": (
            [summary(1, 5, "ab"), summary(2, 5, "cd")],
            closing,
        ),
        "page 2 brought no runner not already seen (the listing repeats itself)": (
            [summary(1, 5, "ab"), summary(2, 5, "ba"), summary(3, 5, "e")],
            closing,
        ),
        "read pages 1, 3 of the 3 that total 5 needs": (
            [summary(1, 5, "ab"), summary(3, 5, "e")],
            closing,
        ),
    }
    for reason, (pages, closing_page) in cases.items():
        verdict = judge_walk(pages, closing_page, per_page=2)
        assert not verdict.complete, reason
        assert reason in verdict.reasons, (reason, verdict.reasons)


class RepeatsPageOne:
    """An API that ignores `page`: the walk must end, incomplete, never loop."""

    def __init__(self, total: int = 1000) -> None:
        self.calls = 0
        self.total = total

    async def fetch_page(self, number: int, per_page: int) -> Page:
        self.calls += 1
        return Page(number, per_page, [{"id": f"r{i}"} for i in range(per_page)], self.total)


@pytest.mark.parametrize("total", [1000, 10**6, 10**11, 2**63 - 1])
def test_an_api_that_ignores_page_ends_at_the_first_page_that_brings_nothing_new(total):
    api = RepeatsPageOne(total)
    result = asyncio.run(
        walk_all_pages(api, per_page=100, concurrency=4, max_walks=2, on_page=lambda p, w: None)
    )
    assert not result.complete
    assert any("brought no runner not already seen" in reason for reason in result.reasons)
    # Per walk: page 1, the pages in flight when page 2 came back a repeat, the closing re-read.
    assert api.calls <= result.walks * (1 + 4 + 1)


class LyingTotal:
    """Claims ``total`` runners but has ``real``: the walk stops at the first short page."""

    def __init__(self, total: int = 1_000_000, real: int = 3) -> None:
        self.calls = 0
        self.total = total
        self.real = real

    async def fetch_page(self, number: int, per_page: int) -> Page:
        self.calls += 1
        first = (number - 1) * per_page
        ids = range(first, min(first + per_page, self.real))
        return Page(number, per_page, [{"id": f"r{i}"} for i in ids], total=self.total)


HOSTILE_TOTALS = [10**6, 10**9, 10**11, 2**63 - 1]


@pytest.mark.parametrize("total", HOSTILE_TOTALS)
@pytest.mark.parametrize("real", [0, 3, 100, 250])
def test_a_lying_total_ends_the_walk_at_the_first_short_page(total, real):
    api = LyingTotal(total, real)
    started = time.monotonic()
    result = asyncio.run(
        walk_all_pages(api, per_page=100, concurrency=2, max_walks=3, on_page=lambda p, w: None)
    )
    assert time.monotonic() - started < 2
    assert not result.complete and result.total_reported == total
    assert any(r.startswith("the listing ended short of its total") for r in result.reasons)
    # Per walk: the pages with runners, the first short one, the one in flight beside it, and
    # the closing re-read. A total no walk can reach is not walked again.
    assert api.calls <= result.walks * (real // 100 + 1 + 1 + 1)
    assert result.walks == (3 if total <= MAX_RUNNERS_PER_WALK else 1)


class EndlessNewRunners:
    """Full pages of runners never seen before, for as long as anyone asks."""

    def __init__(self, total: int) -> None:
        self.calls = 0
        self.total = total
        self.ids = itertools.count()

    async def fetch_page(self, number: int, per_page: int) -> Page:
        self.calls += 1
        runners = [{"id": f"r{next(self.ids)}"} for _ in range(per_page)]
        return Page(number, per_page, runners, total=self.total)


@pytest.mark.parametrize("total", [10**11, 2**63 - 1])
def test_endless_full_pages_of_new_runners_end_at_the_walks_runner_limit(total):
    api = EndlessNewRunners(total)
    result = asyncio.run(
        walk_all_pages(
            api,
            per_page=10,
            concurrency=3,
            max_walks=3,
            max_runners=1000,
            on_page=lambda p, w: None,
        )
    )
    assert not result.complete and result.walks == 1
    assert any("the most one walk reads" in reason for reason in result.reasons)
    assert api.calls <= 1000 // 10 + 1  # the pages the limit allows, and the closing re-read


class DamagedMiddlePages(LyingTotal):
    """An honest listing whose pages 2 and 3 hold only records without a usable id."""

    async def fetch_page(self, number: int, per_page: int) -> Page:
        page = await super().fetch_page(number, per_page)
        if number in (2, 3):
            return Page(number, per_page, [{"name": "no id"}] * len(page.runners), page.total)
        return page


def test_pages_of_records_without_ids_are_damage_not_a_repeat_and_the_walk_reads_on():
    api = DamagedMiddlePages(total=50, real=50)
    pages: list[int] = []
    result = asyncio.run(
        walk_all_pages(
            api,
            per_page=10,
            concurrency=1,
            max_walks=1,
            on_page=lambda p, w: pages.append(p.number),
        )
    )
    assert pages == [1, 2, 3, 4, 5] and api.calls == 5 + 1  # and the closing re-read
    assert not any("repeats itself" in reason for reason in result.reasons)


def test_the_walks_runner_limit_leaves_a_listing_within_it_complete():
    api = LyingTotal(total=1000, real=1000)
    result = asyncio.run(
        walk_all_pages(
            api,
            per_page=10,
            concurrency=3,
            max_walks=1,
            max_runners=1000,
            on_page=lambda p, w: None,
        )
    )
    assert result.complete and api.calls == 100 + 1


def shapes_received(total: int) -> dict[str, list[PageSummary]]:
    """What a walk can hold when an upstream claims ``total``: a few pages, never more."""
    return {
        "page 1 empty": [summary(1, total, "")],
        "page 1 short": [summary(1, total, "ab")],
        "page 2 empty": [summary(1, total, "abc"), summary(2, total, "")],
        "page 2 short": [summary(1, total, "abc"), summary(2, total, "d")],
    }


@pytest.mark.parametrize("total", HOSTILE_TOTALS)
@pytest.mark.parametrize("shape", ["page 1 empty", "page 1 short", "page 2 empty", "page 2 short"])
def test_judging_a_walk_costs_what_was_received_whatever_the_total_claims(total, shape):
    pages = shapes_received(total)[shape]
    tracemalloc.start()
    try:
        started = time.monotonic()
        verdict = judge_walk(pages, pages[0], per_page=3)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not verdict.complete
    assert verdict.reasons[0].startswith("the listing ended short of its total"), verdict.reasons
    assert str(total) in verdict.reasons[0]
    assert peak < 64 * 1024 and elapsed < 0.5


def test_the_walk_never_has_more_requests_in_flight_than_its_concurrency():
    account = SimulatedAccount(runners=2_000, seed=9, token=None)
    in_flight = peak = 0

    class Counting(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.ASGITransport(app=create_app(account))

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await asyncio.sleep(0.002)
                return await self.inner.handle_async_request(request)
            finally:
                in_flight -= 1

    async def walk() -> bool:
        async with ComfyControlClient(
            base_url="http://sim", token=None, concurrency=3, transport=Counting()
        ) as client:
            result = await walk_all_pages(
                client, per_page=50, concurrency=3, max_walks=1, on_page=lambda p, w: None
            )
        return result.complete

    assert asyncio.run(walk())
    assert peak == 3


#: Scripted runners are created a minute apart, "a" the oldest: the list shows them newest first.
def created_at(runner_id: str) -> str:
    return f"2026-01-01T00:{ord(runner_id[0]) - ord('a'):02d}:00Z"


class ScriptedList:
    """A list that shows one fixed picture per walk, then one for the re-reads after it."""

    def __init__(self, *pictures: list[str]) -> None:
        self.pictures = pictures
        self.walk = 0
        self.page_one_reads = 0
        self.reads: list[tuple[int, int]] = []

    def picture(self) -> list[str]:
        return self.pictures[min(self.walk, len(self.pictures)) - 1]

    async def fetch_page(self, number: int, per_page: int) -> Page:
        self.reads.append((number, per_page))
        if number == 1 and per_page == 2:
            self.page_one_reads += 1
            self.walk = (self.page_one_reads + 1) // 2
        ids = sorted(self.picture(), key=created_at, reverse=True)
        chunk = ids[(number - 1) * per_page : number * per_page]
        runners = [{"id": i, "created_at": created_at(i)} for i in chunk]
        return Page(number, per_page, runners, total=len(ids))


def walk_scripted(api: ScriptedList, stored: str, max_walks: int = 3):
    """Walk ``api`` for a store holding the runners named in ``stored``."""
    asked: list[int] = []
    seen: dict[int, set[str]] = {}

    def on_page(page: Page, walk: int) -> None:
        seen.setdefault(walk, set()).update(runner["id"] for runner in page.runners)

    def missing_after(walk_number: int) -> dict[str, str]:
        asked.append(walk_number)
        return {i: created_at(i) for i in set(stored) - seen.get(walk_number, set())}

    result = asyncio.run(
        walk_all_pages(
            api,
            per_page=2,
            concurrency=2,
            max_walks=max_walks,
            on_page=on_page,
            missing_after=missing_after,
        )
    )
    return result, asked


def test_a_runner_a_complete_walk_missed_is_deleted_only_when_a_re_read_proves_it_gone():
    still = list("abde")  # "c" is gone
    api = ScriptedList(still)
    result, asked = walk_scripted(api, stored="abcde")
    assert (result.complete, result.walks, asked) == (True, 1, [1])
    assert result.gone == {"c"}
    # Walk: pages 1-2 and the closing re-read of page 1; then one re-read around "c".
    assert len(api.reads) == 4 and result.pages_fetched == 3


def test_a_runner_found_on_its_re_read_is_kept():
    class BackForTheReRead(ScriptedList):
        async def fetch_page(self, number: int, per_page: int) -> Page:
            if len(self.reads) == 3:  # after the walk: "c" is back
                self.pictures = (list("abcde"),)
            return await super().fetch_page(number, per_page)

    result, _ = walk_scripted(BackForTheReRead(list("abde")), stored="abcde")
    assert (result.complete, result.gone) == (True, frozenset())  # so "c" stays present


def test_a_complete_walk_with_nothing_missing_reads_no_more_pages():
    api = ScriptedList(list("ab"))
    result, asked = walk_scripted(api, stored="ab")
    assert (result.complete, result.walks, asked, result.gone) == (True, 1, [1], frozenset())
    assert len(api.reads) == 2


def test_an_incomplete_walk_is_never_asked_what_it_would_delete():
    class MovesEveryWalk(ScriptedList):
        async def fetch_page(self, number: int, per_page: int) -> Page:
            page = await super().fetch_page(number, per_page)
            if number == 2:  # a runner arrives at the head mid-walk, every walk
                newest = chr(ord(max(self.picture())) + 1)
                self.pictures = ([*self.picture(), newest],)
            return page

    result, asked = walk_scripted(MovesEveryWalk(list("abc")), stored="abc", max_walks=2)
    assert (result.complete, result.walks, asked, result.gone) == (False, 2, [], frozenset())


@pytest.mark.parametrize(
    "created",
    [
        ["2024-01-02T00:00:00Z", "2024-01-01T00:00:00Z"],
        ["2024-01-02T00:00:00Z", "line\nbreak", None],
        ["", ""],
        [7, {"at": "now"}],
        [],
    ],
)
def test_a_page_summary_gives_back_each_created_at_as_sent(created):
    runners = [{"id": f"r{n}", "created_at": value} for n, value in enumerate(created)]
    page = Page(number=1, per_page=100, runners=runners, total=len(runners))
    assert list(PageSummary.of(page).created_at()) == created
