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

An incomplete walk is retried, up to ``max_walks`` times, unless its ``total`` is more than
any walk reads (below): then no walk could prove it, and one is enough.

**Every walk ends, and costs what it received, never what ``total`` claims.** ``total`` is
upstream text: 10**11 over empty pages must not size a list or a loop. So a walk:

* requests pages 2, 3, ... one number at a time (nothing is scheduled ahead), never past
  ceil(total / per_page) nor past ``max_runners`` runners (``MAX_RUNNERS_PER_WALK``);
* stops at the first page short of ``per_page`` before the last one (the listing ended or
  shrank: it is already incomplete, and reading on could mean billions of empty pages);
* stops at the first page that brings no runner id it has not already seen in this walk
  (the upstream ignores ``page`` or repeats itself: reading on brings nothing new).

Each page it keeps reading past page 1 therefore brought at least one new runner, so the
pages read (at most ``max_runners``, plus the ``concurrency`` in flight when it stopped,
plus the closing re-read) and the memory held grow only with runners actually received.
Stopping early only ever leaves a walk incomplete, which deletes nothing. The judgement
(``judge_walk``) is sized the same way: it compares the pages received with ``total``
arithmetically. The client never takes an error response for an empty page (it raises
instead). No more than ``concurrency`` requests are ever in flight.

