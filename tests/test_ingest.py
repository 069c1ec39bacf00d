"""Polygon client and ingestion against the local fake Polygon server, real PostgreSQL, Redis and S3."""

import json
import logging
import re
import time
import traceback
from datetime import UTC, datetime

import numpy as np
import pytest

from candlecast import cache, ingest, polygon, storage
from candlecast.candles import COLUMNS, Candles
from candlecast.config import get_settings
from candlecast.errors import InvalidEvent, NotFound, ServiceUnavailable
from candlecast.forecast.dataset import resample
from candlecast.polygon import PolygonAuthError, PolygonBadResponse, PolygonClient, PolygonError
from tests.conftest import EVENTS, empty_bucket, redis_refusing_writes
from tests.fake_polygon import DAY, HOUR, FakeMarket, FakePolygon, FakeSymbol, load_fixture, make_market

pytestmark = [pytest.mark.integration, pytest.mark.s3]

NOW = int(datetime(2026, 11, 20, 12, 30, tzinfo=UTC).timestamp())
HISTORY = {"1h": 20, "1d": 120}  # days a first run reaches back


@pytest.fixture
def env(clean_db, monkeypatch):
    """Clean database, cache and bucket; the Polygon settings point at whatever the test starts."""
    empty_bucket(clean_db.bucket)
    polygon.reset_client()
    yield monkeypatch
    polygon.reset_client()
    get_settings.cache_clear()


def client_for(fake: FakePolygon, key: str = "test-key", **kwargs) -> PolygonClient:
    options = {"backoff": 0.01, "max_rps": None, "time_budget": 5.0} | kwargs
    return PolygonClient(key, fake.url, **options)


def point_settings_at(env, fake: FakePolygon | None, key: str | None = "test-key") -> None:
    if key is None:
        env.delenv("POLYGON_API_KEY", raising=False)
    else:
        env.setenv("POLYGON_API_KEY", key)
    if fake is not None:
        env.setenv("POLYGON_BASE_URL", fake.url)
    get_settings.cache_clear()
    polygon.reset_client()


def bucket_snapshot() -> dict[str, bytes]:
    return {key: storage.get_bytes(key) for key in storage.list_keys("data/")}


def caught_up(ticker: str, timeframe: str, stored: Candles, last_n: int, now: int) -> Candles:
    """`ingest.caught_up_candles` as a create calls it: with the cache lookup made before `stored` was read."""
    return ingest.caught_up_candles(ticker, timeframe, stored, last_n, now=now,
                                    lookup=cache.lookup_candles(ticker, timeframe))


# --- client -------------------------------------------------------------------------------------


def test_pagination_replays_the_real_two_page_listing():
    with FakePolygon() as fake:
        fake.serve_file("/v3/reference/tickers", "reference_tickers_page1.json")
        page2 = load_fixture("reference_tickers_page1.json")["next_url"]
        fake.serve_file(page2.removeprefix("https://api.massive.com"), "reference_tickers_page2.json")
        rows = client_for(fake).crypto_tickers()
    assert [row["ticker"] for row in rows] == ["A", "AA", "AAA", "AAAU"]
    assert len(fake.requests) == 2 and not fake.bad_auth  # next_url re-based to our host, auth re-added
    assert all("apiKey" not in request for request in fake.requests)


