"""GARCH(1,1)-t of a series' own recent returns, fitted by maximum likelihood at every origin in numpy
(inference-safe: numpy only).

The model is `arch`'s `arch_model(r, mean="Zero", vol="GARCH", p=1, q=1, dist="t")`, fitted the same way:
    s²_0 = ω + (α + β)·b,   s²_i = ω + α·r²_{i−1} + β·s²_{i−1},   r_i = s_i·ε_i,  ε ~ unit-variance t(ν)
with b `arch`'s backcast (EWMA, decay 0.94, of the first 75 squared returns), free ω, α, β ≥ 0, α + β < 1 and
2.05 ≤ ν ≤ 500. The Student-t log-likelihood is maximised in two stages, vectorised over origins:
  1. a coarse grid of (α, β) with variance targeting (ω = (1 − α − β)·mean r²) and ν = 5 gives the start;
  2. REFINE_STEPS BHHH steps (Newton with the outer product of the per-bar scores, which `arch` also uses for its
     covariance) in (ω, α, β, ν) jointly, each with a step-length search and projection onto the bounds.
Returns are standardised by their mean square first (the fit is scale-equivariant, as `arch`'s percent scaling).
The state (next-bar variance s²_W, long-run ω/(1 − α − β), persistence α + β) gives the expected variance of
bar k ahead, L + (α + β)^(k−1)·(s²_W − L), and so the h-bar scale. Everything at an origin reads only its window,
so the tail of a series gives exactly the whole series' values; nothing is carried between origins.
"""

import math

import numpy as np

from candlecast.forecast.features import RANGE_CAP
from candlecast.timeframes import FORECAST_STEPS

NU_START = 5.0  # ν of the coarse grid (the refinement then estimates ν)
# "mle": the fit above. "grid": round 1's (variance targeting, ν = 5, the best grid point, no refinement), kept
# so that a model file trained on it (its GARCH part has no "fit") forecasts as it was scored.
FITS = ("mle", "grid")
# What `train` fits: on the walk-forward of held-out coins "grid" scored better than "mle" (4h combined pin5
# 1.942 vs 1.945; 1m garch-scale 24.01 vs 31.40, where 48 monthly returns overfit four free parameters) and
# costs 0.06-0.66 ms per origin against 1.2-16 ms.
TRAINING_FIT = "grid"
NU_BOUNDS = (2.05, 500.0)  # as `arch`'s Student-t
OMEGA_BOUNDS = (1e-8, 10.0)  # × mean r², as `arch`'s GARCH
ALPHAS = np.array([0.02, 0.05, 0.09, 0.14, 0.20, 0.28])
BETAS = np.array([0.60, 0.75, 0.85, 0.90, 0.94, 0.97, 0.985])
# The wide grid (`TimeframeConfig.garch_wide`) adds the short-memory corner, where grid fits pile up at 1m and of
# range news (α 0.28 with β 0.60 chosen at 21-30 % of 1m origins, β 0.60 at 77-83 %). β ≥ 0.45 keeps β^−W in
# float range for every lookback (W ≤ 721).
WIDE_ALPHAS = np.append(ALPHAS, [0.38, 0.50])
WIDE_BETAS = np.insert(BETAS, 0, 0.45)


