"""The numpy GARCH(1,1) fitted at each origin (`candlecast.forecast.garch`): it finds GARCH dynamics where they
are, agrees with `arch`'s fit, reads only the origin's window, and the models built on it see no future."""

import numpy as np
import pytest

from candlecast.candles import COLUMNS
from candlecast.forecast.bench import synthetic_candles
from candlecast.forecast.features import CONFIGS, origin_features
from candlecast.forecast.garch import FITS, HORIZONS, TRAINING_FIT, fit_params, fit_states, scale_factor, series_states
from tests.forecast_checks import assert_predict_is_what_the_walk_forward_scores, shipped_model


def garch_path(count: int, seed: int, alpha: float = 0.1, beta: float = 0.85) -> tuple[np.ndarray, np.ndarray]:
    """(returns (count,), variances (count + 1,)): variances[i] is return i's, variances[count] the next bar's."""
    rng = np.random.default_rng(seed)
    omega = 1e-4 * (1 - alpha - beta)
    variances, returns = np.empty(count + 1), np.empty(count)
    variances[0] = 1e-4
    for i in range(count):
        returns[i] = np.sqrt(variances[i]) * rng.standard_t(5) * np.sqrt(3 / 5)
        variances[i + 1] = omega + alpha * returns[i] ** 2 + beta * variances[i]
    return returns, variances


def garch_returns(count: int, seed: int, alpha: float = 0.1, beta: float = 0.85) -> np.ndarray:
    return garch_path(count, seed, alpha, beta)[0]


@pytest.mark.parametrize("fit", FITS)
def test_the_fit_finds_the_persistence_of_garch_data_and_none_in_iid_returns(fit):
    fitted = fit_states(np.stack([garch_returns(720, seed) for seed in range(40)]), fit=fit)
    assert 0.9 <= np.median(fitted[:, 2]) <= 0.99  # true α + β = 0.95
    rng = np.random.default_rng(1)
    iid = fit_states(rng.standard_t(5, (40, 720)) * 0.01, fit=fit)
    # i.i.d.: the next-bar variance stays near the long-run level whatever persistence is picked
    assert np.median(np.abs(iid[:, 0] / iid[:, 1] - 1)) < 0.25
    assert np.median(np.abs(fitted[:, 0] / fitted[:, 1] - 1)) > np.median(np.abs(iid[:, 0] / iid[:, 1] - 1))


def arch_against_ours(returns: np.ndarray) -> tuple[float, float, float, float]:
    """(arch's log-likelihood at our fit − at its own fit, our next-bar variance / arch's, our persistence − arch's,
    our ν − arch's), every likelihood computed by `arch` itself on the same window."""
    arch = pytest.importorskip("arch")
    model = arch.arch_model(returns * 100, mean="Zero", vol="GARCH", p=1, q=1, dist="t", rescale=False)
    theirs = model.fit(disp="off", show_warning=False)
    omega, alpha, beta, nu = fit_params(returns[None])[0]
    ours = model.fix([omega * 1e4, alpha, beta, nu])
    state = fit_states(returns[None], fit="mle")[0]
    their_variance = float(theirs.forecast(horizon=1, reindex=False).variance.values[-1, 0]) / 1e4
    _, their_alpha, their_beta, their_nu = np.asarray(theirs.params)
    return (ours.loglikelihood - theirs.loglikelihood, state[0] / their_variance,
            state[2] - (their_alpha + their_beta), nu - their_nu)


@pytest.mark.parametrize("width", [540, 365])  # the 4h and 1d windows
def test_the_fit_is_arch_s_maximum_likelihood_on_simulated_garch(width):
    gaps = np.array([arch_against_ours(garch_returns(width, seed + 100, *ab))
                     for seed, ab in enumerate([(0.1, 0.85), (0.05, 0.9), (0.2, 0.7), (0.03, 0.95)] * 2)])
    assert np.all(gaps[:, 0] > -1e-3), gaps[:, 0]  # never a worse likelihood than arch's own optimum
    np.testing.assert_allclose(gaps[:, 1], 1.0, atol=0.01)
    np.testing.assert_allclose(gaps[:, 2], 0.0, atol=0.005)
    np.testing.assert_allclose(gaps[:, 3], 0.0, atol=0.05)


