"""`python -m infra.history_check --timeframe 1d`: do forecasts from a short history hold up?

A caller's data may start anywhere: a coin listed last month, or a mature coin whose download starts this year.
Offline check (nothing ships), on the timeframe's walk-forward as `candlecast train` runs it:
- By age: the held-out test origins grouped by the bars since their series' first candle (for these files,
  mostly the coin's listing on the exchange), coverage and pin5 per candidate.
- Mid-life starts: every series gets copies that start `span` bars (default the model's lookback), 2·span, ...
  after its first candle and hold span + 30 bars, so every origin of a copy has less history than the model reads.
  Copies are only tested (`walk_forward`'s `test_only`), in the pass that holds their coin out, by the same fold
  models as the originals; each copy origin is paired with its series' origin at the same time: same coin, times
  and models, only the history differs.
Prints two tables. Asserts nothing. Reads ../shared.
"""

import argparse
import dataclasses

import numpy as np

from candlecast.forecast import train
from candlecast.forecast.evaluate import build_origins, method_scores
from candlecast.forecast.features import CONFIGS
from candlecast.timeframes import nominal_seconds
from infra.local_stack import SHARED_OHLCV

AGE_EDGES_DAYS = (0, 30, 90, 180, 365, 730)


def late_starts(loaded: list, span: int) -> tuple[list, np.ndarray]:
    """(copies of every series starting span, 2·span, ... bars in and holding span + 30 bars, index of each copy's
    series in `loaded`)."""
    copies, parents = [], []
    for index, (series, candles) in enumerate(loaded):
        for count, start in enumerate(range(span, len(candles) - span - 30 + 1, span), start=1):
            part = type(candles)(*(getattr(candles, name)[start : start + span + 30]
                                   for name in candles.__dataclass_fields__))
            copies.append((dataclasses.replace(series, pair=f"{series.pair}~{count}"), part))
            parents.append(index)
    return copies, np.array(parents, dtype=int)


def scores(test, output: tuple, rows: np.ndarray, tolerance: float) -> str:
    """pin5, cov80 and cov95 of a candidate's walk-forward `output` (z-quantiles, baseline's, confidence) over every
    known (origin, h) of `rows`."""
    q, _, confidence = output
    scored = method_scores(test.log_return[rows], test.scale[rows][..., None] * q[rows], confidence[rows], tolerance,
                           test.time[rows])
    return f"{scored['pin5']:.4f} | {scored['coverage_80']:.3f} | {scored['coverage_95']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeframe", default="1d", choices=sorted(CONFIGS))
    parser.add_argument("--span", type=int, help="bars of history of the late starts (default: the lookback)")
    parser.add_argument("--data", default=str(SHARED_OHLCV))
    args = parser.parse_args()
    timeframe, plan, config = args.timeframe, train.PLANS[args.timeframe], CONFIGS[args.timeframe]
    span = args.span or config.lookback
    loaded, _ = train.load_before_holdout(args.data, timeframe)
    copies, parents = late_starts(loaded, span)
    everything = loaded + copies
    origins = build_origins(everything, config, progress=True)
    copied = origins.series >= len(loaded)
    wick = train.walk_forward_wick(loaded, timeframe)
    groups = train.coin_groups(everything, plan.coin_groups)
    result = train.walk_forward(timeframe, origins, [group[origins.series] for group in groups], wick, None,
                                np.random.default_rng(7), True, None, train.series_coins(everything),
                                test_only=copied)
    test = result.test
    late = test.series >= len(loaded)
    first = np.array([candles.open_time[0] for _, candles in loaded])
    age_days = (test.time[~late] - first[test.series[~late]]) / 86400
    original = np.flatnonzero(~late)
    print(f"{timeframe}: {len(original):,} test origins of {len(loaded)} series; by days since the series' first "
          "candle")
    print("| candidate | age (days) | origins | pin5 | cov80 | cov95 |\n|---|---|---|---|---|---|")
    for kind, output in result.outputs.items():
        for low, high in zip(AGE_EDGES_DAYS, (*AGE_EDGES_DAYS[1:], np.inf), strict=True):
            rows = original[(age_days >= low) & (age_days < high)]
            if len(rows):
                print(f"| {kind} | {low}–{high:g} | {len(rows):,} | {scores(test, output, rows, config.tolerance)} |")

    position = {(int(s), int(t)): i for i, s, t in zip(original, test.series[original], test.time[original],
                                                      strict=True)}
    late_rows = np.flatnonzero(late)
    partner = np.array([position.get((int(parents[test.series[i] - len(loaded)]), int(test.time[i])), -1)
                        for i in late_rows], dtype=int)
    late_rows, partner = late_rows[partner >= 0], partner[partner >= 0]
    days = span * nominal_seconds(timeframe) / 86400
    print(f"\n{timeframe}: {len(copies)} late starts ({span} bars, {days:.0f} days, of history at most), "
          f"{len(late_rows):,} test origins paired with their series' at the same time")
    print("| candidate | history | pin5 | cov80 | cov95 |\n|---|---|---|---|---|")
    for kind, output in result.outputs.items():
        print(f"| {kind} | late start | {scores(test, output, late_rows, config.tolerance)} |")
        print(f"| {kind} | whole series | {scores(test, output, partner, config.tolerance)} |")


if __name__ == "__main__":
    main()
