"""Prove that runners a complete walk missed are really gone, by re-reading only their pages.

A complete walk (``pipeline.source.walk``) proves itself against the changes the API makes on its
own, but not against one burst: a runner restored mid-list at the moment another one on an
already-read page is deleted slides a third runner across a page boundary, unseen, while the
total, the head and the id count all still agree. So no absence is trusted on the walk's word
alone. Each runner it would delete is looked for once more, on one page read at one instant.

The proof rests on the documented order (newest ``created_at`` first) and on a page being a
contiguous slice of that list at the instant it was served. If a page holds a runner strictly
newer than the missing one (or is page 1) and one strictly older (or ends the list), then had
the missing runner existed at that instant, it would have been on that page. It was not:
it was gone. A runner found on its page is not gone; one whose page did not bracket it (the
list moved again under the re-read, or runners share its ``created_at`` beyond a page) is not
proven gone, and is kept for the next sync to decide.

Why not a second full walk: that would double the cost of every sync that deletes
anything, where this reads one small page per missing runner. This module is the
pure part (where to look, what a page proves); ``pipeline.source.walk`` reads the pages.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipeline.settings import MAX_PER_PAGE
from pipeline.source.client import Page
from pipeline.times import utc_instant

#: Room wanted on each side of a missing runner's place, so runners arriving at the head
#: (or leaving above it) between the walk and the re-read do not push its brackets off
#: the page.
MARGIN = 10


@dataclass(frozen=True, slots=True)
class Recheck:
    """What the re-reads proved: which missing runners are gone; how many pages they read."""

    gone: frozenset[str]
    pages: int


def instant(value: Any) -> datetime | None:
    """An ISO 8601 timestamp as an instant (``pipeline.times.utc_instant``); None if not one."""
    if not isinstance(value, str):
        return None
    try:
        return utc_instant(value)
    except ValueError:
        return None


class _WalkOrder:
    """The created_at of every runner a complete walk saw, in walk order, parsed on demand."""

    def __init__(self, created: Sequence[Any]) -> None:
        self.created = created
        self._parsed: dict[int, datetime | None] = {}

    def __len__(self) -> int:
        return len(self.created)

    def at(self, index: int) -> datetime | None:
        if index not in self._parsed:
            self._parsed[index] = instant(self.created[index])
        return self._parsed[index]

    def count_newer(self, when: datetime, *, or_equal: bool) -> int | None:
        """How many leading runners are newer than ``when`` (or as new, with ``or_equal``).

        A binary search over the newest-first order; None if a timestamp on the way is not
        one (then no place can be trusted).
        """
        low, high = 0, len(self.created)
        while low < high:
            middle = (low + high) // 2
            seen = self.at(middle)
            if seen is None:
                return None
            if seen > when or (or_equal and seen == when):
                low = middle + 1
            else:
                high = middle
        return low


def choose_page(first: int, last: int, size: int) -> tuple[int, int] | None:
    """A small (per_page, page number) whose page covers walk positions ``first..last``.

    The page should leave ``MARGIN`` positions on either side (clipped to the list's ends),
    else none; it is the smallest page size that does (pages are aligned to multiples of
    their size, so that is not always the span itself). Small, because a re-read costs the
    API and the client per runner served. None when no accepted page size holds the span.
    """
    for margin in (MARGIN, 0):
        low = max(first - margin, 0)
        high = min(last + margin, max(size - 1, 0))
        for page_size in range(high - low + 1, MAX_PER_PAGE + 1):
            number = low // page_size + 1
            if high <= number * page_size - 1:
                return page_size, number
    return None


def plan_rechecks(
    missing: Mapping[str, Any], walk_created: Sequence[Any]
) -> tuple[dict[tuple[int, int], list[str]], set[str]]:
    """Which page to re-read for each missing runner, from where the walk placed its neighbours.

    ``missing`` maps each id to its stored ``created_at``; ``walk_created`` is the created_at
    of every runner the complete walk saw, in walk order. Returns the pages to read,
    ``(per_page, number) -> ids``, and the ids no page can be chosen for.
    """
    order = _WalkOrder(walk_created)
    pages: dict[tuple[int, int], list[str]] = {}
    unplaceable: set[str] = set()
    for runner_id, created_at in missing.items():
        when = instant(created_at)
        newer = order.count_newer(when, or_equal=False) if when else None
        newer_or_tied = order.count_newer(when, or_equal=True) if when else None
        if newer is None or newer_or_tied is None:
            unplaceable.add(runner_id)
            continue
        # It belongs after the runners newer than it and before the older ones: the page must
        # hold the last newer runner and the first older one (or an end of the list).
        first = max(newer - 1, 0)
        last = min(newer_or_tied, max(len(order) - 1, 0))
        choice = choose_page(first, last, len(order))
        if choice is None:
            unplaceable.add(runner_id)
        else:
            pages.setdefault(choice, []).append(runner_id)
    return pages, unplaceable


def _has_string_id(raw: dict[str, Any]) -> bool:
    return isinstance(raw.get("id"), str)


def judge_page(page: Page, missing: Mapping[str, Any]) -> tuple[set[str], set[str], set[str]]:
    """Split the runners looked for on ``page`` into (gone, found, unproven).

    Pure: the whole proof for one page. Nothing is proven gone from a page whose order is
    not newest-first (it is not the slice the proof assumes).
    """
    ids = {raw["id"] for raw in page.runners if isinstance(raw, dict) and _has_string_id(raw)}
    found = {runner_id for runner_id in missing if runner_id in ids}
    looked_for = [runner_id for runner_id in missing if runner_id not in found]
    parsed = [instant(raw.get("created_at")) if isinstance(raw, dict) else None
              for raw in page.runners]  # fmt: skip
    moments = [moment for moment in parsed if moment is not None]
    if len(moments) != len(parsed) or any(a < b for a, b in itertools.pairwise(moments)):
        return set(), found, set(looked_for)
    starts = page.number == 1
    ends = (page.number - 1) * page.per_page + len(page.runners) >= page.total
    newest, oldest = (moments[0], moments[-1]) if moments else (None, None)
    gone: set[str] = set()
    unproven: set[str] = set()
    for runner_id in looked_for:
        when = instant(missing[runner_id])
        if when is None:
            unproven.add(runner_id)
            continue
        newer = starts or (newest is not None and newest > when)
        older = ends or (oldest is not None and oldest < when)
        (gone if newer and older else unproven).add(runner_id)
    return gone, found, unproven
