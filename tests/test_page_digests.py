"""Page digests: a page read byte for byte as the last sync recorded it is not read runner by
runner, and a sync records digests only for pages the store now holds exactly as sent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import rows, settings_for

import pipeline.sync.collector
from pipeline.errors import UpstreamError
from pipeline.source.client import Page
from pipeline.source.records import fingerprinter, page_digester
from pipeline.source.walk import WalkResult
from pipeline.sync.collector import Collector
from pipeline.sync.run import run_sync

RUNNERS = 250  # pages of 100, 100 and 50


@pytest.fixture
def fingerprinted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many runners each sync fingerprints (one entry per sync)."""
    counts: list[int] = []
    real = pipeline.sync.collector.fingerprinter

    def counting(key: bytes, mode: bool = False) -> Callable[[Any], str | None]:
        fingerprint = real(key, mode)
        counts.append(0)

        def counted(raw: Any) -> str | None:
            counts[-1] += 1
            return fingerprint(raw)

        return counted

    monkeypatch.setattr(pipeline.sync.collector, "fingerprinter", counting)
    return counts


def digests(db_path: Path) -> list[tuple[object, ...]]:
    return rows(db_path, "SELECT digest, sync_id FROM page_digests ORDER BY digest")


def test_a_quiet_sync_reads_no_runner_one_by_one(serve_account, db_path, fingerprinted):
    upstream = serve_account(runners=RUNNERS, seed=21)
    settings = settings_for(upstream, db_path)
    run_sync(settings)
    assert fingerprinted == [RUNNERS]
    assert {sync_id for _, sync_id in digests(db_path)} == {1} and len(digests(db_path)) == 3

    quiet = run_sync(settings)

    assert (quiet.unchanged, quiet.updated, quiet.created, quiet.deleted) == (RUNNERS, 0, 0, 0)
    assert fingerprinted == [RUNNERS, 0]
    assert {sync_id for _, sync_id in digests(db_path)} == {2} and len(digests(db_path)) == 3


def test_only_the_pages_that_changed_are_read_runner_by_runner(
    serve_account, db_path, fingerprinted
):
    upstream = serve_account(runners=RUNNERS, seed=22)
    account = upstream.account
    settings = settings_for(upstream, db_path)
    run_sync(settings)
    ids = account.runner_ids()  # newest first, as listed

    account.rename_runner(ids[150], "renamed")  # on page 2
    renamed = run_sync(settings)
    assert (renamed.updated, renamed.unchanged) == (1, RUNNERS - 1)
    assert fingerprinted[-1] == 100
    [(name,)] = rows(db_path, "SELECT name FROM runners WHERE id = ?", (ids[150],))
    assert name == "renamed"

    # A deletion changes every page's `total`: every runner is read one by one again.
    account.delete_runner(ids[-1])
    deleted = run_sync(settings)
    assert (deleted.deleted, deleted.unchanged) == (1, RUNNERS - 1)
    assert fingerprinted[-1] == RUNNERS - 1


@pytest.mark.parametrize(
    "fault",
    [
        ("missing_id", {"page": 2}),  # a rejected record
        ("duplicate", {"page": 2}),  # a record sent twice: the walk is not complete
    ],
)
def test_a_walk_that_cannot_vouch_for_its_pages_records_none(
    serve_account, db_path, fingerprinted, fault
):
    upstream = serve_account(runners=RUNNERS, seed=23)
    settings = settings_for(upstream, db_path, max_walks=1)
    run_sync(settings)
    name, options = fault
    upstream.account.faults.once(name, **options)

    run_sync(settings)
    assert digests(db_path) == []

    again = run_sync(settings)  # nothing vouched for: every runner read again
    assert again.unchanged == RUNNERS and fingerprinted[-1] == RUNNERS
    assert len(digests(db_path)) == 3


def test_a_failed_sync_leaves_the_digests_as_they_were(serve_account, db_path):
    upstream = serve_account(runners=RUNNERS, seed=24)
    settings = settings_for(upstream, db_path, max_retries=1)
    run_sync(settings)
    before = digests(db_path)
    upstream.account.create_runner(name="never applied")
    upstream.account.faults.fail_always(503)

    with pytest.raises(UpstreamError):
        run_sync(settings)

    assert digests(db_path) == before


