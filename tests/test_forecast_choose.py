"""The shipping rule (`train.choose`): the issue's coverage bands hold at every horizon, not only on average."""

import numpy as np
import pytest

from candlecast.forecast.train import choose, coverage_miss, targets


def result(skill: float, coverage_80: list[float], coverage_95: float = 0.95) -> dict:
    """A walk-forward result with `skill` and the given 80 % coverage per horizon."""
    per_horizon = [{"h": h, "coverage_80": c80, "coverage_95": coverage_95} for h, c80 in enumerate(coverage_80, 1)]
    mean_80 = sum(coverage_80) / len(coverage_80)
    return {"pinball_skill": skill, "coverage_80": mean_80, "coverage_95": coverage_95, "per_horizon": per_horizon}


IN_BAND = [0.80] * 30
# 0.80 on average, but outside [0.77, 0.83] at 20 of 30 horizons: what an overall check cannot see.
TILTED = [0.74] * 10 + [0.80] * 10 + [0.86] * 10


def test_coverage_miss_averages_the_distance_outside_the_bands_over_horizons():
    assert coverage_miss(result(0.0, IN_BAND), targets("1d")) == 0.0
    assert coverage_miss(result(0.0, TILTED), targets("1d")) == pytest.approx((10 * 0.03 + 10 * 0.03) / 30)
    assert coverage_miss(result(0.0, IN_BAND, coverage_95=0.99), targets("1d")) == pytest.approx(0.02)
    # 1w and 1m have the wider bands: [0.75, 0.85] and [0.92, 0.98].
    assert coverage_miss(result(0.0, TILTED), targets("1w")) == pytest.approx((10 * 0.01 + 10 * 0.01) / 30)
    assert coverage_miss(result(0.0, IN_BAND, coverage_95=0.975), targets("1m")) == 0.0


def test_a_horizon_no_test_outcome_reached_is_neither_judged_nor_counted_in_band():
    """1m on a test shorter than 30 months: `metrics` gives None at the longest horizons. The miss averages over
    the others, so untested horizons do not dilute it as if they were in band."""
    untested = result(0.0, TILTED)
    for item in untested["per_horizon"][20:]:
        item["coverage_80"] = item["coverage_95"] = None
    assert coverage_miss(untested, targets("1d")) == pytest.approx(10 * 0.03 / 20)
    results = {"baseline": untested, "garch-scale": result(0.01, IN_BAND)}
    assert choose(results, "1m")[0] == "garch-scale"


def test_a_candidate_that_misses_horizons_the_baseline_covers_does_not_ship():
    results = {"baseline": result(0.0, IN_BAND), "combined": result(0.02, TILTED), "learned": result(0.01, IN_BAND)}
    assert choose(results, "1d")[0] == "learned"
    del results["learned"]
    kind, reason = choose(results, "1d")
    assert kind == "baseline" and "every horizon" in reason


def test_the_lowest_loss_ships_among_candidates_no_further_outside_than_the_baseline():
    worse_baseline = [0.72] * 15 + [0.80] * 15
    results = {"baseline": result(0.0, worse_baseline), "combined": result(0.02, TILTED),
               "learned": result(0.01, IN_BAND), "garch-scale": result(-0.01, IN_BAND)}
    kind, reason = choose(results, "4h")
    assert kind == "combined" and reason.startswith("combined: the lowest pinball loss")
    # No gain over the baseline: the baseline ships, however well the other covers.
    assert choose({"baseline": result(0.0, TILTED), "learned": result(-0.001, IN_BAND)}, "4h")[0] == "baseline"


