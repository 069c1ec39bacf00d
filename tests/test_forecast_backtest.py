"""`backtest` on the committed sample and on hourly CSV resampled to 4h; `build-sample` on ../shared."""

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from candlecast.forecast.cli import main

pytestmark = pytest.mark.usefixtures("committed_models_key")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "ohlcv"
KEYS = {"coverage_80", "coverage_95", "ece", "pinball_skill", "n_origins", "per_horizon"}
# The median is the random walk for every method: these would be 1.00 / 0.50 by construction (issue 11).
CONSTANT = {"rel_mae", "directional_accuracy", "directional_accuracy_ci95", "accuracy"}


@pytest.mark.parametrize("timeframe", ["1h", "1d"])
def test_backtest_prints_one_json_object(timeframe, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    assert main(["backtest", "--data", "data", "--timeframe", timeframe, "--report", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    methods = result["comparison"]["methods"]
    assert {"candlecast", "garch-t", "gaussian-rw", "conformal-rw"} <= set(methods)
    for scores in methods.values():  # per era: coverage and pin5 on the same pairs for every method
        assert scores["eras"] and all({"coverage_80", "coverage_95", "pin5", "n_pairs"} <= set(era)
                                      for era in scores["eras"].values())
        assert len(scores["per_horizon"]["width_95"]) == 30
    assert "| conformal-rw |" in err and "pin5" in err.split("era ")[1]
    png = (tmp_path / timeframe / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 50_000
    assert set(result) >= KEYS
    assert result["n_origins"] > 100
    assert len(result["per_horizon"]) == 30
    assert 0 <= result["coverage_80"] <= result["coverage_95"] <= 1
    assert 0 <= result["ece"] <= 1
    assert not CONSTANT & set(result) and not CONSTANT & set(result["per_horizon"][0])


def test_backtest_resamples_hourly_csv_and_refuses_an_unsigned_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    from candlecast.forecast.backtest import load_signed_model
    from candlecast.forecast.dataset import read_ohlcv

    hourly = read_ohlcv(ROOT / "data" / "ETHUSDT" / "1h.parquet")
    lines = ["timestamp,open,high,low,close,volume"]
    for row in zip(*(getattr(hourly, name).tolist() for name in ("open_time", "open", "high", "low", "close",
                                                               "volume")), strict=True):
        stamp = datetime.fromtimestamp(row[0], UTC)
        lines.append(stamp.strftime("%Y-%m-%dT%H:%M:%SZ") + "," + ",".join(str(v) for v in row[1:]))
    (tmp_path / "ETH-USDT_1h.csv").write_text("\n".join(lines) + "\n")
    assert main(["backtest", "--data", str(tmp_path), "--timeframe", "4h"]) == 0
    assert json.loads(capsys.readouterr().out)["symbols"] == ["ETHUSDT"]

    copy = tmp_path / "model.pkl"
    copy.write_bytes((ROOT / "models" / "4h.pkl").read_bytes())
    from candlecast.errors import ModelIntegrityError

    with pytest.raises(ModelIntegrityError, match="unsigned"):
        load_signed_model(copy, b"key")


def test_backtest_names_the_files_it_did_not_score_and_scores_each_series_apart(tmp_path, capsys, monkeypatch):
    """A misnamed file, a series too short for an origin and a bad row (zero close) among good files: `symbols`
    lists only the scored series, `unscored_files` says why of the rest, and each scored series has its own row."""
    import shutil

    from candlecast.forecast.dataset import read_ohlcv

    monkeypatch.chdir(ROOT)
    for pair in ("ETHUSDT", "BTCUSDT"):
        (tmp_path / pair).mkdir()
        shutil.copy(ROOT / "data" / pair / "1d.parquet", tmp_path / pair / "1d.parquet")
    daily = read_ohlcv(ROOT / "data" / "BTCUSDT" / "1d.parquet")
    rows = ["timestamp,open,high,low,close,volume"] + [
        datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") + f",{o},{h},{lo},{c},{v}"
        for t, o, h, lo, c, v in zip(*(getattr(daily, name).tolist() for name in
                                       ("open_time", "open", "high", "low", "close", "volume")), strict=True)]
    rows[300] = rows[300].rsplit(",", 2)[0] + ",0,1"  # close 0: an export's bad row
    (tmp_path / "BAD-USD_1d.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "SHRT-USD_1d.csv").write_text("\n".join(rows[:11]) + "\n")
    (tmp_path / "btcusd.csv").write_text("\n".join(rows[:11]) + "\n")
    assert main(["backtest", "--data", str(tmp_path), "--timeframe", "1d"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["symbols"] == ["BADUSD", "BTCUSDT", "ETHUSDT"]
    reasons = {Path(item["file"]).name: item["reason"] for item in result["unscored_files"]}
    assert set(reasons) == {"btcusd.csv", "SHRT-USD_1d.csv"}
    assert "name is neither" in reasons["btcusd.csv"] and reasons["SHRT-USD_1d.csv"].startswith("10 1d candles")
    assert "not scored: " + str(tmp_path / "SHRT-USD_1d.csv") in err
    comparison = result["comparison"]
    per_series = comparison["per_series"]
    assert sorted(per_series) == result["symbols"] and comparison["n_series"] == 3
    for method, scores in comparison["methods"].items():
        assert sum(series[method]["n_origins"] for series in per_series.values()) == scores["n_origins"]
    assert "| BADUSD | " in err and "Δ garch-t vs candlecast" in err


def test_the_same_pair_in_two_folders_is_two_series(tmp_path, capsys):
    """One folder per exchange, as another data set may come: both BTC-USDT files are scored, each named by its
    folder (one of them was silently passed over before). Their times are epoch seconds."""
    from candlecast.forecast.dataset import read_ohlcv

    for exchange, pair in (("kraken", "BTCUSDT"), ("coinbase", "ETHUSDT")):
        candles = read_ohlcv(ROOT / "data" / pair / "1d.parquet")
        rows = zip(*(getattr(candles, name).tolist() for name in ("open_time", "open", "high", "low", "close",
                                                                  "volume")), strict=True)
        (tmp_path / exchange).mkdir()
        (tmp_path / exchange / "BTC-USDT_1d.csv").write_text(
            "timestamp,open,high,low,close,volume\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    assert main(["backtest", "--data", str(tmp_path), "--timeframe", "1d"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["symbols"] == ["coinbase/BTCUSDT", "kraken/BTCUSDT"]
    per_series = result["comparison"]["per_series"]
    assert per_series["coinbase/BTCUSDT"]["candlecast"]["pin5"] != per_series["kraken/BTCUSDT"]["candlecast"]["pin5"]


def test_backtest_stops_on_an_unreadable_file_naming_it(tmp_path, capsys):
    (tmp_path / "BTC-USD_1d.csv").write_text("Date,Open,High,Low,Close,Volume\n2024-01-01,1,2,0.5,1.5,5\n")
    assert main(["backtest", "--data", str(tmp_path), "--timeframe", "1d", "--model",
                 str(ROOT / "models" / "1d.pkl")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{tmp_path / 'BTC-USD_1d.csv'}: no column timestamp (expected timestamp,open,high,low,close,volume)")


@pytest.mark.shared
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is absent")
def test_build_sample_lists_every_coin_file(tmp_path):
    assert main(["build-sample", "--source", str(SHARED), "--out", str(tmp_path)]) == 0
    with (tmp_path / "symbols.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    pairs = {path.stem.split("_")[0].replace("-", "") for path in SHARED.glob("*.csv")}
    assert {row["ticker"] for row in rows} == {f"X:{pair}" for pair in pairs}
    assert [int(row["volume_rank"]) for row in rows] == list(range(1, len(rows) + 1))
    volumes = [float(row["volume_24h"]) for row in rows]
    assert volumes == sorted(volumes, reverse=True)
    btc = next(row for row in rows if row["ticker"] == "X:BTCUSDT")
    assert btc["name"] == "Bitcoin" and btc["base_currency"] == "BTC" and btc["quote_currency"] == "USDT"
    total = sum(path.stat().st_size for path in tmp_path.rglob("*.parquet"))
    assert total < 2_000_000
    assert (tmp_path / "XMRUSD" / "1d.parquet").exists() and not (tmp_path / "XMRUSD" / "1h.parquet").exists()


@pytest.mark.slow
def test_train_evaluate_only_prints_the_walk_forward_comparison_and_writes_no_model(tmp_path, capsys):
    """Monthly candles of five coins (daily files, 1d -> 1m), every coin held out in turn: the comparison covers
    every coin and writes its PNG; no model file or manifest appears until train runs in full."""
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    start = datetime(2012, 1, 1, tzinfo=UTC).timestamp()
    for index, coin in enumerate(("LTC", "BTC", "ETH", "ADA", "XRP")):
        rng = np.random.default_rng(index)
        days = 3650 - 300 * index  # later listings
        close = 100 * np.exp(np.cumsum(rng.standard_t(4, days) * 0.03))
        lines = ["timestamp,open,high,low,close,volume"]
        for day in range(days):
            stamp = datetime.fromtimestamp(start + 86400 * (3650 - days + day), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            price = close[day]
            lines.append(f"{stamp},{price},{price * 1.02},{price / 1.02},{price},1000")
        (data / f"{coin}-USD_1d.csv").write_text("\n".join(lines) + "\n")
    out, reports = tmp_path / "models", tmp_path / "reports"
    assert main(["train", "--timeframe", "1m", "--data", str(data), "--out", str(out), "--reports", str(reports),
                 "--folds", "3", "--test-fraction", "0.7", "--holdout-bars", "0", "--evaluate-only"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["would_ship"] in ("baseline", "garch-scale", "combined") and not out.exists()
    assert {"baseline", "garch-scale", "combined", "garch-t", "gaussian-rw", "conformal-rw"} == set(result["methods"])
    assert "5 series" in captured.err and "| conformal-rw |" in captured.err
    assert (reports / "1m" / "comparison.png").read_bytes().startswith(b"\x89PNG")
    # The full run on the same data: a signed model, its manifest entry, and the report with the methods' rows.
    assert main(["train", "--timeframe", "1m", "--data", str(data), "--out", str(out), "--reports", str(reports),
                 "--folds", "3", "--test-fraction", "0.7", "--holdout-bars", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["shipped"] == result["would_ship"]  # the same walk-forward
    assert (out / "1m.pkl").exists() and (out / "1m.pkl.sig").exists()
    metrics = json.loads((out / "manifest.json").read_text())["1m"]["metrics"]
    assert "conformal-rw" in metrics["comparison"]["methods"]
    assert metrics["held_out_groups"] == 3  # every coin held out by one of the passes
    assert metrics["held_out_symbols"] == ["ADAUSD", "BTCUSD", "ETHUSD", "LTCUSD", "XRPUSD"]
    assert (reports / "1m" / "report.png").read_bytes().startswith(b"\x89PNG")


def test_a_thinned_backtest_computes_garch_states_only_at_the_origins_it_keeps(monkeypatch):
    """At 1h every origin of ../shared would be a GARCH fit (215 s for 20,000 kept): the thinning comes first, and
    keeps the origins that thinning all of them would have kept."""
    import numpy as np

    from candlecast.config import LOCAL_MODEL_SIGNING_KEY
    from candlecast.forecast import backtest, evaluate
    from candlecast.forecast.dataset import load_timeframe
    from candlecast.forecast.features import CONFIGS

    loaded = load_timeframe(ROOT / "data", "1h", clean=True)
    config = CONFIGS["1h"]
    every = evaluate.build_origins(loaded, config)
    every = every.take(np.isfinite(every.log_return).any(axis=1))
    limit = len(every) // 7
    kept = evaluate.build_origins(loaded, config, positions=evaluate.thinned_evenly(
        evaluate.scored_positions(loaded, config), limit))
    expected = every.take(np.linspace(0, len(every) - 1, limit).astype(int))
    for name in ("series", "time", "garch", "log_return"):
        np.testing.assert_array_equal(getattr(kept, name), getattr(expected, name))

    fitted = []
    states = evaluate.series_states
    monkeypatch.setattr(evaluate, "series_states", lambda log_close, positions, *rest, **named: fitted.append(
        len(positions)) or states(log_close, positions, *rest, **named))
    monkeypatch.setattr(backtest, "MAX_ORIGINS", limit)
    model = backtest.load_signed_model(ROOT / "models" / "1h.pkl", LOCAL_MODEL_SIGNING_KEY.encode())
    result = backtest.backtest(model, ROOT / "data", "1h", peers=False)
    assert result["n_origins"] == limit and sum(fitted) == limit
