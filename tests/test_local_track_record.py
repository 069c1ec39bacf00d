"""README's figures of the local stack's track record ("Live track record", "On the local stack") are what a fresh
`make run` serves: `python -m infra.local_track_record --readme README.md` writes them, these tests keep them so."""

from types import SimpleNamespace

import pytest

from infra.local_track_record import README_BEGIN, README_END, Served, block, main, readme_with_track_record, served
from tests.conftest import ROOT


@pytest.mark.integration
@pytest.mark.s3
@pytest.mark.slow
def test_the_readme_block_is_what_the_seeded_local_stack_serves(seeded_track_record):
    """Seeded as `make run` seeds (the fixture takes about 12 s), read as GET /models, /models/1h and /health serve."""
    readme = (ROOT / "README.md").read_text()
    figures = served(seeded_track_record)
    assert figures.table_model["live"]["n_scored"] > 0  # the block is built from a real track record
    assert readme_with_track_record(readme, figures) == readme, (
        "README's local track record differs from what the seeded stack serves (models retrained?): run "
        "`python -m infra.local_track_record --readme README.md`")


def _live(coverage: float | None, n: int, start: str | None = "2021-01-01T00:00:00Z",
          end: str | None = "2021-02-01T00:00:00Z") -> dict:
    scored = n > 0  # the service's ratios are null over no step
    return {"n_scored": n, "period_start": start, "period_end": end, "coverage_80": coverage,
            "coverage_95": 0.95 if scored else None, "ece": 0.01 if scored else None,
            "pinball_skill": -0.0123 if scored else None}


def _record(timeframe: str, live: dict, replay: dict | None = None) -> dict:
    return {"timeframe": timeframe, "live": live, "replay": replay,
            "model": {"accuracy": live["coverage_80"], "train_end": "2020-12-31T00:00:00Z"},
            "backtest": {"coverage_80": 0.8, "coverage_95": 0.95, "ece": 0.005, "pinball_skill": 0.01,
                         "n_pairs": 1000, "n_origins": 40}}


def _plan(timeframe: str, mode: str, series: int = 2, each: int = 3):
    return SimpleNamespace(timeframe=timeframe, mode=mode,
                           origins=[(f"T{s}", None, i) for s in range(series) for i in range(each)])


def test_the_block_says_what_is_not_live_and_when_health_reports_no_drift():
    hourly = _record("1h", _live(None, 0, None, None), replay=_live(0.7, 120))
    weekly = _record("1w", _live(0.6, 499))
    seed = SimpleNamespace(past_predictions=9, scored_steps=140, plans=[_plan("1w", "live"), _plan("1h", "replay")])
    text = block(Served(seed=seed, models=[hourly, weekly], table_model=hourly, health={"drift": {}}))
    assert "prints `NO LIVE FIGURES` (a replay) for 1h; `live` for 1w (9 predictions, 140 steps scored)" in text
    assert "| `replay` (2 series, 6 origins, up to `train_end` 2020-12-31) | **120** |" in text
    assert "| `live` | **0** | — → — | — | — | — | — |" in text and "`models.accuracy` is null" in text
    assert "`replay` holds 120 steps seeded inside the training window, never counted as live." in text
    assert "1w 0.600 (499 steps), against a backtest of 0.800; `GET /health` reports no `drift`." in " ".join(
        text.split())
    assert ("1w's 0.600 lies outside [0.72, 0.88], but without the evidence `drift` needs (5 blocks of outcome "
            "days, each at least 7 days and 30 candles; 3 standard errors from 0.80)." in " ".join(text.split()))


def test_the_block_names_each_drift_with_its_direction_and_period():
    hourly = _record("1h", _live(0.8, 900))
    daily = _record("1d", _live(0.95, 800, "2021-08-21T00:00:00Z", "2021-11-17T00:00:00Z"))
    monthly = _record("1m", _live(0.6, 700))
    seed = SimpleNamespace(past_predictions=1, scored_steps=2, plans=[_plan(tf, "live") for tf in ("1h", "4h", "1d",
                                                                                                    "1w", "1m")])
    health = {"drift": {"1d": {"live_coverage_80": 0.95, "matured_steps": 800, "standard_error": 0.02},
                        "1m": {"live_coverage_80": 0.6, "matured_steps": 700, "standard_error": 0.03}}}
    text = " ".join(block(Served(seed=seed, models=[hourly, daily, monthly], table_model=hourly,
                                 health=health)).split())
    assert "prints `live` for every timeframe" in text
    assert ("`GET /health` reports `drift` for 1d (bands too wide over 2021-08-21 → 2021-11-17) and 1m (bands too "
            "narrow over 2021-01-01 → 2021-02-01).") in text
    assert "1d 0.950 (800 steps), 1m 0.600 (700), against backtests of 0.800 and 0.800;" in text
    assert "without the evidence" not in text


def test_the_command_stops_before_any_stack_when_the_readme_has_no_block(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nno end marker\n")
    assert main(["--readme", str(readme)]) == 1
    assert f"README has no {README_BEGIN} ... {README_END} block" in capsys.readouterr().err
    assert main(["--readme", str(tmp_path / "missing.md")]) == 1
