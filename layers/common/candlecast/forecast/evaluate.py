"""Walk-forward origins and the forecast metrics of forecasting.md (training/backtest side; numpy only)."""

from dataclasses import dataclass

import numpy as np

from candlecast.candles import Candles
from candlecast.forecast.features import MEDIAN, QUANTILES, TimeframeConfig, garch_news, origin_features
from candlecast.forecast.garch import series_states
from candlecast.forecast.model import HORIZONS, ForecastModel, raw_confidence

_NO_LABEL = np.iinfo(np.int64).max
_BINS = 10


@dataclass
class Origins:
    """Forecast origins of many series: features at the origin and the 30 realised log returns (NaN if unknown)."""

    series: np.ndarray  # (n,) index into the list of series
    time: np.ndarray  # (n,) origin candle open time
    features: np.ndarray  # (n, len(ORIGIN_FEATURES))
    sigma: np.ndarray  # (n,)
    close: np.ndarray  # (n,)
    log_return: np.ndarray  # (n, 30) ln C(t+h) − ln C(t)
    label_time: np.ndarray  # (n, 30) open time of candle t+h (int64 max when absent)
    garch: np.ndarray  # (n, 3) the series' own GARCH(1,1) state at the origin (`garch.series_states`)

    def __len__(self) -> int:
        return len(self.time)

    def take(self, mask_or_index) -> "Origins":
        return Origins(*(getattr(self, name)[mask_or_index] for name in self.__dataclass_fields__))

    @property
    def z(self) -> np.ndarray:
        return self.log_return / (self.sigma[:, None] * np.sqrt(HORIZONS)[None, :])

    @property
    def scale(self) -> np.ndarray:
        return self.sigma[:, None] * np.sqrt(HORIZONS)[None, :]


def series_origins(index: int, candles: Candles, config: TimeframeConfig, positions: np.ndarray | None = None
                   ) -> Origins:
    """Every origin of one series after the σ warm-up, or those at candle indices `positions` (ascending)."""
    features, sigma = origin_features(candles, config)
    n = len(candles)
    origin = np.arange(min(config.min_history, n), n) if positions is None else np.asarray(positions, dtype=np.int64)
    target = origin[:, None] + HORIZONS[None, :]
    present = target < n
    target = np.minimum(target, n - 1)
    log_close = np.log(candles.close)
    log_return = np.where(present, log_close[target] - log_close[origin][:, None], np.nan)
    label_time = np.where(present, candles.open_time[target], _NO_LABEL)
    states = series_states(log_close, origin, config.lookback - 1, sigma[origin],
                           news=garch_news(candles, config), wide=config.garch_wide)
    return Origins(
        series=np.full(len(origin), index),
        time=candles.open_time[origin],
        features=features[origin],
        sigma=sigma[origin],
        close=candles.close[origin],
        log_return=log_return,
        label_time=label_time,
        garch=states,
    )


def build_origins(loaded: list, config: TimeframeConfig, progress: bool = False,
                  positions: list[np.ndarray] | None = None) -> Origins:
    """The origins of every series (`series_origins`), or of series i those at `positions[i]`."""
    items = enumerate(loaded)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(loaded), desc="origins (GARCH fits)", unit="series", leave=False)
    parts = [series_origins(i, candles, config, None if positions is None else positions[i])
             for i, (_, candles) in items]
    return Origins(*(np.concatenate([getattr(p, name) for p in parts]) for name in Origins.__dataclass_fields__))


def scored_positions(loaded: list, config: TimeframeConfig) -> list[np.ndarray]:
    """Per series, the candle indices of its origins after the σ warm-up that have an outcome (the next candle at
    least): the origins a backtest can score, known before any feature or GARCH state is computed."""
    return [np.arange(min(config.min_history, len(candles)), len(candles) - 1) for _, candles in loaded]


def thinned_evenly(positions: list[np.ndarray], limit: int) -> list[np.ndarray]:
    """At most `limit` of all `positions` (series by series, in order), spread evenly over them."""
    counts = np.array([len(p) for p in positions])
    if counts.sum() <= limit:
        return positions
    kept = np.linspace(0, counts.sum() - 1, limit).astype(int)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return [p[kept[(kept >= start) & (kept < start + count)] - start] for p, start, count in zip(positions, starts,
                                                                                                 counts, strict=True)]


def _pinball(log_return: np.ndarray, quantile_prices: np.ndarray) -> np.ndarray:
    """Mean pinball loss over the 7 quantiles, per (origin, h); inputs in log-price units."""
    error = log_return[..., None] - quantile_prices
    return np.mean(np.maximum(QUANTILES * error, (QUANTILES - 1) * error), axis=-1)


