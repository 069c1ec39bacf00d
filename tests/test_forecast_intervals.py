"""Issue 11's honesty checks of the walk-forward's figures, each on synthetic data whose right answer is known:
Δ's batches span a calendar floor, the bootstrap says "too few blocks", coverage carries its interval per horizon
and per calendar year, and the confidence ECE per horizon stands beside its chance level."""

import math

import numpy as np
import pytest
from scipy.signal import lfilter

from candlecast.forecast.comparison import (
    MIN_BLOCKS,
    batch_length,
    batch_t_delta,
    block_bootstrap_delta,
    chance_ece,
    compare_methods,
    coverage_intervals,
    ece_chance,
)

pytestmark = pytest.mark.usefixtures("committed_models_key")

HOUR = 3600


def test_a_batch_spans_60_bars_and_90_days():
    assert batch_length(HOUR) == 2160 and batch_length(4 * HOUR) == 540 and batch_length(24 * HOUR) == 90
    assert batch_length(7 * 24 * HOUR) == 60 and batch_length(int(30.436875 * 86400)) == 60


def _regime_losses(rng, bars: int, half_life: float, delta: float):
    """Per-origin losses (3 coins per bar) whose peer/model ratio is 1 + delta plus a regime that persists
    `half_life` bars (AR(1)), the dependence the audit found in the 60-bar batch ratios."""
    phi = 0.5 ** (1 / half_life)
    regime = lfilter([1.0], [1.0, -phi], rng.normal(0, 0.02 * math.sqrt(1 - phi ** 2), bars))
    regime += 0.02 * rng.normal() * phi ** np.arange(bars)  # start in the stationary distribution
    at = np.repeat(np.arange(bars), 3)
    model = rng.exponential(1.0, (len(at), 1))
    peer = model * (1 + delta + regime[at, None]) + rng.normal(0, 0.05, model.shape)
    return model, peer, at


def test_batches_of_a_quarter_cover_a_regime_that_60_bars_split():
    """A 4h-like test (13 quarters) whose Δ drifts in a month-long regime: 60-bar batches (10 days) treat
    neighbours in one regime as independent and miss the known Δ about half the time; 90-day batches cover it."""
    rng = np.random.default_rng(5)
    length = batch_length(4 * HOUR)
    short = long = 0
    reps = 150
    for _ in range(reps):
        model, peer, at = _regime_losses(rng, 13 * length, 180, 0.05)
        low, high = batch_t_delta(model, peer, at, 60)["ci95"]
        short += low <= 0.05 <= high
        low, high = batch_t_delta(model, peer, at, length)["ci95"]
        long += low <= 0.05 <= high
    assert short / reps < 0.7  # measured 0.45
    assert long / reps >= 0.85  # measured 0.90


def test_the_bootstrap_gives_no_interval_below_ten_blocks():
    rng = np.random.default_rng(0)
    at = np.repeat(np.arange(9 * 90), 2)
    loss = rng.exponential(1.0, (len(at), 30))
    few = block_bootstrap_delta(loss, loss * 1.1, at, 90)
    assert few["ci95"] is None and few["blocks"] == 9 and "too few blocks" in few["note"]
    at = np.repeat(np.arange(MIN_BLOCKS * 90), 2)
    loss = rng.exponential(1.0, (len(at), 30))
    enough = block_bootstrap_delta(loss, loss * 1.1, at, 90)
    assert enough["blocks"] == MIN_BLOCKS and enough["ci95"] == pytest.approx([0.1, 0.1])


