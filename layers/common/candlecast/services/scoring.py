"""Scoring matured prediction steps against the stored candles (the Score function and the seed; numpy).

A step has matured when the candle that opens at its ts is stored (ingest stores closed candles only). A candle
that `usable_candles` drops as a bad print (`candles.bad_prints`) is no outcome: the forecaster never uses it, and
scored it would stand in the track record for good, so its step stays unscored (counted in the report's
`bad_prints`) and due, scored if a fixed file brings a usable candle, given up with the scoring window as a step
whose candle never came. For each scored step it records the realised close, whether it fell inside the 80 % and
95 % intervals, whether the confidence event |C/Ĉ − 1| ≤ τ happened, and the pin5 loss (mean pinball loss over the
quantiles 0.025, 0.1, 0.5, 0.9 and 0.975, in % log return) of the step's stored quantiles and of the model's own
baseline at the same origin.

Work goes in batches of predictions in series order (ticker, timeframe, id), so each candle file is read once;
a file that cannot be read is not tried again in the run, and its series' other predictions are skipped. A run
stops at its time budget, between two predictions, records what it has done and returns a continuation (the last
prediction done), which the Score function hands to a new invocation of itself.
"""

import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

import numpy as np
import psycopg
from aws_lambda_powertools import Logger
from pydantic import AwareDatetime, Field, ValidationInfo, field_validator

from candlecast import cache, db, storage
from candlecast.candles import bad_prints, usable_candles
from candlecast.drift import drifting
from candlecast.errors import CandlecastError, Conflict
from candlecast.forecast.evaluate import PIN5_LEVELS, pin5_loss
from candlecast.forecast.features import QUANTILES, origin_features
from candlecast.repositories import scores as score_repository
from candlecast.repositories import symbols as symbol_repository
from candlecast.schemas import InvocationEvent
from candlecast.services.model_loading import verified_model
from candlecast.tickers import MAX_TICKER_LENGTH
from candlecast.timeframes import Timeframe

logger = Logger(child=True)

BATCH_PREDICTIONS = 200
SCORING_WINDOW = timedelta(days=45)  # the SQL of repositories/scores.py says the same
# The stored quantiles of a step, in PIN5_LEVELS order, and the same levels' columns of the model's quantiles.
STEP_QUANTILES = ("lower_95", "lower_80", "close", "upper_80", "upper_95")
_PIN5_COLUMNS = np.array([int(np.flatnonzero(np.isclose(QUANTILES, level))[0]) for level in PIN5_LEVELS])
_CANDLE_FILES_KEPT = 32
EVERYTHING_SINCE = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class ScoreReport:
    predictions: int = 0
    scored: int = 0  # steps newly scored by this run
    unmatured: int = 0  # steps whose candle is not stored yet
    bad_prints: int = 0  # steps whose candle is a bad print (candles.bad_prints): not scored from it, still due
    failed: list[str] = field(default_factory=list)
    skipped: int = 0  # predictions not tried: their candle file or their model failed earlier in the run
    unreadable_files: list[str] = field(default_factory=list)  # "ticker timeframe: why", once per file
    unusable_models: list[str] = field(default_factory=list)  # "timeframe name version: why", once per model
    batches: int = 0
    seconds: float = 0.0
    continuation: dict | None = None
    accuracy_error: str | None = None  # why models.accuracy was not brought up to date by this run
    # Hours from the newest candle the refresh stored (any active symbol and timeframe) to the run's now: past a
    # week, the weekly refresh stored nothing (StaleCandlesAlarm). None: no refresh has recorded one.
    stored_candles_age_hours: float | None = None
    # The timeframes whose active model has drifted (candlecast.drift; GET /health's `drift`), judged once the run's
    # scores are recorded (ModelDriftAlarm). None: a chunk that hands on its continuation (its time is spent), or
    # the database could not be read for it.
    drifting: dict[str, dict] | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def pin5(log_outcome: np.ndarray, log_pin5_quantiles: np.ndarray) -> np.ndarray:
    """The backtest's pin5 (forecast.evaluate) of outcomes (n,) against quantiles (n, 5) at PIN5_LEVELS."""
    log_quantiles = np.full((len(log_outcome), len(QUANTILES)), np.nan)
    log_quantiles[:, _PIN5_COLUMNS] = log_pin5_quantiles
    return pin5_loss(log_outcome, log_quantiles)


