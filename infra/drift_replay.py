"""`python -m infra.drift_replay --walk-forward WF.npz [--scale S] [--plot PNG]`: is `drift` called by chance?

Reads a walk-forward saved by `candlecast train --evaluate-only --save-walk-forward` (held-out coins, out of
sample) and folds the shipped kind's outcomes per outcome day (a candle from 1d), each (coin, origin, step)
once, as the Score function folds live ones (model_live_days). Then, over every disjoint window of that many
days (all coins):

- the share of windows `drift` (candlecast.drift.live_coverage) calls, and the share the rule before it
  (outside the band over at least 500 steps) called;
- of the windows with enough blocks for a standard error (candlecast.drift.MIN_BLOCKS), how many lie further
  from 0.80 than the t quantile `drift` uses allows, inside the band or not: with a calibrated model and an
  honest standard error, about 0.3 % of them.

A window's coverage may truly differ from the whole's (eras), so a call is not always a false alarm. With
`--scale`, the bands are narrowed (or widened) everywhere: the share called is then how soon real drift shows.
With `--daily-reads`, records of each length, one starting every 30 days, are judged after every day as GET
/health and ModelDriftAlarm read them: the share of records called at some read is the alarm's chance rate.
With `--turn-after D`, such records are the unchanged model's for D days and `--scale`'s from then on: how often
`drift` and its whole-record test alone call before the turn, and how soon after it. With `--resampled N`, those
records are N made of random 4-block pieces of the walk-forward (a block bootstrap) instead.
Prints figures; asserts nothing. A step's time is its origin's plus whole candles (a month counts 30.44 days).
"""

import argparse
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from candlecast.drift import (
    CALIBRATED,
    DRIFT_BAND,
    DRIFT_NORMAL_QUANTILE,
    block_rows,
    live_coverage,
    student_t_quantile,
)
from candlecast.forecast.features import QUANTILES
from candlecast.forecast.train import load_walk_forward
from candlecast.timeframes import nominal_seconds

OLD_MIN_STEPS = 500  # the rule before live_coverage: outside DRIFT_BAND over at least this many steps
LOWER_80, MEDIAN, UPPER_80 = (int(np.searchsorted(QUANTILES, level)) for level in (0.1, 0.5, 0.9))


def row_seconds(timeframe: str) -> int:
    """What one row of model_live_days spans: a day, or from 1d a candle."""
    return max(nominal_seconds(timeframe), 86400)


def outcome_days(path: Path, scale: float = 1.0) -> tuple[str, str, np.ndarray, np.ndarray, np.ndarray]:
    """(timeframe, kind, row index, steps, inside the 80 % band) per row (row_seconds) with any outcome; the band
    scaled about the median by `scale` (below 1: a model that has drifted too narrow)."""
    about, log_return, time, _, methods = load_walk_forward(path)
    timeframe, kind = about["timeframe"], about["kind"]
    quantiles = methods[kind][0]
    median = quantiles[..., MEDIAN]
    lower = median - scale * (median - quantiles[..., LOWER_80])
    upper = median + scale * (quantiles[..., UPPER_80] - median)
    scored = np.isfinite(log_return)
    inside = (lower <= log_return) & (log_return <= upper) & scored
    step_time = time[:, None] + np.arange(1, log_return.shape[1] + 1)[None, :] * nominal_seconds(timeframe)
    at = np.floor(step_time / row_seconds(timeframe) + 1e-6).astype(np.int64)
    first = at[scored].min()
    steps = np.bincount((at - first)[scored])
    inside_80 = np.bincount((at - first)[inside], minlength=len(steps))
    kept = np.flatnonzero(steps)
    return timeframe, kind, kept + first, steps[kept], inside_80[kept]


@dataclass(frozen=True)
class Window:
    start: datetime
    coverage: float
    margin: float | None  # the t quantile times the standard error; None with too few blocks
    called: bool  # by `drift`
    old_called: bool  # by the 500-step rule


