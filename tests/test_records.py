"""Validation, redaction and hashing of runner records: pure functions, no server, no database."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.source.records import (
    Rejection,
    RunnerRecord,
    _describe_problem,
    _looks_valid,
    parse_runner,
    redact_endpoint,
    redact_headers,
    redact_value,
)

KEY = bytes(32)
REFERENCE_RUNNER = {
    "id": "550e8400-e29b-41d4-a716-446655440000",
    "user_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
    "name": "Production GPU Runner",
    "status": "active",
    "endpoint": "https://my-comfy.example.com",
    "tags": ["production", "gpu-a100"],
    "headers": {"Authorization": "Bearer secret_token"},
    "created_at": "2024-01-15T10:30:00Z",
    "updated_at": "2024-01-15T10:30:00Z",
}


def parse(raw: object, **options: object) -> RunnerRecord | Rejection:
    return parse_runner(raw, page=2, position=5, redaction_key=KEY, **options)  # type: ignore[arg-type]


def test_the_reference_example_parses_with_its_header_redacted():
    record = parse(REFERENCE_RUNNER)
    assert isinstance(record, RunnerRecord)
    assert record.fields() == {
        "user_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        "name": "Production GPU Runner",
        "status": "active",
        "endpoint": "https://my-comfy.example.com",
        "tags": '["production","gpu-a100"]',
        "headers": json.dumps(
            {"Authorization": redact_value("Bearer secret_token", KEY)}, separators=(",", ":")
        ),
        "created_at": "2024-01-15T10:30:00Z",
        "updated_at": "2024-01-15T10:30:00Z",
        "extra": "{}",
    }
    assert "secret_token" not in repr(record)


def test_redaction_is_a_stable_keyed_digest_that_shows_rotation():
    first = redact_value("Bearer one", KEY)
    assert first == redact_value("Bearer one", KEY)
    assert first != redact_value("Bearer two", KEY)
    assert first != redact_value("Bearer one", b"another key")
    assert first.startswith("redacted:") and len(first) == len("redacted:") + 12
    assert redact_headers({"X-Api-Key": "k"}, KEY) == {"X-Api-Key": redact_value("k", KEY)}


def test_endpoint_credentials_are_redacted_and_the_rest_kept():
    redacted = redact_endpoint("https://bob:hunter2@gpu.example.com:8443/comfy?x=1", KEY)
    assert redacted == (
        f"https://{redact_value('bob:hunter2', KEY)}@gpu.example.com:8443/comfy?x=1"
    )
    assert redact_endpoint("http://192.168.1.100:8188", KEY) == "http://192.168.1.100:8188"
    assert redact_endpoint("https://host.example.com/a@b", KEY) == "https://host.example.com/a@b"


def test_store_header_values_keeps_them_in_clear_but_still_redacts_endpoint_passwords():
    raw = dict(REFERENCE_RUNNER, endpoint="https://u:p4ss@h.example.com")
    record = parse(raw, store_header_values=True)
    assert isinstance(record, RunnerRecord)
    assert json.loads(record.headers) == {"Authorization": "Bearer secret_token"}
    assert "p4ss" not in record.endpoint


def test_unknown_fields_are_kept_in_extra_and_unknown_status_is_kept_as_is():
    record = parse(dict(REFERENCE_RUNNER, status="draining", region="eu", gpu={"count": 2}))
    assert isinstance(record, RunnerRecord)
    assert record.status == "draining"
    assert json.loads(record.extra) == {"gpu": {"count": 2}, "region": "eu"}


def test_content_hash_changes_with_any_tracked_field_and_only_then():
    base = parse(REFERENCE_RUNNER)
    assert isinstance(base, RunnerRecord)
    assert parse(dict(REFERENCE_RUNNER)).content_hash == base.content_hash  # type: ignore[union-attr]
    for name, value in [("name", "x"), ("tags", ["x"]), ("headers", {"A": "b"}), ("extra_f", 1)]:
        changed = parse(dict(REFERENCE_RUNNER, **{name: value}))
        assert changed.content_hash != base.content_hash, name  # type: ignore[union-attr]


def test_records_that_cannot_be_stored_are_rejections_with_a_reason_and_redacted_raw():
    cases = {
        "missing or empty id": {k: v for k, v in REFERENCE_RUNNER.items() if k != "id"},
        "field 'tags' is not a list of strings": dict(REFERENCE_RUNNER, tags="gpu"),
        "field 'headers' is not an object": dict(REFERENCE_RUNNER, headers=["Bearer x"]),
        "missing field 'name'": {k: v for k, v in REFERENCE_RUNNER.items() if k != "name"},
        "field 'status' is not a string": dict(REFERENCE_RUNNER, status=1),
        "field 'created_at' is not an ISO 8601 timestamp": dict(REFERENCE_RUNNER, created_at="x"),
        "not an object but str": "just a string",
    }
    for reason, raw in cases.items():
        rejection = parse(raw)
        assert isinstance(rejection, Rejection), reason
        assert (rejection.page, rejection.position, rejection.reason) == (2, 5, reason)
        assert "secret_token" not in rejection.raw_json
    rejection = parse(dict(REFERENCE_RUNNER, tags="gpu"))
    assert isinstance(rejection, Rejection)
    assert rejection.runner_id == REFERENCE_RUNNER["id"]
    assert json.loads(rejection.raw_json)["headers"] == {
        "Authorization": redact_value("Bearer secret_token", KEY)
    }


@pytest.mark.parametrize("key", [b"k" * 32, b"x" * 100, b"", bytes(range(64))])
def test_redaction_is_hmac_sha256_exactly(key):
    for value in ("Bearer secret", "", "ünïcödé", "x" * 500):
        expected = "redacted:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:12]
        assert redact_value(value, key) == expected


odd_values = st.one_of(
    st.none(), st.integers(), st.text(max_size=3), st.lists(st.text(max_size=2), max_size=2),
    st.lists(st.integers(), min_size=1, max_size=2), st.dictionaries(st.text(max_size=2), st.text()),
    st.sampled_from(["2024-01-15T10:30:00Z", "2024-01-15", "yesterday", ""]),
)  # fmt: skip


@given(st.dictionaries(st.sampled_from(sorted(REFERENCE_RUNNER)), odd_values, max_size=9))
def test_the_fast_validity_check_passes_only_what_the_full_one_passes(changes):
    raw = {**REFERENCE_RUNNER, **changes}
    if _looks_valid(raw):
        assert _describe_problem(raw) is None
    else:
        assert _describe_problem(raw) is not None
