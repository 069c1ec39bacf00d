"""Peers (GARCH(1,1)-t, Gaussian and split-conformal random walks) and the side-by-side metrics: no peer sees the
future; the pin5 loss, the block bootstrap and the method table compute what they say."""

import json

import numpy as np
import pytest

from candlecast.candles import COLUMNS, Candles
from candlecast.forecast.bench import synthetic_candles
from candlecast.forecast.comparison import batch_t_delta, block_bootstrap_delta, compare_methods
from candlecast.forecast.evaluate import method_scores, pin5_loss
from candlecast.forecast.features import QUANTILES

pytest.importorskip("arch")
from candlecast.forecast.peers import (
    CONFORMAL_MIN_PAIRS,
    GARCH_PLANS,
    PEERS,
    RW_WINDOW,
    ConformalPlan,
    GarchPlan,
    _gaussian_z,
    conformal_rw,
    garch_t,
    gaussian_rw,
    peer_quantiles,
    rw_sd,
)

pytestmark = pytest.mark.usefixtures("committed_models_key")

PLAN = GarchPlan(window=400, refit_every=50, min_returns=100)


def garch_candles(count: int, seed: int = 3) -> Candles:
    """A GARCH(1,1) price path with t(5) shocks, so the peer has clustering to find."""
    rng = np.random.default_rng(seed)
    omega, alpha, beta = 2e-6, 0.08, 0.9
    variance, returns = omega / (1 - alpha - beta), np.empty(count)
    for i in range(count):
        returns[i] = np.sqrt(variance) * rng.standard_t(5) * np.sqrt(3 / 5)
        variance = omega + alpha * returns[i] ** 2 + beta * variance
    close = 100 * np.exp(np.cumsum(returns))
    base = synthetic_candles(count, seed)
    return Candles(base.open_time, close, close * 1.001, close / 1.001, close, base.volume)


def head(candles: Candles, end: int) -> Candles:
    return Candles(*(getattr(candles, name)[:end] for name in COLUMNS))


def test_no_peer_sees_the_future():
    candles = garch_candles(1500)
    cut = 1100
    origins = np.arange(40, cut + 1, 7)
    full = peer_quantiles([(None, candles)], np.zeros(len(origins), int), candles.open_time[origins], "1h")
    truncated = head(candles, cut + 1)
    alone = peer_quantiles([(None, truncated)], np.zeros(len(origins), int), truncated.open_time[origins], "1h")
    crashed = Candles(*(getattr(candles, name).copy() for name in COLUMNS))
    crashed.close[cut + 1 :] *= 0.01  # a crash right after the last origin
    after = peer_quantiles([(None, crashed)], np.zeros(len(origins), int), crashed.open_time[origins], "1h")
    for name in full:
        assert np.isfinite(full[name]).all()
        np.testing.assert_array_equal(full[name], alone[name], err_msg=name)
        np.testing.assert_array_equal(full[name], after[name], err_msg=name)


def corrupted_after(candles: Candles, cut: int, seed: int) -> Candles:
    """Every column of every candle after `cut` replaced by unrelated positive values (the past kept)."""
    rng = np.random.default_rng(seed)
    columns = {name: getattr(candles, name).copy() for name in COLUMNS}
    tail = len(candles) - cut - 1
    for name in ("open", "high", "low", "close", "volume"):
        columns[name][cut + 1 :] = rng.lognormal(3, 2, tail)
    return Candles(**columns)


