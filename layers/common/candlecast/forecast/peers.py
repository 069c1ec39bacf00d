"""Peers scored beside the model on the same origins (training/backtest side only; GARCH needs `arch` and scipy).

Every peer gives log-return quantiles (n, 30, 7) at the levels of `features.QUANTILES`, median 0 (random walk):
- `gaussian-rw`: N(0, s²·h), s = sample sd of the last 30 one-bar log returns up to the origin.
- `garch-t`: GARCH(1,1), zero mean, Student-t innovations, fitted with `arch` on a rolling window of returns
  ending at the origin, refitted every `refit_every` bars (warm-started); between refits the variance recursion
  runs over new returns with the last parameters. The h-step quantile is the standardised t quantile times
  √(Σ expected one-bar variances). With too few returns for a fit (fewer than `GarchPlan.min_returns` before the
  origin: the series' first `min_returns` bars), or before any fit of the series has succeeded, a t(5) on the
  sample variance of the window: a fallback, not GARCH. `garch_t` can report which origins fell back, and the
  comparison reports Δ on the others too (`comparison.compare_methods`' `fallback`).
- `conformal-rw`: split-conformal Gaussian random walk: ±c_h·s·√h (s as for `gaussian-rw`), where c_h is the
  finite-sample conformal quantile (rank ⌈(n+1)(1−α)⌉ of n) of the standardised scores |ln C(s+h) − ln C(s)| /
  (s_s·√h) of the n calibration pairs: every series' pairs (origins s with a full 30-return window) whose
  outcome candle opened in the last `ConformalPlan.window` bars before the (re)calibration time, which is at
  or before the origin, so every outcome it uses is known there (the horizon overlap is purged). Pooled over
  the series, so short histories (1w, 1m) still calibrate; with fewer than CONFORMAL_MIN_PAIRS pairs, c_h is
  the Gaussian quantile.
Nothing at an origin reads a candle after it (tests/test_forecast_peers.py).
"""

import math
import warnings
from dataclasses import dataclass

import numpy as np

from candlecast.forecast.features import INTERVAL_ALPHAS, INTERVALS, QUANTILES
from candlecast.forecast.model import HORIZONS
from candlecast.timeframes import Timeframe

RW_WINDOW = 30
_PERCENT = 100.0  # arch fits returns in percent (better conditioned)


@dataclass(frozen=True)
class GarchPlan:
    window: int  # returns in each fit
    refit_every: int  # bars between refits of one series
    min_returns: int  # fewer returns than this: no fit, a t(5) on the sample variance


GARCH_PLANS = {
    "1h": GarchPlan(window=1500, refit_every=240, min_returns=300),
    "4h": GarchPlan(window=1000, refit_every=90, min_returns=200),
    "1d": GarchPlan(window=1000, refit_every=30, min_returns=150),
    "1w": GarchPlan(window=260, refit_every=4, min_returns=60),
    "1m": GarchPlan(window=120, refit_every=1, min_returns=36),
}


def _t_quantiles(nu: np.ndarray) -> np.ndarray:
    """(n, 7) quantiles of unit-variance Student-t with `nu` (n,) degrees of freedom."""
    from scipy import stats

    nu = np.clip(nu, 2.05, 500.0)
    return stats.t.ppf(QUANTILES[None, :], nu[:, None]) * np.sqrt((nu - 2) / nu)[:, None]


def log_returns(close: np.ndarray) -> np.ndarray:
    """r[i] = ln C[i] − ln C[i−1]; r[0] = NaN."""
    log_close = np.log(close)
    return np.concatenate([[np.nan], np.diff(log_close)])


def rw_sd(close: np.ndarray, window: int = RW_WINDOW) -> np.ndarray:
    """s[p] = sample sd of the one-bar log returns r[max(1, p−29)..p] (the last 30, or `window`, up to candle p), for
    every p.

    Where that is undefined or 0 (flat prices), the last earlier positive s; before any, 0.01.
    """
    returns = log_returns(close)
    sd = np.full(len(close), np.nan)
    for p in range(min(window, len(close))):  # the first windows are shorter
        recent = returns[1 : p + 1]
        sd[p] = np.std(recent, ddof=1) if len(recent) >= 2 else np.nan
    if len(close) > window:
        full = np.lib.stride_tricks.sliding_window_view(returns[1:], window)
        sd[window:] = np.std(full[: len(close) - window], axis=1, ddof=1)
    valid = np.isfinite(sd) & (sd > 0)
    last = np.maximum.accumulate(np.where(valid, np.arange(len(sd)), -1))
    return np.where(last >= 0, sd[np.maximum(last, 0)], 0.01)


