"""`train` on too little data: horizons the walk-forward never tested are not judged, reach the manifest, the models
table and the API as null and the scorecard as untested; a model whose table would be a placeholder is never shipped."""

from pathlib import Path

import numpy as np
import pytest

from candlecast.forecast.evaluate import measured
from tests.test_forecast_leakage import calendar_walk

pytestmark = pytest.mark.usefixtures("committed_models_key")

pytest.importorskip("arch")


def daily_csvs(folder: Path, coins: int, years: int) -> Path:
    """`coins` random walks of `years` of daily candles (2012 on) as <COIN>-USD_1d.csv files: 1m resamples them."""
    folder.mkdir(parents=True)
    for seed in range(coins):
        walk = calendar_walk(seed, 0, "1d", years * 365)
        stamps = np.datetime_as_string(walk.open_time.astype("datetime64[s]"), unit="s")
        rows = zip(stamps, walk.open, walk.high, walk.low, walk.close, walk.volume, strict=True)
        (folder / f"C{seed:02d}-USD_1d.csv").write_text("timestamp,open,high,low,close,volume\n" + "".join(
            f"{stamp}Z,{o},{h},{lo},{c},{v}\n" for stamp, o, h, lo, c, v in rows))
    return folder


def test_a_walk_forward_shorter_than_30_months_leaves_the_longest_horizons_untested_not_crashed(tmp_path):
    """Four coins of three years: the 1m test spans under 30 months, so no outcome reaches its longest horizons.
    The shipping rule (`choose`) judges the horizons the test reached (it raised a TypeError on the others)."""
    from candlecast.forecast.train import train_timeframe

    data = daily_csvs(tmp_path / "ohlcv", coins=4, years=3)
    result = train_timeframe("1m", data, tmp_path / "models", None, progress=False, evaluate_only=True)
    for scores in result["comparison"]["methods"].values():
        untested = [h for h, value in enumerate(scores["per_horizon"]["coverage_80"], 1) if not measured(value)]
        assert 0 < len(untested) < 30 and untested == list(range(untested[0], 31))  # the longest horizons
    assert not (tmp_path / "models").exists()


def test_train_names_the_files_it_does_not_use_and_why(tmp_path, capsys):
    """A name it cannot read, a series too short for an origin, and one that starts after the holdout cutoff."""
    from candlecast.forecast.cli import main

    data = daily_csvs(tmp_path / "ohlcv", coins=6, years=3)
    (data / "C00-USD_1d.csv").rename(data / "C00USD_daily.csv")
    rows = (data / "C01-USD_1d.csv").read_text().splitlines(keepends=True)
    # 2012-01-02 to 04-09: February and March whole; January (from its 2nd) and April are not candles
    (data / "C01-USD_1d.csv").write_text("".join(rows[:100]))
    (data / "C02-USD_1d.csv").write_text(rows[0] + "".join(rows[-200:]))  # within the last 12 months: held out
    assert main(["train", "--timeframe", "1m", "--data", str(data), "--evaluate-only",
                 "--reports", str(tmp_path / "reports")]) == 0
    err = capsys.readouterr().err
    assert f"not used: {data / 'C00USD_daily.csv'}: name is neither <BASE>-<QUOTE>_<tf>.csv" in err
    assert (f"not used: {data / 'C01-USD_1d.csv'}: 2 1m candles up to the holdout cutoff 20" in err
            and "an origin needs 6 before it and one after it" in err)
    assert f"not used: {data / 'C02-USD_1d.csv'}: no complete 1m candle up to the holdout cutoff 20" in err
    assert "| C03USD |" in err and all(f"C0{n}USD |" not in err for n in range(3))


@pytest.fixture(scope="module")
def shipped_with_untested_horizons(tmp_path_factory, committed_models_key) -> Path:
    """The folder `train` wrote for twelve coins of three years: enough pairs to ship a 1m model, a test too short
    to reach its longest horizons."""
    from candlecast.forecast.train import train_timeframe

    root = tmp_path_factory.mktemp("shipped")
    data = daily_csvs(root / "ohlcv", coins=12, years=3)
    train_timeframe("1m", data, root / "models", root / "reports", progress=False)
    return root / "models"


