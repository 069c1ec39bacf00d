"""Leakage test: on a pure random walk nothing is predictable, so the learned model must show ≈ 0 skill."""

import functools
from dataclasses import replace

import numpy as np
import pytest

from candlecast.candles import Candles
from candlecast.forecast.evaluate import build_origins, metrics, model_outputs
from candlecast.forecast.features import CONFIGS, FEATURES, MEDIAN
from candlecast.forecast.model import HORIZONS, evaluate_trees
from candlecast.forecast.train import TrainPlan, fit_models, purged, walk_forward_folds

pytest.importorskip("lightgbm")


def random_walk(seed: int, count: int = 2500) -> Candles:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, count)))
    open_ = np.concatenate([[100.0], close[:-1]])
    wick = np.exp(np.abs(rng.normal(0, 0.004, (2, count))))
    return Candles(
        open_time=1_600_000_000 // 3600 * 3600 + 3600 * np.arange(count, dtype=np.int64),
        open=open_, high=np.maximum(open_, close) * wick[0], low=np.minimum(open_, close) / wick[1],
        close=close, volume=rng.lognormal(5, 1, count),
    )


def test_learned_model_has_no_skill_on_a_random_walk():
    config = CONFIGS["1h"]
    loaded = [(None, random_walk(seed)) for seed in range(12)]
    origins = build_origins(loaded, config)
    held = origins.series >= 8  # 4 symbols never trained on
    (fold,) = walk_forward_folds(origins.time, "1h", folds=1, test_fraction=0.3)
    train = purged(origins.take(~held & (origins.time < fold.train_end)), fold.cal_start)
    cal = purged(origins.take(~held & (origins.time >= fold.cal_start) & (origins.time < fold.cal_end)),
                 fold.test_start)
    test = origins.take(held & (origins.time >= fold.test_start))
    assert train.label_time[np.isfinite(train.log_return)].max() < fold.cal_start  # purged
    plan = TrainPlan(learned=True, train_stride=2, horizons_per_origin=4, eval_stride=1, min_leaf=100, rounds=30,
                     volatility_origins=3000)
    models = fit_models("1h", train, cal, 0.3, plan, np.random.default_rng(0), progress=False)

    # The trees, the series' own GARCH as the scale and their quantile average: none beats the baseline here.
    for name in ("learned", "garch-scale", "combined"):
        result = metrics(test, *model_outputs(models[name], test), config.tolerance)
        assert abs(result["pinball_skill"]) < 0.02, name  # no better (and not much worse) than the baseline
        assert 0.75 <= result["coverage_80"] <= 0.85, name
        assert 0.92 <= result["coverage_95"] <= 0.98, name
        assert result["ece"] <= 0.05, name

    # The trees' own (unpinned) median must not predict direction either.
    rows = np.concatenate([np.repeat(HORIZONS, len(test))[:, None],
                           np.tile(test.features, (len(HORIZONS), 1))], axis=1)
    assert rows.shape[1] == len(FEATURES)
    median = evaluate_trees(models["learned"].trees, rows)[:, MEDIAN].reshape(len(HORIZONS), -1).T
    outcome = test.z
    known = np.isfinite(outcome) & (outcome != 0)
    hits = np.sign(median[known]) == np.sign(outcome[known])
    assert 0.45 <= hits.mean() <= 0.55
    raw_error = np.abs(outcome[known] - median[known]).sum() / np.abs(outcome[known]).sum()
    assert raw_error >= 0.98


def test_walk_forward_blocks_are_ordered_with_embargoes():
    from candlecast.forecast.train import EMBARGO_BARS
    from candlecast.timeframes import nominal_seconds

    times = np.arange(0, 5000 * 3600, 3600)
    folds = walk_forward_folds(times, "1h", folds=3)
    embargo = EMBARGO_BARS * nominal_seconds("1h")
    assert EMBARGO_BARS >= 30
    previous_test_end = None
    for fold in folds:
        assert fold.train_end + embargo <= fold.cal_start < fold.cal_end
        assert fold.cal_end + embargo <= fold.test_start < fold.test_end
        if previous_test_end is not None:
            assert fold.test_start == previous_test_end  # expanding window: each fold tests the next block
        previous_test_end = fold.test_end


