"""What one walk saw, gathered page by page as the pages arrive.

The collector parses only what may have changed (a page read byte for byte as the last
sync recorded it, or a runner whose raw fingerprint matches the stored one, is taken as
stored), hands new runners to the store's early writes while the walk goes on, and keeps,
per walk, which runners it saw and which it rejected: what ``run`` needs to decide.

Memory follows the runners' ids, not their records: a runner written early is only noted
(``WRITTEN``), and the stored fingerprints are read only once a page needs them, which a
walk of pages all known from the last sync never does.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

from pipeline.source.client import Page
from pipeline.source.records import (
    KNOWN_STATUSES,
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
#: id -> stored raw fingerprint of every present runner, or how to read it when first needed.
StoredFingerprints = Mapping[str, str | None] | Callable[[], Mapping[str, str | None]]
#: In place of a record: the runner was written early exactly as this sighting sent it.
WRITTEN: Final = "written early"


@dataclass(frozen=True)
class Sightings:
    """What the walk saw, ready to compare with the store."""

    #: Runners parsed into records (new, changed, or sent differently than last time).
    parsed: dict[str, RunnerRecord]
    #: Present runners sent exactly as stored (matching raw fingerprint or page digest):
    #: not parsed at all.
    unchanged: AbstractSet[str]
    rejections: list[Rejection]
    #: Digests of the pages the store will hold exactly as sent, for the next sync.
    pages: list[str]
    #: New runners already written early exactly as seen (``pipeline.store.early``).
    written: AbstractSet[str] = frozenset()
    #: The owners (``user_id``) of every runner parsed or written, in any walk.
    owners: frozenset[str] = frozenset()
    #: How many of ``written`` have a status other than active or disabled.
    unusual_written: int = 0

    @property
    def count(self) -> int:
        return len(self.parsed) + len(self.unchanged) + len(self.written)


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
        fingerprints: StoredFingerprints,
        on_progress: ProgressCallback | None,
        early: EarlyCreations | None = None,
        deleted_ids: frozenset[str] = frozenset(),
        known_pages: Collection[str] = frozenset(),
    ):
        self.key = key
        self.store_header_values = store_header_values
        self._fingerprints = fingerprints
        self.fingerprint = fingerprinter(key, store_header_values)
        self.on_progress = on_progress
        #: Where runners the store never held go as soon as they are parsed; the stored
        #: runners it holds as deleted are not among those.
        self.early = early
        self.deleted_ids = deleted_ids
        #: id -> (walk number, record; None when it is unchanged, WRITTEN when written early)
        self.records: dict[str, tuple[int, RunnerRecord | str | None]] = {}
        #: ids written early whose status is neither active nor disabled
        self.unusual_written: set[str] = set()
        #: the owners (``user_id``) of every runner parsed, in any walk
        self.owners: set[str] = set()
        self.rejections: list[tuple[int, Rejection]] = []
        self.pages_in_walk = 0
        self.walk = 0
        self.known_pages = known_pages
        self.page_digest = page_digester(key, store_header_values)
        #: walk number -> (digests of its pages, runners sighted on them, pages not known)
        self.pages_read: dict[int, tuple[list[str], int, int]] = {}

    @property
    def fingerprints(self) -> Mapping[str, str | None]:
        """id -> stored raw fingerprint of every present runner, read when first asked."""
        if callable(self._fingerprints):
            self._fingerprints = self._fingerprints()
        return self._fingerprints

    def saw_the_stored_fleet(self, walk: int) -> bool:
        """Whether ``walk`` read exactly the pages the last sync vouched for, and only them.

        Those pages hold exactly the runners the store holds as present (``decide`` vouches
        for pages only then), each as stored: such a walk missed no one and changed nothing,
        and the stored fingerprints need not be read to know it.
        """
        digests, _, unknown = self.pages_read.get(walk, ([], 0, 1))
        return unknown == 0 and len(set(digests)) == len(digests) == len(self.known_pages)

    def __call__(self, page: Page, walk: int) -> None:
        if walk != self.walk:
            self.walk, self.pages_in_walk = walk, 0
        runners = page.runners
        ids = string_ids(runners)
        digest = self.page_digest(page.body)
        digests, sighted, unknown = self.pages_read.get(walk, ([], 0, 0))
        digests.append(digest)
        known = digest in self.known_pages and None not in ids
        self.pages_read[walk] = (digests, sighted + len(runners), unknown + (not known))
        if known:
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
        stored, records = self.fingerprints, self.records
        written: Mapping[str, str] = self.early.written if self.early is not None else {}
        unchanged, as_written = (walk, None), (walk, WRITTEN)
        owners = self.owners
        new: list[RunnerRecord] = []
        for position in positions:
            runner_id, fingerprint = ids[position], fingerprints[position]
            if runner_id is not None and fingerprint:
                if stored.get(runner_id) == fingerprint:
                    records[runner_id] = unchanged
                    continue
                if written.get(runner_id) == fingerprint:
                    records[runner_id] = as_written
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
            owners.add(parsed.user_id)
            new_id = parsed.id
            if (
                self.early is not None
                and new_id not in stored
                and new_id not in self.deleted_ids
                and new_id not in written
                and parsed.fingerprint
            ):
                new.append(parsed)
                records[new_id] = as_written
                if parsed.status not in KNOWN_STATUSES:
                    self.unusual_written.add(new_id)
            else:  # stored, or seen again unlike its early write: settled at the apply
                records[new_id] = (walk, parsed)
        if new:
            assert self.early is not None
            self.early.add(new)

    def seen_in(self, walk: int) -> set[str]:
        """Ids last seen in walk number ``walk`` (all of that walk's, while it is the latest)."""
        if walk == 1 == self.walk:  # a single walk: every sighting is its own (C-speed copy)
            return set(self.records)
        return {runner_id for runner_id, (n, _) in self.records.items() if n == walk}

    def _count_seen_in(self, walk: int) -> int:
        if walk == 1 == self.walk:
            return len(self.records)
        return sum(1 for n, _ in self.records.values() if n == walk)

    def rejected_in(self, walk: int) -> bool:
        return any(n == walk for n, _ in self.rejections)

    def pages_to_vouch_for(self, walk: WalkResult) -> list[str]:
        """Digests of the last walk's pages, if the store will hold each runner as they sent it.

        That is when the walk was complete, rejected nothing and saw every runner once: a
        runner sighted twice (the list moved under the walk) is stored as its later sighting,
        which the earlier page does not show.
        """
        digests, sighted, _ = self.pages_read.get(walk.walks, ([], 0, 0))
        if not walk.complete or self.rejected_in(walk.walks):
            return []
        return digests if sighted == self._count_seen_in(walk.walks) else []

    def final(self, walk: WalkResult) -> Sightings:
        """What to apply: the last walk's sightings if it is complete, else all sightings."""
        last = walk.walks
        parsed: dict[str, RunnerRecord] = {}
        written: set[str] = set()
        unchanged: AbstractSet[str]
        if walk.complete and last == 1 and self.saw_the_stored_fleet(last):
            unchanged = self.records.keys()  # every runner on a known page: no copy needed
        else:
            unchanged = noted = set()
            for runner_id, (n, record) in self.records.items():
                if walk.complete and n != last:
                    continue
                if record is None:
                    noted.add(runner_id)
                elif record is WRITTEN:
                    written.add(runner_id)
                else:
                    parsed[runner_id] = cast(RunnerRecord, record)
        return Sightings(
            parsed=parsed,
            unchanged=unchanged,
            rejections=[rej for n, rej in self.rejections if n == last],
            pages=self.pages_to_vouch_for(walk),
            written=written,
            owners=frozenset(self.owners),
            unusual_written=len(self.unusual_written & written),
        )