def _gaussian_z() -> np.ndarray:
    from scipy import stats

    return stats.norm.ppf(QUANTILES)


def gaussian_rw(close: np.ndarray, positions: np.ndarray, window: int = RW_WINDOW) -> np.ndarray:
    """(n, 30, 7) quantiles of the Gaussian random walk (sd of the last `window` returns) at origin indices
    `positions`."""
    sd = rw_sd(close, window)[positions]
    return sd[:, None, None] * np.sqrt(HORIZONS)[None, :, None] * _gaussian_z()[None, None, :]


@dataclass(frozen=True)
class ConformalPlan:
    window: int  # bars of calendar time whose resolved pairs (of every series) calibrate
    recalibrate_every: int  # bars between recalibrations


CONFORMAL_PLANS = {
    "1h": ConformalPlan(window=2160, recalibrate_every=24),  # 90 days
    "4h": ConformalPlan(window=1080, recalibrate_every=6),  # 180 days
    "1d": ConformalPlan(window=730, recalibrate_every=1),
    "1w": ConformalPlan(window=260, recalibrate_every=1),
    "1m": ConformalPlan(window=120, recalibrate_every=1),
}
CONFORMAL_MIN_PAIRS = 30


def conformal_rw(series: list, origin_series: np.ndarray, positions: np.ndarray, timeframe: Timeframe,
                 plan: ConformalPlan) -> np.ndarray:
    """(n, 30, 7) split-conformal Gaussian random-walk quantiles at origins (`origin_series` index into `series`,
    a list of Candles; `positions` index the origin candle in its series)."""
    from candlecast.timeframes import nominal_seconds

    bar = nominal_seconds(timeframe)
    sds = [rw_sd(candles.close) for candles in series]
    origin_time = np.array([series[i].open_time[p] for i, p in zip(origin_series, positions, strict=True)],
                           dtype=np.int64)
    # Calibrated at the last recalibration time r <= the origin, on pairs whose outcome candle opens in (r − W, r].
    at = origin_time if plan.recalibrate_every == 1 else origin_time - origin_time % (plan.recalibrate_every * bar)
    moments, moment_index = np.unique(at, return_inverse=True)
    gaussian = np.abs(_gaussian_z()[[upper for _, upper in INTERVALS]])  # (3,) half-widths in sd·√h
    factor = np.empty((len(positions), len(HORIZONS), len(INTERVALS)))
    for i, h in enumerate(HORIZONS):
        label_time, score = [], []
        for candles, sd in zip(series, sds, strict=True):
            if len(candles) <= h:
                continue
            log_close = np.log(candles.close)
            own = np.arange(len(candles) - h) >= RW_WINDOW  # s with a full 30-return sd window
            label_time.append(candles.open_time[h:][own])
            score.append((np.abs(log_close[h:] - log_close[:-h]) / (sd[:-h] * np.sqrt(h)))[own])
        label_time = np.concatenate(label_time) if label_time else np.empty(0, np.int64)
        score = np.concatenate(score) if score else np.empty(0)
        order = np.argsort(label_time, kind="stable")
        label_time, score = label_time[order], score[order]
        first = np.searchsorted(label_time, moments - plan.window * bar, side="right")
        last = np.searchsorted(label_time, moments, side="right")
        table = np.empty((len(moments), len(INTERVALS)))
        for k, (lo, hi) in enumerate(zip(first, last, strict=True)):
            n = hi - lo
            ranks = [math.ceil((n + 1) * (1 - alpha)) for alpha in INTERVAL_ALPHAS]
            if n < CONFORMAL_MIN_PAIRS or max(ranks) > n:
                table[k] = gaussian
                continue
            window = np.partition(score[lo:hi], [rank - 1 for rank in ranks])
            table[k] = window[[rank - 1 for rank in ranks]]
        factor[:, i] = table[moment_index]
    sd_at = np.array([sds[i][p] for i, p in zip(origin_series, positions, strict=True)])
    half = sd_at[:, None, None] * np.sqrt(HORIZONS)[None, :, None] * factor
    quantiles = np.zeros((len(positions), len(HORIZONS), len(QUANTILES)))
    for j, (lower, upper) in enumerate(INTERVALS):
        quantiles[..., lower], quantiles[..., upper] = -half[..., j], half[..., j]
    return quantiles