def paired_losses(gain: float, noise: float, days: int, seed: int = 3):
    """Per-pair losses (n, 30) of a base and a challenger scoring `gain` lower on average, one origin a day for
    `days` days, with day-to-day noise in their difference of relative size `noise` (a common market factor)."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(4.0, 1.0, size=(days, 30))
    shared = np.repeat(rng.normal(0.0, noise, size=(days // 30 + 1, 1)), 30, axis=0)[:days]
    challenger = base * (1 - gain + shared)
    return base, challenger, np.arange(days) * 86400.0


def test_the_configuration_rule_takes_a_challenger_only_beyond_its_own_noise():
    """`calibration_check.config_verdict`: a 1 % gain, steady over four years of calendar batches, takes; the same
    gain behind noise many times its size keeps the base, and so does a steady gain under the tie (0.2 %)."""
    from infra.calibration_check import CONFIG_TIE, config_verdict

    steady = config_verdict("1d", *paired_losses(0.01, 0.001, 4 * 365))
    assert steady["takes"] and steady["ci95"][0] > 0 and steady["batches"] >= 10
    noisy = config_verdict("1d", *paired_losses(0.01, 0.2, 4 * 365))
    assert not noisy["takes"] and noisy["delta"] >= CONFIG_TIE and noisy["ci95"][0] <= 0
    tied = config_verdict("1d", *paired_losses(0.001, 0.0001, 4 * 365))
    assert not tied["takes"] and tied["ci95"][0] > 0


def test_the_configuration_rule_keeps_the_base_without_enough_calendar_batches_for_an_interval():
    """Two years of monthly origins are one 60-bar batch: however large the gain, there is no interval to pass."""
    from infra.calibration_check import config_verdict

    base, challenger, _ = paired_losses(0.05, 0.0, 24)
    verdict = config_verdict("1m", base, challenger, np.arange(24) * 30.44 * 86400)
    assert verdict["delta"] > 0.04 and verdict["ci95"] is None and not verdict["takes"]


def test_the_batch_jackknife_of_a_mean_of_equal_batches_is_the_t_interval_of_the_batch_means():
    from scipy import stats

    from candlecast.forecast.comparison import batch_jackknife

    means = np.random.default_rng(3).normal(0.5, 0.1, size=12)
    result = batch_jackknife(lambda totals: totals[0] / totals[1], [means * 40, np.full(12, 40.0)])
    half = stats.t.ppf(0.975, 11) * means.std(ddof=1) / np.sqrt(12)
    assert result["value"] == pytest.approx(means.mean())
    assert result["ci95"] == pytest.approx([means.mean() - half, means.mean() + half])
    assert batch_jackknife(lambda totals: totals[0].sum(), [np.ones((1, 3))])["ci95"] is None


def log_loss_batches(gain: float, noise: float, batches: int, seed: int = 0) -> dict:
    """Two confidence maps' [summed log loss, pairs] over `batches` calendar batches: the challenger's loss is `gain`
    lower on average, with batch-to-batch noise of size `noise` in the difference."""
    rng = np.random.default_rng(seed)
    pairs = np.full(batches, 500.0)
    base = rng.uniform(0.3, 0.5, batches)
    challenger = base - gain + rng.normal(0, noise, batches)
    return {"platt + ln h on history": [base * pairs, pairs], "platt on history": [challenger * pairs, pairs]}


def test_the_plans_calibration_choice_takes_another_variant_only_beyond_its_own_noise():
    """`calibration_check.choice_verdict`: a steady gain over the tie takes; the same gain behind batch-to-batch noise
    many times its size keeps the plan's variant, and so does a steady gain under the tie, or a single batch."""
    from infra.calibration_check import LOG_LOSS_TIE, choice_verdict, mean_log_loss

    plan = "platt + ln h on history"
    steady, why = choice_verdict(log_loss_batches(0.002, 0.0005, 20), mean_log_loss, plan, LOG_LOSS_TIE)
    assert steady == "platt on history" and why.endswith("takes it")
    noisy, why = choice_verdict(log_loss_batches(0.002, 0.02, 20), mean_log_loss, plan, LOG_LOSS_TIE)
    assert noisy == plan and "within its noise" in why
    tied, why = choice_verdict(log_loss_batches(0.0002, 0.00001, 20), mean_log_loss, plan, LOG_LOSS_TIE)
    assert tied == plan and "under" in why
    assert choice_verdict(log_loss_batches(0.01, 0.0, 1), mean_log_loss, plan, LOG_LOSS_TIE)[0] == plan


def test_the_coverage_error_by_batch_is_the_coverage_sum_of_the_folds():
    """The table's choice scores variants by `coverage_sum` over folds; its per-batch form adds up to the same."""
    from infra.calibration_check import (
        batch_coverage,
        coverage_by_batch,
        coverage_error,
        coverage_sum,
        fold_coverage,
    )

    rng = np.random.default_rng(8)
    folds = []
    for start in (0, 7):
        z = rng.standard_normal((90, 30))
        z[rng.random(z.shape) < 0.1] = np.nan
        q = np.broadcast_to(np.array([-1.96, -1.28, -0.67, 0, 0.67, 1.28, 1.96]), (90, 30, 7))
        batches = batch_coverage(q, z, start + np.arange(90) // 30)
        whole = fold_coverage(batch_coverage(q, z, np.zeros(90, dtype=np.int64)))
        assert all(np.allclose(a, b) for a, b in zip(fold_coverage(batches), whole, strict=True))
        folds.append(batches)
    totals = [array.sum(0) for array in coverage_by_batch(folds)]
    assert coverage_error(totals) == pytest.approx(coverage_sum([fold_coverage(fold) for fold in folds]))


def test_the_pair_key_tells_every_pass_fold_series_and_time_apart():
    from infra.calibration_check import pair_key

    grid = np.array(np.meshgrid([1, 2, 3], [0, 5, 63], [0, 7, 4095], [0, 1_700_000_000, 2**32 - 1])).reshape(4, -1)
    keys = pair_key(*grid)
    assert len(np.unique(keys)) == grid.shape[1]
    with pytest.raises(ValueError, match="too many"):
        pair_key(np.array([1]), np.array([64]), np.array([0]), np.array([0]))
