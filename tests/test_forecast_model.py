"""Forecast invariants, signed model files, the numpy tree evaluator and numpy-only inference."""

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from candlecast.config import LOCAL_MODEL_SIGNING_KEY
from candlecast.errors import ModelIntegrityError
from candlecast.forecast import artifact
from candlecast.forecast.bench import synthetic_candles
from candlecast.forecast.dataset import read_ohlcv
from candlecast.forecast.features import MEDIAN
from candlecast.forecast.model import ForecastModel, evaluate_trees
from candlecast.timeframes import TIMEFRAMES

ROOT = Path(__file__).resolve().parent.parent
KEY = LOCAL_MODEL_SIGNING_KEY.encode()


def shipped(timeframe: str) -> tuple[bytes, str]:
    path = ROOT / "models" / f"{timeframe}.pkl"
    return path.read_bytes(), Path(f"{path}.sig").read_text().strip()


@pytest.mark.parametrize("timeframe", TIMEFRAMES)
def test_shipped_models_give_30_ordered_candles(timeframe):
    model = artifact.verify_and_load(*shipped(timeframe), KEY)
    assert model.timeframe == timeframe and model.kind in ("baseline", "learned")
    samples = [synthetic_candles(model.lookback + 20, seed) for seed in range(3)]
    for path in sorted((ROOT / "data").glob(f"*/{timeframe}.parquet")):
        samples.append(read_ohlcv(path))
    samples.append(synthetic_candles(model.config.min_history))  # the least history a forecast takes
    for candles in samples:
        forecast = model.predict(candles)
        for name in ("open", "high", "low", "close", "lower_80", "upper_80", "lower_95", "upper_95", "confidence"):
            values = getattr(forecast, name)
            assert values.shape == (30,) and np.isfinite(values).all(), name
        assert forecast.open[0] == candles.close[-1]
        assert np.allclose(forecast.close, candles.close[-1], rtol=1e-12, atol=0)  # the median is the random walk
        assert np.array_equal(forecast.open[1:], forecast.close[:-1])
        assert (forecast.low <= np.minimum(forecast.open, forecast.close)).all()
        assert (forecast.high >= np.maximum(forecast.open, forecast.close)).all()
        assert (forecast.low > 0).all()
        assert ((forecast.confidence >= 0) & (forecast.confidence <= 1)).all()
        assert (forecast.lower_95 <= forecast.lower_80).all() and (forecast.lower_80 <= forecast.close).all()
        assert (forecast.close <= forecast.upper_80).all() and (forecast.upper_80 <= forecast.upper_95).all()
        # uncertainty grows with the horizon
        width = np.log(forecast.upper_80 / forecast.lower_80)
        assert width[-1] > width[0]


@pytest.mark.parametrize("timeframe", TIMEFRAMES)
def test_a_coin_priced_in_btc_gets_the_same_forecast_in_relative_terms(timeframe):
    """The issue's second unseen set is coins priced in BTC (prices near 1e-5 to 1e-8): every shipped model reads
    prices only through log returns and ranges, so rescaling them rescales the forecast and changes nothing else."""
    model = artifact.verify_and_load(*shipped(timeframe), KEY)
    candles = read_ohlcv(ROOT / "data" / "ETHUSDT" / f"{timeframe}.parquet")
    in_usdt = model.predict(candles)
    rate = 3e-8
    in_btc = model.predict(type(candles)(candles.open_time, candles.open * rate, candles.high * rate,
                                         candles.low * rate, candles.close * rate, candles.volume))
    for name in ("open", "high", "low", "close", "lower_80", "upper_80", "lower_95", "upper_95"):
        assert np.allclose(getattr(in_btc, name) / rate, getattr(in_usdt, name), rtol=1e-9, atol=0), name
    assert np.allclose(in_btc.confidence, in_usdt.confidence, rtol=0, atol=1e-9)