def untested_horizons(values: list) -> list[int]:
    return [h for h, value in enumerate(values, 1) if not measured(value)]


def test_untested_horizons_reach_the_manifest_as_null_never_as_nan(shipped_with_untested_horizons):
    import json

    def refuse(name: str):
        raise AssertionError(f"{name} in the manifest")

    text = (shipped_with_untested_horizons / "manifest.json").read_text()
    entry = json.loads(text, parse_constant=refuse)["1m"]
    metrics = entry["metrics"]
    model = metrics["comparison"]["methods"][metrics["shipped"]]
    untested = untested_horizons(model["per_horizon"]["coverage_80"])
    assert 0 < len(untested) < 30
    for scores in metrics["comparison"]["methods"].values():
        for values in scores["per_horizon"].values():
            assert untested_horizons(values) == untested and None in values  # null, not a number
    assert untested_horizons(item["coverage_80"] for item in metrics["test"]["per_horizon"]) == untested
    tested80 = [value for value in model["per_horizon"]["coverage_80"] if value is not None]
    assert metrics["headline"]["coverage_80_over_horizons"] == [min(tested80), max(tested80)]


def test_the_scorecard_counts_only_the_tested_horizons_and_says_so(shipped_with_untested_horizons, tmp_path, capsys):
    import json

    from candlecast.forecast.cli import main
    from candlecast.forecast.train import targets

    manifest = shipped_with_untested_horizons / "manifest.json"
    metrics = json.loads(manifest.read_text())["1m"]["metrics"]
    per = metrics["comparison"]["methods"][metrics["shipped"]]["per_horizon"]
    bands = targets("1m")
    tested = [(c80, c95) for c80, c95 in zip(per["coverage_80"], per["coverage_95"], strict=True) if c80 is not None]
    in_band = sum(bands["coverage_80"][0] <= c80 <= bands["coverage_80"][1]
                  and bands["coverage_95"][0] <= c95 <= bands["coverage_95"][1] for c80, c95 in tested)
    assert main(["scorecard", "--manifest", str(manifest), "--summary"]) == 0
    printed = capsys.readouterr().out.splitlines()
    (row,) = [line for line in printed if line.startswith(f"| 1m | {metrics['shipped']} |")]
    assert f"| {in_band} of {len(tested)} tested; " in row and len(tested) < 30
    low, high = min(c80 for c80, _ in tested), max(c80 for c80, _ in tested)
    assert f"({low:.2f}–{high:.2f})" in row
    assert main(["scorecard", "--manifest", str(manifest)]) == 0
    text = capsys.readouterr().out
    assert f"{low:.3f}–{high:.3f} ({30 - len(tested)} h untested)" in text and "nan" not in text
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- scorecard --summary: begin -->\nold\n<!-- scorecard --summary: end -->\n")
    assert main(["scorecard", "--manifest", str(manifest), "--readme", str(readme)]) == 0
    assert row in readme.read_text()


@pytest.mark.integration
@pytest.mark.s3
def test_untested_horizons_are_null_in_the_models_table_and_the_api(shipped_with_untested_horizons, clean_db,
                                                                    tmp_path):
    import json
    import shutil

    from candlecast import db
    from candlecast.forecast.train import register
    from candlecast.repositories.models import get_active_model_by_timeframe
    from candlecast.services import model_loading
    from tests.conftest import invoke, path_event

    models = shutil.copytree(shipped_with_untested_horizons, tmp_path / "models")
    entry = json.loads((models / "manifest.json").read_text())["1m"]
    shipped = entry["metrics"]["shipped"]
    untested = untested_horizons(entry["metrics"]["comparison"]["methods"][shipped]["per_horizon"]["coverage_80"])
    model_loading.forget_models()
    register(entry, models)
    with db.connection() as conn:
        row = get_active_model_by_timeframe(conn, "1m")
    assert untested_horizons(row["metrics"]["comparison"]["methods"][shipped]["per_horizon"]["coverage_80"]) == untested
    status, _, body = invoke("symbols", path_event("model_get.json", "/models/1m", timeframe="1m"))
    assert status == 200, body
    by_horizon = body["backtest"]["coverage_by_horizon"]
    assert [item["h"] for item in by_horizon if item["coverage_80"] is None] == untested
    assert all(item["coverage_95"] is None for item in by_horizon if item["h"] in untested)