def windows(timeframe: str, at: np.ndarray, steps: np.ndarray, inside: np.ndarray, days: float) -> list[Window]:
    """Every disjoint window of `days` (rows `at`), as `drift` and the old rule judge it."""
    length = max(1, round(days * 86400 / row_seconds(timeframe)))
    found = []
    for start in range(int(at[0]), int(at[-1]) + 1, length):
        chosen = (at >= start) & (at < start + length)
        if not chosen.any():
            continue
        live_days = list(zip(steps[chosen].tolist(), inside[chosen].tolist(), strict=True))
        live = live_coverage(timeframe, live_days)
        margin = None
        if live.standard_error is not None:
            blocks = len(live_days) // block_rows(timeframe)
            margin = student_t_quantile(DRIFT_NORMAL_QUANTILE, blocks - 1) * live.standard_error
        found.append(Window(
            start=datetime.fromtimestamp(start * row_seconds(timeframe), UTC), coverage=live.coverage_80,
            margin=margin, called=live.drifting,
            old_called=live.matured_steps >= OLD_MIN_STEPS and not DRIFT_BAND[0] <= live.coverage_80 <= DRIFT_BAND[1]))
    return found


def daily_reads(timeframe: str, at: np.ndarray, steps: np.ndarray, inside: np.ndarray, days: float,
                every_days: float = 30, turned: np.ndarray | None = None, good_days: float = 0) -> dict:
    """Live records of `days` (rows `at`), one starting every `every_days`, each judged by `drift` after every
    row as GET /health and ModelDriftAlarm read it again and again: how many records are called at some read, and
    how many reads call, by `drift` and by its whole-record test alone. Only whole records (a partial last one
    would be judged on fewer reads).

    With `turned` (inside the band per row of a drifted model), each record is the unchanged one for its first
    `good_days` and `turned` from then on: also how many records either rule called before the turn, and the days
    from the turn to each rule's first call after it (None: not called by the end)."""
    length = max(1, round(days * 86400 / row_seconds(timeframe)))
    every = max(1, round(every_days * 86400 / row_seconds(timeframe)))
    good = round(good_days * 86400 / row_seconds(timeframe))
    found = _Reads()
    for start in range(int(at[0]), int(at[-1]) + 2 - length, every):
        first = int(np.searchsorted(at, start))
        turn = int(np.searchsorted(at, start + good))
        chosen = inside[first:] if turned is None else np.concatenate([inside[first:turn], turned[turn:]])
        pairs = list(zip(steps[first:].tolist(), chosen.tolist(), strict=True))
        ends = np.searchsorted(at, np.arange(start + 1, start + length + 1)) - first
        found.judge(timeframe, pairs, ends.tolist(), good if turned is not None else None)
    return found.figures()


