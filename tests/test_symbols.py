"""Symbol routes through real v2 events against real PostgreSQL and Redis."""

import time
from uuid import uuid4

import psycopg
import pytest

from candlecast import db
from candlecast.repositories import symbols as symbol_repository
from candlecast.schemas import SymbolCreate
from tests.conftest import invoke, load_event, path_event

pytestmark = pytest.mark.integration

SAMPLE = [
    ("X:BTCUSDT", "Bitcoin", "BTC", "USDT", 9_000_000_000, 1),
    ("X:ETHUSDT", "Ethereum", "ETH", "USDT", 5_000_000_000, 2),
    ("X:BTCUSD", "Bitcoin", "BTC", "USD", 1_000_000_000, 3),
    ("X:BNBUSDT", "Binance Coin", "BNB", "USDT", 700_000_000, 4),
    ("X:BATUSDT", "Basic Attention Token", "BAT", "USDT", 20_000_000, 5),
]


@pytest.fixture
def symbols(clean_db):
    with db.connection() as conn:
        symbol_repository.upsert_symbols(conn, [
            SymbolCreate(ticker=t, name=n, base_currency=b, quote_currency=q, volume_24h=v, volume_rank=r)
            for t, n, b, q, v, r in SAMPLE
        ])
    return SAMPLE


def search(query: str | None = None, limit: str | None = None):
    params = {key: value for key, value in (("q", query), ("limit", limit)) if value is not None}
    event = load_event("symbols_search.json", queryStringParameters=params,
                       rawQueryString="&".join(f"{k}={v}" for k, v in params.items()))
    if not params:
        event.pop("queryStringParameters")
    return invoke("symbols", event)


def test_search_ranks_exact_base_then_volume(symbols):
    status, headers, body = search("btc", "10")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert [item["ticker"] for item in body] == ["X:BTCUSDT", "X:BTCUSD"]


def test_search_matches_name_prefix_case_insensitively(symbols):
    status, _, body = search("basic att")
    assert status == 200
    assert [item["ticker"] for item in body] == ["X:BATUSDT"]


def test_search_accepts_ticker_forms(symbols):
    for form in ("X:ETHUSDT", "eth-usdt", "ETHUSDT", "eth/usdt", "eth_usdt"):
        status, _, body = search(form)
        assert status == 200, form
        assert [item["ticker"] for item in body] == ["X:ETHUSDT"], form


def test_a_name_query_and_a_ticker_query_never_share_a_cache_entry(symbols):
    assert search("x:Basic Attention")[2] == []  # "X:" plus a name matches no ticker and no name
    status, _, body = search("Basic Attention")
    assert status == 200
    assert [item["ticker"] for item in body] == ["X:BATUSDT"]


def test_search_limit_is_applied(symbols):
    status, _, body = search("b", "2")
    assert status == 200
    assert len(body) == 2


def test_empty_query_lists_top_symbols(symbols):
    status, _, body = search(None, "3")
    assert status == 200
    assert [item["ticker"] for item in body] == ["X:BTCUSDT", "X:ETHUSDT", "X:BTCUSD"]


def test_top_ranked_by_volume_and_cached(symbols, clean_db):
    event = load_event("symbols_top.json", queryStringParameters={"limit": "2"}, rawQueryString="limit=2")
    status, headers, body = invoke("symbols", event)
    assert status == 200
    assert [item["ticker"] for item in body] == ["X:BTCUSDT", "X:ETHUSDT"]
    # The cached list is served as stored, with its cursor, even after the table changes (TTL 1 h).
    with psycopg.connect(clean_db.database_url, autocommit=True) as conn:
        conn.execute("UPDATE symbols SET volume_24h = 1 WHERE ticker = 'X:BTCUSDT'")
    _, cached_headers, cached = invoke("symbols", event)
    assert [item["ticker"] for item in cached] == ["X:BTCUSDT", "X:ETHUSDT"]
    assert cached_headers["X-Next-Cursor"] == headers["X-Next-Cursor"]


def test_a_cached_list_written_without_its_cursor_is_a_miss(symbols):
    from candlecast import cache

    # A body alone, as cached before pages kept cursors
    cache.fill_top_symbols(2, b'[{"ticker": "X:STALE"}]', cache.lookup_top_symbols(2))
    status, headers, body = _list("symbols", "symbols_top.json", limit="2")
    assert status == 200 and [item["ticker"] for item in body] == ["X:BTCUSDT", "X:ETHUSDT"]
    assert "X-Next-Cursor" in headers


