"""The completeness proof (pure) and the walk's bounds, over the simulator in process."""

from __future__ import annotations

import asyncio

import httpx

from pipeline.client import ComfyControlClient, Page
from pipeline.simulator import SimulatedAccount, create_app
from pipeline.walk import PageSummary, judge_walk, walk_all_pages


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
        "read pages 1, 2 of the 3 that total 5 needs": (
            [summary(1, 5, "ab"), summary(2, 5, "cd")],
            closing,
        ),
    }
    for reason, (pages, closing_page) in cases.items():
        verdict = judge_walk(pages, closing_page, per_page=2)
        assert not verdict.complete, reason
        assert reason in verdict.reasons, (reason, verdict.reasons)


class RepeatsPageOne:
    """An API that ignores `page`: the walk must end, incomplete, never loop."""

    def __init__(self) -> None:
        self.calls = 0

    async def fetch_page(self, number: int, per_page: int) -> Page:
        self.calls += 1
        return Page(number, per_page, [{"id": f"r{i}"} for i in range(per_page)], total=1000)


def test_an_api_that_ignores_page_ends_as_an_incomplete_walk():
    api = RepeatsPageOne()
    result = asyncio.run(
        walk_all_pages(api, per_page=100, concurrency=4, max_walks=2, on_page=lambda p, w: None)
    )
    assert not result.complete and result.walks == 2
    assert api.calls == 2 * (10 + 1)  # ceil(1000/100) pages + the closing re-read, per walk


class LyingTotal:
    """Claims a million runners but has 3: the walk stops at the first short page."""

    def __init__(self) -> None:
        self.calls = 0

    async def fetch_page(self, number: int, per_page: int) -> Page:
        self.calls += 1
        runners = [{"id": f"r{i}"} for i in range(3)] if number == 1 else []
        return Page(number, per_page, runners, total=1_000_000)


def test_a_lying_total_does_not_make_the_walk_read_ten_thousand_pages():
    api = LyingTotal()
    result = asyncio.run(
        walk_all_pages(api, per_page=100, concurrency=2, max_walks=1, on_page=lambda p, w: None)
    )
    assert not result.complete
    assert api.calls <= 1 + 2 + 1  # page 1, the pages in flight when the short one came, closing


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
    assert (result.gone, result.kept) == ({"c"}, frozenset())
    # Walk: pages 1-2 and the closing re-read of page 1; then one re-read around "c".
    assert len(api.reads) == 4 and result.pages_fetched == 3


def test_a_runner_found_on_its_re_read_is_kept():
    class BackForTheReRead(ScriptedList):
        async def fetch_page(self, number: int, per_page: int) -> Page:
            if len(self.reads) == 3:  # after the walk: "c" is back
                self.pictures = (list("abcde"),)
            return await super().fetch_page(number, per_page)

    result, _ = walk_scripted(BackForTheReRead(list("abde")), stored="abcde")
    assert (result.complete, result.gone, result.kept) == (True, frozenset(), {"c"})


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