def test_a_known_page_is_taken_as_stored_without_fingerprints():
    key = b"k" * 32
    runners = [{"id": "r1", "name": "new"}, {"id": "r2"}]
    body = b'{"runners":[{"id":"r1","name":"new"},{"id":"r2"}],"total":2}'
    page = Page(number=1, per_page=100, runners=runners, total=2, body=body)
    known = Collector(key, False, {}, None, known_pages={page_digester(key)(body)})
    known(page, 1)
    assert known.records == {"r1": (1, None), "r2": (1, None)}

    unknown = Collector(key, False, {}, None, known_pages={page_digester(key)(body + b" ")})
    unknown(page, 1)
    assert all(record is not None for _, record in unknown.records.values())


def test_page_digests_are_bound_to_the_key_and_the_redaction_mode():
    body = b'{"runners":[],"total":0}'
    redacted, clear = page_digester(b"a" * 32)(body), page_digester(b"a" * 32, True)(body)
    assert len({redacted, clear, page_digester(b"b" * 32)(body)}) == 3
    # Nor can a page digest be mistaken for a runner's fingerprint.
    assert redacted != fingerprinter(b"a" * 32)({"runners": [], "total": 0})


def runner(runner_id: str, name: str = "a") -> dict[str, Any]:
    return {
        "id": runner_id, "user_id": "u1", "name": name, "status": "active",
        "endpoint": "https://example.com", "tags": [], "headers": {},
        "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z",
    }  # fmt: skip


def test_a_complete_walk_that_saw_a_runner_twice_vouches_for_no_page():
    key = b"k" * 32
    collector = Collector(key, False, {}, None)
    first = [runner("r1"), runner("r2")]
    second = [runner("r2", name="moved and changed"), runner("r3")]
    for number, runners in ((1, first), (2, second)):
        collector(Page(number, 2, runners, 3, body=repr(runners).encode()), 1)
    walk = WalkResult(complete=True, walks=1, pages_fetched=2, total_reported=3, reasons=())
    assert collector.pages_to_vouch_for(walk) == []

    once = Collector(key, False, {}, None)
    once(Page(1, 2, first, 3, body=b"1"), 1)
    once(Page(2, 2, [runner("r3")], 3, body=b"2"), 1)
    vouched = once.pages_to_vouch_for(walk)
    assert vouched == [page_digester(key)(b"1"), page_digester(key)(b"2")]
    incomplete = WalkResult(complete=False, walks=1, pages_fetched=2, total_reported=3, reasons=())
    assert once.pages_to_vouch_for(incomplete) == []


@pytest.mark.parametrize("key", [b"k" * 32, b"x" * 100, b"", bytes(range(64))])
def test_a_page_digest_is_hmac_sha256_of_the_mode_and_the_body(key: bytes) -> None:
    import hashlib
    import hmac

    body = b'{"runners":[],"total":0}'
    for clear, mode in ((False, b"redacted"), (True, b"clear")):
        message = b"comfysync page, headers " + mode + b"\n" + body
        expected = hmac.new(key, message, hashlib.sha256).hexdigest()
        assert page_digester(key, clear)(body) == expected


def test_a_sync_that_withholds_deletions_vouches_for_no_page(serve_account, db_path, fingerprinted):
    # Vouched pages must hold exactly the runners left present: were these ten kept present
    # behind pages vouched for, the next walk of the same pages would never miss them.
    upstream = serve_account(runners=RUNNERS, seed=25)
    settings = settings_for(upstream, db_path, max_delete_ratio=0.01)
    run_sync(settings)
    for runner_id in upstream.account.runner_ids()[-10:]:
        upstream.account.delete_runner(runner_id)

    withheld = run_sync(settings)
    assert (withheld.status, withheld.deleted) == ("partial", 0)
    assert digests(db_path) == []

    again = run_sync(settings)  # the same pages as before: the ten are still missing
    assert (again.status, again.deleted, fingerprinted[-1]) == ("partial", 0, RUNNERS - 10)
    assert any("mass" in warning or "NOT" in warning for warning in again.warnings)
    assert digests(db_path) == []