@pytest.mark.parametrize("cut", [331, 700, 1020, 1449])  # 1020: a midnight, when the 1h conformal peer recalibrates
def test_each_peer_forecast_is_unchanged_when_everything_after_its_origin_changes(cut):
    """At origin `cut` (GARCH-t between refits or at one; the conformal window full or filling), every peer's
    quantiles are bit-identical whatever the candles after the origin are."""
    candles, other = garch_candles(1500), garch_candles(1500, seed=4)  # the conformal peer pools both
    assert (candles.open_time == other.open_time).all()
    origins = np.array([cut])
    before = peer_quantiles([(None, candles), (None, other)], np.zeros(1, int), candles.open_time[origins], "1h")
    after = peer_quantiles([(None, corrupted_after(candles, cut, cut)), (None, corrupted_after(other, cut, cut + 1))],
                           np.zeros(1, int), candles.open_time[origins], "1h")
    assert set(before) == set(PEERS)
    for name in PEERS:
        assert np.isfinite(before[name]).all()
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    # The conformal peer really used its calibration pairs here (it is not the Gaussian fallback).
    assert not np.allclose(before["conformal-rw"], before["gaussian-rw"])


def test_conformal_peer_is_the_finite_sample_quantile_of_resolved_scores_of_every_series():
    plan = ConformalPlan(window=900, recalibrate_every=1)  # reaches back to both series' first origins
    first, second = garch_candles(900, seed=8), head(garch_candles(1300, seed=9), 700)
    second = Candles(second.open_time + 3600 * 150, *(getattr(second, name) for name in COLUMNS[1:]))  # later start
    series, origin = [first, second], 850
    q = conformal_rw(series, np.array([0]), np.array([origin]), "1h", plan)[0]
    now = first.open_time[origin]
    for h in (1, 7, 30):
        scores = []
        for candles in series:
            log_close, sd = np.log(candles.close), rw_sd(candles.close)
            s = np.arange(RW_WINDOW, len(candles) - h)  # origins with a full sd window
            label = candles.open_time[s + h]
            s = s[(label <= now) & (label > now - plan.window * 3600)]  # outcomes known at the origin, in the window
            scores.append(np.abs(log_close[s + h] - log_close[s]) / (sd[s] * np.sqrt(h)))
        scores = np.sort(np.concatenate(scores))
        n = len(scores)
        assert n > plan.window  # both series contribute
        for (lower, upper), alpha in (((0, 6), 0.05), ((1, 5), 0.2), ((2, 4), 0.5)):
            expected = scores[int(np.ceil((n + 1) * (1 - alpha))) - 1] * rw_sd(first.close)[origin] * np.sqrt(h)
            assert q[h - 1, upper] == pytest.approx(expected, rel=1e-12)
            assert q[h - 1, lower] == pytest.approx(-expected, rel=1e-12)
        assert q[h - 1, 3] == 0.0
    # Too few resolved pairs (early, or a series shorter than the horizons): the Gaussian random walk's quantiles.
    early = CONFORMAL_MIN_PAIRS + 2
    np.testing.assert_allclose(conformal_rw([first], np.array([0]), np.array([early]), "1h", plan)[0, -1],
                               gaussian_rw(first.close, np.array([early]))[0, -1])
    short = head(first, 12)
    np.testing.assert_allclose(conformal_rw([short], np.zeros(9, int), np.arange(3, 12), "1h", plan),
                               gaussian_rw(short.close, np.arange(3, 12)))


def test_conformal_peer_covers_per_horizon_where_the_gaussian_walk_does_not():
    candles = garch_candles(4000, seed=5)
    positions = np.arange(300, 3960, 2)
    log_close = np.log(candles.close)
    target = positions[:, None] + np.arange(1, 31)
    y = log_close[target] - log_close[positions, None]
    times = candles.open_time[positions]
    conformal = conformal_rw([candles], np.zeros(len(positions), int), positions, "1h", ConformalPlan(500, 24))
    scores = {name: method_scores(y, q, np.full(y.shape, 0.5), 0.005, times)["per_horizon"]
              for name, q in (("conformal", conformal), ("gaussian", gaussian_rw(candles.close, positions)))}
    assert min(scores["conformal"]["coverage_95"]) >= 0.92
    assert 0.76 <= np.mean(scores["conformal"]["coverage_80"]) <= 0.84
    assert min(scores["gaussian"]["coverage_95"][10:]) < 0.92  # fat tails: the plain Gaussian walk under-covers


