"""Cross-fitted calibration of the trees on history (`TrainPlan.tree_folds`, `train.crossfit_history`; CV+, Barber
et al. 2021): no pair is predicted by trees that saw its coin or an outcome after the fold's cutoff, and the model
files it writes are the ones inference already reads."""

from dataclasses import replace
from functools import cache

import numpy as np
import pytest

from candlecast.forecast import train as training
from candlecast.forecast.evaluate import build_origins, metrics, model_outputs
from candlecast.forecast.features import CONFIGS
from candlecast.forecast.train import TrainPlan, crossfit_history, fit_models, purged, walk_forward_folds
from tests.forecast_checks import assert_predict_is_what_the_walk_forward_scores
from tests.test_forecast_leakage import random_walk

pytest.importorskip("lightgbm")

PLAN = TrainPlan(learned=True, train_stride=2, horizons_per_origin=4, eval_stride=1, min_leaf=100, rounds=20,
                 volatility_origins=3000, folds=1, tree_folds=3)
# Twelve series of eight coins: series 2k and 2k+1 of the first four are one coin's two files (USD and USDT).
COINS = np.array(["A", "A", "B", "B", "C", "C", "D", "D", "E", "F", "G", "H"])


@cache
def walks(count: int = 1500):
    """The series and their origins, built once per module (the GARCH fits of build_origins are most of a block's
    cost); read-only, so no test can change what the next one reads."""
    loaded = [(None, random_walk(seed, count)) for seed in range(len(COINS))]
    origins = build_origins(loaded, CONFIGS["1h"])
    for name in origins.__dataclass_fields__:
        getattr(origins, name).flags.writeable = False
    return loaded, origins


def blocks(count: int = 1500):
    loaded, origins = walks(count)
    held = origins.series >= 10
    (fold,) = walk_forward_folds(origins.time, "1h", folds=1, test_fraction=0.3)
    train = purged(origins.take(~held & (origins.time < fold.train_end)), fold.cal_start)
    cal = purged(origins.take(~held & (origins.time >= fold.cal_start) & (origins.time < fold.cal_end)),
                 fold.test_start)
    test = origins.take(held & (origins.time >= fold.test_start))
    return loaded, origins, held, fold, train, cal, test


@pytest.fixture(scope="module")
def block_learned():
    """The learned model calibrated on the calibration block (no cross-fitting), fitted once for the tests that
    cross-fit around it."""
    *_, train, cal, _ = blocks()
    return fit_models("1h", train, cal, 0.3, replace(PLAN, tree_folds=0), np.random.default_rng(0), False)["learned"]


def test_every_tree_fit_of_the_walk_forward_leaves_out_whole_coins_and_later_outcomes(monkeypatch):
    _, origins, held, fold, *_ = blocks()
    fitted, cells = [], []
    real_fit, real_splits = training.fit_boosters, training.crossfit_splits

    def spy_fit(train, z, *args, **kwargs):
        fitted.append((train, z))
        return real_fit(train, z, *args, **kwargs)

    def spy_splits(train, past, coins, plan, embargo):
        for mine, index, pairs in real_splits(train, past, coins, plan, embargo):
            cells.append((train, past, mine, pairs))
            yield mine, index, pairs

    monkeypatch.setattr(training, "fit_boosters", spy_fit)
    monkeypatch.setattr(training, "crossfit_splits", spy_splits)
    monkeypatch.setitem(training.PLANS, "1h", PLAN)
    training.walk_forward("1h", origins, [held], 0.3, 1, np.random.default_rng(0), False, 0.3, COINS)
    (main, _), *crossfits = fitted
    assert len(crossfits) == len(cells) == PLAN.tree_folds * PLAN.tree_blocks
    training_coins = set(COINS[main.series])
    assert training_coins == set(COINS[:10])  # the held-out coins never
    left_out = []
    for trees, z in [(main, None), *crossfits]:
        assert trees.label_time[np.isfinite(trees.log_return)].max() < fold.cal_start  # purged at the cutoff
        if z is not None:  # the trees learn only the outcomes left after the purge
            np.testing.assert_array_equal(np.isfinite(z), np.isfinite(trees.log_return))
        seen = set(COINS[trees.series])
        left_out.append(training_coins - seen)
        # A coin is in or out whole: both of its files.
        assert all(np.isin(np.flatnonzero(np.equal(COINS, coin)), trees.series).all() for coin in seen)
    assert left_out[0] == set()
    assert all(len(coins) >= 2 for coins in left_out[1:])
    assert set().union(*left_out[1:]) == training_coins  # every coin is left out, in every block

    embargo = PLAN.embargo_bars * 3600
    spans = {}
    for (train, past, mine, pairs), (trees, _) in zip(cells, crossfits, strict=True):
        assert trees is pairs  # the tree fit of this cell
        predicted = train.take(past[mine])
        # Pairs of one coin group, the one the trees never saw.
        assert set(COINS[predicted.series]) == training_coins - set(COINS[trees.series])
        known = np.isfinite(predicted.log_return)
        start, end = predicted.time.min(), predicted.label_time[known].max()
        # No fitted outcome's window [origin, label candle] comes within the embargo of the block's windows.
        fitted_known = np.isfinite(trees.log_return)
        windows_end = trees.label_time[fitted_known]
        windows_start = np.broadcast_to(trees.time[:, None], fitted_known.shape)[fitted_known]
        assert ((windows_end < start - embargo) | (windows_start > end + embargo)).all()
        sides = ((windows_end < start - embargo).any(), (windows_start > end + embargo).any())
        spans.setdefault(frozenset(COINS[predicted.series]), []).append((start, predicted.time.max(), sides))
    # Each (coin group, time block) is predicted once: per group, disjoint contiguous blocks covering every pair.
    train, past = cells[0][:2]
    assert all(cell[0] is train and cell[1] is past for cell in cells)
    assert len(spans) == PLAN.tree_folds and all(len(blocks) == PLAN.tree_blocks for blocks in spans.values())
    for blocks_of_group in spans.values():
        first, middle, last = sorted(blocks_of_group, key=lambda span: span[0])
        assert first[1] < middle[0] and middle[1] < last[0]
        # Trees learn from the time around the block: after the first, before the last, both sides of the middle.
        assert first[2] == (False, True) and middle[2] == (True, True) and last[2] == (True, False)
    predicted_positions = np.sort(np.concatenate([mine for _, _, mine, _ in cells]))
    np.testing.assert_array_equal(predicted_positions, np.arange(len(past)))


