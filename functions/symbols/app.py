"""Symbol routes: search, top by volume, one symbol."""

from typing import Annotated

from aws_lambda_powertools.event_handler.openapi.params import Path, Query

from candlecast.api import create_resolver, documented, json_response, lambda_handler_for, path_parameter
from candlecast.schemas import Prediction, Symbol
from candlecast.services import predictions, symbols
from candlecast.timeframes import Timeframe

app = create_resolver()

Limit = Annotated[int, Query(ge=1, le=100, description="1..100")]


@app.get("/symbols", summary="Search symbols by ticker prefix or name",
         responses=documented(list[Symbol], 400, 503))
def search_symbols(
    q: Annotated[str, Query(max_length=64, description="ticker prefix or name, at most 64 characters")] = "",
    limit: Limit = 20,
):
    return json_response(symbols.search(q, limit))


@app.get("/symbols/top", summary="Symbols ranked by 24 h volume", responses=documented(list[Symbol], 400, 503))
def top_symbols(limit: Limit = 20):
    return json_response(symbols.top(limit))


@app.get("/symbols/<ticker>", summary="One symbol; accepts X:BTCUSD, BTCUSD, BTC-USD or btc-usd",
         responses=documented(Symbol, 400, 404, 503))
def get_symbol(ticker: Annotated[str, Path(description="X:BTCUSD, BTCUSD, BTC-USD or btc-usd")]):
    return json_response(symbols.get(path_parameter(ticker)))


@app.get("/symbols/<ticker>/predictions", summary="Recent predictions for a symbol, newest first",
         responses=documented(list[Prediction], 400, 404, 503))
def symbol_predictions(
    ticker: Annotated[str, Path(description="X:BTCUSD, BTCUSD, BTC-USD or btc-usd")],
    timeframe: Annotated[Timeframe | None, Query(description="1h, 4h, 1d, 1w or 1m (calendar month)")] = None,
    limit: Limit = 20,
):
    return json_response(predictions.recent_for_symbol(path_parameter(ticker), timeframe, limit))


lambda_handler = lambda_handler_for(app)
