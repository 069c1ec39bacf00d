"""Creating a prediction: symbol -> active model (verified) -> recent candles -> 30 expected candles -> stored.

Imports numpy (through the model); only the prediction-create function loads this module.
"""

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from aws_lambda_powertools import Logger

from candlecast import cache, db, storage
from candlecast.errors import IdempotencyKeyReused, ModelUnavailable, NotFound
from candlecast.repositories import models as model_repository
from candlecast.repositories import predictions as prediction_repository
from candlecast.schemas import (
    PredictionCreate,
    PredictionRequest,
    PredictionStep,
    PredictionWithSteps,
    list_adapter,
)
from candlecast.services import predictions as prediction_reads
from candlecast.services.model_loading import verified_model
from candlecast.timeframes import FORECAST_STEPS, closed_since, next_open_times

logger = Logger(child=True)

_STEP_ARRAYS = ("open", "high", "low", "close", "lower_80", "upper_80", "lower_95", "upper_95", "confidence")
_STEP_FIELDS = ("step", "ts", *_STEP_ARRAYS)
_steps_adapter = list_adapter(PredictionStep)


@dataclass(frozen=True)
class CreateResult:
    body: bytes
    created: bool


def prepare() -> None:
    """Import and build during init what a first create would load inside its request: the model code, the model
    file's reader and the candle reading path, the catch-up from Polygon included (not boto3: the deployed model
    file comes with the function; not urllib3, which only a configured Polygon key needs). No network call: init
    succeeds with every dependency down."""
    import joblib  # noqa: F401 - load_model's; it imports loky and multiprocessing

    import candlecast.forecast.model
    import candlecast.ingest  # noqa: F401

    storage.prepare_reads()


def _enough_history(raw, candles, ticker: str, timeframe: str, need: int) -> None:
    """404 unless the usable `candles` (of `raw`) are at least `need`, the model's `min_candles` (its σ warm-up:
    48/32/24/12/6 bars at 1h/4h/1d/1w/1m), which every origin it was evaluated on had: no_trades when `raw` has
    that many priced rows but too few with a trade (flat zero-volume outage fills, which `usable_candles` keeps
    when almost nothing else is left: a constant price forecast with confidence 0.9999), else too_little_history."""
    from candlecast.candles import flat_fills, priced

    valid = priced(raw)
    traded = int((valid & ~flat_fills(raw)).sum())
    if traded < need <= int(valid.sum()):
        raise NotFound(f"{ticker} has {traded} {timeframe} candles with trades among its last {len(raw)} (the others "
                       f"are flat zero-volume fills); a forecast needs at least {need}", code="no_trades")
    if len(candles) < need:
        raise NotFound(f"{ticker} has {len(candles)} usable {timeframe} candles; a forecast needs at least {need}",
                       code="too_little_history")


def _recent_candles(ticker: str, timeframe: str, count: int, lookup: cache.Lookup, need: int):
    """The symbol's last usable candles: from the cache lookup made already or the bucket, with those that closed
    since from Polygon; else all from Polygon (any symbol). At least `need` of them, else a 404."""
    from candlecast import ingest
    from candlecast.candles import usable_candles

    candles = storage.read_candles(ticker, timeframe, count, lookup=lookup)
    if candles is None or len(candles) == 0:
        candles = ingest.fetch_recent_candles(ticker, timeframe, count)
    else:
        candles = ingest.caught_up_candles(ticker, timeframe, candles, count, lookup=lookup)
    usable = usable_candles(candles)
    _enough_history(candles, usable, ticker, timeframe, need)
    return usable


def _request_hash(ticker: str, timeframe: str, model_id, candles) -> str:
    """A request's identity for the repeat window: symbol, timeframe, model and the content of the candles the
    forecast is made from (every column of every row, not only the last open time), so a candle file fixed in
    place is a new request, not a repeat of the forecast from the bad one. Hashing a lookback costs microseconds."""
    import numpy as np

    from candlecast.candles import COLUMNS

    digest = hashlib.sha256(f"{ticker}|{timeframe}|{model_id}|{len(candles)}".encode())
    for column in COLUMNS:
        kind = np.int64 if column == "open_time" else np.float64
        digest.update(np.ascontiguousarray(getattr(candles, column), dtype=kind).tobytes())
    return digest.hexdigest()


def _beyond_float_range(columns: dict) -> bool:
    """Whether an inconsistent forecast is prices past what a float holds, not a model's failure: no NaN anywhere,
    and a price that overflowed to infinity or underflowed to 0 (exp of σ·√h·z at σ from jumps of 10¹⁷×)."""
    import numpy as np

    values = np.concatenate(list(columns.values()))
    prices = [columns[name] for name in _STEP_ARRAYS if name != "confidence"]
    return not np.isnan(values).any() and any((np.isinf(price) | (price <= 0)).any() for price in prices)