def test_garch_peer_is_calibrated_on_garch_data_and_sharper_than_the_random_walk_early():
    candles = garch_candles(3000, seed=5)
    positions = np.arange(600, 2960, 2)
    log_close = np.log(candles.close)
    target = np.minimum(positions[:, None] + np.arange(1, 31), len(candles) - 1)
    y = np.where(positions[:, None] + np.arange(1, 31) < len(candles), log_close[target] - log_close[positions, None],
                 np.nan)
    garch, walk = garch_t(candles.close, positions, PLAN), gaussian_rw(candles.close, positions)
    times = candles.open_time[positions]
    garch_scores = method_scores(y, garch, np.full(y.shape, 0.5), 0.005, times)
    walk_scores = method_scores(y, walk, np.full(y.shape, 0.5), 0.005, times)
    assert 0.74 <= garch_scores["coverage_80"] <= 0.86
    assert 0.91 <= garch_scores["coverage_95"] <= 0.98
    # Volatility clusters: GARCH is sharper than the 30-bar random walk at the short horizons.
    assert sum(garch_scores["per_horizon"]["pin5"][:5]) < sum(walk_scores["per_horizon"]["pin5"][:5])
    assert (np.diff(garch[..., 3], axis=1) == 0).all() and (garch[..., 3] == 0).all()  # median: random walk


def test_pin5_is_the_mean_pinball_loss_in_percent():
    q = np.zeros((1, 1, len(QUANTILES)))
    q[0, 0] = [-0.02, -0.01, -0.005, 0.0, 0.005, 0.01, 0.02]
    y = np.array([[0.015]])
    levels = np.array([0.025, 0.1, 0.5, 0.9, 0.975])
    bounds = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])  # in %
    error = 1.5 - bounds
    expected = np.mean(np.maximum(levels * error, (levels - 1) * error))
    assert pin5_loss(y, q)[0, 0] == pytest.approx(expected)


def test_batch_interval_of_a_method_against_itself_and_a_worse_one():
    rng = np.random.default_rng(0)
    loss = rng.exponential(1.0, (800, 30))
    bars = np.arange(800) // 2  # two coins per bar, 400 bars: 6 batches of 66 bars
    same = batch_t_delta(loss, loss, bars)
    assert same["delta"] == 0 and same["ci95"] == [0.0, 0.0] and same["blocks"] == 6 and same["block_bars"] == 66
    worse = batch_t_delta(loss, loss * 1.1, bars)
    assert worse["delta"] == pytest.approx(0.1) and worse["ci95"] == pytest.approx([0.1, 0.1])
    noisy = batch_t_delta(loss, rng.exponential(1.0, (800, 30)), bars)
    assert noisy["ci95"][0] < noisy["delta"] < noisy["ci95"][1]
    # Losses that drift together over many bars (overlapping labels, one regime): long batches keep that
    # dependence and give a wider interval than batches of single bars would.
    drift = np.cumsum(rng.normal(0, 0.05, 400))
    dependent = loss * np.exp(drift - drift.mean())[bars, None]
    batched = batch_t_delta(loss, dependent, bars)
    single = batch_t_delta(loss, dependent, bars, batch_bars=1)
    assert batched["ci95"][1] - batched["ci95"][0] > 1.5 * (single["ci95"][1] - single["ci95"][0])


def test_batch_interval_with_too_few_batches_gives_no_number():
    """1m's test span is ~80 monthly bars: one batch of 60 bars holds no spread to estimate, so no interval."""
    rng = np.random.default_rng(3)
    bars = np.repeat(np.arange(80), 8)
    loss = rng.exponential(1.0, (len(bars), 30))
    result = batch_t_delta(loss, loss * 1.05, bars)
    assert result["delta"] == pytest.approx(0.05) and result["ci95"] is None and result["blocks"] == 1
    assert "too few batches" in result["note"]
    two = batch_t_delta(loss, loss * rng.uniform(0.9, 1.2, loss.shape), bars, batch_bars=40)
    assert two["blocks"] == 2 and two["ci95"][0] < two["delta"] < two["ci95"][1]