def test_compare_methods_uses_the_calendar_batch_for_both_intervals():
    rng = np.random.default_rng(1)
    n = 24 * 400  # hourly origins over 400 days: 4 batches of 2,160 bars, 5 bootstrap blocks
    y = rng.normal(0, 0.01, (n, 30))
    z = np.array([-1.96, -1.2816, -0.6745, 0, 0.6745, 1.2816, 1.96])
    right = 0.01 * z + np.zeros((n, 30, 1))
    conf = np.full((n, 30), 0.3)
    times = 1_600_000_000 + HOUR * np.arange(n)
    result = compare_methods(y, times, {"model": (right, conf), "wide": (1.5 * right, conf)}, 0.01, HOUR, "model",
                             chance_reps=5)
    delta = result["methods"]["wide"]["vs_model"]
    assert result["batch_bars"] == 2160 and delta["blocks"] == 4 and delta["ci95"][0] > 0
    assert delta["bootstrap"]["ci95"] is None and delta["bootstrap"]["block_bars"] == 2160


def test_coverage_interval_covers_the_true_rate_and_counts_independent_pairs():
    """iid hits at 0.8 on 2,000 bars: the interval covers 0.8 and the effective sample is about the pairs. The
    same hits copied onto 5 coins that move together are 5× the pairs but no more information: n_eff stays."""
    rng = np.random.default_rng(2)
    covered, ratios = 0, []
    for _ in range(40):
        hits = (rng.random((2000, 1)) < 0.8).astype(float)
        (one,) = coverage_intervals(hits, np.ones_like(hits), np.arange(2000), 60, reps=400)
        covered += one["ci95"][0] <= 0.8 <= one["ci95"][1]
        (copied,) = coverage_intervals(np.repeat(hits, 5, axis=0), np.ones((10_000, 1)), np.repeat(np.arange(2000), 5),
                                       60, reps=400)
        ratios.append(copied["n_eff"] / one["n_eff"])
        assert copied["n_pairs"] == 10_000
    assert covered >= 34  # 95 % nominal of 40
    assert 0.8 <= np.median(ratios) <= 1.25
    assert 0.7 * 2000 <= one["n_eff"] <= 1.3 * 2000


def test_coverage_per_year_separates_years_that_an_era_pools():
    """Two years that miss in opposite directions (0.9 and 0.7) pool to 0.8 over the era; per year they show."""
    rng = np.random.default_rng(3)
    days = np.arange(730)
    times = 1_546_300_800 + 86400 * days  # 2019-01-01 on
    y = rng.normal(0, 1, (730, 30))
    level = np.where(days < 365, 1.6449, 1.0364)  # two-sided 90 % / 70 % z
    q = np.zeros((730, 30, 7))
    q[..., 1], q[..., 5] = -level[:, None], level[:, None]
    q[..., 0], q[..., 6] = -3 * level[:, None], 3 * level[:, None]
    conf = np.full((730, 30), 0.3)
    result = compare_methods(y, times, {"model": (q, conf)}, 0.01, 86400, "model", chance_reps=5)
    years = result["methods"]["model"]["coverage_uncertainty"]["years"]
    assert set(years) == {"2019", "2020"} and years["2019"]["n_origins"] == 365
    assert years["2019"]["80"]["coverage"] == pytest.approx(0.9, abs=0.01)
    assert years["2020"]["80"]["coverage"] == pytest.approx(0.7, abs=0.01)
    for year, truth in (("2019", 0.9), ("2020", 0.7)):  # 4 quarterly batches: the t interval, 3 df
        low, high = years[year]["80"]["ci95"]
        assert low < truth < high and "batch t" in years[year]["80"]["method"]
    assert result["methods"]["model"]["coverage_80"] == pytest.approx(0.8, abs=0.01)


def test_chance_ece_is_the_noise_of_a_calibrated_forecaster():
    """Constant confidence p on n pairs: a calibrated forecaster's ECE is E|mean of n Bernoulli(p) − p| ≈
    sqrt(2/π)·sqrt(p(1 − p)/n)."""
    rng = np.random.default_rng(4)
    p, n = 0.3, 2000
    expected = math.sqrt(2 / math.pi) * math.sqrt(p * (1 - p) / n)
    assert chance_ece(np.full(n, p), rng, 400) == pytest.approx(expected, rel=0.1)


