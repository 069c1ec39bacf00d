"""Symbol routes: search, top by volume, one symbol; the models' track record."""

from candlecast import startup

startup.begin()  # no garbage collection while the function's modules load

from typing import Annotated

from aws_lambda_powertools.event_handler.openapi.params import Path, Query
from pydantic import WithJsonSchema

from candlecast.api import (
    client_cache,
    create_resolver,
    documented,
    json_response,
    lambda_handler_for,
    page_response,
    path_parameter,
)
from candlecast.pagination import CURSOR_PATTERN, NEXT_CURSOR_HEADER
from candlecast.schemas import ModelTrackRecord, Prediction, Symbol
from candlecast.services import predictions, symbols, track_record
from candlecast.tickers import MAX_TICKER_LENGTH, PATH_TICKER_PATTERN
from candlecast.timeframes import Timeframe

app = create_resolver()
# The first symbol of a list leads on to its own routes (OpenAPI links: clients and schemathesis follow them).
FIRST_SYMBOL = {"GetSymbol": {"operationId": "get_symbol", "parameters": {"ticker": "$response.body#/0/ticker"}},
                "SymbolPredictions": {"operationId": "symbol_predictions",
                                      "parameters": {"ticker": "$response.body#/0/ticker"}}}

Limit = Annotated[int, Query(ge=1, le=100, description="page size, 1..100")]
# The cursor's pattern is documented, not validated here (WithJsonSchema): decode_cursor answers every bad cursor with
# invalid_cursor and a restart hint, where a failed pattern would be a bare invalid_request.
Cursor = Annotated[Annotated[str, WithJsonSchema({"type": "string", "pattern": CURSOR_PATTERN})] | None, Query(
    description="X-Next-Cursor of the previous page, as it is; one that is not valid for this list or this release "
                "is 400 invalid_cursor: start the list again without a cursor")]
Ticker = Annotated[str, Path(description="X:BTCUSD, BTCUSD, BTC-USD or btc-usd", examples=["X:BTCUSDT"],
                             json_schema_extra={"pattern": PATH_TICKER_PATTERN, "minLength": 2,
                                                "maxLength": MAX_TICKER_LENGTH})]


@app.get("/symbols", operation_id="search_symbols", summary="Search symbols by ticker prefix or name",
         responses=documented(list[Symbol], 400, 503, headers=NEXT_CURSOR_HEADER, links=FIRST_SYMBOL),
         cache_control=client_cache("search"))
def search_symbols(
    q: Annotated[str, Query(max_length=64, description="ticker prefix or name, at most 64 characters",
                            json_schema_extra={"pattern": symbols.QUERY_PATTERN})] = "",
    limit: Limit = 20,
    cursor: Cursor = None,
):
    return page_response(symbols.search(q, limit, cursor))


@app.get("/symbols/top", operation_id="top_symbols", summary="Symbols ranked by 24 h volume",
         responses=documented(list[Symbol], 400, 503, headers=NEXT_CURSOR_HEADER, links=FIRST_SYMBOL),
         cache_control=client_cache("top_symbols"))
def top_symbols(limit: Limit = 20, cursor: Cursor = None):
    return page_response(symbols.top(limit, cursor))


@app.get("/symbols/<ticker>", operation_id="get_symbol",
         summary="One symbol; accepts X:BTCUSD, BTCUSD, BTC-USD or btc-usd",
         responses=documented(Symbol, 400, 404, 503), cache_control=client_cache("symbol"))
def get_symbol(ticker: Ticker):
    return json_response(symbols.get(path_parameter(ticker)))


@app.get("/symbols/<ticker>/predictions", operation_id="symbol_predictions",
         summary="Recent predictions for a symbol, newest first",
         responses=documented(list[Prediction], 400, 404, 503, headers=NEXT_CURSOR_HEADER))
def symbol_predictions(
    ticker: Ticker,
    timeframe: Annotated[Timeframe | None, Query(description="1h, 4h, 1d, 1w or 1m (calendar month)")] = None,
    limit: Limit = 20,
    cursor: Cursor = None,
):
    return page_response(predictions.recent_for_symbol(path_parameter(ticker), timeframe, limit, cursor))


@app.get("/models", operation_id="list_models", summary="Each timeframe's active model: backtest and live track record",
         description="Live figures score every served prediction against the candles that followed. "
                     "accuracy is 80 % coverage: live on each model, the walk-forward test's in backtest.coverage_80.",
         responses=documented(list[ModelTrackRecord], 503), cache_control=client_cache("track_record"))
def list_models():
    return json_response(track_record.all_models())


@app.get("/models/<timeframe>", operation_id="get_model",
         summary="One timeframe's model, with coverage by horizon and reliability bins",
         responses=documented(ModelTrackRecord, 400, 404, 503), cache_control=client_cache("track_record"))
def get_model(timeframe: Annotated[Timeframe, Path(description="1h, 4h, 1d, 1w or 1m (calendar month)")]):
    return json_response(track_record.one_timeframe(timeframe))


lambda_handler = lambda_handler_for(app, "symbols")

startup.done()  # the function is loaded: freeze it and collect again
