"""The five timeframes and their calendar arithmetic (UTC; weeks start Monday; `1m` is a calendar month)."""

from calendar import monthrange
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args

Timeframe = Literal["1h", "4h", "1d", "1w", "1m"]
TIMEFRAMES: tuple[Timeframe, ...] = get_args(Timeframe)
FORECAST_STEPS = 30

_FIXED_STEP = {"1h": timedelta(hours=1), "4h": timedelta(hours=4), "1d": timedelta(days=1), "1w": timedelta(weeks=1)}


def _utc(ts: datetime) -> datetime:
    """`ts` in UTC (a naive one is UTC): a year or month read from another zone's wall clock is another candle's."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def bucket_start(ts: datetime, timeframe: Timeframe) -> datetime:
    """The open time of the candle of `timeframe` that contains `ts`."""
    ts = _utc(ts)
    if timeframe == "1h":
        return ts.replace(minute=0, second=0, microsecond=0)
    if timeframe == "4h":
        return ts.replace(hour=ts.hour - ts.hour % 4, minute=0, second=0, microsecond=0)
    day = ts.replace(hour=0, minute=0, second=0, microsecond=0)
    if timeframe == "1d":
        return day
    if timeframe == "1w":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def add_steps(ts: datetime, timeframe: Timeframe, steps: int) -> datetime:
    """`ts` moved forward by `steps` candles of `timeframe`. Months keep the day of the month where the target
    month has it, else take its last day (Jan 31 + 1 month is Feb 28/29): never an error. Candle open times are
    on the grid (`bucket_start`), the 1st of the month, so this only matters for a time that is not."""
    ts = _utc(ts)
    if timeframe != "1m":
        return ts + steps * _FIXED_STEP[timeframe]
    months = ts.month - 1 + steps
    year, month = ts.year + months // 12, months % 12 + 1
    return ts.replace(year=year, month=month, day=min(ts.day, monthrange(year, month)[1]))


def next_open_times(last_open: datetime, timeframe: Timeframe, count: int = FORECAST_STEPS) -> list[datetime]:
    """Open times of the `count` candles that follow the candle opened at `last_open`."""
    return [add_steps(last_open, timeframe, step) for step in range(1, count + 1)]


def closed_since(last_open: datetime, timeframe: Timeframe, at: datetime) -> int:
    """How many candles after the one opened at `last_open` (on the grid) had closed by `at`: 0 when the next
    candle had not closed yet, so a forecast from `last_open` made at `at` starts with the candle still open; n
    when its first n steps were already in the past."""
    last_open, at = _utc(last_open), _utc(at)
    if timeframe == "1m":
        months = (at.year - last_open.year) * 12 + at.month - last_open.month
        if add_steps(last_open, timeframe, months) > at:
            months -= 1
        return max(0, months - 1)
    return max(0, int((at - last_open) // _FIXED_STEP[timeframe]) - 1)


def nominal_seconds(timeframe: Timeframe) -> int:
    """Typical length of one candle in seconds (a month counts 30.44 days)."""
    if timeframe == "1m":
        return int(30.436875 * 86400)
    return int(_FIXED_STEP[timeframe].total_seconds())