def baseline_log_quantiles(model, candles, last_close: float, horizons: np.ndarray) -> np.ndarray:
    """The model's own baseline at the origin that ends `candles`: log prices (len(horizons), 5) of PIN5_LEVELS.

    σ at the origin is computed as the model's predict() computes it, from the same lookback.
    """
    recent = usable_candles(candles.tail(model.lookback))
    rows, sigma = origin_features(recent, model.config)
    scale = sigma[-1] * np.sqrt(horizons)
    baseline = model.baseline_z_quantiles(rows[-1:])[0]  # on the model's volatility scale, as predict() uses
    return math.log(last_close) + scale[:, None] * baseline[horizons - 1][:, _PIN5_COLUMNS]


def _epoch(value) -> int:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return int(value.timestamp())


def score_prediction(prediction: dict, candles, model,
                     bad_print: np.ndarray | None = None) -> tuple[list[dict], int, int]:
    """(score rows of the steps whose candle is stored and usable, number of steps still waiting for theirs, how
    many of those wait because their candle is a bad print). `bad_print`: `candles.bad_prints(candles)`, when
    known."""
    steps = prediction["steps"] or []
    times = candles.open_time if candles is not None else np.empty(0, dtype=np.int64)
    step_times = np.array([_epoch(step["ts"]) for step in steps], dtype=np.int64)
    position = np.minimum(np.searchsorted(times, step_times), max(len(times) - 1, 0))
    stored = (len(times) > 0) & (times[position] == step_times) if len(times) else np.zeros(len(steps), bool)
    if not stored.any():
        return [], len(steps), 0
    misprinted = stored & (bad_prints(candles) if bad_print is None else bad_print)[position]
    stored &= ~misprinted
    if not stored.any():
        return [], len(steps), int(misprinted.sum())
    origin = _epoch(prediction["last_candle_at"])
    history = candles.head(int(np.searchsorted(times, origin, side="right")))
    if not len(history) or int(history.open_time[-1]) != origin:
        # A file rebuilt with less history, or a reused ticker: not the series the forecast was made from.
        raise Conflict(f"the stored {prediction['timeframe']} candles do not hold this prediction's last candle "
                       f"({prediction['last_candle_at']})", code="origin_not_stored")
    chosen = [step for step, ok in zip(steps, stored, strict=True) if ok]
    realised = candles.close[position[stored]]
    horizons = np.array([step["step"] for step in chosen])
    quantiles = np.array([[step[name] for name in STEP_QUANTILES] for step in chosen], dtype=np.float64)
    log_realised = np.log(realised)
    loss = pin5(log_realised, np.log(quantiles))
    base_loss = pin5(log_realised, baseline_log_quantiles(model, history, prediction["last_close"], horizons))
    expected = quantiles[:, 2]
    event = np.abs(realised / expected - 1) <= model.config.tolerance
    train_end = prediction["train_end"]
    in_sample = train_end is not None and prediction["last_candle_at"] <= train_end
    rows = [
        {
            "prediction_id": str(prediction["id"]), "step": step["step"], "model_id": str(prediction["model_id"]),
            "ts": step["ts"], "realised_close": float(close),
            "inside_80": bool(step["lower_80"] <= close <= step["upper_80"]),
            "inside_95": bool(step["lower_95"] <= close <= step["upper_95"]),
            "confidence": float(step["confidence"]), "event": bool(hit), "pinball": float(own),
            "baseline_pinball": float(base), "in_sample": in_sample,
        }
        for step, close, hit, own, base in zip(chosen, realised, event, loss, base_loss, strict=True)
        if math.isfinite(close) and close > 0
    ]
    return rows, len(steps) - len(rows), int(misprinted.sum())


def _reason(error: Exception) -> str:
    """What a report and the log may say about an error: a CandlecastError's message, else its class only."""
    return error.message if isinstance(error, CandlecastError) else type(error).__name__


