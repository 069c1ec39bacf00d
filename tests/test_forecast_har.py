"""HAR-type range variances (Garman-Klass over 1, 5 and 20 bars; Corsi 2009) in `model.volatility_factor`: the
closed form, no candle after the origin, and inference equal to what the walk-forward scores."""


from dataclasses import replace

import numpy as np
import pytest

from candlecast.candles import COLUMNS, Candles
from candlecast.forecast.bench import synthetic_candles
from candlecast.forecast.dataset import read_ohlcv
from candlecast.forecast.features import (
    CONFIGS,
    HAR_WINDOWS,
    ORIGIN_FEATURES,
    RANGE_CAP,
    RANGELESS_FACTOR,
    origin_features,
)
from candlecast.forecast.garch import TRAINING_FIT
from candlecast.forecast.model import HORIZONS, ForecastModel, volatility_factor
from tests.forecast_checks import ROOT, assert_predict_is_what_the_walk_forward_scores, shipped_model

HAR = {"ewma": 0.3, "range": 0.1, "gk1": 0.1, "gk5": 0.15, "gk20": 0.05, "persistence": 0.93}


def test_the_har_terms_enter_the_next_bar_variance_of_the_garch_term_structure():
    rows = np.zeros((2, len(ORIGIN_FEATURES)))
    values = {"vlong": [1.3, 0.7], "park10": [1.5, 0.8], "gk1": [2.0, 0.4], "gk5": [1.2, 0.6], "gk20": [1.1, 0.9]}
    for key, column in values.items():
        rows[:, ORIGIN_FEATURES.index(key)] = column
    factor = volatility_factor(rows, HAR)
    for i, f in enumerate(factor):
        long_run = values["vlong"][i] ** 2
        variance = 0.3 + sum(HAR[key] * values["park10" if key == "range" else key][i] ** 2
                             for key in ("range", *HAR_WINDOWS)) + 0.3 * long_run
        path = []
        for _ in HORIZONS:  # bar by bar: E[s²(k+1)] = L + φ·(E[s²(k)] − L)
            path.append(variance)
            variance = long_run + 0.93 * (variance - long_run)
        np.testing.assert_allclose(f, np.sqrt(np.cumsum(path) / HORIZONS))
    # A file without HAR weights (every file before them) reads none of the range variances.
    plain = {"ewma": 0.5, "range": 0.2, "persistence": 0.9}
    moved = rows.copy()
    moved[:, [ORIGIN_FEATURES.index(key) for key in HAR_WINDOWS]] = 9.0
    np.testing.assert_array_equal(volatility_factor(rows, plain), volatility_factor(moved, plain))


def test_the_range_variances_are_garman_klass_means():
    candles = synthetic_candles(300, seed=2)
    features, sigma = origin_features(candles, CONFIGS["4h"])
    gk = 0.5 * np.log(candles.high / candles.low) ** 2 \
        - (2 * np.log(2) - 1) * np.log(candles.close / candles.open) ** 2
    for key, size in HAR_WINDOWS.items():
        expected = np.sqrt(np.maximum(gk[-size:], 0).mean()) / sigma[-1]
        assert features[-1, ORIGIN_FEATURES.index(key)] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("cut", [30, 400])
def test_the_range_variances_at_an_origin_never_read_a_later_candle(cut):
    candles = synthetic_candles(900, seed=3)
    config = CONFIGS["1h"]
    before, _ = origin_features(candles, config)
    rng = np.random.default_rng(cut)
    changed = {name: getattr(candles, name).copy() for name in COLUMNS}
    for name in ("open", "high", "low", "close"):
        changed[name][cut + 1 :] *= rng.lognormal(0, 0.5, len(candles) - cut - 1)
    changed["high"] = np.maximum.reduce([changed["open"], changed["high"], changed["close"]])
    changed["low"] = np.minimum.reduce([changed["open"], changed["low"], changed["close"]])
    after, _ = origin_features(Candles(**changed), config)
    columns = [ORIGIN_FEATURES.index(key) for key in HAR_WINDOWS]
    np.testing.assert_array_equal(before[: cut + 1, columns], after[: cut + 1, columns])
    assert not np.array_equal(before[cut + 1 :, columns], after[cut + 1 :, columns])


def test_a_har_model_forecasts_at_inference_what_the_walk_forward_scores():
    """predict() on the lookback tail gives what evaluation computes from the whole series' Origins."""
    shipped = shipped_model("4h")
    part = {"window": shipped.lookback - 1, "fit": TRAINING_FIT, "quantiles": shipped.baseline_q, "weight": 0.5,
            "conformal": np.full((len(HORIZONS), 3), 0.05)}
    model = ForecastModel(shipped.payload | {"volatility": HAR, "garch": part, "method": "combined"})
    candles = synthetic_candles(900, seed=11)
    assert_predict_is_what_the_walk_forward_scores(model, candles)
    forecast = model.predict(candles)
    plain = ForecastModel(model.payload | {"volatility": {"ewma": 0.3, "range": 0.1, "persistence": 0.93}})
    assert not np.allclose(plain.predict(candles).lower_80, forecast.lower_80)  # the HAR terms move the intervals


