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
# A batch must also span MIN_BATCH_DAYS of calendar time. The labels are not the only tie between batches: a
# volatility regime outlasts 60 bars, and on the real walk-forward the 60-bar batch ratios Δ_g were autocorrelated
# (lag 1: +0.22 at 4h, +0.20 at 1d; external audit, issue 11), so 60 hourly bars (2.5 days) or 60 4-hour bars (10
# days) are not independent draws. A quarter is the floor declared before recomputing any interval with it (not
# tuned on the results): about the span over which crypto volatility regimes are usually described as persisting.
MIN_BATCH_DAYS = 90
MIN_BATCHES = 2  # the t interval needs q - 1 >= 1 degrees of freedom; with fewer, no interval is given
# The circular block bootstrap covered a known Δ in 52 % of synthetic samples from 2 blocks and 86 % from 20
# (tests/test_forecast_peers.py): below this many blocks it prints no interval ("too few blocks").
MIN_BLOCKS = 10
_DAY = 86400


# The walk-forward's choice of kind nested in coins (`train.nested_selection`), scored as a method of its own.
NESTED_SELECTION = "selection (nested)"


def batch_length(bar_seconds: float) -> int:
    """Bars per batch (and per bootstrap block) on a grid of `bar_seconds` bars: at least BATCH_BARS bars and at
    least MIN_BATCH_DAYS of calendar time (1h 2,160, 4h 540, 1d 90, 1w and 1m 60 bars)."""
    return max(BATCH_BARS, math.ceil(MIN_BATCH_DAYS * _DAY / bar_seconds - 1e-9))


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


def batch_jackknife(statistic, per_batch: list[np.ndarray]) -> dict:
    """`statistic` of the totals of `per_batch` (arrays (q, ...) on the same q batches of calendar time) with a 95 %
    delete-one-batch jackknife interval, θ ± t(q − 1, 0.975)·√((q − 1)/q·Σ(θ_(g) − θ̄)²) with θ_(g) the statistic
    without batch g: `batch_t_delta`'s clusters and degrees of freedom for a statistic that is no ratio of sums (a
    mean |coverage − nominal| over folds and horizons). For a mean of equal batches it is the t interval of the batch
    means. Below MIN_BATCHES, `ci95` is None."""
    from scipy import stats

    totals = [values.sum(axis=0) for values in per_batch]
    value = float(statistic(totals))
    q = len(per_batch[0])
    if q < MIN_BATCHES:
        return {"value": value, "ci95": None, "batches": q}
    left_out = np.array([statistic([total - values[g] for total, values in zip(totals, per_batch, strict=True)])
                         for g in range(q)])
    half = float(stats.t.ppf(0.975, q - 1) * np.sqrt((q - 1) / q * np.sum(np.square(left_out - left_out.mean()))))
    return {"value": value, "ci95": [value - half, value + half], "batches": q}


def _block_sums(per_bar: list[np.ndarray], block_bars: int, reps: int, seed: int) -> tuple[list[np.ndarray], int,
                                                                                             int]:
    """Circular block bootstrap of per-bar sums: (per array its resampled totals (reps, ...), blocks, length).

    Each resample joins ⌈T/L⌉ runs of L = `block_bars` consecutive bars, starting anywhere in the T bars and
    wrapping at the end (Politis & Romano 1992). `per_bar`: arrays (T,) or (T, k) on the same bars."""
    span = len(per_bar[0])
    length = min(block_bars, span)
    blocks = math.ceil(span / length)
    starts = np.random.default_rng(seed).integers(0, span, size=(reps, blocks))
    totals = []
    for values in per_bar:
        tiled = np.concatenate([values, values], axis=0)
        cumulative = np.concatenate([np.zeros((1, *values.shape[1:])), np.cumsum(tiled, axis=0)], axis=0)
        totals.append((cumulative[starts + length] - cumulative[starts]).sum(axis=1))
    return totals, blocks, length