def _overlapping_losses(rng: np.random.Generator, bars: int, coins: np.ndarray, delta: float):
    """Per-pair losses of a model and a peer whose pin5 ratio is 1 + `delta` in expectation. Pair (t, h) reads the
    returns of bars t+1..t+h (labels overlap for up to 29 bars), which share a heavy-tailed market shock across
    coins; `coins[t]` coins have an origin at bar t (coins join over time, as in the data)."""
    horizons = np.arange(1, 31)
    shock = 0.8 * rng.standard_t(4, bars + 31)[None] + 0.6 * rng.standard_t(4, (coins.max(), bars + 31))
    path = np.concatenate([np.zeros((coins.max(), 1)), np.cumsum(shock, axis=1)], axis=1)
    t = np.arange(bars)
    window = (path[:, t[:, None] + horizons] - path[:, t[:, None]]) / np.sqrt(horizons)  # (coins, bars, 30)
    model = np.sqrt(horizons) * (1 + 0.5 * np.abs(window))
    peer = (1 + delta) * model + np.sqrt(horizons) * 0.3 * window  # zero-mean noise with the same overlap
    present = np.arange(coins.max())[:, None] < coins[None, :]
    return model[present], peer[present], np.broadcast_to(t, present.shape)[present]


@pytest.mark.parametrize("bars", [150, 600])
def test_batch_interval_covers_a_known_difference_at_about_the_nominal_rate(bars):
    """Synthetic losses with a known Δ of +5 % and the test's dependence (labels overlapping for 29 bars, a market
    shock common to every coin, coins joining over time): the 95 % interval covers Δ in about 95 % of samples,
    from 2 batches (1w-like spans) to 10."""
    rng = np.random.default_rng(bars)
    coins = np.minimum(2 + np.arange(bars) * 12 // bars, 12)
    covered = []
    for _ in range(300):
        model, peer, at = _overlapping_losses(rng, bars, coins, 0.05)
        low, high = batch_t_delta(model, peer, at)["ci95"]
        covered.append(low <= 0.05 <= high)
    assert 0.89 <= np.mean(covered) <= 0.99  # measured 0.94 (2 batches), 0.92 (10)


def test_the_block_bootstrap_beside_it_is_too_narrow_with_few_blocks():
    """Why the batch t interval leads: on the same synthetic losses over 5 blocks (a 1w-like span) the circular
    block bootstrap, which the external re-test reports and the comparison records beside it, misses Δ more often."""
    rng = np.random.default_rng(3)
    bars = 150
    coins = np.minimum(2 + np.arange(bars) * 12 // bars, 12)
    batch_hits = bootstrap_hits = 0
    for _ in range(100):
        model, peer, at = _overlapping_losses(rng, bars, coins, 0.05)
        low, high = batch_t_delta(model, peer, at)["ci95"]
        batch_hits += low <= 0.05 <= high
        assert block_bootstrap_delta(model, peer, at, reps=10)["ci95"] is None  # 5 blocks: "too few blocks"
        low, high = block_bootstrap_delta(model, peer, at, reps=400, min_blocks=1)["ci95"]
        bootstrap_hits += low <= 0.05 <= high
    assert bootstrap_hits < batch_hits - 5 and bootstrap_hits <= 85


def test_compare_methods_scores_every_method_on_the_same_pairs():
    rng = np.random.default_rng(1)
    n = 300
    y = rng.normal(0, 0.01, (n, 30)) * np.sqrt(np.arange(1, 31))
    y[-5:, 20:] = np.nan  # unknown outcomes at the end of the data
    z = np.array([-1.96, -1.2816, -0.6745, 0, 0.6745, 1.2816, 1.96])
    right = 0.01 * np.sqrt(np.arange(1, 31))[None, :, None] * z + np.zeros((n, 1, 1))
    narrow = right * 0.5
    times = 1_530_000_000 + 86400 * np.arange(n)  # 2018-06 to 2019-04: two eras
    conf = np.full((n, 30), 0.3)
    result = compare_methods(y, times, {"model": (right, conf), "narrow": (narrow, conf)}, 0.01, 86400, "model")
    model, other = result["methods"]["model"], result["methods"]["narrow"]
    assert result["best_peer"] == "narrow" and model["n_pairs"] == other["n_pairs"] == n * 30 - 50
    assert 0.76 <= model["coverage_80"] <= 0.84 and other["coverage_80"] < 0.6
    assert other["vs_model"]["ci95"][0] > 0  # the narrow peer is clearly worse
    bootstrap = other["vs_model"]["bootstrap"]  # 300 daily bars: 4 blocks of 90 (a quarter), too few for one
    assert bootstrap["ci95"] is None and bootstrap["block_bars"] == 90 and bootstrap["blocks"] == 4
    assert other["vs_model"]["blocks"] == 3 and other["vs_model"]["block_bars"] == 100
    assert set(model["eras"]) == {"2017-18", "2019-21"}
    assert len(model["per_horizon"]["coverage_95"]) == 30
    assert model["width_95"] == pytest.approx(2 * 1.96 * 0.01 * np.sqrt(np.arange(1, 31)).mean(), rel=0.01)


def test_scorecard_prints_the_model_beside_its_peers(tmp_path, capsys):
    from candlecast.forecast.cli import main
    from candlecast.forecast.train import headline

    rng = np.random.default_rng(2)
    n = 200
    y = rng.normal(0, 0.01, (n, 30)) * np.sqrt(np.arange(1, 31))
    z = np.array([-1.96, -1.2816, -0.6745, 0, 0.6745, 1.2816, 1.96])
    right = 0.01 * np.sqrt(np.arange(1, 31))[None, :, None] * z + np.zeros((n, 1, 1))
    conf = np.full((n, 30), 0.3)
    times = 1_600_000_000 + 86400 * np.arange(n)
    comparison = compare_methods(y, times, {"learned": (right, conf), "garch-t": (right * 1.3, conf),
                                            "gaussian-rw": (right * 0.7, conf), "baseline": (right * 1.1, conf)},
                                 0.02, 86400, "learned")
    metrics = {"shipped": "learned", "reason": "test", "comparison": comparison, "headline": headline(comparison),
               "pass_choices": [{}, {}, {"confidence_ln_h": False}]}
    # The same origins on a grid of 5-day bars span 40 bars: one batch, so Δ has no interval.
    short = compare_methods(y, times, {"learned": (right, conf), "garch-t": (right * 1.3, conf)}, 0.02, 5 * 86400,
                            "learned")
    thin = {"shipped": "learned", "reason": "test", "comparison": short, "headline": headline(short)}
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"1d": {"metrics": metrics}, "1w": {"metrics": thin}}))
    assert main(["scorecard", "--manifest", str(manifest), "--summary"]) == 0
    printed = capsys.readouterr().out.splitlines()
    (row,) = [line for line in printed if line.startswith("| 1d | learned |")]
    garch = comparison["methods"]["garch-t"]
    assert any(line.startswith("| 1d | 2019-21 ") for line in printed)  # coverage per era
    assert f"{garch['pin5']:.3f}, {100 * garch['vs_learned']['delta']:+.1f} %" in row
    # 200 daily bars: 2 batches of 100 days for the t interval, 3 blocks of 90 bars, too few for the bootstrap
    assert "(2 batches); bootstrap: too few blocks (3)" in row
    assert any(line.startswith("| 1d | 2020 0.") for line in printed)  # coverage per calendar year
    (nesting,) = [line for line in printed if line.startswith("Plan and `TimeframeConfig` choices per coin-group pass")]
    assert nesting.endswith(": 1d pass 3 confidence_ln_h False; 1w not nested (the plan in every pass).")
    for timeframe, scores, (low80, high80), (low95, high95) in (
            ("1d", comparison, (0.77, 0.83), (0.93, 0.97)), ("1w", short, (0.75, 0.85), (0.92, 0.98))):
        horizon = scores["methods"]["learned"]["per_horizon"]
        in_band = sum(low80 <= c80 <= high80 and low95 <= c95 <= high95
                      for c80, c95 in zip(horizon["coverage_80"], horizon["coverage_95"], strict=True))
        (line,) = [line for line in printed if line.startswith(f"| {timeframe} | learned |")]
        assert f"| {in_band} of 30; " in line
    (thin_row,) = [line for line in printed if line.startswith("| 1w | learned |")]
    assert " % [too few batches: 1]; bootstrap: too few blocks (1)" in thin_row
    assert "no interval (too few batches)" in thin_row
    assert main(["scorecard", "--manifest", str(manifest)]) == 0
    text = capsys.readouterr().out
    assert "### 1d: reference learned, best peer baseline" in text and "no walk-forward comparison" in text
    assert "calendar batches, 2 batches of 100 days (t, 1 df)" in text
    assert "calendar batches: none, too few batches (1 of >= 60 bars; 2 needed)" in text
    assert "holdout: not scored in this manifest" in text

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- scorecard --summary: begin -->\nOLD-TABLE\n"
                      "<!-- scorecard --summary: end -->\nrest\n")
    assert main(["scorecard", "--manifest", str(manifest), "--readme", str(readme)]) == 0
    assert row in readme.read_text() and "OLD-TABLE" not in readme.read_text() and readme.read_text().endswith("rest\n")


