"""Causal, scale-free features of a candle series (numpy only; shared by training, backtests and inference).

Every value at index t uses candles 0..t only. The target is z(t,h) = (ln C(t+h) − ln C(t)) / (σ(t)·√h),
σ = EWMA of one-bar log-return volatility (truncated exponential weights, so the tail of a series gives
exactly the values of the whole series).
"""

from dataclasses import dataclass

import numpy as np

from candlecast.candles import Candles

# Features of the origin candle; the model adds the horizon `h` in front of them.
ORIGIN_FEATURES = (
    "ret1", "ret2", "mom5", "mom20", "vr5", "vr20", "vwin", "park10", "volz", "log_sigma", "hour", "weekday", "vlong",
    "gk1", "gk5", "gk20",
)
FEATURES = ("h", *ORIGIN_FEATURES)
QUANTILES = np.array([0.025, 0.1, 0.25, 0.5, 0.75, 0.9, 0.975])
MEDIAN = 3  # index of 0.5 in QUANTILES
# (lower, upper) quantile indices of the 95%, 80% and 50% intervals.
INTERVALS = ((0, 6), (1, 5), (2, 4))
INTERVAL_ALPHAS = (0.05, 0.2, 0.5)
_VOLUME_WINDOW = 50
HAR_WINDOWS = {"gk1": 1, "gk5": 5, "gk20": 20}  # bars of the Garman-Klass range variances (HAR: Corsi 2009)
_SIGMA_FLOOR = 1e-5
# A bar's range-based variance is winsorized at (RANGE_CAP·σ)², σ the close-to-close EWMA σ including that bar: a wick
# beyond it without a close that moved with it is a bad print's. In ../shared 1 h and 1 d bars exceed 8σ at 1 in 10⁴
# (the largest, Gemini BTC 2015-11-14 02:00, high 2200 at close 338, 74σ); a real crash moves σ and stays below it.
RANGE_CAP = 8.0
# A bar's range variance is at least (|r| − RANGELESS_FACTOR·ln(H/L))², r its close-to-close log return: the part of
# the move its range cannot account for even at RANGELESS_FACTOR times its width. That is all of r² for a rangeless
# bar (open = high = low = close: one trade a bar on an illiquid pair), whose Parkinson and Garman-Klass variances are
# 0 however far the closes move, so a range-weighted scale (1w: gk20 0.88) fell to its floor, bands ~77× too narrow.
# A bar whose range holds both closes (any bar opening at the previous close) has |r| ≤ ln(H/L) and is untouched; in
# ../shared the smallest ln(H/L)/|r| is 0.0945 (1 h; 4 h and 1 d 0.43, 1 w and 1 m 0.98), so no training bar reaches
# 1/20 and the features the committed models were fitted on are unchanged bit for bit.
RANGELESS_FACTOR = 20.0


@dataclass(frozen=True)
class TimeframeConfig:
    halflife: float  # EWMA half-life of σ in bars
    window: int  # bars of returns in the EWMA (weights beyond are dropped)
    tolerance: float  # τ_tf of the confidence: P(|C/Ĉ − 1| ≤ tolerance)
    min_history: int  # bars before an origin counts (σ warm-up)
    # Bars of the long-run variance (`vlong`, GARCH-style variance target); 0 = `window`. The inner check
    # (`infra.calibration_check --long-window`, training coins; a gain under 0.2 % keeps it) kept 540 at 4h (combined
    # pin5 1.3600; 270: 1.3584, 135: 1.3728) and 365 at 1d (4.3270; 182: 4.3616, 91: 4.3706).
    long_window: int = 0
    # The ARCH term of the GARCH part: each bar's squared return (False), or its Garman-Klass range variance scaled
    # to the window's mean squared return (True: a range GARCH; the likelihood stays the returns').
    garch_range: bool = False
    # The GARCH part's grid of (α, β): `garch.GRID_ALPHA`/`GRID_BETA` (False), or `garch.WIDE_GRID` (True), which adds
    # the short-memory corner (β 0.45, α 0.38 and 0.50).
    garch_wide: bool = False

    @property
    def lookback(self) -> int:
        return max(self.window, self.long_window, _VOLUME_WINDOW) + 1


CONFIGS = {
    "1h": TimeframeConfig(halflife=24, window=192, tolerance=0.005, min_history=48, long_window=720),
    "4h": TimeframeConfig(halflife=16, window=128, tolerance=0.01, min_history=32, long_window=540),
    # halflife: all coins score 3 days 0.42 % [0.07, 0.77] below 12 on their training coins (`infra.calibration_check
    # --halflife 3 --per-pass --losses`, `combined`'s pin5, `config_verdict`); 2 gains nothing over 3
    "1d": TimeframeConfig(halflife=3, window=96, tolerance=0.02, min_history=24, long_window=365),
    # long_window: 26 bars scores 4.1 % lower on all coins, within its noise ([−4.2 %, +12.4 %] over 4 calendar
    # batches: `infra.calibration_check.config_verdict`), so 104 stays
    "1w": TimeframeConfig(halflife=8, window=52, tolerance=0.05, min_history=12, long_window=104),
    # garch_range: all coins' combined pin5 1.1 % lower, but the inner check's 24 months are one calendar batch: no
    # interval, so squared returns stay (`config_verdict`)
    "1m": TimeframeConfig(halflife=6, window=36, tolerance=0.10, min_history=6, long_window=48),
}


