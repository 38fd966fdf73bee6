"""Parsing `--every`, `--cron` and `--timezone`: pure functions, every form accepted or refused."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from jobs.triggers import (
    crontab_weekdays,
    interval_trigger,
    parse_cron,
    parse_every,
    parse_timezone,
)

UTC = ZoneInfo("UTC")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1w", timedelta(weeks=1)),
        ("1s", timedelta(seconds=1)),
        (" 90M ", timedelta(minutes=90)),
    ],
)
def test_every_accepts_a_positive_whole_number_and_a_unit(text, expected):
    assert parse_every(text) == expected


@pytest.mark.parametrize("text", ["0s", "banana", "15", "m", "-5m", "1.5h", "15 minutes", "1y", ""])
def test_every_refuses_anything_else_and_shows_the_accepted_forms(text):
    with pytest.raises(ValueError) as refused:
        parse_every(text)
    assert str(refused.value) == (
        f"{text!r} is not an interval; use a positive whole number and a unit s, m, h, d or w: "
        "30s, 15m, 2h, 1d, 1w"
    )


def test_timezones_are_iana_names():
    assert parse_timezone("Europe/Berlin") == ZoneInfo("Europe/Berlin")
    for name in ("Mars/Olympus_Mons", "../etc/passwd", ""):
        with pytest.raises(ValueError, match=r"unknown time zone .*such as UTC, Europe/Berlin"):
            parse_timezone(name)


@pytest.mark.parametrize(
    ("field", "days"),
    [
        ("*", "*"),
        ("0", "sun"),
        ("7", "sun"),
        ("1-5", "mon,tue,wed,thu,fri"),
        ("mon-fri", "mon,tue,wed,thu,fri"),
        ("5-7", "sun,fri,sat"),
        ("0-6", "sun,mon,tue,wed,thu,fri,sat"),
        ("*/2", "sun,tue,thu,sat"),
        ("1-5/2", "mon,wed,fri"),
        ("sat,SUN,3", "sun,wed,sat"),
        ("1/3", "mon,thu"),
    ],
)
def test_crontab_weekdays_count_from_sunday_as_crontab_does(field, days):
    assert crontab_weekdays(field) == days


@pytest.mark.parametrize("field", ["8", "5-1", "*/0", "funday", "1-", "*-3", ""])
def test_impossible_weekdays_are_refused(field):
    with pytest.raises(ValueError, match="weekday"):
        crontab_weekdays(field)


def next_fire(trigger, after: datetime) -> datetime:
    return trigger.get_next_fire_time(None, after)  # type: ignore[no-any-return]


def test_a_weekday_cron_runs_monday_to_friday_not_tuesday_to_saturday():
    saturday = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    trigger = parse_cron("0 3 * * 1-5", UTC)
    assert next_fire(trigger, saturday) == datetime(2026, 11, 30, 3, 0, tzinfo=UTC)  # Monday
    friday = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    assert next_fire(trigger, friday) == datetime(2026, 12, 7, 3, 0, tzinfo=UTC)  # not Saturday
    sunday_only = parse_cron("30 6 * * 0", UTC)
    assert next_fire(sunday_only, saturday) == datetime(2026, 11, 29, 6, 30, tzinfo=UTC)


def test_cron_is_read_in_the_given_time_zone_and_jitter_only_delays():
    berlin = ZoneInfo("Europe/Berlin")
    nine_in_berlin = parse_cron("0 9 * * *", berlin)
    moment = next_fire(nine_in_berlin, datetime(2026, 11, 28, 7, 0, tzinfo=UTC))
    assert moment.astimezone(UTC) == datetime(2026, 11, 28, 8, 0, tzinfo=UTC)  # CET is UTC+1
    jittered = parse_cron("0 9 * * *", berlin, jitter=30)
    for _ in range(20):
        late = next_fire(jittered, datetime(2026, 11, 28, 7, 0, tzinfo=UTC)) - moment
        assert timedelta(0) <= late <= timedelta(seconds=30)


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("banana", "it has 1 field(s), not 5"),
        ("* * * *", "it has 4 field(s), not 5"),
        ("* * * * * *", "it has 6 field(s), not 5"),
        ("61 * * * *", "higher than the maximum value (59)"),
        ("* 24 * * *", "higher than the maximum value (23)"),
        ("* * * * 9", "weekday '9' is not a crontab weekday"),
        ("0 0 30 2 *", "no date ever matches it"),
    ],
)
def test_a_bad_crontab_is_refused_and_the_message_shows_the_form(expression, reason):
    with pytest.raises(ValueError) as refused:
        parse_cron(expression, UTC)
    message = str(refused.value)
    assert message.startswith(f"{expression!r} is not a crontab (")
    assert reason in message
    assert message.endswith(
        "use a standard 5-field crontab 'MINUTE HOUR DAY MONTH WEEKDAY', "
        "e.g. '*/15 * * * *' or '0 3 * * 1-5'"
    )


def test_an_interval_trigger_fires_one_interval_from_now_then_every_interval():
    trigger = interval_trigger(timedelta(minutes=15), UTC)
    first = next_fire(trigger, datetime.now(UTC))
    assert timedelta(minutes=14) < first - datetime.now(UTC) <= timedelta(minutes=15)
    assert trigger.get_next_fire_time(first, first) == first + timedelta(minutes=15)
