"""The forecast model at inference: a plain dict of numpy arrays turned into 30 expected candles (numpy only).

Model dict (format 1), written by candlecast.forecast.train and signed by candlecast.forecast.artifact:
  timeframe, name, version, kind ('baseline'|'learned': whether the file holds trees), features,
  config (TimeframeConfig fields),
  quantiles (7,), baseline_q (30, 7) calibrated z-quantiles of the baseline,
  trees (None or dict of flat tree arrays, see `evaluate_trees`), conformal (30, 3) widening of the
  95/80/50% intervals for the trees, wick (float), confidence_x / confidence_y (knots of the map from raw to
  calibrated confidence), confidence_ln_h (optional, absent/None: 0; c: at horizon h the map's logit moves by c·ln h,
  the knots being the map at h = 1),
  volatility (None, or GARCH-style weights: see `volatility_factor`),
  method (optional: 'baseline'|'learned'|'garch-scale'|'combined'; default `kind`; the kind registered),
  garch (None, or the series' own GARCH(1,1) fitted at the origin, see `candlecast.forecast.garch`: quantiles
  (30, 7) z-quantiles in units of its scale σ·√h·g(h); fit ('mle', or 'grid' when absent: `garch.FITS`);
  weight w of the file's own quantiles (trees, else the baseline) in the quantile average w·own + (1 − w)·GARCH
  (0: GARCH alone); conformal (30, 3) widening of that average).
"""

import io
from dataclasses import dataclass

import numpy as np

from candlecast.candles import Candles, usable_candles
from candlecast.errors import UnusableInput
from candlecast.forecast.features import (
    FEATURES,
    HAR_WINDOWS,
    INTERVALS,
    MEDIAN,
    ORIGIN_FEATURES,
    QUANTILES,
    TimeframeConfig,
    garch_news,
    origin_features,
)
from candlecast.forecast.garch import scale_factor, series_states
from candlecast.timeframes import FORECAST_STEPS

FORMAT = 1
HORIZONS = np.arange(1, FORECAST_STEPS + 1)
_ROW_TREE_BUDGET = 4_000_000  # rows × trees evaluated at once (memory bound)


@dataclass(frozen=True)
class Forecast:
    """Arrays of length 30: the expected candles, close-price intervals and per-step confidence."""

    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    lower_80: np.ndarray
    upper_80: np.ndarray
    lower_95: np.ndarray
    upper_95: np.ndarray
    confidence: np.ndarray


