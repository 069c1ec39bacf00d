"""Offline inner check of where the table-based models calibrate, on each pass's training coins only (within one
coin-group pass never its held-out coins, never its test time): in each walk-forward fold the table is fitted on
the training block, conformal offsets and the confidence map come from (block) its last fifth or (history) all of
it, with or without time decay, and are scored on the fold's calibration block. Prints per variant the pooled
coverage range over horizons and the mean |coverage − nominal| over folds and horizons; then the confidence maps'
(Platt, with ln h, one Platt fit per horizon, with the recent event share over h, beta) log loss, ECE, worst bin,
and mean and worst ECE over horizons.

Where the plan fits trees, the same one level down for `learned` and `combined` (`fit_models` as the walk-forward
runs it): the fold's training block splits into an inner training block and its last fifth as the inner calibration
block; the models calibrate on that block ("block") or on the history cross-fitted over K coin groups
(`TrainPlan.tree_folds`): offsets and confidence map ("history K", the map only where the plan's
`confidence_on_history`; "all K", the map too whatever the plan says), or the map alone ("map K"), and are scored on
the fold's calibration block.

With `--long-window N ...`, the same inner scoring of every kind `fit_models` fits with the features and GARCH states
rebuilt for each long window (`TimeframeConfig.long_window`, the variance target's bars; it also sets the lookback,
and so the GARCH fit's window and the σ's), the table and tree checks skipped; per pass too with `--per-pass`.
`--halflife N ...` does the same for the EWMA σ's half-life (`TimeframeConfig.halflife`), the scale of every kind.
`--set FIELD=VALUE ...` replaces fields of the timeframe's `TimeframeConfig` before any check runs: the checks of a
pass that `train.PASS_CHOICES` fits with its own configuration (its "configs") run under that configuration.
`--losses PATH` (with one `--long-window` or `--halflife` value) also saves `combined`'s loss at every scored pair,
and `--compare BASE CHALLENGER` pairs two such files origin by origin and applies the configuration rule
(`config_verdict`) per pass and over all coins.

Pooled over passes, this check is not nested in the walk-forward: the three passes hold out different coins, so the
calibration blocks scored here (a pass's training coins) are the other passes' outer test origins at the same dates
(audit M: 99.8 % of the origins scored here at 1w, 99.9 % at 1d and 99.2 % at 1m are outer test origins). A choice
made on the pooled scores is in-sample for the walk-forward's figures; one made per pass (below) is not.

With `--per-pass`, every score is also printed per coin-group pass, with the variant the plan's rule picks from
that pass's scores alone (`choice_verdict`: the tie and a noise test over calendar batches) and its overrides of the
plan: a choice made without the pass's held-out coins, which
`train.PASS_CHOICES` keeps for the walk-forward to fit that pass with (nested in coins; not in time, as each pass's
folds here reach the end of the data on its training coins).

With `--kinds`, only the choice of kind per pass: every kind `train.fit_models` fits, on the same inner folds as the
tree check, and `train.choose` on each pass's scores (`train.PASS_CHOICES`' kinds, for `train.nested_selection`).

    python -m infra.calibration_check --timeframe 1d [--trees block "history 3" "map 3" | --trees] [--trees-only]
        [--garch] [--long-window 365 182 91] [--halflife 12 6 24] [--per-pass] [--kinds] [--set halflife=2]
    python -m infra.calibration_check --timeframe 1d --halflife 3 --set garch_wide=1 --losses wide.npz
    python -m infra.calibration_check --compare grid.npz wide.npz
"""

import argparse
import sys
from dataclasses import replace

import numpy as np

from candlecast.forecast import train as T
from candlecast.forecast.comparison import batch_jackknife, batch_length, batch_t_delta
from candlecast.forecast.evaluate import (
    RELIABILITY_MIN_SHARE,
    build_origins,
    calibration_error,
    metrics,
    model_outputs,
    pin5_loss,
    reliability,
)
from candlecast.forecast.features import CONFIGS, INTERVALS, MEDIAN, ORIGIN_FEATURES
from candlecast.forecast.model import HORIZONS, ForecastModel, raw_confidence, volatility_factor, widen
from candlecast.timeframes import nominal_seconds
from infra.local_stack import SHARED_OHLCV

WEIGHTS = {"block": None, "history": np.inf, "decay 2y": 2.0, "decay 1y": 1.0, "decay 0.5y": 0.5}  # half-lives
# The table's and the map's rules (`choice_verdict`): a gain under these, or one whose interval reaches 0, keeps the
# plan's variant. The plans were chosen by the ties alone (pooled, `pick`); the noise test came later (2026-12-06).
COVERAGE_TIE, LOG_LOSS_TIE = 0.001, 0.0005
# A configuration field's challenger replaces the base value only where its paired gain in `combined`'s pin5 is at
# least CONFIG_TIE and its 95 % interval (the scorecard's batch t over calendar batches, on the same scored pairs)
# lies above 0: a gain within its own noise keeps the base value (`config_verdict`).
CONFIG_TIE = 0.002


