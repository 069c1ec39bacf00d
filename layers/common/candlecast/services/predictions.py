"""Reading stored predictions (no numpy: the symbols and get functions import this)."""

import uuid
from datetime import datetime

from candlecast import cache, db
from candlecast.errors import BadRequest, NotFound
from candlecast.pagination import Page, decode_cursor, invalid_cursor
from candlecast.repositories import predictions as prediction_repository
from candlecast.schemas import Prediction, PredictionWithSteps, list_adapter
from candlecast.tickers import normalize_ticker

_prediction_list = list_adapter(Prediction)


def parse_prediction_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except (ValueError, TypeError, AttributeError):
        raise BadRequest("prediction id must be a UUID", code="invalid_prediction_id") from None


def serialise(row: dict) -> bytes:
    return PredictionWithSteps.model_validate(row).model_dump_json().encode()


def load_and_cache(prediction_id: uuid.UUID, lookup: cache.Lookup) -> bytes | None:
    """The stored prediction's JSON from the database, put in the 15-minute cache under `lookup`'s generation."""
    with db.connection() as conn:
        row = prediction_repository.get_prediction_by_id(conn, prediction_id)
    if row is None:
        return None
    body = serialise(row)
    cache.fill_prediction(str(prediction_id), body, lookup)
    return body


def get(raw_id: str) -> tuple[bytes, bool]:
    """(JSON body, served from cache) of one prediction with its steps."""
    prediction_id = parse_prediction_id(raw_id)
    lookup = cache.lookup_prediction(str(prediction_id))
    if lookup.value is not None:
        return lookup.value, True
    body = load_and_cache(prediction_id, lookup)
    if body is None:
        raise NotFound(f"no prediction with id {prediction_id}", code="prediction_not_found")
    return body, False


def list_scope(ticker: str, timeframe: str | None) -> str:
    """The list a cursor of GET /symbols/{ticker}/predictions belongs to."""
    return f"symbols/{ticker}/predictions?timeframe={timeframe or ''}"


def position(row: dict) -> list[str]:
    """A row's place in the list, as its cursor holds it."""
    return [row["created_at"].isoformat(), str(row["id"])]


def _after(scope: str, cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    """(created_at, id) of the row a cursor of this list follows."""
    position = decode_cursor(scope, cursor, 2)
    if position is None:
        return None
    try:
        created_at, prediction_id = datetime.fromisoformat(position[0]), uuid.UUID(position[1])
    except ValueError:
        raise invalid_cursor() from None
    if created_at.tzinfo is None:
        raise invalid_cursor()
    return created_at, prediction_id


def recent_for_symbol(raw_ticker: str, timeframe: str | None, limit: int, cursor: str | None = None) -> Page:
    ticker = normalize_ticker(raw_ticker)
    scope = list_scope(ticker, timeframe)
    after = _after(scope, cursor)
    from candlecast.repositories import symbols as symbol_repository

    with db.connection() as conn:
        symbol = symbol_repository.get_symbol_by_ticker(conn, ticker)
        if symbol is None:
            raise NotFound(f"unknown symbol {ticker}", code="symbol_not_found")
        rows = prediction_repository.get_recent_predictions_by_symbol(conn, symbol["id"], timeframe, limit, after)
    body = _prediction_list.dump_json(_prediction_list.validate_python(rows))
    return Page.of(body, limit, scope, position, rows)
