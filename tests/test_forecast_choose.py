"""The shipping rule (`train.choose`): the issue's coverage bands hold at every horizon, not only on average."""

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