def test_the_readme_table_is_the_committed_manifests_scorecard():
    """The README's forecast table is generated (`candlecast scorecard --readme README.md`), not typed."""
    from pathlib import Path

    from candlecast.forecast.cli import readme_with_summary

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    assert readme_with_summary(readme, json.loads((root / "models" / "manifest.json").read_text())) == readme


def test_garch_t_reports_the_origins_where_it_fell_back(monkeypatch):
    from candlecast.forecast import peers
    from candlecast.forecast.peers import garch_fallback_by_position

    candles = garch_candles(700, seed=4)
    positions = np.arange(20, 600, 5)  # PLAN.min_returns 100: the first 16 fall back for want of returns
    fell_back = np.zeros(len(positions), dtype=bool)
    fitted = garch_t(candles.close, positions, PLAN, fallback=fell_back)
    assert np.array_equal(fell_back, positions < PLAN.min_returns)
    assert np.array_equal(garch_fallback_by_position(positions, PLAN), positions < PLAN.min_returns)
    assert np.array_equal(fitted, garch_t(candles.close, positions, PLAN))  # the mask changes no forecast
    # No fit succeeds: every origin falls back, which the position rule cannot see.
    monkeypatch.setattr(peers, "_garch_fit", lambda returns, start: None)
    garch_t(candles.close, positions, PLAN, fallback=fell_back)
    assert fell_back.all()
    masks = {}
    peer_quantiles([(None, candles)], np.zeros(len(positions), int), candles.open_time[positions], "1h",
                   fallback=masks)
    assert masks["garch-t"].all()


