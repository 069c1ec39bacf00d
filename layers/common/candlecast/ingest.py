"""Polygon ingestion: the symbol universe ranked by 24 h traded value in USD, and candles for the top N in S3.

- Symbols: every active crypto reference ticker is upserted with volume_24h (USD: v * vw from the grouped
  daily bars, at the day's rate of the quote currency) and volume_rank (1 = largest); tickers that disappear
  are marked inactive, unless the listing may be cut short (`inactivation_refusal`).
- Candles: 1h and 1d bars from Polygon; 4h, 1w and 1m resampled from them with the sample data's
  resampler (candlecast.forecast.dataset.resample). Later runs fetch the bars after the last stored
  one and again the REFETCH_DAYS before it (bars Polygon fills in or corrects later replace the stored
  ones; older candles are left as they are); each file is merged (dedup by open_time) and replaced by
  one PUT, so a failed or killed run leaves every file either as it was or complete, and only over the version
  read: a file another writer replaced meanwhile is merged into again (`_ingest_source`).
- Any symbol: fetch_recent_candles() serves predictions for symbols without a Parquet file, and
  caught_up_candles() adds to a stored file's candles those that closed since the last refresh.

numpy is imported lazily: `candlecast --help` and the CLI registration stay light.
"""

import argparse
import math
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, NamedTuple

from aws_lambda_powertools import Logger
from pydantic import AfterValidator, Field, ValidationError

from candlecast import cache, redaction
from candlecast.errors import (
    BadRequest,
    CandlecastError,
    CandleFileInvalid,
    FileChanged,
    NotFound,
    ServiceUnavailable,
)
from candlecast.polygon import (
    PolygonAuthError,
    PolygonBadResponse,
    PolygonClient,
    PolygonDeadline,
    PolygonError,
    PolygonNotEntitled,
    PolygonNotFound,
    PolygonRateLimited,
    PolygonRejected,
)
from candlecast.schemas import InvocationEvent
from candlecast.tickers import normalize_ticker, split_pair
from candlecast.timeframes import TIMEFRAMES, Timeframe, nominal_seconds

if TYPE_CHECKING:
    from candlecast.candles import Candles
    from candlecast.schemas import SymbolCreate
    from candlecast.storage import CandleFile

logger = Logger(child=True)

DEFAULT_TOP_SYMBOLS = 500
# More than Polygon lists (thousands of crypto pairs): a bigger N is a typo.
MAX_TOP_SYMBOLS = 10_000
DEFAULT_CONCURRENCY = 8
# A worker holds one page of bars at a time (tracemalloc, body and decoded bars): a full one (polygon.AGGREGATES_LIMIT
# bars) peaks at 38 MB compact and 57 MB pretty-printed, and the worst page the client decodes and then refuses at
# 71 MB; 12 workers at that worst and the ~160 MB of loaded modules fit the Refresh function's 1024 MB.
MAX_CONCURRENCY = 12
BATCH_DB_SECONDS = 60  # the symbol refresh upserts thousands of rows in one transaction
# The Polygon bars each timeframe is built from, and how far back a first run reaches.
SOURCE_OF: dict[str, Timeframe] = {"1h": "1h", "4h": "1h", "1d": "1d", "1w": "1d", "1m": "1d"}
POLYGON_SPAN = {"1h": (1, "hour"), "1d": (1, "day")}
DEFAULT_HISTORY_DAYS = {"1h": 730, "1d": 3650}
# Each run asks again for the source bars of the last week before the last stored one: Polygon backfills
# an outage's bars days later (polygon-io/issues#186), and the refresh runs weekly.
REFETCH_DAYS = 7
# Polygon retires a handful of crypto pairs in a week. A listing that would mark more than a tenth of the active
# symbols inactive in one run (and more than MAX_INACTIVATED_ALWAYS, so a small universe can still lose a few) is
# an upstream fault, a listing cut short, not the market: nothing is marked inactive and the summary says so.
MAX_INACTIVATED_SHARE = 0.10
MAX_INACTIVATED_ALWAYS = 10
# Times a source's files are read, merged and written when another writer replaces one of them meanwhile.
WRITE_ATTEMPTS = 3
# A symbols row another session holds fails its record (tried again like any other) after this share of
# DB_POOL_TIMEOUT: the wait holds a pooled connection (Refresh has one), which the other workers wait for no longer
# than DB_POOL_TIMEOUT; the session's own lock_timeout (half of DB_STATEMENT_TIMEOUT: 30 s in Refresh) is far past it.
RECORD_LOCK_WAIT_SHARE = 0.25


class CandleFileNotRebuilt(CandlecastError):
    """A stored candle file that every read refuses (CandleFileInvalid), which the ingest could not rebuild: Polygon
    sent no bars for its source, or they make no whole candle of its timeframe. Left as it was; an operator must
    delete or rewrite it. Trying again in the same run gives the same answer."""

    code = "candle_file_not_rebuilt"


# Failures that trying again cannot mend: a plan's 403, a 404 (no such ticker or route) and any other 4xx but 429,
# and an invalid stored file that Polygon's bars cannot rebuild.
PERMANENT_FAILURES = (PolygonNotEntitled, PolygonNotFound, PolygonRejected, CandleFileNotRebuilt)
BAR_FIELDS: dict[str, tuple[type, ...]] = {"t": (int,), **{key: (int, float) for key in ("o", "h", "l", "c", "v")}}


@dataclass
class IngestSummary:
    symbols_upserted: int = 0
    symbols_inactivated: int = 0
    symbols_kept_active: int = 0  # missing from a listing that was not trusted to retire them (see errors)
    files_written: int = 0
    candles_added: int = 0
    # Bars Polygon sent that no market can print, or timed before 2009 or after now (bars_to_candles): not stored
    bars_dropped: int = 0
    symbols_done: int = 0
    remaining: list[str] = field(default_factory=list)  # not started: the time budget ran out
    failed: list[str] = field(default_factory=list)  # a source failed (twice); its files are unchanged
    unrecorded: list[str] = field(default_factory=list)  # files written, metadata not recorded (twice)
    retried: list[str] = field(default_factory=list)  # failed once in this chunk and were tried again
    retry: list[str] = field(default_factory=list)  # failed once; no time was left to try again: handed on
    # Handed on after the deadline cut them short (this chunk, or an earlier one and not started since): cut short
    # again, they fail instead of being handed on forever (a list whose pages never end).
    cut_short: list[str] = field(default_factory=list)
    # Symbols changed and the cache did not take the invalidation, even tried again at the chunk's end: symbol
    # entries, top lists and searches cached before are served up to cache.SYMBOLS_STALE_SECONDS (see errors).
    symbol_cache_stale: bool = False
    # Candle files written ("TICKER TF") whose cached candles the cache did not drop, even tried again at the chunk's
    # end: their old candles are served up to cache.TTL_SECONDS["candles"] (see errors).
    candle_cache_stale: list[str] = field(default_factory=list)
    # Named in `tickers` but not in the symbols table: their candles are stored, and clients cannot forecast them
    # until a refresh that lists symbols (one without `tickers`) adds them.
    unlisted: list[str] = field(default_factory=list)
    # Outside the top N, refreshed because forecasts of them wait for candles to be scored (refreshed_tickers).
    awaiting_scores: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# --- symbols ------------------------------------------------------------------------------------


