"""`python -m infra.online_conformal --timeframe 1d --method baseline`: would online conformal help?

Offline prototype (nothing ships): the timeframe's walk-forward (`train.walk_forward`, as `candlecast train` runs
it) gives each candidate's z-quantiles at the held-out test origins. On top of one method's, per horizon h and
interval i, an offset δ[h, i] widens (δ > 0) or narrows the interval (`model.widen`), and is updated by online
quantile tracking (Angelopoulos, Candès & Tibshirani 2023): for every (origin, h) outcome, as soon as it is known
(its candle opened at or before the origin being forecast, so nothing later is read),
    δ[h, i] += η · (1{outcome outside interval i} − α_i),
pooled over every coin. η = 0 is the walk-forward as scored. Prints, per η, coverage overall and its range over
horizons, and pin5 (the project's metric code). Asserts nothing. Reads ../shared.
"""

import argparse

import numpy as np

from candlecast.forecast import train
from candlecast.forecast.evaluate import build_origins, measured_range, metrics, pin5_loss
from candlecast.forecast.features import CONFIGS, INTERVAL_ALPHAS, INTERVALS
from candlecast.forecast.model import HORIZONS, widen
from infra.local_stack import SHARED_OHLCV

STEPS = (0.0, 0.005, 0.02)  # η in z units per outcome, fixed beforehand (not searched)


def tracked(test, q: np.ndarray, step: float) -> np.ndarray:
    """`q` (n, 30, 7) widened at each origin by the offsets that the outcomes known there give."""
    alphas = np.asarray(INTERVAL_ALPHAS)
    origin, horizon = np.nonzero(np.isfinite(test.z))
    known_at = test.label_time[origin, horizon]
    order = np.argsort(known_at, kind="stable")
    origin, horizon, known_at = origin[order], horizon[order], known_at[order]
    delta = np.zeros((len(HORIZONS), len(INTERVALS)))
    out, seen = q.copy(), 0
    for time in np.unique(test.time):
        while seen < len(known_at) and known_at[seen] <= time:
            o, h = origin[seen], horizon[seen]
            z = test.z[o, h]
            for i, (lower, upper) in enumerate(INTERVALS):
                delta[h, i] += step * (float(z < out[o, h, lower] or z > out[o, h, upper]) - alphas[i])
            seen += 1
        rows = np.flatnonzero(test.time == time)
        out[rows] = widen(q[rows], delta)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeframe", default="1d", choices=sorted(CONFIGS))
    parser.add_argument("--method", default="baseline", help="candidate of the walk-forward (baseline, learned, "
                        "garch-scale, combined)")
    parser.add_argument("--data", default=str(SHARED_OHLCV))
    args = parser.parse_args()
    timeframe, plan, config = args.timeframe, train.PLANS[args.timeframe], CONFIGS[args.timeframe]
    loaded, _ = train.load_before_holdout(args.data, timeframe)
    origins = build_origins(loaded, config)
    wick = train.walk_forward_wick(loaded, timeframe)
    groups = train.coin_groups(loaded, plan.coin_groups)
    result = train.walk_forward(timeframe, origins, [group[origins.series] for group in groups], wick, None,
                                np.random.default_rng(7), False, None)
    test = result.test
    q, base_q, confidence = result.outputs[args.method]
    print(f"{timeframe} {args.method}: {len(test):,} test origins")
    print("| η | cov80 (range over h) | cov95 (range over h) | pin5 |\n|---|---|---|---|")
    for step in STEPS:
        out = tracked(test, q, step)
        scores = metrics(test, out, base_q, confidence, config.tolerance)
        (low80, high80), (low95, high95) = (measured_range([item[key] for item in scores["per_horizon"]])
                                            for key in ("coverage_80", "coverage_95"))
        pin5 = float(np.nanmean(pin5_loss(test.log_return, out * test.scale[..., None])))
        print(f"| {step} | {scores['coverage_80']:.3f} ({low80:.3f}–{high80:.3f}) | "
              f"{scores['coverage_95']:.3f} ({low95:.3f}–{high95:.3f}) | {pin5:.4f} |")


if __name__ == "__main__":
    main()
