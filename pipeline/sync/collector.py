"""What one walk saw, gathered page by page as the pages arrive.

The collector parses only what may have changed (a page read byte for byte as the last
sync recorded it, or a runner whose raw fingerprint matches the stored one, is taken as
stored), hands new runners to the store's early writes while the walk goes on, and keeps,
per walk, which runners it saw and which it rejected: what ``run`` needs to decide.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Collection, Iterable, KeysView, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from pipeline.source.client import Page
from pipeline.source.records import (
    Rejection,
    RunnerRecord,
    fingerprinter,
    page_digester,
    parse_runner,
)
from pipeline.source.walk import (
    MAX_RUNNERS_PER_WALK,
    WalkResult,
    pages_needed,
    string_ids,
)

if TYPE_CHECKING:
    from pipeline.store.early import EarlyCreations

log = logging.getLogger(__name__)

#: Called after each page with (pages read, pages expected in this walk, runners seen).
ProgressCallback = Callable[[int, int, int], None]


@dataclass(frozen=True)
class Sightings:
    """What the walk saw, ready to compare with the store."""

    #: Runners parsed into records (new, changed, or sent differently than last time).
    parsed: dict[str, RunnerRecord]
    #: Present runners sent exactly as stored (matching raw fingerprint or page digest):
    #: not parsed at all.
    unchanged: set[str]
    rejections: list[Rejection]
    #: Digests of the pages the store will hold exactly as sent, for the next sync.
    pages: list[str]

    @property
    def count(self) -> int:
        return len(self.parsed) + len(self.unchanged)


class Collector:
    """Handles each page as it arrives; the latest sighting of a runner wins.

    A page whose digest the last sync recorded (``known_pages``) holds only runners stored
    exactly as sent: they are noted as seen and nothing else. On other pages, a runner whose
    raw fingerprint matches the stored one is only noted as seen; everything else is
    parsed, and a runner the store never held is handed to ``early`` to be written while
    the walk goes on (the final decision can still take it back).
    """

    def __init__(
        self,
        key: bytes,
        store_header_values: bool,
        fingerprints: Mapping[str, str | None],
        on_progress: ProgressCallback | None,
        early: EarlyCreations | None = None,
        deleted_ids: frozenset[str] = frozenset(),
        known_pages: Collection[str] = frozenset(),
    ):
        self.key = key
        self.store_header_values = store_header_values
        #: id -> stored raw fingerprint, for every present runner
        self.fingerprints = fingerprints
        self.fingerprint = fingerprinter(key, store_header_values)
        self.on_progress = on_progress
        #: Where runners the store never held go as soon as they are parsed; the stored
        #: runners it holds as deleted are not among those.
        self.early = early
        self.deleted_ids = deleted_ids
        #: id -> (walk number, record; None when the fingerprint showed it unchanged)
        self.records: dict[str, tuple[int, RunnerRecord | None]] = {}
        self.rejections: list[tuple[int, Rejection]] = []
        self.pages_in_walk = 0
        self.walk = 0
        self.known_pages = known_pages
        self.page_digest = page_digester(key, store_header_values)
        #: walk number -> (digests of its pages, runners sighted on them)
        self.pages_read: dict[int, tuple[list[str], int]] = {}

    @property
    def present(self) -> KeysView[str]:
        """The ids of every runner the store holds as present."""
        return self.fingerprints.keys()

    def __call__(self, page: Page, walk: int) -> None:
        if walk != self.walk:
            self.walk, self.pages_in_walk = walk, 0
        runners = page.runners
        ids = string_ids(runners)
        digest = self.page_digest(page.body)
        digests, sighted = self.pages_read.get(walk, ([], 0))
        digests.append(digest)
        self.pages_read[walk] = (digests, sighted + len(runners))
        if digest in self.known_pages and None not in ids:
            self._note_all_unchanged(cast(list[str], ids), walk)
            self._count_page(page)
            return
        fingerprints = list(map(self.fingerprint, runners))
        stored = self.fingerprints.get
        # Positions to parse: everything but a runner whose fingerprint matches the stored
        # one (a quiet page has none, and costs one pass over its ids).
        to_parse = [
            position
            for position, (runner_id, fingerprint) in enumerate(zip(ids, fingerprints, strict=True))
            if runner_id is None or not fingerprint or stored(runner_id) != fingerprint
        ]
        if not to_parse:  # so every id is a string
            self._note_all_unchanged(cast(list[str], ids), walk)
        elif len(set(ids)) < len(ids):  # an id twice on one page: the later sighting wins
            self._sight(page, walk, range(len(runners)), ids, fingerprints)
        else:
            parsing, unchanged = set(to_parse), (walk, None)
            self.records.update(
                (runner_id, unchanged)
                for position, runner_id in enumerate(ids)
                if position not in parsing and runner_id is not None
            )
            self._sight(page, walk, to_parse, ids, fingerprints)
        self._count_page(page)

    def _note_all_unchanged(self, ids: list[str], walk: int) -> None:
        """Every runner on the page sent exactly as stored: noted as seen, in one update."""
        self.records.update(zip(ids, itertools.repeat((walk, None))))

    def _count_page(self, page: Page) -> None:
        self.pages_in_walk += 1
        if self.on_progress is not None:
            # No more than a walk ever reads: a total of billions is no page count to show.
            expected = pages_needed(min(page.total, MAX_RUNNERS_PER_WALK), page.per_page)
            self.on_progress(self.pages_in_walk, expected, len(self.records))

    def _sight(
        self,
        page: Page,
        walk: int,
        positions: Iterable[int],
        ids: list[str | None],
        fingerprints: list[str | None],
    ) -> None:
        """Parse the runners at ``positions`` in order (an unchanged one is only noted)."""
        stored, records, unchanged = self.fingerprints, self.records, (walk, None)
        new: list[RunnerRecord] = []
        for position in positions:
            runner_id, fingerprint = ids[position], fingerprints[position]
            if runner_id is not None and fingerprint and stored.get(runner_id) == fingerprint:
                records[runner_id] = unchanged
                continue
            parsed = parse_runner(
                page.runners[position],
                page=page.number,
                position=position,
                redaction_key=self.key,
                store_header_values=self.store_header_values,
                fingerprint=fingerprint,
            )
            if isinstance(parsed, Rejection):
                self.rejections.append((walk, parsed))
                continue
            records[parsed.id] = (walk, parsed)
            if parsed.id not in stored and parsed.id not in self.deleted_ids:
                new.append(parsed)
        if self.early is not None:
            self.early.add(new)

    def seen_in(self, walk: int) -> set[str]:
        """Ids last seen in walk number ``walk`` (all of that walk's, while it is the latest)."""
        if walk == 1 == self.walk:  # a single walk: every sighting is its own (C-speed copy)
            return set(self.records)
        return {runner_id for runner_id, (n, _) in self.records.items() if n == walk}

    def rejected_in(self, walk: int) -> bool:
        return any(n == walk for n, _ in self.rejections)

    def pages_to_vouch_for(self, walk: WalkResult) -> list[str]:
        """Digests of the last walk's pages, if the store will hold each runner as they sent it.

        That is when the walk was complete, rejected nothing and saw every runner once: a
        runner sighted twice (the list moved under the walk) is stored as its later sighting,
        which the earlier page does not show.
        """
        digests, sighted = self.pages_read.get(walk.walks, ([], 0))
        if not walk.complete or self.rejected_in(walk.walks):
            return []
        return digests if sighted == len(self.seen_in(walk.walks)) else []

    def final(self, walk: WalkResult) -> Sightings:
        """What to apply: the last walk's sightings if it is complete, else all sightings."""
        last = walk.walks
        parsed: dict[str, RunnerRecord] = {}
        unchanged: set[str] = set()
        for runner_id, (n, record) in self.records.items():
            if walk.complete and n != last:
                continue
            if record is None:
                unchanged.add(runner_id)
            else:
                parsed[runner_id] = record
        return Sightings(
            parsed=parsed,
            unchanged=unchanged,
            rejections=[rej for n, rej in self.rejections if n == last],
            pages=self.pages_to_vouch_for(walk),
        )


class CollectorAfterRead:
    """The walk's page handler while the stored fingerprints are read aside.

    Pages that come before the read ends wait, in order; the collector is made, and handed
    them, by the first page after it or the first call of ``collector``.
    """

    def __init__(
        self,
        fingerprints: Future[dict[str, str | None]],
        make: Callable[[Mapping[str, str | None]], Collector],
    ):
        self._read, self._make = fingerprints, make
        self._waiting: list[tuple[Page, int]] = []
        self._collector: Collector | None = None

    def __call__(self, page: Page, walk: int) -> None:
        if self._collector is None and not self._read.done():
            self._waiting.append((page, walk))
        else:
            self.collector()(page, walk)

    def collector(self) -> Collector:
        """The collector, once the fingerprints are read and the waiting pages handed to it."""
        if self._collector is None:
            self._collector = collector = self._make(self._read.result())
            for page, walk in self._waiting:
                collector(page, walk)
            self._waiting.clear()
        return self._collector