def _garch_fit(returns_pct: np.ndarray, start: np.ndarray | None) -> np.ndarray | None:
    """(ω, α, β, ν) of a zero-mean GARCH(1,1)-t on `returns_pct`, or None when the fit fails."""
    from arch import arch_model

    model = arch_model(returns_pct, mean="Zero", vol="GARCH", p=1, q=1, dist="t", rescale=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = model.fit(disp="off", show_warning=False, starting_values=start, options={"maxiter": 200})
        except (ValueError, np.linalg.LinAlgError):
            return None
    params = np.asarray(result.params, dtype=np.float64)
    return params if np.isfinite(params).all() else None


def _variance_path(returns_pct: np.ndarray, params: np.ndarray) -> np.ndarray:
    """s²[i] = conditional variance of r[i+1] given r[..i] (length of `returns_pct`), backcast-started."""
    from scipy.signal import lfilter

    omega, alpha, beta = params[:3]
    backcast = float(np.mean(np.square(returns_pct[: min(len(returns_pct), 75)])))
    drive = omega + alpha * np.square(returns_pct)
    # s²[i] = drive[i] + β·s²[i−1], with s²[−1] = backcast.
    path, _ = lfilter([1.0], [1.0, -beta], drive, zi=[beta * backcast])
    return path


def garch_fallback_by_position(positions: np.ndarray, plan: GarchPlan) -> np.ndarray:
    """(n,) True where `garch_t` falls back at candle index `positions` for want of returns (fewer than
    `plan.min_returns` in its window). It cannot see a failed fit; `garch_t(..., fallback=)` records those too."""
    positions = np.asarray(positions, dtype=np.int64)
    return np.minimum(positions, plan.window) < plan.min_returns


def garch_t(close: np.ndarray, positions: np.ndarray, plan: GarchPlan,
            fallback: np.ndarray | None = None) -> np.ndarray:
    """(n, 30, 7) GARCH(1,1)-t quantiles at sorted origin indices `positions` of one series.

    `fallback`, when given, a boolean array (n,) set True at the origins that got no GARCH forecast: too few
    returns, no successful fit yet, or a non-finite variance replaced by the others' median. (After a failed refit
    the last fitted parameters carry on: that is still GARCH.)"""
    used_fallback = np.zeros(len(positions), dtype=bool)
    returns = log_returns(close) * _PERCENT
    cumulative = np.empty((len(positions), len(HORIZONS)))
    nu = np.empty(len(positions))
    params, fitted_at, start = None, -(10**12), None
    for i, p in enumerate(positions):
        lo = max(1, p - plan.window + 1)
        window = returns[lo : p + 1]
        if len(window) < plan.min_returns:
            variance = float(np.mean(np.square(window))) if len(window) else np.nan
            cumulative[i] = variance * HORIZONS
            nu[i] = 5.0
            used_fallback[i] = True
            continue
        if params is None or p - fitted_at >= plan.refit_every:
            fit = _garch_fit(window, start)
            if fit is not None:
                params, start = fit, fit
            fitted_at = p
        if params is None:
            cumulative[i] = float(np.mean(np.square(window))) * HORIZONS
            nu[i] = 5.0
            used_fallback[i] = True
            continue
        omega, alpha, beta, shape = params
        next_variance = _variance_path(window, params)[-1]
        persistence = alpha + beta
        steps = np.empty(len(HORIZONS))
        steps[0] = next_variance
        for k in range(1, len(HORIZONS)):
            steps[k] = omega + persistence * steps[k - 1]
        cumulative[i] = np.cumsum(steps)
        nu[i] = shape
    bad = ~np.isfinite(cumulative).all(axis=1)
    if bad.any():
        cumulative[bad] = np.nanmedian(cumulative[~bad], axis=0) if (~bad).any() else 1.0
        used_fallback |= bad
    if fallback is not None:
        fallback[:] = used_fallback
    scale = np.sqrt(np.maximum(cumulative, 0.0)) / _PERCENT
    return scale[:, :, None] * _t_quantiles(nu)[:, None, :]


PEERS = ("garch-t", "gaussian-rw", "conformal-rw")


def series_origins(loaded: list, series: np.ndarray, times: np.ndarray, progress: str | None = None):
    """Per series of the origins (`series` index into `loaded`, candle open `times`): (its candles, the origins' rows
    in time order, their candle indices). `progress`: a progress bar's label."""
    indices = np.unique(series)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=progress, unit="series", leave=False)
    for index in indices:
        candles = loaded[int(index)][1]
        rows = np.flatnonzero(series == index)
        rows = rows[np.argsort(times[rows], kind="stable")]
        positions = np.searchsorted(candles.open_time, times[rows])
        if not np.array_equal(candles.open_time[np.minimum(positions, len(candles) - 1)], times[rows]):
            raise ValueError("origin times must be candle open times of their series")
        yield candles, rows, positions


