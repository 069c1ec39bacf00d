"""When live 80 % coverage says a model has drifted (candlecast.drift)."""

import numpy as np
import pytest
from scipy import stats

from candlecast.drift import MIN_BLOCKS, block_rows, live_coverage, student_t_quantile


@pytest.mark.parametrize("degrees", [4, 6, 10, 30, 120])
def test_the_t_quantile_is_within_one_percent_of_the_exact_one(degrees):
    exact = stats.t.ppf(stats.norm.cdf(3.0), degrees)
    assert student_t_quantile(3.0, degrees) == pytest.approx(exact, rel=0.01)


def test_a_block_is_a_week_of_days_or_30_candles():
    assert [block_rows(tf) for tf in ("1h", "4h", "1d", "1w", "1m")] == [7, 7, 30, 30, 30]


def blocks_of(*inside_shares: float, steps: int = 30) -> list[tuple[int, int]]:
    """A 1d block of outcome days per share, `steps` outcomes on each, that share of them inside."""
    return [(steps, round(share * steps)) for share in inside_shares for _ in range(block_rows("1d"))]


def test_fewer_blocks_than_the_minimum_give_no_standard_error_and_no_drift():
    live = live_coverage("1d", blocks_of(*[0.0] * (MIN_BLOCKS - 1), steps=1000))
    assert live.coverage_80 == 0.0 and live.matured_steps == (MIN_BLOCKS - 1) * 30 * 1000
    assert live.standard_error is None and not live.drifting
    assert live_coverage("1d", []).coverage_80 is None and not live_coverage("1d", []).drifting
    four_weeks = live_coverage("1h", [(720, 0)] * 34)  # 34 days at 1h: 4 blocks of a week
    assert four_weeks.standard_error is None and not four_weeks.drifting
    assert live_coverage("1h", [(720, 0)] * 35).drifting


def test_steady_blocks_outside_the_band_are_drift_and_blocks_that_swing_as_far_are_not():
    steady = live_coverage("1d", blocks_of(0.55, 0.5, 0.45, 0.5, 0.55, 0.45))
    assert steady.coverage_80 == pytest.approx(0.5) and steady.drifting
    swinging = live_coverage("1d", blocks_of(1.0, 0.0, 1.0, 0.0, 1.0, 0.0))
    assert swinging.coverage_80 == pytest.approx(0.5) and not swinging.drifting
    assert swinging.standard_error > 5 * steady.standard_error


def test_a_significant_departure_inside_the_band_is_not_drift():
    live = live_coverage("1d", blocks_of(*[0.74, 0.76] * 20, steps=1000))
    assert live.coverage_80 == pytest.approx(0.75) and live.standard_error < 0.002 and not live.drifting
    assert live_coverage("1d", blocks_of(*[0.70, 0.72] * 20, steps=1000)).drifting


def test_a_calibrated_model_is_rarely_called_and_one_gone_narrow_is():
    """Independent outcomes with one common shock per block (coins that move together): about 0.3 % of the
    calibrated histories may be called, none here; a model covering 0.60 is called in most."""
    rng = np.random.default_rng(7)
    length = block_rows("1d")

    def history(coverage: float) -> list[tuple[int, int]]:
        shocks = np.repeat(rng.normal(0, 0.08, 8), length)  # 8 blocks
        shares = np.clip(coverage + shocks + rng.normal(0, 0.03, shocks.size), 0, 1)
        return [(50, int(inside)) for inside in rng.binomial(50, shares)]

    assert sum(live_coverage("1d", history(0.80)).drifting for _ in range(300)) <= 3
    assert sum(live_coverage("1d", history(0.60)).drifting for _ in range(100)) >= 50


def test_the_replay_folds_a_walk_forward_per_outcome_day_as_score_does(tmp_path):
    """infra.drift_replay: each (coin, origin, step) once on the UTC day its candle opens; the whole test's
    coverage is the share inside, and a model whose every band misses is called once it has 5 blocks."""
    import json

    from infra.drift_replay import daily_reads, outcome_days, summary, windows

    origins = np.arange(0, 40 * 86400, 6 * 3600)  # every 6 hours for 40 days, one coin
    log_return = np.zeros((len(origins), 30))
    log_return[:, ::2] = 1.0  # every other step outside a band of ±0.5
    band = np.broadcast_to(np.array([-0.9, -0.5, -0.2, 0.0, 0.2, 0.5, 0.9]), (len(origins), 30, 7))
    about = {"timeframe": "1h", "kind": "combined", "methods": ["combined"], "fallback": []}
    path = tmp_path / "wf.npz"
    np.savez(path, about=np.array(json.dumps(about)), log_return=log_return, time=origins,
             series=np.zeros(len(origins), dtype=np.int64), **{"q:combined": band,
                                                                  "c:combined": np.zeros((len(origins), 30))})
    timeframe, kind, days, steps, inside = outcome_days(path)
    assert (timeframe, kind) == ("1h", "combined")
    assert steps.sum() == len(origins) * 30 and inside.sum() == len(origins) * 15
    assert steps[0] == 23 + 17 + 11 + 5  # day 0: the origins at 0, 6, 12 and 18 h, steps up to 23 h
    assert list(days) == list(range(42))  # the last origin's last step opens at 0 h on day 41
    assert summary(windows(timeframe, days, steps, inside, days=42))["calls"] == 1  # 0.5 over 42 days: 6 blocks
    assert summary(windows(timeframe, days, steps, inside, days=20))["calls"] == 0  # 20 days: too few blocks
    # read after every day: the one whole 42-day record is called from its 35th day (5 blocks) on, not before
    assert daily_reads(timeframe, days, steps, inside, days=42) == {
        "records": 1, "called_records": 1, "reads": 42, "called_reads": 42 - 34}
    assert daily_reads(timeframe, days, steps, inside, days=20, every_days=10)["called_records"] == 0