@pytest.mark.parametrize("form", ["X:BTCUSD", "BTCUSD", "BTC-USD", "btc-usd"])
def test_get_symbol_normalises_ticker(symbols, form):
    event = path_event("symbol_get.json", f"/symbols/{form}", ticker=form)
    status, _, body = invoke("symbols", event)
    assert status == 200
    assert body["ticker"] == "X:BTCUSD"
    assert body["base_currency"] == "BTC"


def test_unknown_ticker_is_404(symbols):
    event = path_event("symbol_get.json", "/symbols/NOPEUSD", ticker="NOPEUSD")
    status, _, body = invoke("symbols", event)
    assert status == 404
    assert body["error"]["code"] == "symbol_not_found"
    assert "X:NOPEUSD" in body["error"]["message"]


@pytest.mark.parametrize(
    ("query", "limit", "names"),
    [
        ("x" * 65, None, "q"),
        ("btc\x00", None, "control"),
        ("btc\x1b[31m", None, "control"),
        ("btc", "0", "limit"),
        ("btc", "101", "limit"),
        ("btc", "ten", "limit"),
        ("btc", "1e9", "limit"),
        ("btc", "-5", "limit"),
    ],
)
def test_bad_search_input_is_400_naming_the_problem(symbols, query, limit, names):
    status, _, body = search(query, limit)
    assert status == 400
    assert names in body["error"]["message"]


@pytest.mark.parametrize(
    ("ticker", "status", "problem"),
    [("A" * 5000, 400, "32 characters"), ("BTC'; DROP TABLE symbols;--", 400, "letters and digits"),
     ("ÆØÅ", 400, "letters and digits"), ("%25", 400, "letters and digits"),
     ("BTC\x00USD", 404, "no route")],  # API Gateway decodes %00 into the path, which no route takes
)
def test_bad_tickers_are_refused_naming_the_problem(symbols, ticker, status, problem):
    answered, _, body = invoke("symbols", path_event("symbol_get.json", f"/symbols/{ticker}", ticker=ticker))
    assert answered == status
    assert problem in body["error"]["message"]