def calendar_walk(seed: int, start: int, timeframe: str, count: int = 108) -> Candles:
    """A random walk of monthly, weekly (Monday), daily, 4-hour or hourly candles from bar `start` of 2012 on."""
    from candlecast.timeframes import nominal_seconds

    if timeframe == "1m":
        bars = np.arange(np.datetime64("2012-01"), np.datetime64("2012-01") + np.timedelta64(count, "M")).astype(
            "datetime64[s]")
    else:
        bars = (np.datetime64("2012-01-02T00:00:00")
                + np.arange(count) * np.timedelta64(int(nominal_seconds(timeframe)), "s"))
    walk = random_walk(seed, count - start)
    return Candles(bars[start:].astype(np.int64), walk.open, walk.high, walk.low, walk.close, walk.volume)


# (bars per coin, bars between coins' first candles): a few years of test after the warm-up.
ALL_TIME_WALKS = {"1m": (108, 4), "1w": (108, 4), "1d": (1100, 30), "4h": (4000, 120), "1h": (4000, 48)}
# 1h's folds shrunk 8 times (a refit per 1.5 months of test): two of its year-long folds would need about 15,000
# hourly bars per coin, whose per-origin GARCH fits take some 45 s of CPU.
FOLDS_SHRUNK = {"1h": 8}


