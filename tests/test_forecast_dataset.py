"""Reading and resampling OHLCV candles: UTC buckets, Monday weeks, calendar months, incomplete buckets."""

import re
from datetime import UTC, datetime

import numpy as np
import pytest

from candlecast.candles import Candles
from candlecast.forecast.dataset import bucket_starts, describe_file, read_ohlcv, resample
from candlecast.forecast.sample import write_parquet
from candlecast.timeframes import bucket_start


def hourly(start: str, hours: int) -> Candles:
    first = int(datetime.fromisoformat(start).replace(tzinfo=UTC).timestamp())
    close = 100 + np.arange(hours, dtype=float)
    return Candles(
        open_time=first + 3600 * np.arange(hours, dtype=np.int64),
        open=close - 0.5, high=close + 1, low=close - 1, close=close, volume=np.ones(hours),
    )


def epoch(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


@pytest.mark.parametrize("timeframe", ["1h", "4h", "1d", "1w", "1m"])
def test_bucket_starts_match_timeframes_bucket_start(timeframe):
    rng = np.random.default_rng(3)
    times = rng.integers(epoch("2015-01-01T00:00:00"), epoch("2026-12-31T00:00:00"), 2000)
    expected = [int(bucket_start(datetime.fromtimestamp(t, UTC), timeframe).timestamp()) for t in times]
    assert bucket_starts(times, timeframe).tolist() == expected


def test_weeks_start_on_monday_and_the_incomplete_first_and_last_weeks_are_dropped():
    # 2024-01-03 is a Wednesday: the week of Monday 2024-01-01 has data from its third day only, and is dropped.
    weekly = resample(hourly("2024-01-03T00:00:00", 24 * 16), "1h", "1w")
    opens = [datetime.fromtimestamp(t, UTC) for t in weekly.open_time]
    # data ends Thursday 2024-01-18 23:00, so the week of Monday 2024-01-15 is incomplete and dropped
    assert opens == [datetime(2024, 1, 8, tzinfo=UTC)]
    second = hourly("2024-01-03T00:00:00", 24 * 16)
    inside = (second.open_time >= epoch("2024-01-08T00:00:00")) & (second.open_time < epoch("2024-01-15T00:00:00"))
    assert weekly.open[0] == second.open[inside][0]
    assert weekly.close[0] == second.close[inside][-1]
    assert weekly.high[0] == second.high[inside].max()
    assert weekly.low[0] == second.low[inside].min()
    assert weekly.volume[0] == inside.sum()
    # From the week's first hour on, that week is whole and kept.
    assert resample(hourly("2024-01-01T00:00:00", 24 * 7), "1h", "1w").open_time.tolist() == [epoch("2024-01-01")]


def test_a_month_whose_data_starts_after_it_opens_is_not_stored_as_a_month():
    """December 2023 from its last 7 days is not December's candle; January 2024, whole, is."""
    daily = hourly("2023-12-25T00:00:00", 38)
    daily = Candles(daily.open_time[0] + (daily.open_time - daily.open_time[0]) * 24, *(
        getattr(daily, name) for name in ("open", "high", "low", "close", "volume")))
    monthly = resample(daily, "1d", "1m")
    assert [datetime.fromtimestamp(t, UTC).strftime("%Y-%m") for t in monthly.open_time] == ["2024-01"]
    assert monthly.volume.tolist() == [31.0]


def test_calendar_months_and_a_complete_last_month_is_kept():
    # 2024-01-01 .. 2024-03-31 23:00 (leap February): three complete months.
    hours = (epoch("2024-04-01T00:00:00") - epoch("2024-01-01T00:00:00")) // 3600
    monthly = resample(hourly("2024-01-01T00:00:00", hours), "1h", "1m")
    assert [datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d") for t in monthly.open_time] == [
        "2024-01-01", "2024-02-01", "2024-03-01"]
    assert monthly.volume.tolist() == [31 * 24, 29 * 24, 31 * 24]
    # one hour short of the end of March: March is dropped
    assert len(resample(hourly("2024-01-01T00:00:00", hours - 1), "1h", "1m")) == 2


def test_daily_to_weekly_and_4h_with_a_gap():
    candles = hourly("2024-01-01T00:00:00", 12)
    keep = np.ones(12, bool)
    keep[5] = False  # a missing hour (exchange maintenance) leaves a partial bucket, which is kept
    gapped = Candles(*(getattr(candles, name)[keep] for name in ("open_time", "open", "high", "low", "close",
                                                                 "volume")))
    four = resample(gapped, "1h", "4h")
    assert len(four) == 3
    assert four.volume.tolist() == [4, 3, 4]


def test_csv_and_parquet_read_the_same_candles(tmp_path):
    csv_path = tmp_path / "BTC-USDT_1h.csv"
    csv_path.write_text(
        "timestamp,open,high,low,close,volume\n"
        "2024-01-01T01:00:00Z,2,3,1,2.5,10\n"
        "2024-01-01T00:00:00Z,1,2,0.5,1.5,5\n"
    )
    from_csv = read_ohlcv(csv_path)
    assert from_csv.open_time.tolist() == [epoch("2024-01-01T00:00:00"), epoch("2024-01-01T01:00:00")]
    parquet_path = tmp_path / "BTCUSDT" / "1h.parquet"
    write_parquet(from_csv, parquet_path)
    from_parquet = read_ohlcv(parquet_path)
    assert from_parquet.to_dict() == from_csv.to_dict()
    assert describe_file(csv_path).pair == describe_file(parquet_path).pair == "BTCUSDT"
    assert describe_file(parquet_path).quote == "USDT"


def test_csv_headers_in_any_case_and_repeated_times_read_once(tmp_path):
    path = tmp_path / "BTC-USDT_1h.csv"
    path.write_bytes(b"\xef\xbb\xbfTimestamp,Open,High,Low,Close,Volume\r\n"  # a spreadsheet's BOM and CRLF
                     b"2024-01-01T00:00:00Z,1,2,0.5,1.5,5\r\n2024-01-01T00:00:00Z,1,2,0.5,1.5,5\r\n")
    candles = read_ohlcv(path)
    assert candles.open_time.tolist() == [epoch("2024-01-01T00:00:00")] and candles.close.tolist() == [1.5]
    path.write_text("timestamp,open,high,low,close,volume\n")
    assert len(read_ohlcv(path)) == 0


@pytest.mark.parametrize(("text", "problem"), [
    ("Date,Open,High,Low,Close,Volume\n2024-01-01,1,2,0.5,1.5,5\n", "no column timestamp"),
    ("timestamp,open,high,low,close\n2024-01-01T00:00:00Z,1,2,0.5,1.5\n", "no column volume"),
    ("timestamp,open,high,low,close,volume\n2024-01-01T00:00:00Z,1,2,abc,1.5,5\n", "line 2: low 'abc' is not a number"),
    ("Timestamp,Open,High,Low,Close,Volume\n2024-01-01T00:00:00Z,1,2,0.5,1.5,5\n\n2024-01-01T01:00:00Z,1,2,0.5,1.5,"
     "5 units\n", "line 4: volume '5 units' is not a number"),
    ("timestamp,open,high,low,close,volume\n2024-01-01T05:00:00Z,1,2,0.5,1.5,5\n01/02/2024,1,2,0.5,1.5,5\n",
     "line 3: timestamp '01/02/2024' is neither ISO 8601 (UTC when it names no zone) nor epoch "
     "seconds, milliseconds or microseconds"),
    ("timestamp,open,high,low,close,volume\n,1,2,0.5,1.5,5\n", "line 2: timestamp '' is neither"),
    ("timestamp,open,high,low,close,volume\n2024-01-01T05:00:00Z,1,2,0.5,1.5,5\n2024-01-01 06:00:00,1,2,0.5,1.5,5\n",
     "some timestamps name a zone"),
])
def test_an_unreadable_file_is_named_with_its_problem(tmp_path, text, problem):
    from candlecast.forecast.dataset import OHLCVError

    path = tmp_path / "BTC-USDT_1h.csv"
    path.write_text(text)
    with pytest.raises(OHLCVError, match=re.escape(problem)) as raised:
        read_ohlcv(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("where", ["missing", "a file"])
def test_a_folder_that_is_missing_or_a_file_is_named_as_such(tmp_path, where):
    from candlecast.forecast.dataset import OHLCVError, load_timeframe

    folder = tmp_path / "nonexistent"
    if where == "a file":
        folder.write_text("")
    problem = "no such directory" if where == "missing" else "not a directory"
    with pytest.raises(OHLCVError, match=f"^{re.escape(str(folder))}: {problem}$"):
        load_timeframe(folder, "1d")


def test_rows_without_a_positive_price_and_flat_outage_rows_are_dropped():
    from candlecast.candles import usable_candles

    candles = hourly("2024-01-01T00:00:00", 8)
    candles.close[1], candles.low[2], candles.open[3] = np.nan, 0.0, -1.0
    candles.open[4] = candles.high[4] = candles.low[4] = candles.close[4]
    candles.volume[4] = 0
    kept = usable_candles(candles)
    assert kept.open_time.tolist() == candles.open_time[[0, 5, 6, 7]].tolist()


def test_a_close_far_from_both_neighbours_is_a_bad_print_and_dropped():
    """A 10× close and a 0.1× one between normal closes are dropped; a real round trip (XRP's November 2020 month,
    2.8× up and back), a step that stays (a listing's first trades, then a new level) and the last close are kept."""
    from candlecast.candles import usable_candles

    candles = hourly("2024-01-01T00:00:00", 12)
    candles.close[:] = 100.0
    candles.close[2] *= 10  # after the invalid row 1, its neighbours are rows 0 and 3
    candles.close[1] = np.nan
    candles.close[5] /= 10
    candles.close[7] *= 2.8
    candles.close[9:] = 700.0
    candles.close[11] = 7000.0  # the last close has no next one to judge it by
    kept = usable_candles(candles)
    assert kept.open_time.tolist() == candles.open_time[[0, 3, 4, 6, 7, 8, 9, 10, 11]].tolist()


def test_two_closes_in_a_row_far_from_both_closes_around_them_are_bad_prints_and_dropped():
    """The rule compared each close with its two neighbours only: two 10× closes in a row got past it, each with
    one neighbour at its own level. Three in a row, a pair that does not clear 5× against both sides, a step that
    stays and a pair the last close ends are kept."""
    from candlecast.candles import usable_candles

    candles = hourly("2024-01-01T00:00:00", 24)
    candles.close[:] = 100.0
    candles.close[2:4] *= 10  # two up
    candles.close[6:8] /= 10  # two down
    candles.close[10:13] *= 10  # three: a level, however short
    candles.close[16], candles.close[17] = 1000.0, 450.0  # the second is not 5× above the closes around them
    candles.close[22:] = 1000.0  # the last close ends the pair: nothing after it to judge it by
    kept = usable_candles(candles)
    dropped = [2, 3, 6, 7]
    assert kept.open_time.tolist() == np.delete(candles.open_time, dropped).tolist()


@pytest.mark.parametrize("stamp", ["2024-01-01T05:00:00Z", "2024-01-01T07:00:00+02:00", "2024-01-01 05:00:00",
                                   "2024-01-01T05:00", "1704085200", "1704085200000", "1704085200000000"])
def test_csv_times_iso_with_or_without_a_zone_or_in_epoch_units(tmp_path, stamp):
    path = tmp_path / "BTC-USDT_1h.csv"
    path.write_text(f"timestamp,open,high,low,close,volume\n{stamp},1,2,0.5,1.5,5\n")
    assert read_ohlcv(path).open_time.tolist() == [epoch("2024-01-01T05:00:00")]


def test_a_file_whose_candles_are_not_its_timeframe_is_refused(tmp_path):
    """One-minute candles in a `_1m` file (1m is a calendar month here) are named, not read as months."""
    from candlecast.forecast.dataset import OHLCVError, load_timeframe

    start = epoch("2024-01-01T00:00:00")
    (tmp_path / "BTC-USDT_1m.csv").write_text("timestamp,open,high,low,close,volume\n" + "".join(
        f"{start + 60 * i},1,1.1,0.9,1,5\n" for i in range(100)))
    with pytest.raises(OHLCVError, match="its candles open a median 1 minute apart, but 1m in a file name means "
                                         "one calendar month") as raised:
        load_timeframe(tmp_path, "1m")
    assert str(raised.value).startswith(str(tmp_path / "BTC-USDT_1m.csv"))
    (tmp_path / "BTC-USDT_1m.csv").unlink()
    hourly_rows = "".join(f"{start + 3600 * i},1,1.1,0.9,1,5\n" for i in range(100) if i % 7)  # gaps are fine
    (tmp_path / "BTC-USDT_1h.csv").write_text("timestamp,open,high,low,close,volume\n" + hourly_rows)
    assert len(load_timeframe(tmp_path, "1h")[0][1]) == 85


def test_series_names_tell_apart_the_same_pair_in_same_named_folders():
    """`a/kraken` and `b/kraken` both hold BTC-USDT: each name keeps as many folders as tell them apart."""
    from pathlib import Path

    from candlecast.forecast.dataset import series_names

    paths = ["data/a/kraken/BTC-USDT_1d.csv", "data/b/kraken/BTC-USDT_1d.csv", "data/coinbase/BTC-USDT_1d.csv",
             "data/a/kraken/ETH-USDT_1d.csv", "data/LTCUSD/1d.parquet"]
    names = series_names([describe_file(Path(path)) for path in paths])
    assert names == ["a/kraken/BTCUSDT", "b/kraken/BTCUSDT", "coinbase/BTCUSDT", "ETHUSDT", "LTCUSD"]