def test_a_bad_print_s_wick_is_winsorized_at_range_cap_sigma():
    """A high ten times the close (a bad print) counts as a range of RANGE_CAP·σ; the bars before it are untouched."""
    candles = synthetic_candles(300, seed=4)
    clean, _ = origin_features(candles, CONFIGS["1h"])
    high = candles.high.copy()
    high[250] = 10 * candles.close[250]
    printed, _ = origin_features(replace(candles, high=high), CONFIGS["1h"])
    assert printed[250, ORIGIN_FEATURES.index("gk1")] == pytest.approx(RANGE_CAP)
    park10 = ORIGIN_FEATURES.index("park10")  # the print adds at most RANGE_CAP² to ten bars' sum of (range / σ)²
    assert printed[250, park10] <= np.sqrt(clean[250, park10] ** 2 + RANGE_CAP**2 / 10)
    np.testing.assert_array_equal(printed[:250], clean[:250])
    assert (clean[1:, ORIGIN_FEATURES.index("gk1")] < RANGE_CAP).all()  # ordinary bars are never winsorized


def test_a_wick_widens_the_shipped_forecast_less_than_a_crash_that_closes_there():
    """Before the cap, one 10x wick on the last hour made the 1h 95 % band 13x wider at h1 and 9x at h30."""
    model = shipped_model("1h")
    candles = read_ohlcv(ROOT / "data" / "BTCUSDT" / "1h.parquet").tail(model.lookback)

    def width_95(changed: Candles) -> np.ndarray:
        forecast = model.predict(changed)
        return np.log(forecast.upper_95 / forecast.lower_95)

    clean = width_95(candles)
    high, low, close = candles.high.copy(), candles.low.copy(), candles.close.copy()
    high[-1] = 10 * close[-1]
    wick = width_95(replace(candles, high=high))
    close[-1] = 0.85 * candles.open[-1]
    low[-1] = min(low[-1], close[-1])
    crash = width_95(replace(candles, low=low, close=close))
    assert (wick <= 2.5 * clean).all() and wick[-1] <= 2 * clean[-1]
    assert (crash > wick).all()


@pytest.mark.parametrize("timeframe", ["1h", "1d"])
def test_two_bad_bars_in_a_row_leave_the_shipped_forecast_as_if_they_were_never_there(timeframe):
    """Two whole bars ×10 in a row got past the neighbour rule: five bars back they made the 1h 95 % band at h30
    ×37,781 (1d: ×2.3 million) instead of ×1.35, and the first step's confidence 0.34 → 0.01."""
    model = shipped_model(timeframe)
    candles = read_ohlcv(ROOT / "data" / "BTCUSDT" / f"{timeframe}.parquet").tail(model.lookback)
    for back in (1, 5, 200):
        bad = [len(candles) - 2 - back, len(candles) - 1 - back]
        prices = {name: getattr(candles, name).copy() for name in ("open", "high", "low", "close")}
        for values in prices.values():
            values[bad] *= 10
        printed = model.predict(replace(candles, **prices))
        without = model.predict(Candles(*(np.delete(getattr(candles, name), bad) for name in COLUMNS)))
        assert np.array_equal(printed.upper_95, without.upper_95) and np.array_equal(printed.close, without.close)


@pytest.mark.parametrize("timeframe", ["1h", "1d"])
def test_a_bad_close_print_before_the_last_bar_leaves_the_shipped_forecast_as_if_it_was_never_there(timeframe):
    """Before `BAD_PRINT_FACTOR`, one 10x close (its high with it) a bar back made the 1h 95 % band 52x wider at h1,
    and 200 bars back still 2.4x at h1 and 4.7x at h30, through the 720-bar long-run variance."""
    model = shipped_model(timeframe)
    candles = read_ohlcv(ROOT / "data" / "BTCUSDT" / f"{timeframe}.parquet").tail(model.lookback)
    for back in (1, 5, 200):
        bad = len(candles) - 1 - back
        close, high = candles.close.copy(), candles.high.copy()
        close[bad] = high[bad] = 10 * close[bad]
        printed = model.predict(replace(candles, close=close, high=high))
        without = model.predict(Candles(*(np.delete(getattr(candles, name), bad) for name in COLUMNS)))
        assert np.array_equal(printed.upper_95, without.upper_95) and np.array_equal(printed.close, without.close)