def resampled_reads(timeframe: str, steps: np.ndarray, inside: np.ndarray, days: float, records: int,
                    turned: np.ndarray | None = None, good_days: float = 0, seed: int = 0) -> dict:
    """As daily_reads, over `records` records each made of pieces of 4 blocks of consecutive rows (4 weeks at 1h
    and 4h, 120 candles from 1d) drawn at random from the walk-forward: a block bootstrap. A piece keeps the days'
    dependence, and the walk-forward's few years give many records that are not mostly the same days. After the
    turn, the pieces are `turned`'s at the same rows."""
    rng = np.random.default_rng(seed)
    length = max(1, round(days * 86400 / row_seconds(timeframe)))
    piece = 4 * block_rows(timeframe)
    good = round(good_days * 86400 / row_seconds(timeframe))
    found = _Reads()
    for _ in tqdm(range(records), desc=f"{days:g}-day records", unit="record", leave=False):
        rows = np.concatenate([np.arange(first, first + piece)
                               for first in rng.integers(0, len(steps) - piece, -(-length // piece))])[:length]
        chosen = inside[rows] if turned is None else np.where(np.arange(length) < good, inside[rows], turned[rows])
        found.judge(timeframe, list(zip(steps[rows].tolist(), chosen.tolist(), strict=True)),
                    list(range(1, length + 1)), good if turned is not None else None)
    return found.figures()


class _Reads:
    """Tallies of records judged by `drift` and by its whole-record test alone after each read."""

    def __init__(self) -> None:
        self.found = {"records": 0, "called_records": 0, "record_called_records": 0, "reads": 0, "called_reads": 0,
                      "record_called_reads": 0, "called_before_turn": 0, "record_called_before_turn": 0,
                      "delays": [], "record_delays": []}

    def judge(self, timeframe: str, pairs: list[tuple[int, int]], ends: list[int], turn: int | None) -> None:
        """Read the record's first `ends[i]` rows for each read i; reads after the `turn`-th are after the turn."""
        calls = record_calls = 0
        delay = record_delay = None
        before = record_before = False
        for read, end in enumerate(ends, start=1):
            live = live_coverage(timeframe, pairs[:end])
            calls += live.drifting
            record_calls += live.record_drifting
            if turn is not None:
                if read <= turn:
                    before |= live.drifting
                    record_before |= live.record_drifting
                else:
                    since = (read - turn) * row_seconds(timeframe) / 86400
                    delay = since if delay is None and live.drifting else delay
                    record_delay = since if record_delay is None and live.record_drifting else record_delay
        found = self.found
        found["records"] += 1
        found["called_records"] += calls > 0
        found["record_called_records"] += record_calls > 0
        found["reads"] += len(ends)
        found["called_reads"] += calls
        found["record_called_reads"] += record_calls
        found["called_before_turn"] += before
        found["record_called_before_turn"] += record_before
        found["delays"].append(delay)
        found["record_delays"].append(record_delay)

    def figures(self) -> dict:
        return self.found


def _called(delays: list[float | None]) -> int:
    return sum(delay is not None for delay in delays)


def _spread(delays: list[float | None]) -> str:
    """Median (p10-p90) days, a record never called counting as later than any."""
    if not _called(delays):
        return "never"
    ordered = sorted(delays, key=lambda delay: math.inf if delay is None else delay)
    median, low, high = (ordered[min(len(ordered) - 1, int(share * len(ordered)))] for share in (0.5, 0.1, 0.9))
    return f"{_days(median)} ({_days(low)}-{_days(high)})"


def _days(delay: float | None) -> str:
    return "never" if delay is None else f"{delay:.0f}"


def summary(found: list[Window]) -> dict:
    """How many windows `drift` and the old rule call, and how many of those with enough blocks for a standard
    error lie beyond the t quantile `drift` uses from 0.80."""
    judged = [window for window in found if window.margin is not None]
    coverages = [window.coverage for window in found]
    return {"windows": len(found), "judged": len(judged), "calls": sum(window.called for window in found),
            "old_calls": sum(window.old_called for window in found),
            "beyond": sum(abs(window.coverage - CALIBRATED) > window.margin for window in judged),
            "p10": float(np.percentile(coverages, 10)), "p90": float(np.percentile(coverages, 90))}


def plot(by_days: dict[float, list[Window]], title: str, path: Path) -> None:
    """One panel per window length: each window's coverage at its start, ± the margin `drift` allows, the band,
    and which windows each rule calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(by_days), 1, figsize=(11, 2.6 * len(by_days)), sharex=True, squeeze=False)
    for axis, (days, found) in zip(axes[:, 0], by_days.items(), strict=True):
        axis.axhspan(*DRIFT_BAND, color="0.92", label="band")
        axis.axhline(CALIBRATED, color="0.5", linewidth=0.8)
        judged = [window for window in found if window.margin is not None]
        axis.errorbar([window.start for window in judged], [window.coverage for window in judged],
                      yerr=[window.margin for window in judged], fmt="none", ecolor="0.6", linewidth=0.8)
        for group, style in (([w for w in found if not w.called and not w.old_called], dict(color="0.3", marker=".")),
                             ([w for w in found if w.old_called], dict(color="tab:orange", marker="o", mfc="none")),
                             ([w for w in found if w.called], dict(color="tab:red", marker="x"))):
            axis.plot([w.start for w in group], [w.coverage for w in group], linestyle="none", **style)
        axis.set_ylabel(f"{days:g}-day cov80")
    axes[0, 0].plot([], [], "o", color="tab:orange", mfc="none", label="500-step rule calls")
    axes[0, 0].plot([], [], "x", color="tab:red", label="drift calls")
    axes[0, 0].legend(loc="lower left", fontsize=8, ncols=3)
    axes[0, 0].set_title(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--walk-forward", required=True, type=Path, help="the npz train --save-walk-forward wrote")
    parser.add_argument("--days", type=float, nargs="+", default=[7, 35, 90, 365])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="scale the 80 %% bands about the median (0.7: a model drifted narrow; how often "
                             "drift is called then)")
    parser.add_argument("--plot", type=Path, help="also draw every window's coverage and the calls (PNG)")
    parser.add_argument("--daily-reads", action="store_true",
                        help="also judge records of each --days length, one starting every 30 days, after every "
                             "day (candle from 1d), as health and ModelDriftAlarm read drift again and again")
    parser.add_argument("--turn-after", type=float,
                        help="records (each --days long, one every 30 days, read daily) unchanged for this many "
                             "days, then scaled by --scale: how soon each rule calls the turn")
    parser.add_argument("--resampled", type=int, metavar="N",
                        help="with --daily-reads or --turn-after: N records of pieces of 4 blocks drawn at random "
                             "from the walk-forward (a block bootstrap) instead of the records starting every 30 "
                             "days, which share most of their days")
    args = parser.parse_args(argv)
    timeframe, kind, at, steps, inside = outcome_days(args.walk_forward, args.scale)
    title = (f"{timeframe} ({kind}{f', bands scaled by {args.scale:g}' if args.scale != 1 else ''}): "
             f"{steps.sum():,} outcomes on {len(at):,} days (candles from 1d), "
             f"80 % coverage {inside.sum() / steps.sum():.3f}")
    print(title)
    print("| window | windows | coverage p10-p90 | drift called | old rule called | with a standard error "
          "| beyond the t quantile |")
    print("|---|---|---|---|---|---|---|")
    by_days = {days: found for days in args.days if (found := windows(timeframe, at, steps, inside, days))}
    for days, found in by_days.items():
        figures = summary(found)
        share = 100 / figures["windows"]
        print(f"| {days:g} days | {figures['windows']} | {figures['p10']:.3f}-{figures['p90']:.3f} "
              f"| {figures['calls']} ({figures['calls'] * share:.0f} %) "
              f"| {figures['old_calls']} ({figures['old_calls'] * share:.0f} %) | {figures['judged']} "
              f"| {figures['beyond']} |")
    label = f"records ({args.resampled} resampled)" if args.resampled else "records (one every 30 days)"

    def reads(days: float, unchanged: np.ndarray, **turn) -> dict:
        if args.resampled:
            return resampled_reads(timeframe, steps, unchanged, days, args.resampled, **turn)
        return daily_reads(timeframe, at, steps, unchanged, days, **turn)

    if args.daily_reads and args.turn_after is None:
        print(f"\n| record | {label} | called at some read: drift; the whole record alone "
              "| reads called: drift; the whole record alone |")
        print("|---|---|---|---|")
        for days in args.days:
            if (read := reads(days, inside))["records"]:
                print(f"| {days:g} days | {read['records']} | {read['called_records']}; "
                      f"{read['record_called_records']} | {read['called_reads']:,}; "
                      f"{read['record_called_reads']:,} of {read['reads']:,} |")
    if args.turn_after is not None:
        _, _, _, _, unchanged = outcome_days(args.walk_forward)
        print(f"\nrecords unchanged for {args.turn_after:g} days, then bands scaled by {args.scale:g}, read daily")
        print(f"| record | {label} | called before the turn: drift; the whole record alone "
              "| called after it: drift; the whole record alone | days to the first call after the turn, "
              "median (p10-p90): drift; the whole record alone |")
        print("|---|---|---|---|---|")
        for days in args.days:
            read = reads(days, unchanged, turned=inside, good_days=args.turn_after)
            if read["records"]:
                print(f"| {days:g} days | {read['records']} | {read['called_before_turn']}; "
                      f"{read['record_called_before_turn']} | {_called(read['delays'])}; "
                      f"{_called(read['record_delays'])} | {_spread(read['delays'])}; "
                      f"{_spread(read['record_delays'])} |")
    if args.plot:
        plot(by_days, title, args.plot)
        print(f"drew {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