def calibration_error(confidence: np.ndarray, hit: np.ndarray) -> float:
    """Expected calibration error over 10 equal-width bins: Σ_b (n_b/n)·|mean confidence − observed frequency|."""
    if len(confidence) == 0:
        return float("nan")
    bins = np.minimum((confidence * _BINS).astype(int), _BINS - 1)
    gap = np.bincount(bins, confidence, _BINS) - np.bincount(bins, hit, _BINS)
    return float(np.abs(gap).sum() / len(confidence))


def reliability(confidence: np.ndarray, hit: np.ndarray) -> list[tuple[float, float, int]]:
    """(mean confidence, observed frequency, count) per confidence bin."""
    bins = np.minimum((confidence * _BINS).astype(int), _BINS - 1)
    return [
        (float(confidence[bins == b].mean()), float(hit[bins == b].mean()), int((bins == b).sum()))
        for b in range(_BINS)
        if (bins == b).any()
    ]


# No median-based metrics (rel. MAE against the random walk, directional accuracy): every candidate's median is
# the random walk, so they are 1.00 and 0.50 by construction and measure nothing.
_SUMMARY_KEYS = ("coverage_80", "coverage_95", "ece", "pinball_skill", "mean_confidence", "hit_rate")


def _summary(y, scale, q, base_q, confidence, tolerance) -> dict:
    """Metrics over flat arrays of (origin, h) pairs with known outcome (None when there are none)."""
    if len(y) == 0:
        return dict.fromkeys(_SUMMARY_KEYS) | {"n_pairs": 0}
    prices = scale[:, None] * q
    base_prices = scale[:, None] * base_q
    median = prices[:, MEDIAN]
    hit = (np.abs(np.expm1(y - median)) <= tolerance).astype(float)
    loss, base_loss = _pinball(y, prices).sum(), _pinball(y, base_prices).sum()
    return {
        "coverage_80": float(np.mean((prices[:, 1] <= y) & (y <= prices[:, 5]))),
        "coverage_95": float(np.mean((prices[:, 0] <= y) & (y <= prices[:, 6]))),
        "ece": calibration_error(confidence, hit),
        "pinball_skill": float(1 - loss / base_loss) if base_loss else 0.0,
        "mean_confidence": float(confidence.mean()),
        "hit_rate": float(hit.mean()),
        "n_pairs": len(y),
    }


def metrics(origins: Origins, q: np.ndarray, base_q: np.ndarray, confidence: np.ndarray, tolerance: float) -> dict:
    """forecasting.md metrics of z-quantiles `q` (n, 30, 7) against `base_q` at the same origins.

    Pinball skill is 1 − loss/loss(base_q); confidence ECE uses 10 equal-width bins.
    """
    y, scale = origins.log_return, origins.scale
    known = np.isfinite(y)
    per_horizon = []
    for i, h in enumerate(HORIZONS):
        rows = known[:, i]
        item = _summary(y[rows, i], scale[rows, i], q[rows, i], base_q[rows, i], confidence[rows, i], tolerance)
        per_horizon.append({"h": int(h), **item})
    overall = _summary(y[known], scale[known], q[known], base_q[known], confidence[known], tolerance)
    overall["n_origins"] = int(known.any(axis=1).sum())
    overall["per_horizon"] = per_horizon
    return overall


def measured(value: float | None) -> bool:
    """Whether a per-horizon figure was measured: at a horizon no test outcome reached it is None (`metrics`, and
    null in the manifest) or NaN (`method_scores`)."""
    return value is not None and bool(np.isfinite(value))


def measured_range(values: list) -> list[float]:
    """[lowest, highest] of the per-horizon figures `values` that were `measured`."""
    kept = [value for value in values if measured(value)]
    return [min(kept), max(kept)]


