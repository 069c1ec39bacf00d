"""Time-decayed calibration weights (`TrainPlan.calibration_half_life`): how the table-based models' conformal
offsets weigh past pairs, and that no weight reads a pair after the calibration data end."""

import functools
import math
from dataclasses import replace

import numpy as np
import pytest

from candlecast.forecast.evaluate import build_origins
from candlecast.forecast.features import CONFIGS, INTERVAL_ALPHAS, INTERVALS, QUANTILES
from candlecast.forecast.model import HORIZONS
from candlecast.forecast.train import (
    PLANS,
    YEAR_SECONDS,
    TrainPlan,
    calibration_history,
    calibration_weights,
    conformal_offsets,
    decay_weights,
    fit_models,
    history_stride,
    purged,
)
from tests.test_forecast_leakage import random_walk

PLAN = TrainPlan(learned=False, train_stride=1, horizons_per_origin=30, eval_stride=1, volatility=False)


def test_weights_are_one_at_the_cutoff_and_halve_per_half_life():
    cutoff = 1.7e9
    times = cutoff - YEAR_SECONDS * np.array([0.0, 0.5, 1.0, 2.0, 3.0])
    assert decay_weights(times, cutoff, 1.0) == pytest.approx([1.0, 2**-0.5, 0.5, 0.25, 0.125])
    assert decay_weights(times, cutoff, 2.0) == pytest.approx([1.0, 2**-0.25, 2**-0.5, 0.5, 2**-1.5])
    assert decay_weights(times, cutoff, np.inf) == pytest.approx(np.ones(5))
    with pytest.raises(ValueError, match="after the cutoff"):
        decay_weights(np.append(times, cutoff + 1), cutoff, 1.0)


def old_offsets(q: np.ndarray, z: np.ndarray) -> np.ndarray:
    """`conformal_offsets` as it was before weights (split conformal, ⌈(n + 1)(1 − α)⌉/n, method "higher")."""
    offsets = np.zeros((len(HORIZONS), len(INTERVALS)))
    for i in range(len(HORIZONS)):
        known = np.isfinite(z[:, i])
        n = int(known.sum())
        for j, ((lower, upper), alpha) in enumerate(zip(INTERVALS, INTERVAL_ALPHAS, strict=True)):
            if n < 100:
                offsets[i, j] = offsets[i - 1, j] if i else 0.0
                continue
            score = np.maximum(q[known, i, lower] - z[known, i], z[known, i] - q[known, i, upper])
            offsets[i, j] = np.quantile(score, min(math.ceil((n + 1) * (1 - alpha)) / n, 1.0), method="higher")
    return offsets


def test_no_half_life_reproduces_the_equal_weight_offsets_exactly():
    rng = np.random.default_rng(3)
    for n in (90, 150, 1001, 4000):  # below MIN_PAIRS_PER_HORIZON, and (n + 1)(1 − α) whole or not
        z = np.round(rng.standard_t(4, (n, len(HORIZONS))), 2)  # ties, as rounded prices give
        z[rng.random(z.shape) < 0.1 * HORIZONS / 30] = np.nan  # fewer known outcomes at long horizons
        q = np.broadcast_to(np.quantile(rng.normal(size=500), QUANTILES), (n, len(HORIZONS), len(QUANTILES)))
        assert np.array_equal(conformal_offsets(q, z), old_offsets(q, z))
        assert np.array_equal(conformal_offsets(q, z, np.ones(n)), old_offsets(q, z))
        zero = rng.random(n) < 0.3  # zero weight leaves a pair out
        assert np.array_equal(conformal_offsets(q, z, (~zero).astype(float)), old_offsets(q[~zero], z[~zero]))


@functools.cache
def folds(count: int = 700):
    origins = build_origins([(None, random_walk(seed, count)) for seed in range(4)], CONFIGS["1h"])
    cut, end = np.quantile(origins.time, [0.7, 0.9])
    train = purged(origins.take(origins.time < cut), cut)
    cal = purged(origins.take((origins.time >= cut) & (origins.time < end)), end)
    return origins, train, cal, end


