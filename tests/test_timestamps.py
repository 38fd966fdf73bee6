"""Runner timestamps: stored in one canonical UTC form, or the record is rejected, and every
reader (the database text, ``RunnerStore``, the Parquet and CSV snapshots) sees one instant."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import rows
from hypothesis import assume, given
from hypothesis import strategies as st

from pipeline.read.frames import RunnerStore
from pipeline.source import records
from pipeline.source.records import Rejection, RunnerRecord, parse_runner
from pipeline.store.sqlite import Database

KEY = bytes(32)
RUNNER = {
    "id": "550e8400-e29b-41d4-a716-446655440000",
    "user_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
    "name": "Production GPU Runner",
    "status": "active",
    "endpoint": "https://my-comfy.example.com",
    "tags": ["production"],
    "headers": {"Authorization": "Bearer secret_token"},
    "created_at": "2024-01-15T10:30:00Z",
    "updated_at": "2024-01-15T10:30:00Z",
}
EARLIEST = datetime(1, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def parse(raw: object) -> RunnerRecord | Rejection:
    return parse_runner(raw, page=1, position=0, redaction_key=KEY)


def canonical(moment: datetime) -> str:
    """The stored form of an instant, written out independently of pipeline.source.records."""
    u = moment.astimezone(UTC)
    text = f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}"
    return text + (f".{u.microsecond:06d}Z" if u.microsecond else "Z")


def instant(text: str) -> datetime:
    """What a canonical stored text means (a 'Z' time, read back without our code)."""
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)


# -- spelling one instant in the ISO 8601 forms an upstream might send ----------------------


def offset_text(offset: timedelta, style: str) -> str:
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    if style == "basic":
        return f"{sign}{hours:02d}{mins:02d}"
    if style == "hours" and mins == 0:
        return f"{sign}{hours:02d}"
    return f"{sign}{hours:02d}:{mins:02d}"


def spell(local: datetime, choices: dict[str, object]) -> str:
    """``local`` (aware, or naive meaning UTC) as ISO 8601 text, in the form ``choices`` pick."""
    basic = bool(choices["basic"])
    week = bool(choices["week"])
    if week:
        year, number, weekday = local.isocalendar()
        day = (
            f"{year:04d}W{number:02d}{weekday}" if basic else f"{year:04d}-W{number:02d}-{weekday}"
        )
    else:
        pattern = "{:04d}{:02d}{:02d}" if basic else "{:04d}-{:02d}-{:02d}"
        day = pattern.format(local.year, local.month, local.day)
    pattern = "{:02d}{:02d}{:02d}" if basic else "{:02d}:{:02d}:{:02d}"
    clock = pattern.format(local.hour, local.minute, local.second)
    fraction = str(choices["fraction"])
    if local.microsecond or fraction != "none":
        digits = f"{local.microsecond:06d}"
        if fraction == "short" and digits.endswith("000"):
            digits = digits[:3]
        elif fraction == "nanoseconds":
            digits += str(choices["extra_digits"])  # below a microsecond: truncated
        clock += ("," if choices["comma"] else ".") + digits
    if local.tzinfo is None:
        zone = ""
    elif local.utcoffset() == timedelta(0) and choices["zulu"]:
        zone = "Z"
    else:
        zone = offset_text(local.utcoffset() or timedelta(0), str(choices["offset_style"]))
    return f"{day}{choices['separator']}{clock}{zone}"


spelling_choices = st.fixed_dictionaries(
    {
        "basic": st.booleans(),
        "week": st.booleans(),
        "fraction": st.sampled_from(["none", "full", "short", "nanoseconds"]),
        "extra_digits": st.integers(0, 999).map(lambda n: f"{n:03d}"),
        "comma": st.booleans(),
        "zulu": st.booleans(),
        "naive": st.booleans(),
        "offset_style": st.sampled_from(["extended", "basic", "hours"]),
        "separator": st.sampled_from(["T", " "]),
    }
)
offsets = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: timedelta(minutes=m))


@st.composite
def spelt_instants(draw: st.DrawFn) -> tuple[datetime, str]:
    """An instant in the storable range, and one ISO 8601 spelling of it."""
    moment = draw(
        st.datetimes(
            min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)
        )
    )
    moment = moment.replace(tzinfo=UTC)
    choices = draw(spelling_choices)
    offset = draw(st.one_of(st.just(timedelta(0)), offsets))
    try:
        local = moment.astimezone(timezone(offset))
    except OverflowError:
        local = moment
    if choices["naive"] and local.utcoffset() == timedelta(0):
        local = local.replace(tzinfo=None)
    if choices["week"]:
        assume(1 <= local.isocalendar()[0] <= 9999)
    return moment, spell(local, choices)


@given(spelt_instants(), spelt_instants())
def test_every_iso_spelling_of_an_instant_is_stored_as_its_one_canonical_text(created, updated):
    record = parse(dict(RUNNER, created_at=created[1], updated_at=updated[1]))
    assert isinstance(record, RunnerRecord), (created, updated)
    assert (record.created_at, record.updated_at) == (canonical(created[0]), canonical(updated[0]))
    assert instant(record.created_at) == created[0]


@given(spelt_instants())
def test_respelling_the_same_instant_is_not_a_change(spelt):
    moment, text = spelt
    as_sent = parse(dict(RUNNER, created_at=text, updated_at=text))
    as_the_api_spells_it = parse(
        dict(RUNNER, created_at=canonical(moment), updated_at=canonical(moment))
    )
    assert isinstance(as_sent, RunnerRecord) and isinstance(as_the_api_spells_it, RunnerRecord)
    assert as_sent.values == as_the_api_spells_it.values
    assert as_sent.content_hash == as_the_api_spells_it.content_hash
    assert as_sent.content_hash == records.content_hash(as_sent.values)


@given(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999))
)
def test_canonical_text_is_kept_exactly_as_sent(moment):
    text = canonical(moment.replace(tzinfo=UTC))
    record = parse(dict(RUNNER, created_at=text, updated_at=text))
    assert isinstance(record, RunnerRecord)
    assert (record.created_at, record.updated_at) == (text, text)


@st.composite
def near_canonical_texts(draw: st.DrawFn) -> str:
    """A canonical text with one character replaced, inserted or removed."""
    text = canonical(draw(st.datetimes(min_value=datetime(1, 1, 1))).replace(tzinfo=UTC))
    at = draw(st.integers(0, len(text)))
    char = draw(st.sampled_from("0123456789-:.,TtZz +W"))
    edit = draw(st.sampled_from(["replace", "insert", "remove"]))
    if edit == "insert":
        return text[:at] + char + text[at:]
    return text[:at] + (char if edit == "replace" else "") + text[at + 1 :]


@given(st.one_of(near_canonical_texts(), spelt_instants().map(lambda spelt: spelt[1])))
def test_the_fast_path_takes_only_text_already_in_the_stored_form(text):
    fast = records._looks_valid(dict(RUNNER, created_at=text))
    try:
        stored = records.normalise_timestamp(text)
    except ValueError:
        assert not fast
        return
    assert fast == (stored == text)
    assert records.normalise_timestamp(stored) == stored
    assert records._looks_valid(dict(RUNNER, updated_at=stored))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2024-W01-1", "is a date without a time"),
        ("2024W011", "is a date without a time"),
        ("2024-W01", "is a date without a time"),
        ("2024-01-15", "is a date without a time"),
        ("20240115", "is a date without a time"),
        ("2024-015", "is a date without a time"),
        ("2024015", "is a date without a time"),
        ("garbage", "is not an ISO 8601 timestamp"),
        ("", "is not an ISO 8601 timestamp"),
        ("2024-01-15T25:00:00Z", "is not an ISO 8601 timestamp"),
        ("2024-02-30T10:00:00Z", "is not an ISO 8601 timestamp"),
        ("2024-01-15+01:00", "is not an ISO 8601 timestamp"),
        ("2024-01-15x10:30:00Z", "is not an ISO 8601 timestamp"),
        (" 2024-01-15T10:30:00Z", "is not an ISO 8601 timestamp"),
        ("2024-01-15T10:30:00Z ", "is not an ISO 8601 timestamp"),
        ("2023-366T10:30:00Z", "is not an ISO 8601 timestamp"),
        ("10000-01-01T00:00:00Z", "is outside the years 0001 to 9999 (UTC)"),
        ("0000-12-31T23:00:00Z", "is outside the years 0001 to 9999 (UTC)"),
        ("-0001-01-01T00:00:00Z", "is outside the years 0001 to 9999 (UTC)"),
        ("0001-01-01T00:00:00+01:00", "is outside the years 0001 to 9999 (UTC)"),
        ("9999-12-31T23:30:00-01:00", "is outside the years 0001 to 9999 (UTC)"),
    ],
)
@pytest.mark.parametrize("field", ["created_at", "updated_at"])
def test_a_timestamp_that_is_not_one_instant_in_range_is_rejected_naming_the_field(
    field, value, reason
):
    rejection = parse(dict(RUNNER, **{field: value}))
    assert isinstance(rejection, Rejection)
    assert rejection.reason == f"field {field!r} {reason}"


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("2024-01-15T10:30:00Z", "2024-01-15T10:30:00Z"),
        ("2024-01-15T10:30:00+00:00", "2024-01-15T10:30:00Z"),
        ("2024-01-15T10:30:00", "2024-01-15T10:30:00Z"),
        ("2024-01-15T10:30:00.000000Z", "2024-01-15T10:30:00Z"),
        ("2024-01-15T10:30:00.5Z", "2024-01-15T10:30:00.500000Z"),
        ("2024-01-15T10:30:00.123456789Z", "2024-01-15T10:30:00.123456Z"),
        ("20240601T000000+0530", "2024-05-31T18:30:00Z"),
        ("2024-W01-1T10:00:00-02:00", "2024-01-01T12:00:00Z"),
        ("2024-015T10:30Z", "2024-01-15T10:30:00Z"),
        ("2024015T1030Z", "2024-01-15T10:30:00Z"),
        ("2024-01-15 10:30:00+01", "2024-01-15T09:30:00Z"),
        ("2024-01-15T10", "2024-01-15T10:00:00Z"),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"),
        ("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999999Z"),
        ("0001-01-01T00:30:00+00:30", "0001-01-01T00:00:00Z"),
    ],
)
def test_examples_of_what_is_stored(value, stored):
    record = parse(dict(RUNNER, created_at=value))
    assert isinstance(record, RunnerRecord)
    assert record.created_at == stored


# -- end to end: the simulator, a real sync, and every reader -------------------------------


def random_spellings(count: int, seed: int) -> list[tuple[datetime, str]]:
    """``count`` instants (the range's ends among them) and a random spelling of each."""
    rng = random.Random(seed)
    moments = [EARLIEST, LATEST, datetime(1970, 1, 1, tzinfo=UTC)]
    while len(moments) < count:
        seconds = rng.uniform(1, (LATEST - EARLIEST).total_seconds() - 1)
        moment = EARLIEST + timedelta(seconds=seconds)
        moments.append(moment.replace(microsecond=rng.choice([0, moment.microsecond])))
    spelt = []
    for moment in moments:
        choices = {
            "basic": rng.random() < 0.5,
            "week": rng.random() < 0.2,
            "fraction": rng.choice(["none", "full", "short", "nanoseconds"]),
            "extra_digits": f"{rng.randint(0, 999):03d}",
            "comma": rng.random() < 0.2,
            "zulu": rng.random() < 0.5,
            "offset_style": rng.choice(["extended", "basic", "hours"]),
            "separator": rng.choice(["T", " "]),
        }
        offset = timedelta(minutes=rng.randint(-(23 * 60 + 59), 23 * 60 + 59))
        local = (
            moment.astimezone(timezone(offset))
            if EARLIEST + timedelta(days=1) < moment < LATEST - timedelta(days=1)
            else moment
        )
        if rng.random() < 0.1 and local.utcoffset() == timedelta(0):
            local = local.replace(tzinfo=None)
        if choices["week"] and not 1 <= local.isocalendar()[0] <= 9999:
            choices["week"] = False
        spelt.append((moment, spell(local, choices)))
    return spelt


def test_a_sync_stores_canonical_times_that_every_reader_reads_as_the_same_instant(
    serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=0)
    account = upstream.account
    spellings = random_spellings(60, seed=13)
    expected = {}
    for n, (moment, text) in enumerate(spellings):
        updated_moment, updated_text = spellings[-1 - n]
        runner = account.create_runner(name=f"runner {n}", created_at=text, updated_at=updated_text)
        expected[runner["id"]] = (canonical(moment), canonical(updated_moment))

    result = run_cli("sync", "--base-url", upstream.url, "--token", "test-token")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("sync 1 success: 60 runners"), result.stdout

    db_path = tmp_path / "data" / "comfysync.db"
    stored = {
        rid: (c, u) for rid, c, u in rows(db_path, "SELECT id, created_at, updated_at FROM runners")
    }
    assert stored == expected
    versions = rows(db_path, "SELECT runner_id, created_at, updated_at FROM runner_versions")
    assert {rid: (c, u) for rid, c, u in versions} == expected
    hashes = rows(db_path, f"SELECT content_hash, {', '.join(records.TRACKED_FIELDS)} FROM runners")
    assert all(row[0] == records.content_hash(tuple(row[1:])) for row in hashes)

    want = {rid: (instant(c), instant(u)) for rid, (c, u) in expected.items()}
    with RunnerStore(db_path) as store:
        frame = store.runners()
    assert str(frame["created_at"].dtype) == "datetime64[us, UTC]"
    assert {
        r.id: (r.created_at.to_pydatetime(), r.updated_at.to_pydatetime())
        for r in frame.itertuples()
    } == want

    [parquet] = (tmp_path / "data" / "exports" / "parquet").rglob("*.parquet")
    table = pq.read_table(parquet, columns=["id", "created_at", "updated_at"]).to_pylist()
    assert {r["id"]: (r["created_at"], r["updated_at"]) for r in table} == want
    from_pandas = pd.read_parquet(parquet, columns=["id", "created_at", "updated_at"])
    assert {
        r.id: (r.created_at.to_pydatetime(), r.updated_at.to_pydatetime())
        for r in from_pandas.itertuples()
    } == want

    [csv] = (tmp_path / "data" / "exports" / "csv").rglob("*.csv")
    text = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert {
        r.id: (datetime.fromisoformat(r.created_at), datetime.fromisoformat(r.updated_at))
        for r in text.itertuples()
    } == want


def test_a_runner_respelling_the_same_instant_is_not_a_change_but_a_new_instant_is(
    serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=20, seed=5)
    account = upstream.account
    first = run_cli("sync", "--base-url", upstream.url, "--token", "test-token")
    assert first.exit_code == 0, first.stderr
    ids = account.runner_ids()
    for runner_id in ids[:5]:
        runner = account.get_runner(runner_id)
        moment = instant(runner["updated_at"])
        account.update_runner(
            runner_id,
            updated_at=moment.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat(),
        )
    moved = account.get_runner(ids[5])
    account.update_runner(
        ids[5],
        updated_at=canonical(instant(moved["updated_at"]) + timedelta(seconds=1)).replace(
            "Z", "+00:00"
        ),
    )

    second = run_cli("sync", "--base-url", upstream.url, "--token", "test-token", "--json")
    assert second.exit_code == 0, second.stderr
    summary = json.loads(second.stdout)
    assert (summary["updated"], summary["unchanged"], summary["status"]) == (1, 19, "success")
    db_path = tmp_path / "data" / "comfysync.db"
    assert rows(db_path, "SELECT count(*) FROM runner_versions") == [(21,)]
    assert rows(db_path, "SELECT updated_at FROM runners WHERE id = ?", (ids[5],)) == [
        (canonical(instant(moved["updated_at"]) + timedelta(seconds=1)),)
    ]


def test_a_sync_rejects_a_date_without_a_time_names_the_field_and_ends_partial(
    serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=10, seed=3)
    account = upstream.account
    week, ordinal = account.runner_ids()[2:4]
    account.update_runner(week, updated_at="2024-W01-1")
    account.update_runner(ordinal, updated_at="2024-015")

    result = run_cli("sync", "--base-url", upstream.url, "--token", "test-token")

    assert result.exit_code == 0, result.stderr
    assert "2 runner record(s) could not be stored" in result.stderr
    db_path = tmp_path / "data" / "comfysync.db"
    assert rows(db_path, "SELECT status, rejected FROM sync_runs") == [("partial", 2)]
    assert sorted(rows(db_path, "SELECT runner_id, reason FROM rejected_records")) == sorted(
        [
            (week, "field 'updated_at' is a date without a time"),
            (ordinal, "field 'updated_at' is a date without a time"),
        ]
    )
    assert rows(db_path, "SELECT count(*) FROM runners") == [(8,)]
    with RunnerStore(db_path) as store:
        assert len(store.runners()) == 8


# -- databases written by older versions ------------------------------------------------------

MIGRATION = "m008_canonical_timestamps"


def old_database(path: Path) -> Database:
    """A store at the schema before the timestamp migration, as an older comfysync left it."""
    from pipeline.store.meta import META_TABLE
    from pipeline.store.schema import migrations

    db = Database(path)
    migrations.apply(db, stop_before=MIGRATION)
    version = len(migrations.applied(db))
    db.table(META_TABLE).upsert({"key": "schema_version", "value": str(version)}, pk="key")
    db.execute(
        "INSERT INTO sync_runs (id, started_at, finished_at, status) "
        "VALUES (1, '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:01.000000Z', 'success')"
    )
    return db


def insert_runner(db: Database, runner_id: str, created_at: str, updated_at: str) -> str:
    """One runner, stored as an older version did (its values verbatim); returns its hash."""
    fields = dict(
        user_id="u", name=f"n-{runner_id}", status="active", endpoint="https://x.example",
        tags="[]", headers="{}", created_at=created_at, updated_at=updated_at, extra="{}",
    )  # fmt: skip
    digest = records.content_hash(tuple(fields[name] for name in records.TRACKED_FIELDS))
    db.table("runners").insert(
        dict(id=runner_id, **fields, first_seen_at="2026-01-01T00:00:00.500000Z",
             version=1, content_hash=digest, raw_fingerprint="f")
    )  # fmt: skip
    db.table("runner_versions").insert(
        dict(runner_id=runner_id, version=1, change="created", changed_fields="[]", **fields,
             content_hash=digest, valid_from="2026-01-01T00:00:00.500000Z", valid_to=None,
             sync_id=1)
    )  # fmt: skip
    return digest


def test_an_older_store_has_its_timestamps_made_canonical_and_its_hashes_recomputed(tmp_path):
    from pipeline.store.schema import open_store

    path = tmp_path / "old.db"
    db = old_database(path)
    sent = {
        "canonical": ("2024-01-15T10:30:00Z", "2024-01-15T10:30:00.250000Z"),
        "offset": ("2024-01-15T10:30:00+00:00", "20240601T000000+0530"),
        "naive": ("2024-01-15T10:30:00", "2024-01-15T10:30:00.000000Z"),
        "week-date": ("2024-W01-1", "2024-01-15T10:30:00.123456789Z"),
    }
    hashes = {rid: insert_runner(db, rid, *values) for rid, values in sent.items()}
    db.conn.commit()
    db.close()

    store = open_store(path)
    expected = {
        "canonical": ("2024-01-15T10:30:00Z", "2024-01-15T10:30:00.250000Z"),
        "offset": ("2024-01-15T10:30:00Z", "2024-05-31T18:30:00Z"),
        "naive": ("2024-01-15T10:30:00Z", "2024-01-15T10:30:00Z"),
        # A date alone: the instant every older reader took it for, its midnight UTC.
        "week-date": ("2024-01-01T00:00:00Z", "2024-01-15T10:30:00.123456Z"),
    }
    columns = ", ".join(records.TRACKED_FIELDS)
    for table, key in (("runners", "id"), ("runner_versions", "runner_id")):
        found = store.execute(f"SELECT {key}, {columns}, content_hash FROM {table}").fetchall()
        assert {row[0]: (row[7], row[8]) for row in found} == expected, table
        for row in found:
            assert row[-1] == records.content_hash(tuple(row[1:-1])), (table, row[0])
    [(unchanged_hash,)] = store.execute(
        "SELECT content_hash FROM runners WHERE id = 'canonical'"
    ).fetchall()
    assert unchanged_hash == hashes["canonical"]
    store.close()

    with RunnerStore(path) as frames:
        times = frames.runners().set_index("id")["created_at"].to_dict()
    assert {rid: t.to_pydatetime() for rid, t in times.items()} == {
        rid: instant(created) for rid, (created, _) in expected.items()
    }


def test_the_bound_the_records_enforce_is_what_the_pandas_and_arrow_readers_hold():
    """Just inside the bound is stored and read back exactly; just outside is refused."""
    import pyarrow as pa

    from pipeline.outputs.export import TIMESTAMP

    for moment in (EARLIEST, LATEST):
        text = canonical(moment)
        assert records.normalise_timestamp(text) == text
        parsed = pd.to_datetime(pd.Series([text], dtype=object), utc=True, format="ISO8601")
        assert parsed.astype("datetime64[us, UTC]")[0].to_pydatetime() == moment
        assert pa.array([text]).cast(TIMESTAMP).to_pylist() == [moment]
    for outside in ("0000-12-31T23:59:59.999999Z", "10000-01-01T00:00:00Z"):
        with pytest.raises(ValueError, match="outside the years"):
            records.normalise_timestamp(outside)
