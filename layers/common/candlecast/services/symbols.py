"""Symbol search, top-by-volume and lookup, cached in Redis as serialised JSON."""

import re

from candlecast import cache, db
from candlecast.errors import BadRequest, NotFound
from candlecast.pagination import Page, decode_cursor
from candlecast.repositories import symbols as symbol_repository
from candlecast.schemas import Symbol, list_adapter
from candlecast.tickers import compact_pair, is_ticker_like, normalize_ticker

MAX_QUERY_LENGTH = 64
# No control or format characters (Unicode Cc and Cf in the Basic Multilingual Plane): the OpenAPI `pattern`
# of `q`, and what validate_query checks.
QUERY_PATTERN = (r"^[^\u0000-\u001f\u007f-\u009f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e"
                 r"\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]*$")
_QUERY = re.compile(QUERY_PATTERN)
_symbol_list = list_adapter(Symbol)


def _available(rows: list[dict]) -> list[dict]:
    """Rows with `fetchable`: whether timeframes without stored candles can be fetched from Polygon."""
    from candlecast.config import get_settings

    settings = get_settings()
    fetchable = bool(settings.polygon_api_key or settings.polygon_api_key_secret_arn)
    return [{**row, "fetchable": fetchable} for row in rows]


def validate_query(query: str) -> str:
    if len(query) > MAX_QUERY_LENGTH:
        raise BadRequest(f"q is longer than {MAX_QUERY_LENGTH} characters", code="invalid_query")
    if not _QUERY.fullmatch(query) or any("\ud800" <= char <= "\udfff" for char in query):
        raise BadRequest("q contains control characters", code="invalid_query")
    return query.strip()


def _after(scope: str, cursor: str | None) -> str | None:
    """The ticker of the row a cursor of this list follows."""
    position = decode_cursor(scope, cursor, 1)
    return None if position is None else position[0]


def _position(symbol: dict) -> list[str]:
    return [symbol["ticker"]]


TOP_SCOPE = "symbols/top"


def search(query: str, limit: int, cursor: str | None = None) -> Page:
    """Symbols matching `query` as a JSON list; an empty query lists the top symbols. Only first pages
    are cached."""
    query = validate_query(query)
    if not query:
        return top(limit, cursor)
    pair = compact_pair(query)
    # A ticker-like query searches as its compact pair; anything else (a name) as typed. The search is
    # case-insensitive, so the cache key (and the cursor's list) is the searched term in lower case.
    term = pair if is_ticker_like(pair) else query
    scope = f"symbols?q={term.lower()}"
    after = _after(scope, cursor)
    cached = cache.get_search_bytes(term.lower(), limit) if after is None else None
    if cached is not None:
        return Page.of(cached, limit, scope, _position)
    with db.connection() as conn:
        rows = symbol_repository.search_symbols(conn, term, limit, after)
    body = _symbol_list.dump_json(_symbol_list.validate_python(_available(rows)))
    if after is None:
        cache.set_search_bytes(term.lower(), limit, body)
    return Page.of(body, limit, scope, _position, rows)


def top(limit: int, cursor: str | None = None) -> Page:
    after = _after(TOP_SCOPE, cursor)
    cached = cache.get_top_symbols_bytes(limit) if after is None else None
    if cached is not None:
        return Page.of(cached, limit, TOP_SCOPE, _position)
    with db.connection() as conn:
        rows = symbol_repository.get_top_symbols_by_volume(conn, limit, after)
    body = _symbol_list.dump_json(_symbol_list.validate_python(_available(rows)))
    if after is None:
        cache.set_top_symbols_bytes(limit, body)
    return Page.of(body, limit, TOP_SCOPE, _position, rows)


def get(raw_ticker: str) -> bytes:
    ticker = normalize_ticker(raw_ticker)
    cached = cache.get_symbol_bytes(ticker)
    if cached is not None:
        return cached
    with db.connection() as conn:
        row = symbol_repository.get_symbol_by_ticker(conn, ticker)
    if row is None:
        raise NotFound(f"unknown symbol {ticker}", code="symbol_not_found")
    body = Symbol.model_validate(_available([row])[0]).model_dump_json().encode()
    cache.set_symbol_bytes(ticker, body)
    return body
