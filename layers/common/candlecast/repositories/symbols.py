"""Queries on the symbols table."""

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal

import psycopg
from psycopg.types.json import Jsonb

from candlecast.repositories import wait_for_locks_at_most
from candlecast.schemas import SymbolCreate
from candlecast.tickers import ascii_upper

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
    is_active = EXCLUDED.is_active AND NOT COALESCE((symbols.metadata->>'retired')::boolean, false),
    metadata = symbols.metadata || EXCLUDED.metadata,
    updated_at = now()
"""


def _params(symbol: SymbolCreate) -> dict:
    return {**symbol.model_dump(), "metadata": Jsonb(symbol.metadata)}


SYMBOL_BY_TICKER = f"SELECT id, {SYMBOL_COLUMNS} FROM symbols WHERE ticker = %s"


def get_symbol_by_ticker(conn: psycopg.Connection, ticker: str) -> dict | None:
    return conn.execute(SYMBOL_BY_TICKER, (ticker,)).fetchone()


# Three keyset lookups, each reading at most `limit` rows in index order after the page's anchor (the sort values
# of the last row the previous page showed, as that page showed them: its cursor holds them), then merged: exact
# ticker or base (few rows, by volume), then the other ticker-prefix matches in ticker order, then the remaining
# name-prefix matches in name order. The name lookup runs only when the first two leave the page short. Prefixes
# are byte ranges (~>=~ ~<~, the text_pattern_ops indexes' operators), which a generic plan can still use.
# The name term is lowered by the database's lower(), as the index's lower(name) is: Python's str.lower folds
# some letters otherwise (İ to i and a combining dot, where PostgreSQL gives a plain i). Its range ends at the
# term with its last code point the next one (prefix_range, in SQL).
_EXACT = "(ticker = %(ticker)s OR base_currency = %(base)s)"
_TICKER_PREFIX = "(ticker ~>=~ %(ticker)s AND ticker ~<~ %(ticker_end)s)"


def _search_statement(after: bool) -> str:
    anchor, exact_after, ticker_after, name_after = "", "", "", ""
    if after:
        anchor = """anchor AS (
    SELECT %(after)s::text AS ticker, %(after_volume)s::numeric AS volume_24h, lower(%(after_name)s::text) AS name,
           %(after_part)s::integer AS part
), """
        exact_after = f"""AND (SELECT part FROM anchor) = 0 AND {_AFTER_BY_VOLUME}"""
        ticker_after = """AND (SELECT part FROM anchor) <= 1
                          AND ticker ~>~ (SELECT CASE WHEN part = 1 THEN ticker ELSE '' END FROM anchor)"""
        name_after = """AND lower(name) ~>=~ (SELECT CASE WHEN part = 2 THEN name ELSE '' END FROM anchor)
          AND ((SELECT part FROM anchor) < 2 OR lower(name) ~>~ (SELECT name FROM anchor)
               OR ticker > (SELECT ticker FROM anchor))"""
    return f"""