def fallback_walk_forward(n: int = 400, fallback_every: int = 4):
    """A model, and a GARCH-t that is 1.2× too wide where fitted and 2× too wide on its fallback origins (every
    `fallback_every`-th)."""
    rng = np.random.default_rng(8)
    y = rng.normal(0, 0.01, (n, 30)) * np.sqrt(np.arange(1, 31))
    z = np.array([-1.96, -1.2816, -0.6745, 0, 0.6745, 1.2816, 1.96])
    right = 0.01 * np.sqrt(np.arange(1, 31))[None, :, None] * z + np.zeros((n, 1, 1))
    fell_back = np.arange(n) % fallback_every == 0
    garch = np.where(fell_back[:, None, None], 2.0, 1.2) * right
    conf = np.full((n, 30), 0.3)
    times = 1_500_000_000 + 86400 * np.arange(n)
    return y, times, {"learned": (right, conf), "garch-t": (garch, conf)}, fell_back


def test_delta_against_garch_t_is_also_given_where_it_was_fitted():
    from candlecast.forecast.comparison import batch_length
    from candlecast.forecast.train import headline

    y, times, methods, fell_back = fallback_walk_forward()
    y[-3:, 25:] = np.nan  # unknown outcomes count nowhere
    y[-1:, :] = np.nan  # an origin without any outcome is not a test origin of the share
    comparison = compare_methods(y, times, methods, 0.02, 86400, "learned", chance_reps=2,
                                 fallback={"garch-t": fell_back})
    garch = comparison["methods"]["garch-t"]
    scored = np.isfinite(y).any(axis=1)
    assert garch["n_fallback"] == int((fell_back & scored).sum()) == 100
    assert garch["fallback_share"] == pytest.approx(100 / 399)
    fitted = scored & ~fell_back
    known = np.isfinite(y[fitted])
    loss = {name: np.where(known, pin5_loss(np.nan_to_num(y[fitted]), q[fitted]), np.nan)
            for name, (q, _) in methods.items()}
    expected = batch_t_delta(loss["learned"], loss["garch-t"], np.arange(400)[fitted], batch_length(86400))
    delta = garch["vs_learned_fitted"]
    assert delta["delta"] == pytest.approx(expected["delta"]) and delta["ci95"] == pytest.approx(expected["ci95"])
    assert delta["n_origins"] == 299 and "bootstrap" in delta
    # the fallback is the weaker peer: pooled over every origin, Δ is flattered
    assert garch["vs_learned"]["delta"] > delta["delta"] > 0
    fitted_only = compare_methods(y[fitted], times[fitted], {name: (q[fitted], c[fitted])
                                                             for name, (q, c) in methods.items()},
                                  0.02, 86400, "learned", chance_reps=2)
    assert delta["delta"] == pytest.approx(fitted_only["methods"]["garch-t"]["vs_learned"]["delta"])
    top = headline(comparison)["vs_peers_fitted"]["garch-t"]
    assert top["delta"] == delta["delta"] and top["fallback_share"] == garch["fallback_share"]
    # without masks (older code's comparisons), none of it
    plain = compare_methods(y, times, methods, 0.02, 86400, "learned", chance_reps=2)
    assert "vs_learned_fitted" not in plain["methods"]["garch-t"] and not headline(plain)["vs_peers_fitted"]