def weights(times: np.ndarray, variant: str) -> np.ndarray:
    if WEIGHTS[variant] is None:
        return (times >= np.quantile(times, 0.8)).astype(float)
    return T.decay_weights(times, float(times.max()), WEIGHTS[variant])


def batch_coverage(q: np.ndarray, z: np.ndarray, batch: np.ndarray) -> tuple[np.ndarray, ...]:
    """(batches, known pairs, hits of the 80 % band, hits of the 95 % band): a row per batch of `batch` (n,), a
    column per horizon."""
    known = np.isfinite(z)
    hit95, hit80 = (np.where(known, (q[..., lo] <= z) & (z <= q[..., up]), False) for lo, up in INTERVALS[:2])
    ids, row = np.unique(batch, return_inverse=True)
    sums = [np.zeros((len(ids), z.shape[1])) for _ in range(3)]
    for total, values in zip(sums, (known, hit80, hit95), strict=True):
        np.add.at(total, row, values)
    return ids, *sums


def fold_coverage(batches: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`coverage` of a fold from its `batch_coverage`."""
    _, known, hit80, hit95 = (values.sum(0) for values in batches)
    count = np.maximum(known, 1)
    return known, hit80 / count, hit95 / count


def coverage_by_batch(folds: list) -> list[np.ndarray]:
    """A variant's folds (`batch_coverage` each) as [known pairs, hits 80, hits 95], arrays (batch, fold, horizon)
    over the union of their batches."""
    ids = np.unique(np.concatenate([fold[0] for fold in folds]))
    arrays = [np.zeros((len(ids), len(folds), folds[0][1].shape[1])) for _ in range(3)]
    for j, (batches, *sums) in enumerate(folds):
        for array, values in zip(arrays, sums, strict=True):
            array[np.searchsorted(ids, batches), j] = values
    return arrays


def coverage_error(totals: list[np.ndarray]) -> float:
    """`coverage_sum` from [known pairs, hits 80, hits 95] totals (fold, horizon)."""
    known, hit80, hit95 = totals
    seen = known > 0
    return float(sum(np.abs(hits[seen] / known[seen] - level).mean() for hits, level in ((hit80, 0.8), (hit95, 0.95))))


def log_loss_by_batch(p: np.ndarray, y: np.ndarray, batch: np.ndarray) -> list[np.ndarray]:
    """[summed log loss, pairs] per batch of `batch`."""
    ids, row = np.unique(batch, return_inverse=True)
    return [np.bincount(row, pair_log_loss(p, y), len(ids)), np.bincount(row, minlength=len(ids)).astype(float)]


def mean_log_loss(totals: list[np.ndarray]) -> float:
    return float(totals[0] / totals[1])


def calendar_batch(times: np.ndarray, first: float, tf: str) -> np.ndarray:
    """Each time's batch of calendar time: consecutive runs of `batch_length` bars from `first` on."""
    bar_seconds = nominal_seconds(tf)
    return np.rint((times - first) / bar_seconds).astype(np.int64) // batch_length(bar_seconds)


def choice_verdict(per_batch: dict[str, list[np.ndarray]], score, current: str, tie: float) -> tuple[str, str]:
    """The plan's rule (`pick`) with a noise test: the lowest-`score` variant replaces `current` (the plan's) only
    where it scores at least `tie` lower and that gain's 95 % interval (`batch_jackknife` over the calendar batches of
    `per_batch`, every variant's arrays on the same batches) lies above 0. (choice, why)."""
    scores = {name: score([values.sum(0) for values in arrays]) for name, arrays in per_batch.items()}
    best = min(scores, key=scores.get)
    if current not in scores or best == current:
        return best, "the plan's variant scores lowest" if best == current else "the plan's variant was not scored"
    parts = len(per_batch[current])
    gain = batch_jackknife(lambda totals: score(totals[:parts]) - score(totals[parts:]),
                           [*per_batch[current], *per_batch[best]])
    interval = gain["ci95"]
    span = "no interval" if interval is None else f"[{interval[0]:+.4f}, {interval[1]:+.4f}]"
    found = f"{best} scores {gain['value']:.4f} lower {span} over {gain['batches']} calendar batches"
    if gain["value"] < tie:
        return current, f"{found}: keeps the plan's, gain under {tie}"
    if interval is None or interval[0] <= 0:
        return current, f"{found}: keeps the plan's, the gain is within its noise"
    return best, f"{found}: takes it"


def confidence_design(raw: np.ndarray, h: np.ndarray, kind: str, recent: np.ndarray) -> np.ndarray:
    """Covariates of the map `kind`: train's Platt scaling (`TrainPlan.confidence_ln_h`), that with `recent`/h (the
    pair's `recent_event_logit`, fading with the horizon), or beta calibration."""
    if kind == "beta":
        r = np.clip(raw, 1e-4, 1 - 1e-4)
        return np.column_stack([np.log(r), -np.log(1 - r), np.ones_like(r)])
    design = T.platt_design(raw, h if kind.endswith("ln h") else None)
    return np.column_stack([design, recent / h]) if "recent/h" in kind else design


def recent_event_logit(origins, config) -> np.ndarray:
    """Per origin, the logit of (k + 1)/(n + 2): k of the last n ≤ `config.window` bars up to it moved within the
    confidence tolerance in one bar. Needs every origin of a series, consecutive (as `build_origins` makes them)."""
    share = np.empty(len(origins))
    for series in np.unique(origins.series):
        at = np.flatnonzero(origins.series == series)
        moves = origins.features[at, ORIGIN_FEATURES.index("ret1")] * origins.sigma[at]
        hits = np.cumsum(np.abs(np.expm1(moves)) <= config.tolerance)
        before = np.concatenate([np.zeros(config.window), hits])[: len(hits)]
        counts = np.minimum(np.arange(1, len(hits) + 1), config.window)
        share[at] = (hits - before + 1) / (counts + 2)
    return np.log(share / (1 - share))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeframe", required="--compare" not in sys.argv, choices=list(T.PLANS))
    parser.add_argument("--data", default=str(SHARED_OHLCV))
    parser.add_argument("--trees", nargs="*", default=["block", "history 3", "history 5", "map 3"],
                        help="calibration variants of the tree check: block, history K, all K, map K, each optionally "
                             "followed by ' + ln h' (the map with ln h as a covariate); none: skip it")
    parser.add_argument("--trees-only", action="store_true", help="skip the table-based models' check")
    parser.add_argument("--garch", action="store_true",
                        help="also score garch-scale's confidence maps (platt, platt + ln h), as fit_models fits them")
    parser.add_argument("--per-pass", action="store_true",
                        help="also score each coin-group pass alone, with the variant the plan's rule picks from it")
    parser.add_argument("--kinds", action="store_true",
                        help="only choose, per pass, the kind to ship by train.choose on its training coins")
    parser.add_argument("--long-window", nargs="+", type=int, metavar="BARS",
                        help="score every kind the plan fits with each long window instead (see above)")
    parser.add_argument("--halflife", nargs="+", type=int, metavar="BARS",
                        help="the same for each half-life of the EWMA σ (`TimeframeConfig.halflife`)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="replace fields of the timeframe's TimeframeConfig first (a pass's own configuration)")
    parser.add_argument("--losses", metavar="PATH",
                        help="with one --long-window or --halflife value: save combined's loss at every scored pair")
    parser.add_argument("--compare", nargs=2, metavar=("BASE", "CHALLENGER"),
                        help="two --losses files: the configuration rule's verdict, per pass and over all coins")
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    tf, plan = args.timeframe, T.PLANS[args.timeframe]
    CONFIGS[tf] = config = replace(CONFIGS[tf], **dict(config_field(item) for item in args.set))
    if args.set:
        print(f"{tf}: {config}")
    loaded, _ = T.load_before_holdout(args.data, tf)
    varied = [("long_window", bars) for bars in args.long_window or []] + [("halflife", bars)
                                                                            for bars in args.halflife or []]
    if args.losses and len(varied) != 1:
        parser.error("--losses needs exactly one --long-window or --halflife value")
    if varied:
        for field, bars in varied:
            CONFIGS[tf] = replace(config, **{field: bars})  # what fit_models writes into its payloads
            print(f"{tf}: {field} {bars} bars (lookback {CONFIGS[tf].lookback})")
            origins = build_origins(loaded, CONFIGS[tf])
            groups = [group[origins.series] for group in T.coin_groups(loaded, plan.coin_groups)]
            tree_check(tf, plan, origins, groups, T.series_coins(loaded), [plan_variant(plan)], args.per_pass,
                       names=None, losses=args.losses)
        return
    origins = build_origins(loaded, config)
    if args.kinds:
        kind_check(tf, loaded, origins, [group[origins.series] for group in T.coin_groups(loaded, plan.coin_groups)])
        print(f"{tf}: candles_fingerprint of the data before the holdout: {T.candles_fingerprint(loaded)}")
        return
    rng = np.random.default_rng(7)
    cover = {variant: [] for variant in WEIGHTS}
    maps = {(kind, data): [] for kind in ("platt", "platt + ln h", "platt per h", "recent/h", "recent/h + ln h",
                                          "beta") for data in ("history", "block")}
    recent = recent_event_logit(origins, config)
    first = float(origins.time.min())
    garch_maps = {(kind, data): [] for kind in ("platt", "platt + ln h") for data in ("history", "block")}
    groups = [group[origins.series] for group in T.coin_groups(loaded, plan.coin_groups)]
    if plan.learned and args.trees:
        tree_check(tf, plan, origins, groups, T.series_coins(loaded), args.trees, args.per_pass)
    if args.trees_only:
        return
    pass_of = {id(held): number for number, held in enumerate(groups, 1)}
    for held, fold in T.walk_forward_steps(tf, plan, origins, groups):
        number = pass_of[id(held)]
        in_train = ~held & (origins.time < fold.train_end)
        in_cal = ~held & (origins.time >= fold.cal_start) & (origins.time < fold.cal_end)
        train = T.purged(origins.take(in_train), fold.cal_start)
        cal = T.purged(origins.take(in_cal), fold.test_start)
        if len(train) < 100 or len(cal) == 0:
            continue
        volatility = T.fit_volatility(train, rng, T.volatility_estimates(plan), max_origins=plan.volatility_origins)
        f_train, f_cal = volatility_factor(train.features, volatility), volatility_factor(cal.features, volatility)
        z_train, z_cal = train.z / f_train, cal.z / f_cal
        table = T.empirical_quantiles(z_train, train.scale * f_train)
        at_train = np.broadcast_to(table, (len(train), *table.shape))
        for variant in WEIGHTS:
            q = T.monotone_spread(widen(table, T.conformal_offsets(at_train, z_train, weights(train.time, variant))))
            cover[variant].append((number, batch_coverage(q[None], z_cal, calendar_batch(cal.time, first, tf))))
        q = T.monotone_spread(widen(table, T.conformal_offsets(at_train, z_train, weights(train.time, "history"))))
        pairs = []
        for block, factor, x in ((train, f_train, recent[in_train]), (cal, f_cal, recent[in_cal])):
            zq = q[None] * factor[..., None]
            known = np.isfinite(block.log_return)
            hit = np.abs(np.expm1(block.log_return - block.scale * zq[..., MEDIAN])) <= config.tolerance
            pairs.append((raw_confidence(zq, block.scale, config.tolerance)[known], hit[known].astype(float),
                          np.broadcast_to(HORIZONS, known.shape)[known],
                          np.broadcast_to(block.time[:, None], known.shape)[known],
                          np.broadcast_to(x[:, None], known.shape)[known]))
        (r0, y0, h0, t0, x0), (r1, y1, h1, t1, x1) = pairs
        for kind, data in maps:
            p = np.empty(len(r1))
            for fit_at, score_at in per_horizon(h0, h1) if kind == "platt per h" else [(slice(None), slice(None))]:
                weight = weights(t0, data)[fit_at]
                theta, _ = T.logistic_fit(confidence_design(r0[fit_at], h0[fit_at], kind, x0[fit_at]),
                                          T.platt_targets(y0[fit_at], weight), weight)
                p[score_at] = 1 / (1 + np.exp(-confidence_design(r1[score_at], h1[score_at], kind, x1[score_at])
                                              @ theta))
            maps[kind, data].append((number, (p, y1, h1, calendar_batch(t1, first, tf))))
        if args.garch:
            garch_map_check(tf, train, cal, q, volatility, garch_maps)
    for number in [None, *(range(1, len(groups) + 1) if args.per_pass else [])]:
        where = "all passes" if number is None else f"pass {number} (its own training coins only)"
        print(f"{tf}, {where}: baseline offsets from the training block, scored on each fold's calibration block")
        chosen, by_batch = {}, {}
        for variant, folds in cover.items():
            here = [f for n, f in folds if number in (None, n)]
            chosen[variant], by_batch[variant] = coverage_sum(list(map(fold_coverage, here))), coverage_by_batch(here)
            print(f"  {variant:10s} {coverage_scores(list(map(fold_coverage, here)))}")
        table, why = choice_verdict(by_batch, coverage_error, table_variant(plan), COVERAGE_TIE)
        print(f"  rule picks: {table} (plan: {table_variant(plan)}; the tie alone: "
              f"{pick(chosen, table_variant(plan), COVERAGE_TIE)})  {why}")
        print(f"{tf}, {where}: confidence maps fitted on the training block, scored on each calibration block")
        losses, plain = {}, {}
        for (kind, data), folds in maps.items():
            p, y, h, batch = (np.concatenate([f[i] for n, f in folds if number in (None, n)]) for i in range(4))
            losses[f"{kind} on {data}"] = log_loss(p, y)
            if kind in ("platt", "platt + ln h"):
                plain[f"{kind} on {data}"] = log_loss_by_batch(p, y, batch)
            print(f"  {kind:15s} on {data:8s} {confidence_scores(p, y)}  {horizon_scores(p, y, h)}")
        chosen_map, why = choice_verdict(plain, mean_log_loss, map_variant(plan), LOG_LOSS_TIE)
        tie_alone = pick({key: losses[key] for key in plain}, map_variant(plan), LOG_LOSS_TIE)
        print(f"  rule picks (Platt, with or without ln h): {chosen_map} (plan: {map_variant(plan)}; the tie alone: "
              f"{tie_alone})  {why}")
        if number is not None:
            choice = overrides(plan, table, chosen_map)
            print(f"  pass {number}'s overrides of the plan (`train.PASS_CHOICES`): {choice}")
    if args.per_pass:
        print(f"{tf}: candles_fingerprint of the data before the holdout: {T.candles_fingerprint(loaded)}")
    if args.garch:
        print(f"{tf}: garch-scale's confidence maps (train.fit_garch_models, offsets from the history), scored alike")
        for (kind, data), folds in garch_maps.items():
            p, y = np.concatenate([f[0] for f in folds]), np.concatenate([f[1] for f in folds])
            print(f"  {kind:13s} on {data:8s} {confidence_scores(p, y)}")


def config_field(item: str) -> tuple[str, int | float]:
    field, _, value = item.partition("=")
    number = float(value)
    return field, int(number) if number.is_integer() else number


def per_horizon(fit_h: np.ndarray, score_h: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fitting pairs, scored pairs) of each horizon: the map "platt per h" is one Platt fit per horizon."""
    return [(fit_h == h, score_h == h) for h in HORIZONS]


def horizon_scores(p: np.ndarray, y: np.ndarray, h: np.ndarray) -> str:
    by_h = [calibration_error(p[h == k], y[h == k]) for k in HORIZONS if (h == k).any()]
    return f"per-h ECE mean {np.mean(by_h):.4f} worst {max(by_h):.4f} (h{HORIZONS[int(np.argmax(by_h))]})"


def garch_map_check(tf: str, train, cal, q: np.ndarray, volatility: dict, scores: dict) -> None:
    """garch-scale fitted by `train.fit_garch_models` on `train` (offsets on all of it), its map on the history
    (all of `train`) or the block (its last fifth), plain or with ln h; its confidence at `cal` with the hits."""
    own = ForecastModel(T.payload(tf, "baseline", baseline_q=q, volatility=volatility))
    known = np.isfinite(cal.log_return)
    for kind, data in scores:
        pairs = train if data == "history" else train.take(weights(train.time, "block") > 0)
        model = T.fit_garch_models(tf, train, train, own, map_cal={"garch-scale": pairs},
                                   ln_h={"garch-scale": kind == "platt + ln h"})["garch-scale"]
        zq, _, confidence = model_outputs(model, cal)
        hit = np.abs(np.expm1(cal.log_return - cal.scale * zq[..., MEDIAN])) <= CONFIGS[tf].tolerance
        scores[kind, data].append((confidence[known], hit[known].astype(float)))


def pair_log_loss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -(y * np.log(np.clip(p, 1e-9, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-9, 1)))


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    return float(pair_log_loss(p, y).mean())


def confidence_scores(p: np.ndarray, y: np.ndarray) -> str:
    worst = max(abs(c - o) for c, o, n in reliability(p, y) if n >= RELIABILITY_MIN_SHARE * len(p))
    return f"log loss {log_loss(p, y):.5f}  ECE {calibration_error(p, y):.4f}  worst bin {worst:.3f}"


def pick(scores: dict[str, float], current: str, tie: float) -> str:
    """The lowest-scoring variant, unless it beats `current` (the plan's) by less than `tie`."""
    best = min(scores, key=scores.get)
    return current if current in scores and scores[current] - scores[best] < tie else best


def table_variant(plan: T.TrainPlan) -> str:
    """The `WEIGHTS` variant that is `plan`'s calibration of its table-based models."""
    if not plan.calibrate_on_history:
        return "block"
    if plan.calibration_half_life is None:
        return "history"
    return f"decay {plan.calibration_half_life:g}y"


def overrides(plan: T.TrainPlan, table: str, confidence_map: str) -> dict:
    """The plan's fields that make `table` (a `WEIGHTS` variant) and `confidence_map` (as `map_variant` names it)
    its choices, where they differ from `plan`'s."""
    fields = {"calibrate_on_history": table != "block",
              "calibration_half_life": None if table in ("block", "history") else float(WEIGHTS[table]),
              "confidence_ln_h": confidence_map.startswith("platt + ln h")}
    if fields["calibrate_on_history"]:
        fields["confidence_on_history"] = confidence_map.endswith("on history")
    return {name: value for name, value in fields.items() if getattr(plan, name) != value}


def map_variant(plan: T.TrainPlan) -> str:
    """The confidence map `plan` fits on its table-based models, as the map check names it."""
    data = "history" if plan.calibrate_on_history and plan.confidence_on_history else "block"
    return f"platt{' + ln h' if plan.confidence_ln_h else ''} on {data}"


def coverage_errors(folds: list) -> tuple[float, float]:
    """Mean |cov80 − 0.8| and |cov95 − 0.95| over folds and horizons."""
    n = np.array([f[0] for f in folds])
    c80, c95 = np.array([f[1] for f in folds]), np.array([f[2] for f in folds])
    return tuple(float(np.abs(c - level)[n > 0].mean()) for c, level in ((c80, 0.8), (c95, 0.95)))


def coverage_sum(folds: list) -> float:
    return sum(coverage_errors(folds))


def coverage_scores(folds: list) -> str:
    n = np.array([f[0] for f in folds])
    c80, c95 = np.array([f[1] for f in folds]), np.array([f[2] for f in folds])
    seen = n.sum(0) > 0
    p80, p95 = ((n * c).sum(0)[seen] / n.sum(0)[seen] for c in (c80, c95))
    error80, error95 = coverage_errors(folds)
    return (f"cov80 {p80.min():.3f}-{p80.max():.3f}  cov95 {p95.min():.3f}-{p95.max():.3f}  "
            f"mean |cov80-0.8| {error80:.4f}  mean |cov95-0.95| {error95:.4f}  sum {error80 + error95:.4f}")


def tree_plan(plan: T.TrainPlan, variant: str) -> T.TrainPlan:
    """"block", "history K" (offsets and, with `confidence_on_history`, the map), "all K" (offsets and map), "map K"
    (the map only); a suffix " + ln h": the trees' maps with ln h as a covariate (`TrainPlan.tree_confidence_ln_h`),
    else without."""
    base, suffix, _ = variant.partition(" + ln h")
    plan = replace(plan, tree_confidence_ln_h=bool(suffix))
    where, _, folds = base.partition(" ")
    if where == "block":
        return replace(plan, tree_folds=0)
    return replace(plan, tree_folds=int(folds), tree_offsets_on_history=where in ("history", "all"),
                   confidence_on_history=plan.confidence_on_history or where in ("map", "all"))


def plan_variant(plan: T.TrainPlan) -> str:
    """The `tree_plan` variant that is `plan`'s own calibration of its trees."""
    if not plan.tree_folds:
        variant = "block"
    elif plan.confidence_on_history:
        variant = f"all {plan.tree_folds}" if plan.tree_offsets_on_history else f"map {plan.tree_folds}"
    else:
        variant = f"history {plan.tree_folds}"
    assert tree_plan(plan, variant) == replace(plan, tree_confidence_ln_h=False), variant
    return variant + (" + ln h" if plan.tree_confidence_ln_h else "")


def inner_folds(tf: str, plan: T.TrainPlan, origins, groups: list):
    """(pass number, inner training block, inner calibration block, scored block) of every walk-forward fold, on
    that pass's training coins only: the fold's training block splits into an inner training block and its last
    fifth, and the fold's calibration block is scored."""
    embargo = plan.embargo_bars * nominal_seconds(tf)
    pass_of = {id(held): number for number, held in enumerate(groups, 1)}
    for held, fold in T.walk_forward_steps(tf, plan, origins, groups):
        block = T.purged(origins.take(~held & (origins.time < fold.train_end)), fold.cal_start)
        scored = T.purged(origins.take(np.flatnonzero(~held & (origins.time >= fold.cal_start)
                                                      & (origins.time < fold.cal_end))[:: plan.eval_stride]),
                          fold.test_start)
        inner = T._fold_from(block.time, fold.train_end + embargo, fold.train_end + embargo + 1, embargo)
        if inner is None or len(scored) == 0:
            continue
        train = T.purged(block.take(block.time < inner.train_end), inner.cal_start)
        cal = block.take(np.flatnonzero(block.time >= inner.cal_start)[:: plan.eval_stride])
        if len(train) >= 100 and len(cal):
            yield pass_of[id(held)], train, cal, scored


def kind_check(tf: str, loaded: list, origins, groups: list) -> None:
    """Every kind `train.fit_models` fits, with each pass's own plan (`train.pass_plans`), on each fold's inner
    training block (`inner_folds`), scored on the fold's calibration block; then `train.choose` on each pass's
    pooled scores: the kind that pass ships, chosen without its held-out coins (`train.PASS_CHOICES`' kinds)."""
    config, plans = CONFIGS[tf], T.pass_plans(tf, loaded)[0]
    pooled: dict[int, dict] = {number: {} for number in range(1, len(groups) + 1)}
    for number, train, cal, scored in inner_folds(tf, T.PLANS[tf], origins, groups):
        models = T.fit_models(tf, train, cal, 0.23, plans[number - 1], np.random.default_rng(7), False,
                              coins=T.series_coins(loaded))
        pooled[number].setdefault("origins", []).append(scored)
        for name, model in models.items():
            pooled[number].setdefault(name, []).append(model_outputs(model, scored))
    bands, kinds = T.targets(tf), []
    for number, parts in pooled.items():
        if not parts:  # no evidence that any candidate beats the baseline
            kinds.append("baseline")
            print(f"{tf}, pass {number}: no fold to score; train.choose's default, the baseline")
            continue
        scored = T.concat(parts.pop("origins"))
        results = {name: metrics(scored, *(np.concatenate(x) for x in zip(*outputs, strict=True)), config.tolerance)
                   for name, outputs in parts.items()}
        print(f"{tf}, pass {number} (its own training coins only): every kind on the folds' calibration blocks "
              f"({len(scored):,} origins)")
        for name, result in results.items():
            print(f"  {name:12s} pinball skill vs baseline {result['pinball_skill']:+.4f}  coverage miss "
                  f"{T.coverage_miss(result, bands):.4f}")
        kind, reason = T.choose(results, tf)
        kinds.append(kind)
        print(f"  train.choose: {reason}")
    print(f"{tf}: each pass's kind (`train.PASS_CHOICES` kinds): {kinds}")


def tree_check(tf: str, plan: T.TrainPlan, origins, groups: list, coins: np.ndarray, variants: list[str],
               per_pass: bool = False, names: tuple[str, ...] | None = ("learned", "combined"),
               losses: str | None = None) -> None:
    """Per calibration variant (`tree_plan`), `learned` and `combined` fitted by `train.fit_models` on each fold's
    training block (its last fifth calibrating), scored on the fold's calibration block: training coins only.
    `losses`: a path to save the first variant's `combined` loss at every scored pair to (`save_losses`)."""
    config, first = CONFIGS[tf], float(origins.time.min())
    scores: dict[tuple[str, str], list] = {}
    saved, folds_of = [], {}
    for number, train, cal, scored in inner_folds(tf, plan, origins, groups):
        batch = calendar_batch(scored.time, first, tf)
        folds_of[number] = fold = folds_of.get(number, -1) + 1
        for k in variants:  # the same seed: the same volatility weights and trees, calibrated differently
            models = T.fit_models(tf, train, cal, 0.23, tree_plan(plan, k), np.random.default_rng(7), False,
                                  coins=coins)
            for name in names or models:
                q, _, confidence = model_outputs(models[name], scored)
                known = np.isfinite(scored.log_return)
                hit = np.abs(np.expm1(scored.log_return - scored.scale * q[..., MEDIAN])) <= config.tolerance
                loss = pin5_loss(scored.log_return, scored.scale[..., None] * q)
                if name == "combined" and k == variants[0]:
                    saved.append((number, fold, scored.series, scored.time, loss))
                pair_batch = np.broadcast_to(batch[:, None], known.shape)[known]
                scores.setdefault((k, name), []).append((number, (batch_coverage(q, scored.z, batch), confidence[known],
                                                                  hit[known].astype(float), loss[known], pair_batch)))
    for number in [None, *(range(1, len(groups) + 1) if per_pass else [])]:
        where = "all passes" if number is None else f"pass {number} (its own training coins only)"
        fitted = " and ".join(names or ["every kind"])
        print(f"{tf}, {where}: {fitted} fitted on each fold's training block, calibrated on its last fifth (block) or "
              "on the history cross-fitted over K coin groups, scored on the fold's calibration block")
        sums, log_losses, cover_by_batch, loss_by_batch = {}, {}, {}, {}
        for (k, name), entries in scores.items():
            here = [f for n, f in entries if number in (None, n)]
            if not here:
                continue
            folds = [fold_coverage(f[0]) for f in here]
            p, y, loss, batch = (np.concatenate([f[i] for f in here]) for i in range(1, 5))
            print(f"  {name:11s} {k:16s}  {coverage_scores(folds)}  pin5 {loss.mean():.4f}  {confidence_scores(p, y)}")
            if name == "combined":
                sums[k], log_losses[k] = coverage_sum(folds), log_loss(p, y)
                cover_by_batch[k] = coverage_by_batch([f[0] for f in here])
                loss_by_batch[k] = log_loss_by_batch(p, y, batch)
        if sums:
            own = plan_variant(plan)
            offsets, why_offsets = choice_verdict(cover_by_batch, coverage_error, own, COVERAGE_TIE)
            confidence_map, why_map = choice_verdict(loss_by_batch, mean_log_loss, own, LOG_LOSS_TIE)
            print(f"  rule picks for combined (plan: {own}): offsets by coverage {offsets} (the tie alone: "
                  f"{pick(sums, own, COVERAGE_TIE)})  {why_offsets}")
            print(f"    map by log loss {confidence_map} (the tie alone: {pick(log_losses, own, LOG_LOSS_TIE)})  "
                  f"{why_map}")
    if losses:
        save_losses(losses, tf, CONFIGS[tf], saved)


def save_losses(path: str, tf: str, config, saved: list) -> None:
    """`combined`'s pin5 loss (n, 30; NaN unknown) at every scored origin, keyed by (pass, fold, series, time)."""
    number, fold, series, time = (np.concatenate([np.full(len(s[2]), s[i]) if i < 2 else s[i] for s in saved])
                                  for i in range(4))
    np.savez_compressed(path, timeframe=tf, config=repr(config), key=pair_key(number, fold, series, time),
                        number=number, time=time, loss=np.concatenate([s[4] for s in saved]))
    print(f"{tf}: combined's loss at {len(time):,} scored origins saved to {path}")


def pair_key(number: np.ndarray, fold: np.ndarray, series: np.ndarray, time: np.ndarray) -> np.ndarray:
    """One int64 per scored origin: pass (< 8), fold (< 64), series (< 4,096), open time in seconds (< 2³²)."""
    number, fold, series, time = (np.asarray(a, dtype=np.int64) for a in (number, fold, series, time))
    if number.max(initial=0) >= 8 or fold.max(initial=0) >= 64 or series.max(initial=0) >= 4096:
        raise ValueError("too many passes, folds or series for the pair key")
    return ((number * 64 + fold) * 4096 + series) << 32 | time


def compare(base_path: str, challenger_path: str) -> None:
    """The configuration rule (`config_verdict`) on two `save_losses` files of one timeframe, paired origin by
    origin: per pass and over all coins."""
    base, challenger = np.load(base_path), np.load(challenger_path)
    tf = str(base["timeframe"])
    if str(challenger["timeframe"]) != tf:
        raise SystemExit("the two files score different timeframes")
    _, at_base, at_challenger = np.intersect1d(base["key"], challenger["key"], return_indices=True)
    sizes = f"base {len(base['key']):,}, challenger {len(challenger['key']):,}"
    print(f"{tf}: base {base['config']}\n{tf}: challenger {challenger['config']}\n"
          f"  {len(at_base):,} scored origins in both ({sizes})")
    number, time = base["number"][at_base], base["time"][at_base]
    loss_base, loss_challenger = base["loss"][at_base], challenger["loss"][at_challenger]
    for where in [None, *np.unique(number)]:
        rows = np.ones(len(number), bool) if where is None else number == where
        verdict = config_verdict(tf, loss_base[rows], loss_challenger[rows], time[rows])
        print(f"  {'all coins' if where is None else f'pass {where}':9s} {verdict['text']}")


def config_verdict(tf: str, loss_base: np.ndarray, loss_challenger: np.ndarray, times: np.ndarray) -> dict:
    """Whether a configuration field's challenger replaces its base value: Δ = pin5(base)/pin5(challenger) − 1 on
    the same scored pairs, with the scorecard's interval (`batch_t_delta`, batches of `batch_length` bars of calendar
    time: all coins and folds of a batch together). It takes only where Δ ≥ CONFIG_TIE and the interval's lower end
    is above 0; with too few batches for an interval it keeps the base value."""
    bar_seconds = nominal_seconds(tf)
    bars = np.rint((times - times.min()) / bar_seconds).astype(np.int64)
    known = np.isfinite(loss_base) & np.isfinite(loss_challenger)
    pin5 = [float(loss[known].mean()) for loss in (loss_base, loss_challenger)]
    delta = batch_t_delta(loss_challenger, loss_base, bars, batch_length(bar_seconds))
    interval = delta["ci95"]
    takes = delta["delta"] >= CONFIG_TIE and interval is not None and interval[0] > 0
    if takes:
        reason = "takes the challenger"
    elif delta["delta"] < CONFIG_TIE:
        reason = f"keeps the base: gain under {CONFIG_TIE:.1%}"
    elif interval is None:
        reason = "keeps the base: too few calendar batches for an interval"
    else:
        reason = "keeps the base: the interval reaches 0"
    span = "no interval" if interval is None else f"[{interval[0]:+.2%}, {interval[1]:+.2%}]"
    text = (f"pin5 {pin5[0]:.4f} -> {pin5[1]:.4f}  gain {delta['delta']:+.2%} {span} ({delta['blocks']} batches of "
            f"{delta['block_bars']} bars)  {reason}")
    return {"takes": takes, "delta": delta["delta"], "ci95": interval, "batches": delta["blocks"], "text": text}


if __name__ == "__main__":
    main()
