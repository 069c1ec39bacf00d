"""The forecast page at `/` (infra/web): pick a symbol and a timeframe, see the recent candles, the 30 expected
candles with their 80 % and 95 % bands, and the model's live reliability beside its backtest reliability.

The page calls the API's own routes (POST /predictions, GET /models/{timeframe}, GET /symbols/top). The recent
candles come from `GET /local/candles`, a local-only route that reads the bucket as the functions do: the
deployed API has no candle route.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from infra.apigateway import HttpRequest, HttpResponse, error_response
from infra.static_files import static_file, static_folder

WEB = Path(__file__).with_name("web")
MAX_CANDLES = 500


def recent_candles(request: HttpRequest, _params: dict[str, str]) -> HttpResponse:
    """{"ticker", "timeframe", "candles": [{time, open, high, low, close}]} of a stored symbol."""
    from candlecast.errors import CandlecastError
    from candlecast.storage import read_candles
    from candlecast.tickers import normalize_ticker
    from candlecast.timeframes import TIMEFRAMES

    query = {name: values[-1] for name, values in parse_qs(urlsplit(request.target).query).items()}
    timeframe = query.get("timeframe", "")
    if timeframe not in TIMEFRAMES:
        return error_response(400, "invalid_request", f"timeframe must be one of {', '.join(TIMEFRAMES)}")
    try:
        limit = int(query.get("limit", "120"))
    except ValueError:
        return error_response(400, "invalid_request", "limit must be a whole number")
    if not 1 <= limit <= MAX_CANDLES:
        return error_response(400, "invalid_request", f"limit must be within 1..{MAX_CANDLES}")
    try:
        ticker = normalize_ticker(query.get("symbol", ""))
        candles = read_candles(ticker, timeframe, limit)
    except CandlecastError as error:
        return error_response(error.status, error.code, error.message)
    if candles is None:
        return error_response(404, "candles_not_found", f"no stored {timeframe} candles for {ticker}")
    rows = [{"time": int(t), "open": o, "high": h, "low": lo, "close": c}
            for t, o, h, lo, c in zip(candles.open_time.tolist(), candles.open.tolist(), candles.high.tolist(),
                                      candles.low.tolist(), candles.close.tolist(), strict=True)]
    body = json.dumps({"ticker": ticker, "timeframe": timeframe, "candles": rows}).encode()
    return HttpResponse(200, [("content-type", "application/json")], body)


def add_page_routes(api) -> None:
    api.add_local_route("GET", "/", static_file(WEB / "index.html"))
    api.add_local_route("GET", "/ui/{path+}", static_folder(WEB))
    api.add_local_route("GET", "/local/candles", recent_candles)
