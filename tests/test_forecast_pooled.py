"""Conformal offsets pooled over horizons (`TrainPlan.pooled_offsets`): one line in ln h per interval instead of one
quantile per horizon; off, the table-based models' offsets are exactly the per-horizon ones."""

from dataclasses import replace

import numpy as np
import pytest

from candlecast.forecast.evaluate import build_origins
from candlecast.forecast.features import CONFIGS, INTERVAL_ALPHAS, INTERVALS, QUANTILES
from candlecast.forecast.garch import scale_factor
from candlecast.forecast.model import HORIZONS, widen
from candlecast.forecast.train import (
    PLANS,
    calibration_history,
    conformal_offsets,
    empirical_quantiles,
    fit_models,
    monotone_spread,
    purged,
)
from tests.test_forecast_decay import PLAN, folds, old_offsets

LN_H = np.log(HORIZONS)


def scores(q: np.ndarray, z: np.ndarray, interval: int) -> np.ndarray:
    lower, upper = INTERVALS[interval]
    return np.maximum(q[..., lower] - z, z - q[..., upper])


def residual_from_a_line(offsets: np.ndarray) -> float:
    design = np.column_stack([np.ones_like(LN_H), LN_H])
    fit, *_ = np.linalg.lstsq(design, offsets, rcond=None)
    return float(np.abs(design @ fit - offsets).max())


def planted(n: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A zero table and z whose spread grows as 1 + 0.2·ln h, so every quantile of |z| is a line in ln h; outcomes
    known at horizon h only for origins h bars before the end (as real calibration pairs): h30 has n − 29."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(HORIZONS))) * (1 + 0.2 * LN_H)
    z[np.arange(n)[:, None] >= n - HORIZONS[None, :] + 1] = np.nan
    return np.zeros((n, len(HORIZONS), len(QUANTILES))), z


def test_off_reproduces_the_per_horizon_offsets_exactly():
    rng = np.random.default_rng(3)
    for n in (90, 150, 1001):
        z = np.round(rng.standard_t(4, (n, len(HORIZONS))), 2)
        z[rng.random(z.shape) < 0.1 * HORIZONS / 30] = np.nan
        q = np.broadcast_to(np.quantile(rng.normal(size=500), QUANTILES), (n, len(HORIZONS), len(QUANTILES)))
        assert np.array_equal(conformal_offsets(q, z, None, pooled=False), old_offsets(q, z))


def test_off_the_models_keep_the_per_horizon_offsets():
    """`fit_models` without the option: garch-scale's quantiles are its table widened by the old per-horizon
    offsets on the history, bit for bit; with it they differ."""
    _, train, cal, _ = folds()
    assert not any(plan.pooled_offsets for tf, plan in PLANS.items() if tf not in ("1m", "1w"))
    history = calibration_history(train, cal)
    table = empirical_quantiles(train.z / scale_factor(train.garch), train.scale * scale_factor(train.garch))
    old = monotone_spread(widen(table, old_offsets(np.broadcast_to(table, (len(history), *table.shape)),
                                                   history.z / scale_factor(history.garch))))
    plain = fit_models("1h", train, cal, 0.3, PLAN, np.random.default_rng(0), progress=False)
    assert np.array_equal(plain["garch-scale"].payload["garch"]["quantiles"], old)
    pooled = fit_models("1h", train, cal, 0.3, replace(PLAN, pooled_offsets=True), np.random.default_rng(0),
                        progress=False)
    assert not np.array_equal(pooled["garch-scale"].payload["garch"]["quantiles"], old)
    assert not np.array_equal(pooled["baseline"].payload["baseline_q"], plain["baseline"].payload["baseline_q"])


def test_pooled_offsets_are_a_line_in_ln_h_and_find_a_planted_one():
    """Every interval's offsets lie on a line in ln h; where the long horizons have few pairs, the line is closer to
    the true quantiles there than the per-horizon estimates are."""
    q, z = planted(130)
    pooled, single = conformal_offsets(q, z, pooled=True), conformal_offsets(q, z)
    assert residual_from_a_line(pooled) < 1e-9
    assert residual_from_a_line(single) > 0.05
    truth = np.array([[1.959964, 1.281552, 0.674490]]) * (1 + 0.2 * LN_H[:, None])
    few = slice(10, None)  # h11-30: 101 down to 101 - 19 = 82 pairs (the last ones reuse h21's)
    assert np.abs(pooled - truth)[few].mean() < 0.5 * np.abs(single - truth)[few].mean()


def test_pooled_pairs_cover_at_least_their_level():
    """The intercept is the split-conformal quantile of the scores less the line's slope: over every horizon's
    pairs at once (weighted), at least 1 − α of them lie inside their offset."""
    q, z = planted(400, seed=8)
    weights = np.random.default_rng(1).uniform(0.2, 1.0, len(z))
    offsets = conformal_offsets(q, z, weights, pooled=True)
    known = np.isfinite(z)
    mass = np.broadcast_to(weights[:, None], z.shape)[known]
    for j, alpha in enumerate(INTERVAL_ALPHAS):
        inside = (scores(q, z, j) <= offsets[None, :, j])[known]
        assert mass[inside].sum() >= (1 - alpha) * (mass.sum() + 1)
        assert inside.mean() < 1 - alpha + 0.02  # not trivially wide


def test_too_few_one_step_pairs_give_no_offsets_as_per_horizon():
    q, z = planted(99)
    assert np.array_equal(conformal_offsets(q, z, pooled=True), np.zeros((len(HORIZONS), len(INTERVALS))))


@pytest.mark.shared
def test_real_1m_offsets_are_a_line_that_covers_the_pooled_history(shared_data):
    """On the real 1m data, one cut: the 1m plan's garch-scale with pooled offsets is fitted; its offsets (read back
    from the history's scores) are a line in ln h and cover at least 1 − α of the history's pairs together."""
    from candlecast.forecast.dataset import load_timeframe

    loaded = load_timeframe(shared_data / "ohlcv", "1m", clean=True)
    origins = build_origins(loaded, CONFIGS["1m"])
    cut, end = np.quantile(origins.time, [0.6, 0.8])
    train = purged(origins.take(origins.time < cut), cut)
    cal = purged(origins.take((origins.time >= cut) & (origins.time < end)), end)
    history = calibration_history(train, cal)
    g_train, g_history = scale_factor(train.garch), scale_factor(history.garch)
    table = empirical_quantiles(train.z / g_train, train.scale * g_train)
    at = np.broadcast_to(table, (len(history), *table.shape))
    z = history.z / g_history
    offsets = conformal_offsets(at, z, pooled=True)
    assert np.isfinite(offsets).all() and residual_from_a_line(offsets) < 1e-9
    known = np.isfinite(z)
    assert known[:, 0].sum() > 3 * known[:, -1].sum()  # the long horizons' few pairs the pooling is for
    for j, alpha in enumerate(INTERVAL_ALPHAS):
        assert (scores(at, z, j) <= offsets[None, :, j])[known].mean() >= 1 - alpha
    models = fit_models("1m", train, cal, 0.3, replace(PLANS["1m"], pooled_offsets=True), np.random.default_rng(0),
                        progress=False)
    assert np.array_equal(models["garch-scale"].payload["garch"]["quantiles"],
                          monotone_spread(widen(table, offsets)))