def test_tampered_unsigned_and_mismatched_files_are_refused():
    data, signature = shipped("1d")
    assert artifact.verify_and_load(data, signature, KEY, artifact.sha256_hex(data)).timeframe == "1d"
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0x01
    with pytest.raises(ModelIntegrityError, match="signature does not match"):
        artifact.verify_and_load(bytes(tampered), signature, KEY)
    with pytest.raises(ModelIntegrityError, match="unsigned"):
        artifact.verify_and_load(data, None, KEY)
    with pytest.raises(ModelIntegrityError, match="unsigned"):
        artifact.verify_and_load(data, "", KEY)
    with pytest.raises(ModelIntegrityError, match="signature does not match"):
        artifact.verify_and_load(data, signature, b"another key")
    with pytest.raises(ModelIntegrityError, match="signature does not match"):
        artifact.verify_and_load(data, "é" * 64, KEY)
    with pytest.raises(ModelIntegrityError, match="sha256 does not match"):
        artifact.verify_and_load(data, signature, KEY, "0" * 64)
    with pytest.raises(ModelIntegrityError, match="no model signing key"):
        artifact.verify_and_load(data, signature, b"")


def test_a_malicious_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(ModelIntegrityError):
        artifact.verify_and_load(evil, artifact.sign(evil, b"attacker key"), KEY)
    assert not marker.exists()


def test_numpy_trees_match_lightgbm():
    lgb = pytest.importorskip("lightgbm")
    from candlecast.forecast.trees import export_boosters

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 4))
    y = x[:, 0] + rng.standard_t(3, size=3000)
    boosters = [
        lgb.train({"objective": "quantile", "alpha": a, "num_leaves": 8, "max_depth": 3, "verbose": -1},
                  lgb.Dataset(x, y), num_boost_round=20)
        for a in (0.1, 0.5, 0.9)
    ]
    test = rng.normal(size=(500, 4))
    expected = np.column_stack([booster.predict(test) for booster in boosters])
    assert np.allclose(evaluate_trees(export_boosters(boosters), test), expected, atol=1e-12)


def test_inference_imports_only_numpy_and_joblib():
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from candlecast.forecast import artifact\n"
        "from candlecast.candles import Candles\n"
        "import numpy as np\n"
        f"path = Path({str(ROOT / 'models' / '1h.pkl')!r})\n"
        "model = artifact.verify_and_load(path.read_bytes(), Path(str(path) + '.sig').read_text(),"
        f" {KEY!r})\n"
        "c = np.linspace(100, 120, 300)\n"
        "model.predict(Candles(np.arange(300, dtype=np.int64) * 3600, c, c * 1.01, c * 0.99, c, np.ones(300)))\n"
        "heavy = {'pandas', 'scipy', 'sklearn', 'lightgbm', 'pyarrow', 'matplotlib'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_model_dict_is_plain_data():
    model = artifact.verify_and_load(*shipped("1h"), KEY)
    allowed = (str, int, float, bool, type(None), np.ndarray, np.generic)

    def check(value):
        if isinstance(value, dict):
            for item in value.values():
                check(item)
        elif isinstance(value, list | tuple):
            for item in value:
                check(item)
        else:
            assert isinstance(value, allowed), type(value)

    check(model.payload)
    assert isinstance(ForecastModel(model.payload), ForecastModel)


def test_features_of_the_lookback_tail_equal_those_of_the_whole_series():
    from candlecast.forecast.features import CONFIGS, origin_features

    candles = synthetic_candles(1500, seed=4)
    for timeframe, config in CONFIGS.items():
        whole, whole_sigma = origin_features(candles, config)
        tail, tail_sigma = origin_features(candles.tail(config.lookback), config)
        assert np.allclose(tail[-1], whole[-1], rtol=1e-7, atol=1e-9), timeframe
        assert np.isclose(tail_sigma[-1], whole_sigma[-1], rtol=1e-10)


def test_bad_rows_are_skipped_and_too_little_history_is_refused():
    model = artifact.verify_and_load(*shipped("1h"), KEY)
    candles = synthetic_candles(300, seed=5)
    broken = candles.close.copy()
    broken[-10] = np.nan
    broken[-20] = 0.0
    damaged = type(candles)(candles.open_time, candles.open, candles.high, candles.low, broken, candles.volume)
    forecast = model.predict(damaged)
    assert np.isfinite(forecast.close).all() and np.isfinite(forecast.confidence).all()
    assert model.config.min_history == 48
    with pytest.raises(ValueError, match="at least 48 candles"):
        model.predict(synthetic_candles(47))
    assert np.isfinite(model.predict(synthetic_candles(48)).close).all()