def test_train_refuses_to_ship_a_placeholder_and_writes_nothing(shipped_with_untested_horizons, tmp_path):
    """Four coins of three years leave the final 1m fit under MIN_PAIRS_PER_HORIZON one-step outcomes, so its table
    would be the unit-normal placeholder, unwidened: `candlecast train` exits naming the timeframe and the counts,
    and an out folder that already holds a 1m model is left byte for byte as it was."""
    import re
    import shutil

    from candlecast.forecast.cli import main
    from candlecast.forecast.train import MIN_PAIRS_PER_HORIZON

    out = shutil.copytree(shipped_with_untested_horizons, tmp_path / "models")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert {"1m.pkl", "1m.pkl.sig", "manifest.json"} <= set(before)
    data = daily_csvs(tmp_path / "ohlcv", coins=4, years=3)
    with pytest.raises(SystemExit) as refused:
        main(["train", "--timeframe", "1m", "--data", str(data), "--out", str(out),
              "--reports", str(tmp_path / "reports")])
    found = re.fullmatch(r"not enough data to ship a 1m model: (\d+) training and (\d+) calibration pairs with a "
                         rf"known one-step outcome, fewer than MIN_PAIRS_PER_HORIZON \({MIN_PAIRS_PER_HORIZON}\); "
                         "nothing written", str(refused.value))
    assert found and all(int(count) < MIN_PAIRS_PER_HORIZON for count in found.groups())
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert not (tmp_path / "reports").exists()


def test_the_shipping_rule_is_where_the_table_and_its_offsets_stop_being_placeholders():
    """`too_few_to_fit` holds the thresholds `empirical_quantiles` and `conformal_offsets` already have: one pair
    under MIN_PAIRS_PER_HORIZON one-step outcomes and the table is the unit normal, or no horizon is widened; at
    the minimum both are estimated. The offsets' pairs are the plan's: the history, or the calibration block."""
    from dataclasses import replace

    from candlecast.forecast import train as training
    from candlecast.forecast.model import HORIZONS
    from tests.test_forecast_leakage import all_time_walks

    origins, _ = all_time_walks("1m")
    known = origins.take(np.flatnonzero(np.isfinite(origins.log_return[:, 0])))
    minimum = training.MIN_PAIRS_PER_HORIZON
    train, cal = known.take(slice(0, minimum)), known.take(slice(minimum, 2 * minimum))
    history = training.PLANS["1m"]
    block = replace(history, calibrate_on_history=False)
    unit_normal = training.empirical_quantiles(np.zeros((0, len(HORIZONS))))
    assert training.too_few_to_fit(train, cal, block) is None
    assert not np.array_equal(training.empirical_quantiles(train.z), unit_normal)
    assert training.too_few_to_fit(train.take(slice(1, None)), cal, block).startswith(f"{minimum - 1} training")
    assert np.array_equal(training.empirical_quantiles(train.take(slice(1, None)).z), unit_normal)
    short = cal.take(slice(1, None))
    assert f"and {minimum - 1} calibration pairs" in training.too_few_to_fit(train, short, block)
    table = np.broadcast_to(unit_normal, (len(short), *unit_normal.shape))
    assert not training.conformal_offsets(table, short.z).any()  # no horizon widened
    assert training.conformal_offsets(np.broadcast_to(unit_normal, (len(cal), *unit_normal.shape)), cal.z).any()
    assert training.too_few_to_fit(train, short, history) is None  # the history calibrates: 199 pairs
