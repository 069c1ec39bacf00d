"""Candles as column arrays (numpy), oldest first. Imported only by code paths that need numpy."""

from dataclasses import dataclass

import numpy as np

from candlecast.timeframes import nominal_seconds

COLUMNS = ("open_time", "open", "high", "low", "close", "volume")
_PACKED_FORMAT = 1
# Open times a stored series may hold: 1970 up to a year whose forecast steps still fit in a datetime.
MAX_OPEN_TIME = 221_845_392_000  # 9000-01-01T00:00:00Z
# A close this many times above (or below a fifth of) both neighbouring closes is a bad print (a shifted decimal
# point, say): no real series in ../shared reverts even 3× within one bar, at any timeframe.
BAD_PRINT_FACTOR = 5.0
# Bad prints come alone or two in a row: when only lone ones were dropped, two ×10 hours five bars back made the 1h
# h30 95 % band's upper/lower 37,781 (1.35 without). No real series in ../shared has even two closes in a row 2×
# away from both closes around them, so training reads the same candles.
BAD_PRINT_RUN = 2
_GRID_SECONDS = {"1h": 3600, "4h": 4 * 3600, "1d": 86400, "1w": 7 * 86400}
_FIRST_MONDAY = 4 * 86400  # 1970-01-05, the first week's start (1970-01-01 was a Thursday)


def off_grid(open_time: np.ndarray, timeframe: str) -> np.ndarray:
    """Open times that are not a `timeframe` candle's open (`timeframes.bucket_start` of themselves): hours on the
    hour, 4h at 00/04/…/20, days at midnight, weeks on Monday midnight, months on the 1st (all UTC)."""
    times = np.asarray(open_time, dtype=np.int64)
    if timeframe == "1m":
        month_starts = times.astype("datetime64[s]").astype("datetime64[M]").astype("datetime64[s]").astype(np.int64)
        return times != month_starts
    origin = _FIRST_MONDAY if timeframe == "1w" else 0
    return (times - origin) % _GRID_SECONDS[timeframe] != 0


@dataclass(frozen=True)
class Candles:
    open_time: np.ndarray  # int64 epoch seconds, UTC, candle open time
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray

    def __len__(self) -> int:
        return len(self.open_time)

    def tail(self, count: int) -> "Candles":
        return Candles(*(getattr(self, name)[-count:] for name in COLUMNS))

    def head(self, count: int) -> "Candles":
        """The first `count` candles: what was known at the origin that ends them."""
        return Candles(*(getattr(self, name)[:count] for name in COLUMNS))

    def damage(self, timeframe: str | None = None, now: int | None = None) -> str | None:
        """Why these rows cannot be a stored series (open times that do not rise strictly, are no date, or, given
        its `timeframe`, are off that timeframe's grid: `off_grid`), or None. Prices are not checked here:
        `usable_candles` drops bad rows. A series off the grid would be continued off it (1d steps at noon), and
        a month series on the 29th-31st has no next candle at all. Given `now` (epoch seconds) too, an open time
        more than one bar after it is damage: a candle that cannot have traded, whose forecast would lie years
        ahead and whose file the catch-up from Polygon would never extend."""
        times = self.open_time
        if len(times) and (int(times.min()) < 0 or int(times.max()) >= MAX_OPEN_TIME):
            return "open times outside 1970-9000"
        if len(times) > 1 and not bool(np.all(times[1:] > times[:-1])):
            return "open times not strictly increasing"
        if timeframe in _GRID_SECONDS or timeframe == "1m":
            wrong = np.flatnonzero(off_grid(times, timeframe))
            if len(wrong):
                first = np.datetime_as_string(times[wrong[0]].astype("datetime64[s]"), unit="s")
                return f"{len(wrong)} open times off the {timeframe} grid (the first {first}Z)"
            if now is not None and len(times) and int(times[-1]) > now + nominal_seconds(timeframe):
                last = np.datetime_as_string(times[-1].astype("datetime64[s]"), unit="s")
                return f"open times in the future (the last {last}Z)"
        return None

    def to_dict(self) -> dict[str, list]:
        return {name: getattr(self, name).tolist() for name in COLUMNS}

    @classmethod
    def from_dict(cls, columns: dict) -> "Candles":
        return cls(
            open_time=np.asarray(columns["open_time"], dtype=np.int64),
            **{name: np.asarray(columns[name], dtype=np.float64) for name in COLUMNS[1:]},
        )

    def pack(self, requested: int) -> bytes:
        """Compact bytes for the fresh-candles cache: a header (format, `requested`, rows), then the columns.

        Decoding is a view over the buffer, about a hundred times cheaper than JSON for a model's lookback.
        """
        header = np.array([_PACKED_FORMAT, requested, len(self)], dtype=np.int64)
        prices = np.vstack([getattr(self, name).astype(np.float64) for name in COLUMNS[1:]])
        return header.tobytes() + self.open_time.astype(np.int64).tobytes() + prices.tobytes()

    @classmethod
    def unpack(cls, data: bytes) -> tuple["Candles", int] | None:
        """(candles, requested) from `pack`'s bytes; None for anything else (an older format)."""
        if len(data) < 24:
            return None
        packed_format, requested, rows = np.frombuffer(data, dtype=np.int64, count=3)
        if packed_format != _PACKED_FORMAT or len(data) != 24 + 8 * rows * len(COLUMNS):
            return None
        open_time = np.frombuffer(data, dtype=np.int64, count=rows, offset=24)
        prices = np.frombuffer(data, dtype=np.float64, offset=24 + 8 * rows).reshape(len(COLUMNS) - 1, rows)
        return cls(open_time, *prices), int(requested)


