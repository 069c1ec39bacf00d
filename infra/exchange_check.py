"""`python -m infra.exchange_check --timeframe 1d`: do forecasts hold up on an exchange training never saw?

The shipped models will meet coins from other exchanges, whose candles differ (an exchange's own trades, or an
aggregate over many; base or quote volume; their own gaps and wicks). The walk-forward holds out coins, but the
other coins of a held-out coin's exchange stay in training. Offline check (nothing ships): per exchange E (from
`ohlcv_provenance.json`), the walk-forward as `candlecast train` runs it, with E's series only tested
(`walk_forward`'s `test_only`), so every fold model that tests them was fitted and calibrated on other exchanges
alone. When E's series all sit in one held-out coin group, the normal walk-forward already tests them that way
and is used as it is. An exchange is skipped when the others leave fewer than `--min-series` series to train on.
Per exchange it prints `candlecast train`'s comparison table (every candidate, every peer, Δ with the batch t
interval and the bootstrap) on E's test origins, with the shipped kind from the normal walk-forward (E in
training) beside it on the same origins. Asserts nothing. Reads ../shared.
"""

import argparse
import json
import re
from pathlib import Path

import numpy as np

from candlecast.forecast import train
from candlecast.forecast.evaluate import build_origins
from candlecast.forecast.features import CONFIGS
from candlecast.forecast.peers import compare_with_peers
from candlecast.forecast.report import comparison_text, write_comparison_report
from infra.local_stack import SHARED_OHLCV


def exchanges_of(loaded: list, provenance: Path) -> np.ndarray:
    """The exchange of every series of `loaded` (the provenance's `exchange` of its file)."""
    by_file = {Path(item["file"]).name: item["exchange"] for item in json.loads(provenance.read_text())}
    missing = sorted(series.path.name for series, _ in loaded if series.path.name not in by_file)
    if missing:
        raise SystemExit(f"{provenance} names no exchange for {', '.join(missing)}")
    return np.array([by_file[series.path.name] for series, _ in loaded])


def unseen_already(members: np.ndarray, groups: list[np.ndarray]) -> bool:
    """Whether the series of `members` (a mask over series) all sit in one coin group: the pass holding it out
    then trains on no series of theirs."""
    return any(not (members & ~group).any() for group in groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeframe", default="1d", choices=sorted(CONFIGS))
    parser.add_argument("--data", default=str(SHARED_OHLCV))
    parser.add_argument("--provenance", help="default: ohlcv_provenance.json beside --data")
    parser.add_argument("--min-series", type=int, default=5, help="fewest series the other exchanges must hold")
    parser.add_argument("--reports", help="a folder for each exchange's comparison PNG")
    args = parser.parse_args()
    timeframe, plan, config = args.timeframe, train.PLANS[args.timeframe], CONFIGS[args.timeframe]
    loaded, _ = train.load_before_holdout(args.data, timeframe)
    exchange = exchanges_of(loaded, Path(args.provenance or Path(args.data).parent / "ohlcv_provenance.json"))
    origins = build_origins(loaded, config, progress=True)
    wick = train.walk_forward_wick(loaded, timeframe)
    groups = train.coin_groups(loaded, plan.coin_groups)
    held_groups = [group[origins.series] for group in groups]
    coins = train.series_coins(loaded)

    def run(test_only: np.ndarray | None) -> train.WalkForward:
        return train.walk_forward(timeframe, origins, held_groups, wick, None, np.random.default_rng(7), True, None,
                                  coins, test_only=test_only)

    seen = run(None)
    shipped, _ = train.choose(seen.results, timeframe)
    position = {(int(s), int(t)): i for i, (s, t) in enumerate(zip(seen.test.series, seen.test.time, strict=True))}
    print(f"{timeframe}: {len(loaded)} series; exchanges: "
          + ", ".join(f"{name} {count}" for name, count in zip(*np.unique(exchange, return_counts=True), strict=True)))
    for name in sorted(set(exchange)):
        members = exchange == name
        if (~members).sum() < args.min_series:
            print(f"\n{name}: skipped, the other exchanges hold {(~members).sum()} series (< {args.min_series})")
            continue
        already = unseen_already(members, groups)
        try:
            unseen = seen if already else run(members[origins.series])
        except SystemExit as error:  # no fold has training data on the other exchanges
            print(f"\n{name}: skipped, {error}")
            continue
        rows = np.flatnonzero(members[unseen.test.series])
        methods = {kind: (unseen.test.scale[rows, :, None] * q[rows], confidence[rows])
                   for kind, (q, _, confidence) in unseen.outputs.items()}
        if not already:
            partner = np.array([position[(int(s), int(t))]
                                for s, t in zip(unseen.test.series[rows], unseen.test.time[rows], strict=True)])
            q, _, confidence = seen.outputs[shipped]
            methods[f"{shipped}, {name} in training"] = (seen.test.scale[partner, :, None] * q[partner],
                                                         confidence[partner])
        comparison = compare_with_peers(loaded, unseen.test.take(rows), timeframe, methods, shipped,
                                        config.tolerance, True)
        how = ("already unseen in the normal walk-forward (its series sit in one held-out coin group)" if already
               else "trained and calibrated on the other exchanges only")
        print(f"\n## {name} ({members.sum()} series): {how}\n")
        print(comparison_text(timeframe, comparison))
        if args.reports:
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            path = write_comparison_report(Path(args.reports) / f"{timeframe}-{slug}", timeframe, comparison)
            print(f"report: {path}")


if __name__ == "__main__":
    main()
