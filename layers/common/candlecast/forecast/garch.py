"""GARCH(1,1) of a series' own recent returns, fitted at every origin in numpy (inference-safe: numpy only).

At an origin the last W one-bar log returns r_0..r_{W−1} (W = the window; fewer early in a series) give, for each
(α, β) of a fixed grid, the GARCH(1,1) variance path with variance targeting (ω = (1 − α − β)·L, L = mean r² of
the window, started at L):
    s²_i = ω + α·r²_{i−1} + β·s²_{i−1},   s²_0 = L
and the Student-t (ν = NU) log-likelihood Σ_i log t(r_i; s²_i). The grid point with the highest likelihood is
the fit: a per-series quasi-maximum-likelihood estimate, as `arch` would make, in a few hundred microseconds
and with no optimiser. The state (next-bar variance s²_W, long-run L, persistence α + β) gives the expected
variance of bar k ahead, L + (α + β)^(k−1)·(s²_W − L), and so the h-bar scale.
Everything at an origin reads only its window, so the tail of a series gives exactly the whole series' values.
"""

import numpy as np

from candlecast.timeframes import FORECAST_STEPS

NU = 5.0  # the likelihood's t degrees of freedom (robust to crypto's fat tails; the quantiles are fitted apart)
ALPHAS = np.array([0.02, 0.05, 0.09, 0.14, 0.20, 0.28])
BETAS = np.array([0.60, 0.75, 0.85, 0.90, 0.94, 0.97, 0.985])
_PAIRS = np.array([(a, b) for a in ALPHAS for b in BETAS if a + b <= 0.995])
GRID_ALPHA, GRID_BETA = _PAIRS[:, 0], _PAIRS[:, 1]
STATE = ("next_variance", "long_run", "persistence")  # variances relative to σ² where stored with origins
HORIZONS = np.arange(1, FORECAST_STEPS + 1)
_CHUNK_CELLS = 3_000_000  # origins × grid × window evaluated at once (memory bound)


def fit_states(returns: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(m, 3) GARCH states (STATE) from windows of one-bar log returns `returns` (m, W), oldest first.

    `valid` (m, W) marks the returns present; a row's missing returns must all come before its present ones.
    """
    returns = np.asarray(returns, dtype=np.float64)
    if valid is None:
        valid = np.isfinite(returns)
    out = np.empty((len(returns), len(STATE)))
    step = max(1, _CHUNK_CELLS // (len(GRID_ALPHA) * max(returns.shape[1], 1)))
    for start in range(0, len(returns), step):
        out[start : start + step] = _fit_chunk(returns[start : start + step], valid[start : start + step])
    return out


def _fit_chunk(returns: np.ndarray, valid: np.ndarray) -> np.ndarray:
    m, width = returns.shape
    squared = np.where(valid, np.square(np.where(valid, returns, 0.0)), 0.0)
    count = valid.sum(axis=1)
    long_run = np.maximum(squared.sum(axis=1) / np.maximum(count, 1), 1e-12)  # L (m,)
    first = width - count  # index of the first present return
    alpha, beta = GRID_ALPHA[:, None], GRID_BETA[:, None]  # (g, 1)
    index = np.arange(width + 1)
    # S_i = Σ_{j<i} β^(i−1−j)·r²_j for i = 0..W, as β^(i−1)·cumsum(β^−j·r²_j) (β ≥ 0.6, W ≤ 1000: in range).
    weighted = squared[:, None, :] * beta[None] ** (-np.arange(width))[None, None, :]  # (m, g, W)
    cumulative = np.concatenate([np.zeros((m, len(beta), 1)), np.cumsum(weighted, axis=2)], axis=2)
    path_sum = cumulative * beta[None] ** (index - 1.0)[None, None, :]  # (m, g, W+1)
    since = np.maximum(index[None, :] - first[:, None], 0)  # bars since the window's first return (m, W+1)
    decay = beta[None] ** since[:, None, :]  # β^(i−first)
    level = (1 - alpha - beta)[None] / (1 - beta)[None] * (1 - decay) + decay  # s² = L·level + α·S
    variance = np.maximum(long_run[:, None, None] * level + alpha[None] * path_sum, 1e-14)
    fitted = variance[:, :, :width]
    ratio = np.square(returns)[:, None, :] / ((NU - 2) * fitted)
    ll = -0.5 * np.log(fitted) - 0.5 * (NU + 1) * np.log1p(np.where(valid[:, None, :], ratio, 0.0))
    ll = np.where(valid[:, None, :], ll, 0.0).sum(axis=2)  # (m, g)
    best = np.argmax(ll, axis=1)
    rows = np.arange(m)
    return np.column_stack([variance[rows, best, width], long_run, GRID_ALPHA[best] + GRID_BETA[best]])


def scale_factor(states: np.ndarray) -> np.ndarray:
    """(m, 30) g with the GARCH h-bar scale = σ·√h·g(h): √(Σ_{k≤h} expected variance of bar k / h), from states
    whose variances are relative to σ²."""
    next_variance, long_run, persistence = states[:, 0:1], states[:, 1:2], states[:, 2:3]
    cumulative = np.cumsum(persistence ** (HORIZONS - 1)[None, :], axis=1)  # Σ_{k≤h} p^(k−1)
    total = HORIZONS[None, :] * long_run + cumulative * (next_variance - long_run)
    return np.sqrt(np.maximum(total, 1e-8) / HORIZONS[None, :])


def series_states(log_close: np.ndarray, positions: np.ndarray, window: int, sigma: np.ndarray) -> np.ndarray:
    """(n, 3) states at origin indices `positions` of one series, each from the ≤ `window` returns up to it, with
    variances relative to σ² at the origin (`sigma` (n,)); rows with fewer than 3 returns: σ², σ², 0 (plain σ·√h)."""
    returns = np.concatenate([[np.nan], np.diff(log_close)])
    windows = np.lib.stride_tricks.sliding_window_view(np.concatenate([np.full(window, np.nan), returns]), window)
    positions, sigma = np.asarray(positions), np.asarray(sigma, dtype=np.float64)
    states = np.tile(np.array([1.0, 1.0, 0.0]), (len(positions), 1))
    step = max(1, _CHUNK_CELLS // window)
    for start in range(0, len(positions), step):
        rows = windows[positions[start : start + step] + 1]  # the window ending at the origin
        enough = np.flatnonzero(np.isfinite(rows).sum(axis=1) >= 3)
        if len(enough):
            fitted = fit_states(rows[enough])
            variance = np.square(sigma[start + enough])
            states[start + enough] = np.column_stack([fitted[:, :2] / variance[:, None], fitted[:, 2]])
    return states