def test_no_half_life_leaves_the_models_as_they_were():
    _, train, cal, _ = folds()
    assert calibration_weights(train, cal, PLAN) is None
    assert calibration_weights(train, cal, replace(PLAN, calibration_half_life=1.0, calibrate_on_history=False)) \
        is None
    plain = fit_models("1h", train, cal, 0.3, PLAN, np.random.default_rng(0), progress=False)
    decayed = fit_models("1h", train, cal, 0.3, replace(PLAN, calibration_half_life=0.01), np.random.default_rng(0),
                         progress=False)
    assert not np.array_equal(plain["baseline"].payload["baseline_q"], decayed["baseline"].payload["baseline_q"])


def test_the_weights_follow_the_thinned_history_and_end_at_the_newest_calibration_pair():
    _, train, cal, _ = folds()
    plan = replace(PLAN, calibration_half_life=0.01, eval_stride=2)
    limit = 1000
    stride = history_stride(len(train), len(cal), limit)
    assert stride > 1
    weights, history = calibration_weights(train, cal, plan, limit), calibration_history(train, cal, limit)
    assert len(weights) == len(history)
    newest = cal.time.max()
    age = (newest - history.time) / YEAR_SECONDS
    standing = np.where(np.arange(len(history)) < len(history) - len(cal), stride / plan.eval_stride, 1.0)
    assert weights == pytest.approx(standing * 0.5 ** (age / 0.01))
    assert weights[history.time == newest] == pytest.approx(1.0)


def test_no_weight_reads_a_pair_after_the_cutoff():
    """The offsets of a fold fitted with decay are the same when the series end at its test block: nothing after
    the calibration data (the test block, the future) moves a weight or an offset (tail == whole series)."""
    origins, train, cal, end = folds()
    cut = origins.time[origins.time < end].max()
    walks = [random_walk(seed, 700) for seed in range(4)]
    short = build_origins([(None, walk.head(int(np.sum(walk.open_time <= cut)))) for walk in walks], CONFIGS["1h"])
    cut_train = purged(short.take(short.time < cal.time.min()), cal.time.min())
    cut_cal = purged(short.take(short.time >= cal.time.min()), end)
    assert len(cut_train) == len(train) and len(cut_cal) == len(cal)
    plan = replace(PLAN, calibration_half_life=0.02)
    assert np.array_equal(calibration_weights(train, cal, plan), calibration_weights(cut_train, cut_cal, plan))
    whole = fit_models("1h", train, cal, 0.3, plan, np.random.default_rng(0), progress=False)
    tail = fit_models("1h", cut_train, cut_cal, 0.3, plan, np.random.default_rng(0), progress=False)
    for name in ("baseline", "garch-scale"):
        assert np.array_equal(whole[name].payload["baseline_q"], tail[name].payload["baseline_q"])
    assert np.array_equal(whole["garch-scale"].payload["garch"]["quantiles"],
                          tail["garch-scale"].payload["garch"]["quantiles"])


def test_decay_follows_a_recent_regime_that_equal_weights_average_away():
    """A wilder past and a calm recent block: equal weights keep the wide offsets, a short half-life narrows them."""
    _, train, cal, _ = folds()
    calm = replace(cal, log_return=cal.log_return * 0.3)
    width = {}
    for half_life in (None, 0.005):
        model = fit_models("1h", train, calm, 0.3, replace(PLAN, calibration_half_life=half_life),
                           np.random.default_rng(0), progress=False)["baseline"]
        q = model.payload["baseline_q"]
        width[half_life] = float(np.mean(q[:, -1] - q[:, 0]))
    assert width[0.005] < 0.9 * width[None]


@pytest.mark.shared
def test_the_plans_weigh_real_history_from_its_end(shared_data):
    """On the real 1m data: every plan's weights are ≤ 1, 1 only at the newest calibration origin."""
    from candlecast.forecast.dataset import load_timeframe

    loaded = load_timeframe(shared_data / "ohlcv", "1m", clean=True)
    origins = build_origins(loaded, CONFIGS["1m"])
    cut = np.quantile(origins.time, 0.8)
    train, cal = purged(origins.take(origins.time < cut), cut), origins.take(origins.time >= cut)
    plan = replace(PLANS["1m"], calibration_half_life=2.0)
    weights = calibration_weights(train, cal, plan)
    assert weights.max() == pytest.approx(1.0) and (weights > 0).all()
    assert np.all(calibration_history(train, cal).time[weights == weights.max()] == cal.time.max())
    years = (cal.time.max() - train.time.min()) / YEAR_SECONDS
    assert weights.min() == pytest.approx(0.5 ** (years / 2.0))