**Absences.** These checks are a proof against the changes the API makes by itself (a new
runner goes to the head of the list; deletes and updates happen anywhere). They are not a
proof against a runner that reappears in the *middle* of the list (restored under its old
``created_at``) at the same moment as another runner on an already-read page is deleted:
the total, the head and the id count all still agree, and the runner that slid across the
page boundary is missed. So when a complete walk would delete runners (``missing_after``),
each is looked for once more on a page re-read for it (``pipeline.source.absence``), and the caller
deletes only what that proved gone (``WalkResult.gone``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.source.absence import Recheck, judge_page, plan_rechecks
from pipeline.source.client import Page

#: The most runner records one walk reads. A listing whose ``total`` is larger can never be
#: proven complete; the limit is what makes an upstream that serves new runners forever end.
MAX_RUNNERS_PER_WALK = 1_000_000


class PageFetcher(Protocol):
    async def fetch_page(self, number: int, per_page: int) -> Page: ...


@dataclass(frozen=True, slots=True)
class PageSummary:
    """What the completeness proof needs of a page: its number, ``total`` and ids in order
    (and, for placing a missing runner later, each runner's ``created_at`` as sent)."""

    number: int
    total: int
    ids: tuple[str | None, ...]
    #: The ``created_at`` values, one per line when each is a line of text (a walk holds one
    #: string per page rather than one per runner), else as they came.
    created: str | tuple[Any, ...] = ()

    @classmethod
    def of(cls, page: Page) -> PageSummary:
        runners = page.runners
        try:  # the usual page: objects, read in one C-speed pass
            created = [runner.get("created_at") for runner in runners]
        except AttributeError:  # an element that is not an object
            created = [
                runner.get("created_at") if type(runner) is dict else None for runner in runners
            ]
        return cls(
            number=page.number,
            total=page.total,
            ids=tuple(string_ids(runners)),
            created=_compact(created),
        )

    def created_at(self) -> Sequence[Any]:
        """Each runner's ``created_at`` as sent, in page order."""
        if isinstance(self.created, str):
            return self.created.split("\n")
        return self.created


def _compact(values: list[Any]) -> str | tuple[Any, ...]:
    if values and all(type(value) is str for value in values):
        joined = "\n".join(values)
        if joined.count("\n") == len(values) - 1:
            return joined
    return tuple(values)


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


def pages_needed(total: int, per_page: int) -> int:
    """Pages a list of ``total`` runners fills; page 1 is always read, even when empty.

    Integer arithmetic: exact for any ``total``, however large.
    """
    return max(1, -(-total // per_page))


def judge_walk(
    pages: Sequence[PageSummary],
    closing: PageSummary | None,
    *,
    per_page: int,
    max_runners: int = MAX_RUNNERS_PER_WALK,
) -> WalkVerdict:
    """Decide whether pages 1..n plus a closing re-read of page 1 form a still picture.

    Pure: the whole proof is here, over plain values, so it is tested without a server. Its
    cost follows the pages received, never ``total`` (see the module docstring).
    """
    reasons: list[str] = []
    if not pages or pages[0].number != 1:
        return WalkVerdict(False, ("page 1 was not read",))
    total = pages[0].total
    expected = pages_needed(total, per_page)
    numbers = [page.number for page in pages]
    received = sum(len(page.ids) for page in pages)
    if any(number != position for position, number in enumerate(numbers, 1)):
        reasons.append(f"read pages {_ranges(numbers)} of the {expected} that total {total} needs")
    elif len(pages) < expected:
        if len(pages[-1].ids) < per_page:
            reasons.append(
                f"the listing ended short of its total: {received} runners on {len(pages)} "
                f"of the {expected} pages that total {total} needs"
            )
        elif received >= max_runners:
            reasons.append(
                f"stopped after {received} runners, the most one walk reads, short of the "
                f"{total} that total claims"
            )
        else:
            reasons.append(
                f"stopped at page {len(pages)} of the {expected} that total {total} needs"
            )
    elif len(pages) > expected:
        reasons.append(f"read {len(pages)} pages where total {total} needs {expected}")
    # One set of every id seen answers the repeat, the duplicates and the distinct count.
    seen: set[str | None] = set()
    repeat = None
    for page in pages:
        if _brings_nothing_new(page.ids, seen) and repeat is None:
            repeat = page.number
    seen.discard(None)
    seen.discard("")
    if repeat is not None:
        reasons.append(
            f"page {repeat} brought no runner not already seen (the listing repeats itself)"
        )
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
    sighted = sum(len(page.ids) - page.ids.count(None) - page.ids.count("") for page in pages)
    if len(seen) != sighted:  # counted one by one only when some id came twice
        ids = itertools.chain.from_iterable(page.ids for page in pages)
        repeated = sum(1 for count in Counter(i for i in ids if i).values() if count > 1)
        reasons.append(f"{repeated} runner(s) were seen twice")
    if len(seen) != total:
        reasons.append(f"saw {len(seen)} distinct runners but total is {total}")
    return WalkVerdict(not reasons, tuple(reasons))


def _brings_nothing_new(ids: Sequence[str | None], seen: set[str | None]) -> bool:
    """Add ``ids`` to ``seen``; True when the page had runner ids and none was new.

    A page without one usable id (every record rejected) is not counted as a repeat: that is
    a damaged page, not a loop, and ``MAX_RUNNERS_PER_WALK`` bounds a stream of them.
    """
    before = len(seen)
    seen.update(ids)
    return len(seen) == before and any(ids)


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
    max_runners: int = MAX_RUNNERS_PER_WALK,
) -> WalkResult:
    """Walk the list until one walk is complete or ``max_walks`` walks were made.

    Every answered page is handed to ``on_page(page, walk_number)`` as it arrives, so the
    caller can parse and drop it (a large walk never holds all its raw JSON at once).
    When a walk is complete and ``missing_after(walk_number)`` names runners it would delete,
    their pages are re-read (``pipeline.source.absence``) and the result says which are ``gone``.
    Errors from the client propagate: a walk that cannot read a page has no verdict. Each
    walk reads at most ``max_runners`` runners (see the module docstring).
    """
    pages_fetched = 0
    walk_number = 0
    while True:
        walk_number += 1
        summaries, closing, fetched = await _walk_once(
            client,
            per_page,
            concurrency,
            functools.partial(_hand_over, on_page, walk_number),
            max_runners,
        )
        pages_fetched += fetched
        verdict = judge_walk(summaries, closing, per_page=per_page, max_runners=max_runners)
        # A total beyond what a walk reads cannot be proven by another walk either.
        unreachable = summaries[0].total > max_runners
        if verdict.complete or walk_number >= max_walks or unreachable:
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
    created = [moment for summary in summaries for moment in summary.created_at()]
    recheck = await recheck_absences(client, missing, created, concurrency=concurrency)
    return dataclasses.replace(
        result,
        pages_fetched=pages_fetched + recheck.pages,
        gone=recheck.gone,
    )


def _hand_over(on_page: OnPage, walk_number: int, page: Page) -> None:
    on_page(page, walk_number)


async def _walk_once(
    client: PageFetcher,
    per_page: int,
    concurrency: int,
    on_page: Callable[[Page], None],
    max_runners: int,
) -> tuple[list[PageSummary], PageSummary | None, int]:
    """One walk: page 1, then the rest until a stop rule of the module docstring holds."""
    first = await client.fetch_page(1, per_page)
    on_page(first)
    summaries = {1: PageSummary.of(first)}
    seen: set[str | None] = set(summaries[1].ids)
    received = len(first.runners)
    last = min(pages_needed(first.total, per_page), pages_needed(max_runners, per_page))
    # A short page 1 is the whole listing: there is nothing after it to read.
    stopped = last == 1 or len(first.runners) < per_page
    remaining: Iterator[int] = itertools.count(2)  # lazily: nothing is scheduled ahead

    async def worker() -> None:
        nonlocal stopped, received
        for number in remaining:
            if stopped or number > last:
                return
            page = await client.fetch_page(number, per_page)
            on_page(page)
            summary = summaries[number] = PageSummary.of(page)
            received += len(page.runners)
            if (
                (number < last and len(page.runners) < per_page)  # the listing ended early
                or _brings_nothing_new(summary.ids, seen)  # the upstream repeats itself
                or received >= max_runners
            ):
                stopped = True

    if not stopped:
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
    """Re-read the page ``pipeline.source.absence`` plans for each missing runner, and judge it."""
    planned, _ = plan_rechecks(missing, walk_created)
    gone: set[str] = set()
    queue = iter(planned.items())

    async def worker() -> None:
        for (page_size, number), ids in queue:
            page = await client.fetch_page(number, page_size)
            page_gone, _, _ = judge_page(page, {runner_id: missing[runner_id] for runner_id in ids})
            gone.update(page_gone)

    await _run_workers(worker, min(concurrency, len(planned)))
    return Recheck(frozenset(gone), len(planned))


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
