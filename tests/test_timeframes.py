"""Calendar arithmetic of the timeframes, checked against an independent oracle (dateutil's relativedelta
and hand-written dates), never against the code under test."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from dateutil.relativedelta import relativedelta

from candlecast.timeframes import (
    FORECAST_STEPS,
    TIMEFRAMES,
    add_steps,
    bucket_start,
    closed_since,
    next_open_times,
    nominal_seconds,
)

ORACLE_STEP = {"1h": relativedelta(hours=1), "4h": relativedelta(hours=4), "1d": relativedelta(days=1),
               "1w": relativedelta(weeks=1), "1m": relativedelta(months=1)}


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


@pytest.mark.parametrize("timeframe", TIMEFRAMES)
@pytest.mark.parametrize("start", [at(2023, 1, 1), at(2023, 11, 1), at(2024, 2, 1), at(2019, 12, 1)])
def test_add_steps_moves_forward_as_the_calendar_does(timeframe, start):
    for steps in (0, 1, 2, 11, 12, 13, 25, FORECAST_STEPS):
        assert add_steps(start, timeframe, steps) == start + steps * ORACLE_STEP[timeframe], (timeframe, steps)


@pytest.mark.parametrize(("start", "steps", "expected"), [
    (at(2023, 12, 1), 1, at(2024, 1, 1)),  # over a year end
    (at(2023, 11, 1), 2, at(2024, 1, 1)),
    (at(2023, 1, 1), 12, at(2024, 1, 1)),
    (at(2023, 1, 1), 11, at(2023, 12, 1)),  # December is month 12, not 0
    (at(2022, 7, 1), 30, at(2025, 1, 1)),
    (at(2024, 1, 1), 1, at(2024, 2, 1)),
])
def test_calendar_months_by_hand(start, steps, expected):
    assert add_steps(start, "1m", steps) == expected


def test_hand_written_fixed_steps():
    start = at(2024, 2, 28, 20)
    assert add_steps(start, "1h", 5) == at(2024, 2, 29, 1)  # leap day
    assert add_steps(start, "4h", 2) == at(2024, 2, 29, 4)
    assert add_steps(start, "1d", 2) == at(2024, 3, 1, 20)
    assert add_steps(start, "1w", 1) == at(2024, 3, 6, 20)


@pytest.mark.parametrize("timeframe", TIMEFRAMES)
def test_next_open_times_are_the_thirty_following_candles_in_order(timeframe):
    last = at(2023, 10, 1)
    times = next_open_times(last, timeframe)
    assert times == [last + step * ORACLE_STEP[timeframe] for step in range(1, FORECAST_STEPS + 1)]
    assert all(earlier < later for earlier, later in zip([last, *times], times, strict=False))
    assert len(next_open_times(last, timeframe, 3)) == 3


@pytest.mark.parametrize(("timeframe", "ts", "expected"), [
    ("1h", at(2024, 3, 5, 13, 59, 59), at(2024, 3, 5, 13)),
    ("4h", at(2024, 3, 5, 13, 10), at(2024, 3, 5, 12)),
    ("4h", at(2024, 3, 5, 3, 59), at(2024, 3, 5, 0)),
    ("4h", at(2024, 3, 5, 23, 0), at(2024, 3, 5, 20)),
    ("1d", at(2024, 3, 5, 23, 59), at(2024, 3, 5)),
    ("1w", at(2024, 3, 7, 8), at(2024, 3, 4)),  # weeks start Monday
    ("1w", at(2024, 3, 4, 0), at(2024, 3, 4)),
    ("1w", at(2024, 3, 10, 23), at(2024, 3, 4)),  # Sunday belongs to the week before
    ("1m", at(2024, 3, 31, 23), at(2024, 3, 1)),
    ("1m", at(2024, 3, 1), at(2024, 3, 1)),
])
def test_bucket_start(timeframe, ts, expected):
    assert bucket_start(ts, timeframe) == expected


def test_bucket_start_converts_to_utc_first():
    from zoneinfo import ZoneInfo

    local = datetime(2024, 3, 1, 0, 30, tzinfo=ZoneInfo("Europe/Berlin"))  # 2024-02-29 23:30 UTC
    assert bucket_start(local, "1d") == at(2024, 2, 29)
    assert bucket_start(local, "1m") == at(2024, 2, 1)
    # a naive time is UTC, as in add_steps and closed_since, not the machine's wall clock
    assert bucket_start(datetime(2024, 2, 29, 23, 30), "1d") == at(2024, 2, 29)


def test_nominal_seconds():
    assert [nominal_seconds(tf) for tf in ("1h", "4h", "1d", "1w")] == [3600, 14400, 86400, 604800]
    assert nominal_seconds("1m") == 2629746  # 30.436875 days, the Gregorian mean month
    assert nominal_seconds("1m") == pytest.approx(timedelta(days=365.2425 / 12).total_seconds(), abs=1)


def test_the_five_timeframes_in_order():
    assert TIMEFRAMES == ("1h", "4h", "1d", "1w", "1m")
    assert FORECAST_STEPS == 30


@pytest.mark.parametrize(("start", "steps", "expected"), [
    (at(2024, 1, 31), 1, at(2024, 2, 29)),  # the month's last day where the target has no 31st
    (at(2023, 1, 29), 1, at(2023, 2, 28)),
    (at(2024, 1, 30), 2, at(2024, 3, 30)),
    (at(2024, 8, 31), 1, at(2024, 9, 30)),
    (at(2024, 12, 31), 2, at(2025, 2, 28)),
])
def test_a_month_step_from_a_day_the_target_lacks_takes_its_last_day_and_never_raises(start, steps, expected):
    assert add_steps(start, "1m", steps) == expected


def test_month_steps_never_raise_from_any_day_of_a_year():
    day = at(2023, 1, 1)
    while day.year < 2025:
        assert len(next_open_times(day, "1m")) == FORECAST_STEPS
        day += timedelta(days=1)


@pytest.mark.parametrize(("timeframe", "on", "off"), [
    ("1h", [at(2024, 3, 10, 22)], [at(2024, 3, 10, 22, 30), at(2024, 3, 10, 22, 0, 1)]),
    ("4h", [at(2024, 3, 10, 20), at(2024, 3, 11)], [at(2024, 3, 10, 22), at(2024, 3, 11, 2)]),
    ("1d", [at(2024, 12, 4)], [at(2024, 12, 4, 12), at(2024, 12, 4, 4)]),
    ("1w", [at(2024, 12, 30), at(1970, 1, 5), at(2025, 1, 6)], [at(2024, 12, 29), at(2025, 1, 1)]),
    ("1m", [at(2024, 2, 1), at(2023, 12, 1), at(1970, 1, 1)], [at(2024, 1, 31), at(2024, 1, 29), at(2024, 3, 1, 1)]),
])
def test_off_grid_names_the_open_times_no_candle_of_the_timeframe_opens_at(timeframe, on, off):
    import numpy as np

    from candlecast.candles import off_grid

    times = np.array([int(ts.timestamp()) for ts in on + off], dtype=np.int64)
    assert off_grid(times, timeframe).tolist() == [False] * len(on) + [True] * len(off)


@pytest.mark.parametrize(("timeframe", "last_open", "at", "closed"), [
    ("1h", at(2024, 1, 1, 9), at(2024, 1, 1, 10, 30), 0),  # the 10:00 candle is still open
    ("1h", at(2024, 1, 1, 9), at(2024, 1, 1, 11), 1),
    ("1h", at(2024, 1, 1, 9), at(2024, 1, 1, 9, 59), 0),
    ("1d", at(2024, 8, 7), at(2024, 12, 5, 10), 119),  # audit K: 120 days old
    ("1w", at(2024, 12, 30), at(2025, 1, 13), 1),
    ("1m", at(2024, 1, 1), at(2024, 2, 29, 23), 0),
    ("1m", at(2024, 1, 1), at(2024, 3, 1), 1),
    ("1m", at(2023, 11, 1), at(2024, 2, 15), 2),
])
def test_closed_since_counts_the_candles_that_closed_after_the_last_one(timeframe, last_open, at, closed):
    from candlecast.timeframes import closed_since

    assert closed_since(last_open, timeframe, at) == closed


NEW_YORK = ZoneInfo("America/New_York")


def test_month_arithmetic_is_utcs_whatever_zone_the_times_come_in():
    """Times in another zone (as a database session outside UTC returns them) are the same instants: their months
    are UTC's, not the wall clock's. 2026-02-01T00:00Z is January 31st in New York."""
    last_open = at(2026, 2, 1).astimezone(NEW_YORK)
    assert add_steps(last_open, "1m", 2) == at(2026, 4, 1)
    assert next_open_times(last_open, "1m", 3) == [at(2026, 3, 1), at(2026, 4, 1), at(2026, 5, 1)]
    # A forecast made 2026-03-31T23:00Z starts with March, still open: no candle closed since February's.
    assert closed_since(last_open, "1m", at(2026, 3, 31, 23).astimezone(NEW_YORK)) == 0
    assert closed_since(last_open, "1m", at(2026, 4, 1).astimezone(NEW_YORK)) == 1
    assert closed_since(at(2026, 3, 8, 6).astimezone(NEW_YORK), "1h", at(2026, 3, 8, 8).astimezone(NEW_YORK)) == 1
