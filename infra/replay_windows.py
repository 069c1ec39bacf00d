"""`python -m infra.replay_windows [--timeframe 1h]`: is a track record's 80 % coverage off, or is it one window?

Offline (the committed model and candles; no stack), in two parts:

1. The seed's default track record of `data/` recomputed from the model's own `predict` and the stored candles,
   once from the sample's history and once from the full history in ../shared, by series. It must equal what
   `GET /models/{tf}` serves for those origins: the scoring adds nothing of its own.
2. 80 % coverage over every window of origins shaped like the seed's (the last TRACK_RECORD_ORIGINS origins,
   TRACK_RECORD_STRIDE bars apart, of every coin at once) in the data's last year: the spread a single window
   shows. Coins move together, so one window holds few independent outcomes.

Prints figures; asserts nothing. Reads ../shared (the second part and the full-history column).
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from candlecast.config import LOCAL_MODEL_SIGNING_KEY
from candlecast.forecast.backtest import load_signed_model
from candlecast.forecast.dataset import load_timeframe, read_ohlcv
from candlecast.forecast.evaluate import build_origins, model_outputs
from candlecast.seed import TRACK_RECORD_ORIGINS, TRACK_RECORD_STRIDE, past_origins
from candlecast.timeframes import nominal_seconds
from infra.local_stack import ROOT, SHARED_OHLCV


def inside(model, history, candles, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(inside 80 %, inside 95 %) of the stored steps of the forecast made from `history` at candle `index`."""
    forecast = model.predict(history)
    n = min(30, len(candles.open_time) - 1 - index)
    realised = candles.close[index + 1 : index + 1 + n]
    return ((forecast.lower_80[:n] <= realised) & (realised <= forecast.upper_80[:n]),
            (forecast.lower_95[:n] <= realised) & (realised <= forecast.upper_95[:n]))


def seed_replay(model, timeframe: str, shared: dict) -> None:
    sample, full, by_series = [[], []], [[], []], {}
    for path in sorted((ROOT / "data").glob(f"*/{timeframe}.parquet")):
        candles = read_ohlcv(path)
        for index in past_origins(candles.open_time, min_history=max(2, model.config.min_history)):
            in80, in95 = inside(model, candles.head(index + 1), candles, index)
            sample[0] += list(in80)
            sample[1] += list(in95)
            by_series.setdefault(path.parent.name, []).extend(in80)
            longer = shared.get(path.parent.name)
            if longer is not None:
                cut = int(np.searchsorted(longer.open_time, candles.open_time[index], side="right"))
                in80, in95 = inside(model, longer.head(cut), candles, index)
                full[0] += list(in80)
                full[1] += list(in95)
    print(f"1. the seed's last {TRACK_RECORD_ORIGINS} origins of each data/ series, {TRACK_RECORD_STRIDE} bars apart:")
    print(f"   sample history: {len(sample[0]):,} steps, "
          f"cov80 {np.mean(sample[0]):.3f}, cov95 {np.mean(sample[1]):.3f}")
    if full[0]:
        print(f"   full history:   {len(full[0]):,} steps, cov80 {np.mean(full[0]):.3f}, cov95 {np.mean(full[1]):.3f}")
    spread = sorted((float(np.mean(v)), name) for name, v in by_series.items())
    print(f"   by series: lowest {spread[0][1]} {spread[0][0]:.3f}, highest {spread[-1][1]} {spread[-1][0]:.3f}")


def windows(model, timeframe: str, loaded: list) -> None:
    origins = build_origins(loaded, model.config)
    bar = nominal_seconds(timeframe)
    end = origins.time.max()
    origins = origins.take((origins.time > end - 365 * 86400) & ((origins.time // bar) % TRACK_RECORD_STRIDE == 0))
    q, _, _ = model_outputs(model, origins)
    log_q = origins.scale[..., None] * q
    outcome = origins.log_return
    known = np.isfinite(outcome)
    in80 = (log_q[..., 1] <= outcome) & (outcome <= log_q[..., 5])
    in95 = (log_q[..., 0] <= outcome) & (outcome <= log_q[..., 6])
    span = TRACK_RECORD_ORIGINS * TRACK_RECORD_STRIDE
    window = (end - origins.time) // (span * bar)
    cov = np.array([in80[(window == w)[:, None] & known].mean() for w in np.unique(window)])
    print(f"2. the last year, every {TRACK_RECORD_STRIDE}th bar, {len(loaded)} series: {known.sum():,} steps, "
          f"cov80 {in80[known].mean():.3f}, cov95 {in95[known].mean():.3f}")
    print(f"   {len(cov)} windows of {span} bars (all series at once): cov80 median {np.median(cov):.3f}, "
          f"p10 {np.percentile(cov, 10):.3f}, p90 {np.percentile(cov, 90):.3f}, min {cov.min():.3f}, "
          f"max {cov.max():.3f}; the last window {cov[0]:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeframe", default="1h")
    parser.add_argument("--data", type=Path, default=SHARED_OHLCV,
                        help=f"the full OHLCV files (default {SHARED_OHLCV})")
    args = parser.parse_args(argv)
    key = (os.environ.get("MODEL_SIGNING_KEY") or LOCAL_MODEL_SIGNING_KEY).encode()
    model = load_signed_model(ROOT / "models" / f"{args.timeframe}.pkl", key)
    loaded = load_timeframe(args.data, args.timeframe, clean=True) if args.data.is_dir() else []
    print(f"{args.timeframe}: {model.name} {model.version}; in-sample wherever the data lie before its train_end")
    seed_replay(model, args.timeframe, {series.pair: candles for series, candles in loaded})
    if loaded:
        windows(model, args.timeframe, loaded)
    else:
        print(f"2. skipped: no {args.data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
