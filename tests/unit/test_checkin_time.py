"""Due-time maths: next local day at `at`, DST-correct; `after` parsing and bad values."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from bot.checkin.due import due_at
from bot.config.settings import CheckinSettings, parse_duration

LONDON = ZoneInfo("Europe/London")
TEN = CheckinSettings(at=dt.time(10, 0), timezone="Europe/London")


def local(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=LONDON)


@pytest.mark.parametrize(
    ("flagged", "expected"),
    [
        (local(2026, 6, 1, 23, 59), local(2026, 6, 2, 10, 0)),  # 23:59 → tomorrow
        (local(2026, 6, 2, 0, 1), local(2026, 6, 3, 10, 0)),  # 00:01 is already "today"
        (local(2026, 1, 15, 23, 59), local(2026, 1, 16, 10, 0)),
        (local(2026, 3, 28, 12, 0), local(2026, 3, 29, 10, 0)),  # spring forward overnight
        (local(2026, 10, 24, 12, 0), local(2026, 10, 25, 10, 0)),  # fall back overnight
    ],
)
def test_next_local_day_at_ten(flagged, expected):
    due = due_at(flagged.astimezone(dt.UTC), TEN)
    assert due == expected
    assert due.tzinfo == dt.UTC
    assert due.astimezone(LONDON).time() == dt.time(10, 0)


def test_dst_changes_shift_the_utc_time_not_the_local_time():
    winter = due_at(local(2026, 3, 28, 9, 0).astimezone(dt.UTC), TEN)  # due 29 Mar (BST)
    before = due_at(local(2026, 3, 27, 9, 0).astimezone(dt.UTC), TEN)  # due 28 Mar (GMT)
    assert (before.hour, winter.hour) == (10, 9)  # UTC hours: GMT 10:00 vs BST 10:00


def test_time_in_the_spring_gap_moves_forward():
    gap = CheckinSettings(at=dt.time(1, 30), timezone="Europe/London")
    due = due_at(local(2026, 3, 28, 12, 0).astimezone(dt.UTC), gap)
    assert due.astimezone(LONDON).replace(tzinfo=None) == dt.datetime(2026, 3, 29, 2, 30)


def test_ambiguous_autumn_time_is_the_first_occurrence():
    twice = CheckinSettings(at=dt.time(1, 30), timezone="Europe/London")
    due = due_at(local(2026, 10, 24, 12, 0).astimezone(dt.UTC), twice)
    assert due == dt.datetime(2026, 10, 25, 0, 30, tzinfo=dt.UTC)  # 01:30 BST


def test_after_counts_from_the_flag_not_from_arrival():
    flagged = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
    settings = CheckinSettings(after=parse_duration("1h30m"))
    assert due_at(flagged, settings) == flagged + dt.timedelta(hours=1, minutes=30)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("6h", 21600), ("1d", 86400), ("1h30m", 5400), ("2m", 120), (" 1H ", 3600)],
)
def test_after_parsing(text, seconds):
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("bad", ["", "soon", "10", "1h 30x", "h1", "-5s", "0s", "1.5h"])
def test_bad_durations_are_clear_errors(bad):
    with pytest.raises(ValueError, match=r"duration|longer than zero|may not be empty"):
        parse_duration(bad)


def test_at_and_after_together_is_a_config_error():
    with pytest.raises(ValidationError, match="either 'after' or 'at'"):
        CheckinSettings(at=dt.time(10), after="1h")
    with pytest.raises(ValidationError, match="with a unit"):
        CheckinSettings(after=3600)


zones = st.sampled_from(["Europe/London", "America/New_York", "Australia/Sydney", "UTC"])
times = st.times(min_value=dt.time(0, 0), max_value=dt.time(23, 59))
instants = st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2035, 12, 31)).map(
    lambda naive: naive.replace(tzinfo=dt.UTC)
)


@given(instants, times, zones)
def test_due_is_the_next_local_day_at_the_time(flagged, at, zone_name):
    zone = ZoneInfo(zone_name)
    due = due_at(flagged, CheckinSettings(at=at.replace(microsecond=0), timezone=zone_name))
    assert due > flagged
    local_due = due.astimezone(zone)
    assert local_due.date() == flagged.astimezone(zone).date() + dt.timedelta(days=1)
    wall = dt.datetime.combine(local_due.date(), at.replace(microsecond=0))
    # Equal to `at`, unless `at` fell in a DST gap (then it moved forward by the gap).
    assert local_due.replace(tzinfo=None) >= wall
    assert local_due.replace(tzinfo=None) - wall <= dt.timedelta(hours=1)


@given(instants, st.integers(min_value=1, max_value=10 * 86400))
def test_after_is_exact(flagged, seconds):
    after = dt.timedelta(seconds=seconds)
    assert due_at(flagged, CheckinSettings(after=after)) - flagged == after
