"""`candlecast backtest`: a fixed (shipped or given) model evaluated at rolling origins of every file in a folder."""

from pathlib import Path

import numpy as np

from candlecast.errors import UnusableInput
from candlecast.forecast.dataset import OHLCVError, load_timeframe, series_names, unused_files
from candlecast.forecast.evaluate import (
    build_origins,
    evaluate_model,
    model_outputs,
    scored_positions,
    thinned_evenly,
)
from candlecast.forecast.model import ForecastModel, raw_confidence
from candlecast.timeframes import Timeframe

MAX_ORIGINS = 20_000  # origins are thinned evenly beyond this


def load_signed_model(path: Path, key: bytes) -> ForecastModel:
    """The model in `path`, verified against its `.sig` sidecar before it is unpickled."""
    from candlecast.forecast import artifact

    data = Path(path).read_bytes()
    signature_path = Path(f"{path}.sig")
    signature = signature_path.read_text().strip() if signature_path.exists() else None
    return artifact.verify_and_load(data, signature, key)


def backtest(model: ForecastModel, data_dir: Path, timeframe: Timeframe, progress: bool = False,
             peers: bool = True) -> dict:
    """forecasting.md metrics of `model` on every series of `timeframe` in `data_dir` (CSV or Parquet); with
    `peers`, also the model's own baseline and every peer of `peers.PEERS` on the same origins."""
    if model.timeframe != timeframe:
        raise UnusableInput(f"the model is for {model.timeframe}, not {timeframe}")
    loaded = load_timeframe(Path(data_dir), timeframe, clean=True, progress=progress)
    if not loaded:
        raise OHLCVError(f"{data_dir}: no OHLCV files that give {timeframe}")
    # Thinned before features and GARCH states are computed: at 1h every origin would be a million GARCH fits.
    scorable = scored_positions(loaded, model.config)
    with_outcome = {index for index, positions in enumerate(scorable) if len(positions)}
    if not with_outcome:
        raise OHLCVError(f"{data_dir}: the {timeframe} series are too short for a backtest")
    origins = build_origins(loaded, model.config, progress, thinned_evenly(scorable, MAX_ORIGINS))
    unscored = unscored_files(Path(data_dir), timeframe, loaded, with_outcome, set(np.unique(origins.series).tolist()),
                              model.config.min_history)
    result = evaluate_model(model, origins)
    if peers:
        from candlecast.forecast.peers import compare_with_peers

        q, base_q, confidence = model_outputs(model, origins)
        candidates = {"candlecast": (origins.scale[..., None] * q, confidence)}
        if model.method != "baseline":  # the file's own baseline; its confidence map is not stored: raw confidence
            base_log_q = origins.scale[..., None] * base_q
            candidates["baseline"] = (base_log_q, raw_confidence(base_log_q, np.ones(q.shape[:-1]),
                                                                 model.config.tolerance))
        result["comparison"] = compare_with_peers(loaded, origins, timeframe, candidates, "candlecast",
                                                  model.config.tolerance, progress)
    names = series_names([series for series, _ in loaded])
    return {
        "model": model.name,
        "version": model.version,
        "kind": model.kind,
        "method": model.method,
        "timeframe": timeframe,
        "symbols": sorted(names[int(index)] for index in np.unique(origins.series)),
        "unscored_files": unscored,
        "pinball_reference": "the model file's baseline (random walk, EWMA σ·√h, empirical quantiles)",
        **result,
    }


def unscored_files(data_dir: Path, timeframe: Timeframe, loaded: list, with_outcome: set, scored: set,
                   min_history: int) -> list[dict]:
    """`dataset.unused_files`, and the series the thinning to MAX_ORIGINS passed over (not in `scored`)."""
    found = unused_files(data_dir, timeframe, loaded, with_outcome, min_history)
    for index, (series, _) in enumerate(loaded):
        if index in with_outcome and index not in scored:
            found.append({"file": str(series.path), "reason": f"its origins fell between the {MAX_ORIGINS:,} "
                          "kept (every origin of every series, thinned evenly)"})
    return found
