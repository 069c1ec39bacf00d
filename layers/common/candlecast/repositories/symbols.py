"""Queries on the symbols table."""

from collections.abc import Iterable

import psycopg
from psycopg.types.json import Jsonb

from candlecast.schemas import SymbolCreate

SYMBOL_COLUMNS = "ticker, name, base_currency, quote_currency, market, volume_24h, volume_rank, is_active, updated_at"

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


def search_symbols(conn: psycopg.Connection, query: str, limit: int, offset: int = 0) -> list[dict]:
    """Active symbols whose ticker (after `X:`) or name starts with `query`, case-insensitively.

    Ranked by exactness (exact ticker or base, then ticker prefix, then name prefix), then by volume.
    LIKE wildcards in the query are escaped, so they match themselves.
    """
    pattern = query.upper().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    name_pattern = query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return conn.execute(
        f"""
        SELECT {SYMBOL_COLUMNS},
               CASE WHEN ticker = 'X:' || %(upper)s OR base_currency = %(upper)s THEN 0
                    WHEN ticker LIKE 'X:' || %(pattern)s || '%%' THEN 1
                    ELSE 2 END AS exactness
        FROM symbols
        WHERE is_active
          AND (ticker LIKE 'X:' || %(pattern)s || '%%'
               OR lower(name) LIKE %(name_pattern)s || '%%')
        ORDER BY exactness, volume_24h DESC NULLS LAST, ticker
        LIMIT %(limit)s OFFSET %(offset)s
        """,
        {"upper": query.upper(), "pattern": pattern, "name_pattern": name_pattern, "limit": limit,
         "offset": offset},
    ).fetchall()


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
