"""Walk every page of the runner list and prove the walk saw a still picture.

The list is paged by number over a newest-first order, so a runner created mid-walk pushes
every older one down a place (one is seen twice) and a runner deleted mid-walk pulls them up
(one is never seen). An absence can only be trusted when the walk proves nothing moved. A walk
is **complete** when, and only when:

* every page reported the same ``total``;
* a closing re-read of page 1 shows the same ``total`` and the same ids in the same order;
* every page but the last was full;
* no id was seen twice;
* the number of distinct ids equals ``total``.

An incomplete walk is retried, up to ``max_walks`` times. Every walk ends: it requests at
most ceil(total / per_page) pages plus the closing re-read, stops early at a short page that
should have been full, and never takes an error response for an empty page (the client
raises instead). No more than ``concurrency`` requests are ever in flight.

**Absences.** These checks are a proof against the changes the API makes by itself (a new
runner goes to the head of the list; deletes and updates happen anywhere). They are not a
proof against a runner that reappears in the *middle* of the list (restored under its old
``created_at``) at the same moment as another runner on an already-read page is deleted:
the total, the head and the id count all still agree, and the runner that slid across the
page boundary is missed. So when a complete walk would delete runners (``missing_after``),
each is looked for once more on a page re-read for it (``pipeline.absence``), and the caller
deletes only what that proved gone (``WalkResult.gone``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import math
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.absence import Recheck, judge_page, plan_rechecks
from pipeline.client import Page


class PageFetcher(Protocol):
    async def fetch_page(self, number: int, per_page: int) -> Page: ...


@dataclass(frozen=True, slots=True)
class PageSummary:
    """What the completeness proof needs of a page: its number, ``total`` and ids in order
    (and, for placing a missing runner later, each runner's ``created_at`` as sent)."""

    number: int
    total: int
    ids: tuple[str | None, ...]
    created: tuple[Any, ...] = ()

    @classmethod
    def of(cls, page: Page) -> PageSummary:
        runners = page.runners
        try:  # the usual page: objects, read in one C-speed pass
            created = tuple([runner.get("created_at") for runner in runners])
        except AttributeError:  # an element that is not an object
            created = tuple(
                [runner.get("created_at") if type(runner) is dict else None for runner in runners]
            )
        return cls(
            number=page.number, total=page.total, ids=tuple(string_ids(runners)), created=created
        )


def string_ids(runners: list[Any]) -> list[str | None]:
    """Each runner's id, or None where it is not an object with a string id (a rejection)."""
    try:  # the usual page: objects with string ids, read in one C-speed pass
        ids = [runner.get("id") for runner in runners]
    except AttributeError:  # an element that is not an object
        ids = [runner.get("id") if type(runner) is dict else None for runner in runners]
    if all(type(runner_id) is str for runner_id in ids):
        return ids
    return [runner_id if type(runner_id) is str else None for runner_id in ids]


@dataclass(frozen=True, slots=True)
class WalkVerdict:
    """Whether a walk proved a still picture, and if not, every reason it did not."""

    complete: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WalkResult:
    """The outcome of walking the list up to ``max_walks`` times."""

    complete: bool
    walks: int
    #: List pages read over all walks and re-reads; the closing re-reads of page 1 are not
    #: counted.
    pages_fetched: int
    total_reported: int
    reasons: tuple[str, ...]
    #: Runners the complete walk missed that a re-read proved gone: the only ones that may
    #: be deleted (see the module docstring).
    gone: frozenset[str] = frozenset()
    #: Runners the complete walk missed that were not proven gone (found, or unproven).
    kept: frozenset[str] = frozenset()


def pages_needed(total: int, per_page: int) -> int:
    """Pages a list of ``total`` runners fills; page 1 is always read, even when empty."""
    return max(1, math.ceil(total / per_page))


def judge_walk(
    pages: Sequence[PageSummary], closing: PageSummary | None, *, per_page: int
) -> WalkVerdict:
    """Decide whether pages 1..n plus a closing re-read of page 1 form a still picture.

    Pure: the whole proof is here, over plain values, so it is tested without a server.
    """
    reasons: list[str] = []
    if not pages or pages[0].number != 1:
        return WalkVerdict(False, ("page 1 was not read",))
    total = pages[0].total
    expected = pages_needed(total, per_page)
    numbers = [page.number for page in pages]
    if numbers != list(range(1, expected + 1)):
        reasons.append(f"read pages {_ranges(numbers)} of the {expected} that total {total} needs")
    totals = {page.total for page in pages}
    if len(totals) > 1:
        reasons.append(f"pages reported different totals: {sorted(totals)}")
    if closing is None:
        reasons.append("page 1 was not re-read at the end")
    else:
        if closing.total != total:
            reasons.append(f"total moved from {total} to {closing.total} during the walk")
        if closing.ids != pages[0].ids:
            reasons.append("the head of the list changed during the walk")
    short = [page.number for page in pages[:-1] if len(page.ids) != per_page]
    if short:
        reasons.append(f"pages before the last were not full: {_ranges(short)}")
    sighted = list(itertools.chain.from_iterable(page.ids for page in pages))
    if None in sighted or "" in sighted:
        sighted = [runner_id for runner_id in sighted if runner_id]
    distinct = set(sighted)  # C-speed; counting only when some id came twice
    if len(distinct) != len(sighted):
        repeated = sum(1 for seen in Counter(sighted).values() if seen > 1)
        reasons.append(f"{repeated} runner(s) were seen twice")
    if len(distinct) != total:
        reasons.append(f"saw {len(distinct)} distinct runners but total is {total}")
    return WalkVerdict(not reasons, tuple(reasons))


def _ranges(numbers: Sequence[int]) -> str:
    shown = ", ".join(str(number) for number in numbers[:8])
    return shown + (", ..." if len(numbers) > 8 else "")


OnPage = Callable[[Page, int], None]
#: Asked after a complete walk (by number): the runners its picture would delete, each with
#: its stored ``created_at``.
MissingAfter = Callable[[int], Mapping[str, Any]]


async def walk_all_pages(
    client: PageFetcher,
    *,
    per_page: int,
    concurrency: int,
    max_walks: int,
    on_page: OnPage,
    missing_after: MissingAfter | None = None,
) -> WalkResult:
    """Walk the list until one walk is complete or ``max_walks`` walks were made.

    Every answered page is handed to ``on_page(page, walk_number)`` as it arrives, so the
    caller can parse and drop it (a 100,000-runner walk never holds all raw JSON at once).
    When a walk is complete and ``missing_after(walk_number)`` names runners it would delete,
    their pages are re-read (``pipeline.absence``) and the result says which are ``gone``.
    Errors from the client propagate: a walk that cannot read a page has no verdict.
    """
    pages_fetched = 0
    walk_number = 0
    while True:
        walk_number += 1
        summaries, closing, fetched = await _walk_once(
            client, per_page, concurrency, functools.partial(_hand_over, on_page, walk_number)
        )
        pages_fetched += fetched
        verdict = judge_walk(summaries, closing, per_page=per_page)
        if verdict.complete or walk_number >= max_walks:
            break
    result = WalkResult(
        complete=verdict.complete,
        walks=walk_number,
        pages_fetched=pages_fetched,
        total_reported=summaries[0].total,
        reasons=verdict.reasons,
    )
    missing = missing_after(walk_number) if verdict.complete and missing_after else {}
    if not missing:
        return result
    created = [moment for summary in summaries for moment in summary.created]
    recheck = await recheck_absences(client, missing, created, concurrency=concurrency)
    return dataclasses.replace(
        result,
        pages_fetched=pages_fetched + recheck.pages,
        gone=recheck.gone,
        kept=frozenset(missing) - recheck.gone,
    )


def _hand_over(on_page: OnPage, walk_number: int, page: Page) -> None:
    on_page(page, walk_number)


async def _walk_once(
    client: PageFetcher,
    per_page: int,
    concurrency: int,
    on_page: Callable[[Page], None],
) -> tuple[list[PageSummary], PageSummary | None, int]:
    first = await client.fetch_page(1, per_page)
    on_page(first)
    summaries = {1: PageSummary.of(first)}
    last = pages_needed(first.total, per_page)
    remaining: Iterator[int] = iter(range(2, last + 1))
    stopped = False

    async def worker() -> None:
        nonlocal stopped
        for number in remaining:
            if stopped:
                return
            page = await client.fetch_page(number, per_page)
            on_page(page)
            summaries[number] = PageSummary.of(page)
            if number < last and len(page.runners) < per_page:
                # The list shrank under us, or `total` lies: the walk is already incomplete,
                # and reading on could mean thousands of empty pages.
                stopped = True

    await _run_workers(worker, min(concurrency, last - 1))
    closing_page = await client.fetch_page(1, per_page)
    closing = PageSummary.of(closing_page)
    ordered = [summaries[number] for number in sorted(summaries)]
    return ordered, closing, len(summaries)


async def recheck_absences(
    client: PageFetcher,
    missing: Mapping[str, Any],
    walk_created: Sequence[Any],
    *,
    concurrency: int,
) -> Recheck:
    """Re-read the page ``pipeline.absence`` plans for each missing runner, and judge it."""
    planned, unproven = plan_rechecks(missing, walk_created)
    gone: set[str] = set()
    found: set[str] = set()
    queue = iter(planned.items())

    async def worker() -> None:
        for (page_size, number), ids in queue:
            page = await client.fetch_page(number, page_size)
            page_gone, page_found, page_unproven = judge_page(
                page, {runner_id: missing[runner_id] for runner_id in ids}
            )
            gone.update(page_gone)
            found.update(page_found)
            unproven.update(page_unproven)

    await _run_workers(worker, min(concurrency, len(planned)))
    return Recheck(frozenset(gone), frozenset(found), frozenset(unproven), len(planned))


async def _run_workers(worker: Callable[[], Coroutine[Any, Any, None]], count: int) -> None:
    """Run ``count`` copies of ``worker`` (at most that many requests in flight); when one
    fails, cancel the others and raise its error as it is (not wrapped in a group)."""
    workers = [asyncio.create_task(worker()) for _ in range(count)]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
