"""80 % coverage: the one figure called `accuracy`, and when its live value says a model has drifted (no numpy)."""

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from candlecast.timeframes import FORECAST_STEPS, Timeframe, nominal_seconds

# The manifest's `accuracy` is this on the walk-forward test (held-out coins); the models row's is this live.
ACCURACY_DEFINITION = ("80 % coverage: the share of outcomes whose close fell inside the 80 % interval "
                       "(a calibrated model sits near 0.80)")
CALIBRATED = 0.80
DRIFT_BAND = (0.72, 0.88)  # drift is called only outside it: smaller departures do not matter to a user
# The standard error comes from the spread between blocks of consecutive outcome days (batch means), long enough
# to be close to independent. Outcomes at one time share every bar, outcomes up to a horizon apart share some
# (step 30 of one origin and step 1 of the origin 29 bars later end on a bar both include), and a volatile spell
# makes every band miss for days: at 1h, blocks of 30 hours were too short (infra.drift_replay: 6 of 179
# week-long windows of the held-out walk-forward beyond the t quantile, against about 0.5 by chance).
BLOCK_MIN_BARS = FORECAST_STEPS
BLOCK_MIN_DAYS = 7
MIN_BLOCKS = 5  # fewer say too little about the spread; drift is not called
# Drift is called this normal quantile (3 standard errors) from 0.80, as Student's t with one degree of freedom
# fewer than there are blocks: health is read often, so a call by chance must be rare.
DRIFT_NORMAL_QUANTILE = 3.0
# A shift after a long good record barely moves the whole record's coverage, so a CUSUM also watches the whole
# blocks (Page 1954; the tabular form of Montgomery's Introduction to Statistical Quality Control, 9.1), in standard
# deviations of the blocks' coverages. Its reference values lie halfway from 0.80 to DRIFT_BAND's edges (the
# smallest shift that matters), and its limit gives this many blocks between calls by chance for independent
# normal blocks (Siegmund's approximation: at weekly blocks, 1 % a year). It moves once a block, so reading it
# every hour adds no chances. A run it calls must also cover outside DRIFT_BAND, as the whole record must. Its
# increments and sums are capped (recent_shift), which makes chance calls rarer than this, not more frequent.
CUSUM_BLOCKS_BETWEEN_CHANCE_CALLS = 5000
# The spread is estimated from the record's own blocks; from this many it is within about 20 % (1 / sqrt(2 (n-1))).
# From 5, simulated calibrated records with weekly blocks spread 0.13 were called at the fifth in 8 of 200. A record
# shorter than this is judged as a whole.
CUSUM_MIN_BLOCKS = 13


@dataclass(frozen=True)
class Shift:
    """The run of whole blocks, up to the last, whose CUSUM calls drift."""

    coverage_80: float
    matured_steps: int
    rows: int  # outcome days, or candles from 1d


@dataclass(frozen=True)
class LiveCoverage:
    matured_steps: int
    coverage_80: float | None
    standard_error: float | None  # None with fewer than MIN_BLOCKS blocks
    record_drifting: bool  # the whole record
    shift: Shift | None = None

    @property
    def drifting(self) -> bool:
        return self.record_drifting or self.shift is not None


def block_rows(timeframe: Timeframe) -> int:
    """Rows of model_live_days per block, a row being a day or, from 1d, a candle: BLOCK_MIN_DAYS and at least
    BLOCK_MIN_BARS candles (7 days at 1h and 4h, 30 candles from 1d)."""
    bar = nominal_seconds(timeframe)
    return math.ceil(max(BLOCK_MIN_DAYS * 86400, BLOCK_MIN_BARS * bar) / max(bar, 86400))


def live_coverage(timeframe: Timeframe, days: Sequence[tuple[int, int]]) -> LiveCoverage:
    """The live 80 % coverage over a model's outcome days (in order, each (steps, inside the 80 % band)), its
    standard error, and whether it has drifted: the whole record outside DRIFT_BAND, and further from 0.80 than
    the t quantile of DRIFT_NORMAL_QUANTILE's tail times the standard error (a calibrated model is called by chance
    at most 0.3 % of the time), or a recent run of blocks (recent_shift).

    Coins move together and a volatile week misses for all of them, so windows of thousands of steps swing far
    with nothing wrong (README, the 60-hour windows' 0.55-0.95); the spread between blocks measures that, a count
    of steps does not. `python -m infra.drift_replay` replays this on a held-out walk-forward."""
    steps = sum(n for n, _ in days)
    if not steps:
        return LiveCoverage(0, None, None, False)
    coverage = sum(inside for _, inside in days) / steps
    length = block_rows(timeframe)
    blocks = len(days) // length
    if blocks < MIN_BLOCKS:
        return LiveCoverage(steps, coverage, None, False)
    bounds = [index * length for index in range(blocks)] + [len(days)]  # the last block takes the remainder
    squares = 0.0
    for start, end in itertools.pairwise(bounds):
        block = days[start:end]
        squares += (sum(inside for _, inside in block) - coverage * sum(n for n, _ in block)) ** 2
    standard_error = math.sqrt(squares * blocks / (blocks - 1)) / steps
    significant = abs(coverage - CALIBRATED) > student_t_quantile(DRIFT_NORMAL_QUANTILE, blocks - 1) * standard_error
    drifting = significant and not DRIFT_BAND[0] <= coverage <= DRIFT_BAND[1]
    return LiveCoverage(steps, coverage, standard_error, drifting, recent_shift(days, length))


