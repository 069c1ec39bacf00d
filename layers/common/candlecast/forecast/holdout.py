"""The shipped model file on the holdout: origins after the manifest's `train_end`, whose candles no part of
training (walk-forward, the choice of kind, the final fit, its calibration) read, scored against the peers on the
same origins (offline: the peers need `arch`)."""

from datetime import datetime
from pathlib import Path

import numpy as np

from candlecast.forecast.evaluate import build_origins, model_outputs
from candlecast.forecast.model import ForecastModel, raw_confidence
from candlecast.timeframes import Timeframe

HOLDOUT_KEYS = ("pin5", "coverage_80", "coverage_95", "width_80", "width_95", "n_origins", "n_pairs")


def holdout_origins(origins, train_end: float):
    """The origins after `train_end` (epoch seconds) with at least one known outcome."""
    return origins.take((origins.time > train_end) & np.isfinite(origins.log_return).any(axis=1))


def holdout_comparison(model: ForecastModel, loaded: list, train_end: str, timeframe: Timeframe,
                       progress: bool = False) -> dict:
    """pin5 and coverage of `model` (the shipped file) and of every peer and the file's own baseline on the holdout
    origins of `loaded` (every candle, the holdout included), with Δ of each against the model: the batch t
    interval and the block bootstrap's, as in the walk-forward, or their reasons for none (the holdout is one
    regime: 90 days at 1d, a few weeks at 1h and 4h)."""
    from candlecast.forecast.peers import compare_with_peers

    end = datetime.fromisoformat(train_end.replace("Z", "+00:00")).timestamp()
    origins = holdout_origins(build_origins(loaded, model.config, progress), end)
    if len(origins) == 0:
        return {"after": train_end, "n_origins": 0, "note": "no holdout origin with a known outcome"}
    q, base_q, confidence = model_outputs(model, origins)
    candidates = {model.method: (origins.scale[..., None] * q, confidence)}
    if model.method != "baseline":
        base_log_q = origins.scale[..., None] * base_q
        candidates["baseline"] = (base_log_q, raw_confidence(base_log_q, np.ones(q.shape[:-1]),
                                                             model.config.tolerance))
    comparison = compare_with_peers(loaded, origins, timeframe, candidates, model.method, model.config.tolerance,
                                    progress)
    reference = "vs_" + model.method
    methods = {}
    for name, scores in comparison["methods"].items():
        methods[name] = {key: scores[key] for key in HOLDOUT_KEYS}
        if reference in scores:
            methods[name][reference] = scores[reference]
    return {"after": train_end, "reference": model.method, "n_origins": len(origins),
            "n_pairs": int(np.isfinite(origins.log_return).sum()), "n_series": comparison["n_series"],
            "first_origin": _iso(float(origins.time.min())), "last_origin": _iso(float(origins.time.max())),
            "batch_bars": comparison["batch_bars"], "methods": methods}


def _iso(seconds: float) -> str:
    from datetime import UTC

    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def shipped_holdout(timeframe: Timeframe, data_dir: Path, models_dir: Path, entry: dict, key: bytes,
                    progress: bool = False) -> dict:
    """`holdout_comparison` of the manifest `entry`'s model file, checked against its signature and the
    manifest's sha256 first (the figures must be the shipped file's)."""
    from candlecast.forecast import artifact
    from candlecast.forecast.backtest import load_signed_model
    from candlecast.forecast.dataset import load_timeframe

    path = Path(models_dir) / entry["file"]
    if artifact.sha256_hex(path.read_bytes()) != entry["sha256"]:
        raise SystemExit(f"{path} is not the manifest's file (sha256 differs); nothing scored")
    model = load_signed_model(path, key)
    loaded = load_timeframe(Path(data_dir), timeframe, clean=True, progress=progress)
    return holdout_comparison(model, loaded, entry["train_end"], timeframe, progress)