def test_volatility_factor_is_the_garch_term_structure_in_closed_form():
    from candlecast.forecast.features import ORIGIN_FEATURES
    from candlecast.forecast.model import HORIZONS, volatility_factor

    rows = np.zeros((2, len(ORIGIN_FEATURES)))
    rows[:, ORIGIN_FEATURES.index("vlong")] = [2.0, 0.5]  # long-run σ relative to the EWMA σ
    rows[:, ORIGIN_FEATURES.index("park10")] = [1.5, 0.8]
    volatility = {"ewma": 0.5, "range": 0.2, "persistence": 0.9}
    factor = volatility_factor(rows, volatility)
    for row, f in zip(rows, factor, strict=True):
        long_run = row[ORIGIN_FEATURES.index("vlong")] ** 2
        variance = 0.5 + 0.2 * row[ORIGIN_FEATURES.index("park10")] ** 2 + 0.3 * long_run
        path = []
        for _ in HORIZONS:  # bar by bar: E[s²(k+1)] = L + φ·(E[s²(k)] − L)
            path.append(variance)
            variance = long_run + 0.9 * (variance - long_run)
        np.testing.assert_allclose(f, np.sqrt(np.cumsum(path) / HORIZONS))
    assert factor[0, -1] > factor[0, 0] and factor[1, -1] < factor[1, 0]  # reverts toward the long-run level
    assert (volatility_factor(rows, None) == 1).all()
    assert np.allclose(volatility_factor(rows, {"ewma": 1.0, "range": 0.0, "persistence": 1.0}), 1.0)


def test_volatility_weights_at_the_optimiser_s_extremes_are_exact_and_silent():
    from candlecast.forecast.train import HAR_ESTIMATES, _volatility

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the persistence's logistic must not overflow as Nelder-Mead runs off
        vanishing, lasting = (_volatility(np.array([0.0, 0, 0, 0, 0, bound]), HAR_ESTIMATES) for bound in (-800, 800))
    assert vanishing["persistence"] == 0.0 and lasting["persistence"] == 1.0
    assert sum(vanishing[key] for key in HAR_ESTIMATES) == pytest.approx(5 / 6)  # the rest is the long-run level


def test_confidence_map_is_increasing_and_not_flat_at_the_top():
    from candlecast.forecast.train import logistic_map

    rng = np.random.default_rng(0)
    raw = rng.beta(1.2, 6, 20000)  # most forecasts are unconfident, few are confident
    hit = (rng.random(len(raw)) < np.clip(raw * 0.9, 0, 1)).astype(float)
    fields = logistic_map(raw, hit)
    x, y = fields["confidence_x"], fields["confidence_y"]
    assert fields["confidence_ln_h"] is None  # plain Platt: the knots are the whole map
    assert (np.diff(x) > 0).all() and (np.diff(y) >= 0).all()
    for level in (0.1, 0.3, 0.6):
        assert abs(np.interp(level, x, y) - 0.9 * level) < 0.03
    assert np.interp(0.8, x, y) > np.interp(0.6, x, y) + 0.1  # still rising where data are sparse