def block_bootstrap_delta(loss_model: np.ndarray, loss_peer: np.ndarray, bars: np.ndarray,
                          block_bars: int = BLOCK_BARS, reps: int = 2000, seed: int = 11,
                          min_blocks: int = MIN_BLOCKS) -> dict:
    """Δ's 95 % circular block bootstrap interval, the interval issue 11's external re-test reports; kept beside
    `batch_t_delta` so the two tables compare. It is too narrow when the span holds few blocks (see there): with
    fewer than `min_blocks`, `ci95` is None ("too few blocks").

    Resamples join runs of `block_bars` consecutive bars (`_block_sums`), so origins whose labels overlap, and
    coins moving together, stay together.
    """
    known = np.isfinite(loss_model) & np.isfinite(loss_peer)
    bars = np.asarray(bars, dtype=np.int64) - int(np.min(bars))
    span = int(bars.max()) + 1
    per_bar = [np.bincount(bars, np.where(known, loss, 0).sum(axis=1), span) for loss in (loss_model, loss_peer)]
    length = min(block_bars, span)
    blocks = math.ceil(span / length)
    if blocks < min_blocks:
        return {"ci95": None, "blocks": blocks, "block_bars": length,
                "note": f"too few blocks ({blocks} of {length} bars; {min_blocks} needed)"}
    (model, peer), blocks, length = _block_sums(per_bar, block_bars, reps, seed)
    ratio = peer / np.maximum(model, 1e-300) - 1
    return {"ci95": [float(np.quantile(ratio, 0.025)), float(np.quantile(ratio, 0.975))], "blocks": blocks,
            "block_bars": length}


def _batch_t_ratio(numerator: np.ndarray, denominator: np.ndarray) -> tuple[float, float | None, int]:
    """(pooled ratio Σn/Σd, its cluster-robust t half-width or None below MIN_BATCHES, batches) over batches with
    Σd > 0: the interval of `batch_t_delta` for any ratio of sums (a coverage: hits over pairs)."""
    from scipy import stats

    present = denominator > 0
    q = int(present.sum())
    value = float(numerator.sum() / denominator.sum())
    if q < MIN_BATCHES:
        return value, None, q
    weight = denominator[present] / denominator.sum()
    spread = numerator[present] / denominator[present] - value
    half = float(stats.t.ppf(0.975, q - 1) * np.sqrt(q / (q - 1) * np.sum(np.square(weight * spread))))
    return value, half, q