@pytest.mark.shared
def test_the_fit_is_arch_s_maximum_likelihood_on_real_series(shared_data):
    from candlecast.forecast.dataset import read_ohlcv

    gaps = []
    folder = shared_data / "ohlcv"
    for path in sorted(folder.glob("*_1d.csv"))[:6] + sorted(folder.glob("*_1h.csv"))[:6]:
        close = read_ohlcv(path).close
        returns = np.diff(np.log(close[np.isfinite(close) & (close > 0)]))
        width = 365 if path.name.endswith("_1d.csv") else 720
        for end in (len(returns) // 2, len(returns)):  # a window from the middle and the newest
            if end >= width:
                gaps.append(arch_against_ours(returns[end - width : end]))
    gaps = np.array(gaps)
    assert len(gaps) >= 12
    assert np.all(gaps[:, 0] > -0.02), gaps[:, 0]
    np.testing.assert_allclose(gaps[:, 1], 1.0, atol=0.01)
    np.testing.assert_allclose(gaps[:, 2], 0.0, atol=0.005)


def test_scale_factor_is_the_garch_term_structure():
    states = np.array([[4.0, 1.0, 0.9], [0.25, 1.0, 0.9], [1.0, 1.0, 0.0]])
    factor = scale_factor(states)
    variance, path = 4.0, []
    for _ in HORIZONS:
        path.append(variance)
        variance = 1.0 + 0.9 * (variance - 1.0)
    np.testing.assert_allclose(factor[0], np.sqrt(np.cumsum(path) / HORIZONS))
    assert factor[0, -1] < factor[0, 0] and factor[1, -1] > factor[1, 0]  # both revert toward the long run
    np.testing.assert_allclose(factor[2], 1.0)


def test_the_state_of_the_lookback_tail_equals_the_whole_series():
    candles = synthetic_candles(1500, seed=4)
    for timeframe, config in CONFIGS.items():
        _, sigma = origin_features(candles, config)
        whole = series_states(np.log(candles.close), np.array([len(candles) - 1]), config.lookback - 1, sigma[-1:])
        tail = candles.tail(config.lookback)
        _, tail_sigma = origin_features(tail, config)
        alone = series_states(np.log(tail.close), np.array([len(tail) - 1]), config.lookback - 1, tail_sigma[-1:])
        np.testing.assert_allclose(alone, whole, rtol=1e-9, err_msg=timeframe)


@pytest.mark.parametrize("cut", [5, 200, 900])
def test_the_state_at_an_origin_never_reads_a_later_candle(cut):
    candles = synthetic_candles(1200, seed=6)
    config = CONFIGS["1h"]
    _, sigma = origin_features(candles, config)
    positions = np.arange(cut, 1, -3)[::-1]  # the last is the origin `cut`
    before = series_states(np.log(candles.close), positions, config.lookback - 1, sigma[positions])
    rng = np.random.default_rng(cut)
    changed = {name: getattr(candles, name).copy() for name in COLUMNS}
    changed["close"][cut + 1 :] = rng.lognormal(3, 2, len(candles) - cut - 1)
    after = series_states(np.log(changed["close"]), positions, config.lookback - 1, sigma[positions])
    np.testing.assert_array_equal(before, after)
    assert np.isfinite(before).all()
    # A candle at or before the origin does change it.
    changed["close"][cut] *= 1.3
    moved = series_states(np.log(changed["close"]), positions[-1:], config.lookback - 1, sigma[positions[-1:]])
    assert not np.array_equal(moved, before[-1:])


def test_a_flat_or_tiny_window_gives_the_plain_scale():
    close = np.full(10, 100.0)
    states = series_states(np.log(close), np.array([1, 9]), 720, np.full(2, 0.01))
    assert states[0].tolist() == [1.0, 1.0, 0.0]  # one return: σ·√h
    assert np.isfinite(states).all() and np.isfinite(scale_factor(states)).all()


def test_a_model_with_a_garch_part_forecasts_at_inference_what_the_walk_forward_scores():
    """predict() on a series' candles gives the intervals that evaluation computes from its Origins (same window,
    same state), so what the walk-forward scores is what ships."""
    from candlecast.forecast.evaluate import build_origins
    from candlecast.forecast.model import ForecastModel

    shipped = shipped_model("4h")
    part = {"window": shipped.lookback - 1, "fit": TRAINING_FIT, "quantiles": shipped.baseline_q * 1.1, "weight": 0.5,
            "conformal": np.full((len(HORIZONS), 3), 0.05)}
    model = ForecastModel(shipped.payload | {"garch": part, "method": "combined"})
    candles = synthetic_candles(900, seed=11)
    assert_predict_is_what_the_walk_forward_scores(model, candles)
    origins = build_origins([(None, candles)], model.config)
    with pytest.raises(ValueError, match="GARCH state"):
        model.z_quantiles(origins.features[-1:])


@pytest.mark.parametrize(("timeframe", "wide"), [("4h", False), ("1m", False), ("1m", True)])
def test_a_range_garch_forecasts_at_inference_what_the_walk_forward_scores(timeframe, wide):
    """With `garch_range` the state reads the bars' range variances, a bad print's wick included, the same way in
    the walk-forward (the whole series) and in predict() (the lookback alone, whose first bars' σ differ); with
    `garch_wide` both fit on the wide grid."""
    from dataclasses import asdict, replace

    from candlecast.candles import Candles
    from candlecast.forecast.evaluate import build_origins
    from candlecast.forecast.model import ForecastModel

    shipped = _shipped("4h")
    config = replace(CONFIGS[timeframe], garch_range=True, garch_wide=wide)
    lookback = config.lookback
    part = {"window": lookback - 1, "fit": TRAINING_FIT, "quantiles": shipped.baseline_q, "weight": 0.0,
            "conformal": np.zeros((len(HORIZONS), 3))}
    candles = synthetic_candles(900, seed=13)
    high = candles.high.copy()
    high[len(candles) - lookback + 3] *= 3.0  # a wick far beyond any σ, early in the forecast's window
    candles = Candles(candles.open_time, candles.open, high, candles.low, candles.close, candles.volume)
    model = ForecastModel(shipped.payload | {"garch": part, "config": asdict(config)})
    assert_predict_is_what_the_walk_forward_scores(model, candles)
    by_returns = build_origins([(None, candles)], replace(config, garch_range=False)).garch[-1]
    assert not np.allclose(build_origins([(None, candles)], config).garch[-1], by_returns)
    if wide:
        narrow = build_origins([(None, candles)], replace(config, garch_wide=False)).garch[:, 2]
        assert (build_origins([(None, candles)], config).garch[:, 2] != narrow).any()


def test_the_wide_grid_tracks_a_short_memory_garch_that_the_narrow_grid_cannot_reach():
    """α 0.45, β 0.50 lies outside the narrow grid (α ≤ 0.28, β ≥ 0.60): fitted on the wide grid, the next-bar
    variance is nearer the true one."""
    count = 4000
    returns, variance = garch_path(count, 5, alpha=0.45, beta=0.50)
    ends = np.arange(300, count, 7)
    windows = np.stack([returns[end - 300 : end] for end in ends])  # the next bar's variance is variance[end]
    errors = {wide: np.sqrt(np.mean(np.log(fit_states(windows, wide=wide)[:, 0] / variance[ends]) ** 2))
              for wide in (False, True)}
    assert errors[True] < 0.9 * errors[False], errors


def test_a_range_garch_tracks_a_stochastic_volatility_closer_than_squared_returns():
    """Under stochastic volatility (log variance AR(1), each bar a Brownian path) a bar's range says more about its
    variance than its close-to-close return: the range GARCH's next-bar variance is nearer the true one."""
    from dataclasses import replace

    from candlecast.candles import Candles
    from candlecast.forecast.features import garch_news

    rng = np.random.default_rng(3)
    count, steps = 1500, 32
    log_variance = np.zeros(count)
    for i in range(1, count):
        log_variance[i] = 0.97 * log_variance[i - 1] + 0.25 * rng.standard_normal()
    variance = 1e-4 * np.exp(log_variance)
    paths = np.cumsum(rng.standard_normal((count, steps)) * np.sqrt(variance / steps)[:, None], axis=1)
    start = np.concatenate([[0.0], np.cumsum(paths[:, -1])[:-1]])
    high, low = np.exp(start + np.maximum(paths.max(axis=1), 0)), np.exp(start + np.minimum(paths.min(axis=1), 0))
    candles = Candles(3600 * np.arange(count, dtype=np.int64), np.exp(start), high, low,
                      np.exp(start + paths[:, -1]), np.ones(count))
    errors = {}
    for garch_range in (False, True):
        config = replace(CONFIGS["1d"], garch_range=garch_range)
        _, sigma = origin_features(candles, config)
        origins = np.arange(400, count - 1, 5)
        states = series_states(np.log(candles.close), origins, config.lookback - 1, sigma[origins],
                               news=garch_news(candles, config))
        errors[garch_range] = np.sqrt(np.mean(np.log(states[:, 0] * sigma[origins] ** 2 / variance[origins + 1]) ** 2))
    assert errors[True] < 0.9 * errors[False], errors


def test_a_file_trained_on_the_round_1_grid_fit_keeps_it_at_inference():
    """A GARCH part without "fit" was scored with the grid fit's states; predict() must use that fit."""
    from candlecast.forecast.features import origin_features
    from candlecast.forecast.model import ForecastModel

    base = ForecastModel(_shipped("4h").payload)
    part = {"window": base.lookback - 1, "quantiles": base.baseline_q, "weight": 0.0,
            "conformal": np.zeros((len(HORIZONS), 3))}
    candles = synthetic_candles(900, seed=12).tail(base.lookback)
    rows, sigma = origin_features(candles, base.config)
    lower = {}
    for fit in ("grid", "mle"):
        states = series_states(np.log(candles.close), np.array([len(candles) - 1]), base.lookback - 1, sigma[-1:],
                               fit)
        lower[fit] = ForecastModel(base.payload | {"garch": part}).z_quantiles(rows[-1:], states)[0, :, 1]
    assert not np.allclose(lower["grid"], lower["mle"])
    forecast = ForecastModel(base.payload | {"garch": part}).predict(candles)
    scale = sigma[-1] * np.sqrt(HORIZONS)
    np.testing.assert_allclose(np.log(forecast.lower_80 / candles.close[-1]), scale * lower["grid"], rtol=1e-9)
    forecast = ForecastModel(base.payload | {"garch": part | {"fit": "mle"}}).predict(candles)
    np.testing.assert_allclose(np.log(forecast.lower_80 / candles.close[-1]), scale * lower["mle"], rtol=1e-9)


def _shipped(timeframe: str):
    from pathlib import Path

    from candlecast.config import LOCAL_MODEL_SIGNING_KEY
    from candlecast.forecast import artifact

    root = Path(__file__).resolve().parent.parent
    data = (root / "models" / f"{timeframe}.pkl").read_bytes()
    signature = (root / "models" / f"{timeframe}.pkl.sig").read_text().strip()
    return artifact.verify_and_load(data, signature, LOCAL_MODEL_SIGNING_KEY.encode())