def _number(value: object) -> float | None:
    """`value` as a finite float when it is a JSON number (not a bool, a string or a list), else None."""
    if type(value) not in (int, float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer past a float's range
        return None
    return number if math.isfinite(number) else None


def bar_price(bar: dict) -> float:
    """A grouped bar's price in its quote currency: the volume-weighted price, else the close (0 for neither:
    each missing, or not a positive number)."""
    for key in ("vw", "c"):
        price = _number(bar.get(key))
        if price is not None and price > 0:
            return price
    return 0.0


def base_volume(bar: dict) -> float | None:
    """A bar's volume in base units: 0 without one, None when it is not a number of at least 0."""
    if bar.get("v") is None:
        return 0.0
    volume = _number(bar["v"])
    return volume if volume is not None and volume >= 0 else None


def quote_volume(bar: dict) -> float | None:
    """A bar's traded value in the quote currency: base volume times the volume-weighted price; None when the
    volume is not usable (`base_volume`), or there is one and no price."""
    volume, price = base_volume(bar), bar_price(bar)
    return None if volume is None or (volume > 0 and price == 0) else volume * price


def listed_pairs(reference_rows: Iterable[dict]) -> dict[str, tuple[str, str]]:
    """ticker -> (base, quote) as the listing names them (`base_currency_symbol`, `currency_symbol`). A ticker alone
    is ambiguous: X:DOTUSD reads as DOT/USD or DO/TUSD, X:BNBUSD as BNB/USD or BN/BUSD."""
    pairs = {}
    for row in reference_rows:
        if not isinstance(row, dict):
            continue
        ticker, base, quote = row.get("ticker"), row.get("base_currency_symbol"), row.get("currency_symbol")
        if all(isinstance(text, str) and text for text in (ticker, base, quote)):
            pairs[ticker] = (base.upper(), quote.upper())
    return pairs


def pair_of(ticker: str, listed: Mapping[str, tuple[str, str]]) -> tuple[str, str]:
    """(base, quote) of a bar's ticker: the listing's, else read from the ticker (`tickers.split_pair`)."""
    return listed.get(ticker) or split_pair(ticker)


def usd_rates(grouped_rows: Sequence[dict], listed: Mapping[str, tuple[str, str]] | None = None) -> dict[str, float]:
    """USD per unit of each currency the day's bars price: from its own <CUR>USD pair, else, for a quote
    currency without one, across the base traded most against it in USD terms (BTCJPY and BTCUSD give JPY).
    `listed`: each ticker's (base, quote) as the listing names them (`listed_pairs`)."""
    prices: dict[tuple[str, str], tuple[float, float]] = {}  # (base, quote) -> (price, base volume)
    for row in grouped_rows:
        price = bar_price(row)
        if row.get("T") and price > 0:
            prices[pair_of(row["T"], listed or {})] = (price, base_volume(row) or 0.0)
    rates = {"USD": 1.0} | {base: price for (base, quote), (price, _) in prices.items() if quote == "USD"}
    crossings: dict[str, tuple[float, float]] = {}  # quote -> (USD value of the base traded, USD per quote unit)
    for (base, quote), (price, volume) in prices.items():
        if quote not in rates and base in rates:
            value = volume * rates[base]
            if value >= crossings.get(quote, (-1.0, 0.0))[0]:
                crossings[quote] = (value, rates[base] / price)
    return rates | {quote: rate for quote, (_, rate) in crossings.items()}


def visible(text: str) -> str:
    """`text` without control or format characters (Unicode Cc, Cf): a right-to-left override shows "Bitcoin
    \u202eDSU" as "Bitcoin USD", and an escape sequence recolours a terminal that prints it."""
    return "".join(character for character in text if unicodedata.category(character) not in ("Cc", "Cf"))


def _named(ticker: str) -> str:
    """A listed ticker as a problem names it: quoted, and cut at a ticker's length."""
    from candlecast.tickers import MAX_TICKER_LENGTH

    return repr(ticker if len(ticker) <= MAX_TICKER_LENGTH else f"{ticker[:MAX_TICKER_LENGTH]}...")


def rank_symbols(
    reference_rows: Iterable[dict],
    grouped_rows: Iterable[dict],
    stored_volumes: Callable[[list[str]], Mapping[str, Decimal]] | None = None,
) -> tuple[list["SymbolCreate"], list[str]]:
    """SymbolCreate for every reference row, ranked by 24 h traded value in USD (rank 1 = largest; ties by
    ticker): each pair's quote volume at its quote currency's `usd_rates`, 0 where no bar gives one. Returns
    (symbols, problems) where problems name, in our words (no value Polygon sent but the ticker), the rows that
    could not be used, or not wholly: a listed row whose ticker is not usable is left out; a symbol whose bar gives
    no usable traded value (a volume that is no number or is negative, a volume without a price, a value volume_24h
    cannot hold) is kept, active, with the volume stored for it (`stored_volumes`, asked once with those tickers),
    0 without one: one bad print is not the market, and ranked last a top coin would leave the top list and the
    refresh's top N for a week; a name or currency the database cannot store is replaced by the ticker's; a bar
    without a ticker is left out. One absurd row never costs the other symbols their refresh."""
    from candlecast.pagination import storable
    from candlecast.schemas import MAX_VOLUME_24H, SymbolCreate

    grouped_rows, reference_rows = list(grouped_rows), list(reference_rows)
    bars = [row for row in grouped_rows if isinstance(row, dict) and isinstance(row.get("T"), str) and row["T"]]
    listed = listed_pairs(reference_rows)
    rates = usd_rates(bars, listed)
    volumes: dict[str, Decimal | None] = {}  # None: the bar gives no usable traded value
    for row in bars:
        value = quote_volume(row)
        value = None if value is None else value * rates.get(pair_of(row["T"], listed)[1], 0.0)
        usable = value is not None and math.isfinite(value) and 0 <= value < MAX_VOLUME_24H
        volumes[row["T"]] = Decimal(str(round(value, 8))) if usable else None
    unusable = sorted(ticker for ticker, volume in volumes.items() if volume is None)
    stored = stored_volumes(unusable) if unusable and stored_volumes is not None else {}
    candidates, problems, unnamed = [], [], 0
    if len(bars) < len(grouped_rows):
        problems.append(f"grouped daily bars: {len(grouped_rows) - len(bars)} without a ticker were left out")
    for row in reference_rows:
        ticker = row.get("ticker") if isinstance(row, dict) else None
        if not isinstance(ticker, str) or not ticker:
            unnamed += 1
            continue
        volume = volumes.get(ticker, Decimal(0))
        kept = stored.get(ticker) if volume is None else None
        texts = {key: row.get(key) for key in ("name", "base_currency_symbol", "currency_symbol")}
        unstorable = [key for key, value in texts.items() if value is not None and not storable(value)]
        texts.update(dict.fromkeys(unstorable))
        invisible = [key for key, value in texts.items() if isinstance(value, str) and visible(value) != value]
        texts.update({key: visible(texts[key]) or None for key in invisible})
        try:
            base, quote = split_pair(ticker)
            symbol = SymbolCreate(
                ticker=ticker,
                name=(texts["name"] or ticker)[:200],
                base_currency=(texts["base_currency_symbol"] or base).upper()[:16],
                quote_currency=(texts["currency_symbol"] or quote).upper()[:16],
                volume_24h=volume if volume is not None else kept if kept is not None else Decimal(0),
                is_active=True,
                metadata={"source": "polygon"},
            )
        except (ValidationError, ValueError, CandlecastError) as error:  # normalize_ticker raises BadRequest
            problems.append(f"{_named(ticker)}: {str(error).splitlines()[0]}")
            continue
        if volume is None:
            problems.append(f"{_named(ticker)}: its grouped daily bar's volume or price is not usable (no number, "
                            f"negative, or a traded value past {MAX_VOLUME_24H:.0e} USD); "
                            + ("its stored volume was kept" if kept is not None else
                               "no volume is stored for it: ranked as if it traded nothing"))
        if unstorable:
            problems.append(f"{_named(ticker)}: its {' and '.join(unstorable)} is not text the database can store; "
                            "the ticker's own was used")
        if invisible:
            problems.append(f"{_named(ticker)}: its {' and '.join(invisible)} held control or format characters "
                            "(direction overrides, zero-width, terminal escapes): removed")
        candidates.append(symbol)
    if unnamed:
        problems.append(f"listing: {unnamed} rows without a ticker (or one that is not text) were left out")
    candidates.sort(key=lambda symbol: (-symbol.volume_24h, symbol.ticker))
    unique: dict[str, SymbolCreate] = {}
    for symbol in candidates:
        unique.setdefault(symbol.ticker, symbol)
    ranked = [symbol.model_copy(update={"volume_rank": rank}) for rank, symbol in enumerate(unique.values(), 1)]
    return ranked, problems


class SymbolRefresh(NamedTuple):
    upserted: int
    inactivated: int
    problems: list[str]
    kept_active: int = 0  # active symbols missing from the listing that were left active (see `problems`)
    cache_invalidated: bool = True  # False: the cache did not take the invalidation (cache.invalidate_symbols)


def inactivation_refusal(active: int, vanished: int, listing_whole: bool, retire_missing: bool = False) -> str | None:
    """Why `vanished` of the `active` symbols, missing from this listing, must not be marked inactive, or None.
    `retire_missing` (an operator's `ingest --retire-missing`, after a real mass delisting) lifts the share rule."""
    if not vanished:
        return None
    if not listing_whole:
        return (f"listing: its last page was full and had no next page, so it may have stopped early; "
                f"{vanished} symbols missing from it were left active")
    if not retire_missing and vanished > max(MAX_INACTIVATED_ALWAYS, MAX_INACTIVATED_SHARE * active):
        return (f"listing: {vanished} of {active} active symbols are missing from it, more than "
                f"{MAX_INACTIVATED_SHARE:.0%} retire in a week; they were left active (after a real delisting: "
                f"`candlecast ingest --retire-missing`)")
    return None


def _stored_volumes(tickers: list[str]) -> dict[str, Decimal]:
    """The volume_24h stored for each of `tickers` that has one (rank_symbols' `stored_volumes`)."""
    from candlecast import db
    from candlecast.repositories import symbols as symbol_repository

    with db.connection() as conn:
        return symbol_repository.get_volumes(conn, tickers)


def refresh_symbols(client: PolygonClient, *, now: datetime | None = None, retire_missing: bool = False
                    ) -> SymbolRefresh:
    """Upsert every active crypto ticker with its volume and rank; mark the vanished inactive, unless the listing
    is not trusted for that (`inactivation_refusal`)."""
    from candlecast import db
    from candlecast.repositories import symbols as symbol_repository

    reference, listing_whole = client.crypto_listing()
    if not reference:
        # An empty listing is an upstream fault: never let it mark the whole universe inactive.
        raise PolygonBadResponse("Polygon listed no active crypto tickers; symbols left unchanged")
    now = now or datetime.now(UTC)
    grouped: list[dict] = []
    for days_back in (1, 2, 3):  # the last complete UTC day that has bars
        grouped = client.grouped_daily((now - timedelta(days=days_back)).strftime("%Y-%m-%d"))
        if grouped:
            break
    symbols, problems = rank_symbols(reference, grouped, _stored_volumes)
    if not symbols:
        raise PolygonBadResponse(f"none of Polygon's {len(reference)} tickers was usable; symbols left unchanged")
    listed = [symbol.ticker for symbol in symbols]
    inactivated = kept = 0
    with db.connection(budget=BATCH_DB_SECONDS) as conn, conn.transaction():
        active, vanished = symbol_repository.count_active(conn, listed)
        upserted = symbol_repository.upsert_symbols(conn, symbols)
        refusal = inactivation_refusal(active, vanished, listing_whole, retire_missing)
        if refusal is None:
            inactivated = symbol_repository.mark_inactive_except(conn, listed)
        else:
            kept = vanished
            problems.append(refusal)
            logger.warning("symbols not marked inactive", extra={"active": active, "missing": vanished,
                                                                 "listing_whole": listing_whole})
    return SymbolRefresh(upserted, inactivated, problems, kept, cache.invalidate_symbols())


def top_tickers(limit: int) -> list[str]:
    from candlecast import db
    from candlecast.repositories import symbols as symbol_repository

    with db.connection() as conn:
        return [row["ticker"] for row in symbol_repository.get_top_symbols_by_volume(conn, limit)]


def refreshed_tickers(limit: int) -> tuple[list[str], list[str]]:
    """The top `limit` by volume, and up to `limit` others whose forecasts wait for candles to be scored with:
    a forecast of a symbol outside the top list is made from Polygon's candles on demand, which are not stored,
    and Score reads stored files only."""
    from candlecast import db
    from candlecast.repositories import scores as score_repository

    top = top_tickers(limit)
    with db.connection() as conn:
        return top, score_repository.get_tickers_awaiting_candles(conn, top, limit)


# --- candles ------------------------------------------------------------------------------------


def check_bars(bars: Sequence[dict]) -> None:
    """PolygonBadResponse (a 503, remembered on the API path like any upstream failure) for a bar that is not
    an object or lacks one of BAR_FIELDS as a number (`t` an integer): a file is never built from a guess."""
    for number, bar in enumerate(bars, 1):
        if not isinstance(bar, dict):
            raise PolygonBadResponse(f"Polygon sent a bar that is not an object (bar {number} of {len(bars)})")
        for key, kinds in BAR_FIELDS.items():
            if type(bar.get(key)) not in kinds:  # bool is an int subclass: never a price
                what = "an integer" if kinds == (int,) else "a number"
                raise PolygonBadResponse(f"Polygon sent a bar whose {key} is not {what} (bar {number} of {len(bars)})")


# No bar is older than this (2009-01-01, Bitcoin's first block) nor opens more than one step after now: a `t` outside
# is in the wrong unit (seconds land in 1970, microseconds or nanoseconds centuries ahead) or made up.
EARLIEST_BAR_MS = 1_230_768_000_000


# Polygon stamps a crypto day's bar at UTC midnight, or (older bars) at US/Eastern midnight: 04:00Z or 05:00Z.
DAILY_STAMP_OFFSETS = (0, 4 * 3600, 5 * 3600)

# A bar is taken as closed this long after its period ends: trades reported late still change Polygon's aggregate
# in the moments after. Taken at its end, a bar's provisional close was stored, scored for good, and served from the
# cache for the hour (audit). A forecast in a bar's first minute is made from the bar before, and says so
# (data_age_bars 1, stale).
SETTLE_SECONDS = 60


def bars_to_candles(bars: Sequence[dict], step: int, now: int) -> tuple["Candles", int]:
    """Candles from Polygon bars (t in ms), keeping only bars closed and settled by `now` (SETTLE_SECONDS), and
    how many bars were dropped as impossible: a time before EARLIEST_BAR_MS or more than one step after `now` (a
    `t` in seconds or nanoseconds), prices that are not `candles.possible` (zero, negative, a high under the open or
    close, a low over them, a negative volume) or a time off the timeframe's grid. Nothing is made up for them: the
    candle is missing, as in an exchange gap. Bars all of whose times are out of range are a PolygonBadResponse: the
    answer is in another unit, and storing nothing from it without a word would leave the files silently stale."""
    from candlecast.storage import normalize_candles

    candles, dropped = _page_candles(bars, step, now)
    return normalize_candles(candles), dropped


def _page_candles(bars: Sequence[dict], step: int, now: int) -> tuple["Candles", int]:
    """bars_to_candles for one page, not yet sorted nor deduplicated: compact columns (48 bytes a bar) in place of
    the page's decoded objects (about 1 KB a bar), so a list's pages are never all held as objects at once."""
    import numpy as np

    from candlecast.candles import Candles, possible

    check_bars(bars)
    latest = (now + step) * 1000
    timely = [bar for bar in bars if EARLIEST_BAR_MS <= bar["t"] <= latest]
    untimely = len(bars) - len(timely)
    if untimely and not timely:
        raise PolygonBadResponse(f"Polygon sent {len(bars)} bars all timed before 2009 or after now (t is not in "
                                 "milliseconds?)")
    bars = timely
    times = np.fromiter((bar["t"] // 1000 for bar in bars), dtype=np.int64, count=len(bars))
    offsets = times % step
    if step == 86400:
        on_grid = np.isin(offsets, DAILY_STAMP_OFFSETS)
        times -= offsets  # older daily bars were stamped 04:00Z (US/Eastern midnight): label by UTC day
    else:
        on_grid = offsets == 0
    columns = {name: np.fromiter((bar[key] for bar in bars), dtype=np.float64, count=len(bars))
               for name, key in (("open", "o"), ("high", "h"), ("low", "l"), ("close", "c"), ("volume", "v"))}
    closed = times + step + SETTLE_SECONDS <= now
    sound = on_grid & possible(Candles(open_time=times, **columns))
    keep = closed & sound
    candles = Candles(open_time=times[keep], **{name: values[keep] for name, values in columns.items()})
    return candles, int((closed & ~sound).sum()) + untimely


def fetch_candles(client: PolygonClient, ticker: str, source: Timeframe, start: int, now: int, *,
                  stop: float | None = None) -> tuple["Candles", int]:
    """Closed `source` bars of `ticker` opening at or after `start` (epoch seconds), and how many were dropped
    (`bars_to_candles`). No request starts after `stop` (time.monotonic()): PolygonDeadline."""
    import numpy as np

    from candlecast.candles import COLUMNS, Candles
    from candlecast.storage import normalize_candles

    multiplier, timespan = POLYGON_SPAN[source]
    step = nominal_seconds(source)
    # Up to now, not to a step before it: a day's bar stamped at US/Eastern midnight (04:00Z/05:00Z) opens after
    # now - 1 day for the first hours of each UTC day, yet it is the day that just closed once labelled by its UTC
    # day. The bar still open comes too, and `_page_candles` drops it (closed by `now` once floored).
    pages = [_page_candles(bars, step, now) for bars in
             client.aggregate_pages(ticker, multiplier, timespan, start * 1000, now * 1000, stop=stop)]
    candles = normalize_candles(Candles(*(np.concatenate([getattr(page, name) for page, _ in pages])
                                          for name in COLUMNS)))
    dropped = sum(count for _, count in pages)
    if dropped:
        logger.warning("impossible bars dropped", extra={"ticker": ticker, "timeframe": source, "dropped": dropped})
    return candles, dropped


@dataclass
class SymbolIngest:
    files: int = 0
    added: int = 0
    stored_through: dict[str, int] = field(default_factory=dict)  # each stored timeframe's last candle's open time
    bars_dropped: int = 0
    failures: dict[str, Exception] = field(default_factory=dict)  # source timeframe -> why (its files unchanged)
    record_error: Exception | None = None  # files written, metadata not recorded
    cache_stale: list[tuple[str, str]] = field(default_factory=list)  # files written, their cached candles kept

    def cut_short(self) -> bool:
        """A source was not fetched because the run's deadline came first."""
        return any(isinstance(error, PolygonDeadline) for error in self.failures.values())

    def slow(self) -> bool:
        """Cut short by the deadline in its own pages, not by a 429's wait on the whole key."""
        return any(isinstance(error, PolygonDeadline) and not isinstance(error, PolygonRateLimited)
                   for error in self.failures.values())

    def give_up(self) -> None:
        """Cut short a second time: the deadline's failures become the symbol's reason to fail."""
        self.failures = {source: PolygonError(f"cut short by a chunk's deadline in two chunks in a row, its pages not "
                                              f"done ({error})") if isinstance(error, PolygonDeadline) else error
                         for source, error in self.failures.items()}

    def retry_timeframes(self, timeframes: Sequence[Timeframe]) -> list[Timeframe]:
        """The timeframes a second try needs: those built from a source that failed for a reason that may pass
        (not a PERMANENT_FAILURES one: a plan's 403, a 404, another 4xx but 429)."""
        again = {source for source, error in self.failures.items() if not isinstance(error, PERMANENT_FAILURES)}
        return [tf for tf in timeframes if SOURCE_OF[tf] in again]


def ingest_symbol(
    client: PolygonClient,
    ticker: str,
    timeframes: Sequence[Timeframe],
    *,
    now: int,
    history_days: dict[str, int] | None = None,
    stop: float | None = None,
) -> SymbolIngest:
    """Bring one symbol's files up to date. Returns files written, candles added, each stored timeframe's
    last candle's open time (what the track record can score up to), the bars dropped as impossible, and the
    sources that failed. The 1h and 1d sources are independent: one failing leaves the other's files written.

    All pages of a source timeframe are fetched before its files are written, so a failure leaves
    them as they were.
    The source file is written before the files derived from it, and derived files are recomputed
    from the whole source, so a run killed between the two is completed by the next one.
    Raises only PolygonAuthError: the key itself is refused (a 403 on one source is asked about with
    PolygonClient.confirm_key, so the other workers wait for the answer instead of asking for more).
    """
    history_days = {**DEFAULT_HISTORY_DAYS, **(history_days or {})}
    result = SymbolIngest()
    for source in ("1h", "1d"):
        targets = [tf for tf in timeframes if SOURCE_OF[tf] == source]
        if not targets:
            continue
        try:
            _ingest_source(client, ticker, source, targets, now, history_days[source], result, stop)
        except PolygonNotEntitled as error:  # the plan does not cover these bars, or the key is refused
            client.confirm_key()
            result.failures[source] = error
        except PolygonAuthError:
            raise  # every symbol would fail the same way
        except Exception as error:  # the other source is still worth a try
            result.failures[source] = error
    return result


def _ingest_source(client: PolygonClient, ticker: str, source: Timeframe, targets: Sequence[Timeframe], now: int,
                   history_days: int, result: SymbolIngest, stop: float | None) -> None:
    """Merge the new `source` bars into its file, then the `targets` built from it into theirs. Each file is written
    only over the version read (storage.FileChanged otherwise), and the source is checked to be the version the
    targets were built from once they are written: a file another writer replaced meanwhile (an operator's
    put-candles, while this run waited on Polygon) is read and merged again, its replacement kept, with the bars
    already fetched (fetched again only when the file now needs them from another time). WRITE_ATTEMPTS in all, then
    the source fails, its files as the other writer left them."""
    fetched: dict[int, Candles | None] = {}  # the bars from each start asked for
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            _merge_source(client, ticker, source, targets, now, history_days, result, stop, fetched)
            return
        except FileChanged as error:
            logger.info("candle file written by another writer meanwhile", extra={
                "ticker": ticker, "source": source, "attempt": attempt, "error": error.message})
            if attempt == WRITE_ATTEMPTS:
                raise FileChanged(f"the {source} candle files of {ticker} were written by another writer while this "
                                  f"run merged into them, {WRITE_ATTEMPTS} times; they were left as that writer left "
                                  "them") from error


def _merge_source(client: PolygonClient, ticker: str, source: Timeframe, targets: Sequence[Timeframe], now: int,
                  history_days: int, result: SymbolIngest, stop: float | None,
                  fetched: dict[int, "Candles | None"]) -> None:
    from candlecast import storage
    from candlecast.forecast.dataset import resample

    step = nominal_seconds(source)
    stored, invalid = _stored_candles(ticker, source)
    existing = stored.candles
    if existing is not None and len(existing):
        start = max(int(existing.open_time[0]), int(existing.open_time[-1]) + step - REFETCH_DAYS * 86400)
    else:
        start = now - history_days * 86400
        start -= start % step
    if start not in fetched:
        fetched[start] = None
        if start + step <= now:
            fetched[start], dropped = fetch_candles(client, ticker, source, start, now, stop=stop)
            result.bars_dropped += dropped
    new = fetched[start]
    if invalid and (new is None or len(new) == 0):
        raise CandleFileNotRebuilt(f"the stored {source} candle file of {ticker} is not a {source} candle series "
                                   "(every read refuses it), and Polygon sent no bars to rebuild it from; it was "
                                   "left as it was: delete or rewrite it (candlecast put-candles)")
    merged, version = _write_merged(ticker, source, stored, new, result)
    if merged is None:
        return
    not_rebuilt = []
    for target in targets:
        if target == source:
            continue
        current, invalid = _stored_candles(ticker, target)
        if _write_merged(ticker, target, current, resample(merged, source, target), result)[0] is None and invalid:
            not_rebuilt.append(target)
    if set(targets) - {source} and storage.head_etag(storage.candles_key(ticker, source)) != version:
        raise FileChanged(f"the {source} file the other files were built from was replaced since")
    if not_rebuilt:
        raise CandleFileNotRebuilt(f"the stored {' and '.join(not_rebuilt)} candle files of {ticker} are not candle "
                                   f"series of their timeframe (every read refuses them), and the {source} bars make "
                                   "no whole candle of it to rebuild them from; they were left as they were: delete "
                                   "or rewrite them (candlecast put-candles)")


def _write_merged(ticker: str, timeframe: Timeframe, stored: "CandleFile", rows: "Candles | None",
                  result: SymbolIngest) -> tuple["Candles | None", str]:
    """`rows` merged into the file as read (`stored`), written over that version only when they change it (a file
    written since is storage.FileChanged), and the version they are now; (None, "") when there is neither a file
    nor a row."""
    from candlecast import storage

    if stored.candles is None and (rows is None or len(rows) == 0):
        return None, ""
    merged = stored.candles if rows is None else storage.merge_candles(stored.candles, rows)
    version = stored.etag
    if stored.candles is None or not _same(stored.candles, merged):
        written = storage.write_candles(ticker, timeframe, merged, over=stored.etag)
        version = written.etag
        if written.cache_stale:
            result.cache_stale.append((ticker, timeframe))
        result.files += 1
        result.added += len(merged) - (0 if stored.candles is None else len(stored.candles))
    if len(merged):
        result.stored_through[timeframe] = int(merged.open_time[-1])
    return merged, version


def _stored_candles(ticker: str, timeframe: Timeframe) -> tuple["CandleFile", bool]:
    """(the stored file, False), its candles None when there is none, or (no candles and the version refused, True)
    when every read refuses it (`storage.read_candle_file`: CandleFileInvalid): the ingest then rebuilds it from
    Polygon as if it were missing, over that version only, in place of failing the source before asking Polygon,
    and logs one warning naming the key and the problem."""
    from candlecast import storage

    try:
        return storage.read_candle_file(ticker, timeframe, log_invalid=False), False
    except CandleFileInvalid as error:
        logger.warning("invalid candle file: rebuilding it from Polygon",
                       extra={"key": error.key, "ticker": ticker, "timeframe": timeframe, "problem": error.problem})
        return storage.CandleFile(None, error.etag), True


def record_candle_timeframes(ticker: str, stored_through: dict[str, int]) -> bool:
    """Tell clients which timeframes of `ticker` can be forecast from stored candles (Symbol.candle_timeframes),
    and the track record up to which candle each is stored. Whether the cache took the invalidation: top lists and
    searches show candle_timeframes too."""
    from candlecast import db, storage
    from candlecast.config import get_settings
    from candlecast.repositories import symbols as symbol_repository

    timeframes = storage.stored_timeframes(ticker)
    through = {timeframe: datetime.fromtimestamp(at, UTC).isoformat() for timeframe, at in stored_through.items()}
    lock_timeout = get_settings().db_pool_timeout * RECORD_LOCK_WAIT_SHARE
    with db.connection() as conn:
        symbol_repository.set_candle_timeframes(conn, ticker, timeframes, through, lock_timeout=lock_timeout)
    return cache.invalidate_symbols()


def _unlisted(tickers: Sequence[str]) -> list[str]:
    """Those of `tickers` the symbols table lacks, warned about: a targeted refresh stores their candles only.
    None are named while the database is down: the files it writes are then reported unrecorded anyway."""
    from candlecast import db
    from candlecast.errors import DatabaseUnavailable
    from candlecast.repositories import symbols as symbol_repository

    try:
        with db.connection() as conn:
            listed = symbol_repository.get_listed(conn, tickers)
    except DatabaseUnavailable:
        return []
    unlisted = [ticker for ticker in tickers if ticker not in listed]
    if unlisted:
        logger.warning("tickers not in the symbols table: their candles are stored, but clients cannot forecast them "
                       "until a refresh without tickers lists them", extra={"tickers": unlisted})
    return unlisted


def _same(left: "Candles", right: "Candles") -> bool:
    import numpy as np

    from candlecast.candles import COLUMNS

    return len(left) == len(right) and all(np.array_equal(getattr(left, c), getattr(right, c)) for c in COLUMNS)


def run_ingest(
    client: PolygonClient,
    *,
    symbols: int = DEFAULT_TOP_SYMBOLS,
    timeframes: Sequence[Timeframe] = TIMEFRAMES,
    concurrency: int = DEFAULT_CONCURRENCY,
    refresh: bool = True,
    tickers: Sequence[str] | None = None,
    deadline: float | None = None,
    now: int | None = None,
    history_days: dict[str, int] | None = None,
    on_symbol: Callable[[str], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    retried: Sequence[str] = (),
    retire_missing: bool = False,
    symbol_cache_stale: bool = False,
    candle_cache_stale: Sequence[str] = (),
    cut_short: Sequence[str] = (),
) -> IngestSummary:
    """Refresh the symbol table (unless `refresh` is False), then candles for `tickers` or the top
    `symbols` by volume. Starts no new symbol and no new Polygon request at `deadline` (time.monotonic()),
    and lists the symbols not started or cut short there in `remaining`. At a slow rate limit only as many
    symbols run at once as the rate keeps busy (RateLimiter.workers).
    Errors are per symbol and source (listed in `failed`): one bad symbol never stops the run;
    only an authentication error, which every symbol would hit, does: a 401, or a 403 on the symbol
    listing. A 429 whose Retry-After ends past `deadline` (without one: past a list's time budget) holds the whole
    client: symbols not done are listed in `remaining`, with one error naming the wait. A 403 on one symbol's
    bars (its plan does not cover them) fails that source, once the key is known to work
    (PolygonClient.confirm_key).

    A symbol whose source failed for a reason that may pass (anything but a plan's 403, a 404 or another 4xx
    but 429), or whose files were
    written but whose metadata was not recorded, is tried once more at the end of the chunk, for what failed
    only. One the deadline leaves no time for is listed in `retry` and handed on; `retried` names those, which
    get no third try. `cut_short` names symbols an earlier chunk's deadline cut short (its `cut_short`): cut short
    again (not by a 429's wait), they are listed in `failed`, never handed on a third time.

    Symbols that changed while the cache did not take their invalidation (or `symbol_cache_stale`: an earlier
    chunk's) are invalidated again at the end; `symbol_cache_stale` in the summary says that failed too. So are
    candle files written while the cache did not drop their cached candles (and `candle_cache_stale`, an earlier
    chunk's, "TICKER TF" each): `candle_cache_stale` in the summary names those it still did not take."""
    from candlecast import storage

    started = time.monotonic()
    stale_files = {(ticker, timeframe) for ticker, _, timeframe in (item.partition(" ") for item in candle_cache_stale)
                   if timeframe}
    cache_stale = threading.Event()
    if symbol_cache_stale:
        cache_stale.set()
    summary = IngestSummary()
    requests_before = client.requests_made
    now = now if now is not None else int(time.time())
    if refresh:
        refreshed = refresh_symbols(client, now=datetime.fromtimestamp(now, UTC), retire_missing=retire_missing)
        summary.symbols_upserted, summary.symbols_inactivated = refreshed.upserted, refreshed.inactivated
        summary.symbols_kept_active = refreshed.kept_active
        summary.errors += [f"symbol {problem}" for problem in refreshed.problems]
        if not refreshed.cache_invalidated:
            cache_stale.set()
    if tickers is not None:
        todo = list(tickers)
        summary.unlisted = _unlisted(todo)
    else:
        top, summary.awaiting_scores = refreshed_tickers(symbols)
        todo = top + summary.awaiting_scores
    last_try = set(retried)
    cut_before = set(cut_short)
    if on_start is not None:
        on_start(len(todo))  # how many symbols there are: fewer than `symbols` in a small universe

    def work(ticker: str, wanted: Sequence[Timeframe], through: dict[str, int]) -> SymbolIngest | None:
        if (deadline is not None and time.monotonic() >= deadline) or client.rate_limited_past(deadline):
            return None
        result = ingest_symbol(client, ticker, wanted, now=now, history_days=history_days, stop=deadline)
        result.stored_through = {**through, **result.stored_through}
        try:
            if not record_candle_timeframes(ticker, result.stored_through):
                cache_stale.set()
        except Exception as error:  # the files are written: said so, and tried again
            result.record_error = error
        return result

    def count(result: SymbolIngest) -> None:
        summary.files_written += result.files
        summary.candles_added += result.added
        summary.bars_dropped += result.bars_dropped
        stale_files.update(result.cache_stale)

    def settle(ticker: str, result: SymbolIngest) -> None:
        for source, error in result.failures.items():
            summary.errors.append(f"{ticker}: {source} bars: {error}")
            # The CLI's stderr shows the message alone: it names the ticker and the reason (our words, redacted).
            reason = redaction.redact(str(error))
            logger.warning(f"ingest failed for symbol {ticker}: {source} bars: {reason}",
                           extra={"ticker": ticker, "source": source, "error": reason})
        if result.failures:
            summary.failed.append(ticker)
        if result.record_error is not None:
            summary.unrecorded.append(ticker)
            summary.errors.append(f"{ticker}: files written, metadata not recorded: {result.record_error}")
            logger.warning("symbol metadata not recorded", extra={"ticker": ticker,
                                                                  "error": type(result.record_error).__name__})
        if not result.failures and result.record_error is None:
            summary.symbols_done += 1

    concurrency = client.limiter.workers(concurrency)  # at a slow rate, more workers only queue at the limiter
    first_tries: dict[str, SymbolIngest] = {}  # symbols to try again, with their first try's result
    jobs = [(ticker, lambda t=ticker: work(t, timeframes, {})) for ticker in todo]
    for ticker, result in _in_pool(concurrency, jobs):
        if result is None:
            summary.remaining.append(ticker)
            if ticker in cut_before:
                summary.cut_short.append(ticker)
        else:
            count(result)
            if result.slow() and ticker in cut_before:  # a second chunk could not finish it either
                result.give_up()
                settle(ticker, result)
            elif result.cut_short():  # no request starts after the deadline: handed on as not done
                summary.remaining.append(ticker)
                if result.slow() or ticker in cut_before:
                    summary.cut_short.append(ticker)
            elif ticker not in last_try and (result.retry_timeframes(timeframes) or result.record_error is not None):
                first_tries[ticker] = result
                logger.info("symbol to be tried again", extra={"ticker": ticker, "sources": list(result.failures),
                                                               "recorded": result.record_error is None})
            else:
                settle(ticker, result)
        if on_symbol is not None:
            on_symbol(ticker)

    def again(ticker: str, first: SymbolIngest) -> SymbolIngest | None:
        second = work(ticker, first.retry_timeframes(timeframes), first.stored_through)
        if second is not None:
            kept = {source: error for source, error in first.failures.items() if source not in second.failures
                    and isinstance(error, PERMANENT_FAILURES)}
            second.failures = kept | second.failures
        return second

    retries = [(ticker, lambda t=ticker, first=first: again(t, first)) for ticker, first in first_tries.items()]
    summary.retried = list(first_tries)
    for ticker, result in _in_pool(concurrency, retries):
        if result is not None and result.slow() and ticker in cut_before:
            count(result)
            result.give_up()
            settle(ticker, result)
        elif result is None or result.cut_short():
            if result is not None:
                count(result)
                if result.slow():
                    summary.cut_short.append(ticker)
            summary.retry.append(ticker)
        else:
            count(result)
            settle(ticker, result)
    if client.rate_limited_past(deadline) and (summary.remaining or summary.retry):
        # One error for the run, not one per symbol: no request is sent before the key's wait is over.
        summary.errors.append(f"{client.rate_limit_message()}: {len(summary.remaining) + len(summary.retry)} "
                              "symbols handed on")
        logger.warning("polygon rate-limited the key", extra={"retry_after_s": round(client.limiter.held_for)})
    order = {ticker: index for index, ticker in enumerate(todo)}
    for found in (summary.remaining, summary.failed, summary.unrecorded, summary.retry, summary.retried,
                  summary.cut_short):
        found.sort(key=order.__getitem__)
    if cache_stale.is_set() and not cache.invalidate_symbols(retry=True):
        summary.symbol_cache_stale = True
        summary.errors.append(f"cache: symbols changed but the cache did not take their invalidation (tried again at "
                              f"the end of the chunk): they are served up to {cache.SYMBOLS_STALE_SECONDS} s late")
        logger.warning("symbol cache not invalidated", extra={"stale_seconds": cache.SYMBOLS_STALE_SECONDS})
    if stale_files and not storage.forget_cached_candles(storage.candles_key(*pair) for pair in stale_files):
        summary.candle_cache_stale = [f"{ticker} {timeframe}" for ticker, timeframe in sorted(stale_files)]
        seconds = cache.TTL_SECONDS["candles"]
        summary.errors.append(f"cache: {len(stale_files)} candle files written but the cache did not drop their cached "
                              f"candles (tried again at the end of the chunk): the old candles are served up to "
                              f"{seconds} s")
        logger.warning("candle cache not invalidated", extra={"files": len(stale_files), "stale_seconds": seconds})
    summary.requests = client.requests_made - requests_before
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


def _in_pool(concurrency: int, jobs: list[tuple[str, Callable[[], "SymbolIngest | None"]]]
             ) -> Iterator[tuple[str, "SymbolIngest | None"]]:
    """(ticker, result) of each job as it ends, `concurrency` at a time. A PolygonAuthError (every symbol would
    fail the same way) stops queued jobs and is raised; running ones finish their atomic writes. Any other
    error fails that symbol alone (as a failure of its every source)."""
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="ingest") as pool:
        futures = {pool.submit(job): ticker for ticker, job in jobs}
        try:
            for future in as_completed(futures):
                try:
                    result = future.result()
                except PolygonAuthError:
                    raise
                except Exception as error:  # one bad symbol never stops the others
                    result = SymbolIngest(failures={"1h+1d": error})
                yield futures[future], result
        except BaseException:
            for pending in futures:
                pending.cancel()
            raise


def _canonical_ticker(value: str) -> str:
    try:
        return normalize_ticker(value)
    except BadRequest as error:  # pydantic names the field only for a ValueError
        raise ValueError(error.message) from None


EventTicker = Annotated[str, AfterValidator(_canonical_ticker)]


class RefreshEvent(InvocationEvent):
    """The Refresh function's event, every field optional: the schedule's ({}) refreshes the symbol table, then the
    candles of the top `symbols`. An operator may name `tickers` (any form normalize_ticker takes), `timeframes` and
    `concurrency`; the other fields are what a chunk's continuation hands on (`scheduled_refresh`)."""

    function = "refresh"

    symbols: int = Field(DEFAULT_TOP_SYMBOLS, ge=1, le=MAX_TOP_SYMBOLS, strict=True)
    concurrency: int = Field(DEFAULT_CONCURRENCY, ge=1, le=MAX_CONCURRENCY, strict=True)
    timeframes: list[Timeframe] = Field(default_factory=lambda: list(TIMEFRAMES), min_length=1)
    tickers: list[EventTicker] | None = Field(None, max_length=MAX_TOP_SYMBOLS)
    refresh_symbols: bool | None = None  # None: refresh unless `tickers` are given
    retried: list[EventTicker] = Field(default_factory=list)
    cut_short: list[EventTicker] = Field(default_factory=list)
    symbol_cache_stale: bool = False
    candle_cache_stale: list[str] = Field(default_factory=list)  # "TICKER TF" each
    rate_limited_until: float | None = Field(None, allow_inf_nan=False)  # epoch seconds
    chunk: int = Field(1, ge=1, strict=True)
    idle_chunks: int = Field(0, ge=0, strict=True)  # chunks in a row before this one that settled no symbol


def scheduled_refresh(event: object, budget_seconds: float) -> dict:
    """The weekly refresh, one chunk per call: the Lambda passes its remaining time minus a margin.

    `event` is a RefreshEvent (InvalidEvent, before anything runs, when it is not). The first call
    refreshes the symbol table and takes the top N; a continuation passes the `remaining` and `retry` tickers of the
    previous chunk (the latter also as `retried`: their last try), refresh_symbols false and whether the symbols'
    cache is still to be invalidated, and `cut_short`: the symbols a deadline cut short, which fail when cut short
    again (`run_ingest`); `chunk` counts the chunks (1 for the first; past MAX_CHUNKS nothing is handed on), and
    `idle_chunks` those in a row that settled no symbol (at MAX_IDLE_CHUNKS nothing is handed on).
    A 429's Retry-After is carried as `rate_limited_until` (the next chunk may be a new container): no request is
    sent before it. A chunk that starts already held past its deadline hands nothing on (a Lambda chain of chunks
    that each wait no time would spin until the hold ends): its symbols are left to the next scheduled run, said in
    `errors`.
    """
    from candlecast import polygon

    request = RefreshEvent.parse(event)
    client = polygon.get_client()
    if client is None:
        raise PolygonAuthError("no Polygon API key is configured (set POLYGON_API_KEY or its secret ARN)")
    timeframes = request.timeframes
    deadline = time.monotonic() + max(0.0, budget_seconds)
    until = request.rate_limited_until
    if until is not None and until > time.time():
        client.limiter.hold(until - time.time())
        if client.rate_limited_past(deadline) and request.tickers is not None:
            left = request.tickers
            summary = IngestSummary(remaining=left, errors=[
                f"{client.rate_limit_message()} until {datetime.fromtimestamp(until, UTC).isoformat()}: "
                f"{len(left)} symbols not refreshed in this run (the next scheduled run does them)"])
            return summary.as_dict() | {"continuation": None}
    summary = run_ingest(
        client,
        symbols=request.symbols,
        timeframes=timeframes,
        concurrency=request.concurrency,
        refresh=request.tickers is None if request.refresh_symbols is None else request.refresh_symbols,
        tickers=request.tickers,
        deadline=deadline,
        retried=request.retried,
        symbol_cache_stale=request.symbol_cache_stale,
        candle_cache_stale=request.candle_cache_stale,
        cut_short=request.cut_short,
    )
    report = summary.as_dict()
    left = summary.remaining + summary.retry
    report["continuation"] = (
        {"tickers": left, "retried": summary.retry, "timeframes": timeframes, "concurrency": request.concurrency,
         "refresh_symbols": False, "symbol_cache_stale": summary.symbol_cache_stale,
         "candle_cache_stale": summary.candle_cache_stale, "cut_short": summary.cut_short}
        if left else None
    )
    if left and client.limiter.held():
        report["continuation"]["rate_limited_until"] = round(time.time() + client.limiter.held(), 3)
    chunk = request.chunk
    # Settled: refreshed, or failed for good. A chunk that settles none (a key rate-limited throughout: each
    # symbol waits out the hold, asks, and is refused again) hands on the same symbols.
    idle = 0 if summary.symbols_done or summary.failed or summary.unrecorded else request.idle_chunks + 1
    if left and (chunk >= MAX_CHUNKS or idle >= MAX_IDLE_CHUNKS):
        report["continuation"] = None
        why = (f"{chunk} chunks (ingest.MAX_CHUNKS)" if chunk >= MAX_CHUNKS else
               f"{idle} chunks in a row that refreshed no symbol (ingest.MAX_IDLE_CHUNKS)")
        report["errors"].append(f"refresh: stopped after {why} with {len(left)} symbols not refreshed; the next "
                                "scheduled run does them")
        logger.warning("refresh chain stopped", extra={"chunks": chunk, "idle_chunks": idle, "left": len(left)})
    elif left:
        report["continuation"] |= {"chunk": chunk + 1, "idle_chunks": idle}
    return report


# A refresh's chain of chunks ends here whatever is left: a week of 15-minute chunks, when the next weekly run starts.
MAX_CHUNKS = 7 * 24 * 4
# ... or after this many chunks in a row that settled no symbol.
MAX_IDLE_CHUNKS = 3


# --- any symbol ---------------------------------------------------------------------------------


def fetch_recent_candles(ticker: str, timeframe: Timeframe, last_n: int, *, now: int | None = None) -> "Candles":
    """The last `last_n` closed candles of any symbol, straight from Polygon, for symbols with no
    Parquet file. Cached in Redis for 1 h (the fresh-candles cache).

    Raises NotFound when no API key is configured or Polygon has no bars, and PolygonError (503)
    when Polygon fails.
    """
    from candlecast import polygon, storage

    lookup = cache.lookup_candles(ticker, timeframe)
    cached = storage.cached_candles(lookup, last_n)
    if cached is not None:
        return cached
    client = polygon.get_client(interactive=True)
    if client is None:
        raise NotFound(
            f"candles for {ticker} at {timeframe} are unavailable: the symbol has no stored candles and no "
            "Polygon API key is configured to fetch them (set POLYGON_API_KEY)",
            code="candles_unavailable",
        )
    remembered = cache.get_upstream_failure(ticker, timeframe)
    if remembered is not None:
        raise _failure_error(remembered)
    now = now if now is not None else int(time.time())
    candles = _fetch_remembering_failure(client, ticker, timeframe, _recent_start(timeframe, last_n, now), now)
    candles = candles.tail(last_n)
    storage.cache_candles(ticker, timeframe, candles, last_n, lookup)
    return candles


def caught_up_candles(ticker: str, timeframe: Timeframe, stored: "Candles", last_n: int, *, lookup: cache.Lookup,
                      now: int | None = None) -> "Candles":
    """The last `last_n` of the bucket's candles `stored` (oldest first) and those that closed after them, from
    Polygon: the weekly refresh leaves a file up to a week behind, and a 1h forecast from it would end in the
    past. Cached in Redis for 1 h (the fresh-candles cache). Without an API key, or when Polygon fails or has
    nothing newer (remembered 30 s), `stored` as it is: a forecast from older candles, which its
    `last_candle_at` says, beats none. `lookup` is the fresh-candles lookup made before `stored` was read, under
    whose generation they are cached.
    """
    from candlecast import polygon, storage
    from candlecast.timeframes import add_steps

    now = now if now is not None else int(time.time())
    last_open = datetime.fromtimestamp(int(stored.open_time[-1]), UTC)
    if add_steps(last_open, timeframe, 2).timestamp() + SETTLE_SECONDS > now:
        return stored  # the candle after the last stored one has not closed (and settled) yet
    # Far behind (a refresh that stopped), the last `last_n` candles alone; else the last one again (Polygon's
    # later word on it wins, as in the refresh) and those after it.
    start = max(int(last_open.timestamp()), _recent_start(timeframe, last_n, now))
    try:
        client = polygon.get_client(interactive=True)  # its key's secret may be unreadable: served as stale
        if client is None:
            return stored
        remembered = cache.get_upstream_failure(ticker, timeframe)
        if remembered is not None:
            if remembered.get("status") == 404:
                _refuse_wholly_past(ticker, timeframe, last_open, now)
            return stored
        newer = _fetch_remembering_failure(client, ticker, timeframe, start, now, log=False,
                                           newer_than=int(last_open.timestamp()))
    except CandlecastError as error:  # one line for the cause and what was done about it
        if error.status == 404:
            _refuse_wholly_past(ticker, timeframe, last_open, now)
        logger.warning("stale candles served", extra={"ticker": ticker, "timeframe": timeframe,
                                                       "last_candle_at": last_open.isoformat(), "code": error.code,
                                                       "error": getattr(error, "upstream_error", error.message)})
        return stored
    candles = storage.merge_candles(stored, newer).tail(last_n)
    storage.cache_candles(ticker, timeframe, candles, last_n, lookup)
    return candles


def _refuse_wholly_past(ticker: str, timeframe: Timeframe, last_open: datetime, now: int) -> None:
    """NotFound when Polygon has nothing after the stored candles (a coin that stopped trading, still listed) and a
    forecast from them would lie wholly in the past: its 30 steps all closed already. A forecast with some steps
    still to come is served stale (`data_age_bars`); so is any forecast when Polygon fails or no key is set."""
    from candlecast.timeframes import FORECAST_STEPS, closed_since

    if closed_since(last_open, timeframe, datetime.fromtimestamp(now, UTC)) >= FORECAST_STEPS:
        raise NotFound(f"Polygon has no {timeframe} candles for {ticker} after its newest stored one, opened "
                       f"{last_open.isoformat()}: a forecast from it would lie wholly in the past",
                       code="candles_stopped")


def _recent_start(timeframe: Timeframe, last_n: int, now: int) -> int:
    """A UTC midnight early enough for `last_n` closed candles by `now`, plus one partial bucket at each end."""
    start = now - (last_n + 2) * nominal_seconds(timeframe)
    return start - start % 86400


def _fetch_remembering_failure(client: PolygonClient, ticker: str, timeframe: Timeframe, start: int,
                               now: int, *, log: bool = True, newer_than: int | None = None) -> "Candles":
    """The closed `timeframe` candles of `ticker` opening at or after `start`, from its Polygon source bars.

    An empty answer is a NotFound, and so is one with no candle opening after `newer_than` (a catch-up's last
    stored candle, which it asks for again: a coin that stopped trading still has it); any failure is remembered
    for 30 s (`cache.set_upstream_failure`), so
    anonymous clients cannot turn one failing symbol into a stream of calls, and raised in our words, with the
    upstream's own message as `upstream_error`. Logged here unless `log` is False (a caller that logs the
    failure with what it did about it: one line per cause)."""
    from candlecast.forecast.dataset import resample

    source = SOURCE_OF[timeframe]
    try:
        bars = fetch_candles(client, ticker, source, start, now)[0]
        candles = resample(bars, source, timeframe) if len(bars) else bars
        if len(bars) and not len(candles):  # a coin listed days ago: no whole week or month yet
            raise NotFound(f"{ticker} has {len(bars)} {source} candles at Polygon, too few for one whole {timeframe} "
                           "candle", code="too_little_history")
        if len(candles) == 0 or (newer_than is not None and int(candles.open_time[-1]) <= newer_than):
            raise NotFound(f"Polygon has no recent {timeframe} candles for {ticker}", code="candles_unavailable")
    except CandlecastError as error:
        if log:
            logger.warning("upstream fetch failed", extra={"ticker": ticker, "timeframe": timeframe,
                                                            "code": error.code, "error": error.message})
        message = (error.message if error.code == "too_little_history" else
                   f"Polygon has no recent {timeframe} candles for {ticker}" if error.status == 404 else
                   f"{timeframe} candles for {ticker} could not be fetched from Polygon; try again later")
        ttl = cache.set_upstream_failure(ticker, timeframe, error.status, error.code, message)
        failure = _failure_error({"status": error.status, "code": error.code, "message": message,
                                  "until": time.time() + ttl})
        failure.upstream_error = error.message
        raise failure from None
    return candles


def _failure_error(failure: dict) -> CandlecastError:
    """The client's error for a remembered upstream failure: our words, never the upstream's."""
    code, message = str(failure.get("code", "polygon_unavailable")), str(failure.get("message", ""))
    if failure.get("status") == 404:
        return NotFound(message, code=code)
    # Written by any container: a clock running ahead must not ask for more than the entry is kept.
    seconds = min(float(failure.get("until", 0)) - time.time(), cache.TTL_SECONDS["upstream_failure"])
    return ServiceUnavailable(message, code=code, retry_after=max(1, math.ceil(seconds)))


# --- CLI ----------------------------------------------------------------------------------------


def _timeframes(value: str) -> list[Timeframe]:
    chosen = [item.strip() for item in value.replace(",", " ").split() if item.strip()]
    unknown = [item for item in chosen if item not in TIMEFRAMES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"timeframes must be among {', '.join(TIMEFRAMES)}")
    return chosen  # type: ignore[return-value]


def _command(args: argparse.Namespace) -> int:
    import json

    from candlecast import polygon
    from candlecast.config import get_settings, polygon_api_key

    settings = get_settings()
    api_key = polygon_api_key(settings)
    if not api_key:
        print("candlecast ingest: no Polygon API key is configured (set POLYGON_API_KEY)")
        return 2
    client = polygon.PolygonClient(api_key, settings.polygon_base_url, max_rps=args.max_rps or settings.polygon_max_rps)
    timeframes = [tf for group in args.timeframes for tf in group] if args.timeframes else list(TIMEFRAMES)
    from tqdm import tqdm

    bar = tqdm(total=None, desc="ingest", unit="symbol")

    def start(symbols: int) -> None:
        bar.total = symbols  # the symbols there are, not --symbols: a universe of 7 stopped the bar at 7/20
        bar.refresh()
    try:
        summary = run_ingest(
            client,
            symbols=args.symbols,
            timeframes=timeframes,
            concurrency=args.concurrency,
            refresh=not args.skip_symbols,
            retire_missing=args.retire_missing,
            on_symbol=lambda _ticker: bar.update(1),
            on_start=start,
        )
    finally:
        bar.close()
        client.close()
    report = summary.as_dict()
    report["remaining"] = len(summary.remaining)
    if len(summary.errors) > 50:
        report["errors"] = [*summary.errors[:50], f"... {len(summary.errors) - 50} more"]
    print(json.dumps(report, indent=2))
    return 1 if summary.errors else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from candlecast.cli import positive_float, positive_int_up_to

    parser = subparsers.add_parser("ingest", help="refresh symbols and candles from Polygon (Massive)")
    parser.add_argument("--symbols", type=positive_int_up_to(MAX_TOP_SYMBOLS), default=DEFAULT_TOP_SYMBOLS,
                        help=f"how many top symbols by volume (at most {MAX_TOP_SYMBOLS})")
    parser.add_argument("--timeframes", type=_timeframes, nargs="+", help="e.g. 1h 1d (default: all five)")
    parser.add_argument("--concurrency", type=positive_int_up_to(MAX_CONCURRENCY), default=DEFAULT_CONCURRENCY,
                        help=f"parallel symbols (at most {MAX_CONCURRENCY}, as in the Refresh function)")
    parser.add_argument("--max-rps", type=positive_float, default=None,
                        help="request rate cap (free tier: 0.083; paid: under 100; default POLYGON_MAX_RPS or 50)")
    parser.add_argument("--skip-symbols", action="store_true", help="keep the symbol table; only fetch candles")
    parser.add_argument("--retire-missing", action="store_true",
                        help="mark inactive every symbol missing from a whole listing, however many (the weekly "
                             "refresh refuses more than a tenth: after a real mass delisting)")
    parser.set_defaults(func=_command)