def coverage_intervals(inside: np.ndarray, known: np.ndarray, bars: np.ndarray, length: int, reps: int = 2000,
                       seed: int = 13) -> list[dict]:
    """Per column of `inside`/`known` (n, k) (hits and known pairs of each origin, e.g. one column per horizon):
    the coverage with its 95 % interval and effective sample, over calendar time in runs of `length` bars.

    The interval is the circular block bootstrap's (blocks of `length` bars, as Δ's) when the span holds
    MIN_BLOCKS blocks, else the batch t interval (`batch_t_delta`'s, batches of at least `length` bars) when it holds
    MIN_BATCHES (clipped to [0, 1]), else none. With the bootstrap, `n_eff` = p(1 − p)/se², se the bootstrap
    standard error: the number of independent pairs that would give the same uncertainty.
    """
    bars = np.asarray(bars, dtype=np.int64) - int(np.min(bars))
    span = int(bars.max()) + 1
    hits = np.stack([np.bincount(bars, inside[:, j].astype(float), span) for j in range(inside.shape[1])], axis=1)
    pairs = np.stack([np.bincount(bars, known[:, j].astype(float), span) for j in range(known.shape[1])], axis=1)
    blocks = math.ceil(span / min(length, span))
    results = [{"coverage": float(hits[:, j].sum() / pairs[:, j].sum()) if pairs[:, j].sum() else None,
                "n_pairs": int(pairs[:, j].sum())} for j in range(hits.shape[1])]
    if blocks >= MIN_BLOCKS:
        (boot_hits, boot_pairs), blocks, length = _block_sums([hits, pairs], length, reps, seed)
        ratio = boot_hits / np.maximum(boot_pairs, 1e-300)
        for j, item in enumerate(results):
            if item["coverage"] is None:
                continue
            low, high = (float(v) for v in np.quantile(ratio[:, j], [0.025, 0.975]))
            se = float(np.std(ratio[:, j]))
            item |= {"ci95": [low, high], "method": f"block bootstrap, {blocks} blocks of {length} bars",
                     "n_eff": _n_eff(item["coverage"], se, item["n_pairs"])}
        return results
    count = max(span // length, 1)
    batch = np.minimum(np.arange(span) * count // span, count - 1)
    for j, item in enumerate(results):
        if item["coverage"] is None:
            continue
        value, half, q = _batch_t_ratio(np.bincount(batch, hits[:, j], count), np.bincount(batch, pairs[:, j], count))
        if half is None:
            item |= {"ci95": None, "note": f"too few blocks ({blocks} of {length} bars) and batches ({q}; "
                                           f"{MIN_BATCHES} needed)"}
            continue
        # no n_eff here: from a handful of batches the spread is itself too noisy to count pairs by
        item |= {"ci95": [max(value - half, 0.0), min(value + half, 1.0)],
                 "method": f"batch t, {q} batches of >= {length} bars (too few blocks for the bootstrap)"}
    return results


def _n_eff(coverage: float, se: float, pairs: int) -> float:
    return float(pairs) if se <= 0 else float(min(pairs, coverage * (1 - coverage) / se ** 2))


def compare_methods(log_return: np.ndarray, times: np.ndarray, methods: dict, tolerance: float, bar_seconds: float,
                    reference: str, chance_reps: int = 50, fallback: dict | None = None) -> dict:
    """Scores of every method at the same origins, and each one's Δ against `reference` (the model).

    `methods`: name -> (log_quantiles (n, 30, 7), confidence (n, 30)). Δ's interval: `batch_t_delta` on
    the origins' bars (calendar time in units of `bar_seconds`, rounded: months vary in length), batches of
    `batch_length` bars, with the block bootstrap's beside it (`bootstrap`, blocks of the same length). For
    `reference` also coverage's interval per horizon and overall, coverage per calendar year of origin
    (`coverage_uncertainty`) and its per-horizon ECE against the chance level (`ece_chance`).

    `fallback`: name -> (n,) mask of the origins where that peer gave no forecast of its own but a fallback (GARCH-t's
    t(5) on the sample variance: `peers.garch_t`). A Δ pooled over those is partly Δ against the fallback; so the
    peer gets `n_fallback` and `fallback_share` (of the origins with an outcome) and `vs_<reference>_fitted`, Δ
    with the same intervals on the other origins only.
    """
    times = np.asarray(times, dtype=np.float64)
    bars = np.rint((times - times.min()) / bar_seconds).astype(np.int64) if len(times) else times.astype(np.int64)
    length = batch_length(bar_seconds)
    y = np.where(np.isfinite(log_return), log_return, 0.0)
    losses = {name: np.where(np.isfinite(log_return), pin5_loss(y, q), np.nan) for name, (q, _) in methods.items()}
    result = {name: method_scores(log_return, q, confidence, tolerance, times)
              for name, (q, confidence) in methods.items()}
    for name in methods:
        if name != reference:
            result[name]["vs_" + reference] = batch_t_delta(losses[reference], losses[name], bars, length) | {
                "bootstrap": block_bootstrap_delta(losses[reference], losses[name], bars, length)}
    for name, mask in (fallback or {}).items():
        if name == reference or name not in methods:
            continue
        result[name] |= fallback_scores(losses[reference], losses[name], bars, length, np.asarray(mask, dtype=bool),
                                        np.isfinite(log_return).any(axis=1), reference)
    q, confidence = methods[reference]
    result[reference]["coverage_uncertainty"] = coverage_uncertainty(log_return, q, times, bars, length)
    result[reference]["ece_chance"] = ece_chance(log_return, q, confidence, tolerance, reps=chance_reps)
    peers = [name for name in methods if name != reference]
    best = min(peers, key=lambda name: result[name]["pin5"]) if peers else None
    return {"reference": reference, "best_peer": best, "block_seconds": length * bar_seconds,
            "bar_seconds": bar_seconds, "batch_bars": length, "methods": result}


def fallback_scores(loss_model: np.ndarray, loss_peer: np.ndarray, bars: np.ndarray, length: int,
                    fell_back: np.ndarray, scored: np.ndarray, reference: str) -> dict:
    """{"n_fallback", "fallback_share": origins (with an outcome) where the peer fell back, and their share of those;
    "vs_<reference>_fitted": Δ with
    `batch_t_delta`'s and the bootstrap's intervals over the origins where it did not}."""
    fitted = scored & ~fell_back
    count = int((scored & fell_back).sum())
    result = {"n_fallback": count, "fallback_share": count / int(scored.sum()) if scored.any() else None}
    if not fitted.any():
        return result | {"vs_" + reference + "_fitted": None}
    rows = np.flatnonzero(fitted)
    delta = batch_t_delta(loss_model[rows], loss_peer[rows], bars[rows], length) | {
        "bootstrap": block_bootstrap_delta(loss_model[rows], loss_peer[rows], bars[rows], length),
        "n_origins": int(rows.size)}
    return result | {"vs_" + reference + "_fitted": delta}


def coverage_uncertainty(log_return: np.ndarray, log_quantiles: np.ndarray, times: np.ndarray, bars: np.ndarray,
                         length: int) -> dict:
    """Coverage (80 and 95 %) with `coverage_intervals`' interval and effective sample: overall, per horizon, and
    per calendar year of origin (UTC; with origins and pairs). Eras pool years; a year that over-covers hides one
    that under-covers, so the years are reported one by one."""
    from datetime import UTC, datetime

    known = np.isfinite(log_return)
    y = np.where(known, log_return, 0.0)
    inside = {"80": (log_quantiles[..., 1] <= y) & (y <= log_quantiles[..., 5]) & known,
              "95": (log_quantiles[..., 0] <= y) & (y <= log_quantiles[..., 6]) & known}
    result = {"per_horizon": {}, "overall": {}, "years": {}}
    for level, hits in inside.items():
        result["per_horizon"][level] = coverage_intervals(hits, known, bars, length)
        result["overall"][level] = coverage_intervals(hits.sum(axis=1, keepdims=True), known.sum(axis=1, keepdims=True),
                                                      bars, length)[0]
    years = np.array([datetime.fromtimestamp(float(t), UTC).year for t in times]) if len(times) else np.array([])
    for year in np.unique(years):
        rows = (years == year) & known.any(axis=1)
        if not rows.any():
            continue
        item = {"n_origins": int(rows.sum()), "n_pairs": int(known[rows].sum())}
        for level, hits in inside.items():
            item[level] = coverage_intervals(hits[rows].sum(axis=1, keepdims=True),
                                             known[rows].sum(axis=1, keepdims=True), bars[rows], length)[0]
        result["years"][str(int(year))] = item
    return result


def ece_chance(log_return: np.ndarray, log_quantiles: np.ndarray, confidence: np.ndarray, tolerance: float,
               reps: int = 50, seed: int = 17) -> dict:
    """Confidence ECE per horizon and pooled, each beside its chance level: the mean ECE of a perfectly calibrated
    forecaster with the same predicted probabilities and number of pairs (hits drawn as Bernoulli(confidence),
    `reps` draws, fixed seed). An ECE near its chance level is noise; the pooled ECE can hide a horizon far above
    it, so the largest per-horizon ECE is reported too, beside its horizon's chance level and `worst_chance`, the
    expected largest of the per-horizon chance ECEs (the same draws): the worst of 30 exceeds its own level by chance.
    Hits are drawn independently; real ones are not (horizons overlap, coins move together), so these levels are
    lower than a calibrated forecaster's chance ECE on the real pairs."""
    from candlecast.forecast.evaluate import calibration_error
    from candlecast.forecast.features import QUANTILES

    known = np.isfinite(log_return)
    y = np.where(known, log_return, 0.0)
    hit = (np.abs(np.expm1(y - log_quantiles[..., len(QUANTILES) // 2])) <= tolerance).astype(float)
    rng = np.random.default_rng(seed)
    per_ece, per_chance, draws = [], [], []
    for i in range(known.shape[1]):
        rows = known[:, i]
        if not rows.any():
            per_ece.append(None)
            per_chance.append(None)
            continue
        per_ece.append(calibration_error(confidence[rows, i], hit[rows, i]))
        draws.append(chance_draws(confidence[rows, i], rng, reps))
        per_chance.append(float(draws[-1].mean()))
    pooled_chance = chance_ece(confidence[known], rng, reps)
    measured_ece = [(value, i) for i, value in enumerate(per_ece) if value is not None]
    worst, at = max(measured_ece) if measured_ece else (None, None)
    return {"per_horizon_ece": per_ece, "per_horizon_chance": per_chance,
            "pooled": calibration_error(confidence[known], hit[known]), "pooled_chance": pooled_chance,
            "max_ece": worst, "max_h": None if at is None else at + 1,
            "max_chance": None if at is None else per_chance[at],
            "worst_chance": float(np.max(draws, axis=0).mean()) if draws else None, "reps": reps, "seed": seed}


def chance_ece(confidence: np.ndarray, rng: np.random.Generator, reps: int) -> float:
    """The expected ECE (10 bins) of hits drawn as Bernoulli(`confidence`): a calibrated forecaster's ECE by chance."""
    return float(chance_draws(confidence, rng, reps).mean())


def chance_draws(confidence: np.ndarray, rng: np.random.Generator, reps: int) -> np.ndarray:
    """(reps,) ECEs (10 bins) of hits drawn as Bernoulli(`confidence`), `reps` independent draws."""
    from candlecast.forecast.evaluate import _BINS

    bins = np.minimum((confidence * _BINS).astype(int), _BINS - 1)
    expected = np.bincount(bins, confidence, _BINS)
    out = np.empty(reps)
    for k in range(reps):
        drawn = np.bincount(bins, (rng.random(len(confidence)) < confidence).astype(float), _BINS)
        out[k] = np.abs(expected - drawn).sum() / len(confidence)
    return out


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