def _rolling_mean(values: np.ndarray, size: int) -> np.ndarray:
    """Mean of the last `size` values at each index (fewer at the start)."""
    total = np.cumsum(values)
    shifted = np.concatenate([np.zeros(size), total[:-size]]) if len(values) > size else np.zeros(len(values))
    counts = np.minimum(np.arange(1, len(values) + 1), size)
    return (total - shifted[: len(values)]) / counts


def ewma_sigma(log_returns: np.ndarray, halflife: float, window: int) -> np.ndarray:
    """σ(t) from returns r(1..t); `log_returns[0]` is ignored (no previous close)."""
    weights = 0.5 ** (np.arange(window) / halflife)
    squared = np.square(log_returns)
    squared[0] = 0.0
    present = np.ones(len(log_returns))
    present[0] = 0.0
    numerator = np.convolve(squared, weights)[: len(squared)]
    denominator = np.convolve(present, weights)[: len(squared)]
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = np.sqrt(numerator / denominator)
    sigma[0] = np.nan
    return np.fmax(sigma, _SIGMA_FLOOR)


def range_variances(candles: Candles, returns: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Parkinson, Garman-Klass) variance of every bar, at least its unexplained move (RANGELESS_FACTOR) and
    winsorized at (RANGE_CAP·σ)²; `returns` the close-to-close log returns, `sigma` the EWMA σ (`ewma_sigma`)."""
    high_low = np.log(candles.high / candles.low)
    range_cap = np.square(RANGE_CAP * sigma)
    range_cap[:1] = np.inf  # the first bar has no return, so no σ
    unexplained = np.square(np.maximum(np.abs(returns) - RANGELESS_FACTOR * high_low, 0.0))
    parkinson = np.minimum(np.maximum(np.square(high_low) / (4 * np.log(2)), unexplained), range_cap)
    body = np.log(candles.close / candles.open)
    garman_klass = np.clip(np.maximum(0.5 * np.square(high_low) - (2 * np.log(2) - 1) * np.square(body), unexplained),
                           0.0, range_cap)
    return parkinson, garman_klass


def garch_news(candles: Candles, config: TimeframeConfig) -> np.ndarray | None:
    """The bars' Garman-Klass variances for a range GARCH (`config.garch_range`, `garch.series_states`), else None.
    Not winsorized by σ here: the GARCH window caps them itself, so a forecast's window reads what the walk-forward's
    did though its first bars' σ differ."""
    if not config.garch_range:
        return None
    log_close = np.log(candles.close)
    return range_variances(candles, np.diff(log_close, prepend=log_close[0]), np.full(len(candles), np.inf))[1]


def origin_features(candles: Candles, config: TimeframeConfig) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, len(ORIGIN_FEATURES)), σ (n,)) for every candle of the series."""
    log_close = np.log(candles.close)
    returns = np.diff(log_close, prepend=log_close[0])
    sigma = ewma_sigma(returns, config.halflife, config.window)
    squared = np.square(returns)

    def lagged(values: np.ndarray, lag: int) -> np.ndarray:
        return np.concatenate([np.full(lag, values[0]), values[:-lag]]) if len(values) > lag else values * 0

    momentum5 = (log_close - lagged(log_close, 5)) / (sigma * np.sqrt(5))
    momentum20 = (log_close - lagged(log_close, 20)) / (sigma * np.sqrt(20))
    parkinson, garman_klass = range_variances(candles, returns, sigma)
    log_volume = np.log1p(np.maximum(candles.volume, 0))
    volume_mean = _rolling_mean(log_volume, _VOLUME_WINDOW)
    volume_var = np.maximum(_rolling_mean(np.square(log_volume), _VOLUME_WINDOW) - np.square(volume_mean), 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        volume_z = np.where(volume_var > 1e-12, (log_volume - volume_mean) / np.sqrt(volume_var), 0.0)
    columns = [
        returns / sigma,
        lagged(returns, 1) / sigma,
        momentum5,
        momentum20,
        np.sqrt(_rolling_mean(squared, 5)) / sigma,
        np.sqrt(_rolling_mean(squared, 20)) / sigma,
        np.sqrt(_rolling_mean(squared, config.window)) / sigma,
        np.sqrt(_rolling_mean(parkinson, 10)) / sigma,
        np.clip(volume_z, -5, 5),
        np.log(sigma),
        # calendar of the origin candle (UTC): volatility has strong intraday and weekly seasonality
        (candles.open_time // 3600) % 24,
        (candles.open_time // 86400 + 3) % 7,
        np.sqrt(_rolling_mean(squared, config.long_window or config.window)) / sigma,
        *(np.sqrt(_rolling_mean(garman_klass, size)) / sigma for size in HAR_WINDOWS.values()),
    ]
    features = np.clip(np.nan_to_num(np.column_stack(columns), nan=0.0, posinf=0.0, neginf=0.0), -50, 50)
    return features, sigma


def wick_ratios(candles: Candles, sigma: np.ndarray) -> tuple[float, float]:
    """(Σ mean wick in log units, Σ σ of the previous bar): the wick coefficient is their ratio."""
    upper = np.log(candles.high / np.maximum(candles.open, candles.close))
    lower = np.log(np.minimum(candles.open, candles.close) / candles.low)
    wick = 0.5 * (upper[1:] + lower[1:])
    previous_sigma = sigma[:-1]
    valid = np.isfinite(wick) & np.isfinite(previous_sigma) & (wick >= 0)
    return float(wick[valid].sum()), float(previous_sigma[valid].sum())
