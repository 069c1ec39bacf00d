"""Is the scorecard's GARCH-t as strong as a GARCH-t gets here? The peers of a saved walk-forward (`train
--save-walk-forward`) again on its test origins with other settings: GARCH-t on half and twice its window, on
every return before the origin, and refitted three times as often; the Gaussian random walk on 60 and 120 bars.
Each is scored beside the shipped kind (Δ with the scorecard's batch-t interval) and beside the stored peer, so a
stronger setting than the scorecard's shows, with how much of the shipped model's lead it takes.

    PYTHONPATH=layers/common:. python -m infra.peer_strength --timeframe 1d --walk-forward wf.npz [--data DIR]
"""

import argparse
from dataclasses import replace

import numpy as np
from tqdm import tqdm

from candlecast.forecast import train as T
from candlecast.forecast.comparison import compare_methods
from candlecast.forecast.features import CONFIGS, QUANTILES
from candlecast.forecast.model import HORIZONS, raw_confidence
from candlecast.forecast.peers import GARCH_PLANS, RW_WINDOW, garch_t, gaussian_rw, series_origins
from candlecast.timeframes import nominal_seconds
from infra.local_stack import SHARED_OHLCV

EVERY_RETURN = 10**9  # a window longer than any series: every return before the origin


def variants(timeframe: str) -> dict:
    """name -> (peer, its setting): the GARCH-t and Gaussian random-walk settings scored beside the stored peers."""
    plan = GARCH_PLANS[timeframe]
    settings = {
        f"garch-t window {plan.window // 2}": ("garch-t", replace(plan, window=plan.window // 2)),
        f"garch-t window {plan.window * 2}": ("garch-t", replace(plan, window=plan.window * 2)),
        "garch-t every return": ("garch-t", replace(plan, window=EVERY_RETURN)),
        f"gaussian-rw {RW_WINDOW * 2}": ("gaussian-rw", RW_WINDOW * 2),
        f"gaussian-rw {RW_WINDOW * 4}": ("gaussian-rw", RW_WINDOW * 4),
    }
    if plan.refit_every > 1:
        often = max(1, plan.refit_every // 3)
        settings[f"garch-t refit every {often}"] = ("garch-t", replace(plan, refit_every=often))
    return settings


def variant_quantiles(loaded: list, series: np.ndarray, times: np.ndarray, peer: str, setting) -> np.ndarray:
    """(n, 30, 7) log-return quantiles of one peer setting at the origins."""
    out = np.full((len(times), len(HORIZONS), len(QUANTILES)), np.nan)
    for candles, rows, positions in series_origins(loaded, series, times):
        out[rows] = (garch_t(candles.close, positions, setting) if peer == "garch-t"
                     else gaussian_rw(candles.close, positions, setting))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeframe", required=True, choices=list(T.PLANS))
    parser.add_argument("--walk-forward", required=True, help="a `train --save-walk-forward` file of this timeframe")
    parser.add_argument("--data", default=str(SHARED_OHLCV))
    args = parser.parse_args()
    tf = args.timeframe
    about, log_return, times, series, methods = T.load_walk_forward(args.walk_forward)
    loaded = T.load_before_holdout(args.data, tf)[0]
    if about["timeframe"] != tf or about.get("candles") != T.candles_fingerprint(loaded):
        raise SystemExit(f"{args.walk_forward}: not a {tf} walk-forward on the candles {args.data} gives")
    kind, tolerance = about["kind"], CONFIGS[tf].tolerance
    scored = {kind: methods[kind], "garch-t": methods["garch-t"], "gaussian-rw": methods["gaussian-rw"]}
    for name, (peer, setting) in tqdm(variants(tf).items(), desc=f"{tf} peer settings", unit="setting"):
        q = variant_quantiles(loaded, series, times, peer, setting)
        scored[name] = (q, raw_confidence(q, np.ones(q.shape[:-1]), tolerance))
    result = compare_methods(log_return, times, scored, tolerance, nominal_seconds(tf), kind, chance_reps=1)
    rows = result["methods"]
    print(f"{tf}: {len(times):,} test origins; the shipped kind {kind} against each peer setting (Δ = the peer's "
          f"pin5 / {kind}'s − 1, batch t over {result['batch_bars']}-bar calendar batches)")
    print(f"  {'method':28s} {'pin5':>8s} {'cov80':>6s} {'cov95':>6s}  {'Δ vs ' + kind:>28s}  vs scorecard's peer")
    for name, row in rows.items():
        delta = row.get("vs_" + kind)
        shown = "" if delta is None else f"{delta['delta']:+.2%} " + (
            "[no interval]" if delta["ci95"] is None else f"[{delta['ci95'][0]:+.2%}, {delta['ci95'][1]:+.2%}]")
        stored = "gaussian-rw" if name.startswith("gaussian-rw") else "garch-t"
        against = "" if name in (kind, stored) else f"{rows[stored]['pin5'] / row['pin5'] - 1:+.2%}"
        print(f"  {name:28s} {row['pin5']:8.4f} {row['coverage_80']:6.3f} {row['coverage_95']:6.3f}  {shown:>28s}  "
              f"{against}")
    strongest = min((name for name in rows if name != kind), key=lambda name: rows[name]["pin5"])
    print(f"{tf}: the strongest peer setting is {strongest} (pin5 {rows[strongest]['pin5']:.4f})")


if __name__ == "__main__":
    main()