def _one_trade_bars(sigma: float, count: int, seed: int, step: int) -> tuple[Candles, np.ndarray]:
    """(bars with open = high = low = close, their closes a random walk of one-bar σ `sigma`, then 30 more closes)."""
    rng = np.random.default_rng(seed)
    close = 5 * np.exp(np.cumsum(rng.normal(0, sigma, count + 30)))
    c = close[:count]
    times = step * (np.arange(count, dtype=np.int64) + 3000)
    bars = Candles(times, c, c.copy(), c.copy(), c.copy(), np.full(count, 100.0))
    return bars, close[count:]


def test_a_rangeless_bar_counts_its_close_to_close_move_as_its_range_variance():
    """One trade a bar (open = high = low = close): every Parkinson and Garman-Klass variance was 0 whatever the closes
    did; now each bar's is its squared close-to-close return (below RANGE_CAP·σ), so gk20 is vr20."""
    bars, _ = _one_trade_bars(0.1, 80, seed=3, step=604_800)
    features, sigma = origin_features(bars, CONFIGS["1w"])
    returns = np.abs(np.diff(np.log(bars.close), prepend=np.log(bars.close[0])))
    np.testing.assert_allclose(features[1:, ORIGIN_FEATURES.index("gk1")], returns[1:] / sigma[1:], rtol=1e-9)
    np.testing.assert_allclose(features[:, ORIGIN_FEATURES.index("gk20")], features[:, ORIGIN_FEATURES.index("vr20")],
                               rtol=1e-9)
    expected_park10 = np.sqrt(np.mean(returns[-10:] ** 2)) / sigma[-1]
    assert features[-1, ORIGIN_FEATURES.index("park10")] == pytest.approx(expected_park10, rel=1e-9)


def test_a_bar_whose_range_is_a_tiny_part_of_its_move_counts_the_move_beyond_rangeless_factor_ranges():
    bars, _ = _one_trade_bars(0.1, 80, seed=3, step=604_800)
    half = 0.001
    near = replace(bars, high=bars.close * np.exp(half), low=bars.close * np.exp(-half))
    features, sigma = origin_features(near, CONFIGS["1w"])
    returns = np.abs(np.diff(np.log(bars.close), prepend=np.log(bars.close[0])))
    expected = np.maximum(np.maximum(returns - RANGELESS_FACTOR * 2 * half, 0) ** 2, 0.5 * (2 * half) ** 2)
    np.testing.assert_allclose(features[1:, ORIGIN_FEATURES.index("gk1")], np.sqrt(expected[1:]) / sigma[1:],
                               rtol=1e-9)


def test_the_shipped_1w_bands_on_one_trade_bars_are_as_wide_as_their_closes_move():
    """Before RANGELESS_FACTOR the 1w model (gk20 weight 0.88) read such a pair's next-bar variance as 0: its factor
    fell to the floor and the 95 % band at h30 was 0.027 in log units for a true 2.15 (coverage 1–4 %, confidence
    0.999). Now 1.03–1.28 times the true width, 20 of 20 covered at h1."""
    model = shipped_model("1w")
    sigma, widths, covered, confidence = 0.1, [], 0, []
    for seed in range(20):
        bars, future = _one_trade_bars(sigma, model.lookback, seed, 604_800)
        forecast = model.predict(bars)
        widths.append(np.log(forecast.upper_95 / forecast.lower_95) / (2 * 1.96 * sigma * np.sqrt(HORIZONS)))
        covered += int(forecast.lower_95[0] <= future[0] <= forecast.upper_95[0])
        confidence.append(forecast.confidence[0])
    width = np.mean(widths, axis=0)  # the band's log-width over the true 95 % log-width, per horizon
    assert (width > 0.7).all() and (width < 2.0).all()
    assert covered >= 17 and np.mean(confidence) < 0.7


@pytest.mark.shared
@pytest.mark.parametrize("timeframe", ["1w", "1m"])
def test_no_training_bar_reaches_the_rangeless_rule(shared_data, timeframe):
    """RANGELESS_FACTOR leaves every training feature as the committed models were fitted on: no bar's move is more
    than RANGELESS_FACTOR times its range (in ../shared the smallest range / |move| is 0.98 at 1w and 1m, 0.43 at 1d
    and 4h, 0.0945 at 1h)."""
    from candlecast.forecast.train import load_before_holdout

    loaded, _ = load_before_holdout(shared_data / "ohlcv", timeframe)
    for _, candles in loaded:
        log_close = np.log(candles.close)
        moves = np.abs(np.diff(log_close, prepend=log_close[0]))
        assert (moves <= RANGELESS_FACTOR * np.log(candles.high / candles.low)).all()
