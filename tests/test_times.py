"""The one owner of time as users type it: ``pipeline.times``.

A length of time (``--since 7d``, ``--every 15m``) has one grammar, and an instant without an
offset means UTC wherever comfysync reads one. Each command keeps its own bounds.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from jobs.triggers import parse_every
from pipeline.errors import ConfigurationError
from pipeline.read.changelog import parse_since
from pipeline.read.history import instant_text
from pipeline.source.absence import instant
from pipeline.times import assume_utc, duration_seconds, utc_instant, utc_timestamp

NOW = datetime(2026, 11, 28, 12, 30, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45),
        ("90m", 90 * 60),
        ("24h", 24 * 3600),
        ("7d", 7 * 86_400),
        ("2w", 14 * 86_400),
        (" 15 M ", 15 * 60),
        ("1W", 7 * 86_400),
        ("0s", 0),
    ],
)
def test_a_duration_is_a_whole_number_and_a_unit_s_m_h_d_or_w(text, seconds):
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "7", "d", "-3d", "1.5h", "3y", "1d1h", "15 minutes", "banana", "1 w 2"]
)
def test_anything_else_is_not_a_duration(text):
    with pytest.raises(ValueError):
        duration_seconds(text)


@pytest.mark.parametrize("text", ["30s", "15m", "2h", "1d", "1w", "52w", " 3H "])
def test_since_and_every_read_one_grammar(text):
    seconds = duration_seconds(text)
    assert parse_every(text) == timedelta(seconds=seconds)
    assert parse_since(text, now=NOW) == utc_timestamp(NOW - timedelta(seconds=seconds))


@pytest.mark.parametrize("text", ["3y", "1.5h", "1d1h", "-1d", "d"])
def test_since_and_every_refuse_the_same_non_durations(text):
    with pytest.raises(ValueError, match="is not an interval"):
        parse_every(text)
    with pytest.raises(ConfigurationError, match="neither a duration"):
        parse_since(text, now=NOW)


def test_each_command_keeps_its_own_bounds():
    assert parse_since("0s", now=NOW) == utc_timestamp(NOW)  # since now: nothing yet
    with pytest.raises(ValueError, match="is not an interval"):
        parse_every("0s")
    assert parse_since("60w", now=NOW) == utc_timestamp(NOW - timedelta(weeks=60))
    with pytest.raises(ValueError, match="longer than 365d"):
        parse_every("53w")
    with pytest.raises(ConfigurationError, match="neither a duration"):
        parse_since("999999999w", now=NOW)  # before year 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-28", datetime(2026, 11, 28, tzinfo=UTC)),
        ("2026-11-28T14:30", datetime(2026, 11, 28, 14, 30, tzinfo=UTC)),
        ("2026-11-28T14:30:00Z", datetime(2026, 11, 28, 14, 30, tzinfo=UTC)),
        ("2026-11-28T16:30:00+02:00", datetime(2026, 11, 28, 14, 30, tzinfo=UTC)),
        (date(2026, 11, 28), datetime(2026, 11, 28, tzinfo=UTC)),
        (datetime(2026, 11, 28, 14, 30), datetime(2026, 11, 28, 14, 30, tzinfo=UTC)),
    ],
)
def test_an_instant_without_an_offset_is_utc(value, expected):
    moment = utc_instant(value)
    assert (moment, moment.utcoffset()) == (expected, timedelta(0))


@pytest.mark.parametrize(
    "value", ["yesterday", "28/11/2026", "", "2026-13-01", "0001-01-01T00:00+01:00"]
)
def test_what_names_no_instant_in_utc_is_a_value_error(value):
    with pytest.raises(ValueError):
        utc_instant(value)


def test_assume_utc_gives_a_zone_only_to_a_time_that_has_none():
    plus_two = datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    assert assume_utc(plus_two) is plus_two
    assert assume_utc(datetime(2026, 1, 1, 12)) == datetime(2026, 1, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize("text", ["2026-11-01T08:15", "2026-11-01", "2026-11-01T10:15+02:00"])
def test_every_reader_of_an_instant_agrees(text):
    """--since, --as-of and the absence proof read one instant the same way."""
    expected = utc_timestamp(utc_instant(text))
    assert parse_since(text, now=NOW) == expected
    assert instant_text(text) == expected
    moment = instant(text)
    assert moment is not None and utc_timestamp(moment) == expected


def test_schedule_every_takes_weeks_like_changes_since(serve_account, run_cli):
    upstream = serve_account(runners=3)
    args = ("schedule", "--base-url", upstream.url, "--db", "m.db", "--max-runs", "1")
    result = run_cli(*args, "--every", "1w", env={"COMFYCONTROL_TOKEN": "test-token"})
    assert result.exit_code == 0, result.stderr
    assert "schedule: every 1w" in result.stderr
    too_long = run_cli(*args, "--every", "53w")
    assert (too_long.exit_code, too_long.stdout) == (2, "")
    assert too_long.stderr == (
        "comfysync: error: Invalid value for '--every': '53w' is longer than 365d; use a "
        "positive whole number and a unit s, m, h, d or w: 30s, 15m, 2h, 1d, 1w "
        "(see 'comfysync schedule --help')\n"
    )
    since = run_cli("changes", "--since", "1w", "--db", "m.db")
    assert (since.exit_code, since.stderr) == (0, ""), since.stderr