def _steps(model, candles, ticker: str, timeframe: str) -> list[PredictionStep]:
    """The 30 expected candles after the last of `candles`, at the timeframe's calendar steps.

    Checked once as arrays (the database's CHECK constraints say the same), which names a bad model's
    output, or candles whose swings put the forecast's prices past a float's range (404 candles_out_of_range: a
    data problem, which no retry mends); then validated from plain rows by pydantic-core, which is cheaper than
    model_construct.
    """
    import numpy as np

    forecast = model.predict(candles)
    columns = {name: np.asarray(getattr(forecast, name), dtype=float) for name in _STEP_ARRAYS}
    consistent = (
        all(np.isfinite(values).all() and len(values) == FORECAST_STEPS for values in columns.values())
        and (columns["low"] > 0).all()
        and (columns["low"] <= np.minimum(columns["open"], columns["close"])).all()
        and (columns["high"] >= np.maximum(columns["open"], columns["close"])).all()
        and (columns["lower_95"] <= columns["lower_80"]).all() and (columns["lower_80"] <= columns["upper_80"]).all()
        and (columns["upper_80"] <= columns["upper_95"]).all() and (columns["lower_95"] > 0).all()
        and ((columns["confidence"] >= 0) & (columns["confidence"] <= 1)).all()
    )
    if not consistent and _beyond_float_range(columns):
        low, high = float(candles.close.min()), float(candles.close.max())
        raise NotFound(f"{ticker}'s {timeframe} candles swing too far to forecast (closes from {low:.3g} to "
                       f"{high:.3g}): the forecast's prices would lie beyond what a float holds",
                       code="candles_out_of_range")
    if not consistent:
        raise ModelUnavailable(f"the {timeframe} model produced an inconsistent forecast", code="model_output_invalid")
    step_times = next_open_times(datetime.fromtimestamp(int(candles.open_time[-1]), UTC), timeframe, FORECAST_STEPS)
    rows = zip(range(1, FORECAST_STEPS + 1), step_times, *(columns[name].tolist() for name in _STEP_ARRAYS),
               strict=True)
    return _steps_adapter.validate_python([dict(zip(_STEP_FIELDS, row, strict=True)) for row in rows])


def _prediction(symbol: dict, model_row: dict, model, candles, idempotency_key: str | None) -> PredictionCreate:
    return PredictionCreate(
        symbol_id=symbol["id"], ticker=symbol["ticker"], timeframe=model_row["timeframe"], model_id=model_row["id"],
        last_candle_at=datetime.fromtimestamp(int(candles.open_time[-1]), UTC), last_close=float(candles.close[-1]),
        idempotency_key=idempotency_key, steps=_steps(model, candles, symbol["ticker"], model_row["timeframe"]),
    )


def _as_of_key_prefix(model_id) -> str:
    return f"as-of:{model_id}:"


def past_prediction_keys(model_id) -> set[str]:
    """The Idempotency-Keys of the predictions `create_as_of` made with this model (a seed's track record)."""
    with db.connection() as conn:
        return prediction_repository.model_keys_starting_with(conn, model_id, _as_of_key_prefix(model_id))


def _as_of_origin(model_row: dict, model, ticker: str, timeframe: str, candles):
    """(the usable candles a past origin's forecast reads, its Idempotency-Key, which names the model and the
    origin)."""
    from candlecast.candles import usable_candles

    raw = candles.tail(model.lookback)
    usable = usable_candles(raw)
    _enough_history(raw, usable, ticker, timeframe, model.min_candles)
    return usable, f"{_as_of_key_prefix(model_row['id'])}{ticker}:{timeframe}:{int(usable.open_time[-1])}"


def as_of_key(model_row: dict, model, ticker: str, timeframe: str, candles) -> str:
    """The Idempotency-Key `create_as_of` gives the prediction from `candles` (a past origin) with this model."""
    return _as_of_origin(model_row, model, ticker, timeframe, candles)[1]


def create_as_of(ticker: str, timeframe: str, candles) -> bool:
    """A prediction made from `candles` (a past origin: the series up to it), stored like any other; the
    operator's `candlecast seed --as-of` builds a track record with it. Returns whether it was new.

    The Idempotency-Key names the model and the origin, so a second seed stores nothing twice.
    """
    with db.connection() as conn:
        symbol, model_row, _ = model_repository.get_symbol_and_active_model(conn, ticker, timeframe)
    if symbol is None or model_row is None:
        raise NotFound(f"{ticker} or an active {timeframe} model is missing", code="symbol_not_found")
    model = verified_model(model_row)  # storage: outside the connection, as in create
    candles, key = _as_of_origin(model_row, model, ticker, timeframe, candles)
    prediction = _prediction(symbol, model_row, model, candles, key)
    with db.connection() as conn:
        stored = prediction_repository.create_prediction(
            conn, prediction, _request_hash(ticker, timeframe, model_row["id"], candles))
    return bool(stored["created"])


