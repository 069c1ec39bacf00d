"""The walk-forward comparison of a model with its peers on the same origins, and Δ's intervals (offline only:
scipy; the Score function ships `evaluate`, not this)."""

import math

import numpy as np

from candlecast.forecast.evaluate import method_scores, pin5_loss

BLOCK_BARS = 30  # the longest label: origins closer than this share outcome candles
# Δ's interval treats batches of calendar time as independent. Adjacent 30-bar batches are not: an origin near a
# batch's end reads outcomes in the next one. At twice the longest label the intervals covered Δ at the nominal
# rate on synthetic losses with that overlap (tests/test_forecast_peers.py); at 30 bars they covered 0.87-0.90.
BATCH_BARS = 2 * BLOCK_BARS
MIN_BATCHES = 2  # the t interval needs q - 1 >= 1 degrees of freedom; with fewer, no interval is given


def batch_t_delta(loss_model: np.ndarray, loss_peer: np.ndarray, bars: np.ndarray,
                  batch_bars: int = BATCH_BARS) -> dict:
    """Δ = pin5(peer) / pin5(model) − 1 with a 95 % interval from batches of calendar time (> 0: the model is ahead).

    `loss_*` (n, 30) per-pair losses (NaN unknown); `bars` (n,) each origin's bar on the calendar grid. The T bars
    of the test span are cut into q = ⌊T/L⌋ consecutive batches of at least L = `batch_bars` bars; all coins of a
    batch stay together (coins move together, and overlapping labels tie neighbouring origins). Δ is the pooled
    ratio, Δ = Σ w_g·Δ_g with Δ_g a batch's own ratio and w_g its share of the model's loss; the interval is
    Δ ± t(q − 1, 0.975)·√(q/(q − 1)·Σ w_g²·(Δ_g − Δ)²): the cluster-robust variance with the batches as
    clusters and q − 1 degrees of freedom (Cameron & Miller 2015, "A practitioner's guide to cluster-robust
    inference"); with equal weights it is the t-test on the batch estimates of Ibragimov & Müller (2010,
    "t-statistic based correlation and heterogeneity robust inference"), valid at the 5 % level from q = 2 on.
    Its width grows as the batches run out (t(1, 0.975) = 12.7) instead of looking precise: a circular block
    bootstrap of the same synthetic losses covered Δ in 52 % of samples from 2 blocks and 86 % from 20. Below
    MIN_BATCHES, `ci95` is None ("too few batches"). Resampling coins within periods is no way out: it holds the
    periods fixed, and coins move together, so it would measure other coins in the same months, not other months.
    """
    from scipy import stats

    known = np.isfinite(loss_model) & np.isfinite(loss_peer)
    bars = np.asarray(bars, dtype=np.int64) - int(np.min(bars))
    span = int(bars.max()) + 1
    count = max(span // batch_bars, 1)
    batch = np.minimum(bars * count // span, count - 1)
    model, peer = (np.bincount(batch, np.where(known, loss, 0).sum(axis=1), count) for loss in (loss_model, loss_peer))
    delta = float(peer.sum() / model.sum() - 1)
    present = model > 0
    q = int(present.sum())
    result = {"delta": delta, "ci95": None, "blocks": q, "block_bars": int(span // count),
              "method": "cluster-robust t over calendar batches"}
    if q < MIN_BATCHES:
        return result | {"note": f"too few batches ({q} of >= {batch_bars} bars; {MIN_BATCHES} needed)"}
    weight = model[present] / model.sum()
    spread = peer[present] / model[present] - 1 - delta
    half = float(stats.t.ppf(0.975, q - 1) * np.sqrt(q / (q - 1) * np.sum(np.square(weight * spread))))
    return result | {"ci95": [delta - half, delta + half]}


def block_bootstrap_delta(loss_model: np.ndarray, loss_peer: np.ndarray, bars: np.ndarray,
                          block_bars: int = BLOCK_BARS, reps: int = 2000, seed: int = 11) -> dict:
    """Δ's 95 % circular block bootstrap interval, the interval issue 11's external re-test reports; kept beside
    `batch_t_delta` so the two tables compare. It is too narrow when the span holds few blocks (see there).

    Each resample joins ⌈T/L⌉ runs of L = `block_bars` consecutive bars, starting anywhere in the T bars of the
    test span and wrapping at its end (Politis & Romano 1992), so origins whose labels overlap, and coins moving
    together, stay together.
    """
    known = np.isfinite(loss_model) & np.isfinite(loss_peer)
    bars = np.asarray(bars, dtype=np.int64) - int(np.min(bars))
    span = int(bars.max()) + 1
    per_bar = [np.bincount(bars, np.where(known, loss, 0).sum(axis=1), span) for loss in (loss_model, loss_peer)]
    model_sum, peer_sum = (np.concatenate([[0.0], np.cumsum(np.tile(values, 2))]) for values in per_bar)
    length = min(block_bars, span)
    blocks = math.ceil(span / length)
    starts = np.random.default_rng(seed).integers(0, span, size=(reps, blocks))
    model = (model_sum[starts + length] - model_sum[starts]).sum(axis=1)
    peer = (peer_sum[starts + length] - peer_sum[starts]).sum(axis=1)
    ratio = peer / np.maximum(model, 1e-300) - 1
    return {"ci95": [float(np.quantile(ratio, 0.025)), float(np.quantile(ratio, 0.975))], "blocks": blocks,
            "block_bars": length}


def compare_methods(log_return: np.ndarray, times: np.ndarray, methods: dict, tolerance: float, bar_seconds: float,
                    reference: str) -> dict:
    """Scores of every method at the same origins, and each one's Δ against `reference` (the model).

    `methods`: name -> (log_quantiles (n, 30, 7), confidence (n, 30)). Δ's interval: `batch_t_delta` on
    the origins' bars (calendar time in units of `bar_seconds`, rounded: months vary in length), with the block
    bootstrap's beside it (`bootstrap`).
    """
    times = np.asarray(times, dtype=np.float64)
    bars = np.rint((times - times.min()) / bar_seconds).astype(np.int64) if len(times) else times.astype(np.int64)
    y = np.where(np.isfinite(log_return), log_return, 0.0)
    losses = {name: np.where(np.isfinite(log_return), pin5_loss(y, q), np.nan) for name, (q, _) in methods.items()}
    result = {name: method_scores(log_return, q, confidence, tolerance, times)
              for name, (q, confidence) in methods.items()}
    for name in methods:
        if name != reference:
            result[name]["vs_" + reference] = batch_t_delta(losses[reference], losses[name], bars) | {
                "bootstrap": block_bootstrap_delta(losses[reference], losses[name], bars)}
    peers = [name for name in methods if name != reference]
    best = min(peers, key=lambda name: result[name]["pin5"]) if peers else None
    return {"reference": reference, "best_peer": best, "block_seconds": BATCH_BARS * bar_seconds, "methods": result}


SERIES_KEYS = ("pin5", "coverage_80", "coverage_95", "n_origins")


def per_series_scores(log_return: np.ndarray, times: np.ndarray, methods: dict, tolerance: float,
                      series: np.ndarray, names: list[str]) -> dict:
    """{series name: {method: pin5, coverage and origins}} over each series' own origins (`series` (n,) indexes
    `names`): one coin's figures are a few regimes, so they carry no interval; the pooled Δ is the one to read."""
    result = {}
    for index in np.unique(series):
        rows = series == index
        if not np.isfinite(log_return[rows]).any():
            continue
        scores = {name: method_scores(log_return[rows], q[rows], confidence[rows], tolerance, times[rows])
                  for name, (q, confidence) in methods.items()}
        result[names[int(index)]] = {name: {key: each[key] for key in SERIES_KEYS} for name, each in scores.items()}
    return result