def ln_h_pairs(effect: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw confidence, horizon and hit of pairs whose true map is sigmoid(logit(raw) − 0.3 + effect·ln h)."""
    from candlecast.forecast.model import HORIZONS

    rng = np.random.default_rng(seed)
    raw = rng.beta(1.5, 4, 60000)
    horizons = rng.choice(HORIZONS, len(raw))
    logit = np.log(raw / (1 - raw)) - 0.3 + effect * np.log(horizons)
    return raw, horizons, (rng.random(len(raw)) < 1 / (1 + np.exp(-logit))).astype(float)


def map_model(fields: dict) -> ForecastModel:
    from candlecast.forecast.train import payload

    return ForecastModel(payload("1d", "baseline", baseline_q=np.zeros((30, 7))) | fields)


def test_the_ln_h_map_finds_the_horizon_effect_and_is_increasing_in_raw_confidence_at_every_horizon():
    from candlecast.forecast.model import HORIZONS
    from candlecast.forecast.train import logistic_map

    raw, horizons, hit = ln_h_pairs(effect=-0.25)  # a raw confidence means less at long horizons
    fields = logistic_map(raw, hit, horizons)
    assert abs(fields["confidence_ln_h"] + 0.25) < 0.05
    model = map_model(fields)
    grid = np.linspace(0, 1, 501)
    mapped = model.calibrated(np.repeat(grid[:, None], len(HORIZONS), axis=1))  # (raw, horizon)
    assert (np.diff(mapped, axis=0) > 0).all()  # strictly increasing in raw at every horizon
    assert (np.diff(mapped, axis=1) < 0).all()  # and, at one raw confidence, lower the longer the horizon
    for h in (1, 5, 30):  # the fitted map at each horizon is the true one
        truth = 1 / (1 + np.exp(-(np.log(grid[100:-100] / (1 - grid[100:-100])) - 0.3 - 0.25 * np.log(h))))
        assert np.abs(mapped[100:-100, h - 1] - truth).max() < 0.03
    # Plain Platt on the same pairs is one map for all horizons: it misses the effect where ln h is far from its mean.
    plain = map_model(logistic_map(raw, hit)).calibrated(np.repeat(grid[:, None], len(HORIZONS), axis=1))
    assert (plain[:, 0] == plain[:, -1]).all()
    assert np.abs(plain[250, 0] - mapped[250, 0]) > 0.03


def test_the_ln_h_map_with_coefficient_0_is_plain_platt():
    from candlecast.forecast.model import HORIZONS
    from candlecast.forecast.train import logistic_map

    raw, horizons, hit = ln_h_pairs(effect=0.0)
    plain, with_h = logistic_map(raw, hit), logistic_map(raw, hit, horizons)
    assert abs(with_h["confidence_ln_h"]) < 0.03  # no horizon effect in the data: c ≈ 0, the same knots
    np.testing.assert_allclose(with_h["confidence_y"], plain["confidence_y"], atol=0.01)
    rows = np.random.default_rng(1).random((50, len(HORIZONS)))
    expected = map_model(plain).calibrated(rows)
    for c in (0.0, None):  # exactly 0 (or absent, None) is the plain map, bit for bit
        assert np.array_equal(map_model(plain | {"confidence_ln_h": c}).calibrated(rows), expected)
    without = plain.copy()
    without.pop("confidence_ln_h")
    assert np.array_equal(map_model(without).calibrated(rows), expected)


@pytest.mark.parametrize("timeframe", TIMEFRAMES)
def test_shipped_models_map_confidence_by_their_knots_alone(timeframe):
    """Files written before the ln h option have no `confidence_ln_h`: their confidence is the knots' map as before."""
    model = artifact.verify_and_load(*shipped(timeframe), KEY)
    if "confidence_ln_h" not in model.payload:
        assert model.confidence_ln_h == 0.0
    raw = np.random.default_rng(2).random((200, 30))
    old = np.clip(np.interp(raw, model.confidence_x, model.confidence_y), 0.0, 1.0)
    mapped = model.calibrated(raw)
    if model.confidence_ln_h == 0.0:
        assert np.array_equal(mapped, old)
    else:  # a file trained with the option: its knots are the map at h = 1
        np.testing.assert_allclose(mapped[:, 0], old[:, 0], atol=1e-9)


def test_a_horizon_whose_pairs_all_gained_keeps_the_median_at_the_random_walk():
    """At a long 1m horizon every pair may be a gain: the lower quantiles then move to 0, not into the median."""
    from candlecast.forecast.train import empirical_quantiles

    z = np.random.default_rng(3).normal(size=(500, 30))
    z[:, 27:] = np.abs(z[:, 27:]) + 0.5
    table = empirical_quantiles(z)
    assert (table[:, MEDIAN] == 0).all()
    assert (table[27:, :MEDIAN + 1] == 0).all() and (table[27:, MEDIAN + 1:] > 0.5).all()
    assert np.array_equal(table[:27], np.sort(table[:27], axis=1)) and (table[:27, 0] < -1).all()


def test_baseline_spread_never_shrinks_with_the_horizon():
    from candlecast.forecast.model import HORIZONS
    from candlecast.forecast.train import monotone_spread

    table = np.tile(np.array([-2.0, -1.3, -0.7, 0.0, 0.7, 1.3, 2.0]), (30, 1))
    table[20:] *= 0.5  # a regime or a handful of pairs made the long horizons narrow
    fixed = monotone_spread(table)
    in_log_returns = fixed * np.sqrt(HORIZONS)[:, None]
    assert (np.diff(in_log_returns[:, 4:], axis=0) >= -1e-12).all()
    assert (np.diff(in_log_returns[:, :3], axis=0) <= 1e-12).all()
    np.testing.assert_allclose(fixed[:20], table[:20])  # already monotone: unchanged


def test_an_ln_h_map_that_would_fall_in_raw_confidence_is_plain_platt():
    from candlecast.forecast.train import logistic_fit, logistic_map, platt_design

    rng = np.random.default_rng(3)
    horizons = rng.integers(1, 31, 40000)
    noise = rng.normal(0, 0.03, len(horizons))
    # Across horizons raw confidence tracks the hits; within one horizon it falls as they rise.
    raw = np.clip(0.6 / np.sqrt(horizons) + noise, 0.01, 0.99)
    hit = (rng.random(len(raw)) < np.clip(0.5 / horizons ** 0.7 - 2 * noise, 0.01, 0.99)).astype(float)
    theta, converged = logistic_fit(platt_design(raw, horizons), hit)
    assert converged and theta[0] < 0
    fields = logistic_map(raw, hit, horizons)
    assert fields["confidence_ln_h"] is None  # the map without ln h, increasing in raw confidence
    assert (np.diff(fields["confidence_y"]) > 0).all()


def test_an_ln_h_map_on_a_few_separable_pairs_is_plain_platt():
    """13 pairs, one hit (1w's first walk-forward fold): the three coefficients run off, so no ln h term below
    MIN_PAIRS_PER_HORIZON hits or misses."""
    from candlecast.forecast.train import logistic_fit, logistic_map, platt_design

    raw = np.linspace(0.05, 0.6, 13)
    horizons = np.arange(1, 14)
    hit = (horizons == 13).astype(float)
    assert abs(logistic_fit(platt_design(raw, horizons), hit)[0][2]) > 10  # c runs off
    fields = logistic_map(raw, hit, horizons)
    assert fields["confidence_ln_h"] is None
    assert np.array_equal(fields["confidence_y"], logistic_map(raw, hit)["confidence_y"])


def test_a_confidence_map_fitted_on_a_few_separated_pairs_stays_finite():
    """Ten misses below ten hits in raw confidence: the maximum-likelihood slope on 1/0 targets runs off to a step
    (a raw 0.47 mapped to certainty), as in 1d's first walk-forward folds; on Platt's targets the map stays short of
    the hits' own smoothed rate."""
    from candlecast.forecast.train import logistic_fit, logistic_map, platt_design, platt_targets

    raw = np.concatenate([np.linspace(0.40, 0.44, 10), np.linspace(0.46, 0.50, 10)])
    hit = np.repeat([0.0, 1.0], 10)
    assert logistic_fit(platt_design(raw), hit)[0][0] > 100  # the step
    assert np.allclose(platt_targets(hit), np.repeat([1 / 12, 11 / 12], 10))
    fields = logistic_map(raw, hit)
    x, y = fields["confidence_x"], fields["confidence_y"]
    assert (np.diff(y) >= 0).all()
    assert np.interp(0.47, x, y) < 11 / 12 + 0.01 and np.interp(0.43, x, y) > 1 / 12 - 0.01


def test_a_map_where_raw_confidence_tells_nothing_is_the_rate_of_hits():
    """On a few pairs where higher raw confidence comes with fewer hits (Platt's slope ≤ 0), every forecast gets the
    smoothed rate of hits: no step to certainty fitted to a handful of pairs (an isotonic fit said 1.0 there)."""
    from candlecast.forecast.model import HORIZONS
    from candlecast.forecast.train import logistic_map

    raw = np.linspace(0.05, 0.45, 12)
    hit = np.array([1.0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1])  # the most confident one a hit
    fields = logistic_map(raw, hit)
    rate = (hit.sum() + 1) / (len(hit) + 2)
    model = map_model(fields)
    assert np.allclose(model.calibrated(np.full((3, len(HORIZONS)), [[0.05], [0.3], [0.99]])), rate)
