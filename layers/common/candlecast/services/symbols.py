"""Symbol search, top-by-volume and lookup, cached in Redis as serialised JSON."""

import re
from decimal import Decimal, InvalidOperation

from candlecast import cache, db
from candlecast.errors import BadRequest, Conflict, NotFound
from candlecast.pagination import Page, decode_cursor, invalid_cursor
from candlecast.repositories import symbols as symbol_repository
from candlecast.schemas import Symbol, list_adapter
from candlecast.tickers import ascii_lower, compact_pair, is_ticker_like, normalize_ticker

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


def _volume(text: str) -> Decimal | None:
    """A cursor's volume ("" for none); `invalid_cursor` for anything a numeric(38, 8) column cannot compare."""
    if text == "":
        return None
    try:
        volume = Decimal(text)
    except InvalidOperation:
        raise invalid_cursor() from None
    if not volume.is_finite() or not -10**30 < volume < 10**30 or volume.as_tuple().exponent < -8:
        raise invalid_cursor()
    return volume


def _top_after(cursor: str | None) -> tuple[str, Decimal | None] | None:
    """(ticker, volume_24h) of the row a cursor of the top list follows, as its page showed them."""
    position = decode_cursor(TOP_SCOPE, cursor, 2)
    return None if position is None else (position[0], _volume(position[1]))


def _top_position(row: dict) -> list[str]:
    return [row["ticker"], "" if row["volume_24h"] is None else str(row["volume_24h"])]


def _search_after(scope: str, cursor: str | None) -> tuple[str, Decimal | None, str, int] | None:
    """(ticker, volume_24h, name, part) of the row a cursor of this search follows, as its page showed them."""
    position = decode_cursor(scope, cursor, 4)
    if position is None:
        return None
    ticker, volume, name, part = position
    if part not in ("0", "1", "2"):
        raise invalid_cursor()
    return ticker, _volume(volume), name, int(part)


def _search_position(row: dict) -> list[str]:
    return [*_top_position(row), row["name"], str(row["part"])]


TOP_SCOPE = "symbols/top"


def search(query: str, limit: int, cursor: str | None = None) -> Page:
    """Symbols matching `query` as a JSON list; an empty query lists the top symbols. Only first pages
    are cached, with their next cursor."""
    query = validate_query(query)
    if not query:
        return top(limit, cursor)
    pair = compact_pair(query)
    # A ticker-like query searches as its compact pair; anything else (a name) as typed. The cache key (and the
    # cursor's list) folds only ASCII letters, which every search folds alike: str.lower would also join terms
    # that the database's lower() keeps apart (İ and i + U+0307).
    term = pair if is_ticker_like(pair) else query
    key = ascii_lower(term)
    scope = f"symbols?q={key}"
    after = _search_after(scope, cursor)
    lookup = cache.lookup_search(key, limit) if after is None else None
    if lookup is not None and (cached := Page.unpacked(lookup.value)) is not None:
        return cached
    with db.connection() as conn:
        rows = symbol_repository.search_symbols(conn, term, limit, after)
    page = Page.of(_symbol_list.dump_json(_symbol_list.validate_python(_available(rows))), limit, scope,
                   _search_position, rows)
    if lookup is not None:
        cache.fill_search(key, limit, page.packed(), lookup)
    return page


def top(limit: int, cursor: str | None = None) -> Page:
    after = _top_after(cursor)
    lookup = cache.lookup_top_symbols(limit) if after is None else None
    if lookup is not None and (cached := Page.unpacked(lookup.value)) is not None:
        return cached
    with db.connection() as conn:
        rows = symbol_repository.get_top_symbols_by_volume(conn, limit, after)
    page = Page.of(_symbol_list.dump_json(_symbol_list.validate_python(_available(rows))), limit, TOP_SCOPE,
                   _top_position, rows)
    if lookup is not None:
        cache.fill_top_symbols(limit, page.packed(), lookup)
    return page


def get(raw_ticker: str) -> bytes:
    ticker = normalize_ticker(raw_ticker)
    lookup = cache.lookup_symbol(ticker)
    if lookup.value is not None:
        return lookup.value
    with db.connection() as conn:
        row = symbol_repository.get_symbol_by_ticker(conn, ticker)
    if row is None:
        raise NotFound(f"unknown symbol {ticker}", code="symbol_not_found")
    body = Symbol.model_validate(_available([row])[0]).model_dump_json().encode()
    cache.fill_symbol(ticker, body, lookup)
    return body


def retire(raw_ticker: str, retired: bool = True) -> tuple[str, bool]:
    """Retire a symbol (no forecasts: 404 symbol_inactive; hidden from searches and top lists; no refresh), or end its
    retirement: (its ticker, whether the cache took the change; else searches and top lists show the old state up
    to cache.SYMBOLS_STALE_SECONDS). NotFound for an unknown one; Conflict to end the retirement of one not retired."""
    ticker = normalize_ticker(raw_ticker)
    with db.connection() as conn:
        was_retired = symbol_repository.set_retired(conn, ticker, retired)
    if was_retired is None:
        raise NotFound(f"unknown symbol {ticker}", code="symbol_not_found")
    if not retired and not was_retired:
        raise Conflict(f"{ticker} is not retired; nothing changed (an inactive one left Polygon's listing, and the "
                       "refresh makes it active again if it comes back)", code="symbol_not_retired")
    return ticker, cache.invalidate_symbols(retry=True)