def test_aggregates_follow_next_url_over_several_pages():
    market = make_market(1, now=NOW, history_days=30)
    market.bars_per_page = 50
    with FakePolygon(market) as fake:
        start = NOW - NOW % HOUR - 200 * HOUR
        bars = client_for(fake).aggregates("X:C000USD", 1, "hour", start * 1000, NOW * 1000)
    assert fake.count("/v2/aggs/ticker/X:C000USD") == 5  # 201 bars: 4 full pages and one of 1
    times = [bar["t"] // 1000 for bar in bars]
    assert times == sorted(set(times)) and len(times) == 201
    assert np.all(np.diff(times) == HOUR)


def test_a_next_url_pointing_back_at_its_page_stops_at_the_repeat():
    # Listed 2 days ago: the repeated page's bars stay under what the 10 days hold (a cap of its own, below).
    with FakePolygon(make_market(1, now=NOW, history_days=2)) as fake:
        fake.looping.append("/v2/aggs/ticker/X:C000USD/")
        with pytest.raises(PolygonBadResponse, match="next_url for aggregates X:C000USD 1h repeats an earlier page"):
            client_for(fake).aggregates("X:C000USD", 1, "hour", (NOW - 10 * DAY) * 1000, NOW * 1000)
    assert fake.count("/v2/aggs/ticker/X:C000USD/") == 2  # the first page, then cursor=0 pointing at cursor=0


def test_pagination_stops_at_the_page_cap(monkeypatch):
    assert polygon.MAX_PAGES >= 100  # generous: two years of hours are about 20 pages
    monkeypatch.setattr(polygon, "MAX_PAGES", 4)
    market = make_market(1, now=NOW, history_days=30)
    market.bars_per_page = 10
    with FakePolygon(market) as fake, pytest.raises(PolygonBadResponse, match="more than 4 pages"):
        client_for(fake).aggregates("X:C000USD", 1, "hour", (NOW - 10 * DAY) * 1000, NOW * 1000)
    assert fake.count("/v2/aggs/ticker/X:C000USD/") == 4


def test_a_list_takes_no_more_pages_than_its_range_can_hold():
    """Audit J: a next_url with a new cursor each time was followed up to MAX_PAGES (1000) pages, at a slow rate
    for hours. A week is one page of 50,000 minutes: twice that plus the margin."""
    assert polygon.AGGREGATES_LIMIT == 50000
    with FakePolygon(make_market(1, now=NOW, history_days=30)) as fake:
        fake.endless.append("/v2/aggs/ticker/X:C000USD/")
        cap = 2 + polygon.PAGE_MARGIN
        with pytest.raises(PolygonBadResponse, match=f"more than {cap} pages for aggregates X:C000USD 1h"):
            client_for(fake).aggregates("X:C000USD", 1, "hour", (NOW - 7 * DAY) * 1000, NOW * 1000)
    assert fake.count("/v2/aggs/ticker/X:C000USD/") == cap


def test_a_page_or_a_list_of_more_bars_than_asked_for_is_a_bad_response(monkeypatch):
    """Audit J: all pages' decoded bars were kept (30 MB pages: RSS past 1100 MB in 6 s in a 1024 MB function)."""
    market = make_market(1, now=NOW, history_days=30)
    market.bars_per_page = 100
    with FakePolygon(market) as fake:
        monkeypatch.setattr(polygon, "AGGREGATES_LIMIT", 50)  # asked for 50 a page, sent 100
        with pytest.raises(PolygonBadResponse, match="sent 100 bars on aggregates X:C000USD 1h page 1, more than the"):
            client_for(fake).aggregates("X:C000USD", 1, "hour", (NOW - 10 * DAY) * 1000, NOW * 1000)
        monkeypatch.undo()
        real_bars = market.bars
        market.bars = lambda *args: real_bars(*args) * 3  # every bar three times: more than 10 days of hours hold
        with pytest.raises(PolygonBadResponse, match=r"more bars for aggregates X:C000USD 1h than its range holds "
                                                     r"\(250, by page 3\)"):
            client_for(fake).aggregates("X:C000USD", 1, "hour", (NOW - 10 * DAY) * 1000, NOW * 1000)
    assert fake.count("/v2/aggs/ticker/X:C000USD/") == 1 + 3


def test_fetched_pages_become_the_same_candles_as_one_list():
    market = make_market(1, now=NOW, history_days=30)
    market.bars_per_page = 50
    with FakePolygon(market) as fake:
        candles, dropped = ingest.fetch_candles(client_for(fake), "X:C000USD", "1h", NOW - 20 * DAY, NOW)
        bars = client_for(fake).aggregates("X:C000USD", 1, "hour", (NOW - 20 * DAY) * 1000, (NOW - HOUR) * 1000)
    whole, whole_dropped = ingest.bars_to_candles(bars, HOUR, NOW)
    assert len(candles) == len(whole) > 470 and dropped == whole_dropped == 0
    for name in COLUMNS:
        assert np.array_equal(getattr(candles, name), getattr(whole, name)), name


def test_one_time_budget_covers_every_page():
    market = make_market(1, now=NOW, history_days=30)
    market.bars_per_page = 10
    with FakePolygon(market) as fake:
        fake.delay = 0.15  # each page well inside the budget; all 25 of them not
        client = client_for(fake, time_budget=1.0)
        started = time.monotonic()
        with pytest.raises(PolygonError, match="took more than 1s") as raised:
            client.aggregates("X:C000USD", 1, "hour", (NOW - 10 * DAY) * 1000, NOW * 1000)
        assert time.monotonic() - started < 1.5 and raised.value.status == 503
    assert fake.count("/v2/aggs/ticker/X:C000USD/") < 10


def test_a_looping_next_url_on_the_api_path_is_a_remembered_503(env):
    with FakePolygon(make_market(1, now=NOW, history_days=30)) as fake:
        point_settings_at(env, fake)
        fake.looping.append("/v2/aggs/ticker/X:C000USD/")
        for _ in range(2):
            with pytest.raises(ServiceUnavailable) as raised:
                ingest.fetch_recent_candles("X:C000USD", "1h", 10, now=NOW)
            assert raised.value.status == 503 and raised.value.code == "polygon_bad_response"
            assert "could not be fetched from Polygon" in raised.value.message
    assert fake.count("/v2/aggs/ticker/X:C000USD/") == 2  # the second call was answered from the cache


def test_a_trickled_answer_is_cut_at_the_time_budget():
    """The read timeout is per read: a byte every 0.2 s never trips it. 60 bytes take 12 s; the budget is 2 s."""
    with FakePolygon() as fake:
        fake.add_fault("/v9/slow", kind="trickle", times=10, body=b'{"status":"OK","results":[]' + b" " * 32 + b"}")
        started = time.monotonic()
        with pytest.raises(PolygonError, match="answer took more than") as raised:
            client_for(fake, time_budget=2.0, read_timeout=1.0).get_json("/v9/slow", what="slow")
        elapsed = time.monotonic() - started
    assert elapsed < 6, elapsed  # the budget and one backoff, with room for a loaded machine
    assert "slow" in raised.value.message


def test_a_gzip_bomb_is_a_bad_response_never_held_in_memory():
    import gzip
    import tracemalloc

    decoded = b'{"status":"OK","results":[' + b" " * (100 << 20) + b"]}"  # 100 MB from 0.1 MB on the wire
    with FakePolygon() as fake:
        fake.add_fault("/v9/bomb", kind="gzip", body=gzip.compress(decoded, 6))
        del decoded
        client = client_for(fake)
        tracemalloc.start()
        try:
            with pytest.raises(PolygonBadResponse, match=f"larger than {polygon.MAX_BODY_BYTES / 2**20:.1f} MB"):
                client.get_json("/v9/bomb", what="bomb")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 2 * polygon.MAX_BODY_BYTES, peak
    assert fake.count("/v9/bomb") == 1  # a bad response is not asked for again


def recorded_bars_page(count: int, **layout) -> bytes:
    """An aggregates page of `count` bars shaped as Polygon's recorded X:BTCUSD answer (tests/fixtures/polygon)."""
    recorded = load_fixture("aggs_X-BTCUSD_range_1_day.json")
    bars = [recorded["results"][n % 2] | {"t": 1590984000000 + n * HOUR * 1000, "c": 9492.62 + n / 1e4}
            for n in range(count)]
    return json.dumps(recorded | {"resultsCount": count, "results": bars}, **layout).encode()


def filled_page(element: bytes, size: int) -> bytes:
    head, tail = b'{"status":"OK","results":[', b"]}"
    return head + b",".join([element] * ((size - len(head) - len(tail)) // (len(element) + 1))) + tail


def served_page_peak(body: bytes, path: str = "/v2/aggs/ticker/X:C000USD/") -> tuple[list | Exception, int]:
    """What one aggregates list made of `body` (its bars, or the error) and the traced peak of fetching it."""
    import gzip
    import tracemalloc

    with FakePolygon() as fake:
        fake.add_fault(path, kind="gzip", body=gzip.compress(body, 1))
        client = client_for(fake, time_budget=60.0)
        tracemalloc.start()
        try:
            outcome = client.aggregates("X:C000USD", 1, "hour", (NOW - 3000 * DAY) * 1000, NOW * 1000)
        except PolygonBadResponse as error:
            outcome = error
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    return outcome, peak


@pytest.mark.parametrize("layout", [{"separators": (",", ":")}, {"indent": 4}], ids=["compact", "pretty-printed"])
def test_a_full_page_of_real_bars_is_taken_compact_or_pretty_printed(layout):
    """The most bars a page may carry, as Polygon sends them (compact) and as the client libraries recorded them."""
    body = recorded_bars_page(polygon.AGGREGATES_LIMIT, **layout)
    assert len(body) <= polygon.MAX_BODY_BYTES
    bars, _ = served_page_peak(body)
    assert len(bars) == polygon.AGGREGATES_LIMIT


@pytest.mark.parametrize("element", [b"{}", b"1.5", b'"ab"', b"[]", None],
                         ids=["empty objects", "numbers", "short strings", "empty lists", "recorded bars"])
def test_a_page_of_more_values_than_its_bars_hold_is_refused_before_it_is_decoded(element):
    """A body under the size cap holding more than AGGREGATES_LIMIT bars was decoded whole before the count refused
    it: 32 MB of recorded bars (290,000) peaked at 223 MB in one worker (8 of them: past the Refresh function's
    1024 MB), of {} at 874 MB. Counted in its bytes, it is refused with the body read, never decoded."""
    size = 12 << 20
    body = filled_page(element, size) if element else recorded_bars_page(size // 125, separators=(",", ":"))
    assert len(body) <= min(size, polygon.MAX_BODY_BYTES)
    refused, peak = served_page_peak(body)
    assert isinstance(refused, PolygonBadResponse), refused
    assert refused.message == ("Polygon sent more JSON values than a page of 50000 bars holds for aggregates "
                               "X:C000USD 1h page 1")
    assert peak < 2.5 * len(body), peak  # the body read, and copied once


def test_a_body_past_the_largest_real_page_is_a_bad_response():
    """The cap was 32 MB: one string that long was taken, four copies of it held at once (128 MB)."""
    body = b'{"status":"OK","results":[],"note":"' + b"a" * (20 << 20) + b'"}'
    refused, peak = served_page_peak(body)
    assert isinstance(refused, PolygonBadResponse) and refused.message.startswith("Polygon sent a body larger than")
    assert peak < 2 * polygon.MAX_BODY_BYTES, peak


def test_429_and_5xx_and_dropped_connections_are_retried():
    with FakePolygon(make_market(1, now=NOW)) as fake:
        fake.add_fault("/v2/aggs/grouped", status=429, times=1)
        fake.add_fault("/v2/aggs/grouped", status=502, times=1)
        fake.add_fault("/v2/aggs/grouped", kind="drop", times=1)
        rows = client_for(fake).grouped_daily("2026-11-19")
    assert [row["T"] for row in rows] == ["X:C000USD"]
    assert fake.count("/v2/aggs/grouped") == 4


def test_retries_stop_within_the_time_budget():
    with FakePolygon() as fake:
        fake.add_fault("/v2/aggs/grouped", status=503, times=1000)
        client = client_for(fake, backoff=0.1, max_attempts=100, time_budget=0.6)
        started = time.monotonic()
        with pytest.raises(PolygonError, match="HTTP 503") as raised:
            client.grouped_daily("2026-11-19")
    assert time.monotonic() - started < 1.5
    assert raised.value.status == 503


def test_401_names_the_problem_and_never_the_key_nor_the_upstream_text():
    with FakePolygon() as fake, pytest.raises(PolygonAuthError) as raised:
        client_for(fake, key="wrong-secret-key").crypto_tickers()
    message = str(raised.value)
    assert "401" in message and "POLYGON_API_KEY" in message
    assert "Unknown API Key" not in message  # Polygon's own words can echo what it was sent
    assert "wrong-secret-key" not in message and "wrong-secret-key" not in repr(client_for(fake, key="x" * 9))
    assert fake.count("/v3/reference/tickers") == 1  # never retried


@pytest.mark.parametrize("status", [404, 401])
def test_a_next_url_echoing_the_key_reaches_no_log_report_or_exception(env, capsys, caplog, status):
    """Polygon's next_url path is the upstream's text: it may echo the key. Errors name the request in our words."""
    from infra.lambda_loader import load_handler

    key, marker = "canary-Key-9f8e7d", "UPSTREAM-TEXT"
    market = make_market(1, now=int(time.time()), history_days=3)
    ticker = market.symbols[0].ticker
    env.setenv("REFRESH_CHAIN", "false")
    with FakePolygon(market, api_key=key) as fake:
        point_settings_at(env, fake, key=key)
        fake.next_path = f"/v2/{marker}/{key}/x"
        if status == 401:
            fake.add_fault(marker, status=401, times=10)
        handler = load_handler("functions/refresh")
        try:
            outcome = json.dumps(handler({"tickers": [ticker], "timeframes": ["1h"]}, RefreshContext(900)))
        except PolygonAuthError as error:
            assert status == 401
            outcome = "".join(traceback.format_exception(error))
    assert fake.count(marker) >= 1  # the next page was asked for
    assert f"aggregates {ticker} 1h page 2" in outcome
    logs = capsys.readouterr().out + caplog.text
    for text in (outcome, logs):
        assert key not in text and marker not in text


def test_404_is_not_found_and_not_retried():
    with FakePolygon() as fake, pytest.raises(NotFound, match="Polygon has nothing for nothing") as raised:
        client_for(fake).get_json("/v9/nothing", what="nothing")
    assert "Route not found" not in raised.value.message
    assert len(fake.requests) == 1


def test_a_missing_key_is_refused_before_any_request():
    with pytest.raises(PolygonAuthError, match="POLYGON_API_KEY"):
        PolygonClient("", "http://127.0.0.1:9")


@pytest.mark.parametrize("source", ["argument", "variable", "secret"])
def test_a_pasted_key_with_surrounding_whitespace_works(env, stack, source):
    from tests.conftest import moto_secret

    pasted = " \ttest-key\r\n"  # as `echo key > file` and a paste into a console store it
    with FakePolygon(make_market(2, now=NOW)) as fake:
        if source == "argument":
            client = client_for(fake, key=pasted)
        else:
            point_settings_at(env, fake, key=pasted if source == "variable" else None)
            if source == "secret":
                env.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", stack.s3_endpoint_url)
                env.setenv("POLYGON_API_KEY_SECRET_ARN", moto_secret(stack, pasted, "candlecast/polygon"))
                get_settings.cache_clear()
            client = polygon.get_client()
        rows = client.crypto_tickers()
    assert [row["ticker"] for row in rows] == ["X:C000USD", "X:C001USD"] and not fake.bad_auth


@pytest.mark.parametrize("key", ["sk_live_SECRET\nX-Injected: 1", "sk_live_SECRET\x00", "sk_live_\x7fSECRET",
                                 "sk_live_\u2028SECRET"])
def test_a_key_with_control_characters_is_refused_without_being_named(key):
    with FakePolygon() as fake, pytest.raises(PolygonAuthError, match="POLYGON_API_KEY") as raised:
        client_for(fake, key=key).crypto_tickers()
    assert "SECRET" not in str(raised.value) and not fake.requests
    assert raised.value.status == 503


# --- symbols ------------------------------------------------------------------------------------


def test_volume_ranking_uses_quote_volume_from_the_real_grouped_response(env):
    from candlecast import db
    from candlecast.repositories import symbols as repo
    from candlecast.schemas import SymbolCreate

    with db.connection() as conn:
        repo.upsert_symbol(conn, SymbolCreate(ticker="X:GONEUSD", name="Gone", base_currency="GONE",
                                              quote_currency="USD"))
    day_after = int(datetime(2020, 10, 15, 6, tzinfo=UTC).timestamp())
    market = FakeMarket(now=day_after, tickers_per_page=2, symbols=[
        FakeSymbol("X:ARDRUSD", "ARDR", "USD", "Ardor"), FakeSymbol("X:NGCUSD", "NGC", "USD", "NAGA"),
        FakeSymbol("X:ZSCUSD", "ZSC", "USD", "Zeusshield"), FakeSymbol("X:NEWUSD", "NEW", "USD", "No trades yet"),
    ])
    with FakePolygon(market) as fake:
        fake.serve_file("/v2/aggs/grouped/locale/global/market/crypto/2020-10-14", "grouped_crypto_2020-10-14.json")
        refreshed = ingest.refresh_symbols(client_for(fake), now=datetime.fromtimestamp(day_after, UTC))
    assert refreshed == (4, 1, [], 0, True)  # True: the cache took the invalidation
    assert fake.count("/v3/reference/tickers") == 2  # two pages of two
    with db.connection() as conn:
        rows = {row["ticker"]: row for row in conn.execute("SELECT * FROM symbols").fetchall()}
    # v * vw from the file: NGC 4734*0.0273, ZSC 390*0.0003, ARDR 2*0.0551, NEW none.
    ranked = sorted((row["volume_rank"], ticker) for ticker, row in rows.items() if row["is_active"])
    assert ranked == [(1, "X:NGCUSD"), (2, "X:ZSCUSD"), (3, "X:ARDRUSD"), (4, "X:NEWUSD")]
    assert float(rows["X:NGCUSD"]["volume_24h"]) == pytest.approx(4734 * 0.0273)
    assert float(rows["X:NEWUSD"]["volume_24h"]) == 0
    assert rows["X:GONEUSD"]["is_active"] is False  # vanished: kept, marked inactive
    assert rows["X:NGCUSD"]["base_currency"] == "NGC" and rows["X:NGCUSD"]["quote_currency"] == "USD"


def test_rank_is_by_quote_value_not_base_units():
    reference = [{"ticker": "X:CHEAPUSD", "name": "Cheap"}, {"ticker": "X:DEARUSD", "name": "Dear"}]
    grouped = [{"T": "X:CHEAPUSD", "v": 1000.0, "vw": 1.0}, {"T": "X:DEARUSD", "v": 10.0, "vw": 500.0}]
    symbols, problems = ingest.rank_symbols(reference, grouped)
    assert [(s.ticker, s.volume_rank) for s in symbols] == [("X:DEARUSD", 1), ("X:CHEAPUSD", 2)]
    assert problems == []


def test_rank_is_by_value_in_usd_whatever_the_quote_currency():
    """A pair quoted in BTC is worth its BTC volume at BTC's USD price, a JPY pair its JPY volume at the yen's
    rate across BTC; a quote currency no bar prices in USD ranks last, never by its raw (won) figure."""
    reference = [{"ticker": f"X:{pair}", "name": pair} for pair in ("BTCUSD", "BTCJPY", "ETHBTC", "DOGEUSD", "XYZKRW")]
    grouped = [{"T": "X:BTCUSD", "v": 1000.0, "vw": 60_000.0}, {"T": "X:BTCJPY", "v": 5.0, "vw": 9_000_000.0},
               {"T": "X:ETHBTC", "v": 1000.0, "vw": 0.05}, {"T": "X:DOGEUSD", "v": 1e7, "vw": 0.1},
               {"T": "X:XYZKRW", "v": 1e6, "vw": 1000.0}]
    symbols, problems = ingest.rank_symbols(reference, grouped)
    assert [s.ticker for s in symbols] == ["X:BTCUSD", "X:ETHBTC", "X:DOGEUSD", "X:BTCJPY", "X:XYZKRW"]
    volumes = {s.ticker: float(s.volume_24h) for s in symbols}
    assert volumes["X:ETHBTC"] == pytest.approx(1000 * 0.05 * 60_000)
    assert volumes["X:BTCJPY"] == pytest.approx(5 * 60_000) and volumes["X:XYZKRW"] == 0
    assert problems == []


def test_a_pair_is_read_as_the_listing_names_it():
    """X:DOTUSD is DOT/USD, not DO/TUSD; X:BNBUSD is BNB/USD, not BN/BUSD: read from the ticker alone, these were
    priced in a currency no bar gave a rate for, and ranked as if they traded nothing."""
    listed = [("BTCUSD", "BTC", "USD"), ("DOTUSD", "DOT", "USD"), ("BNBUSD", "BNB", "USD"),
              ("SHIBUSD", "SHIB", "USD"), ("BTCTUSD", "BTC", "TUSD")]
    reference = [{"ticker": f"X:{pair}", "name": pair, "base_currency_symbol": base.lower(),
                  "currency_symbol": quote.lower()} for pair, base, quote in listed]
    grouped = [{"T": f"X:{pair}", "v": 10.0, "vw": 1000.0} for pair, _, _ in listed]
    symbols, problems = ingest.rank_symbols(reference, grouped)
    volumes = {symbol.ticker: float(symbol.volume_24h) for symbol in symbols}
    # BTCTUSD: no TUSD rate but across BTC, whose USD price is 1000 and which trades at 1000 TUSD.
    assert volumes == dict.fromkeys(volumes, 10_000.0) and len(volumes) == 5
    assert problems == []


def test_control_and_format_characters_in_listed_names_are_removed_and_named():
    """Upstream text shown to clients as it came: 'Bitcoin \u202eDSU\u202c' rendered as "Bitcoin USD", a zero-width
    space told two names apart that look alike, an ANSI escape recoloured a terminal."""
    reference = [{"ticker": "X:BTCUSD", "name": "Bitcoin \u202eDSU\u202c\u200b", "base_currency_symbol": "BTC",
                  "currency_symbol": "usd\x1b[31m"},
                 {"ticker": "X:ETHUSD", "name": "\u200b\u2066", "base_currency_symbol": "eth",
                  "currency_symbol": "usd"},
                 {"ticker": "X:LTCUSD", "name": "Litecoin", "base_currency_symbol": "ltc", "currency_symbol": "usd"}]
    symbols, problems = ingest.rank_symbols(reference, [])
    named = {symbol.ticker: (symbol.name, symbol.quote_currency) for symbol in symbols}
    assert named == {"X:BTCUSD": ("Bitcoin DSU", "USD[31M"), "X:ETHUSD": ("X:ETHUSD", "USD"),
                     "X:LTCUSD": ("Litecoin", "USD")}
    assert problems == [
        "'X:BTCUSD': its name and currency_symbol held control or format characters (direction overrides, "
        "zero-width, terminal escapes): removed",
        "'X:ETHUSD': its name held control or format characters (direction overrides, zero-width, terminal "
        "escapes): removed"]


def test_an_unusable_ticker_is_a_problem_not_a_failure():
    reference = [{"ticker": "X:SOME.WEIRD", "name": "Odd"}, {"ticker": "X:GOODUSD", "name": "Good"}]
    symbols, problems = ingest.rank_symbols(reference, [{"T": "X:GOODUSD", "v": 1.0, "vw": 2.0}])
    assert [symbol.ticker for symbol in symbols] == ["X:GOODUSD"]
    assert len(problems) == 1
    assert "X:SOME.WEIRD" in problems[0]


GROUPED_PATH = "/v2/aggs/grouped/locale/global/market/crypto/{day}"
LISTING_PATH = "/v3/reference/tickers"


def serve_changed(fake: FakePolygon, path: str, field: str, ticker: str, change: dict) -> None:
    """Serve `path` as the fake market answers it, with `change` made to the row whose `field` is `ticker`."""
    status, document = fake.route(path, {"limit": ["1000"]})
    for row in document["results"]:
        if row[field] == ticker:
            row.update(change)
    fake.files[path] = (status, json.dumps(document).encode())


def symbol_rows() -> dict[str, dict]:
    from candlecast import db

    with db.connection() as conn:
        return {row["ticker"]: row for row in conn.execute("SELECT * FROM symbols").fetchall()}


# One absurd field in one row of Polygon's answer: (path, the row's key field, the change, whether the symbol stays
# listed, whether the problem names it: a row whose own ticker is not usable cannot be named).
ABSURD_ROWS = {
    "traded value past numeric(38, 8)": (GROUPED_PATH, "T", {"v": 1e13, "vw": 1e18}, True, True),
    "traded value past a float": (GROUPED_PATH, "T", {"v": 1e200, "vw": 1e200}, True, True),
    "volume not a number": (GROUPED_PATH, "T", {"v": "n/a"}, True, True),
    "volume a list": (GROUPED_PATH, "T", {"v": [1]}, True, True),
    "price an object": (GROUPED_PATH, "T", {"vw": {"x": 1}, "c": {"x": 1}}, True, True),
    "bar's ticker a number": (GROUPED_PATH, "T", {"T": 12345}, True, False),
    "name the database cannot store": (LISTING_PATH, "ticker", {"name": "Coin\x00One"}, True, True),
    "currency not a string": (LISTING_PATH, "ticker", {"base_currency_symbol": 7}, True, True),
    "listed ticker a number": (LISTING_PATH, "ticker", {"ticker": 12345}, False, False),
}


@pytest.mark.parametrize(("path", "field", "change", "stays", "named"), ABSURD_ROWS.values(), ids=ABSURD_ROWS)
def test_one_absurd_row_is_a_problem_and_the_refresh_goes_on(env, path, field, change, stays, named):
    """One row no market or listing can mean (a volume past the column, a field of the wrong type) is named in one
    problem, in our words, not Polygon's; every other symbol is stored and every candle file refreshed (it raised,
    NumericValueOutOfRange, ValueError, TypeError, AttributeError, and nothing was stored)."""
    market = make_market(3, now=NOW)
    path = path.format(day=datetime.fromtimestamp(NOW - DAY, UTC).strftime("%Y-%m-%d"))
    with FakePolygon(market) as fake:
        serve_changed(fake, path, field, "X:C001USD", change)
        summary = ingest.run_ingest(client_for(fake), symbols=3, timeframes=["1d"], now=NOW, history_days=HISTORY)
    listed = ["X:C000USD", "X:C001USD", "X:C002USD"] if stays else ["X:C000USD", "X:C002USD"]
    problems = [error for error in summary.errors if error.startswith("symbol ")]
    assert len(problems) == 1 and ("X:C001USD" in problems[0]) == named
    assert not any(text in problems[0] for value in change.values() for text in (str(value), repr(value)))
    assert summary.errors == problems and summary.symbols_upserted == len(listed)
    rows = symbol_rows()
    assert sorted(rows) == listed and all(row["is_active"] for row in rows.values())
    assert [row["volume_rank"] for row in sorted(rows.values(), key=lambda row: row["volume_rank"])] == [
        *range(1, len(listed) + 1)]
    assert summary.symbols_done == len(listed) and not summary.failed  # every listed symbol's candles
    assert sorted(storage.list_keys("data/")) == sorted(f"data/{ticker[2:]}/1d.parquet" for ticker in listed)


@pytest.mark.parametrize("volume", [-1, "n/a"])
def test_a_top_coin_whose_bar_has_an_unusable_volume_keeps_its_place(env, volume):
    """The #1 coin's grouped bar with a volume no market prints (v=-1) failed validation, counted as vanished and was
    marked inactive: gone from the top list, its candles no longer refreshed. It stays listed, active and ranked by
    the volume stored for it last time (one bad print is not the market), its candles refreshed, and the problem
    says so."""
    market = make_market(12, now=NOW)
    day = datetime.fromtimestamp(NOW - DAY, UTC).strftime("%Y-%m-%d")
    with FakePolygon(market) as fake:
        ingest.refresh_symbols(client_for(fake), now=datetime.fromtimestamp(NOW, UTC))
        before = symbol_rows()
        top = ingest.top_tickers(3)
        serve_changed(fake, GROUPED_PATH.format(day=day), "T", top[0], {"v": volume})
        summary = ingest.run_ingest(client_for(fake), symbols=3, timeframes=["1d"], now=NOW, history_days=HISTORY)
    rows = symbol_rows()
    assert all(row["is_active"] for row in rows.values()) and summary.symbols_inactivated == 0
    assert rows[top[0]]["volume_rank"] == 1
    assert rows[top[0]]["volume_24h"] == before[top[0]]["volume_24h"] > 0
    assert ingest.top_tickers(3) == top
    assert summary.symbols_done == 3 and storage.list_keys(f"data/{top[0][2:]}/")  # its candles still refreshed
    assert len(summary.errors) == 1 and top[0] in summary.errors[0] and "stored" in summary.errors[0]


def test_an_empty_listing_never_deactivates_the_universe(env):
    with FakePolygon(FakeMarket(now=NOW)) as fake, pytest.raises(PolygonError, match="no active crypto"):
        ingest.refresh_symbols(client_for(fake))


def active_tickers() -> list[str]:
    from candlecast import db

    with db.connection() as conn:
        return [row["ticker"] for row in conn.execute("SELECT ticker FROM symbols WHERE is_active ORDER BY ticker")]


def test_a_short_listing_marks_nothing_inactive_and_the_summary_says_so(env):
    market = make_market(150, now=NOW)
    with FakePolygon(market) as fake:
        ingest.refresh_symbols(client_for(fake))
        assert len(active_tickers()) == 150
        market.symbols = market.symbols[:3]  # the listing comes back short, without an error
        summary = ingest.run_ingest(client_for(fake), tickers=[], now=NOW)
    assert len(active_tickers()) == 150
    assert (summary.symbols_upserted, summary.symbols_inactivated, summary.symbols_kept_active) == (3, 0, 147)
    assert any("147 of 150 active symbols are missing" in error for error in summary.errors)


def test_an_operator_retires_a_real_mass_delisting_with_retire_missing(env):
    market = make_market(150, now=NOW)
    with FakePolygon(market) as fake:
        ingest.refresh_symbols(client_for(fake))
        market.symbols = market.symbols[:100]  # a third delisted at once: the weekly refresh refuses it
        assert ingest.refresh_symbols(client_for(fake)).kept_active == 50
        summary = ingest.run_ingest(client_for(fake), tickers=[], now=NOW, retire_missing=True)
    assert len(active_tickers()) == 100
    assert (summary.symbols_inactivated, summary.symbols_kept_active) == (50, 0)


def test_a_targeted_refresh_names_the_tickers_the_symbols_table_lacks(env, caplog):
    """An operator onboarding a coin with a targeted refresh: its candles are stored, but with no symbol row no client
    can forecast it (404 symbol_not_found), and the run said nothing (audit). Now the summary and a warning name it."""
    market = make_market(2, now=NOW)
    listed, new = (symbol.ticker for symbol in market.symbols)
    everyone = market.symbols
    with FakePolygon(market) as fake:
        market.symbols = everyone[:1]  # the coin is not listed yet when the symbols are refreshed
        ingest.refresh_symbols(client_for(fake))
        market.symbols = everyone
        with caplog.at_level("WARNING"):
            summary = ingest.run_ingest(client_for(fake), tickers=[listed, new], refresh=False, now=NOW,
                                        history_days=HISTORY)
        assert summary.unlisted == [new] and summary.files_written > 0 and summary.errors == []
        assert storage.read_all_candles(new, "1h") is not None
        assert any(getattr(record, "tickers", None) == [new] for record in caplog.records)

        ingest.run_ingest(client_for(fake), tickers=[], now=NOW)  # a refresh that lists symbols adds it
        again = ingest.run_ingest(client_for(fake), tickers=[new], refresh=False, now=NOW, history_days=HISTORY)
    assert again.unlisted == []
    assert new in active_tickers()


def test_an_operator_retires_a_symbol_the_listing_still_has_and_every_refresh_keeps_it_retired(env, capsys):
    """Audit: a symbol set inactive by hand was active again after the next refresh (the upsert took the listing's
    word), and there was no command for it. `candlecast retire-symbol` stops its forecasts and refreshes for good,
    until --restore."""
    from candlecast import cli

    market = make_market(2, now=NOW)
    kept, retired = (symbol.ticker for symbol in market.symbols)
    with FakePolygon(market) as fake:
        ingest.refresh_symbols(client_for(fake))
        capsys.readouterr()
        assert cli.main(["retire-symbol", "c001-usd"]) == 0
        assert capsys.readouterr().out == f'{{"retired": "{retired}"}}\n'
        ingest.refresh_symbols(client_for(fake))  # the listing still has it
        assert active_tickers() == [kept] and ingest.top_tickers(10) == [kept]

        assert cli.main(["retire-symbol", "--restore", retired]) == 0
        ingest.refresh_symbols(client_for(fake))
        assert sorted(active_tickers()) == sorted([kept, retired])

        market.symbols = market.symbols[:1]  # delisted: the refresh marks it inactive, and --restore keeps it so
        ingest.refresh_symbols(client_for(fake), retire_missing=True)
        capsys.readouterr()
        assert cli.main(["retire-symbol", "--restore", retired]) == 1
        assert f"{retired} is not retired; nothing changed" in capsys.readouterr().err
        assert active_tickers() == [kept]
    assert cli.main(["retire-symbol", "X:NOPEUSD"]) == 1
    assert "unknown symbol X:NOPEUSD" in capsys.readouterr().err


def test_a_few_vanished_symbols_are_still_marked_inactive(env):
    market = make_market(150, now=NOW)
    with FakePolygon(market) as fake:
        ingest.refresh_symbols(client_for(fake))
        gone = [symbol.ticker for symbol in market.symbols[-12:]]
        market.symbols = market.symbols[:-12]  # 12 of 150: under a tenth
        refreshed = ingest.refresh_symbols(client_for(fake))
    assert not set(gone) & set(active_tickers())
    assert refreshed[1:] == (12, [], 0, True)


def test_a_listing_that_may_have_stopped_early_marks_nothing_inactive(env):
    market = make_market(3, now=NOW)
    with FakePolygon(market) as fake:
        ingest.refresh_symbols(client_for(fake))
        # One full page (the client asks for 1000) and no next_url: the listing may have been cut there.
        rows = [{"ticker": f"X:Q{index:04d}USD", "name": "q", "market": "crypto", "active": True}
                for index in range(1000)]
        fake.files["/v3/reference/tickers"] = (200, json.dumps({"status": "OK", "results": rows}).encode())
        refreshed = ingest.refresh_symbols(client_for(fake))
    assert len(active_tickers()) == 1003
    assert (refreshed.upserted, refreshed.inactivated, refreshed.kept_active) == (1000, 0, 3)
    assert "may have stopped early" in refreshed.problems[0]


# --- candles ------------------------------------------------------------------------------------


def expected_hours(symbol: FakeSymbol, first_run: int, now: int, history_days: int) -> np.ndarray:
    """Every closed hour from the first run's history start to `now`: each exactly once."""
    first = first_run - history_days * DAY
    first = max(symbol.listed_at, first - first % HOUR)
    first += -first % HOUR
    return np.arange(first, now - now % HOUR, HOUR)


def assert_complete(ticker: str, market: FakeMarket, first_run: int = NOW, history_days: int = HISTORY["1h"],
                    ran_at: int | None = None) -> None:
    """`ran_at`: the last run's clock, when a bar that closed before market.now had not yet settled by it."""
    symbol = market.by_ticker()[ticker]
    hourly = storage.read_all_candles(ticker, "1h")
    settled = market.now if ran_at is None else min(market.now, ran_at - ingest.SETTLE_SECONDS)
    assert hourly.open_time.tolist() == expected_hours(symbol, first_run, settled, history_days).tolist()
    assert hourly.close.tolist() == [market.bar(symbol, int(t), HOUR)["c"] for t in hourly.open_time]
    daily = storage.read_all_candles(ticker, "1d")
    assert np.all(np.diff(daily.open_time) == DAY) and daily.open_time[-1] + DAY <= market.now
    for target, source in (("4h", hourly), ("1w", daily), ("1m", daily)):
        stored = storage.read_all_candles(ticker, target)
        rebuilt = resample(source, "1h" if target == "4h" else "1d", target)
        assert stored.open_time.tolist() == rebuilt.open_time.tolist(), target
        assert np.allclose(stored.close, rebuilt.close) and np.allclose(stored.volume, rebuilt.volume)


def test_ingest_builds_every_timeframe_then_fetches_only_new_bars(env):
    market = make_market(3, now=NOW, history_days=200)
    with FakePolygon(market) as fake:
        client = client_for(fake)
        first = ingest.run_ingest(client, symbols=2, now=NOW, history_days=HISTORY, concurrency=2)
        assert first.errors == [] and first.symbols_upserted == 3 and first.symbols_done == 2
        assert first.files_written == 10 and first.remaining == []
        top = ingest.top_tickers(2)
        for ticker in top:
            assert_complete(ticker, market)
        assert storage.read_all_candles("X:C002USD", "1h") is None or "X:C002USD" in top

        market.now = NOW + 3 * DAY
        fake.requests.clear()
        second = ingest.run_ingest(client, symbols=2, now=market.now, history_days=HISTORY, refresh=False)
    assert second.errors == [] and second.candles_added > 0
    for ticker in top:
        assert_complete(ticker, market)
    # Only bars after the stored ones and the trailing window were asked for.
    hour_requests = [r for r in fake.requests if "/range/1/hour/" in r]
    starts = {int(r.split("/range/1/hour/")[1].split("/")[0]) // 1000 for r in hour_requests}
    assert starts == {NOW - NOW % HOUR - ingest.REFETCH_DAYS * DAY}


def test_bars_polygon_fills_in_later_are_fetched_and_older_candles_kept(env):
    market = make_market(1, now=NOW, history_days=200)
    ticker = market.symbols[0].ticker
    real_bars = market.bars
    last_hour = NOW - NOW % HOUR - HOUR
    hole = set(range(last_hour - 30 * HOUR, last_hour - 20 * HOUR, HOUR))  # an outage, backfilled later
    market.bars = lambda tk, step, a, b: [bar for bar in real_bars(tk, step, a, b) if bar["t"] // 1000 not in hole]
    with FakePolygon(market) as fake:
        ingest.run_ingest(client_for(fake), tickers=[ticker], refresh=False, now=NOW, history_days=HISTORY)
        first = {tf: storage.read_all_candles(ticker, tf) for tf in ("1h", "4h")}
        assert not hole & set(first["1h"].open_time.tolist())

        # Polygon fills the hole, and (as a test of what is left alone) now sends other prices for every bar.
        market.bars = lambda *args: [bar | {"c": bar["c"] * 2, "h": bar["h"] + bar["c"]} for bar in real_bars(*args)]
        market.now = NOW + 2 * DAY
        summary = ingest.run_ingest(client_for(fake), tickers=[ticker], refresh=False, now=market.now,
                                    history_days=HISTORY)
    assert summary.errors == []
    hourly = storage.read_all_candles(ticker, "1h")
    assert hole <= set(hourly.open_time.tolist())
    assert np.all(np.diff(hourly.open_time) == HOUR)
    window = last_hour + HOUR - ingest.REFETCH_DAYS * DAY
    old = first["1h"].open_time < window
    assert hourly.open_time[: old.sum()].tolist() == first["1h"].open_time[old].tolist()
    assert hourly.close[: old.sum()].tolist() == first["1h"].close[old].tolist()  # outside the window: untouched
    symbol = market.by_ticker()[ticker]
    assert hourly.close[old.sum():].tolist() == [real_bars(ticker, HOUR, int(t), int(t))[0]["c"] * 2
                                                 for t in hourly.open_time[old.sum():]]
    four = storage.read_all_candles(ticker, "4h")
    assert four.open_time.tolist() == resample(hourly, "1h", "4h").open_time.tolist()  # no partial 4h candles
    assert np.allclose(four.volume[four.open_time >= window], symbol.daily_volume * 4 / 24)


BAR = {"v": 2.5, "vw": 10.1, "o": 10, "c": 10.2, "h": 10.5, "l": 9.9, "t": (NOW - NOW % HOUR - 2 * HOUR) * 1000, "n": 7}


@pytest.mark.parametrize("stamp", [0, 4 * HOUR, 5 * HOUR])
def test_the_day_that_just_closed_is_stored_and_caught_up_whatever_its_stamp(env, stamp):
    """Audit N: the bars were asked for up to now - 1 step, so at 02:00Z a day's bar stamped at US/Eastern midnight
    (04:00Z/05:00Z, as Polygon's real 2020 bars) opened after the end asked for: the day that had just closed was
    missing for 4-5 hours after each UTC midnight, in the ingest and in a forecast's catch-up (data_age_bars 1)."""
    from candlecast.timeframes import closed_since

    now = NOW - NOW % DAY + 2 * HOUR  # 02:00Z
    yesterday = now - now % DAY - DAY
    market = make_market(1, now=now, history_days=60)
    market.daily_stamp_offset = stamp
    ticker = "X:C000USD"
    with FakePolygon(market) as fake:
        candles, dropped = ingest.fetch_candles(client_for(fake), ticker, "1d", now - 20 * DAY, now)
        assert candles.open_time[-1] == yesterday and dropped == 0
        assert np.all(np.diff(candles.open_time) == DAY)

        summary = ingest.run_ingest(client_for(fake), tickers=[ticker], refresh=False, now=now, timeframes=["1d"],
                                    history_days=HISTORY)
        assert summary.errors == [] and summary.bars_dropped == 0
        assert storage.read_all_candles(ticker, "1d").open_time[-1] == yesterday

        point_settings_at(env, fake)
        caught = caught_up(ticker, "1d", candles.head(len(candles) - 2), 10, now=now)
    assert caught.open_time[-1] == yesterday
    last = datetime.fromtimestamp(int(caught.open_time[-1]), UTC)
    assert closed_since(last, "1d", datetime.fromtimestamp(now, UTC)) == 0  # not stale


@pytest.mark.parametrize("bad", [{"v": None}, {"v": "2.5"}, {"c": True}, {"h": [1]}, {"t": None}, {"t": 1.7e12},
                                 {"t": "2026-11-20"}, "no v", "no t", "no o", "not an object"])
def test_a_malformed_bar_is_a_bad_response(bad):
    if bad == "not an object":
        second = ["t", 1]
    elif isinstance(bad, str):
        second = {key: value for key, value in BAR.items() if key != bad.removeprefix("no ")}
    else:
        second = BAR | bad
    with pytest.raises(PolygonBadResponse, match="bar 2 of 2") as raised:
        ingest.bars_to_candles([BAR, second], HOUR, NOW)
    assert raised.value.status == 503 and raised.value.code == "polygon_bad_response"
    assert len(ingest.bars_to_candles([BAR, BAR | {"t": BAR["t"] + HOUR * 1000, "v": 0}], HOUR, NOW)[0]) == 2


def test_bars_timed_before_2009_or_after_now_are_dropped_and_counted():
    seconds = BAR | {"t": BAR["t"] // 1000}  # lands on the hour grid in 1970
    nanos = BAR | {"t": BAR["t"] * 1_000_000}
    ahead = BAR | {"t": BAR["t"] + 5 * HOUR * 1000}  # opens two and a half steps after now
    candles, dropped = ingest.bars_to_candles([seconds, BAR, nanos, ahead], HOUR, NOW)
    assert candles.open_time.tolist() == [BAR["t"] // 1000] and dropped == 3
    for unit in (seconds, nanos):
        with pytest.raises(PolygonBadResponse, match="2 bars all timed before 2009 or after now"):
            ingest.bars_to_candles([unit, unit], HOUR, NOW)


@pytest.mark.parametrize("unit", ["s", "ns"])
def test_bars_in_another_unit_fail_the_source_and_never_reach_a_file(env, unit):
    """Seconds used to be stored as 1970 candles (and the next run asked for every bar since 1970); nanoseconds
    made every bar 'not closed yet': nothing written, nothing failed, the files silently stale."""
    market = make_market(1, now=NOW, history_days=200)
    ticker = market.symbols[0].ticker
    with FakePolygon(market) as fake:
        ingest.run_ingest(client_for(fake), tickers=[ticker], refresh=False, now=NOW - 3 * DAY, history_days=HISTORY)
        before = bucket_snapshot()
        fake.time_units["/range/1/hour/"] = unit
        summary = ingest.run_ingest(client_for(fake), tickers=[ticker], refresh=False, now=NOW, history_days=HISTORY)
    assert summary.failed == [ticker] and summary.symbols_done == 0
    (error,) = summary.errors
    assert error.startswith(f"{ticker}: 1h bars: Polygon sent ") and "all timed before 2009 or after now" in error
    after = bucket_snapshot()
    for timeframe in ("1h", "4h"):
        key = storage.candles_key(ticker, timeframe)
        assert after[key] == before[key]
    assert after[storage.candles_key(ticker, "1d")] != before[storage.candles_key(ticker, "1d")]


IMPOSSIBLE = {"high under the close": lambda bar: bar | {"h": bar["c"] * 0.99},
              "low over the open": lambda bar: bar | {"l": bar["o"] * 1.01},
              "zero low": lambda bar: bar | {"l": 0},
              "negative open": lambda bar: bar | {"o": -bar["o"]},
              "negative volume": lambda bar: bar | {"v": -1.0},
              "off the hour": lambda bar: bar | {"t": bar["t"] + 1800 * 1000}}


def test_impossible_bars_are_dropped_counted_and_never_reach_the_derived_candles(env):
    market = make_market(1, now=NOW, history_days=200)
    ticker, real_bars = market.symbols[0].ticker, market.bars
    planted: list[int] = []

    def bars(ticker, step, start, end):
        served = real_bars(ticker, step, start, end)
        if step == HOUR:  # one bad bar of each kind, three days back, in the middle of a 4h bucket
            for index, spoil in enumerate(IMPOSSIBLE.values()):
                position = -72 - 4 * index
                planted.append(served[position]["t"] // 1000)
                served[position] = spoil(served[position])
        else:  # daily: US/Eastern midnight stamps are Polygon's; 13:00Z is no day's
            served = [bar | {"t": bar["t"] + 4 * HOUR * 1000} for bar in served]
            served[-10] = served[-10] | {"t": served[-10]["t"] + 9 * HOUR * 1000}
        return served

    market.bars = bars
    with FakePolygon(market) as fake:
        summary = ingest.run_ingest(client_for(fake), refresh=False, tickers=[ticker], now=NOW, history_days=HISTORY,
                                    timeframes=["1h", "4h", "1d", "1w"])
    hourly, daily = storage.read_all_candles(ticker, "1h"), storage.read_all_candles(ticker, "1d")
    assert not set(planted) & set(hourly.open_time.tolist())
    assert len(hourly) == len(expected_hours(market.symbols[0], NOW, NOW, HISTORY["1h"])) - len(IMPOSSIBLE)
    assert np.all(daily.open_time % DAY == 0) and len(daily) == HISTORY["1d"] - 1
    assert summary.failed == [] and summary.bars_dropped == len(IMPOSSIBLE) + 1
    from candlecast.candles import possible

    for timeframe in ("1h", "4h", "1d", "1w"):
        assert possible(storage.read_all_candles(ticker, timeframe)).all(), timeframe


def test_bars_without_volume_on_the_api_path_are_a_remembered_503(env):
    market = make_market(1, now=NOW, history_days=30)
    real_bars = market.bars
    market.bars = lambda *args: [{k: v for k, v in bar.items() if k != "v"} for bar in real_bars(*args)]
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        for _ in range(2):
            with pytest.raises(ServiceUnavailable) as raised:
                ingest.fetch_recent_candles("X:C000USD", "4h", 10, now=NOW)
            assert raised.value.status == 503 and raised.value.code == "polygon_bad_response"
    assert fake.count("/v2/aggs/ticker/X:C000USD/") == 1  # remembered: the second call asked no one


@pytest.mark.parametrize("how", ["oom", "readonly"])
def test_a_failing_fetch_is_remembered_while_redis_refuses_writes(env, clean_db, how):
    """The failure was remembered in Redis alone: with Redis refusing writes (or down), every create asked the
    failing Polygon again and waited for it."""
    market = make_market(1, now=NOW, history_days=30)
    real_bars = market.bars
    market.bars = lambda *args: [{k: v for k, v in bar.items() if k != "v"} for bar in real_bars(*args)]
    with FakePolygon(market) as fake, redis_refusing_writes(clean_db.redis_url, how):
        point_settings_at(env, fake)
        for _ in range(3):
            with pytest.raises(ServiceUnavailable) as raised:
                ingest.fetch_recent_candles("X:C000USD", "4h", 10, now=NOW)
            assert raised.value.code == "polygon_bad_response" and 1 <= raised.value.retry_after <= 30
    assert fake.count("/v2/aggs/ticker/X:C000USD/") == 1  # remembered in the process


def test_malformed_json_writes_nothing_and_keeps_existing_files(env):
    market = make_market(1, now=NOW, history_days=200)
    market.bars_per_page = 24
    with FakePolygon(market) as fake:
        client = client_for(fake)
        ingest.run_ingest(client, symbols=1, now=NOW, history_days=HISTORY)
        before = bucket_snapshot()
        assert len(before) == 5

        market.now = NOW + 4 * DAY
        # The third page of the new hourly bars, on the first try and on the one more try at the chunk's end.
        fake.add_fault("cursor=48", kind="malformed", times=2)
        failed = ingest.run_ingest(client, symbols=1, now=market.now, history_days=HISTORY, refresh=False)
        assert len(failed.errors) == 1 and "1h bars: " in failed.errors[0] and "not JSON" in failed.errors[0]
        assert failed.failed == ["X:C000USD"] == failed.retried and failed.remaining == []
        after = bucket_snapshot()
        hourly = [key for key in before if key.endswith(("/1h.parquet", "/4h.parquet"))]
        assert {key: after[key] for key in hourly} == {key: before[key] for key in hourly}  # byte for byte
        assert after["data/C000USD/1d.parquet"] != before["data/C000USD/1d.parquet"]  # the 1d source is its own

        retried = ingest.run_ingest(client, symbols=1, now=market.now, history_days=HISTORY, refresh=False)
    assert retried.errors == []
    assert_complete("X:C000USD", market)


def shifted(candles: Candles, seconds: int) -> Candles:
    return Candles(candles.open_time + seconds, *(getattr(candles, name) for name in COLUMNS[1:]))


def test_a_file_every_read_refuses_is_rebuilt_from_polygon_by_the_next_ingest(env, caplog):
    """Audit N: the ingest read the stored files through the read path's check, so a refused file (a 1d file of
    Polygon's US/Eastern stamps, a 1h file a year ahead, a 1m file that is not Parquet) failed its whole source
    before Polygon was asked, in every refresh: nothing was ever written again, and the 4h, 1w and 1m files were
    never built. It is rebuilt as if it were missing, with one warning naming the key and the problem."""
    market = make_market(1, now=NOW, history_days=200)
    ticker = "X:C000USD"
    with FakePolygon(market) as fake:
        client = client_for(fake)
        ingest.run_ingest(client, tickers=[ticker], refresh=False, now=NOW, history_days=HISTORY)
        daily, hourly = storage.read_all_candles(ticker, "1d"), storage.read_all_candles(ticker, "1h")
        storage.write_candles(ticker, "1d", shifted(daily, 4 * HOUR))  # 04:00Z: off the 1d grid
        ahead = 365 * DAY + max(0, int(time.time()) - NOW) // DAY * DAY  # a year after NOW and after the clock
        storage.write_candles(ticker, "1h", shifted(hourly, ahead))
        storage.put_bytes(storage.candles_key(ticker, "1m"), b"PAR1 not parquet PAR1")
        with caplog.at_level("WARNING"):
            summary = ingest.run_ingest(client, tickers=[ticker], refresh=False, now=NOW, history_days=HISTORY)
    assert summary.errors == [] and summary.failed == [] and summary.symbols_done == 1
    assert summary.files_written == 3  # the 4h and 1w files, rebuilt from the same bars, are as they were
    assert_complete(ticker, market)
    lines = [record for record in caplog.records if "invalid candle file" in record.getMessage()]
    assert [record.getMessage() for record in lines] == ["invalid candle file: rebuilding it from Polygon"] * 3
    assert sorted(record.key for record in lines) == [storage.candles_key(ticker, tf) for tf in ("1d", "1h", "1m")]
    problems = {record.timeframe: record.problem for record in lines}
    assert "open times off the 1d grid (the first" in problems["1d"]
    assert problems["1h"].startswith("open times in the future") and problems["1m"].startswith("ArrowInvalid")


def test_a_refused_file_polygon_cannot_rebuild_is_a_permanent_failure_and_left_as_it_was(env):
    """When Polygon has no bars to rebuild a refused file from, the ingest says so in its own words (not the read
    path's "before it is forecast from"), leaves the file, and does not try again in the chunk."""
    market = make_market(2, now=NOW, history_days=200)
    ticker = "X:C001USD"
    with FakePolygon(market) as fake:
        client = client_for(fake)
        storage.put_bytes(storage.candles_key(ticker, "1d"), b"PAR1 not parquet PAR1")
        market.symbols = market.symbols[:1]  # Polygon has no bars for it any more
        summary = ingest.run_ingest(client, tickers=[ticker], refresh=False, now=NOW, history_days=HISTORY,
                                    timeframes=["1d"])
        assert fake.count(f"/v2/aggs/ticker/{ticker}/range/1/day/") == 1
    assert summary.failed == [ticker] and summary.retried == [] and summary.retry == []
    [error] = summary.errors
    assert error.startswith(f"{ticker}: 1d bars: the stored 1d candle file of {ticker} is not a 1d candle series")
    assert "Polygon sent no bars" in error and "forecast from" not in error
    assert storage.get_bytes(storage.candles_key(ticker, "1d")) == b"PAR1 not parquet PAR1"


def test_a_run_killed_halfway_is_completed_by_the_next_with_nothing_lost_or_doubled(env, monkeypatch):
    market = make_market(4, now=NOW, history_days=200)
    with FakePolygon(market) as fake:
        client = client_for(fake)
        ingest.run_ingest(client, symbols=4, now=NOW - 2 * DAY, history_days=HISTORY, concurrency=1)

        # Kill the next run at its 5th file: the second symbol has its new 1h file but not its 4h one.
        writes = []
        real_write = storage.write_candles

        def dying_write(*args, **kwargs):
            if len(writes) == 4:
                raise KeyboardInterrupt("killed")
            writes.append(args[:2])
            return real_write(*args, **kwargs)

        monkeypatch.setattr(storage, "write_candles", dying_write)
        with pytest.raises(KeyboardInterrupt):
            ingest.run_ingest(client, symbols=4, now=NOW, history_days=HISTORY, concurrency=1, refresh=False)
        monkeypatch.setattr(storage, "write_candles", real_write)
        assert [key[1] for key in writes] == ["1h", "4h", "1d", "1h"]  # 1w and 1m had nothing new

        summary = ingest.run_ingest(client, symbols=4, now=NOW, history_days=HISTORY, concurrency=3,
                                    refresh=False)
    assert summary.errors == [] and summary.symbols_done == 4
    for ticker in ingest.top_tickers(4):
        assert_complete(ticker, market, first_run=NOW - 2 * DAY)


DAILY = ["1d", "1w", "1m"]


def with_bad_print(daily: Candles, index: int) -> Candles:
    """`daily` with a shifted decimal point in the close of its candle at `index` (the high follows it)."""
    bad = Candles(*(getattr(daily, name).copy() for name in COLUMNS))
    bad.close[index] *= 10
    bad.high[index] = bad.close[index]
    return bad


def badly_printed_files(client: PolygonClient, ticker: str) -> tuple[Candles, int]:
    """A first run 10 days before NOW, then its 1d file and the 1w and 1m files built from it given a bad print 45
    days before NOW (a month that has closed, out of the week the next run asks for again). Returns the good 1d
    candles (the operator's repair) and the bad print's index."""
    ingest.run_ingest(client, tickers=[ticker], refresh=False, now=NOW - 10 * DAY, history_days=HISTORY,
                      timeframes=DAILY)
    good = storage.read_all_candles(ticker, "1d")
    index = int(np.searchsorted(good.open_time, NOW - NOW % DAY - 45 * DAY))
    bad = with_bad_print(good, index)
    for timeframe in DAILY:
        storage.write_candles(ticker, timeframe, bad if timeframe == "1d" else resample(bad, "1d", timeframe))
    return good, index


def assert_repaired(ticker: str, good: Candles, index: int) -> None:
    """The 1d file holds the repaired close and the bars up to NOW; the 1w and 1m files are built from it; and a
    forecast's read (Redis first) gets the repaired candles."""
    daily = storage.read_all_candles(ticker, "1d")
    at = daily.open_time == good.open_time[index]
    assert daily.close[at].tolist() == [good.close[index]]
    assert daily.open_time[-1] == NOW - NOW % DAY - DAY  # the new bars were merged too
    for target in ("1w", "1m"):
        stored, rebuilt = storage.read_all_candles(ticker, target), resample(daily, "1d", target)
        assert stored.open_time.tolist() == rebuilt.open_time.tolist(), target
        assert np.allclose(stored.close, rebuilt.close) and np.allclose(stored.high, rebuilt.high), target
        assert storage.read_candles(ticker, target, len(stored)).high.tolist() == stored.high.tolist(), target
    assert storage.read_candles(ticker, "1d", len(daily)).close[at].tolist() == [good.close[index]]


def test_a_put_candles_while_the_ingest_waits_on_polygon_is_not_written_over(env, tmp_path):
    """Audit O: the ingest read a candle file, waited on Polygon (seconds, minutes at the free tier), merged and
    wrote unconditionally: an operator's `candlecast put-candles` in between was written over with the bad print it
    repaired, and the 1w and 1m files built from it kept it, without a word. The write is made only over the version
    read; the repaired file is read and merged again, and the files built from it are built from the repair."""
    import threading

    from candlecast import seed

    market = make_market(1, now=NOW, history_days=200)
    ticker = market.symbols[0].ticker
    with FakePolygon(market) as fake:
        client = client_for(fake)
        good, index = badly_printed_files(client, ticker)
        for timeframe in DAILY:
            storage.read_candles(ticker, timeframe, 60)  # a forecast's read: the bad print in Redis
        repair = tmp_path / "repaired.parquet"
        repair.write_bytes(storage.candles_to_parquet(good))

        fake.hold("/range/1/day/", after=0)
        runs = []
        refresh = threading.Thread(target=lambda: runs.append(ingest.run_ingest(
            client, tickers=[ticker], refresh=False, now=NOW, history_days=HISTORY, timeframes=DAILY)))
        refresh.start()
        try:
            deadline = time.monotonic() + 60
            while fake.held() < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert fake.held() == 1  # the 1d file is read; its new bars are being fetched
            seed.put_candles(ticker, "1d", repair)
        finally:
            fake.release()
            refresh.join(timeout=60)
        assert fake.count("/range/1/day/") == 2  # the first run's and this one's: the repair asked Polygon nothing
    assert_repaired(ticker, good, index)
    [summary] = runs
    assert summary.errors == [] and summary.symbols_done == 1 and summary.files_written == 3


def test_a_source_replaced_once_the_ingest_wrote_it_rebuilds_the_files_built_from_it(env, stack):
    """The files built from a source are built from the source as it finally is: a repair that lands just after the
    ingest wrote the 1d file (and before its 1w and 1m files) is merged into and built from again."""
    from tests.s3_proxy import RewritingProxy, through

    market = make_market(1, now=NOW, history_days=200)
    ticker = market.symbols[0].ticker
    key = storage.candles_key(ticker, "1d")
    with FakePolygon(market) as fake:
        client = client_for(fake)
        good, index = badly_printed_files(client, ticker)
        direct = storage.s3_client()

        def repair():  # put-candles, straight at moto
            direct.put_object(Bucket=stack.bucket, Key=key, Body=storage.candles_to_parquet(good))
            assert storage.forget_cached_candles([key])

        with through(RewritingProxy(stack.s3_endpoint_url, key, repair, method="PUT")) as proxy:
            summary = ingest.run_ingest(client, tickers=[ticker], refresh=False, now=NOW, history_days=HISTORY,
                                        timeframes=DAILY)
    assert_repaired(ticker, good, index)
    assert proxy.requests.count("PUT") == 2  # the ingest's, written over by the repair, then the merge into it
    assert summary.errors == [] and summary.symbols_done == 1


def test_a_file_rewritten_every_time_the_ingest_reads_it_fails_its_source_and_keeps_the_rewrite(env, stack):
    """WRITE_ATTEMPTS conflicts in a row and the source fails in the run's report, its files as the other writer
    left them: never a silent write over them."""
    from tests.s3_proxy import RewritingProxy, through

    market = make_market(1, now=NOW, history_days=200)
    ticker = market.symbols[0].ticker
    key = storage.candles_key(ticker, "1d")
    with FakePolygon(market) as fake:
        client = client_for(fake)
        good, _ = badly_printed_files(client, ticker)
        direct, versions = storage.s3_client(), []

        def rewrite():  # a new version each time (the same bytes are the same ETag: the same file)
            versions.append(with_bad_print(good, len(versions)))
            direct.put_object(Bucket=stack.bucket, Key=key, Body=storage.candles_to_parquet(versions[-1]))

        built = {timeframe: storage.get_bytes(storage.candles_key(ticker, timeframe)) for timeframe in ("1w", "1m")}
        with through(RewritingProxy(stack.s3_endpoint_url, key, rewrite, times=100)) as proxy:
            summary = ingest.run_ingest(client, tickers=[ticker], refresh=False, now=NOW, history_days=HISTORY,
                                        timeframes=DAILY)
    assert proxy.requests.count("PUT") == 2 * ingest.WRITE_ATTEMPTS  # tried again at the chunk's end
    assert summary.failed == [ticker] and summary.retried == [ticker] and summary.files_written == 0
    [error] = summary.errors
    assert error == (f"{ticker}: 1d bars: the 1d candle files of {ticker} were written by another writer while this "
                     f"run merged into them, {ingest.WRITE_ATTEMPTS} times; they were left as that writer left them")
    assert storage.read_all_candles(ticker, "1d").close.tolist() == versions[-1].close.tolist()
    assert {tf: storage.get_bytes(storage.candles_key(ticker, tf)) for tf in ("1w", "1m")} == built


@pytest.mark.slow
def test_a_cli_run_killed_with_sigkill_is_completed_by_the_next(env):
    import os
    import signal
    import subprocess
    import sys

    market = make_market(6, now=int(time.time()), history_days=70)  # holds a whole month
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        # Five range requests are answered, then none: each of the run's two workers ends up waiting on an
        # answer, having written what it fetched, and is killed there however slowly the machine runs.
        fake.hold("/range/", after=5)
        child = subprocess.Popen(
            [sys.executable, "-c", "from candlecast.cli import main; raise SystemExit(main())",
             "ingest", "--symbols", "6", "--concurrency", "2"],
            env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 120
            while fake.held() < 2 and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert fake.held() == 2, f"the run never reached the hold (exit {child.poll()})"
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait(timeout=30)
            fake.release()
        assert child.returncode == -signal.SIGKILL
        written = [key for key in storage.list_keys("data/") if key.endswith(".parquet")]
        assert 0 < len(written) < 30  # killed halfway

        ran_at = int(time.time())
        summary = ingest.run_ingest(client_for(fake), symbols=6, now=ran_at, concurrency=3)
    assert summary.errors == [] and summary.symbols_done == 6
    for ticker in ingest.top_tickers(6):
        assert_complete(ticker, market, first_run=market.now, history_days=ingest.DEFAULT_HISTORY_DAYS["1h"],
                        ran_at=ran_at)


def test_deadline_reports_what_is_left(env):
    market = make_market(3, now=NOW, history_days=100)
    with FakePolygon(market) as fake:
        summary = ingest.run_ingest(client_for(fake), symbols=3, now=NOW, history_days=HISTORY,
                                    deadline=time.monotonic() - 1)
    assert summary.symbols_done == 0 and summary.remaining == ingest.top_tickers(3)


def test_a_bad_key_stops_the_run_with_a_clear_error(env):
    with FakePolygon(make_market(2, now=NOW)) as fake, pytest.raises(PolygonAuthError, match="HTTP 401"):
        ingest.run_ingest(client_for(fake, key="nope"), symbols=2, now=NOW)


@pytest.mark.parametrize("refused", ["X:C000USD", "X:C001USD"])  # before any request succeeded, and after
def test_one_symbols_403_fails_that_symbol_and_the_run_goes_on(env, refused):
    market = make_market(3, now=NOW, history_days=200)
    tickers = [symbol.ticker for symbol in market.symbols]
    with FakePolygon(market) as fake:
        fake.not_entitled(f"/v2/aggs/ticker/{refused}/")
        summary = ingest.run_ingest(client_for(fake), tickers=tickers, refresh=False, now=NOW, history_days=HISTORY,
                                    concurrency=1)
    assert summary.failed == [refused] and summary.symbols_done == 2 and summary.remaining == []
    assert [error.split(" bars: ")[0] for error in summary.errors] == [f"{refused}: 1h", f"{refused}: 1d"]
    assert all("HTTP 403" in error for error in summary.errors)
    assert "entitled" not in str(summary.errors) and "pricing" not in str(summary.errors)  # never Polygon's text
    assert summary.retried == []  # a plan's 403 is not tried again
    assert storage.read_all_candles(refused, "1h") is None
    for ticker in set(tickers) - {refused}:
        assert_complete(ticker, market)
    assert fake.count("/v3/reference/tickers") <= 1  # at most one request to tell the key from the plan


def test_a_transient_failure_is_tried_again_at_the_chunks_end_and_the_other_source_is_kept(env):
    market = make_market(3, now=NOW, history_days=200)
    tickers = [symbol.ticker for symbol in market.symbols]
    with FakePolygon(market) as fake:
        fake.add_fault(f"/v2/aggs/ticker/{tickers[0]}/range/1/hour/", kind="malformed")  # not retried by the client
        first_try_daily = []
        summary = ingest.run_ingest(client_for(fake), tickers=tickers, refresh=False, now=NOW, history_days=HISTORY,
                                    concurrency=1, on_symbol=lambda ticker: first_try_daily.append(
                                        storage.read_all_candles(ticker, "1d") is not None))
    assert first_try_daily[0] is True  # the 1h source failing did not stop the 1d one
    assert summary.failed == [] and summary.errors == [] and summary.symbols_done == 3
    assert summary.retried == [tickers[0]] and summary.retry == []
    for ticker in tickers:
        assert_complete(ticker, market)


def test_a_failure_with_no_time_left_is_handed_on_once_and_then_reported(env):
    market = make_market(1, now=NOW, history_days=200)
    ticker = market.symbols[0].ticker
    with FakePolygon(market) as fake:
        fake.add_fault(f"/v2/aggs/ticker/{ticker}/range/1/hour/", kind="malformed", times=1000)
        deadline = time.monotonic() + 5
        summary = ingest.run_ingest(client_for(fake), tickers=[ticker], refresh=False, now=NOW, history_days=HISTORY,
                                    deadline=deadline, on_symbol=lambda _: time.sleep(deadline - time.monotonic()))
        assert (summary.retry, summary.failed, summary.errors) == ([ticker], [], [])
        handed_on = ingest.run_ingest(client_for(fake), tickers=summary.retry, retried=summary.retry, refresh=False,
                                      now=NOW, history_days=HISTORY)
    assert handed_on.failed == [ticker] and handed_on.retried == [] and handed_on.retry == []
    assert handed_on.errors == [f"{ticker}: 1h bars: Polygon sent a body that is not JSON for aggregates {ticker} 1h "
                                "page 1"]
    assert storage.read_all_candles(ticker, "1h") is None and storage.read_all_candles(ticker, "1d") is not None


@pytest.mark.parametrize("status", [400, 404, 418])
def test_a_4xx_is_reported_at_once_never_tried_again(env, status):
    """Polygon answers a request it refuses (a 400, a ticker it has not: 404) the same way every time: a second
    try at the chunk's end, or in the next chunk, only spends requests."""
    market = make_market(2, now=NOW, history_days=200)
    tickers = [symbol.ticker for symbol in market.symbols]
    with FakePolygon(market) as fake:
        fake.add_fault(f"/v2/aggs/ticker/{tickers[0]}/range/1/hour/", status=status, times=1000)
        summary = ingest.run_ingest(client_for(fake), tickers=tickers, refresh=False, now=NOW, history_days=HISTORY,
                                    concurrency=1)
        assert fake.count(f"/v2/aggs/ticker/{tickers[0]}/range/1/hour/") == 1
    assert summary.failed == [tickers[0]] and summary.retried == [] and summary.retry == []
    assert summary.symbols_done == 1 and len(summary.errors) == 1
    assert f"{tickers[0]}: 1h bars: " in summary.errors[0] and "injected" not in summary.errors[0]
    assert storage.read_all_candles(tickers[0], "1d") is not None


def test_files_written_while_the_database_is_down_are_reported_as_such(env, needs_embedded_postgres):
    from tests.conftest import reset_clients

    market = make_market(2, now=NOW, history_days=200)
    tickers = [symbol.ticker for symbol in market.symbols]
    with FakePolygon(market) as fake:
        needs_embedded_postgres.stop()
        try:
            summary = ingest.run_ingest(client_for(fake), tickers=tickers, refresh=False, now=NOW,
                                        history_days=HISTORY, timeframes=["1h", "1d"])
        finally:
            needs_embedded_postgres.start()
            reset_clients()
    assert summary.unrecorded == tickers == summary.retried and summary.failed == [] and summary.symbols_done == 0
    assert summary.files_written == 4
    assert all(": files written, metadata not recorded: " in error for error in summary.errors)
    for ticker in tickers:
        assert storage.read_all_candles(ticker, "1h") is not None


def test_a_locked_symbol_row_fails_its_record_alone_and_the_other_workers_record_theirs(env, clean_db):
    """Audit: Refresh's 8 workers share one pooled connection (DB_POOL_MAX_SIZE=1). A symbols row another session
    held made that worker's UPDATE wait Refresh's lock_timeout (30 s) on the pool's one connection, and the other
    workers, waiting DB_POOL_TIMEOUT (1 s) for it, failed to record theirs: 135 of 200 were tried again."""
    import psycopg

    from tests.conftest import reset_clients

    env.setenv("DB_STATEMENT_TIMEOUT", "10")  # lock_timeout 5 s: past DB_POOL_TIMEOUT, as Refresh's 30 s is
    reset_clients()
    market = make_market(24, now=NOW, history_days=30)
    tickers = [symbol.ticker for symbol in market.symbols]
    locked = tickers[0]
    try:
        with FakePolygon(market) as fake, psycopg.connect(clean_db.database_url) as holder:
            ingest.refresh_symbols(client_for(fake), now=datetime.fromtimestamp(NOW, UTC))
            holder.execute("SELECT id FROM symbols WHERE ticker = %s FOR UPDATE", (locked,))
            started = time.monotonic()
            summary = ingest.run_ingest(client_for(fake), tickers=tickers, refresh=False, now=NOW,
                                        history_days=HISTORY, timeframes=["1d"])
            elapsed = time.monotonic() - started
            holder.rollback()
        assert summary.unrecorded == [locked] == summary.retried and summary.failed == []
        assert summary.symbols_done == len(tickers) - 1
        assert summary.errors == [f"{locked}: files written, metadata not recorded: the database did not answer in "
                                  "time; try again shortly"]
        assert elapsed < 5, elapsed  # not even one wait of the function's lock_timeout
        recorded = {ticker: served_symbol(ticker)["candle_timeframes"] for ticker in tickers}
        assert recorded == {ticker: [] if ticker == locked else ["1d"] for ticker in tickers}
    finally:
        reset_clients()  # no pool with this test's timeouts is left to the next test


def test_a_403_on_every_request_stops_the_run_as_a_refused_key(env):
    market = make_market(6, now=NOW, history_days=200)
    with FakePolygon(market) as fake:
        fake.not_entitled("/")
        with pytest.raises(PolygonAuthError, match="HTTP 403") as raised:
            ingest.run_ingest(client_for(fake), tickers=[s.ticker for s in market.symbols], refresh=False, now=NOW,
                              history_days=HISTORY, concurrency=1)
    assert "entitled" not in str(raised.value)
    # The first symbol's refusal, then the key's: no other symbol is asked for.
    assert fake.count("/v2/aggs/ticker/") == 1 and fake.count("/v3/reference/tickers") == 1


def test_a_403_on_the_ticker_listing_stops_the_run(env):
    with FakePolygon(make_market(2, now=NOW)) as fake:
        fake.not_entitled("/v3/reference/tickers")
        with pytest.raises(PolygonAuthError, match="HTTP 403"):
            ingest.run_ingest(client_for(fake), symbols=2, now=NOW, history_days=HISTORY)
    assert fake.count("/v2/aggs/ticker/") == 0


@pytest.mark.parametrize(("option", "value"), [("--symbols", "0"), ("--symbols", "-3"), ("--concurrency", "0"),
                                               ("--max-rps", "-1"), ("--max-rps", "0"), ("--max-rps", "nan"),
                                               ("--symbols", str(ingest.MAX_TOP_SYMBOLS + 1)),
                                               ("--concurrency", str(ingest.MAX_CONCURRENCY + 1))])
def test_cli_refuses_a_count_or_rate_out_of_bounds_before_any_request(env, capsys, option, value):
    from candlecast import cli

    with FakePolygon(make_market(2, now=NOW)) as fake:
        point_settings_at(env, fake)
        with pytest.raises(SystemExit) as stopped:
            cli.main(["ingest", option, value])
        assert fake.count("/") == 0
    assert stopped.value.code == 2 and f"{option}: " in capsys.readouterr().err


def test_cli_prints_a_summary(env, capsys):
    from candlecast import cli

    market = make_market(3, now=int(time.time()), history_days=30)
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        code = cli.main(["ingest", "--symbols", "2", "--timeframes", "1h", "4h", "--concurrency", "2"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["symbols_upserted"] == 3 and summary["files_written"] == 4
    assert summary["candles_added"] > 0 and summary["errors"] == [] and summary["remaining"] == 0
    assert storage.read_all_candles("X:C000USD", "1d") is None  # only the timeframes asked for


def test_cli_progress_counts_the_symbols_there_are_and_names_each_failure(env, capsys, caplog):
    """Audit J: with 7 symbols the bar was sized by --symbols and stopped at 7/20; stderr had bare 'ingest failed for
    symbol' lines (the CLI shows a record's message, not its extra fields)."""
    from candlecast import cli

    key = "canary-Key-5c4b3a"
    market = make_market(3, now=int(time.time()), history_days=30)
    with FakePolygon(market, api_key=key) as fake:
        point_settings_at(env, fake, key=key)
        fake.add_fault("/v2/aggs/ticker/X:C001USD/range/1/hour/", status=400, times=10)
        code = cli.main(["ingest", "--symbols", "20", "--timeframes", "1h"])
    err = capsys.readouterr().err
    assert code == 1 and "3/3" in err and "/20" not in err
    (record,) = [record for record in caplog.records if record.getMessage().startswith("ingest failed for symbol")]
    assert record.getMessage() == ("ingest failed for symbol X:C001USD: 1h bars: Polygon answered HTTP 400 for "
                                   "aggregates X:C001USD 1h page 1")
    assert key not in err and key not in caplog.text


# --- any symbol ---------------------------------------------------------------------------------


def test_any_symbol_is_fetched_from_polygon_and_cached_for_an_hour(env):
    market = make_market(1, now=NOW, history_days=400)
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        candles = ingest.fetch_recent_candles("X:C000USD", "4h", 60, now=NOW)
        assert len(candles) == 60
        assert candles.open_time[-1] == NOW - NOW % (4 * HOUR) - 4 * HOUR  # the last closed 4h candle
        assert np.all(np.diff(candles.open_time) == 4 * HOUR)
        assert fake.count("/range/1/hour/") == 1

        again = ingest.fetch_recent_candles("X:C000USD", "4h", 60, now=NOW)
        assert fake.count("/range/1/hour/") == 1  # served from Redis
        assert again.open_time.tolist() == candles.open_time.tolist()
        ttl = cache.get_client().ttl(cache.keys.candles("X:C000USD", "4h"))
        assert 3500 < ttl <= 3600

        monthly = ingest.fetch_recent_candles("X:C000USD", "1m", 6, now=NOW)
        assert len(monthly) == 6 and fake.count("/range/1/day/") == 1

        with pytest.raises(NotFound, match="no recent 1h candles"):
            ingest.fetch_recent_candles("X:UNKNOWNUSD", "1h", 10, now=NOW)


def test_a_coin_listed_days_ago_is_too_little_history_for_a_month_not_missing_at_polygon(env):
    """Audit: ten days of daily bars make no whole month, and the answer said Polygon had no recent 1m candles (and
    that for 30 s), though it had them: the client learnt nothing true about why."""
    market = make_market(1, now=NOW, history_days=10)
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        for _ in range(2):  # and the same from the 30 s memory of the failure
            with pytest.raises(NotFound) as refused:
                ingest.fetch_recent_candles("X:C000USD", "1m", 6, now=NOW)
            assert refused.value.code == "too_little_history"
            message = refused.value.message
            assert "X:C000USD has 1" in message and "too few for one whole 1m candle" in message
        assert fake.count("/range/1/day/") == 1


def test_a_stored_file_behind_the_clock_is_caught_up_from_polygon_and_cached_for_an_hour(env):
    """The weekly refresh leaves a file up to a week behind: a 1h forecast from it would end in the past."""
    market = make_market(1, now=NOW, history_days=30)
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        truth = ingest.fetch_candles(client_for(fake), "X:C000USD", "1h", NOW - 20 * DAY, NOW)[0]
        stored = Candles(*(getattr(truth, name)[:-72] for name in COLUMNS))  # three days behind
        fake.requests.clear()
        recent = caught_up("X:C000USD", "1h", stored, 200, now=NOW)
        assert recent.open_time.tolist() == truth.open_time[-200:].tolist()
        assert np.array_equal(recent.close, truth.close[-200:])
        # One request, for the last stored bar again (Polygon's later word on it wins) and those after it.
        last_open_ms = int(stored.open_time[-1]) * 1000
        assert fake.count("/range/1/hour/") == 1 and f"/{last_open_ms}/" in fake.requests[0]
        cached = storage.cached_candles(cache.lookup_candles("X:C000USD", "1h"), 200)
        assert cached.open_time.tolist() == recent.open_time.tolist()
        # Up to date (the next hour has not closed): no request.
        assert caught_up("X:C000USD", "1h", recent, 200, now=NOW) is recent
        assert fake.count("/range/") == 1
        # Far behind (a refresh that stopped): the last candles alone, in one request of about that many bars.
        far_behind = Candles(*(getattr(truth, name)[:-300] for name in COLUMNS))
        cache.get_client().flushdb()
        assert caught_up("X:C000USD", "1h", far_behind, 100, now=NOW).open_time.tolist() == (
            truth.open_time[-100:].tolist())
        asked_from = int(fake.requests[-1].split("/range/1/hour/")[1].split("/")[0]) // 1000
        assert fake.count("/range/") == 2 and NOW - 102 * HOUR - DAY <= asked_from < NOW - 100 * HOUR


def test_a_stored_file_is_served_as_it_is_when_polygon_fails_or_no_key_is_configured(env, caplog):
    market = make_market(1, now=NOW, history_days=30)
    with FakePolygon(market) as fake:
        stored = ingest.fetch_candles(client_for(fake), "X:C000USD", "1d", NOW - 20 * DAY, NOW - 5 * DAY)[0]
        fake.requests.clear()
        point_settings_at(env, fake, key=None)
        assert caught_up("X:C000USD", "1d", stored, 10, now=NOW) is stored
        assert fake.requests == []

        point_settings_at(env, fake)
        fake.echo = True
        fake.add_fault("/range/1/day/", status=500, times=10)
        with caplog.at_level("WARNING"):
            assert caught_up("X:C000USD", "1d", stored, 10, now=NOW) is stored
        asked = fake.count("/range/")
        assert asked >= 1 and "stale candles served" in caplog.text and "test-key" not in caplog.text
        # One line for one cause: it logged 'upstream fetch failed', then 'stale candles served', for the same one.
        (line,) = [record for record in caplog.records if record.getMessage() in (
            "upstream fetch failed", "stale candles served")]
        assert line.getMessage() == "stale candles served" and line.code and line.error
        assert caught_up("X:C000USD", "1d", stored, 10, now=NOW) is stored
        assert fake.count("/range/") == asked  # the failure is remembered: no second request


def test_a_coin_that_stopped_trading_is_not_forecast_wholly_in_the_past(env):
    """Audit: a coin still listed whose bars ended 20 days ago got 201s whose 30 steps had all closed already
    (data_age_bars 484), with bands and a confidence. When Polygon answers that it has nothing newer, a forecast
    with every step past is a 404; one with steps still to come is served stale, as when Polygon fails."""
    market = make_market(1, now=NOW, history_days=60)
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        stored = ingest.fetch_candles(client_for(fake), "X:C000USD", "1h", NOW - 40 * DAY, NOW)[0]
        real_bars = market.bars
        # A lookback of 100 bars asks from after the last stored candle; one of 721 (the 1h model's) asks for it
        # again, which Polygon still has (review: the refusal never came then).
        for behind, last_n, refused in ((20 * DAY, 100, True), (20 * DAY, 721, True), (10 * HOUR, 721, False)):
            cache.get_client().flushdb()
            ended = Candles(*(getattr(stored, name)[stored.open_time < NOW - behind] for name in COLUMNS))
            market.bars = lambda tk, step, a, b, end=int(ended.open_time[-1]): [
                bar for bar in real_bars(tk, step, a, b) if bar["t"] // 1000 <= end]  # trading stopped after it
            for _ in range(2):  # and the same from the 30 s memory of Polygon's answer
                if refused:
                    with pytest.raises(NotFound) as raised:
                        caught_up("X:C000USD", "1h", ended, last_n, now=NOW)
                    assert raised.value.code == "candles_stopped"
                    assert "wholly in the past" in raised.value.message
                else:
                    assert caught_up("X:C000USD", "1h", ended, last_n, now=NOW) is ended


def test_any_symbol_without_an_api_key_is_a_404_saying_so(env):
    point_settings_at(env, None, key=None)
    with pytest.raises(NotFound) as raised:
        ingest.fetch_recent_candles("X:C000USD", "1h", 10)
    assert raised.value.status == 404
    assert "no Polygon API key is configured" in raised.value.message


# --- refresh function ---------------------------------------------------------------------------


class RefreshContext:
    function_name = "candlecast-refresh"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:candlecast-refresh"
    aws_request_id = "test"
    memory_limit_in_mb = 1024

    def __init__(self, remaining_seconds: float):
        self.remaining_ms = int(remaining_seconds * 1000)

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def test_refresh_function_works_in_chunks_and_hands_on_what_is_left(env):
    from infra.lambda_loader import load_handler

    handler = load_handler("functions/refresh")
    market = make_market(3, now=int(time.time()), history_days=70)  # holds a whole month
    env.setenv("REFRESH_CHAIN", "false")
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        scheduled = {"detail-type": "Scheduled Event", "source": "aws.events", "detail": {}}
        # No time left beyond the margin (30 s for the report and the 1 s statement in flight, as the tests set
        # DB_STATEMENT_TIMEOUT): symbols are refreshed, no candles fetched, all three handed on.
        first = handler(scheduled, RefreshContext(remaining_seconds=30))
        assert first["symbols_upserted"] == 3 and first["symbols_done"] == 0
        assert first["continuation"]["tickers"] == ingest.top_tickers(3)  # in rank order
        assert first["chained"] is False

        second = handler(first["continuation"], RefreshContext(remaining_seconds=900))
    assert second["symbols_upserted"] == 0 and second["symbols_done"] == 3
    assert second["continuation"] is None and second["errors"] == [] and second["files_written"] == 15


def test_a_refresh_whose_symbols_all_fail_emits_the_metrics_its_alarm_reads(env, capsys):
    """A weekly Refresh that completed with every symbol failing (Polygon refusing every candle request) emitted no
    metric and queued no failed run: no alarm could fire. Its counts now go out as EMF metrics, with the namespace,
    names and dimensions RefreshFailedShareAlarm reads."""
    from infra import template_checks
    from infra.lambda_loader import load_handler
    from tests.test_observability import emf_blobs

    env.setenv("REFRESH_CHAIN", "false")
    handler = load_handler("functions/refresh")
    with FakePolygon(make_market(3, now=int(time.time()), history_days=70)) as fake:
        point_settings_at(env, fake)
        fake.add_fault("/v2/aggs/ticker/", status=404, times=1_000)
        capsys.readouterr()
        report = handler({"detail-type": "Scheduled Event", "source": "aws.events", "detail": {}},
                         RefreshContext(remaining_seconds=900))
    assert report["symbols_done"] == 0 and len(report["failed"]) == 3
    (blob,) = [blob for blob in emf_blobs(capsys.readouterr().out) if "RefreshSymbolsFailed" in blob]
    (directive,) = blob["_aws"]["CloudWatchMetrics"]
    assert (blob["RefreshSymbolsFailed"], blob["RefreshSymbolsDone"]) == ([3.0], [0.0])

    alarm = template_checks.load_template()["Resources"]["RefreshFailedShareAlarm"]["Properties"]
    stats = [query["MetricStat"] for query in alarm["Metrics"] if "MetricStat" in query]
    assert sorted(stat["Metric"]["MetricName"] for stat in stats) == ["RefreshSymbolsDone", "RefreshSymbolsFailed"]
    for stat in stats:
        # CloudWatch matches a metric by its namespace and its whole set of dimensions: `service` comes from
        # POWERTOOLS_SERVICE_NAME as the process had it when the module was loaded (the template sets it for every
        # function; a test that loaded the function earlier may not have)
        dimensions = {item["Name"]: item["Value"] for item in stat["Metric"]["Dimensions"]}
        assert {"function", "stage"} <= set(directive["Dimensions"][0]) <= set(dimensions)
        assert set(dimensions) == {"function", "service", "stage"}
        assert stat["Metric"]["Namespace"] == "Candlecast" and dimensions["stage"] == {"Ref": "Stage"}
        assert (dimensions["function"], dimensions["service"]) == (blob["function"], "candlecast")
    template = template_checks.load_template()
    variables = template["Globals"]["Function"]["Environment"]["Variables"]
    assert (variables["POWERTOOLS_METRICS_NAMESPACE"], variables["POWERTOOLS_SERVICE_NAME"]) == ("Candlecast",
                                                                                                 "candlecast")


def test_symbols_whose_metadata_was_not_recorded_count_as_failed_in_the_metrics_once_each(env, clean_db, capsys):
    """Audit: a symbol in `unrecorded` alone (files written, its row not updated) was counted in neither
    RefreshSymbolsDone nor RefreshSymbolsFailed, so RefreshFailedShareAlarm never saw it."""
    import psycopg

    from infra.lambda_loader import load_handler
    from tests.test_observability import emf_blobs

    env.setenv("REFRESH_CHAIN", "false")
    handler = load_handler("functions/refresh")
    market = make_market(4, now=int(time.time()), history_days=30)
    tickers = [symbol.ticker for symbol in market.symbols]
    unrecorded, failed_too = tickers[:2]
    with FakePolygon(market) as fake, psycopg.connect(clean_db.database_url) as holder:
        point_settings_at(env, fake)
        ingest.refresh_symbols(client_for(fake))
        fake.add_fault(f"/v2/aggs/ticker/{failed_too}/range/1/hour/", status=404, times=1_000)
        holder.execute("SELECT id FROM symbols WHERE ticker = ANY(%s) FOR UPDATE", ([unrecorded, failed_too],))
        capsys.readouterr()
        report = handler({"tickers": tickers, "timeframes": ["1h", "1d"]}, RefreshContext(remaining_seconds=900))
        holder.rollback()
    assert (report["unrecorded"], report["failed"], report["symbols_done"]) == ([unrecorded, failed_too],
                                                                                [failed_too], 2)
    (blob,) = [blob for blob in emf_blobs(capsys.readouterr().out) if "RefreshSymbolsFailed" in blob]
    assert (blob["RefreshSymbolsFailed"], blob["RefreshSymbolsDone"]) == ([2.0], [2.0])


@pytest.mark.parametrize(("event", "field"), [
    ({"concurrency": 0}, "concurrency"), ({"concurrency": ingest.MAX_CONCURRENCY + 1}, "concurrency"),
    ({"concurrency": "many"}, "concurrency"), ({"concurrency": True}, "concurrency"),
    ({"symbols": 0}, "symbols"), ({"symbols": -3}, "symbols"), ({"symbols": 10**12}, "symbols"),
    ({"timeframes": ["1h", "2h"]}, "timeframes.1"), ({"timeframes": []}, "timeframes"),
    ({"tickers": "X:C000USD"}, "tickers"), ({"tickers": ["X:C000USD", 5]}, "tickers.1"),
    ({"tickers": ["C000USD!"]}, "tickers.0"), ({"concurency": 4}, "concurency"),
    ({"rate_limited_until": "soon"}, "rate_limited_until"), ({"chunk": 0}, "chunk"),
])
def test_a_refresh_event_out_of_bounds_is_refused_naming_the_field_before_anything_runs(env, event, field):
    """The event was taken raw: an unbounded concurrency (a worker holds a page of bars: memory), a ValueError's
    traceback for a word, any number of symbols, unknown timeframes dropped without a word, a string as tickers."""
    with FakePolygon(make_market(2, now=NOW)) as fake:
        point_settings_at(env, fake)
        with pytest.raises(InvalidEvent, match=f"^refresh event refused, nothing was run: {re.escape(field)}: "):
            ingest.scheduled_refresh(event, 300)
        assert fake.count("/") == 0
    assert bucket_snapshot() == {}


def test_the_refresh_function_refuses_a_bad_event_in_one_line_without_a_traceback(env, caplog):
    from infra.lambda_loader import load_handler

    handler = load_handler("functions/refresh")
    with FakePolygon(make_market(2, now=NOW)) as fake:
        point_settings_at(env, fake)
        with caplog.at_level(logging.INFO), pytest.raises(InvalidEvent) as raised:
            handler({"symbols": 0, "concurrency": "lots"}, RefreshContext(remaining_seconds=900))
        assert fake.count("/") == 0
    assert str(raised.value) == ("refresh event refused, nothing was run: symbols: Input should be greater than or "
                                 "equal to 1; concurrency: Input should be a valid integer")
    (record,) = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert record.getMessage() == "run refused" and record.exc_info is None
    assert record.error == str(raised.value) and record.event == {"symbols": 0, "concurrency": "lots"}


@pytest.mark.parametrize("event", ["x", ["X:C000USD"], 5, None])
@pytest.mark.parametrize("function", ["refresh", "score"])
def test_an_event_that_is_no_json_object_is_refused_not_run_with_the_defaults(env, caplog, monkeypatch, function,
                                                                              event):
    """run_chunk turned any event that was not a dict into {}: `aws lambda invoke --payload '"x"'` ran a whole
    weekly refresh (or hourly scoring), as if the schedule had sent it."""
    from candlecast.services import scoring
    from infra.lambda_loader import load_handler

    handler = load_handler(f"functions/{function}")
    monkeypatch.setattr(scoring, "run", lambda *args, **kwargs: pytest.fail("scored"))
    with FakePolygon(make_market(2, now=NOW)) as fake:
        point_settings_at(env, fake)
        with caplog.at_level(logging.INFO), pytest.raises(InvalidEvent) as raised:
            handler(event, RefreshContext(remaining_seconds=900))
        assert fake.count("/") == 0
    assert str(raised.value) == (f"{function} event refused, nothing was run: event: Input should be a valid "
                                 f"dictionary or instance of {function.capitalize()}Event")
    (record,) = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert record.getMessage() == "run refused" and record.exc_info is None and record.event == event


def test_an_event_with_a_detail_type_that_is_no_schedules_is_validated_not_run_with_the_defaults(env):
    """run_chunk took any dict with a "detail-type" key for the schedule's event: `{"detail-type": "x", "symbols":
    3}` ran a whole weekly refresh of the default 500 symbols."""
    from infra.lambda_loader import load_handler

    handler = load_handler("functions/refresh")
    with FakePolygon(make_market(2, now=NOW)) as fake:
        point_settings_at(env, fake)
        with pytest.raises(InvalidEvent, match="detail-type: Extra inputs are not permitted"):
            handler({"detail-type": "Manual", "symbols": 3}, RefreshContext(remaining_seconds=900))
        assert fake.count("/") == 0


@pytest.mark.parametrize("function", ["refresh", "score"])
def test_the_schedules_own_event_is_a_run_with_the_defaults(env, function):
    """What the template's schedules send (an EventBridge rule without Input): the scheduled event itself."""
    from candlecast.invoke import run_chunk

    scheduled = json.loads((EVENTS / f"{function}_scheduled.json").read_text())
    given = []
    report = run_chunk(scheduled, None, lambda event, budget: given.append(event) or {}, 30.0, 60.0)
    assert given == [{}] and report == {"chained": False}


def test_an_operators_event_and_the_continuation_it_hands_on_validate_and_finish_the_run(env):
    from infra.lambda_loader import load_handler

    handler = load_handler("functions/refresh")
    market = make_market(3, now=int(time.time()), history_days=30)
    tickers = [symbol.ticker for symbol in market.symbols]
    env.setenv("REFRESH_CHAIN", "false")
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        spelled = [ticker.removeprefix("X:").lower() for ticker in tickers]  # "c000usd": normalize_ticker's forms
        first = handler({"tickers": spelled, "timeframes": ["1h", "1d"], "concurrency": 2},
                        RefreshContext(remaining_seconds=30))  # no time beyond the margin: all handed on
        assert first["remaining"] == tickers and first["symbols_upserted"] == 0
        continuation = json.loads(json.dumps(first["continuation"]))  # as Lambda hands it to the next chunk
        assert continuation["tickers"] == tickers and continuation["concurrency"] == 2
        assert ingest.RefreshEvent.parse(continuation).chunk == 2
        second = handler(continuation, RefreshContext(remaining_seconds=900))
    assert second["symbols_done"] == 3 and second["errors"] == [] and second["continuation"] is None
    assert second["files_written"] == 6 and storage.read_all_candles(tickers[0], "1d") is not None


def test_a_symbol_cut_short_in_two_chunks_fails_instead_of_being_handed_on_forever(env):
    """Audit J: pages that never end, at a slow rate: each chunk's deadline cut the symbol short, the next chunk
    started it again from page 1, and the chain never ended (4 identical chunks, errors empty)."""
    market = make_market(2, now=int(time.time()), history_days=30)
    endless, ok = [symbol.ticker for symbol in market.symbols]
    env.setenv("POLYGON_MAX_RPS", "20")
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        fake.endless.append(f"/v2/aggs/ticker/{endless}/")
        first = ingest.scheduled_refresh({"tickers": [endless, ok], "timeframes": ["1h"]}, 1.0)
        assert first["remaining"] == [endless] and first["symbols_done"] == 1 and first["failed"] == []
        assert first["continuation"]["tickers"] == [endless] and first["continuation"]["cut_short"] == [endless]
        second = ingest.scheduled_refresh(first["continuation"], 1.0)
    assert second["failed"] == [endless] and second["remaining"] == [] and second["continuation"] is None
    (error,) = second["errors"]
    assert error.startswith(f"{endless}: 1h bars: cut short by a chunk's deadline in two chunks in a row")
    assert storage.read_all_candles(endless, "1h") is None


def test_a_refresh_chain_ends_after_max_chunks_whatever_is_left(env, monkeypatch):
    market = make_market(2, now=int(time.time()), history_days=30)
    tickers = [symbol.ticker for symbol in market.symbols]
    monkeypatch.setattr(ingest, "MAX_CHUNKS", 2)
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        first = ingest.scheduled_refresh({"tickers": tickers, "timeframes": ["1h"]}, 0)
        assert first["continuation"]["chunk"] == 2 and first["continuation"]["tickers"] == tickers
        second = ingest.scheduled_refresh(first["continuation"], 0)
    assert second["continuation"] is None and second["remaining"] == tickers
    assert second["errors"] == ["refresh: stopped after 2 chunks (ingest.MAX_CHUNKS) with 2 symbols not refreshed; "
                                "the next scheduled run does them"]


def test_a_refresh_chain_whose_chunks_settle_no_symbol_ends_after_max_idle_chunks(env, monkeypatch):
    """Audit: a 429 whose Retry-After outlasts one list's time budget (90 s) but not a chunk: each chunk waited out
    the hold, asked, was refused, and handed the same symbols on, 672 chunks (days of a running function) before
    MAX_CHUNKS stopped it. Here time is scaled down: a 1 s list budget, a 2 s Retry-After and 4 s chunks."""
    market = make_market(2, now=int(time.time()), history_days=30)
    tickers = [symbol.ticker for symbol in market.symbols]
    client_init = polygon.PolygonClient.__init__
    monkeypatch.setattr(polygon.PolygonClient, "__init__",
                        lambda self, *args, **kwargs: client_init(self, *args, **{**kwargs, "time_budget": 1.0}))
    chunks = []
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        fake.add_fault("/v2/aggs/ticker/", status=429, times=100_000, headers={"Retry-After": "2"})
        event: dict | None = {"tickers": tickers, "timeframes": ["1h"]}
        while event is not None and len(chunks) < 6:
            polygon.reset_client()  # each chunk may be a new container
            chunks.append(ingest.scheduled_refresh(event, 4))
            event = chunks[-1]["continuation"]
    assert len(chunks) == ingest.MAX_IDLE_CHUNKS
    assert [chunk["continuation"]["idle_chunks"] for chunk in chunks[:-1]] == [1, 2]
    assert all(chunk["symbols_done"] == 0 and chunk["failed"] == [] for chunk in chunks)
    assert sorted(chunks[-1]["remaining"] + chunks[-1]["retry"]) == sorted(tickers)
    assert chunks[-1]["errors"][-1] == (
        f"refresh: stopped after {ingest.MAX_IDLE_CHUNKS} chunks in a row that refreshed no symbol "
        "(ingest.MAX_IDLE_CHUNKS) with 2 symbols not refreshed; the next scheduled run does them")


def test_a_score_function_that_cannot_be_started_is_reported_not_raised(env, stack, caplog):
    """Raising after the continuation was handed on would make Lambda's async retry run the chunk, and chain it,
    again. Here the Lambda API (moto's) answers that the Score function does not exist."""
    from infra.lambda_loader import load_handler

    handler = load_handler("functions/refresh")
    market = make_market(1, now=int(time.time()), history_days=3)
    env.setenv("REFRESH_CHAIN", "false")
    env.setenv("SCORE_FUNCTION_NAME", "candlecast-test-no-such-score")
    env.setenv("AWS_ENDPOINT_URL_LAMBDA", stack.s3_endpoint_url)
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        report = handler({"tickers": [market.symbols[0].ticker], "timeframes": ["1h"]}, RefreshContext(900))
    assert report["candles_added"] > 0 and report["scoring"] == "not started"
    (record,) = [record for record in caplog.records if record.getMessage() == "scoring not started"]
    assert record.error == "ResourceNotFoundException"


def test_a_chunk_returns_and_raises_no_secret(env):
    from candlecast import redaction
    from candlecast.invoke import run_chunk

    key = "canary-Key-9f8e7d"
    env.setenv("POLYGON_API_KEY", key)
    report = run_chunk({}, None, lambda event, budget: {"errors": [f"X:AUSD: failed on /v2/{key}/x"]}, 0, 1)
    assert report["errors"] == ["X:AUSD: failed on /v2/[redacted]/x"]

    def failing(event, budget):
        try:
            raise ValueError(f"upstream said {key}")
        except ValueError as error:
            raise PolygonAuthError("refused") from error

    with pytest.raises(redaction.RedactedError) as raised:
        run_chunk({}, None, failing, 0, 1)
    assert key not in "".join(traceback.format_exception(raised.value))
    assert str(raised.value) == "PolygonAuthError: refused"


def test_no_request_starts_after_the_chunks_deadline_at_a_slow_rate(env):
    """Six symbols need twelve requests, a second apart at this rate: eleven seconds. The chunk's deadline is
    two seconds in; symbols in flight then must not queue at the limiter past it."""
    market = make_market(6, now=NOW, history_days=200)
    tickers = [symbol.ticker for symbol in market.symbols]
    with FakePolygon(market) as fake:
        started = time.monotonic()
        summary = ingest.run_ingest(client_for(fake, max_rps=1.0), tickers=tickers, refresh=False, now=NOW,
                                    history_days=HISTORY, concurrency=6, deadline=started + 2)
        elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed  # the deadline, one request in flight and room for a loaded machine
    assert summary.failed == [] and summary.errors == [] and summary.retry == []
    assert summary.remaining and summary.symbols_done + len(summary.remaining) == 6
    assert fake.count("/range/") == summary.requests <= 4


def test_a_429_with_a_long_retry_after_holds_the_key_and_hands_the_chunk_on(env):
    """Audit J: a 24 h Retry-After was honoured per request: 52 symbols sent 208 requests in 5 s into the limit."""
    market = make_market(12, now=NOW, history_days=200)
    tickers = [symbol.ticker for symbol in market.symbols]
    with FakePolygon(market) as fake:
        fake.add_fault("/v2/aggs/ticker/", status=429, times=1000, headers={"Retry-After": "86400"})
        client = client_for(fake)
        started = time.monotonic()
        summary = ingest.run_ingest(client, tickers=tickers, refresh=False, now=NOW, history_days=HISTORY,
                                    concurrency=4, deadline=started + 60)
        assert time.monotonic() - started < 10
        assert fake.count("/v2/aggs/ticker/") <= 4  # those in flight when the first 429 came
    assert summary.remaining == tickers and summary.failed == [] and summary.retry == []
    assert summary.errors == ["Polygon rate-limited the key for 86400 s (Retry-After): 12 symbols handed on"]


def test_a_retry_after_of_a_thousand_digits_holds_the_client_a_week():
    with FakePolygon() as fake:
        fake.add_fault("/v9/limited", status=429, times=10, headers={"Retry-After": "9" * 1000})
        client = client_for(fake)
        with pytest.raises(PolygonError, match="rate-limited the key for 604800 s"):
            client.get_json("/v9/limited", what="limited")
        with pytest.raises(PolygonError, match="rate-limited the key"):
            client.get_json("/v9/other", what="other")
    assert fake.count("/v9/") == 1 and 604700 < client.limiter.held() <= 604800


@pytest.mark.parametrize("status", [429, 503])
def test_a_retry_after_that_is_no_number_is_ignored(status):
    """Headers are read as Latin-1, where '²' passes str.isdigit() and fails float(): a 503 with it raised a bare
    ValueError quoting the header (a 500 on the API path, a failed weekly run, upstream text in the log)."""
    with FakePolygon() as fake:
        fake.add_fault("/v3/reference/tickers", status=status, times=2, headers={"Retry-After": "\u00b2"})
        page = client_for(fake).get_json("/v3/reference/tickers", what="listing")
    assert fake.count("/v3/reference/tickers") == 3 and "results" in page


def test_a_short_retry_after_makes_every_request_wait_then_the_run_goes_on(env):
    market = make_market(3, now=NOW, history_days=200)
    tickers = [symbol.ticker for symbol in market.symbols]
    with FakePolygon(market) as fake:
        fake.add_fault("/v2/aggs/ticker/", status=429, times=1, headers={"Retry-After": "1"})
        started = time.monotonic()
        summary = ingest.run_ingest(client_for(fake), tickers=tickers, refresh=False, now=NOW, history_days=HISTORY,
                                    concurrency=3, deadline=started + 60)
    assert summary.symbols_done == 3 and summary.errors == [] and time.monotonic() - started >= 1


def test_a_refresh_chain_carries_the_keys_wait_and_stops_when_it_outlasts_a_chunk(env, capsys):
    """The symbols the stopped chain leaves undone count as failed in the metrics (audit: both counts were 0, so
    the share alarm never saw a weekly refresh that did nothing)."""
    from infra.lambda_loader import load_handler
    from tests.test_observability import emf_blobs

    env.setenv("REFRESH_CHAIN", "false")
    handler = load_handler("functions/refresh")
    market = make_market(3, now=int(time.time()), history_days=30)
    tickers = [symbol.ticker for symbol in market.symbols]
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        fake.add_fault("/v2/aggs/ticker/", status=429, times=1000, headers={"Retry-After": "3600"})
        first = ingest.scheduled_refresh({"tickers": tickers, "timeframes": ["1h"]}, 300)
        assert first["continuation"]["tickers"] == tickers
        assert 3590 < first["continuation"]["rate_limited_until"] - time.time() <= 3600
        assert first["errors"] == ["Polygon rate-limited the key for 3600 s (Retry-After): 3 symbols handed on"]
        sent = fake.count("/")
        polygon.reset_client()  # the next chunk may run in a new container
        capsys.readouterr()
        second = handler(first["continuation"], RefreshContext(remaining_seconds=900))
        assert fake.count("/") == sent  # nothing sent into the limit
    assert second["continuation"] is None and second["remaining"] == tickers and second["failed"] == []
    (error,) = second["errors"]
    assert error.startswith("Polygon rate-limited the key for ") and "3 symbols not refreshed in this run" in error
    (blob,) = [blob for blob in emf_blobs(capsys.readouterr().out) if "RefreshSymbolsFailed" in blob]
    assert (blob["RefreshSymbolsFailed"], blob["RefreshSymbolsDone"]) == ([3.0], [0.0])


def test_turns_at_the_rate_limiter_do_not_count_against_a_lists_budget():
    market = make_market(1, now=NOW, history_days=30)
    market.bars_per_page = 100  # 30 days of hours: 8 pages, a quarter second apart at this rate
    with FakePolygon(market) as fake:
        client = client_for(fake, max_rps=4.0, time_budget=1.0)
        bars = client.aggregates("X:C000USD", 1, "hour", (NOW - 30 * DAY) * 1000, NOW * 1000)
    assert len(bars) == len(market.bars("X:C000USD", HOUR, NOW - 30 * DAY, NOW)) > 700
    assert fake.count("/v2/aggs/ticker/X:C000USD/") == 8


def test_rate_limiter_spaces_requests_across_threads():
    from concurrent.futures import ThreadPoolExecutor

    limiter = polygon.RateLimiter(per_second=50)
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: limiter.wait(), range(11)))
    assert time.monotonic() - started >= 10 / 50 * 0.95  # 11 requests need 10 gaps of 20 ms


@pytest.fixture
def partitioned_redis(env, clean_db):
    """The cache reaches Redis through a proxy; partitioned(True) drops every command on the way (Redis keeps
    its entries and never sees the command), partitioned(False) heals it. A 0.5 s socket timeout."""
    from infra.slow_proxy import SlowProxy

    proxy = SlowProxy(clean_db.redis_url)
    env.setenv("REDIS_URL", proxy.url)
    env.setenv("REDIS_SOCKET_TIMEOUT", "0.5")
    get_settings.cache_clear()
    cache.reset_client()

    def partitioned(cut: bool) -> None:
        proxy.answer = b"" if cut else None

    yield partitioned
    proxy.close()
    cache.reset_client()


def served_symbol(ticker: str) -> dict:
    from candlecast.services import symbols

    return json.loads(symbols.get(ticker))


def test_a_refresh_while_redis_is_unreachable_invalidates_again_at_the_end_of_its_chunk(partitioned_redis):
    """The refresh's invalidation was dropped while Redis was unreachable: once it answered again, the retired
    symbol was served as active for the rest of its TTL (24 h then)."""
    market = make_market(30, now=NOW)
    gone = market.symbols[-1].ticker
    with FakePolygon(market) as fake:
        ingest.refresh_symbols(client_for(fake))
        assert served_symbol(gone)["is_active"] is True  # cached
        market.symbols = market.symbols[:-1]
        partitioned_redis(True)  # Redis unreachable while the refresh runs, back while the chunk fetches candles
        summary = ingest.run_ingest(client_for(fake), tickers=[market.symbols[0].ticker], now=NOW,
                                    history_days=HISTORY, on_symbol=lambda _ticker: partitioned_redis(False))
    deadline = time.monotonic() + 10
    while cache.is_down():  # the cache is used again (its probe saw Redis answer)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert gone not in active_tickers()
    assert served_symbol(gone)["is_active"] is False
    assert summary.symbol_cache_stale is False and summary.errors == []


def test_a_refresh_the_cache_never_took_says_so_and_hands_the_retry_on(partitioned_redis):
    market = make_market(30, now=NOW)
    gone = market.symbols[-1].ticker
    with FakePolygon(market) as fake:
        ingest.refresh_symbols(client_for(fake))
        served_symbol(gone)
        market.symbols = market.symbols[:-1]
        partitioned_redis(True)
        summary = ingest.run_ingest(client_for(fake), tickers=[], now=NOW)
        partitioned_redis(False)
    assert summary.symbol_cache_stale is True
    assert summary.errors == ["cache: symbols changed but the cache did not take their invalidation (tried again at "
                              "the end of the chunk): they are served up to 3600 s late"]
    assert cache.get_client().ttl(cache.keys.symbol(gone)) <= 3600  # how late at most (24 h before)
    assert cache.SYMBOLS_STALE_SECONDS == 3600


def test_the_next_chunk_retries_an_invalidation_an_earlier_one_could_not_do(env):
    """scheduled_refresh hands symbol_cache_stale on in its continuation; the next chunk invalidates again."""
    seen = cache.lookup_symbol("X:C000USD")
    assert cache.fill_symbol("X:C000USD", b"{}", seen)
    with FakePolygon(make_market(3, now=NOW)) as fake:
        summary = ingest.run_ingest(client_for(fake), tickers=[], refresh=False, now=NOW, symbol_cache_stale=True)
    assert summary.symbol_cache_stale is False
    assert cache.lookup_symbol("X:C000USD").value is None


def _stale_candle_run(clean_db, heal_during_the_chunk: bool) -> tuple[str, "ingest.IngestSummary"]:
    """A ticker's 1h file written and its candles cached a day ago, then a run writing its 1h and 4h files while
    Redis refuses writes (a read-only replica after a failover), healed after its symbol or never."""
    from contextlib import ExitStack

    market = make_market(3, now=NOW)
    ticker = market.symbols[0].ticker
    with FakePolygon(market) as fake:
        ingest.run_ingest(client_for(fake), tickers=[ticker], refresh=False, now=NOW - DAY, history_days=HISTORY,
                          timeframes=["1h", "4h"])
        assert storage.read_candles(ticker, "1h", 48).open_time[-1] < NOW - DAY  # cached
        with ExitStack() as refusing:
            refusing.enter_context(redis_refusing_writes(clean_db.redis_url, "readonly"))
            summary = ingest.run_ingest(client_for(fake), tickers=[ticker], refresh=False, now=NOW,
                                        history_days=HISTORY, timeframes=["1h", "4h"],
                                        on_symbol=lambda _ticker: heal_during_the_chunk and refusing.close())
    return ticker, summary


def test_candle_files_written_while_redis_refuses_writes_are_dropped_again_at_the_end_of_the_chunk(env, clean_db):
    """The file's invalidation was refused (a read-only replica after a failover, OOM) and nothing tried it again:
    its old candles were forecast from for an hour."""
    ticker, summary = _stale_candle_run(clean_db, heal_during_the_chunk=True)
    assert summary.files_written == 2
    assert summary.candle_cache_stale == [] and summary.errors == []
    assert storage.read_candles(ticker, "1h", 48).open_time[-1] > NOW - DAY


def test_candle_files_the_cache_never_dropped_are_named_and_handed_on_to_the_next_chunk(env, clean_db):
    ticker, summary = _stale_candle_run(clean_db, heal_during_the_chunk=False)
    assert summary.candle_cache_stale == [f"{ticker} 1h", f"{ticker} 4h"]
    assert ("cache: 2 candle files written but the cache did not drop their cached candles (tried again at the end "
            "of the chunk): the old candles are served up to 3600 s") in summary.errors
    assert storage.read_candles(ticker, "1h", 48).open_time[-1] < NOW - DAY  # still the old ones
    with FakePolygon(make_market(3, now=NOW)) as fake:
        after = ingest.run_ingest(client_for(fake), tickers=[], refresh=False, now=NOW,
                                  candle_cache_stale=summary.candle_cache_stale)
    assert after.candle_cache_stale == [] and after.errors == []
    assert storage.read_candles(ticker, "1h", 48).open_time[-1] > NOW - DAY


def test_an_attempt_is_cut_at_its_time_limit_counting_the_wait_for_its_headers():
    """Audit: the body's limit started when the headers came, so an answer whose headers took 2 s had 2.5 s more
    for its body: POST /predictions' "6 s" for Polygon measured 7.9 s with one slow answer."""
    with FakePolygon() as fake:
        fake.delay = 2.0
        fake.add_fault("/v9/slow", kind="trickle", times=1, body=b'{"status":"OK","results":[]' + b" " * 32 + b"}")
        client = client_for(fake, time_budget=2.5, request_timeout=2.5, read_timeout=2.5, max_attempts=1)
        started = time.monotonic()
        with pytest.raises(PolygonError, match="answer took more than"):
            client.get_json("/v9/slow", what="slow")
        elapsed = time.monotonic() - started
    assert elapsed < 3.5, elapsed  # it took 4.5 s (2 s of headers, then 2.5 s of body)


def test_inside_an_api_request_a_retry_after_wait_counts_against_the_time_budget():
    """Audit: the API's client stopped its budget's clock while it waited out a 429's Retry-After, then spent the
    whole budget again: 12.9 s for a "6 s" budget. Its waits now count; a batch run's still do not."""
    with FakePolygon() as fake:
        def slow_after_limit() -> None:
            fake.add_fault("/v9/limited", status=429, times=1, headers={"Retry-After": "2"})
            fake.add_fault("/v9/limited", kind="trickle", times=1,
                           body=b'{"status":"OK","results":[]' + b" " * 32 + b"}")

        timings = {}
        for counts_turns in (True, False):
            slow_after_limit()
            client = client_for(fake, time_budget=3.0, request_timeout=4.0, max_attempts=2,
                                budget_counts_turns=counts_turns)
            started = time.monotonic()
            with pytest.raises(PolygonError):
                client.get_json("/v9/limited", what="limited")
            timings[counts_turns] = time.monotonic() - started
    assert polygon.INTERACTIVE_LIMITS["budget_counts_turns"] is True
    assert timings[True] < 3.8 < timings[False], timings  # about 3 s (the budget), and 2 s + 3 s


def test_a_bar_is_taken_only_once_it_has_settled():
    """Audit: a bar was taken at the second its period ended, while trades reported late still change Polygon's
    aggregate of it: a refresh or a create at 22:00:00.3 stored or cached the 21:00 bar's provisional close, which
    Score then scored for good."""
    boundary = NOW - NOW % HOUR
    bar = {"t": (boundary - HOUR) * 1000, "o": 1.0, "h": 2.0, "l": 0.5, "c": 1.5, "v": 10.0}
    kept = {now - boundary: len(ingest.bars_to_candles([bar], HOUR, now)[0])
            for now in (boundary, boundary + ingest.SETTLE_SECONDS - 1, boundary + ingest.SETTLE_SECONDS)}
    assert kept == {0: 0, ingest.SETTLE_SECONDS - 1: 0, ingest.SETTLE_SECONDS: 1}


def test_a_catch_up_takes_polygons_later_word_on_the_last_candle_it_had(env):
    """Audit: each hourly catch-up fetched only the bars after the last one it held, so a close taken before Polygon
    corrected it (3 % off) stayed in the served candles, re-cached each hour, until the weekly refresh. The last bar
    is fetched again in the same one request, and Polygon's answer wins, as in the refresh."""
    market = make_market(1, now=NOW, history_days=30)
    with FakePolygon(market) as fake:
        point_settings_at(env, fake)
        truth = ingest.fetch_candles(client_for(fake), "X:C000USD", "1h", NOW - 20 * DAY, NOW)[0]
        held = Candles(*(getattr(truth, name)[:-3].copy() for name in COLUMNS))
        held.close[-1] *= 0.97  # provisional
        fake.requests.clear()
        recent = caught_up("X:C000USD", "1h", held, 200, now=NOW)
        assert recent.open_time.tolist() == truth.open_time[-200:].tolist()
        assert np.array_equal(recent.close, truth.close[-200:])
        assert fake.count("/range/1/hour/") == 1 and f"/{int(held.open_time[-1]) * 1000}/" in fake.requests[0]


def test_inside_an_api_request_a_turn_at_the_rate_limiter_past_the_budget_is_not_waited_for():
    """Audit: at the free tier's rate (a request every 12 s) a container's second catch-up slept for its turn, past
    its 6 s budget, then failed for want of time: a create 12 s late for nothing. Now it gives up at once."""
    from candlecast.polygon import PolygonDeadline

    with FakePolygon() as fake:
        fake.files["/v9/one"] = (200, b'{"status":"OK","results":[]}')
        client = client_for(fake, max_rps=0.2, time_budget=1.0, budget_counts_turns=True)
        client.get_json("/v9/one", what="first")
        started = time.monotonic()
        with pytest.raises(PolygonDeadline, match="turn at the rate limiter"):
            client.get_json("/v9/one", what="second")
        assert time.monotonic() - started < 1.0  # it slept 5 s for its turn
        assert fake.requests.count("/v9/one") == 1