class _CandleFiles:
    """Each (ticker, timeframe) file read once per run (a few dozen kept), with its bad prints; one whose read failed
    is remembered (`unreadable`, with the reason) and not read again in the run."""

    def __init__(self) -> None:
        self._files: OrderedDict[tuple[str, str], tuple] = OrderedDict()
        self.unreadable: dict[tuple[str, str], str] = {}

    def get(self, ticker: str, timeframe: str) -> tuple:
        """(candles or None, their bad prints or None)"""
        key = (ticker, timeframe)
        if key not in self._files:
            try:
                candles = storage.read_all_candles(ticker, timeframe)
            except Exception as error:
                self.unreadable[key] = _reason(error)
                raise
            self._files[key] = (candles, bad_prints(candles) if candles is not None else None)
            while len(self._files) > _CANDLE_FILES_KEPT:
                self._files.popitem(last=False)
        self._files.move_to_end(key)
        return self._files[key]


class _Models:
    """Each prediction's model (`verified_model`, which keeps the loaded ones); one that failed to verify or load
    is remembered (`unusable`, model id → the reason) and not fetched again in the run."""

    def __init__(self) -> None:
        self.unusable: dict = {}

    def get(self, prediction: dict):
        row = {"id": prediction["model_id"], "timeframe": prediction["model_timeframe"],
               "s3_key": prediction["s3_key"], "sha256": prediction["sha256"], "name": prediction["model_name"],
               "version": prediction["model_version"], "is_active": prediction["model_active"]}
        try:
            return verified_model(row)
        except Exception as error:
            self.unusable[row["id"]] = _reason(error)
            raise


def _score_batch(due: list[dict], files: _CandleFiles, models: _Models, report: ScoreReport,
                 deadline: float) -> tuple[list[dict], list[dict]]:
    """(the predictions looked at, their score rows): `due` in order, stopping early once the deadline has passed
    (after one prediction at least, so a run always moves on)."""
    rows: list[dict] = []
    for done, prediction in enumerate(due):
        if done and time.monotonic() >= deadline:
            return due[:done], rows
        if not prediction["steps"]:  # looked at before its next step's candle could be stored
            continue
        series = (prediction["ticker"], prediction["timeframe"])
        if series in files.unreadable or prediction["model_id"] in models.unusable:
            report.skipped += 1
            continue
        try:
            candles, bad_print = files.get(*series)
            model = models.get(prediction) if candles is not None else None
            found, waiting, misprinted = score_prediction(prediction, candles, model, bad_print)
        except Exception as error:  # one unreadable file, model or defect never stops the others; no secrets
            reason = _reason(error)
            report.failed.append(f"{prediction['id']}: {reason}")
            logger.warning("scoring failed", extra={"prediction": str(prediction["id"]), "error": reason})
            if series in files.unreadable:
                report.unreadable_files.append(f"{series[0]} {series[1]}: {reason}")
            elif prediction["model_id"] in models.unusable:
                report.unusable_models.append(f"{prediction['model_timeframe']} {prediction['model_name']} "
                                              f"{prediction['model_version']}: {reason}")
            continue
        rows.extend(found)
        report.unmatured += waiting - misprinted
        report.bad_prints += misprinted
    return due, rows


def _refresh_accuracy(report: ScoreReport) -> int:
    """models.accuracy brought up to date (also after a re-registration reset it): how many changed. A failure is
    logged and reported (`accuracy_error`), never raised: the scores are recorded, and the continuation must
    still be handed on; the next run updates it."""
    try:
        with db.connection() as conn:
            try:
                return score_repository.refresh_accuracy(conn)
            except psycopg.errors.LockNotAvailable:  # the server answered: not an outage of the database
                report.accuracy_error = (f"models was locked for more than {score_repository.ACCURACY_LOCK_TIMEOUT:g} s"
                                         " (a migration?)")
    except Exception as error:
        report.accuracy_error = _reason(error)
    logger.warning("accuracy not refreshed", extra={"error": report.accuracy_error})
    return 0


def _judge_drift(report: ScoreReport) -> None:
    """report.drifting, and a warning naming each drifted model; a failure is logged, never raised (as accuracy's)."""
    try:
        with db.connection() as conn:
            report.drifting = drifting(score_repository.get_active_live_days(conn))
    except Exception as error:
        logger.warning("drift not judged", extra={"error": _reason(error)})
        return
    if report.drifting:
        logger.warning("model drifting: its live 80 % coverage is off (README, Alarms)",
                       extra={"drift": report.drifting})