def recent_shift(days: Sequence[tuple[int, int]], length: int) -> Shift | None:
    """The run of whole blocks of `length` rows over which a two-sided CUSUM of the blocks' coverages has passed its
    limit (cusum_limit), if it covers outside DRIFT_BAND. The run starts after the last block at which that side's
    sum was zero.

    Blocks start at the first row, and a block counts once a row after it exists: the last row may be today's,
    still filling hour by hour. No block adds more than half the limit, so one week (a crash) cannot call drift
    alone; and a sum holds at most half a limit past it, so once the model covers 0.80 again the call clears after
    about half a limit of blocks, not after as many as the drift lasted."""
    whole = (len(days) - 1) // length
    if whole < CUSUM_MIN_BLOCKS:
        return None
    blocks = [(sum(n for n, _ in days[start:start + length]), sum(inside for _, inside in days[start:start + length]))
              for start in range(0, whole * length, length)]
    blocks = [(n, inside) for n, inside in blocks if n]
    coverages = [inside / n for n, inside in blocks]
    if len(coverages) < 2 or not (spread := statistics.stdev(coverages)):
        return None  # every block alike: the whole record's test judges it
    allowance = (CALIBRATED - DRIFT_BAND[0]) / 2 / spread
    limit = cusum_limit(allowance)
    above = below = 0.0
    above_from = below_from = 0
    for index, coverage in enumerate(coverages):
        standardized = (coverage - CALIBRATED) / spread
        above = min(1.5 * limit, max(0.0, above + min(standardized - allowance, limit / 2)))
        below = min(1.5 * limit, max(0.0, below + min(-standardized - allowance, limit / 2)))
        above_from = index + 1 if not above else above_from
        below_from = index + 1 if not below else below_from
    for total, first in ((above, above_from), (below, below_from)):
        if total > limit:
            steps = sum(n for n, _ in blocks[first:])
            coverage = sum(inside for _, inside in blocks[first:]) / steps
            if not DRIFT_BAND[0] <= coverage <= DRIFT_BAND[1]:
                return Shift(coverage, steps, (len(blocks) - first) * length)
    return None


def drifting(days_by_timeframe: Mapping[str, Sequence[tuple[int, int]]]) -> dict[str, dict]:
    """The timeframes whose active model has drifted (live_coverage over its outcome days), with their figures and
    those of the recent run that drifted (None when only the whole record did): GET /health's `drift`, and the
    Score function's report (ModelDriftAlarm)."""
    found = {}
    for timeframe, days in days_by_timeframe.items():
        live = live_coverage(timeframe, days)
        if live.drifting:
            shift = live.shift
            found[timeframe] = {"live_coverage_80": round(live.coverage_80, 4), "matured_steps": live.matured_steps,
                                "standard_error": round(live.standard_error, 4),
                                "recent_coverage_80": None if shift is None else round(shift.coverage_80, 4),
                                "recent_steps": None if shift is None else shift.matured_steps,
                                "recent_days": None if shift is None else shift.rows}
    return found


def cusum_limit(allowance: float) -> float:
    """The limit h of a two-sided CUSUM with reference value `allowance` (standard deviations) whose in-control
    average run is CUSUM_BLOCKS_BETWEEN_CHANCE_CALLS: Siegmund's one-sided (e^(2kb) - 2kb - 1) / 2k^2 with
    b = h + 1.166, solved by bisection (two sides: half as long)."""
    one_side = 2 * CUSUM_BLOCKS_BETWEEN_CHANCE_CALLS

    def run(limit: float) -> float:
        spread = 2 * allowance * (limit + 1.166)
        return math.inf if spread > 700 else (math.exp(spread) - spread - 1) / (2 * allowance**2)  # e^709 overflows

    low, high = 0.0, 1.0
    while run(high) < one_side:
        high *= 2
    for _ in range(60):
        low, high = (low, (low + high) / 2) if run((low + high) / 2) >= one_side else ((low + high) / 2, high)
    return high


def student_t_quantile(z: float, degrees: int) -> float:
    """Student's t quantile of the normal quantile z's tail probability (Cornish-Fisher, Abramowitz and Stegun
    26.7.5: within 1 % of the exact value from 4 degrees of freedom at z = 3)."""
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / degrees + g2 / degrees**2 + g3 / degrees**3 + g4 / degrees**4
