"""Deletion guardrails: no mass deletion on one walk's word, no mirroring of another account."""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import pytest
from conftest import dump_except_run_log, rows

from pipeline.errors import ConfigurationError, ForeignAccountError
from pipeline.settings import Settings
from pipeline.store.meta import META_TABLE
from pipeline.store.schema import open_store
from pipeline.sync.guardrails import is_foreign_account, mass_deletion_reason
from pipeline.sync.run import run_sync

REMEDY = "no deletion was applied; if they really are gone, sync again with --allow-mass-delete"


@pytest.mark.parametrize(
    ("would_delete", "present", "seen", "max_ratio", "allowed", "expected"),
    [
        (0, 10, 10, 0.5, False, None),
        (5, 10, 5, 0.5, False, None),  # exactly the ratio is allowed: "more than" trips
        (6, 10, 4, 0.5, False, f"6 of the 10 present runners (60%) would be marked deleted, more than --max-delete-ratio 0.5 allows; {REMEDY}"),
        (6, 10, 4, 0.7, False, None),
        (6, 10, 4, 0.5, True, None),
        (1, 10, 9, 0.0, False, f"1 of the 10 present runners (10%) would be marked deleted, more than --max-delete-ratio 0 allows; {REMEDY}"),
        (10, 10, 0, 1.0, False, f"the API listed no runners at all but the store holds 10; {REMEDY}"),
        (10, 10, 0, 1.0, True, None),
        (0, 0, 0, 0.5, False, None),  # an empty listing against an empty store deletes nothing
    ],
)  # fmt: skip
def test_mass_deletion_reason(would_delete, present, seen, max_ratio, allowed, expected):
    assert (
        mass_deletion_reason(would_delete, present, seen, max_ratio=max_ratio, allowed=allowed)
        == expected
    )


@pytest.mark.parametrize(
    ("known", "seen", "foreign"),
    [
        (set(), {"b"}, False),  # a new database accepts any account
        ({"a"}, set(), False),  # an empty listing is the mass-deletion check's business
        ({"a"}, {"a"}, False),
        ({"a"}, {"a", "b"}, False),  # one known owner among them is enough
        ({"a", "c"}, {"b"}, True),
        ({"a"}, {"b", "c"}, True),
    ],
)
def test_is_foreign_account(known, seen, foreign):
    assert is_foreign_account(known, seen) is foreign


def test_a_mass_deletion_applies_creates_and_updates_but_no_deletion_and_says_why(
    serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=10, seed=21)
    account = upstream.account
    sync = ("sync", "--base-url", upstream.url, "--token", "test-token", "--db", "m.db")
    assert run_cli(*sync).exit_code == 0
    ids = account.runner_ids()
    for runner_id in ids[:6]:
        account.delete_runner(runner_id)
    account.rename_runner(ids[8], "renamed")
    account.create_runner(name="brand new")

    result = run_cli(*sync)

    warning = (
        "6 of the 10 present runners (60%) would be marked deleted, more than "
        f"--max-delete-ratio 0.5 allows; {REMEDY}"
    )
    assert result.exit_code == 0
    assert result.stderr == f"comfysync: WARNING: {warning}\n"
    assert result.stdout.startswith("sync 2 partial: 5 runners in 1 pages (1 walk(s), complete)")
    assert "created 1, updated 1, deleted 0, restored 0, unchanged 3, rejected 0" in result.stdout
    db = tmp_path / "m.db"
    assert rows(db, "SELECT status, complete, deleted, warnings FROM sync_runs WHERE id = 2") == [
        ("partial", 1, 0, f'["{warning}"]')
    ]
    assert rows(db, "SELECT count(*) FROM runners WHERE deleted_at IS NULL") == [(11,)]

    allowed = run_cli(*sync, "--allow-mass-delete")
    assert allowed.exit_code == 0 and allowed.stderr == ""
    assert "created 0, updated 0, deleted 6, restored 0, unchanged 5" in allowed.stdout
    assert rows(db, "SELECT status FROM sync_runs WHERE id = 3") == [("success",)]

    # The override lasted one run: the next mass deletion is withheld again.
    for runner_id in account.runner_ids()[:4]:
        account.delete_runner(runner_id)
    again = run_cli(*sync)
    assert "4 of the 5 present runners (80%) would be marked deleted" in again.stderr
    assert rows(db, "SELECT status, deleted FROM sync_runs WHERE id = 4") == [("partial", 0)]