def peer_quantiles(loaded: list, series: np.ndarray, times: np.ndarray, timeframe: Timeframe,
                   progress: bool = False, fallback: dict | None = None) -> dict[str, np.ndarray]:
    """{peer: (n, 30, 7) log-return quantiles} at the origins (`series` index into `loaded`, candle open `times`).
    `fallback`, when given a dict, gets {"garch-t": (n,) mask of the origins where GARCH-t fell back} (`garch_t`)."""
    garch_fallback = np.zeros(len(times), dtype=bool)
    out = {name: np.full((len(times), len(HORIZONS), len(QUANTILES)), np.nan) for name in PEERS}
    plan = GARCH_PLANS[timeframe]
    origin_positions = np.zeros(len(times), dtype=np.int64)
    for candles, rows, positions in series_origins(loaded, series, times,
                                                   f"peers {timeframe} (GARCH-t refits)" if progress else None):
        out["gaussian-rw"][rows] = gaussian_rw(candles.close, positions)
        fell_back = np.zeros(len(rows), dtype=bool)
        out["garch-t"][rows] = garch_t(candles.close, positions, plan, fallback=fell_back)
        garch_fallback[rows] = fell_back
        origin_positions[rows] = positions
    # Calibrated on every series' past, so computed once for all origins.
    out["conformal-rw"] = conformal_rw([candles for _, candles in loaded], np.asarray(series), origin_positions,
                                       timeframe, CONFORMAL_PLANS[timeframe])
    if fallback is not None:
        fallback["garch-t"] = garch_fallback
    return out


def peer_methods(loaded: list, origins, timeframe: Timeframe, candidates: dict, tolerance: float,
                 progress: bool = False, fallback: dict | None = None) -> dict:
    """The model's `candidates` (name -> (log-return quantiles, confidence) at `origins`) and every peer at the same
    origins; the peers' confidence is read off their quantile curve. `fallback`: as for `peer_quantiles`."""
    from candlecast.forecast.model import raw_confidence

    methods = dict(candidates)
    for name, quantiles in peer_quantiles(loaded, origins.series, origins.time, timeframe, progress,
                                                fallback).items():
        methods[name] = (quantiles, raw_confidence(quantiles, np.ones(quantiles.shape[:-1]), tolerance))
    return methods


def compare_with_peers(loaded: list, origins, timeframe: Timeframe, candidates: dict, reference: str,
                       tolerance: float, progress: bool = False, methods: dict | None = None,
                       fallback: dict | None = None) -> dict:
    """`comparison.compare_methods` of the model's `candidates` and every peer at the same origins (`peer_methods`;
    `methods`, when given, is its result already computed, and `fallback` the peers' fallback masks it filled)."""
    from candlecast.forecast.comparison import compare_methods, per_series_scores
    from candlecast.forecast.dataset import series_names
    from candlecast.timeframes import nominal_seconds

    if methods is None:
        fallback = {}
        methods = peer_methods(loaded, origins, timeframe, candidates, tolerance, progress, fallback)
    result = compare_methods(origins.log_return, origins.time, methods, tolerance, nominal_seconds(timeframe),
                             reference, fallback=fallback)
    per_series = per_series_scores(origins.log_return, origins.time, methods, tolerance, origins.series,
                                   series_names([series for series, _ in loaded]))
    return result | {"n_series": len(per_series), "per_series": per_series}