def test_the_largest_per_horizon_ece_is_found_beside_its_chance_level():
    """Confidence 0.3 everywhere; at h1 the hits happen 40 % of the time, elsewhere 30 %: pooled ECE is small, the
    h1 ECE is 0.10, and the other horizons sit near chance."""
    rng = np.random.default_rng(6)
    n = 4000
    conf = np.full((n, 30), 0.3)
    rate = np.where(np.arange(30) == 0, 0.4, 0.3)
    hit = rng.random((n, 30)) < rate
    tolerance = 0.01
    y = np.where(hit, 0.0, 0.5)  # |expm1(y − median)| ≤ tolerance iff hit, median 0
    q = np.zeros((n, 30, 7))
    result = ece_chance(y, q, conf, tolerance, reps=50)
    assert result["max_h"] == 1 and result["max_ece"] == pytest.approx(0.1, abs=0.02)
    assert result["max_chance"] == pytest.approx(math.sqrt(2 / math.pi) * math.sqrt(0.21 / n), rel=0.2)
    assert result["pooled"] < 0.01
    others = np.array(result["per_horizon_ece"][1:]) / np.array(result["per_horizon_chance"][1:])
    assert np.median(others) < 2


def _monthly_data(directory):
    """Daily candles of five coins (1d -> 1m), later listings for later coins."""
    from datetime import UTC, datetime

    directory.mkdir()
    start = datetime(2012, 1, 1, tzinfo=UTC).timestamp()
    for index, coin in enumerate(("LTC", "BTC", "ETH", "ADA", "XRP")):
        rng = np.random.default_rng(index)
        days = 3650 - 300 * index
        close = 100 * np.exp(np.cumsum(rng.standard_t(4, days) * 0.03))
        lines = ["timestamp,open,high,low,close,volume"]
        for day in range(days):
            stamp = datetime.fromtimestamp(start + 86400 * (3650 - days + day), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            lines.append(f"{stamp},{close[day]},{close[day] * 1.02},{close[day] / 1.02},{close[day]},1000")
        (directory / f"{coin}-USD_1d.csv").write_text("\n".join(lines) + "\n")


def test_rescore_keeps_the_model_file_and_scores_only_origins_after_train_end(tmp_path, capsys):
    """Train a 1m model with 12 months held out, save its walk-forward, rescore: the model file and its sha256
    are unchanged, the holdout holds exactly the origins after train_end with an outcome, and its pin5 is the
    shipped file's own there; a walk-forward that is not the shipped one is refused."""
    import json
    from datetime import datetime

    from candlecast.forecast.backtest import load_signed_model
    from candlecast.forecast.cli import main
    from candlecast.forecast.dataset import load_timeframe
    from candlecast.forecast.evaluate import build_origins, model_outputs, pin5_loss
    from candlecast.forecast.holdout import holdout_origins
    from candlecast.forecast.train import signing_key

    data, out = tmp_path / "data", tmp_path / "models"
    _monthly_data(data)
    common = ["--timeframe", "1m", "--data", str(data), "--reports", str(tmp_path / "r"), "--folds", "3",
              "--test-fraction", "0.7"]
    assert main(["train", *common, "--out", str(out)]) == 0
    saved = tmp_path / "wf.npz"
    assert main(["train", *common, "--out", str(tmp_path / "unused"), "--evaluate-only",
                 "--save-walk-forward", str(saved)]) == 0
    capsys.readouterr()
    before = json.loads((out / "manifest.json").read_text())["1m"]
    pkl = (out / "1m.pkl").read_bytes()
    assert main(["rescore", "--timeframe", "1m", "--walk-forward", str(saved), "--manifest",
                 str(out / "manifest.json"), "--data", str(data)]) == 0
    after = json.loads((out / "manifest.json").read_text())["1m"]
    assert (out / "1m.pkl").read_bytes() == pkl and after["sha256"] == before["sha256"]
    assert after["metrics"]["comparison"]["batch_bars"] == 60 and "ece_chance" in after["metrics"]["comparison"][
        "methods"][after["metrics"]["shipped"]]
    holdout = after["metrics"]["holdout"]
    model = load_signed_model(out / "1m.pkl", signing_key())
    origins = build_origins(load_timeframe(data, "1m", clean=True), model.config)
    end = datetime.fromisoformat(before["train_end"].replace("Z", "+00:00")).timestamp()
    kept = holdout_origins(origins, end)
    assert len(kept) == holdout["n_origins"] > 0 and kept.time.min() > end
    expected = int(((origins.time > end) & np.isfinite(origins.log_return).any(axis=1)).sum())
    assert holdout["n_origins"] == expected
    q, _, _ = model_outputs(model, kept)
    y = kept.log_return
    known = np.isfinite(y)
    own = float(np.mean(pin5_loss(np.where(known, y, 0), kept.scale[..., None] * q)[known]))
    assert holdout["methods"][model.method]["pin5"] == pytest.approx(own, rel=1e-5)
    assert holdout["methods"]["garch-t"]["vs_" + model.method]["ci95"] is None  # 12 months: one batch

    with np.load(saved) as stored:  # another walk-forward's outputs: refused, nothing written
        arrays = dict(stored)
    arrays[f"q:{model.method}"] = arrays[f"q:{model.method}"] * 1.1
    np.savez(tmp_path / "other.npz", **arrays)
    with pytest.raises(SystemExit, match="not the walk-forward that chose the shipped file"):
        main(["rescore", "--timeframe", "1m", "--walk-forward", str(tmp_path / "other.npz"), "--manifest",
              str(out / "manifest.json"), "--data", str(data)])
    assert json.loads((out / "manifest.json").read_text())["1m"] == after

    # Audit M: a walk-forward run on other candles (here one close changed; before, another resampling) is refused
    # even where every method's pin5 still matches, and so is one saved without a candle fingerprint.
    changed = tmp_path / "changed"
    changed.mkdir()
    for csv in data.iterdir():
        (changed / csv.name).write_text(csv.read_text())
    first = sorted(changed.iterdir())[0]
    lines = first.read_text().splitlines()
    fields = lines[5].split(",")
    fields[4] = str(float(fields[4]) * 1.001)
    lines[5] = ",".join(fields)
    first.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match="run on other candles"):
        main(["rescore", "--timeframe", "1m", "--walk-forward", str(saved), "--manifest",
              str(out / "manifest.json"), "--data", str(changed)])
    with np.load(saved) as stored:
        unmarked = dict(stored)
    about = json.loads(str(unmarked["about"]))
    del about["candles"]
    np.savez(tmp_path / "unmarked.npz", **(unmarked | {"about": np.array(json.dumps(about))}))
    with pytest.raises(SystemExit, match="saved before candle fingerprints"):
        main(["rescore", "--timeframe", "1m", "--walk-forward", str(tmp_path / "unmarked.npz"), "--manifest",
              str(out / "manifest.json"), "--data", str(data)])
    assert json.loads((out / "manifest.json").read_text())["1m"] == after


def test_the_worst_horizon_has_the_expected_worst_of_its_chance_levels_beside_it():
    """A calibrated forecaster's worst horizon is above its own horizon's chance level by chance alone: `ece_chance`
    also gives the expected largest of the 30 per-horizon chance ECEs, from the same draws (which leave the
    per-horizon levels as they were)."""
    from candlecast.forecast.comparison import ece_chance

    rng = np.random.default_rng(5)
    n = 400
    conf = np.full((n, 30), 0.3)
    q = np.zeros((n, 30, 7))
    y = np.where(rng.random((n, 30)) < 0.3, 0.0, 1.0)  # hit (|y − median| ≤ τ) with probability 0.3: calibrated
    result = ece_chance(y, q, conf, 0.01, reps=40)
    levels = result["per_horizon_chance"]
    assert result["worst_chance"] > 1.2 * max(levels)
    assert result["max_ece"] > result["max_chance"]  # the worst of 30 calibrated horizons exceeds its own level
    again = np.random.default_rng(17)
    assert levels[0] == pytest.approx(chance_ece(conf[:, 0], again, 40))  # the first horizon's draws, unchanged
