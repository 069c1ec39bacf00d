"""Creating a prediction: symbol -> active model (verified) -> recent candles -> 30 expected candles -> stored.

Imports numpy (through the model); only the prediction-create function loads this module.
"""

import hashlib
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from aws_lambda_powertools import Logger

from candlecast import cache, db, storage
from candlecast.config import get_settings, model_signing_key
from candlecast.errors import ModelUnavailable, NotFound
from candlecast.forecast import artifact
from candlecast.repositories import models as model_repository
from candlecast.repositories import predictions as prediction_repository
from candlecast.repositories import symbols as symbol_repository
from candlecast.schemas import PredictionCreate, PredictionRequest, PredictionStep, PredictionWithSteps
from candlecast.services import predictions as prediction_reads
from candlecast.timeframes import FORECAST_STEPS, next_open_times

logger = Logger(child=True)

_models: dict[str, tuple[str, object]] = {}  # timeframe -> (sha256, ForecastModel), kept across warm invocations
_models_lock = threading.Lock()


@dataclass(frozen=True)
class CreateResult:
    body: bytes
    created: bool


def _verified_model(row: dict):
    """The active model, loaded once per container; the file is verified before it is unpickled."""
    timeframe, sha256 = row["timeframe"], row["sha256"]
    loaded = _models.get(timeframe)
    if loaded is not None and loaded[0] == sha256:
        return loaded[1]
    with _models_lock:
        loaded = _models.get(timeframe)
        if loaded is not None and loaded[0] == sha256:
            return loaded[1]
        data = storage.get_bytes(row["s3_key"])
        signature = storage.get_bytes(storage.signature_key(row["s3_key"]))
        if data is None:
            raise ModelUnavailable(f"the {timeframe} model file is missing from storage", code="model_file_missing")
        model = artifact.verify_and_load(
            data, signature.decode() if signature else None, model_signing_key(get_settings()), sha256
        )
        _models[timeframe] = (sha256, model)
        logger.info("model loaded", extra={"timeframe": timeframe, "model": row["name"], "version": row["version"]})
        return model


def forget_models() -> None:
    with _models_lock:
        _models.clear()


def _recent_candles(ticker: str, timeframe: str, count: int):
    """The symbol's last usable candles: from the bucket, else from Polygon (any symbol)."""
    from candlecast.forecast.model import usable_candles

    candles = storage.read_candles(ticker, timeframe, count)
    if candles is None or len(candles) == 0:
        from candlecast import ingest

        candles = ingest.fetch_recent_candles(ticker, timeframe, count)
    candles = usable_candles(candles) if candles is not None else None
    if candles is None or len(candles) < 3:
        raise NotFound(f"{ticker} has too few usable {timeframe} candles to forecast from", code="candles_not_found")
    return candles


def _request_hash(ticker: str, timeframe: str, model_id, last_open: int) -> str:
    return hashlib.sha256(f"{ticker}|{timeframe}|{model_id}|{last_open}".encode()).hexdigest()


def _steps(model, candles, timeframe: str) -> list[PredictionStep]:
    """The 30 expected candles after the last of `candles`, at the timeframe's calendar steps."""
    forecast = model.predict(candles)
    step_times = next_open_times(datetime.fromtimestamp(int(candles.open_time[-1]), UTC), timeframe, FORECAST_STEPS)
    return [
        PredictionStep(
            step=index + 1, ts=step_times[index],
            open=forecast.open[index], high=forecast.high[index], low=forecast.low[index],
            close=forecast.close[index], lower_80=forecast.lower_80[index], upper_80=forecast.upper_80[index],
            lower_95=forecast.lower_95[index], upper_95=forecast.upper_95[index],
            confidence=forecast.confidence[index],
        )
        for index in range(FORECAST_STEPS)
    ]


def create(request: PredictionRequest, idempotency_key: str | None = None) -> CreateResult:
    ticker, timeframe = request.symbol, request.timeframe
    with db.connection() as conn:
        symbol = symbol_repository.get_symbol_by_ticker(conn, ticker)
        model_row = model_repository.get_active_model_by_timeframe(conn, timeframe) if symbol else None
    if symbol is None:
        raise NotFound(f"unknown symbol {ticker}", code="symbol_not_found")
    if model_row is None:
        raise ModelUnavailable(f"no active model for timeframe {timeframe}", code="model_unavailable")
    # Storage and Polygon are reached without holding a database connection.
    model = _verified_model(model_row)
    candles = _recent_candles(ticker, timeframe, model.lookback)
    last_open = int(candles.open_time[-1])
    request_hash = _request_hash(ticker, timeframe, model_row["id"], last_open)

    if idempotency_key is None:
        repeat_id = cache.get_prediction_for_request(request_hash)
        if repeat_id is not None and (body := cache.get_prediction_bytes(repeat_id)) is not None:
            return CreateResult(body, created=False)

    steps = _steps(model, candles, timeframe)
    prediction = PredictionCreate(
        symbol_id=symbol["id"], ticker=ticker, timeframe=timeframe, model_id=model_row["id"],
        last_candle_at=datetime.fromtimestamp(last_open, UTC), last_close=float(candles.close[-1]),
        idempotency_key=idempotency_key, steps=steps,
    )
    with db.connection() as conn:
        stored = prediction_repository.create_prediction(conn, prediction, request_hash)
    if stored["created"]:
        # What was just validated and stored is the response; it is not read back.
        body = PredictionWithSteps.model_construct(
            id=stored["id"], created_at=stored["created_at"], horizon=FORECAST_STEPS,
            model_name=model_row["name"], model_version=model_row["version"],
            **prediction.model_dump(include={"ticker", "timeframe", "model_id", "last_candle_at", "last_close"}),
            steps=steps,
        ).model_dump_json().encode()
        cache.set_prediction_bytes(str(stored["id"]), body)
    else:
        body = prediction_reads.get(str(stored["id"]))[0]
    if idempotency_key is None:
        cache.set_prediction_for_request(request_hash, str(stored["id"]))
    return CreateResult(body, created=stored["created"])