def test_a_pairs_crossfitted_quantiles_ignore_every_outcome_of_its_coin(block_learned):
    """Scrambling one coin's training outcomes changes the trees of the other coins' pairs, never its own."""
    from candlecast.forecast.model import ForecastModel

    *_, train, cal, _ = blocks()
    learned = block_learned
    z, weight = train.z, train.scale

    def crossfitted(z_train: np.ndarray) -> np.ndarray:
        return crossfit_history(ForecastModel(learned.payload), train, cal, z_train, weight, PLAN,
                                np.random.default_rng(1), COINS)[1]

    scrambled = z.copy()
    mine = COINS[train.series] == "A"
    scrambled[mine] = 3 * np.random.default_rng(2).permutation(z[mine])
    history, before = training.calibration_history(train, cal), crossfitted(z)
    after = crossfitted(scrambled)
    of_a = COINS[history.series] == "A"
    assert np.array_equal(before[of_a], after[of_a])
    assert not np.allclose(before[~of_a], after[~of_a])  # the check can see a change
    past = len(history) - len(cal)
    assert np.array_equal(before[past:], learned.shape_quantiles(cal.features, conformal=False))  # fitted before


def test_crossfitted_calibration_is_not_fooled_by_one_calm_block_and_ships_what_inference_reads():
    """A calm calibration block narrows block-calibrated trees far too much; calibrated on the cross-fitted history
    they cover about as promised, and a map fitted there is less confident. Only calibration arrays differ: the same
    trees, and predict() is what the walk-forward scores."""
    loaded, _, _, _, train, cal, test = blocks()
    cal.log_return = cal.log_return * 0.2  # a calm regime, unlike the training block and the test block
    config = CONFIGS["1h"]
    plans = {"block": replace(PLAN, tree_folds=0), "history": PLAN,
             "map only": replace(PLAN, tree_offsets_on_history=False)}
    fitted, scores = {}, {}
    for variant, plan in plans.items():
        fitted[variant] = fit_models("1h", train, cal, 0.3, plan, np.random.default_rng(0), False, coins=COINS)
        for name in ("learned", "combined"):
            scores[variant, name] = metrics(test, *model_outputs(fitted[variant][name], test), config.tolerance)
    for name in ("learned", "combined"):
        assert scores["block", name]["coverage_95"] < 0.8
        assert 0.90 <= scores["history", name]["coverage_95"] <= 0.99
        # The map alone on history: the block's intervals, a less confident map than the calm block's.
        assert scores["map only", name]["coverage_95"] == scores["block", name]["coverage_95"]
        assert scores["map only", name]["mean_confidence"] < scores["block", name]["mean_confidence"] - 0.05
        block = fitted["block"][name].payload
        for variant in ("history", "map only"):
            crossfit = fitted[variant][name].payload
            assert block.keys() == crossfit.keys()
            for key in ("baseline_q", "volatility", "quantiles", "features"):
                np.testing.assert_equal(block[key], crossfit[key])
            for key in block["trees"]:  # the shipped trees are the same: cross-fitting only calibrates
                np.testing.assert_array_equal(block["trees"][key], crossfit["trees"][key])
            assert_predict_is_what_the_walk_forward_scores(fitted[variant][name], loaded[11][1].tail(900))


def test_a_block_whose_other_coin_groups_have_no_pairs_outside_it_is_left_out_of_the_history(block_learned):
    """Coins listed late: when the other coin groups hold outcomes only within a block, no out-of-sample trees
    exist for that block's pairs, so they leave the calibration history rather than being fitted in sample."""
    from candlecast.forecast.model import ForecastModel

    *_, train, cal, _ = blocks()
    learned = block_learned
    group = training.coin_folds(train.series, COINS, PLAN.tree_folds)
    late = train.time >= np.quantile(train.time, 0.7)  # inside the last of three blocks of equal pair counts
    listed_late = train.take(slice(None))
    listed_late.log_return = np.where(((group == 0) | late)[:, None], train.log_return, np.nan)
    history, q = crossfit_history(ForecastModel(learned.payload), listed_late, cal, listed_late.z, train.scale, PLAN,
                                  np.random.default_rng(1), COINS)
    full = training.calibration_history(listed_late, cal)
    past = len(full) - len(cal)
    full_group = training.coin_folds(full.series[:past], COINS, PLAN.tree_folds)
    last_block = full.time[:past] >= np.quantile(train.time, 2 / 3)
    dropped = (full_group == 0) & last_block
    assert dropped.any() and len(history) == len(full) - dropped.sum() == len(q)
    np.testing.assert_array_equal(history.time, full.time[np.concatenate([~dropped, np.ones(len(cal), bool)])])
    assert np.array_equal(q[-len(cal):], learned.shape_quantiles(cal.features, conformal=False))