def test_an_empty_listing_is_a_mass_deletion_whatever_the_ratio(serve_account, db_path):
    upstream = serve_account(runners=8, seed=22)
    settings = Settings(base_url=upstream.url, token="test-token", db_path=db_path)
    run_sync(settings)
    for runner_id in upstream.account.runner_ids():
        upstream.account.delete_runner(runner_id)

    empty = run_sync(replace(settings, max_delete_ratio=1.0))
    assert (empty.status, empty.complete, empty.total_reported, empty.deleted) == (
        "partial", True, 0, 0,
    )  # fmt: skip
    assert empty.warnings == (f"the API listed no runners at all but the store holds 8; {REMEDY}",)
    assert rows(db_path, "SELECT count(*) FROM runners WHERE deleted_at IS NULL") == [(8,)]

    confirmed = run_sync(replace(settings, allow_mass_delete=True))
    assert (confirmed.status, confirmed.deleted) == ("success", 8)


def test_a_token_for_another_account_is_refused_with_nothing_applied(
    serve_account, run_cli, tmp_path
):
    mine = serve_account(runners=12, seed=23)
    theirs = serve_account(runners=7, seed=24)
    assert mine.account.user_id != theirs.account.user_id
    assert (
        run_cli("sync", "--base-url", mine.url, "--token", "test-token", "--db", "m.db").exit_code
        == 0
    )
    db = tmp_path / "m.db"
    before = dump_except_run_log(db)

    result = run_cli("sync", "--base-url", theirs.url, "--token", "test-token", "--db", "m.db")

    message = (
        f"the API listed runners of owner {theirs.account.user_id}, but this database mirrors "
        f"the account of owner {mine.account.user_id}: the token is for another account; "
        "nothing was applied (check COMFYCONTROL_TOKEN, or pass a new --db to mirror that account)"
    )
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"comfysync: error: {message}\n"
    assert dump_except_run_log(db) == before
    assert rows(db, "SELECT status, error FROM sync_runs ORDER BY id") == [
        ("success", None),
        ("failed", message),
    ]
    # A new database mirrors any account.
    fresh = run_cli("sync", "--base-url", theirs.url, "--token", "test-token", "--db", "new.db")
    assert fresh.exit_code == 0
    assert rows(tmp_path / "new.db", "SELECT user_id, first_sync_id FROM account_owners") == [
        (theirs.account.user_id, 1)
    ]


def test_a_second_owner_beside_a_known_one_is_accepted_and_remembered(serve_account, db_path):
    upstream = serve_account(runners=5, seed=25)
    settings = Settings(base_url=upstream.url, token="test-token", db_path=db_path)
    run_sync(settings)
    upstream.account.create_runner(user_id="teammate-0001")
    assert run_sync(settings).created == 1
    assert rows(db_path, "SELECT user_id, first_sync_id FROM account_owners ORDER BY 2, 1") == [
        (upstream.account.user_id, 1),
        ("teammate-0001", 2),
    ]
    # Once every runner of the known owner is gone, the teammate's alone are still this account.
    for runner_id in upstream.account.runner_ids()[1:]:
        upstream.account.delete_runner(runner_id)
    assert run_sync(replace(settings, allow_mass_delete=True)).deleted == 5


def test_a_database_made_before_owners_were_remembered_learns_them_from_its_versions(
    serve_account, db_path
):
    mine = serve_account(runners=6, seed=26)
    run_sync(Settings(base_url=mine.url, token="test-token", db_path=db_path))
    # Turn it back into a schema-1 database: no owners table, m004 never applied.
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("DROP TABLE account_owners")
        conn.execute("DELETE FROM _sqlite_migrations WHERE name = 'm004_account_owners'")
        conn.execute(f"UPDATE {META_TABLE} SET value = '1' WHERE key = 'schema_version'")
    conn.close()

    open_store(db_path).close()

    assert rows(db_path, "SELECT user_id, first_sync_id FROM account_owners") == [
        (mine.account.user_id, 1)
    ]
    theirs = serve_account(runners=3, seed=27)
    with pytest.raises(ForeignAccountError):
        run_sync(Settings(base_url=theirs.url, token="test-token", db_path=db_path))


def test_the_ratio_must_be_a_share(run_cli):
    with pytest.raises(ConfigurationError, match="--max-delete-ratio must be between 0 and 1"):
        Settings(base_url="http://127.0.0.1:9", max_delete_ratio=1.5).validated()
    result = run_cli("sync", "--base-url", "http://127.0.0.1:9", "--max-delete-ratio", "1.5")
    assert result.exit_code == 2 and "--max-delete-ratio" in result.stderr
