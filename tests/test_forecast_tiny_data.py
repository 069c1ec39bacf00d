"""`train` on too little data: horizons the walk-forward never tested are not judged, and it does not crash."""

from pathlib import Path

import numpy as np
import pytest

from candlecast.forecast.evaluate import measured
from tests.test_forecast_leakage import calendar_walk

pytest.importorskip("arch")


def daily_csvs(folder: Path, coins: int, years: int) -> Path:
    """`coins` random walks of `years` of daily candles (2012 on) as <COIN>-USD_1d.csv files: 1m resamples them."""
    folder.mkdir(parents=True)
    for seed in range(coins):
        walk = calendar_walk(seed, 0, "1d", years * 365)
        stamps = np.datetime_as_string(walk.open_time.astype("datetime64[s]"), unit="s")
        rows = zip(stamps, walk.open, walk.high, walk.low, walk.close, walk.volume, strict=True)
        (folder / f"C{seed:02d}-USD_1d.csv").write_text("timestamp,open,high,low,close,volume\n" + "".join(
            f"{stamp}Z,{o},{h},{lo},{c},{v}\n" for stamp, o, h, lo, c, v in rows))
    return folder


def test_a_walk_forward_shorter_than_30_months_leaves_the_longest_horizons_untested_not_crashed(tmp_path):
    """Four coins of three years: the 1m test spans under 30 months, so no outcome reaches its longest horizons.
    The shipping rule (`choose`) judges the horizons the test reached (it raised a TypeError on the others)."""
    from candlecast.forecast.train import train_timeframe

    data = daily_csvs(tmp_path / "ohlcv", coins=4, years=3)
    result = train_timeframe("1m", data, tmp_path / "models", None, progress=False, evaluate_only=True)
    for scores in result["comparison"]["methods"].values():
        untested = [h for h, value in enumerate(scores["per_horizon"]["coverage_80"], 1) if not measured(value)]
        assert 0 < len(untested) < 30 and untested == list(range(untested[0], 31))  # the longest horizons
    assert not (tmp_path / "models").exists()