def _served_again(prediction_id, ticker: str, timeframe: str, matched_by: str) -> None:
    logger.info("prediction served again", extra={"prediction_id": str(prediction_id), "ticker": ticker,
                                                   "timeframe": timeframe, "matched_by": matched_by})


def create(request: PredictionRequest, idempotency_key: str | None = None) -> CreateResult:
    ticker, timeframe = request.symbol, request.timeframe
    # The pooled connection is held only for database work: never across storage or Polygon, so a slow
    # dependency neither holds a pool slot nor shows up as database_unavailable.
    with db.connection() as conn:
        symbol, model_row, keyed = model_repository.get_symbol_and_active_model(conn, ticker, timeframe,
                                                                              idempotency_key)
    if keyed is not None:
        # A retry: the stored prediction, whatever candles or model came since (and without reading them).
        if (keyed["ticker"], keyed["timeframe"]) != (ticker, timeframe):
            raise IdempotencyKeyReused
        _served_again(keyed["id"], ticker, timeframe, "idempotency_key")
        return CreateResult(prediction_reads.get(str(keyed["id"]))[0], created=False)
    if symbol is None:
        raise NotFound(f"unknown symbol {ticker}", code="symbol_not_found")
    if not symbol["is_active"]:  # delisted, renamed or retired: its candles no longer grow, or are not to be used
        raise NotFound(f"{ticker} is inactive (delisted, renamed or retired), so it is not forecast (GET "
                       f"/symbols/{ticker} shows it with is_active false)", code="symbol_inactive")
    if model_row is None:
        raise ModelUnavailable(f"no active model for timeframe {timeframe}", code="model_unavailable")
    model = verified_model(model_row)
    # The candles' cache entry and the newest request pointer come in one round trip; the pointer counts
    # only when it names this request's hash, which the candles give.
    lookup, request_lookup = cache.lookup_candles_and_request(ticker, timeframe)
    candles = _recent_candles(ticker, timeframe, model.lookback, lookup, model.min_candles)
    request_hash = _request_hash(ticker, timeframe, model_row["id"], candles)

    if idempotency_key is None:
        repeat_id = cache.prediction_for_request(request_lookup.value, request_hash)
        if repeat_id is not None and (body := cache.get_prediction_bytes(repeat_id)) is not None:
            _served_again(repeat_id, ticker, timeframe, "repeat")
            return CreateResult(body, created=False)

    prediction = _prediction(symbol, model_row, model, candles, idempotency_key)
    steps = prediction.steps
    with db.connection() as conn:
        stored = prediction_repository.create_prediction(conn, prediction, request_hash)
    # Only what has committed durably is cached: the cache never holds a prediction the database lacks.
    if stored["created"]:
        # What was just checked and stored is the response; it is not read back.
        body = PredictionWithSteps.model_construct(
            id=stored["id"], created_at=stored["created_at"], horizon=FORECAST_STEPS,
            model_name=model_row["name"], model_version=model_row["version"],
            **prediction.model_dump(include={"ticker", "timeframe", "model_id", "last_candle_at", "last_close"}),
            steps=steps,
        ).model_dump_json().encode()
        cache.set_created_prediction(str(stored["id"]), body,
                                     None if idempotency_key else (ticker, timeframe, request_hash), request_lookup)
        age = closed_since(prediction.last_candle_at, timeframe, stored["created_at"])
        # One line per prediction made, naming what made it, for an operator tracing one. INFO for stale ones too:
        # the cause is warned once per 30 s and series ("stale candles served"), and the client reads `stale`.
        logger.info("forecast from stale candles" if age else "prediction created", extra={
            "prediction_id": str(stored["id"]), "ticker": ticker, "timeframe": timeframe,
            "model_id": str(model_row["id"]), "model_version": model_row["version"],
            "last_candle_at": prediction.last_candle_at.isoformat(), "data_age_bars": age,
            "request_hash": request_hash})
    else:
        _served_again(stored["id"], ticker, timeframe, "idempotency_key" if idempotency_key else "repeat")
        body = prediction_reads.get(str(stored["id"]))[0]
        if idempotency_key is None:
            cache.set_prediction_for_request(ticker, timeframe, request_hash, str(stored["id"]), request_lookup)
    return CreateResult(body, created=stored["created"])