def all_time_plan(timeframe: str):
    from candlecast.forecast.train import PLANS

    plan = PLANS[timeframe]
    return replace(plan, fold_bars=plan.fold_bars // FOLDS_SHRUNK.get(timeframe, 1))


@functools.cache
def all_time_walks(timeframe: str) -> tuple:
    """(origins of nine coins joining over time, masks of the three coin groups held out in turn); read only."""
    count, join = ALL_TIME_WALKS[timeframe]
    loaded = [(None, calendar_walk(seed, join * seed, timeframe, count)) for seed in range(9)]
    origins = build_origins(loaded, CONFIGS[timeframe])
    return origins, [np.isin(origins.series, np.arange(9)[part::3]) for part in range(3)]


@pytest.mark.parametrize("timeframe", ["1m", "1w", "1d", "4h", "1h"])
def test_walk_forward_over_all_time_tests_every_later_month_of_every_coin_without_leakage(timeframe, monkeypatch):
    """1h/4h/1d/1w/1m test every coin in turn, over every bar after the warm-up: each fold trains and calibrates only
    on the other coins, on outcomes known before its calibration and test blocks."""
    from candlecast.forecast import train as training
    from candlecast.timeframes import nominal_seconds

    plan = all_time_plan(timeframe)
    embargo = plan.embargo_bars * nominal_seconds(timeframe)
    assert plan.test_fraction is None and plan.coin_groups == 3
    monkeypatch.setitem(training.PLANS, timeframe, plan)
    origins, groups = all_time_walks(timeframe)
    fitted = []

    def spy(timeframe, train, cal, *args, **kwargs):  # the learned plan's trees: see the first-fold test below
        fitted.append((train, cal))
        return {} if plan.learned else fit_models(timeframe, train, cal, *args, **kwargs)

    monkeypatch.setattr(training, "fit_models", spy)
    result = training.walk_forward(timeframe, origins, groups, 0.3, None, np.random.default_rng(0), False)
    first = training.first_test_time(origins, groups, np.unique(origins.time), embargo)
    span = np.count_nonzero(np.unique(origins.time) >= first)
    assert len(result.folds) == 3 * round(span / plan.fold_bars)  # a refit per year of test, per group
    offset = 0
    for (train, cal), report in zip(fitted, result.folds, strict=True):
        test = result.test.take(slice(offset, offset + report["n_test_origins"]))
        offset += report["n_test_origins"]
        assert not set(np.unique(test.series)) & set(np.unique(np.concatenate([train.series, cal.series])))
        assert train.time.max() < cal.time.min() and cal.time.max() < test.time.min()
        assert train.label_time[np.isfinite(train.log_return)].max() < cal.time.min()  # purged
        assert cal.label_time[np.isfinite(cal.log_return)].max() < test.time.min()
    # Every origin (1h: every `eval_stride`-th of each fold) of every coin from the first test month on is tested
    # exactly once; none before it.
    expected = origins.take(origins.time >= first)
    tested = set(zip(result.test.series, result.test.time, strict=True))
    assert len(tested) == len(result.test) and tested <= set(zip(expected.series, expected.time, strict=True))
    assert len(expected) / plan.eval_stride <= len(result.test) < len(expected) / plan.eval_stride + len(result.folds)
    assert set(np.unique(result.test.series)) == set(range(9))
    # The warm-up is minimal: a month earlier, some group's fold has no training outcome or no calibration origin.
    months = np.unique(origins.time)
    earlier = training._fold_from(months, months[months < first][-1], first, embargo)
    trainable = [np.any(~held & (origins.time < earlier.train_end) & (origins.label_time[:, 0] < earlier.cal_start))
                 and np.any(~held & (origins.time >= earlier.cal_start) & (origins.time < earlier.cal_end))
                 for held in groups]
    assert not all(trainable) and first < np.quantile(months, 0.25)


def test_test_only_origins_are_tested_with_their_group_and_never_trained_or_calibrated_on(monkeypatch):
    """`walk_forward(test_only=...)` (infra.history_check's late starts): those origins are tested in the pass that
    holds their coin out, by that pass's models, and no fold of any pass trains or calibrates on them."""
    from candlecast.forecast import train as training

    monkeypatch.setitem(training.PLANS, "1m", all_time_plan("1m"))
    origins, groups = all_time_walks("1m")
    late = (origins.series == 4) & (origins.time >= np.quantile(origins.time[origins.series == 4], 0.5))
    fitted = []

    def spy(timeframe, train, cal, *args, **kwargs):
        fitted.append((train, cal))
        return fit_models(timeframe, train, cal, *args, **kwargs)

    monkeypatch.setattr(training, "fit_models", spy)
    result = training.walk_forward("1m", origins, groups, 0.3, None, np.random.default_rng(0), False, test_only=late)
    marked = set(zip(origins.series[late], origins.time[late], strict=True))
    for train, cal in fitted:
        assert not marked & set(zip(np.concatenate([train.series, cal.series]),
                                    np.concatenate([train.time, cal.time]), strict=True))
    assert any(4 in set(train.series) for train, _ in fitted)  # the rest of coin 4 still trains the other passes
    tested = set(zip(result.test.series, result.test.time, strict=True))
    assert marked <= tested and len(tested) == len(result.test)


@pytest.mark.parametrize("timeframe", ["1d", "4h", "1h"])
def test_the_first_all_time_fold_of_the_learned_plan_falls_back_to_the_baseline_without_pairs_for_a_leaf(timeframe):
    """The first fold of 1d, 4h and 1h trains on what the minimal warm-up leaves (here a few origins of one coin): no
    tree could split, so its learned candidate is the baseline, not trees that are one raw quantile of a few pairs;
    every candidate still forecasts the fold's test origins. Later folds hold enough pairs for trees."""
    from candlecast.forecast import train as training

    plan = all_time_plan(timeframe)
    assert plan.learned and plan.test_fraction is None
    origins, groups = all_time_walks(timeframe)
    steps = training.walk_forward_steps(timeframe, plan, origins, groups)

    def blocks(held, fold):
        train = purged(origins.take(~held & (origins.time < fold.train_end)), fold.cal_start)
        cal = purged(origins.take(~held & (origins.time >= fold.cal_start) & (origins.time < fold.cal_end)),
                     fold.test_start)
        return train, cal, origins.take(held & (origins.time >= fold.test_start) & (origins.time < fold.test_end))

    train, cal, test = blocks(*steps[0])
    assert training.too_few_for_a_leaf(train, plan) and len(test)
    models = fit_models(timeframe, train, cal, 0.3, plan, np.random.default_rng(0), False)
    assert set(models) == {"baseline", "learned", "garch-scale", "combined"}
    assert models["learned"] is models["baseline"]
    for model in models.values():
        q, _, confidence = model_outputs(model, test)
        assert np.isfinite(q).all() and np.all(np.diff(q, axis=-1) >= 0)
        assert np.all((confidence >= 0) & (confidence <= 1))
    assert not training.too_few_for_a_leaf(blocks(*steps[-1])[0], plan)


def nine_coins(timeframe: str) -> tuple[list[str], list]:
    """(bases, [(series, candles)]) of nine random-walk coins joining over time; BAT, LTC, NEO are HELD_OUT_COINS."""
    from types import SimpleNamespace

    from candlecast.timeframes import nominal_seconds

    names = ["ADA", "BAT", "BTC", "DOT", "ETH", "LTC", "NEO", "SOL", "XRP"]
    bar = nominal_seconds(timeframe)
    loaded = []
    for seed, name in enumerate(names):
        walk = random_walk(seed, 1800 - 100 * seed)
        start = 1_500_000_000 // 86400 * 86400 + 100 * seed * bar
        walk = Candles(start + bar * np.arange(len(walk.close), dtype=np.int64), walk.open, walk.high, walk.low,
                       walk.close, walk.volume)
        loaded.append((SimpleNamespace(base=name, pair=name + "USDT", place="synthetic"), walk))
    return names, loaded


@functools.cache
def nine_coin_origins(timeframe: str):
    """`build_origins` of `nine_coins` (the slow part; tests read them, never change them)."""
    return build_origins(nine_coins(timeframe)[1], CONFIGS[timeframe])


def test_each_pass_is_fitted_with_the_choices_made_without_its_coins(monkeypatch):
    """`train.PASS_CHOICES`: on the candles they were chosen on, every walk-forward pass is fitted with its own
    overrides of the plan, chosen on the other coins; on any other candles every pass runs the plan."""
    from candlecast.forecast import train as training

    timeframe = "1h"
    _, loaded = nine_coins(timeframe)
    passes = ({}, {"confidence_ln_h": True}, {"calibration_half_life": 1.0})
    monkeypatch.setitem(training.PASS_CHOICES, timeframe,
                        {"candles": training.candles_fingerprint(loaded), "passes": passes})
    plans, choices = training.pass_plans(timeframe, loaded)
    assert choices == list(passes)
    assert plans == [replace(training.PLANS[timeframe], **overrides) for overrides in passes]
    series, candles = loaded[4]
    other = [*loaded[:4], (series, Candles(candles.open_time, candles.open, candles.high, candles.low,
                                           candles.close * 1.001, candles.volume)), *loaded[5:]]
    assert training.pass_plans(timeframe, other) == ([training.PLANS[timeframe]] * 3, None)

    fitted = []

    def spy(timeframe, train, cal, wick, plan, *args, **kwargs):  # no model: which plan fits what is under test
        fitted.append((set(np.unique(np.concatenate([train.series, cal.series]))), plan))
        return {}

    monkeypatch.setattr(training, "fit_models", spy)
    origins = nine_coin_origins(timeframe)
    groups = training.coin_groups(loaded, 3)
    training.walk_forward(timeframe, origins, [group[origins.series] for group in groups], 0.3, None,
                          np.random.default_rng(0), False, test_fraction=0.3, plans=plans)
    assert len(fitted) == 3 * training.PLANS[timeframe].folds
    for (seen, plan), group in zip(fitted, np.repeat(np.arange(3), training.PLANS[timeframe].folds), strict=True):
        assert plan == replace(plans[group], test_fraction=0.3)
        assert not seen & set(np.flatnonzero(groups[group]))  # fitted without the coins it tests


def test_each_pass_is_fitted_on_origins_built_with_its_own_config(monkeypatch):
    """`train.PASS_CHOICES`' "configs": a pass chosen to run another `TimeframeConfig` (here the EWMA σ's half-life)
    is trained, calibrated and tested on origins built with it, its models carry it; the other passes keep the
    timeframe's, and the folds' dates stay those of the timeframe's origins."""
    from candlecast.forecast import train as training

    timeframe = "1h"
    _, loaded = nine_coins(timeframe)
    config = CONFIGS[timeframe]
    own = replace(config, halflife=config.halflife / 4)
    monkeypatch.setitem(training.PASS_CHOICES, timeframe, {"candles": training.candles_fingerprint(loaded),
                                                           "passes": ({}, {}, {}),
                                                           "configs": ({"halflife": own.halflife}, {}, {})})
    assert training.pass_configs(timeframe, loaded) == [own, config, config]
    assert training.pass_plans(timeframe, loaded)[1] == [{"halflife": own.halflife}, {}, {}]
    origins = nine_coin_origins(timeframe)
    groups = training.coin_groups(loaded, 3)
    passes = training.pass_origins(timeframe, loaded, origins, groups)
    assert passes[1][0] is origins and passes[2][0] is origins
    rebuilt = build_origins(loaded, own)
    assert np.array_equal(passes[0][0].scale, rebuilt.scale) and not np.array_equal(rebuilt.scale, origins.scale)

    def scales(built, pairs):  # `built`'s scale at each of `pairs`' (series, time)
        at = {key: index for index, key in enumerate(zip(built.series.tolist(), built.time.tolist(), strict=True))}
        return built.scale[[at[key] for key in zip(pairs.series.tolist(), pairs.time.tolist(), strict=True)]]

    fitted = []

    def spy(timeframe, train, cal, *args, config=None, **kwargs):
        fitted.append((train, cal, config))
        return {}

    monkeypatch.setattr(training, "fit_models", spy)
    result = training.walk_forward(timeframe, origins, [group[origins.series] for group in groups], 0.3, None,
                                   np.random.default_rng(0), False, test_fraction=0.3, passes=passes)
    folds = training.PLANS[timeframe].folds
    assert [entry[2] for entry in fitted] == [own] * folds + [config] * 2 * folds
    for train, cal, used in fitted:
        built = rebuilt if used == own else origins
        assert np.array_equal(train.scale, scales(built, train)) and np.array_equal(cal.scale, scales(built, cal))
    first = groups[0][result.test.series]
    assert first.any() and (~first).any()
    assert np.array_equal(result.test.scale[first], scales(rebuilt, result.test.take(first)))
    assert np.array_equal(result.test.scale[~first], scales(origins, result.test.take(~first)))
    plain = training.walk_forward(timeframe, origins, [group[origins.series] for group in groups], 0.3, None,
                                  np.random.default_rng(0), False, test_fraction=0.3)
    assert np.array_equal(np.sort(plain.test.time), np.sort(result.test.time))  # the same folds' dates
    with pytest.raises(ValueError, match="test_only"):
        training.walk_forward(timeframe, origins, [group[origins.series] for group in groups], 0.3, None,
                              np.random.default_rng(0), False, test_fraction=0.3, passes=passes,
                              test_only=np.zeros(len(origins), dtype=bool))


def test_a_model_fitted_with_a_config_carries_it():
    """`fit_models(config=...)`: every kind's payload (and the GARCH part's window) is the config its origins were
    built with, so a pass's models forecast as they were tested."""
    from candlecast.forecast.train import PLANS

    config = replace(CONFIGS["1h"], halflife=6, long_window=360)
    origins = build_origins([(None, random_walk(seed, 900)) for seed in range(4)], config)
    cut, end = np.quantile(origins.time, [0.7, 0.9])
    train = purged(origins.take(origins.time < cut), cut)
    cal = purged(origins.take((origins.time >= cut) & (origins.time < end)), end)
    plan = replace(PLANS["1h"], learned=False, volatility=False)
    models = fit_models("1h", train, cal, 0.3, plan, np.random.default_rng(0), False, config=config)
    assert set(models) == {"baseline", "garch-scale", "combined"}
    for model in models.values():
        assert model.config == config
    assert models["garch-scale"].payload["garch"]["window"] == config.lookback - 1


def test_the_nested_selection_scores_each_passs_coins_with_the_kind_chosen_without_them(monkeypatch):
    """`train.nested_selection`: at each pass's test origins the kind `PASS_CHOICES` chose for that pass (on its
    training coins), scored against GARCH-t at the same origins; on other candles, none."""
    from candlecast.forecast import train as training
    from candlecast.forecast.comparison import NESTED_SELECTION
    from candlecast.forecast.evaluate import pin5_loss

    timeframe = "1h"
    _, loaded = nine_coins(timeframe)
    kinds = ("baseline", "combined", "baseline")
    monkeypatch.setitem(training.PASS_CHOICES, timeframe, {"candles": training.candles_fingerprint(loaded),
                                                           "passes": ({}, {}, {}), "kinds": kinds})
    rng = np.random.default_rng(3)
    n = 3_000
    series = rng.integers(0, len(loaded), n)
    times = 1.6e9 + 3600.0 * np.sort(rng.integers(0, 20_000, n))
    log_return = rng.normal(0, 0.01, (n, len(HORIZONS)))
    z = np.sort(rng.normal(0, 1, 7))

    def method(scale):
        return np.broadcast_to(scale * z, (n, len(HORIZONS), 7)).copy(), np.full((n, len(HORIZONS)), 0.5)

    methods = {"baseline": method(0.004), "combined": method(0.03), "garch-t": method(0.01)}
    fallback = {"garch-t": np.zeros(n, dtype=bool)}
    result = training.nested_selection(timeframe, loaded, log_return, times, series, methods, fallback)
    assert result["kinds"] == list(kinds)
    groups = training.coin_groups(loaded, 3)
    expected = np.concatenate([pin5_loss(log_return[groups[number][series]], methods[kind][0][groups[number][series]])
                               for number, kind in enumerate(kinds)])
    chosen = result["methods"][NESTED_SELECTION]
    assert chosen["pin5"] == pytest.approx(expected.mean())
    assert chosen["pin5"] != pytest.approx(pin5_loss(log_return, methods["baseline"][0]).mean())
    assert result["methods"]["garch-t"]["pin5"] == pytest.approx(pin5_loss(log_return, methods["garch-t"][0]).mean())
    assert "vs_" + NESTED_SELECTION in result["methods"]["garch-t"]
    monkeypatch.setitem(training.PASS_CHOICES, timeframe, {"candles": "other candles", "passes": ({}, {}, {}),
                                                           "kinds": kinds})
    assert training.nested_selection(timeframe, loaded, log_return, times, series, methods, fallback) is None


@pytest.mark.parametrize("timeframe", ["1h"])
def test_walk_forward_over_a_share_of_time_tests_every_coin_in_turn_without_leakage(timeframe, monkeypatch):
    """A plan over a share of time (`train --test-fraction`; no plan's default now) tests every coin in turn too
    (HELD_OUT_COINS, then the other coins in two halves), each group on the same folds over the last share of the
    pooled origins, trained and calibrated only on the other coins."""
    from candlecast.forecast import train as training

    plan = replace(training.PLANS[timeframe], test_fraction=0.3)
    assert plan.coin_groups == 3
    names, loaded = nine_coins(timeframe)
    groups = training.coin_groups(loaded, plan.coin_groups)
    assert [sorted(np.array(names)[group]) for group in groups] == [["BAT", "LTC", "NEO"], ["ADA", "DOT", "SOL"],
                                                                    ["BTC", "ETH", "XRP"]]
    origins = nine_coin_origins(timeframe)
    held = [group[origins.series] for group in groups]
    fitted = []

    def spy(timeframe, train, cal, *args, **kwargs):  # no model: the splits are under test
        fitted.append((train, cal))
        return {}

    monkeypatch.setattr(training, "fit_models", spy)
    result = training.walk_forward(timeframe, origins, held, 0.3, None, np.random.default_rng(0), False,
                                   test_fraction=plan.test_fraction)
    assert len(result.folds) == 3 * plan.folds
    # Every group is tested on the folds the HELD_OUT_COINS alone would be: the same span of time.
    steps = training.walk_forward_steps(timeframe, plan, origins, held)
    assert [fold for _, fold in steps] == [fold for _, fold in training.walk_forward_steps(
        timeframe, replace(plan, coin_groups=1), origins, held[:1])] * 3
    offset = 0
    for (mask, fold), (train, cal), report in zip(steps, fitted, result.folds, strict=True):
        test = result.test.take(slice(offset, offset + report["n_test_origins"]))
        offset += report["n_test_origins"]
        tested = set(np.unique(test.series))
        assert tested == set(np.unique(origins.series[mask]))  # every coin of the group, no other
        assert not tested & set(np.unique(np.concatenate([train.series, cal.series])))
        assert train.time.max() < cal.time.min() and cal.time.max() < test.time.min()
        assert train.label_time[np.isfinite(train.log_return)].max() < cal.time.min()  # purged
        assert cal.label_time[np.isfinite(cal.log_return)].max() < test.time.min()
        assert fold.test_start <= test.time.min() and test.time.max() < fold.test_end
    assert offset == len(result.test)
    assert set(np.unique(result.test.series)) == set(range(len(names)))  # every coin is tested


def test_calibrating_on_history_is_not_fooled_by_one_calm_block():
    """The baseline is calibrated on every past pair: one calm calibration block must not narrow the intervals."""
    config = CONFIGS["1h"]
    origins = build_origins([(None, random_walk(seed)) for seed in range(12)], config)
    held = origins.series >= 8
    (fold,) = walk_forward_folds(origins.time, "1h", folds=1, test_fraction=0.3)
    train = purged(origins.take(~held & (origins.time < fold.train_end)), fold.cal_start)
    cal = purged(origins.take(~held & (origins.time >= fold.cal_start) & (origins.time < fold.cal_end)),
                 fold.test_start)
    cal.log_return = cal.log_return * 0.2  # a calm regime, unlike the training block and the test block
    test = origins.take(held & (origins.time >= fold.test_start))
    coverage, confidence = {}, {}
    for on_history, map_on_history in ((False, False), (True, True), (True, False)):
        plan = TrainPlan(learned=False, train_stride=1, horizons_per_origin=30, eval_stride=1,
                         calibrate_on_history=on_history, confidence_on_history=map_on_history,
                         volatility_origins=3000)
        baseline = fit_models("1h", train, cal, 0.3, plan, np.random.default_rng(0), progress=False)["baseline"]
        result = metrics(test, *model_outputs(baseline, test), config.tolerance)
        coverage[on_history, map_on_history] = result["coverage_95"]
        confidence[on_history, map_on_history] = result["mean_confidence"]
    assert coverage[False, False] < 0.8  # the calm block alone makes the intervals far too narrow
    assert 0.90 <= coverage[True, True] <= 0.99  # the calm block is a fifth of the pairs: slightly narrow
    assert coverage[True, False] == coverage[True, True]  # where the map is fitted leaves the intervals alone
    # A map fitted on the calm block alone, where closes stay near the median, is more confident than one fitted
    # on every past pair.
    assert confidence[True, False] > confidence[True, True] + 0.05


def test_calibration_history_spans_every_past_regime_within_its_limit():
    from candlecast.forecast.train import calibration_history

    origins = build_origins([(None, random_walk(seed, 700)) for seed in range(4)], CONFIGS["1h"])
    cut = np.quantile(origins.time, 0.8)
    train, cal = origins.take(origins.time < cut), origins.take(origins.time >= cut)
    assert len(calibration_history(train, cal, limit=10**9)) == len(train) + len(cal)  # nothing to thin
    history = calibration_history(train, cal, limit=1000)
    assert len(history) <= 1000
    assert np.array_equal(history.time[-len(cal):], cal.time)  # the calibration block whole
    kept = history.take(slice(None, len(history) - len(cal)))
    stride = int(np.ceil(len(train) / (1000 - len(cal))))
    for series in range(4):  # every coin's whole past, evenly thinned, not only its latest stretch
        mine, theirs = kept.time[kept.series == series], train.time[train.series == series]
        assert mine.min() - theirs.min() < stride * 3600 and theirs.max() - mine.max() < stride * 3600
        assert np.diff(mine).max() == stride * 3600


def test_volatility_term_structure_finds_nothing_in_a_random_walk():
    """The GARCH-style scale is fitted on training pairs; on an i.i.d. walk it must stay ≈ σ·√h."""
    from candlecast.forecast.model import volatility_factor
    from candlecast.forecast.train import fit_volatility

    origins = build_origins([(None, random_walk(seed)) for seed in range(6)], CONFIGS["1h"])
    volatility = fit_volatility(origins, np.random.default_rng(0), max_origins=4000)
    factor = volatility_factor(origins.features, volatility)
    assert 0.9 <= np.median(factor) <= 1.1
    assert np.percentile(factor, 95) / np.percentile(factor, 5) < 1.5


def test_the_holdout_tail_is_never_read_by_training():
    from candlecast.forecast.train import HOLDOUT_BARS, before_holdout, holdout_cutoff

    long, short = random_walk(1, 600), random_walk(2, 400)
    loaded = [("long", long), ("short", short)]
    cutoff = holdout_cutoff(loaded, "1h", HOLDOUT_BARS["1h"])
    assert cutoff == long.open_time[-1] - 3600 * HOLDOUT_BARS["1h"]
    kept = before_holdout(loaded, cutoff)
    # Both series start together: each keeps the candles up to the newest series' cutoff.
    assert [len(candles) for _, candles in kept] == [600 - HOLDOUT_BARS["1h"]] * 2
    assert max(int(candles.open_time[-1]) for _, candles in kept) == cutoff
    # A series that ends before the cutoff is kept whole; one that starts after it is dropped.
    early = random_walk(3, 50)
    late = Candles(*(getattr(early, name) + (3600 * 10_000 if name == "open_time" else 0)
                     for name in Candles.__dataclass_fields__))
    kept = before_holdout([("short", short.head(100)), ("late", late)], cutoff)
    assert [name for name, _ in kept] == ["short"] and len(kept[0][1]) == 100



def test_the_committed_models_leave_matured_steps_after_train_end_in_the_sample():
    """`candlecast seed` replays the sample's last candles: each model's `train_end` must leave a full 30-step
    forecast (or, at 1m, its first steps) of sample candles after it, so those replays are scored live."""
    import json
    from pathlib import Path

    from candlecast.forecast.dataset import read_ohlcv
    from candlecast.forecast.train import HOLDOUT_BARS

    root = Path(__file__).resolve().parent.parent
    manifest = json.loads((root / "models" / "manifest.json").read_text())
    for timeframe, entry in manifest.items():
        assert entry["holdout"]["bars"] == HOLDOUT_BARS[timeframe]
        train_end = np.datetime64(entry["train_end"].rstrip("Z"), "s").astype(np.int64)
        after = max(int((read_ohlcv(path).open_time > train_end).sum())
                    for path in (root / "data").glob(f"*/{timeframe}.parquet"))
        assert after >= min(len(HORIZONS), HOLDOUT_BARS[timeframe]), timeframe


def test_confidence_maps_with_ln_h_read_no_outcome_after_their_cutoff():
    """The maps with ln h as a covariate (`TrainPlan.confidence_ln_h`, `tree_confidence_ln_h`) are fitted on pairs
    known before the test block: scrambling every later outcome leaves them unchanged, bit for bit."""
    config = CONFIGS["1h"]
    origins = build_origins([(None, random_walk(seed, 1500)) for seed in range(8)], config)
    held = origins.series >= 6
    (fold,) = walk_forward_folds(origins.time, "1h", folds=1, test_fraction=0.3)
    scrambled = origins.take(slice(None))
    later = origins.label_time >= fold.test_start
    scrambled.log_return = np.where(later, np.random.default_rng(5).normal(0, 0.5, later.shape), origins.log_return)
    assert not np.array_equal(scrambled.log_return, origins.log_return, equal_nan=True)
    plan = TrainPlan(learned=True, train_stride=2, horizons_per_origin=4, eval_stride=1, min_leaf=100, rounds=10,
                     volatility_origins=2000, confidence_ln_h=True, tree_confidence_ln_h=True, tree_folds=2)
    fields = ("confidence_x", "confidence_y", "confidence_ln_h")
    maps = []
    for source in (origins, scrambled):
        train = purged(source.take(~held & (source.time < fold.train_end)), fold.cal_start)
        cal = purged(source.take(~held & (source.time >= fold.cal_start) & (source.time < fold.cal_end)),
                     fold.test_start)
        models = fit_models("1h", train, cal, 0.3, plan, np.random.default_rng(0), progress=False)
        maps.append({name: [model.payload[key] for key in fields] for name, model in models.items()})
    assert maps[0]["baseline"][2] is not None and maps[0]["garch-scale"][2] is not None  # fitted with ln h
    for name, (x, y, ln_h) in maps[0].items():
        other = maps[1][name]
        assert np.array_equal(x, other[0]) and np.array_equal(y, other[1]) and ln_h == other[2], name
    test = origins.take(held & (origins.time >= fold.test_start))
    result = metrics(test, *model_outputs(models["combined"], test), config.tolerance)
    assert result["ece"] <= 0.05  # on a random walk the map stays calibrated on coins it never saw


def test_the_recent_event_share_reads_no_bar_after_its_origin():
    """infra.calibration_check's covariate for the confidence map: bars up to the origin only, and the share it says."""
    from infra.calibration_check import recent_event_logit

    config = CONFIGS["1d"]
    candles = random_walk(3, 400)
    origins = build_origins([(None, candles)], config)
    cut = 250  # the candle index of an origin; everything after it changed
    changed = replace(candles, close=np.concatenate([candles.close[: cut + 1], candles.close[cut + 1:] * 1.3]))
    origin = np.flatnonzero(origins.time == candles.open_time[cut])
    assert recent_event_logit(build_origins([(None, changed)], config), config)[origin] == (
        recent_event_logit(origins, config)[origin])
    moves = np.abs(np.expm1(np.diff(np.log(candles.close[: cut + 1])))) <= config.tolerance
    share = (moves[-config.window:].sum() + 1) / (config.window + 2)
    assert recent_event_logit(origins, config)[origin] == pytest.approx(np.log(share / (1 - share)))


def test_the_inner_checks_folds_never_read_the_coins_their_pass_tests():
    """infra.calibration_check's inner folds (the tree check and the per-pass choice of kind): a pass's inner
    training, calibration and scored blocks are its training coins only, and the scored block comes after the rest."""
    from candlecast.forecast import train as training
    from infra.calibration_check import inner_folds

    timeframe = "1h"
    _, loaded = nine_coins(timeframe)
    plan = replace(training.PLANS[timeframe], test_fraction=0.3)
    origins = nine_coin_origins(timeframe)
    groups = training.coin_groups(loaded, 3)
    folds = list(inner_folds(timeframe, plan, origins, [group[origins.series] for group in groups]))
    assert {number for number, *_ in folds} == {1, 2, 3}
    for number, train, cal, scored in folds:
        held = set(np.flatnonzero(groups[number - 1]))
        assert not held & set(np.concatenate([train.series, cal.series, scored.series]).tolist())
        assert train.time.max() < cal.time.min() and cal.time.max() < scored.time.min()
