"""The numpy GARCH(1,1) fitted at each origin (`candlecast.forecast.garch`): it finds GARCH dynamics where they
are, agrees with `arch`'s fit, reads only the origin's window, and the models built on it see no future."""

import numpy as np
import pytest

from candlecast.candles import COLUMNS
from candlecast.forecast.bench import synthetic_candles
from candlecast.forecast.features import CONFIGS, origin_features
from candlecast.forecast.garch import HORIZONS, fit_states, scale_factor, series_states


def garch_returns(count: int, seed: int, alpha: float = 0.1, beta: float = 0.85) -> np.ndarray:
    rng = np.random.default_rng(seed)
    omega = 1e-4 * (1 - alpha - beta)
    variance, returns = 1e-4, np.empty(count)
    for i in range(count):
        returns[i] = np.sqrt(variance) * rng.standard_t(5) * np.sqrt(3 / 5)
        variance = omega + alpha * returns[i] ** 2 + beta * variance
    return returns


def test_the_fit_finds_the_persistence_of_garch_data_and_none_in_iid_returns():
    fitted = fit_states(np.stack([garch_returns(720, seed) for seed in range(40)]))
    assert 0.9 <= np.median(fitted[:, 2]) <= 0.99  # true α + β = 0.95
    rng = np.random.default_rng(1)
    iid = fit_states(rng.standard_t(5, (40, 720)) * 0.01)
    # i.i.d.: the next-bar variance stays near the long-run level whatever persistence is picked
    assert np.median(np.abs(iid[:, 0] / iid[:, 1] - 1)) < 0.25
    assert np.median(np.abs(fitted[:, 0] / fitted[:, 1] - 1)) > np.median(np.abs(iid[:, 0] / iid[:, 1] - 1))


def test_the_next_bar_variance_agrees_with_arch():
    arch = pytest.importorskip("arch")
    ours, theirs = [], []
    for seed in range(8):
        returns = garch_returns(720, seed + 100)
        result = arch.arch_model(returns * 100, mean="Zero", vol="GARCH", p=1, q=1, dist="t",
                                 rescale=False).fit(disp="off", show_warning=False)
        theirs.append(float(result.forecast(horizon=1).variance.values[-1, 0]) / 1e4)
        ours.append(fit_states(returns[None])[0, 0])
    ratio = np.array(ours) / np.array(theirs)
    assert np.all((ratio > 0.6) & (ratio < 1.6)), ratio
    assert np.median(np.abs(np.log(ratio))) < 0.15


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
    from pathlib import Path

    from candlecast.config import LOCAL_MODEL_SIGNING_KEY
    from candlecast.forecast import artifact
    from candlecast.forecast.evaluate import build_origins, model_outputs
    from candlecast.forecast.model import ForecastModel

    root = Path(__file__).resolve().parent.parent
    data = (root / "models" / "4h.pkl").read_bytes()
    signature = (root / "models" / "4h.pkl.sig").read_text().strip()
    shipped = artifact.verify_and_load(data, signature, LOCAL_MODEL_SIGNING_KEY.encode())
    part = {"window": shipped.lookback - 1, "quantiles": shipped.baseline_q * 1.1, "weight": 0.5,
            "conformal": np.full((len(HORIZONS), 3), 0.05)}
    model = ForecastModel(shipped.payload | {"garch": part, "method": "combined"})
    candles = synthetic_candles(900, seed=11)
    origins = build_origins([(None, candles)], model.config)
    q, _, confidence = model_outputs(model, origins.take(slice(-1, None)))
    forecast = model.predict(candles)
    scale = origins.scale[-1]
    np.testing.assert_allclose(np.log(forecast.lower_80 / candles.close[-1]), scale * q[0, :, 1], rtol=1e-9)
    np.testing.assert_allclose(np.log(forecast.upper_95 / candles.close[-1]), scale * q[0, :, 6], rtol=1e-9)
    np.testing.assert_allclose(forecast.confidence, confidence[0], rtol=1e-9)
    with pytest.raises(ValueError, match="GARCH state"):
        model.z_quantiles(origins.features[-1:])