def model_outputs(model: ForecastModel, origins: Origins) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z-quantiles, baseline z-quantiles, confidence) of a model at `origins`."""
    q = model.z_quantiles(origins.features, origins.garch)
    base_q = model.baseline_z_quantiles(origins.features)
    return q, base_q, model.confidence(q, origins.sigma)


def evaluate_model(model: ForecastModel, origins: Origins) -> dict:
    q, base_q, confidence = model_outputs(model, origins)
    return metrics(origins, q, base_q, confidence, model.config.tolerance)


# -- methods side by side (the model and its peers on the same origins) -----------------------------------------
PIN5_LEVELS = (0.025, 0.1, 0.5, 0.9, 0.975)
_PIN5 = np.array([int(np.flatnonzero(np.isclose(QUANTILES, level))[0]) for level in PIN5_LEVELS])
# (name, first year, first year after); an era is reported when it holds test origins.
ERAS = (("2013-16", 2013, 2017), ("2017-18", 2017, 2019), ("2019-21", 2019, 2022), ("2022-", 2022, 10_000))
_YEAR_SECONDS = 365.2425 * 86400


def pin5_loss(log_return: np.ndarray, log_quantiles: np.ndarray) -> np.ndarray:
    """Mean pinball loss over PIN5_LEVELS in % log return, per (origin, h): NaN where the outcome is unknown."""
    error = 100 * (log_return[..., None] - log_quantiles[..., _PIN5])
    levels = np.asarray(PIN5_LEVELS)
    return np.mean(np.maximum(levels * error, (levels - 1) * error), axis=-1)


def _year(times: np.ndarray) -> np.ndarray:
    return 1970 + np.asarray(times, dtype=np.float64) / _YEAR_SECONDS


def method_scores(log_return: np.ndarray, log_quantiles: np.ndarray, confidence: np.ndarray, tolerance: float,
                  times: np.ndarray) -> dict:
    """pin5, coverage and mean log width (80/95 %) overall, per horizon and per era; confidence ECE + reliability.

    `log_return` (n, 30) realised ln C(t+h) − ln C(t) (NaN unknown); `log_quantiles` (n, 30, 7) at QUANTILES;
    `confidence` (n, 30) the per-step confidence; `times` (n,) origin open times (epoch seconds).
    """
    known = np.isfinite(log_return)
    y = np.where(known, log_return, 0.0)
    inside_80 = (log_quantiles[..., 1] <= y) & (y <= log_quantiles[..., 5])
    inside_95 = (log_quantiles[..., 0] <= y) & (y <= log_quantiles[..., 6])
    width_80 = log_quantiles[..., 5] - log_quantiles[..., 1]
    width_95 = log_quantiles[..., 6] - log_quantiles[..., 0]
    loss = pin5_loss(y, log_quantiles)
    median = log_quantiles[..., len(QUANTILES) // 2]
    hit = (np.abs(np.expm1(y - median)) <= tolerance).astype(float)

    def mean(values: np.ndarray, mask: np.ndarray, axis=None):
        count = mask.sum(axis=axis)
        return np.where(count > 0, np.where(mask, values, 0.0).sum(axis=axis) / np.maximum(count, 1), np.nan)

    per_horizon = {
        "coverage_80": mean(inside_80, known, 0), "coverage_95": mean(inside_95, known, 0),
        "width_80": mean(width_80, known, 0), "width_95": mean(width_95, known, 0),
        "pin5": mean(loss, known, 0), "ece": [calibration_error(confidence[known[:, i], i], hit[known[:, i], i])
                                             for i in range(known.shape[1])],
    }
    year = _year(times)[:, None] + np.zeros(known.shape)
    eras = {}
    for name, first, after in ERAS:
        mask = known & (year >= first) & (year < after)
        if mask.any():
            eras[name] = {"coverage_80": float(mean(inside_80, mask)), "coverage_95": float(mean(inside_95, mask)),
                          "pin5": float(mean(loss, mask)), "n_pairs": int(mask.sum()),
                          "n_origins": int(mask.any(axis=1).sum())}
    return {
        "pin5": float(mean(loss, known)),
        "coverage_80": float(mean(inside_80, known)),
        "coverage_95": float(mean(inside_95, known)),
        "width_80": float(mean(width_80, known)),
        "width_95": float(mean(width_95, known)),
        "ece": calibration_error(confidence[known], hit[known]),
        "reliability": [{"confidence": c, "observed": o, "count": n} for c, o, n in
                        reliability(confidence[known], hit[known])],
        "n_origins": int(known.any(axis=1).sum()),
        "n_pairs": int(known.sum()),
        "per_horizon": {key: [float(v) for v in values] for key, values in per_horizon.items()},
        "eras": eras,
    }


RELIABILITY_MIN_SHARE = 0.005  # bins holding fewer pairs are too noisy to judge one by one


def worst_reliability_gap(table: list[dict]) -> float:
    """Largest |confidence − observed| over the reliability bins holding ≥ RELIABILITY_MIN_SHARE of the pairs."""
    total = sum(item["count"] for item in table)
    gaps = [abs(item["confidence"] - item["observed"]) for item in table
            if item["count"] >= RELIABILITY_MIN_SHARE * total]
    return max(gaps, default=float("nan"))


__all__ = [
    "Origins",
    "build_origins",
    "calibration_error",
    "evaluate_model",
    "measured",
    "metrics",
    "pin5_loss",
    "raw_confidence",
    "reliability",
]
