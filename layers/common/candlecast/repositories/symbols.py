"""Queries on the symbols table."""

from collections.abc import Iterable

import psycopg
from psycopg.types.json import Jsonb

from candlecast.schemas import SymbolCreate

SYMBOL_COLUMNS = ("ticker, name, base_currency, quote_currency, market, volume_24h, volume_rank, is_active, "
                  "updated_at, COALESCE(metadata->'candle_timeframes', '[]'::jsonb) AS candle_timeframes")

_UPSERT = """
INSERT INTO symbols (ticker, name, base_currency, quote_currency, market, volume_24h, volume_rank, is_active, metadata)
VALUES (%(ticker)s, %(name)s, %(base_currency)s, %(quote_currency)s, %(market)s, %(volume_24h)s, %(volume_rank)s,
        %(is_active)s, %(metadata)s)
ON CONFLICT (ticker) DO UPDATE SET
    name = EXCLUDED.name,
    base_currency = EXCLUDED.base_currency,
    quote_currency = EXCLUDED.quote_currency,
    market = EXCLUDED.market,
    volume_24h = EXCLUDED.volume_24h,
    volume_rank = EXCLUDED.volume_rank,
    is_active = EXCLUDED.is_active,
    metadata = symbols.metadata || EXCLUDED.metadata,
    updated_at = now()
"""


def _params(symbol: SymbolCreate) -> dict:
    return {**symbol.model_dump(), "metadata": Jsonb(symbol.metadata)}


SYMBOL_BY_TICKER = f"SELECT id, {SYMBOL_COLUMNS} FROM symbols WHERE ticker = %s"


def get_symbol_by_ticker(conn: psycopg.Connection, ticker: str) -> dict | None:
    return conn.execute(SYMBOL_BY_TICKER, (ticker,)).fetchone()


# Three bounded lookups, each reading at most offset + limit rows in index order, merged: exact ticker or base
# (few rows, by volume), then ticker prefix in ticker order, then name prefix in name order. Prefixes are
# byte ranges (~>=~ ~<~, the text_pattern_ops indexes' operators), which a generic plan can still use.
_SEARCH = f"""
WITH exact AS (
    SELECT *, 0 AS exactness, row_number() OVER (ORDER BY volume_24h DESC NULLS LAST, ticker) AS position
    FROM (SELECT * FROM symbols WHERE is_active AND (ticker = %(ticker)s OR base_currency = %(base)s)
          ORDER BY volume_24h DESC NULLS LAST, ticker LIMIT %(window)s) e
), by_ticker AS (
    SELECT *, 1 AS exactness, row_number() OVER () AS position
    FROM (SELECT * FROM symbols WHERE is_active AND ticker ~>=~ %(ticker)s AND ticker ~<~ %(ticker_end)s
          ORDER BY ticker USING ~<~ LIMIT %(window)s) t
), by_name AS (
    SELECT *, 2 AS exactness, row_number() OVER () AS position
    FROM (SELECT * FROM symbols WHERE is_active AND lower(name) ~>=~ %(name)s AND lower(name) ~<~ %(name_end)s
          ORDER BY lower(name) USING ~<~ LIMIT %(window)s) n
)
SELECT {SYMBOL_COLUMNS} FROM (
    SELECT DISTINCT ON (ticker) * FROM (
        SELECT * FROM exact UNION ALL SELECT * FROM by_ticker UNION ALL SELECT * FROM by_name) found
    ORDER BY ticker, exactness, position
) first_match
ORDER BY exactness, position
LIMIT %(limit)s OFFSET %(offset)s
"""


def prefix_range(prefix: str) -> tuple[str, str]:
    """[prefix, end): exactly the strings that start with `prefix`, in code-point (byte) order."""
    following = ord(prefix[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates are not characters: skip to the next one
        following = 0xE000
    return prefix, prefix[:-1] + chr(min(following, 0x10FFFF))


def search_symbols(conn: psycopg.Connection, query: str, limit: int, offset: int = 0) -> list[dict]:
    """Active symbols whose ticker (after `X:`) or name starts with `query`, case-insensitively.

    Exact ticker or base currency first (by volume), then ticker prefix (in ticker order), then name prefix
    (in name order). Each part reads at most offset + limit rows, so the cost follows the page, not the matches.
    """
    ticker, ticker_end = prefix_range("X:" + query.upper())
    name, name_end = prefix_range(query.lower())
    return conn.execute(_SEARCH, {"ticker": ticker, "ticker_end": ticker_end, "base": query.upper(), "name": name,
                                  "name_end": name_end, "limit": limit, "offset": offset,
                                  "window": limit + offset}).fetchall()


def set_candle_timeframes(conn: psycopg.Connection, ticker: str, timeframes: Iterable[str]) -> None:
    """Record which timeframes have stored candles (metadata.candle_timeframes)."""
    conn.execute(
        "UPDATE symbols SET metadata = metadata || jsonb_build_object('candle_timeframes', %s::jsonb) "
        "WHERE ticker = %s AND metadata->'candle_timeframes' IS DISTINCT FROM %s::jsonb",
        (Jsonb(list(timeframes)), ticker, Jsonb(list(timeframes))),
    )


def upsert_symbol(conn: psycopg.Connection, symbol: SymbolCreate) -> None:
    conn.execute(_UPSERT, _params(symbol))


def upsert_symbols(conn: psycopg.Connection, symbols: Iterable[SymbolCreate]) -> int:
    """Batch upsert in one round trip per batch (executemany pipelines the statements)."""
    rows = [_params(symbol) for symbol in symbols]
    if rows:
        with conn.transaction(), conn.cursor() as cursor:
            cursor.executemany(_UPSERT, rows)
    return len(rows)


def mark_inactive_except(conn: psycopg.Connection, tickers: Iterable[str]) -> int:
    """Symbols not in `tickers` are marked inactive (never deleted); returns how many changed."""
    cursor = conn.execute(
        "UPDATE symbols SET is_active = false, updated_at = now() WHERE is_active AND NOT (ticker = ANY(%s))",
        (list(tickers),),
    )
    return cursor.rowcount


def get_top_symbols_by_volume(conn: psycopg.Connection, limit: int, offset: int = 0) -> list[dict]:
    return conn.execute(
        f"SELECT {SYMBOL_COLUMNS} FROM symbols WHERE is_active "
        "ORDER BY volume_24h DESC NULLS LAST, ticker LIMIT %s OFFSET %s",
        (limit, offset),
    ).fetchall()