def _grid(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.array([(a, b) for a in alphas for b in betas if a + b <= 0.995])
    return pairs[:, 0], pairs[:, 1]


GRID_ALPHA, GRID_BETA = _grid(ALPHAS, BETAS)
WIDE_GRID = _grid(WIDE_ALPHAS, WIDE_BETAS)


def _grid_of(wide: bool) -> tuple[np.ndarray, np.ndarray]:
    return WIDE_GRID if wide else (GRID_ALPHA, GRID_BETA)
REFINE_STEPS = 20  # at most, BHHH iterations after the grid
_TOLERANCE = 1e-7  # log-likelihood gain below which a row's fit has converged
_TRIALS = (1.0, 0.5, 0.2, 0.05)  # step fractions tried in turn along each BHHH direction
_BACKCAST_BARS, _BACKCAST_DECAY = 75, 0.94
_BLOCK = 64  # bars per block of the linear filter: β^−63 stays in float range for β ≥ _BETA_FLOOR
_BETA_FLOOR, _PERSISTENCE_CAP = 1e-3, 0.99999
STATE = ("next_variance", "long_run", "persistence")  # variances relative to σ² where stored with origins
HORIZONS = np.arange(1, FORECAST_STEPS + 1)
_CHUNK_CELLS = 1_500_000  # origins × window (× trials) evaluated at once (memory bound)


def fit_params(returns: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(m, 4) maximum-likelihood (ω, α, β, ν) of windows of one-bar log returns `returns` (m, W), oldest first, in
    the returns' own units. `valid` (m, W) marks the returns present; a row's missing returns must all come before
    its present ones. Rows need at least one present return."""
    returns = np.asarray(returns, dtype=np.float64)
    if valid is None:
        valid = np.isfinite(returns)
    out = np.empty((len(returns), 4))
    step = max(1, _CHUNK_CELLS // (len(GRID_ALPHA) * max(returns.shape[1], 1)))
    for start in range(0, len(returns), step):
        out[start : start + step] = _fit_chunk(returns[start : start + step], valid[start : start + step])
    return out


def fit_states(returns: np.ndarray, valid: np.ndarray | None = None, fit: str = TRAINING_FIT,
               news: np.ndarray | None = None, wide: bool = False) -> np.ndarray:
    """(m, 3) GARCH states (STATE) of `fit_params`' fit (or of the round-1 "grid" fit), in the returns' units
    squared. "grid" only: `news` (m, W), each bar's variance estimate driving the ARCH term instead of r² (a range
    GARCH), rescaled to the window's mean r²; `wide`, the wide grid (WIDE_GRID)."""
    returns = np.asarray(returns, dtype=np.float64)
    if valid is None:
        valid = np.isfinite(returns)
    if fit == "grid":
        grid = _grid_of(wide)
        step = max(1, _CHUNK_CELLS // (len(grid[0]) * max(returns.shape[1], 1)))
        return np.concatenate([_grid_chunk(returns[start : start + step], valid[start : start + step],
                                           None if news is None else news[start : start + step], grid)
                               for start in range(0, len(returns), step)])
    if news is not None or wide:
        raise ValueError("a range GARCH and the wide grid are fitted on the grid only")
    if fit != "mle":
        raise ValueError(f"unknown GARCH fit {fit!r}")
    params = fit_params(returns, valid)
    window = _Window(returns, valid)
    variance = _variance_path(window, params[:, :3] / np.column_stack([window.level, np.ones((len(params), 2))]))
    persistence = params[:, 1] + params[:, 2]
    return np.column_stack([variance[:, -1] * window.level, params[:, 0] / (1 - persistence), persistence])


class _Window:
    """Squared returns standardised by their mean square, with the backcast and the first present bar."""

    def __init__(self, returns: np.ndarray, valid: np.ndarray):
        squared = np.where(valid, np.square(np.where(valid, returns, 0.0)), 0.0)
        count = valid.sum(axis=1)
        self.level = np.maximum(squared.sum(axis=1) / np.maximum(count, 1), 1e-300)  # mean r² (m,)
        self.x2 = squared / self.level[:, None]
        self.valid = valid
        self.first = returns.shape[1] - count
        since = np.arange(returns.shape[1])[None, :] - self.first[:, None]
        weight = np.where((since >= 0) & (since < _BACKCAST_BARS), _BACKCAST_DECAY ** np.maximum(since, 0), 0.0)
        self.backcast = (weight * self.x2).sum(axis=1) / np.maximum(weight.sum(axis=1), 1e-300)
        index = np.arange(returns.shape[1] + 1)[None, :]
        self.at_first = index == self.first[:, None]  # (m, W+1)
        self.after_first = index > self.first[:, None]
        # r²_{i−1} for i after the first bar, the backcast at it, 0 before: the α-term of s²_i (m, W+1)
        self.prev_x2 = np.where(self.after_first, np.pad(self.x2, ((0, 0), (1, 0))), 0.0)
        self.prev_x2 = np.where(self.at_first, self.backcast[:, None], self.prev_x2)

    def take(self, rows: np.ndarray) -> "_Window":
        taken = object.__new__(_Window)
        for name, value in vars(self).items():
            taken.__dict__[name] = value[rows]
        return taken


def _filter(drive: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """y_i = drive_i + β·y_{i−1} (y_{−1} = 0) along the last axis, by blocks of closed-form cumulative sums."""
    beta = np.maximum(beta, _BETA_FLOOR)[..., None]
    out = np.empty_like(drive)
    carry = np.zeros(drive.shape[:-1])
    k = np.arange(_BLOCK, dtype=np.float64)
    for start in range(0, drive.shape[-1], _BLOCK):
        block = drive[..., start : start + _BLOCK]
        power = beta ** k[: block.shape[-1]]
        y = power * np.cumsum(block / power, axis=-1) + beta * power * carry[..., None]
        out[..., start : start + _BLOCK] = y
        carry = y[..., -1]
    return out


def _variance_path(window: _Window, params: np.ndarray) -> np.ndarray:
    """(m, W+1) s²_0..s²_W (standardised) for (ω, α, β) rows of `params` (standardised ω); 1 before the first bar."""
    omega, alpha, beta = params[:, 0:1], params[:, 1:2], params[:, 2:3]
    drive = np.where(window.after_first | window.at_first, omega, 0.0) + alpha * window.prev_x2
    drive = drive + np.where(window.at_first, beta * window.backcast[:, None], 0.0)
    path = _filter(drive, params[:, 2])
    return np.where(window.after_first | window.at_first, np.maximum(path, 1e-12), 1.0)


def _lgamma(x: np.ndarray) -> np.ndarray:
    z = x + 8.0
    stirling = (z - 0.5) * np.log(z) - z + 0.5 * math.log(2 * math.pi) + 1 / (12 * z) - 1 / (360 * z**3) \
        + 1 / (1260 * z**5)
    return stirling - np.log(np.prod(x[..., None] + np.arange(8.0), axis=-1))


def _digamma(x: np.ndarray) -> np.ndarray:
    z = x + 8.0
    series = np.log(z) - 1 / (2 * z) - 1 / (12 * z**2) + 1 / (120 * z**4) - 1 / (252 * z**6)
    return series - np.sum(1.0 / (x[..., None] + np.arange(8.0)), axis=-1)


def _t_terms(window: _Window, variance: np.ndarray, nu: np.ndarray):
    """Per-bar t log-likelihood (m, W) (0 where no return) and e = r² / ((ν − 2)·s²)."""
    nu = nu[:, None]
    e = window.x2 / ((nu - 2) * variance[:, :-1])
    constant = _lgamma((nu + 1) / 2) - _lgamma(nu / 2) - 0.5 * np.log(np.pi * (nu - 2))
    ll = constant - 0.5 * np.log(variance[:, :-1]) - 0.5 * (nu + 1) * np.log1p(e)
    return np.where(window.valid, ll, 0.0), e


def _loglik(window: _Window, params: np.ndarray) -> np.ndarray:
    return _t_terms(window, _variance_path(window, params), params[:, 3])[0].sum(axis=1)


# The search runs in (ω, p, a, ν) with persistence p = α + β and ARCH share a = α / p: the bounds become a box.
_LOWER = np.array([OMEGA_BOUNDS[0], 0.0, 0.0, NU_BOUNDS[0]])
_UPPER = np.array([OMEGA_BOUNDS[1], _PERSISTENCE_CAP, 1.0, NU_BOUNDS[1]])


def _to_garch(search: np.ndarray) -> np.ndarray:
    persistence, share = search[:, 1], search[:, 2]
    return np.column_stack([search[:, 0], persistence * share, persistence * (1 - share), search[:, 3]])


def _bhhh_step(window: _Window, search: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One projected BHHH step, backtracking: (search params, log-likelihood), never below `current`."""
    m = len(search)
    params = _to_garch(search)
    variance = _variance_path(window, params)
    nu = params[:, 3:4]
    _, e = _t_terms(window, variance, params[:, 3])
    s2 = variance[:, :-1]
    d_variance = 0.5 / s2 * ((nu + 1) * e / (1 + e) - 1)  # ∂l_i/∂s²_i
    # ∂s²_i/∂(ω, α, β): the same recursion driven by 1, r²_{i−1} and s²_{i−1} (the backcast at the first bar)
    started = window.after_first | window.at_first
    prev_s2 = np.where(window.at_first, window.backcast[:, None], np.pad(variance[:, :-1], ((0, 0), (1, 0))))
    drives = np.stack([started * 1.0, window.prev_x2, np.where(started, prev_s2, 0.0)])
    d_omega, d_alpha, d_beta = _filter(drives, np.broadcast_to(params[:, 2], (3, m)))[..., :-1] * d_variance[None]
    persistence, share = search[:, 1:2], search[:, 2:3]
    d_nu = 0.5 * (_digamma((nu + 1) / 2) - _digamma(nu / 2)) - 0.5 / (nu - 2) - 0.5 * np.log1p(e) \
        + 0.5 * (nu + 1) * e / ((nu - 2) * (1 + e))
    scores = np.stack([d_omega, share * d_alpha + (1 - share) * d_beta, persistence * (d_alpha - d_beta), d_nu])
    scores = np.where(window.valid[None], scores, 0.0)  # (4, m, W)
    gradient = scores.sum(axis=2).T  # (m, 4)
    outer = np.einsum("imw,jmw->mij", scores, scores)
    # Projected Newton: a parameter held at its bound by the gradient is left out of the step.
    held = ((search <= _LOWER) & (gradient < 0)) | ((search >= _UPPER) & (gradient > 0))
    free = ~held
    outer = outer * (free[:, :, None] & free[:, None, :]) + np.eye(4)[None] * held[:, :, None]
    gradient = np.where(free, gradient, 0.0)
    outer += np.eye(4)[None] * (1e-9 * np.trace(outer, axis1=1, axis2=2)[:, None, None] + 1e-300)
    direction = np.linalg.solve(outer, gradient[..., None])[..., 0]
    search, current = search.copy(), current.copy()
    pending = np.arange(m)  # backtracking: shorter steps only for the rows the longer one did not improve
    for fraction in _TRIALS:
        trial = np.clip(search[pending] + fraction * direction[pending], _LOWER, _UPPER)
        ll = _loglik(window.take(pending), _to_garch(trial))
        better = np.isfinite(ll) & (ll > current[pending])
        search[pending[better]], current[pending[better]] = trial[better], ll[better]
        pending = pending[~better]
        if not len(pending):
            break
    return search, current


def _fit_chunk(returns: np.ndarray, valid: np.ndarray) -> np.ndarray:
    m, g = len(returns), len(GRID_ALPHA)
    window = _Window(returns, valid)
    grid = np.column_stack([1 - GRID_ALPHA - GRID_BETA, GRID_ALPHA, GRID_BETA, np.full(g, NU_START)])
    ll = _loglik(window.take(np.repeat(np.arange(m), g)), np.tile(grid, (m, 1))).reshape(m, g)
    ll = np.where(np.isfinite(ll), ll, -np.inf)
    best = np.argmax(ll, axis=1)
    search, current = grid[best], ll[np.arange(m), best]
    search = np.column_stack([search[:, 0], search[:, 1] + search[:, 2], search[:, 1] / (search[:, 1] + search[:, 2]),
                              search[:, 3]])
    active = np.arange(m)  # a row stops once a step gains less than _TOLERANCE (so a row fits alone as in a batch)
    for _ in range(REFINE_STEPS):
        stepped, gained = _bhhh_step(window.take(active), search[active], current[active])
        moving = gained - current[active] >= _TOLERANCE
        search[active], current[active] = stepped, gained
        active = active[moving]
        if not len(active):
            break
    return _to_garch(search) * np.column_stack([window.level, np.ones((m, 3))])


def grid_choices(returns: np.ndarray, news: np.ndarray | None = None, wide: bool = False) -> np.ndarray:
    """(m, 2) the (α, β) the grid fit ("grid") picks for each window of `returns` (m, W) (`news` and `wide` as in
    `fit_states`): where on the grid the fits land (`infra.garch_grid_use`)."""
    returns = np.asarray(returns, dtype=np.float64)
    grid = _grid_of(wide)
    best = _grid_best(returns, np.isfinite(returns), news, grid)[0]
    return np.column_stack([grid[0][best], grid[1][best]])


def _grid_chunk(returns: np.ndarray, valid: np.ndarray, news: np.ndarray | None = None,
                grid: tuple[np.ndarray, np.ndarray] = (GRID_ALPHA, GRID_BETA)) -> np.ndarray:
    best, next_variance, long_run = _grid_best(returns, valid, news, grid)
    return np.column_stack([next_variance, long_run, grid[0][best] + grid[1][best]])


def _grid_best(returns: np.ndarray, valid: np.ndarray, news: np.ndarray | None,
               grid: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The round-1 fit ("grid"): variance targeting from s²_0 = mean r², ν = 5, the best point of `grid` (α, β);
    the ARCH term driven by r², or by `news` rescaled to mean r². (index of the best point, its next-bar variance,
    the long-run variance L), each (m,)."""
    m, width = returns.shape
    squared = np.where(valid, np.square(np.where(valid, returns, 0.0)), 0.0)
    count = valid.sum(axis=1)
    long_run = np.maximum(squared.sum(axis=1) / np.maximum(count, 1), 1e-12)  # L (m,)
    if news is not None:
        # A bar's range variance above (RANGE_CAP)² × the window's mean r² and its own r² is a bad print's wick.
        news = np.minimum(np.where(valid & np.isfinite(news), news, 0.0),
                          np.maximum(squared, RANGE_CAP**2 * long_run[:, None]))
        news_level = news.sum(axis=1) / np.maximum(count, 1)
        squared = news * np.where(news_level > 0, long_run / np.maximum(news_level, 1e-300), 0.0)[:, None]
    first = width - count  # index of the first present return
    alpha, beta = grid[0][:, None], grid[1][:, None]  # (g, 1)
    index = np.arange(width + 1)
    # S_i = Σ_{j<i} β^(i−1−j)·r²_j for i = 0..W, as β^(i−1)·cumsum(β^−j·r²_j) (β ≥ 0.45, W ≤ 721: in range).
    weighted = squared[:, None, :] * beta[None] ** (-np.arange(width))[None, None, :]  # (m, g, W)
    cumulative = np.concatenate([np.zeros((m, len(beta), 1)), np.cumsum(weighted, axis=2)], axis=2)
    path_sum = cumulative * beta[None] ** (index - 1.0)[None, None, :]  # (m, g, W+1)
    since = np.maximum(index[None, :] - first[:, None], 0)  # bars since the window's first return (m, W+1)
    decay = beta[None] ** since[:, None, :]  # β^(i−first)
    level = (1 - alpha - beta)[None] / (1 - beta)[None] * (1 - decay) + decay  # s² = L·level + α·S
    variance = np.maximum(long_run[:, None, None] * level + alpha[None] * path_sum, 1e-14)
    fitted = variance[:, :, :width]
    ratio = np.square(returns)[:, None, :] / ((NU_START - 2) * fitted)
    ll = -0.5 * np.log(fitted) - 0.5 * (NU_START + 1) * np.log1p(np.where(valid[:, None, :], ratio, 0.0))
    ll = np.where(valid[:, None, :], ll, 0.0).sum(axis=2)  # (m, g)
    best = np.argmax(ll, axis=1)
    return best, variance[np.arange(m), best, width], long_run


def scale_factor(states: np.ndarray) -> np.ndarray:
    """(m, 30) g with the GARCH h-bar scale = σ·√h·g(h): √(Σ_{k≤h} expected variance of bar k / h), from states
    whose variances are relative to σ²."""
    next_variance, long_run, persistence = states[:, 0:1], states[:, 1:2], states[:, 2:3]
    cumulative = np.cumsum(persistence ** (HORIZONS - 1)[None, :], axis=1)  # Σ_{k≤h} p^(k−1)
    total = HORIZONS[None, :] * long_run + cumulative * (next_variance - long_run)
    return np.sqrt(np.maximum(total, 1e-8) / HORIZONS[None, :])


def series_states(log_close: np.ndarray, positions: np.ndarray, window: int, sigma: np.ndarray,
                  fit: str = TRAINING_FIT, news: np.ndarray | None = None, wide: bool = False) -> np.ndarray:
    """(n, 3) states at origin indices `positions` of one series, each from the ≤ `window` returns up to it, with
    variances relative to σ² at the origin (`sigma` (n,)); rows with fewer than 3 returns: σ², σ², 0 (plain σ·√h).
    `news` (one per bar, as `log_close`): the bars' range variances for a range GARCH (`fit_states`)."""
    returns = np.concatenate([[np.nan], np.diff(log_close)])
    windows = np.lib.stride_tricks.sliding_window_view(np.concatenate([np.full(window, np.nan), returns]), window)
    news_windows = None if news is None else np.lib.stride_tricks.sliding_window_view(
        np.concatenate([np.full(window, np.nan), news]), window)
    positions, sigma = np.asarray(positions), np.asarray(sigma, dtype=np.float64)
    states = np.tile(np.array([1.0, 1.0, 0.0]), (len(positions), 1))
    step = max(1, _CHUNK_CELLS // window)
    for start in range(0, len(positions), step):
        at = positions[start : start + step] + 1  # the window ending at the origin
        rows = windows[at]
        enough = np.flatnonzero(np.isfinite(rows).sum(axis=1) >= 3)
        if len(enough):
            fitted = fit_states(rows[enough], fit=fit, news=None if news is None else news_windows[at][enough],
                                wide=wide)
            variance = np.square(sigma[start + enough])
            states[start + enough] = np.column_stack([fitted[:, :2] / variance[:, None], fitted[:, 2]])
    return states