def test_scorecards_print_delta_where_garch_t_was_fitted_and_a_dash_before(tmp_path, capsys):
    from candlecast.forecast.cli import main
    from candlecast.forecast.train import headline

    y, times, methods, fell_back = fallback_walk_forward()
    new = compare_methods(y, times, methods, 0.02, 86400, "learned", chance_reps=2, fallback={"garch-t": fell_back})
    old = compare_methods(y, times, methods, 0.02, 86400, "learned", chance_reps=2)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({
        tf: {"metrics": {"shipped": "learned", "reason": "test", "comparison": c, "headline": headline(c)}}
        for tf, c in (("1d", new), ("1w", old))}))
    assert main(["scorecard", "--manifest", str(manifest), "--summary"]) == 0
    printed = capsys.readouterr().out.splitlines()
    delta = new["methods"]["garch-t"]["vs_learned_fitted"]
    (row,) = [line for line in printed if line.startswith("| 1d | ") and line.endswith("| 25.0 % (100) |")]
    assert row.startswith(f"| 1d | {100 * delta['delta']:+.1f} % [") and "| 300 |" in row
    assert "| 1w | — | — | — |" in printed
    assert main(["scorecard", "--manifest", str(manifest)]) == 0
    full = capsys.readouterr().out
    assert "garch-t where fitted (not its t(5) fallback): Δ " in full and "fallback share 25.0 %, 100 origins" in full
    assert "garch-t where fitted (not its t(5) fallback): — (not recorded in this comparison)" in full