def run(budget_seconds: float, *, now: datetime | None = None, since: datetime | None = None,
        after: score_repository.DueCursor = score_repository.NO_PREDICTION, batch: int = BATCH_PREDICTIONS,
        on_batch: Callable[[ScoreReport], None] | None = None) -> ScoreReport:
    """Score the matured, unscored steps of every prediction due by `now`; a step older than `since` (default:
    the scoring window) whose candle never came is given up."""
    started = time.monotonic()
    deadline = started + max(0.0, budget_seconds)
    now = now or datetime.now(UTC)
    since = since or now - SCORING_WINDOW
    report = ScoreReport()
    with db.connection() as conn:
        newest = symbol_repository.newest_stored_candle(conn)
    if newest is not None:
        report.stored_candles_age_hours = round((now - newest).total_seconds() / 3600, 1)
    files, models = _CandleFiles(), _Models()
    while True:
        if time.monotonic() >= deadline:
            report.continuation = {"after": [after[0], after[1], str(after[2])], "now": now.isoformat(),
                                   "since": since.isoformat()}
            break
        with db.connection() as conn:
            due = score_repository.get_due_predictions(conn, now, after, batch)
        if not due:
            break
        looked_at, rows = _score_batch(due, files, models, report, deadline)
        with db.connection() as conn:
            report.scored += score_repository.record_scores(conn, rows)
            score_repository.schedule_next(conn, [prediction["id"] for prediction in looked_at], since)
        report.predictions += len(looked_at)
        report.batches += 1
        after = score_repository.due_cursor(looked_at[-1])
        if on_batch is not None:
            on_batch(report)
        if len(due) < batch and len(looked_at) == len(due):
            break
    accuracy_changed = _refresh_accuracy(report)
    if report.continuation is None:
        _judge_drift(report)
    if report.scored or accuracy_changed:
        cache.invalidate_track_record()
    report.seconds = round(time.monotonic() - started, 3)
    return report


# How far a continuation's `now` may be ahead of this chunk's clock (the clock of the chunk that handed it on).
CLOCK_SKEW = timedelta(minutes=1)
CursorTicker = Annotated[str, Field(max_length=MAX_TICKER_LENGTH)]


class ScoreEvent(InvocationEvent):
    """The Score function's event, every field optional: the schedule's and Refresh's ({}) score what is due now. A
    chunk's continuation (`run`) hands on `now`, `since` and `after`, the last prediction done: [ticker, timeframe,
    id], ["", "", the nil id] before the first. A bare id (a continuation from before series order) starts over."""

    function = "score"

    now: AwareDatetime | None = Field(None, ge=EVERYTHING_SINCE)
    since: AwareDatetime | None = Field(None, ge=EVERYTHING_SINCE)  # default: `now` less the scoring window
    after: tuple[CursorTicker, Literal["", Timeframe], uuid.UUID] | None = None

    @field_validator("now")
    @classmethod
    def _not_ahead(cls, now: datetime | None) -> datetime | None:
        # A later `now` would give up every step older than the window before it, matured or not.
        if now is not None and now > datetime.now(UTC) + CLOCK_SKEW:
            raise ValueError("must not be in the future")
        return now

    @field_validator("since")
    @classmethod
    def _not_after_now(cls, since: datetime | None, info: ValidationInfo) -> datetime | None:
        if since is not None and since > (info.data.get("now") or datetime.now(UTC)):
            raise ValueError("must not be after now")
        return since

    @field_validator("after", mode="before")
    @classmethod
    def _bare_id_starts_over(cls, after: object) -> object:
        if isinstance(after, str):
            try:
                uuid.UUID(after)
            except ValueError:
                raise ValueError("must be [ticker, timeframe, id], or a bare prediction id") from None
            return None
        return after


def scheduled_run(event: object, budget_seconds: float) -> dict:
    """One chunk of the hourly (or refresh-triggered) run. `event` is a ScoreEvent (InvalidEvent, before anything
    runs, when it is not), a continuation or {}."""
    request = ScoreEvent.parse(event)
    report = run(budget_seconds, now=request.now, since=request.since,
                 after=request.after or score_repository.NO_PREDICTION)
    return report.as_dict()