WITH {anchor}term AS (
    SELECT folded AS name, left(folded, -1) || chr(CASE ascii(right(folded, 1)) WHEN 55295 THEN 57344
                                                   WHEN 1114111 THEN 1114111 ELSE ascii(right(folded, 1)) + 1 END)
           AS name_end
    FROM (SELECT lower(%(name)s::text) AS folded) typed
), exact AS (
    SELECT *, 0 AS part, row_number() OVER () AS position
    FROM (SELECT * FROM symbols WHERE is_active AND {_EXACT} {exact_after}
          ORDER BY volume_24h DESC NULLS LAST, ticker LIMIT %(limit)s) e
), by_ticker AS (
    SELECT *, 1 AS part, row_number() OVER () AS position
    FROM (SELECT * FROM symbols WHERE is_active AND {_TICKER_PREFIX} AND NOT {_EXACT} {ticker_after}
          ORDER BY ticker USING ~<~ LIMIT %(limit)s) t
), by_name AS (
    SELECT *, 2 AS part, row_number() OVER () AS position
    FROM (SELECT * FROM symbols
          WHERE (SELECT count(*) FROM exact) + (SELECT count(*) FROM by_ticker) < %(limit)s
            AND is_active AND lower(name) ~>=~ (SELECT name FROM term)
            AND lower(name) ~<~ (SELECT name_end FROM term)
            AND NOT {_EXACT} AND NOT {_TICKER_PREFIX} {name_after}
          ORDER BY lower(name) USING ~<~, ticker LIMIT %(limit)s) n
)
SELECT {SYMBOL_COLUMNS}, part
FROM (SELECT * FROM exact UNION ALL SELECT * FROM by_ticker UNION ALL SELECT * FROM by_name) found
ORDER BY part, position
LIMIT %(limit)s
"""


# After the anchor in (volume_24h DESC NULLS LAST, ticker) order.
_AFTER_BY_VOLUME = """CASE WHEN (SELECT volume_24h FROM anchor) IS NULL
         THEN volume_24h IS NULL AND ticker > (SELECT ticker FROM anchor)
         ELSE volume_24h IS NULL OR volume_24h < (SELECT volume_24h FROM anchor)
              OR (volume_24h = (SELECT volume_24h FROM anchor) AND ticker > (SELECT ticker FROM anchor)) END"""
_SEARCH = {False: _search_statement(False), True: _search_statement(True)}


def prefix_range(prefix: str) -> tuple[str, str]:
    """[prefix, end): exactly the strings that start with `prefix`, in code-point (byte) order."""
    following = ord(prefix[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates are not characters: skip to the next one
        following = 0xE000
    return prefix, prefix[:-1] + chr(min(following, 0x10FFFF))


def search_symbols(conn: psycopg.Connection, query: str, limit: int,
                   after: tuple[str, Decimal | None, str, int] | None = None) -> list[dict]:
    """Active symbols whose ticker (after `X:`) or name starts with `query`, case-insensitively (ASCII letters
    for the ticker, the database's lower() for the name), after the
    position `after` (ticker, volume_24h, name, part of the last row a page showed; the first page without one).

    Exact ticker or base currency first (part 0, by volume), then ticker prefix (1, in ticker order), then name
    prefix (2, in name order); each row says its `part`. Each part reads at most `limit` rows after the anchor,
    so the cost follows the page, not the matches nor the depth.
    """
    base = ascii_upper(query)  # tickers are ASCII: str.upper would fold ı into I and ſ into S
    ticker, ticker_end = prefix_range("X:" + base)
    anchor = dict(zip(("after", "after_volume", "after_name", "after_part"), after or (None,) * 4, strict=True))
    return conn.execute(_SEARCH[after is not None], {
        "ticker": ticker, "ticker_end": ticker_end, "base": base, "name": query, "limit": limit, **anchor}).fetchall()


def set_candle_timeframes(conn: psycopg.Connection, ticker: str, timeframes: Iterable[str],
                          stored_through: dict[str, str], *, lock_timeout: float) -> None:
    """Record which timeframes have stored candles (metadata.candle_timeframes) and the open time of each one's
    last stored candle (metadata.candles_through, ISO 8601), up to which the track record can score. A run over
    some timeframes keeps the others' entries. Waits at most `lock_timeout` seconds for a row another session
    holds (psycopg.errors.LockNotAvailable)."""
    with conn.transaction():
        wait_for_locks_at_most(conn, lock_timeout)
        conn.execute(
            """
            UPDATE symbols SET metadata = updated.metadata
            FROM (SELECT id, metadata || jsonb_build_object(
                      'candle_timeframes', %(timeframes)s::jsonb,
                      'candles_through', COALESCE(metadata->'candles_through', '{}'::jsonb) || %(through)s::jsonb)
                      AS metadata
                  FROM symbols WHERE ticker = %(ticker)s) updated
            WHERE symbols.id = updated.id AND symbols.metadata IS DISTINCT FROM updated.metadata
            """,
            {"timeframes": Jsonb(list(timeframes)), "through": Jsonb(stored_through), "ticker": ticker},
        )


def newest_stored_candle(conn: psycopg.Connection) -> datetime | None:
    """The open time of the newest candle the refresh recorded storing (metadata.candles_through), over every
    active symbol and timeframe; None when none is recorded (a stack only seeded)."""
    return conn.execute(
        """
        SELECT max(through.value::timestamptz) AS newest
        FROM symbols s CROSS JOIN LATERAL jsonb_each_text(
            CASE WHEN jsonb_typeof(s.metadata->'candles_through') = 'object' THEN s.metadata->'candles_through'
                 ELSE '{}'::jsonb END) AS through
        WHERE s.is_active
        """
    ).fetchone()["newest"]


def upsert_symbol(conn: psycopg.Connection, symbol: SymbolCreate) -> None:
    conn.execute(_UPSERT, _params(symbol))


def upsert_symbols(conn: psycopg.Connection, symbols: Iterable[SymbolCreate]) -> int:
    """Batch upsert in one round trip per batch (executemany pipelines the statements)."""
    rows = [_params(symbol) for symbol in symbols]
    if rows:
        with conn.transaction(), conn.cursor() as cursor:
            cursor.executemany(_UPSERT, rows)
    return len(rows)


def count_active(conn: psycopg.Connection, tickers: Iterable[str]) -> tuple[int, int]:
    """(active symbols, active symbols not in `tickers`): how many a `mark_inactive_except(tickers)` would change."""
    row = conn.execute(
        "SELECT count(*) AS active, count(*) FILTER (WHERE NOT (ticker = ANY(%s))) AS vanished FROM symbols "
        "WHERE is_active",
        (list(tickers),),
    ).fetchone()
    return int(row["active"]), int(row["vanished"])


def get_listed(conn: psycopg.Connection, tickers: Iterable[str]) -> set[str]:
    """Those of `tickers` the table has, active or not."""
    rows = conn.execute("SELECT ticker FROM symbols WHERE ticker = ANY(%s)", (list(tickers),)).fetchall()
    return {row["ticker"] for row in rows}


def get_volumes(conn: psycopg.Connection, tickers: Iterable[str]) -> dict[str, Decimal]:
    """The stored volume_24h of each of `tickers` that has one."""
    rows = conn.execute("SELECT ticker, volume_24h FROM symbols WHERE ticker = ANY(%s) AND volume_24h IS NOT NULL",
                        (list(tickers),)).fetchall()
    return {row["ticker"]: row["volume_24h"] for row in rows}


def set_retired(conn: psycopg.Connection, ticker: str, retired: bool) -> bool | None:
    """An operator's retirement (metadata.retired, kept by every refresh: it stays inactive though still listed), or
    the end of one (active again; the next refresh marks it inactive if the listing lacks it): whether it was retired
    before, None for no such symbol. Ending the retirement of a symbol that was not retired changes nothing (one the
    refresh marked inactive stays so)."""
    row = conn.execute(
        """
        UPDATE symbols SET metadata = symbols.metadata || jsonb_build_object('retired', %(retired)s),
                           is_active = NOT %(retired)s, updated_at = now()
        FROM (SELECT id, COALESCE((metadata->>'retired')::boolean, false) AS retired FROM symbols
              WHERE ticker = %(ticker)s FOR UPDATE) before
        WHERE symbols.id = before.id AND (%(retired)s OR before.retired)
        RETURNING before.retired
        """, {"ticker": ticker, "retired": retired}).fetchone()
    if row is not None:
        return row["retired"]
    return None if get_symbol_by_ticker(conn, ticker) is None else False


def mark_inactive_except(conn: psycopg.Connection, tickers: Iterable[str]) -> int:
    """Symbols not in `tickers` are marked inactive (never deleted); returns how many changed."""
    cursor = conn.execute(
        "UPDATE symbols SET is_active = false, updated_at = now() WHERE is_active AND NOT (ticker = ANY(%s))",
        (list(tickers),),
    )
    return cursor.rowcount


_TOP = f"""SELECT {SYMBOL_COLUMNS} FROM symbols WHERE is_active
ORDER BY volume_24h DESC NULLS LAST, ticker LIMIT %(limit)s"""
# After the anchor (the last row's volume and ticker as its page showed them): the rows with a volume through
# symbols_active_volume_idx from the anchor's down, then those without one (new symbols, few) in ticker order.
_TOP_AFTER = f"""
WITH anchor AS (SELECT %(after)s::text AS ticker, %(after_volume)s::numeric AS volume_24h)
SELECT {SYMBOL_COLUMNS} FROM (
    (SELECT * FROM symbols WHERE is_active AND volume_24h <= (SELECT volume_24h FROM anchor)
       AND (volume_24h < (SELECT volume_24h FROM anchor) OR ticker > (SELECT ticker FROM anchor))
     ORDER BY volume_24h DESC NULLS LAST, ticker LIMIT %(limit)s)
    UNION ALL
    (SELECT * FROM symbols WHERE is_active AND volume_24h IS NULL
       AND ((SELECT volume_24h FROM anchor) IS NOT NULL OR ticker > (SELECT ticker FROM anchor))
     ORDER BY ticker LIMIT %(limit)s)
) s
ORDER BY volume_24h DESC NULLS LAST, ticker LIMIT %(limit)s"""


def get_top_symbols_by_volume(conn: psycopg.Connection, limit: int,
                              after: tuple[str, Decimal | None] | None = None) -> list[dict]:
    """Active symbols by 24 h volume, after the position `after` (ticker, volume_24h of the last row a page
    showed)."""
    if after is None:
        return conn.execute(_TOP, {"limit": limit}).fetchall()
    return conn.execute(_TOP_AFTER, {"limit": limit, "after": after[0], "after_volume": after[1]}).fetchall()