@pytest.mark.parametrize("query", ["'; DROP TABLE symbols; --", "' OR '1'='1", "%", "_", "\\", "b%", "b_c"])
def test_sql_looking_text_matches_nothing_and_changes_nothing(symbols, clean_db, query):
    status, _, body = search(query)
    assert status == 200
    assert body == []
    with psycopg.connect(clean_db.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM symbols").fetchone()[0] == len(SAMPLE)


def test_unknown_route_is_404_json(symbols):
    status, _, body = invoke("symbols", path_event("symbol_get.json", "/nope"))
    assert status == 404
    assert body["error"]["code"] == "route_not_found"


def test_search_survives_redis_outage(symbols, needs_embedded_redis):
    assert search("eth")[0] == 200
    needs_embedded_redis.stop()
    try:
        started = time.perf_counter()
        for _ in range(5):
            status, _, body = search("bnb")
            assert status == 200
            assert [item["ticker"] for item in body] == ["X:BNBUSDT"]
        assert time.perf_counter() - started < 5
    finally:
        needs_embedded_redis.start()


def test_search_is_503_not_500_when_database_is_down(symbols, needs_embedded_postgres):
    needs_embedded_postgres.stop()
    try:
        status, _, body = search("uncached-query")
        assert status == 503
        assert body["error"]["code"] == "database_unavailable"
    finally:
        needs_embedded_postgres.start()
    # The pool recovers by itself once the database is back.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status, _, body = search("eth")
        if status == 200:
            break
        time.sleep(0.2)
    assert status == 200
    assert [item["ticker"] for item in body] == ["X:ETHUSDT"]


def _list(function: str, event_name: str, **query: str):
    event = load_event(event_name, queryStringParameters=query,
                       rawQueryString="&".join(f"{k}={v}" for k, v in query.items()))
    return invoke(function, event)


@pytest.mark.parametrize("route", ["top", "search"])
def test_a_cursor_walks_every_symbol_beyond_one_hundred(clean_db, route):
    count = 230
    with db.connection() as conn:
        symbol_repository.upsert_symbols(conn, [
            SymbolCreate(ticker=f"X:C{index:03d}USD", name=f"Coin {index}", base_currency=f"C{index:03d}",
                         quote_currency="USD", volume_24h=1_000_000 - index, volume_rank=index + 1)
            for index in range(count)
        ])
    seen, cursor, pages = [], None, 0
    while True:
        query = {"limit": "100", **({"cursor": cursor} if cursor else {})}
        if route == "search":
            query["q"] = "coin"
        status, headers, body = _list("symbols", "symbols_search.json" if route == "search" else "symbols_top.json",
                                      **query)
        assert status == 200, body
        seen.extend(item["ticker"] for item in body)
        pages += 1
        cursor = headers.get("X-Next-Cursor")
        if cursor is None:
            break
    assert pages == 3
    expected = [f"X:C{index:03d}USD" for index in range(count)]  # top: in volume order
    if route == "search":  # name-prefix matches come in name order (index order: the cost follows the page)
        expected.sort(key=lambda ticker: f"coin {int(ticker[3:6])}")
    assert seen == expected  # each once


def walk(function: str, event_name: str, limit: int, cursor: str | None = None, **query: str) -> list[dict]:
    """Every row of a list, page by page through X-Next-Cursor (from `cursor`'s page on, if given)."""
    seen = []
    for _ in range(10_000):
        status, headers, body = _list(function, event_name, limit=str(limit), **query,
                                      **({"cursor": cursor} if cursor else {}))
        assert status == 200, body
        assert len(body) <= limit
        seen.extend(body)
        cursor = headers.get("X-Next-Cursor")
        if cursor is None:
            return seen
    raise AssertionError("the pages never ended")


@pytest.mark.parametrize("route", ["top", "search"])
def test_small_pages_cross_ties_missing_volumes_and_search_parts_in_the_first_pages_order(clean_db, route):
    # Exact matches (base C) with tied and missing volumes, ticker-prefix matches (X:C...), name-prefix matches
    # only ("Coin..." named X:Z...), and symbols that match nothing; pages of 3 cross every boundary.
    rows = [("X:AAAUSD", "Cashew", "C", 500), ("X:BBBUSD", "Cobalt", "C", 500), ("X:DDDUSD", "Cedar", "C", None),
            ("X:EEEUSD", "Cumin", "C", 700), ("X:FFFUSD", "Chive", "C", None)]
    rows += [(f"X:C{index:02d}USD", f"Token {index}", f"C{index:02d}", [100, 100, None, 5][index % 4])
             for index in range(11)]
    rows += [(f"X:Z{index:02d}USD", f"Coin {index % 4}", f"Z{index:02d}", index) for index in range(9)]
    rows += [(f"X:Q{index:02d}USD", "Quince", f"Q{index:02d}", index * 10) for index in range(4)]
    with db.connection() as conn:
        symbol_repository.upsert_symbols(conn, [
            SymbolCreate(ticker=t, name=n, base_currency=b, quote_currency="USD", volume_24h=v)
            for t, n, b, v in rows])
    query = {"q": "c"} if route == "search" else {}
    event_name = "symbols_search.json" if route == "search" else "symbols_top.json"
    status, headers, whole = _list("symbols", event_name, limit="100", **query)
    assert status == 200 and "X-Next-Cursor" not in headers
    assert len(whole) == (25 if route == "search" else len(rows))
    assert walk("symbols", event_name, 3, **query) == whole


def test_a_cursor_walks_predictions_past_ten_thousand_rows_with_ties_once_each_newest_first(seeded):
    # 10,050 predictions of one symbol, five timeframes, every third pair created in the same microsecond.
    with psycopg.connect(seeded.database_url, autocommit=True) as conn:
        symbol_id = conn.execute("SELECT id FROM symbols WHERE ticker = 'X:BTCUSDT'").fetchone()[0]
        conn.execute("""
            INSERT INTO predictions (symbol_id, ticker, timeframe, model_id, last_candle_at, last_close, horizon,
                                     request_hash, created_at)
            SELECT %s, 'X:BTCUSDT', m.timeframe, m.id, now(), 100, 30, md5(i::text),
                   timestamptz '2026-01-01' + (i / 2) * interval '1 second'
            FROM generate_series(1, 10050) i
            JOIN models m ON m.is_active AND m.timeframe = (ARRAY['1h', '4h', '1d', '1w', '1m'])[1 + i %% 5]
        """, (symbol_id,))
        expected = {timeframe: [str(row[0]) for row in conn.execute(
            "SELECT id FROM predictions WHERE symbol_id = %s AND (timeframe = %s OR %s::text IS NULL) "
            "ORDER BY created_at DESC, id DESC", (symbol_id, timeframe, timeframe))] for timeframe in (None, "1d")}
    assert len(expected[None]) == 10_050
    assert walk_predictions(100) == expected[None]
    assert walk_predictions(7, timeframe="1d") == expected["1d"]


def predictions_event(**query: str) -> dict:
    event = path_event("symbol_predictions.json", "/symbols/BTC-USDT/predictions", ticker="BTC-USDT")
    return event | {"queryStringParameters": query, "rawQueryString": "&".join(f"{k}={v}" for k, v in query.items())}


def walk_predictions(limit: int, **query: str) -> list[str]:
    seen, cursor = [], None
    while True:
        event = predictions_event(limit=str(limit), **query, **({"cursor": cursor} if cursor else {}))
        status, headers, body = invoke("symbols", event)
        assert status == 200, body
        seen += [item["id"] for item in body]
        cursor = headers.get("X-Next-Cursor")
        if cursor is None:
            return seen


def _next_cursor(event_name: str, **query: str) -> str:
    status, headers, body = _list("symbols", event_name, limit="1", **query)
    assert status == 200, body
    return headers["X-Next-Cursor"]


def _tampered(cursor: str) -> str:
    middle = len(cursor) // 2
    return cursor[:middle] + ("A" if cursor[middle] != "A" else "B") + cursor[middle + 1:]


def test_a_cursor_that_was_altered_or_given_for_another_list_is_400(symbols):
    import base64

    from candlecast.pagination import _digest, encode_cursor

    top = _next_cursor("symbols_top.json")
    btc = _next_cursor("symbols_search.json", q="btc")
    forged = [encode_cursor("symbols/top", ["X:BTCUSDT", "1", "extra"]),  # a digest that holds, a wrong shape
              encode_cursor("symbols/X:BTCUSDT/predictions?timeframe=", ["yesterday", "not-a-uuid"]),
              encode_cursor("symbols/X:BTCUSDT/predictions?timeframe=", ["2026-01-01T00:00:00", str(uuid4())])]
    # Values the database could not take, under a digest that holds (the digest's key is no secret).
    forged_top = [encode_cursor("symbols/top", position) for position in (
        ["X:BTCUSDT", "many"], ["X:BTCUSDT", "NaN"], ["X:BTCUSDT", "Infinity"], ["X:BTCUSDT", "1e999999"],
        ["X:BTCUSDT", "1E-20000"], ["X:BTCUSDT", "1e30"], ["X:BTC\0USDT", "1"])]
    surrogate = b'["X:BTC\\ud800","1"]'  # JSON can spell a lone surrogate; UTF-8 cannot
    forged_top.append(base64.urlsafe_b64encode(_digest("symbols/top", surrogate) + surrogate).rstrip(b"=").decode())
    forged_search = [encode_cursor("symbols?q=btc", position) for position in (
        ["X:BTCUSDT", "1", "Bitcoin", "3"], ["X:BTCUSDT", "1", "Bitcoin", "x"], ["X:BTCUSDT", "1", "Bit\0", "2"],
        ["X:BTCUSDT", "1", "Bitcoin"], ["X:BTCUSDT", "1e40", "Bitcoin", "0"])]
    cases = [("symbols_top.json", {}, cursor) for cursor in
             ["nope", "o20", "o-1", "o١٢", "x" * 2049, top + "\n", top[:-1], _tampered(top), btc, forged[0],
              "A" * 40, top + "A", *forged_top]]
    cases += [("symbols_search.json", {"q": "eth"}, btc), ("symbols_search.json", {"q": "btc"}, top),
              ("symbols_search.json", {"q": "btc"}, _tampered(btc))]
    cases += [("symbols_search.json", {"q": "btc"}, cursor) for cursor in forged_search]
    cases += [("symbol_predictions.json", {}, cursor) for cursor in [top, forged[1], forged[2]]]
    for event_name, query, cursor in cases:
        if event_name == "symbol_predictions.json":
            status, _, body = invoke("symbols", predictions_event(cursor=cursor))
        else:
            status, _, body = _list("symbols", event_name, cursor=cursor, **query)
        assert_invalid_cursor(status, body, (event_name, cursor))
    # The right list's own cursor is served: case does not change a search's list.
    assert _list("symbols", "symbols_search.json", cursor=btc, q="BTC")[0] == 200


def assert_invalid_cursor(status: int, body: dict, case: object) -> None:
    """400 invalid_cursor, telling the client to start the list again without a cursor."""
    assert (status, body["error"]["code"]) == (400, "invalid_cursor"), (case, body)
    message = body["error"]["message"]
    assert "not valid" in message and "without a cursor" in message, (case, message)


# Cursors no release of this API could have checked here: an older release's format (offsets such as o2, b2:...),
# other characters, too short, too long, empty, two given at once (API Gateway joins them with a comma).
MALFORMED_CURSORS = ["o2", "o20", "b2:eyJ0IjoiWCJ9", "b2:" + "A" * 30, "nope", "A" * 19, "A" * 19 + "=",
                     "A" * 30 + "+/", "A" * 30 + "%", "A" * 10 + " " + "A" * 10, "Ā" * 30, "A" * 2049, "A" * 100_000,
                     "", "A" * 30 + "," + "B" * 30]
PAGED_ROUTES = {"top": ("symbols_top.json", {}), "search": ("symbols_search.json", {"q": "b"}),
                "predictions": ("symbol_predictions.json", {})}


def _page_of(route: str, **query: str):
    event_name, route_query = PAGED_ROUTES[route]
    if route == "predictions":
        return invoke("symbols", predictions_event(**route_query, **query))
    return _list("symbols", event_name, **route_query, **query)


@pytest.mark.parametrize("route", list(PAGED_ROUTES))
def test_a_malformed_cursor_is_400_invalid_cursor_on_every_paged_route(seeded, route):
    for cursor in MALFORMED_CURSORS:
        status, _, body = _page_of(route, limit="2", cursor=cursor)
        assert_invalid_cursor(status, body, cursor[:40])
    if route == "predictions":  # two, so that a page of one is full and has a next cursor
        with psycopg.connect(seeded.database_url, autocommit=True) as conn:
            conn.execute("""
                INSERT INTO predictions (symbol_id, ticker, timeframe, model_id, last_candle_at, last_close, horizon,
                                         request_hash)
                SELECT s.id, s.ticker, m.timeframe, m.id, now(), 100, 30, md5(m.timeframe)
                FROM symbols s JOIN models m ON m.is_active AND m.timeframe IN ('1d', '1w')
                WHERE s.ticker = 'X:BTCUSDT'
            """)
    status, headers, first = _page_of(route, limit="1")
    assert status == 200 and len(first) == 1, first
    status, _, second = _page_of(route, limit="1", cursor=headers["X-Next-Cursor"])  # a good cursor still pages
    assert status == 200 and len(second) == 1 and second != first, second


def test_a_short_page_is_the_last(symbols):
    status, headers, body = _list("symbols", "symbols_top.json", limit="10")
    assert (status, len(body)) == (200, len(SAMPLE))
    assert "X-Next-Cursor" not in headers


@pytest.mark.parametrize("moved", [5_000, 0, None], ids=["to-the-top", "to-the-bottom", "to-no-volume"])
@pytest.mark.parametrize("route", ["top", "search"])
def test_the_next_page_follows_its_anchor_as_its_page_showed_it_when_the_anchors_volume_changes(
        clean_db, route, moved):
    # By volume in both lists (the search's exact matches: base C); the anchor is the first page's last row.
    rows = [(f"X:K{index:02d}USD", f"Kale {index}", 1_000 - 10 * index) for index in range(12)]
    with db.connection() as conn:
        symbol_repository.upsert_symbols(conn, [
            SymbolCreate(ticker=t, name=n, base_currency="C", quote_currency="USD", volume_24h=v) for t, n, v in rows])
    query = {"q": "c"} if route == "search" else {}
    event_name = "symbols_search.json" if route == "search" else "symbols_top.json"
    ordered = [item["ticker"] for item in _list("symbols", event_name, limit="100", **query)[2]]
    assert ordered == [ticker for ticker, _, _ in rows]

    status, headers, first = _list("symbols", event_name, limit="4", **query)
    assert status == 200 and len(first) == 4
    with psycopg.connect(clean_db.database_url, autocommit=True) as conn:
        conn.execute("UPDATE symbols SET volume_24h = %s WHERE ticker = %s", (moved, first[-1]["ticker"]))
    rest = walk("symbols", event_name, 4, cursor=headers["X-Next-Cursor"], **query)

    # Every other row keeps its volume: each is shown once, in the order the first page was read in. The anchor is
    # shown where its volume puts it when each page is read: on the first page, and again at the end if its new
    # volume puts it after the first page's position (the page was read before it moved).
    shown_again = moved is None or moved < first[-1]["volume_24h"]
    assert [item["ticker"] for item in first + rest] == ordered + ([first[-1]["ticker"]] if shown_again else [])
    now = [item["ticker"] for item in _list("symbols", event_name, limit="99", **query)[2]]  # not the cached list
    assert now != ordered and sorted(now) == sorted(ordered)  # the anchor did move


@pytest.mark.parametrize("character", ["\x01", "\U0001f600"], ids=["escaped-in-json", "four-bytes"])
def test_the_longest_search_position_fits_the_cursor_pattern(character):
    import re

    from candlecast.pagination import CURSOR_PATTERN, encode_cursor

    longest_name = next(item.max_length for item in SymbolCreate.model_fields["name"].metadata
                        if getattr(item, "max_length", None))
    position = ["X:" + "Z" * 24, "9" * 30 + "." + "9" * 8, character * longest_name, "2"]
    assert re.fullmatch(CURSOR_PATTERN, encode_cursor("symbols?q=" + "z" * 64, position))


@pytest.mark.parametrize("renamed", ["Coin 99", "Coin !"], ids=["to-the-end", "to-the-start"])
def test_a_search_page_follows_its_anchor_by_name_as_its_page_showed_it_when_the_anchor_is_renamed(
        clean_db, renamed):
    # Name-prefix matches only (tickers X:Z..., bases Z..): in name order; the anchor is the first page's last row.
    rows = [(f"X:Z{index:02d}USD", f"Coin {index:02d}") for index in range(10)]
    with db.connection() as conn:
        symbol_repository.upsert_symbols(conn, [
            SymbolCreate(ticker=t, name=n, base_currency=t[2:5], quote_currency="USD") for t, n in rows])
    status, headers, first = _list("symbols", "symbols_search.json", limit="4", q="coin")
    assert status == 200 and [item["ticker"] for item in first] == [ticker for ticker, _ in rows[:4]]
    with psycopg.connect(clean_db.database_url, autocommit=True) as conn:
        conn.execute("UPDATE symbols SET name = %s WHERE ticker = %s", (renamed, first[-1]["ticker"]))
    rest = walk("symbols", "symbols_search.json", 4, cursor=headers["X-Next-Cursor"], q="coin")
    shown_again = renamed.lower() > first[-1]["name"].lower()
    assert [item["ticker"] for item in first + rest] == [ticker for ticker, _ in rows] + (
        [first[-1]["ticker"]] if shown_again else [])


NON_ASCII_NAMES = [("X:ELANUSD", "Élan Coin", "ELAN"), ("X:OMEGAUSD", "Ωmega", "OMEGA"),
                   ("X:IZMIRUSD", "İzmir Coin", "IZMIR"), ("X:ICPUSDT", "Internet Computer", "ICP"),
                   ("X:SOLUSD", "Solana", "SOL")]


@pytest.fixture
def non_ascii_names(clean_db):
    with db.connection() as conn:
        symbol_repository.upsert_symbols(conn, [
            SymbolCreate(ticker=t, name=n, base_currency=b, quote_currency=t[-3:] if t != "X:ICPUSDT" else "USDT")
            for t, n, b in NON_ASCII_NAMES])


@pytest.mark.parametrize(("query", "found"), [
    ("élan", ["X:ELANUSD"]), ("ÉLAN", ["X:ELANUSD"]), ("ωmega", ["X:OMEGAUSD"]), ("ΩMEGA", ["X:OMEGAUSD"]),
    # PostgreSQL lowers İ to i; Python's str.lower to i and a combining dot above, which no stored name has.
    ("İzmir", ["X:IZMIRUSD"]), ("izmir", ["X:IZMIRUSD"]), ("İZMİR", ["X:IZMIRUSD"]),
    # Only ASCII letters fold into a ticker: str.upper turns the dotless ı into I and the long ſ into S.
    ("ı", []), ("ſol", []), ("ſ", []), ("i", ["X:ICPUSDT", "X:IZMIRUSD"]), ("sol", ["X:SOLUSD"]),
])
def test_a_name_outside_ascii_is_found_in_any_case_and_folds_into_no_ticker(non_ascii_names, query, found):
    status, _, body = search(query)
    assert status == 200
    assert [item["ticker"] for item in body] == found


def test_two_queries_the_database_folds_apart_never_share_a_cached_page(non_ascii_names):
    # Python lowers both to i + U+0307 (one cache key before); PostgreSQL lowers İ to a plain i.
    assert search("i\u0307zmir")[2] == []
    assert [item["ticker"] for item in search("İzmir")[2]] == ["X:IZMIRUSD"]


def test_a_read_that_fills_after_a_refresh_invalidated_never_serves_the_old_row(clean_db, symbols, monkeypatch):
    """The request reads the row, a refresh commits and invalidates, then the request fills the cache: the old row
    was served for the symbol's whole TTL. The pause inside the read stands for a GC pause or a slow network."""
    import threading

    from candlecast import cache
    from candlecast.services import symbols as service

    read_done, refresh_done = threading.Event(), threading.Event()
    real_read = symbol_repository.get_symbol_by_ticker

    def paused_read(conn, ticker):
        row = real_read(conn, ticker)
        read_done.set()
        refresh_done.wait(5)
        return row

    monkeypatch.setattr(symbol_repository, "get_symbol_by_ticker", paused_read)
    reader = threading.Thread(target=service.get, args=("X:ETHUSDT",))
    reader.start()
    assert read_done.wait(5)
    # The refresh, another container with its own connection: commit, then invalidate.
    with psycopg.connect(clean_db.database_url, autocommit=True) as conn:
        conn.execute("UPDATE symbols SET is_active = false WHERE ticker = 'X:ETHUSDT'")
    cache.invalidate_symbols()
    refresh_done.set()
    reader.join(5)
    monkeypatch.setattr(symbol_repository, "get_symbol_by_ticker", real_read)
    status, _, body = invoke("symbols", path_event("symbol_get.json", "/symbols/X:ETHUSDT", ticker="X:ETHUSDT"))
    assert status == 200 and body["is_active"] is False


def test_answers_say_how_long_clients_may_keep_them(symbols):
    """As long as the server would serve them from its own cache; errors, creates and uncached answers never. What
    may be kept varies with the Origin (CORS names a listed origin in the answer)."""
    from uuid import uuid4

    cases = [
        ("symbols", search("btc"), 200, "public, max-age=300"),
        ("symbols", invoke("symbols", load_event("symbols_top.json")), 200, "public, max-age=3600"),
        ("symbols", invoke("symbols", path_event("symbol_get.json", "/symbols/X:BTCUSD", ticker="X:BTCUSD")), 200,
         "public, max-age=3600"),
        ("symbols", invoke("symbols", path_event("symbol_get.json", "/symbols/NOPEUSD", ticker="NOPEUSD")), 404,
         "no-store"),
        ("symbols", search("x" * 65), 400, "no-store"),
        ("symbols", invoke("symbols", load_event("models_list.json")), 200, "public, max-age=600"),
        ("symbols", invoke("symbols", path_event("model_get.json", "/models/1h", timeframe="1h")), 404, "no-store"),
        ("predictions_get", invoke("predictions_get", path_event("prediction_get.json", f"/predictions/{uuid4()}",
                                                                 id=str(uuid4()))), 404, "no-store"),
        ("predictions_create", invoke("predictions_create", load_event("predictions_create.json", body="[]")), 422,
         "no-store"),
        ("health", invoke("health", load_event("health.json")), 200, "no-store"),
    ]
    for function, (status, headers, _), expected_status, cache_control in cases:
        vary = None if cache_control == "no-store" else "Origin"
        assert (function, status, headers.get("Cache-Control"), headers.get("Vary")) == (
            function, expected_status, cache_control, vary)
        assert headers.get("X-Content-Type-Options") == "nosniff"  # JSON holding upstream text is never a page
