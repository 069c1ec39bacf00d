"""Inference benchmark of the shipped models (30-step forecast alone), for `make bench`."""

import statistics
import time
from pathlib import Path

import numpy as np

from candlecast.candles import Candles
from candlecast.timeframes import TIMEFRAMES

MODELS_DIR = Path(__file__).resolve().parents[4] / "models"


def synthetic_candles(count: int, seed: int = 1) -> Candles:
    rng = np.random.default_rng(seed)
    close = 30000 * np.exp(np.cumsum(rng.normal(0, 0.01, count)))
    open_ = np.concatenate([[close[0]], close[:-1]])
    spread = np.exp(np.abs(rng.normal(0, 0.004, count)))
    return Candles(
        open_time=3600 * np.arange(count, dtype=np.int64) + 1_600_000_000 // 3600 * 3600,
        open=open_, high=np.maximum(open_, close) * spread, low=np.minimum(open_, close) / spread,
        close=close, volume=rng.lognormal(3, 1, count),
    )


def bench_forecast(models_dir: Path = MODELS_DIR, runs: int = 500, key: bytes | None = None) -> dict[str, str]:
    """Flat {figure name: "x.xxx ms"}: median and p95 of `ForecastModel.predict` (30 steps) per timeframe,
    and the one-off verify-and-load time of each signed model file (`key`: by default the committed models')."""
    from candlecast.config import LOCAL_MODEL_SIGNING_KEY
    from candlecast.forecast.backtest import load_signed_model

    candles = synthetic_candles(400)
    figures = {}
    key = key or LOCAL_MODEL_SIGNING_KEY.encode()
    for timeframe in TIMEFRAMES:
        path = Path(models_dir) / f"{timeframe}.pkl"
        if not path.exists():
            continue
        started = time.perf_counter()
        model = load_signed_model(path, key)
        load_ms = (time.perf_counter() - started) * 1000
        tail = candles.tail(model.lookback)
        model.predict(tail)  # warm-up
        timings = []
        for _ in range(runs):
            started = time.perf_counter()
            model.predict(tail)
            timings.append((time.perf_counter() - started) * 1000)
        timings.sort()
        label = f"{timeframe} {model.method}"
        figures[f"30-step inference p50, {label}"] = f"{statistics.median(timings):.3f} ms"
        figures[f"30-step inference p95, {label}"] = f"{timings[int(0.95 * len(timings)) - 1]:.3f} ms"
        figures[f"model verify + load (first), {label}"] = f"{load_ms:.1f} ms"
    return figures


if __name__ == "__main__":
    import json

    print(json.dumps(bench_forecast(), indent=2))