def evaluate_trees(trees: dict, rows: np.ndarray) -> np.ndarray:
    """Sum of leaf values per quantile for `rows` (m, features) -> (m, n_quantiles).

    `trees` holds every node of every tree in flat arrays: feature, threshold, left, right (node
    indices; a leaf points to itself), value; `roots` (n_trees,), `tree_quantile` (n_trees,) sorted,
    `depth` (max path length).
    """
    feature, threshold, value = trees["feature"], trees["threshold"], trees["value"]
    roots, groups = trees["roots"], trees["group_starts"]
    # The next node, flat: children[2 * node + went_left]. 1-D `take`s, a few times cheaper than 2-D indexing.
    children = np.column_stack([trees["right"], trees["left"]]).ravel()
    chunk = max(1, _ROW_TREE_BUDGET // len(roots))
    out = np.empty((len(rows), len(groups)))
    for start in range(0, len(rows), chunk):
        block = rows[start : start + chunk]
        cells = block.ravel()
        row_starts = (np.arange(len(block)) * block.shape[1])[:, None]
        node = np.broadcast_to(roots, (len(block), len(roots))).copy()
        for _ in range(int(trees["depth"])):
            went_left = cells.take(row_starts + feature.take(node)) <= threshold.take(node)
            node = children.take(2 * node + went_left)
        out[start : start + chunk] = np.add.reduceat(value.take(node), groups, axis=1)
    return out


_LONG = ORIGIN_FEATURES.index("vlong")
# Next-bar variance estimates of `volatility_factor` besides the EWMA σ² (1) and the long-run level: their features.
_ESTIMATES = {"range": ORIGIN_FEATURES.index("park10"), **{key: ORIGIN_FEATURES.index(key) for key in HAR_WINDOWS}}


def volatility_factor(origin_rows: np.ndarray, volatility: dict | None) -> np.ndarray:
    """(n, 30) factor f with GARCH-style scale(h) = σ·√h·f(h); ones without `volatility`.

    GARCH(1,1) with variance targeting in closed form, from features of the origin (all relative to σ², the
    EWMA variance): the next bar's variance s1 = w_ewma·1 + w_range·park10² + Σ_k w_gkk·gkk² + (1 − Σ w)·L, with
    HAR-type terms (Corsi 2009) from the Garman-Klass range variances over k = 1, 5 and 20 bars (weights absent: 0),
    L = vlong² the mean squared return over the long window as the long-run level (variance targeting), and the
    expected variance of bar k is L + φ^(k−1)·(s1 − L). f(h)² = Σ_{k≤h} of those / h.
    """
    if not volatility:
        return np.ones((len(origin_rows), len(HORIZONS)))
    persistence = float(volatility["persistence"])
    vlong = origin_rows[:, _LONG]
    long_run = np.where(vlong > 0, np.square(vlong), 1.0)
    next_bar, rest = float(volatility["ewma"]), 1.0 - float(volatility["ewma"])
    for key, column in _ESTIMATES.items():
        if volatility.get(key):
            weight = float(volatility[key])
            next_bar, rest = next_bar + weight * np.square(origin_rows[:, column]), rest - weight
    next_bar = next_bar + rest * long_run
    decay = persistence ** (HORIZONS - 1)
    cumulative = np.cumsum(decay)  # Σ_{k≤h} φ^(k−1)
    total = HORIZONS[None, :] * long_run[:, None] + cumulative[None, :] * (next_bar - long_run)[:, None]
    return np.sqrt(np.maximum(total / HORIZONS[None, :], 1e-4))


def piecewise_cdf(knots: np.ndarray, levels: np.ndarray, points: np.ndarray) -> np.ndarray:
    """CDF at `points` (m,) of rows whose quantile knots are `knots` (m, k) at `levels` (k,), linear between."""
    above = (knots <= points[:, None]).sum(axis=1)
    upper = np.clip(above, 1, knots.shape[1] - 1)
    x0 = np.take_along_axis(knots, (upper - 1)[:, None], 1)[:, 0]
    x1 = np.take_along_axis(knots, upper[:, None], 1)[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(x1 > x0, (points - x0) / (x1 - x0), 1.0)
    cdf = levels[upper - 1] + np.clip(fraction, 0, 1) * (levels[upper] - levels[upper - 1])
    return np.where(above == 0, 0.0, np.where(above == knots.shape[1], 1.0, cdf))


def raw_confidence(z_quantiles: np.ndarray, scale: np.ndarray, tolerance: float) -> np.ndarray:
    """P(|C/Ĉ − 1| ≤ tolerance) read off the quantile curve; `scale` = σ·√h, same leading shape."""
    shape = z_quantiles.shape[:-1]
    q = z_quantiles.reshape(-1, len(QUANTILES))
    s = np.broadcast_to(scale, shape).reshape(-1)
    # Tails: zero/one probability 1.5 inter-quantile gaps beyond the outer quantiles.
    knots = np.column_stack([q[:, 0] - 1.5 * (q[:, 1] - q[:, 0]), q, q[:, -1] + 1.5 * (q[:, -1] - q[:, -2])])
    levels = np.concatenate([[0.0], QUANTILES, [1.0]])
    knots = np.maximum.accumulate(knots, axis=1)
    median = q[:, MEDIAN]
    low = piecewise_cdf(knots, levels, median + np.log1p(-tolerance) / s)
    high = piecewise_cdf(knots, levels, median + np.log1p(tolerance) / s)
    return np.clip(high - low, 0.0, 1.0).reshape(shape)


class ForecastModel:
    """A loaded model; build it from the plain dict with `ForecastModel(payload_dict)`."""

    def __init__(self, payload: dict):
        if payload.get("format") != FORMAT:
            raise UnusableInput(f"unsupported model format {payload.get('format')!r}")
        self.payload = payload
        self.timeframe = payload["timeframe"]
        self.name = payload["name"]
        self.version = payload["version"]
        self.kind = payload["kind"]
        self.features = list(payload["features"])
        self.config = TimeframeConfig(**payload["config"])
        self.lookback = self.config.lookback
        self.baseline_q = np.asarray(payload["baseline_q"], dtype=np.float64)
        self.trees = payload.get("trees")
        self.conformal = np.asarray(payload["conformal"], dtype=np.float64)
        self.wick = float(payload["wick"])
        self.confidence_x = np.asarray(payload["confidence_x"], dtype=np.float64)
        self.confidence_y = np.asarray(payload["confidence_y"], dtype=np.float64)
        self.confidence_ln_h = float(payload.get("confidence_ln_h") or 0.0)
        self.volatility = payload.get("volatility")
        self.method = payload.get("method", self.kind)
        self.garch = payload.get("garch")
        # Features are only ever appended, so a file trained on a prefix of today's set reads the same columns.
        if list(FEATURES[: len(self.features)]) != self.features:
            raise UnusableInput("model features do not match this code's feature set")

    # -- z-quantiles -----------------------------------------------------------------------------------
    def z_quantiles(self, origin_rows: np.ndarray, garch_states: np.ndarray | None = None) -> np.ndarray:
        """Calibrated z-quantiles (n, 30, 7) in units of σ·√h for origin feature rows (n, len(ORIGIN_FEATURES));
        a file with a GARCH part also needs the origins' GARCH states (n, 3) (`garch.series_states`)."""
        if self.garch is None:
            return self.own_quantiles(origin_rows)
        if garch_states is None:
            raise ValueError("this model needs the GARCH state of each origin")
        weight = float(self.garch["weight"])
        member = np.asarray(self.garch["quantiles"])[None] * scale_factor(garch_states)[..., None]
        mixed = member if weight == 0 else weight * self.own_quantiles(origin_rows) + (1 - weight) * member
        return widen(mixed, np.asarray(self.garch["conformal"], dtype=np.float64))

    def own_quantiles(self, origin_rows: np.ndarray) -> np.ndarray:
        """The trees' (else the baseline's) calibrated z-quantiles (n, 30, 7), without the GARCH part."""
        factor = volatility_factor(origin_rows, self.volatility)[..., None]
        if self.trees is None:
            return self.baseline_q[None] * factor
        return self.shape_quantiles(origin_rows) * factor

    def baseline_z_quantiles(self, origin_rows: np.ndarray) -> np.ndarray:
        """The file's baseline (its empirical z-quantiles on the same volatility scale), (n, 30, 7)."""
        return self.baseline_q[None] * volatility_factor(origin_rows, self.volatility)[..., None]

    def shape_quantiles(self, origin_rows: np.ndarray, conformal: bool = True) -> np.ndarray:
        """The trees' quantiles (n, 30, 7) in units of the volatility scale, widened by the conformal offsets."""
        n = len(origin_rows)
        rows = np.empty((n, len(HORIZONS), len(FEATURES)))
        rows[:, :, 0] = HORIZONS
        rows[:, :, 1:] = origin_rows[:, None, :]
        q = evaluate_trees(self.trees, rows.reshape(-1, len(FEATURES))).reshape(n, len(HORIZONS), -1)
        q.sort(axis=-1)
        # The median stays the random walk: the trees shape the spread (volatility), not the direction.
        q -= q[..., MEDIAN : MEDIAN + 1]
        return widen(q, self.conformal) if conformal else q

    def confidence(self, z_quantiles: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        """Calibrated per-step confidence (n, 30) for z-quantiles (n, 30, 7) and origin σ (n,)."""
        scale = sigma[:, None] * np.sqrt(HORIZONS)[None, :]
        return self.calibrated(raw_confidence(z_quantiles, scale, self.config.tolerance))

    def calibrated(self, raw: np.ndarray) -> np.ndarray:
        """The map of raw confidence (n, 30) to calibrated: the knots, then with `confidence_ln_h` c the logit
        moved by c·ln h at horizon h."""
        mapped = np.interp(raw, self.confidence_x, self.confidence_y)
        if self.confidence_ln_h:
            p = np.clip(mapped, 1e-12, 1 - 1e-12)
            mapped = 1 / (1 + (1 - p) / p * np.exp(-self.confidence_ln_h * np.log(HORIZONS)))
        return np.clip(mapped, 0.0, 1.0)

    # -- one forecast ----------------------------------------------------------------------------------
    @property
    def min_candles(self) -> int:
        """Usable candles a forecast needs: the σ warm-up every origin it was evaluated on had (`config.min_history`),
        and never fewer than 3."""
        return max(3, self.config.min_history)

    def predict(self, candles: Candles) -> Forecast:
        """30 expected candles after the last of `candles` (oldest first; at least `min_candles` usable ones)."""
        recent = usable_candles(candles.tail(self.lookback))
        if len(recent) < self.min_candles:
            raise ValueError(f"at least {self.min_candles} candles with positive prices are needed for a "
                             f"{self.timeframe} forecast ({len(recent)} given)")
        rows, sigma = origin_features(recent, self.config)
        origin, sigma_now = rows[-1:], sigma[-1:]
        states = None if self.garch is None else series_states(np.log(recent.close), np.array([len(recent) - 1]),
                                                               self.lookback - 1, sigma_now,
                                                               self.garch.get("fit", "grid"),
                                                               garch_news(recent, self.config),
                                                               self.config.garch_wide)
        q = self.z_quantiles(origin, states)
        confidence = self.confidence(q, sigma_now)[0]
        last_close = float(recent.close[-1])
        scale = sigma_now[0] * np.sqrt(HORIZONS)
        prices = last_close * np.exp(scale[:, None] * q[0])
        close = prices[:, MEDIAN]
        open_ = np.concatenate([[last_close], close[:-1]])
        spread = np.exp(self.wick * sigma_now[0])
        return Forecast(
            open=open_,
            high=np.maximum(open_, close) * spread,
            low=np.minimum(open_, close) / spread,
            close=close,
            lower_80=prices[:, 1],
            upper_80=prices[:, 5],
            lower_95=prices[:, 0],
            upper_95=prices[:, 6],
            confidence=confidence,
        )


def widen(z_quantiles: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Conformal widening: interval i's bounds move out by offsets[h, i] (never across the median), re-sorted."""
    q = z_quantiles.copy()
    median = q[..., MEDIAN]
    for i, (lower, upper) in enumerate(INTERVALS):
        q[..., lower] = np.minimum(q[..., lower] - offsets[:, i], median)
        q[..., upper] = np.maximum(q[..., upper] + offsets[:, i], median)
    q.sort(axis=-1)
    return q


def load_model(payload: bytes) -> ForecastModel:
    """Unpickle a model file. NOT a trust boundary: use candlecast.forecast.artifact.verify_and_load."""
    import joblib

    return ForecastModel(joblib.load(io.BytesIO(payload)))


__all__ = ["FEATURES", "ORIGIN_FEATURES", "Forecast", "ForecastModel", "load_model"]