def priced(candles: Candles) -> np.ndarray:
    """Rows whose open, high, low and close are all finite and positive."""
    prices = np.vstack([candles.open, candles.high, candles.low, candles.close])
    return np.isfinite(prices).all(axis=0) & (prices > 0).all(axis=0)


def possible(candles: Candles) -> np.ndarray:
    """Rows a market could have printed: `priced`, a high at or above the open and close, a low at or below them,
    and a finite volume that is not negative. The ingest stores only these; a bar that passes may still be a bad
    print (a close far from both neighbours), which needs its neighbours to judge and is `usable_candles`'s to
    drop at read time, as it does in files written before the ingest checked."""
    return (priced(candles) & (candles.high >= np.maximum(candles.open, candles.close))
            & (candles.low <= np.minimum(candles.open, candles.close))
            & np.isfinite(candles.volume) & (candles.volume >= 0))


def flat_fills(candles: Candles) -> np.ndarray:
    """Rows with no trade: zero volume and one price (high == low), as exchanges fill an outage."""
    return (candles.volume == 0) & (candles.high == candles.low)


def _judged(candles: Candles) -> tuple[np.ndarray, np.ndarray]:
    """(rows kept before the bad-print rule, the bad prints among them): `usable_candles`' two steps."""
    valid = priced(candles)
    flat = flat_fills(candles)
    keep = valid & ~flat if (valid & ~flat).sum() >= 3 else valid
    kept = np.flatnonzero(keep)
    log_close = np.log(candles.close[kept])
    limit = np.log(BAD_PRINT_FACTOR)
    bad = np.zeros(len(candles), dtype=bool)
    for run in range(1, min(BAD_PRINT_RUN, len(kept) - 2) + 1):
        inside = np.lib.stride_tricks.sliding_window_view(log_close[1:-1], run)  # each run of `run` closes
        before, after = log_close[: len(inside)], log_close[run + 1 :]  # the closes around it
        bad_run = ((inside.min(axis=1) - np.maximum(before, after) > limit)
                   | (inside.max(axis=1) - np.minimum(before, after) < -limit))
        for offset in range(run):
            bad[kept[1 + offset : 1 + offset + len(inside)][bad_run]] = True
    return keep, bad


def bad_prints(candles: Candles) -> np.ndarray:
    """Rows whose close `usable_candles` drops as a bad print (the rule it states). The scorer leaves a step whose
    candle is one unscored, as the forecaster never uses it."""
    return _judged(candles)[1]


def usable_candles(candles: Candles) -> Candles:
    """Drop rows with missing or non-positive prices, flat zero-volume rows (outage fills), and bad close prints:
    what training (`forecast.dataset.load_timeframe`) and the service forecast from.

    Flat rows are kept when too few others are left (a very illiquid symbol). A bad print is a close more than
    BAD_PRINT_FACTOR times above, or below 1/BAD_PRINT_FACTOR of, both neighbouring closes, or one of a run of up
    to BAD_PRINT_RUN closes that all are, each against both closes around the run; the last close has no next one,
    so it is never judged (nor a run it ends).
    """
    keep, bad = _judged(candles)
    keep &= ~bad
    if keep.all():
        return candles
    return Candles(*(getattr(candles, name)[keep] for name in COLUMNS))