def test_saved_walk_forwards_keep_the_fallback_mask_and_older_ones_use_the_position_rule(tmp_path):
    from types import SimpleNamespace

    from candlecast.forecast.peers import GARCH_PLANS
    from candlecast.forecast.train import garch_fallback_from_positions, load_walk_forward, save_walk_forward

    short, long = synthetic_candles(50, 1), synthetic_candles(120, 2)
    loaded = [(SimpleNamespace(place="x", pair="A-USD", base="A"), short),
              (SimpleNamespace(place="x", pair="B-USD", base="B"), long)]
    series = np.array([0, 0, 1, 1, 1])
    positions = np.array([10, 49, 20, 36, 119])
    times = np.array([loaded[s][1].open_time[p] for s, p in zip(series, positions, strict=True)])
    # 1m: GARCH-t needs 36 returns
    assert GARCH_PLANS["1m"].min_returns == 36
    assert garch_fallback_from_positions(loaded, series, times, "1m").tolist() == [True, False, True, False, False]
    y, _, methods, fell_back = fallback_walk_forward(n=5)
    result = SimpleNamespace(test=SimpleNamespace(log_return=y, time=times, series=series), results={}, folds=[])
    path = tmp_path / "wf.npz"
    save_walk_forward(path, "1m", loaded, result, "learned", "test", methods, {"garch-t": fell_back})
    about = load_walk_forward(path)[0]
    assert about["fallback_masks"]["garch-t"].tolist() == fell_back.tolist()
    save_walk_forward(path, "1m", loaded, result, "learned", "test", methods)
    assert load_walk_forward(path)[0]["fallback_masks"] == {}


def test_the_gaussian_walk_on_a_longer_window_is_the_sample_sd_of_that_many_returns():
    candles = garch_candles(400)
    returns = np.diff(np.log(candles.close))
    positions = np.array([5, 59, 60, 61, 200, 399])
    sd = rw_sd(candles.close, 60)[positions]
    for p, value in zip(positions, sd, strict=True):
        assert value == pytest.approx(np.std(returns[max(0, p - 60) : p], ddof=1), rel=1e-12)
    assert not np.allclose(sd[-2:], rw_sd(candles.close)[positions[-2:]])  # another window: another sd
    np.testing.assert_allclose(gaussian_rw(candles.close, positions, 60)[:, 0, -1], sd * _gaussian_z()[-1])


def test_peer_strength_settings_at_the_scorecards_own_are_the_scorecards_peers():
    from infra.peer_strength import EVERY_RETURN, variant_quantiles, variants

    first, second = garch_candles(1300, seed=4), garch_candles(900, seed=5)
    loaded = [(None, first), (None, second)]
    series = np.array([0, 1, 0, 1, 0])
    times = np.array([first.open_time[700], second.open_time[500], first.open_time[1299], second.open_time[899],
                      first.open_time[400]])
    stored = peer_quantiles(loaded, series, times, "1h")
    for peer, setting in (("garch-t", GARCH_PLANS["1h"]), ("gaussian-rw", RW_WINDOW)):
        np.testing.assert_array_equal(variant_quantiles(loaded, series, times, peer, setting), stored[peer])
    settings = variants("1d")
    assert {peer for peer, _ in settings.values()} == {"garch-t", "gaussian-rw"}
    assert any(peer == "garch-t" and setting.window == EVERY_RETURN for peer, setting in settings.values())
    assert all(setting.refit_every == 1 for peer, setting in variants("1m").values() if peer == "garch-t")
