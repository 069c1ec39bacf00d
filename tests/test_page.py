"""The forecast page at `/` and the Swagger UI at `/docs`, in a real browser; the page for a keyboard, a screen
reader and weak eyes too (WCAG 2.1 AA).

Debian's chromium (`make browser` installs it when missing), driven headless by playwright; no browser is
downloaded. The page runs against the local stack: real PostgreSQL, Redis and moto's S3, the sample seeded
with its track record. A screenshot of the drawn page is kept in .local/test-artifacts/.
"""

import json
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import urlopen

import psycopg
import pytest

from infra.local_api import LocalApi, serve_in_thread
from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.s3, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / ".local" / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/chromium is missing: `make browser` installs Debian's chromium")
        pytest.skip("/usr/bin/chromium is missing: run `make browser`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def site(clean_db, seeded_track_record):
    """The seeded local stack (with the sample's track record, as `make run` seeds it) behind the local API."""
    api = LocalApi(environment=clean_db.environment())
    server, url = serve_in_thread(api)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


def local_only(page, url: str) -> list[str]:
    """Refuse (and list) every request that leaves the local API: the pages must work offline."""
    host = urlsplit(url).netloc
    escaped: list[str] = []

    def route(request_route):
        target = urlsplit(request_route.request.url)
        if target.scheme in ("http", "https") and target.netloc != host:
            escaped.append(request_route.request.url)
            return request_route.abort()
        return request_route.continue_()

    page.route("**/*", route)
    return escaped


def wait_until(page, expression: str, timeout: float = 30_000) -> None:
    """Wait until `expression` is true in the page. Page.wait_for_function evaluates a string inside the page,
    which the pages' Content-Security-Policy refuses (no 'unsafe-eval'); Page.evaluate goes through the
    debugging protocol, which it does not."""
    ends = time.monotonic() + timeout / 1000
    while not page.evaluate(expression):
        if time.monotonic() > ends:
            raise TimeoutError(f"not true after {timeout / 1000:g} s: {expression}")
        page.wait_for_timeout(25)


def painted(page, selector: str, rgb: tuple[int, int, int]) -> int:
    """Pixels of colour `rgb` (±12 per channel) on the canvases under `selector`."""
    return page.evaluate(
        """([selector, [r, g, b]]) => {
            let count = 0;
            for (const canvas of document.querySelectorAll(`${selector} canvas`)) {
                const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
                for (let i = 0; i < data.length; i += 4) {
                    if (Math.abs(data[i] - r) <= 12 && Math.abs(data[i + 1] - g) <= 12
                        && Math.abs(data[i + 2] - b) <= 12 && data[i + 3] > 200) count++;
                }
            }
            return count;
        }""",
        [selector, list(rgb)],
    )


def test_the_page_creates_a_forecast_and_draws_it(browser, site, clean_db):
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    escaped = local_only(page, site)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.add_init_script(RECORD_POLICY_VIOLATIONS)
    page.goto(f"{site}/")
    wait_until(page, "document.querySelectorAll('#symbols option').length > 0")
    with psycopg.connect(clean_db.database_url) as conn:
        before = conn.execute("SELECT count(*) FROM predictions").fetchone()[0]

    page.fill("#symbol", "X:BTCUSDT")
    page.select_option("#timeframe", "1h")
    page.click("#forecast")
    wait_until(page, "window.candlecast.drawn === true", timeout=30_000)
    page.wait_for_timeout(300)  # the charts paint on the next animation frame

    state = page.evaluate("window.candlecast")
    assert state["candles"] == 120 and state["expected"] == 30
    assert state["reliability"]["live"] > 0 and state["reliability"]["backtest"] > 0
    with psycopg.connect(clean_db.database_url) as conn:
        newest = conn.execute("SELECT id, ticker, timeframe FROM predictions ORDER BY created_at DESC LIMIT 1")
        newest = newest.fetchone()
        after = conn.execute("SELECT count(*) FROM predictions").fetchone()[0]
    assert after == before + 1 and newest[1:] == ("X:BTCUSDT", "1h")
    assert str(newest[0]) in page.text_content("#status")
    assert re.fullmatch(r"\d{1,3}(,\d{3})+\.\d\d", state["priceLabel"]), state  # thousands grouped, cents

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "forecast-page.png"), full_page=True)
    # The chart drew: the expected candles, both bands and the recent candles are on the canvas.
    assert painted(page, "#chart", (0xFF, 0xB7, 0x4D)) > 200  # expected candles
    assert painted(page, "#chart", (0x29, 0x62, 0xFF)) > 20  # 80 % band (1 px lines)
    assert painted(page, "#chart", (0x79, 0x86, 0xCB)) > 20  # 95 % band (dashed)
    assert painted(page, "#chart", (0x00, 0x89, 0x7B)) + painted(page, "#chart", (0xEF, 0x53, 0x50)) > 200
    assert painted(page, "#reliability", (0xE6, 0x51, 0x00)) > 20  # live (or replay) reliability dots
    assert painted(page, "#reliability", (0x45, 0x5A, 0x64)) > 20  # backtest reliability dots
    # Live figures when the seed found origins after the model's training window, else the labelled replay.
    with urlopen(f"{site}/models/1h") as response:
        live = json.load(response)["live"]["n_scored"] > 0
    assert page.text_content("#live-head") == ("live" if live else "replay (in-sample)")

    assert errors == [] and escaped == [] and page.evaluate("window.policyViolations") == []
    page.close()


# Each Content-Security-Policy violation's directive: a policy that blocked the page's own drawing shows here.
RECORD_POLICY_VIOLATIONS = """window.policyViolations = [];
document.addEventListener("securitypolicyviolation", (event) => window.policyViolations.push(event.violatedDirective));
"""


def test_no_other_site_can_frame_the_pages(browser, site):
    """frame-ancestors 'none': a page elsewhere cannot lay the forecast button or Swagger UI's under its own."""
    page = browser.new_page()
    page.goto(f"http://localhost:{urlsplit(site).port}/openapi.json")  # another origin
    for path in ("/", "/docs"):
        page.evaluate("""(src) => {
            const frame = document.createElement("iframe");
            frame.src = src;
            document.body.appendChild(frame);
        }""", f"{site}{path}")
    # Until both frames have navigated: an iframe's load event can come for its first about:blank, before its src.
    deadline = time.monotonic() + 15
    while True:
        framed = [frame.url for frame in page.frames if frame != page.main_frame]
        if (len(framed) == 2 and all(url not in ("", "about:blank") for url in framed)) or time.monotonic() > deadline:
            break
        page.wait_for_timeout(100)
    assert len(framed) == 2 and all(url.startswith("chrome-error://") for url in framed), framed
    page.close()


def slow_hourly_page(browser, site: str, delay_ms: int):
    """A new page whose 1h forecasts answer `delay_ms` late, with X:BTCUSDT and 1h chosen."""
    page = browser.new_page()
    page.add_init_script(SLOW_FORECAST % ("1h", delay_ms))
    page.goto(f"{site}/")
    page.fill("#symbol", "X:BTCUSDT")
    page.select_option("#timeframe", "1h")
    return page


def forecast(page, symbol: str, timeframe: str) -> None:
    page.fill("#symbol", symbol)
    page.select_option("#timeframe", timeframe)
    page.evaluate("document.querySelector('#status').textContent = ''")
    page.click("#forecast")
    wait_until(page, "!['', 'forecasting…'].includes(document.querySelector('#status').textContent)",
               timeout=30_000)
    page.wait_for_timeout(300)  # the charts paint on the next animation frame


def btc_daily_forecast(browser, site: str, width: int, height: int):
    """A new page of that size with X:BTCUSDT's 1d forecast drawn."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(f"{site}/")
    forecast(page, "X:BTCUSDT", "1d")
    assert page.evaluate("window.candlecast.drawn") is True, page.text_content("#status")
    return page


def resize(page, width: int, height: int = 900) -> None:
    page.set_viewport_size({"width": width, "height": height})
    page.wait_for_timeout(300)  # the resize observer redraws on the next frame


def expected_candles_painted(page) -> int:
    return painted(page, "#chart", (0xFF, 0xB7, 0x4D))


def stored_predictions(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM predictions").fetchone()[0]


def test_the_page_says_why_a_forecast_failed_and_leaves_nothing_of_the_last_one(browser, site):
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    page.goto(f"{site}/")
    title = page.text_content("#chart-title")
    forecast(page, "X:BTCUSDT", "1h")
    assert page.evaluate("window.candlecast.drawn") is True and expected_candles_painted(page) > 200
    assert page.text_content("#chart-title") != title

    forecast(page, "NOPE-USD", "1h")
    assert "error" in page.get_attribute("#status", "class")
    assert "symbol_not_found" in page.text_content("#status")
    assert page.evaluate("window.candlecast.drawn") is False
    # The earlier forecast is gone: its title, its candles and bands, its model figures.
    assert page.text_content("#chart-title") == title
    assert expected_candles_painted(page) == 0
    assert painted(page, "#chart", (0x29, 0x62, 0xFF)) == 0
    assert page.text_content("#model-title") == "Model"
    page.close()


@pytest.mark.parametrize(("status_code", "body", "reported"), [
    (502, "<html><body>Bad Gateway</body></html>", "HTTP 502"),  # a proxy's error page: its status
    (200, "<html><body>Welcome to the captive portal</body></html>",  # a 200 that is not ours: said in words
     "POST /predictions answered HTTP 200 with a body that is not JSON (text/html)"),
])
def test_an_answer_that_is_not_json_is_reported_in_words(browser, site, status_code, body, reported):
    page = browser.new_page()
    page.goto(f"{site}/")
    page.route("**/predictions", lambda route: route.fulfill(status=status_code, content_type="text/html", body=body))
    forecast(page, "X:BTCUSDT", "1h")
    status = page.text_content("#status")
    assert status.startswith(reported), status
    assert "Unexpected token" not in status
    assert page.evaluate("window.candlecast.drawn") is False
    page.close()


# The page's own fetch, holding the answers to POST /predictions for one timeframe back (a slow API).
SLOW_FORECAST = """const fetchNow = window.fetch;
window.fetch = async (url, options) => {
  const response = await fetchNow(url, options);
  if (options && options.body && options.body.includes('"%s"')) await new Promise((done) => setTimeout(done, %d));
  return response;
};"""


def test_the_forecast_button_is_busy_while_its_request_is_in_flight_and_sends_it_once(browser, site):
    page = browser.new_page()
    page.add_init_script(SLOW_FORECAST % ("1h", 3000))
    posted: list[str] = []
    page.on("request", lambda request: posted.append(request.url) if request.method == "POST" else None)
    page.goto(f"{site}/")
    page.fill("#symbol", "X:BTCUSDT")
    page.select_option("#timeframe", "1h")
    page.click("#forecast")
    wait_until(page, "document.querySelector('#forecast').disabled", timeout=2_000)
    assert page.get_attribute("#forecast", "aria-busy") == "true"
    assert page.text_content("#forecast") == "Forecasting…"
    page.click("#forecast", force=True)  # a second press while the first is in flight does nothing
    wait_until(page, "window.candlecast.drawn === true", timeout=30_000)
    assert len(posted) == 1, posted
    assert not page.is_disabled("#forecast") and page.text_content("#forecast") == "Forecast"
    assert page.get_attribute("#forecast", "aria-busy") == "false"
    page.close()


def test_only_the_latest_forecast_is_drawn_when_an_earlier_answer_comes_late(browser, site):
    """A forecast started while another is in flight (a submit the disabled button does not stop, such as a
    script's) owns the page: the earlier answer, arriving after it, is not drawn over it."""
    page = slow_hourly_page(browser, site, 3000)
    page.click("#forecast")
    page.wait_for_timeout(300)
    page.select_option("#timeframe", "1d")
    page.evaluate("document.querySelector('#controls').requestSubmit()")
    wait_until(page, "document.querySelector('#chart-title').textContent.includes(' 1d (UTC):')", timeout=30_000)
    page.wait_for_timeout(4_000)  # past the 1h answer
    assert " 1d (UTC):" in page.text_content("#chart-title"), page.text_content("#chart-title")
    assert "1d" in page.text_content("#model-title") and "1h" not in page.text_content("#model-title")
    assert page.evaluate("window.candlecast.drawn") is True and "error" not in (page.get_attribute("#status", "class")
                                                                                or "")
    page.close()


def test_the_page_reads_each_models_track_record_once_per_load(browser, site):
    """The route throttle of GET /models/{timeframe} (bursts of 2, then one per 5 s) must not fail a user
    who presses Forecast every few seconds: the page asks for each timeframe's model once."""
    page = browser.new_page()
    asked: list[str] = []
    page.on("request", lambda request: asked.append(urlsplit(request.url).path))
    page.goto(f"{site}/")
    for _ in range(2):  # a repeat is the stored prediction (200), drawn again
        forecast(page, "X:BTCUSDT", "1h")
        assert page.evaluate("window.candlecast.drawn") is True, page.text_content("#status")
    assert asked.count("/models/1h") == 1 and asked.count("/predictions") == 2
    page.close()


def test_a_throttled_request_says_how_long_to_wait_and_creates_nothing(browser, site, clean_db):
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    page.goto(f"{site}/")
    forecast(page, "X:BTCUSDT", "1h")
    assert page.evaluate("window.candlecast.drawn") is True
    before = stored_predictions(clean_db.database_url)
    # API Gateway's own 429, as an HTTP API sends it: no Retry-After (the page waits a throttle's refill), or
    # with one (the page waits that).
    page.route("**/models/4h", lambda route: route.fulfill(
        status=429, content_type="application/json", body='{"message":"Too Many Requests"}'))
    forecast(page, "X:BTCUSDT", "4h")
    status = page.text_content("#status")
    assert "Too many requests" in status and "Try again in 5 s" in status, status
    assert page.is_disabled("#forecast")
    assert page.evaluate("window.candlecast.drawn") is False and expected_candles_painted(page) == 0
    assert stored_predictions(clean_db.database_url) == before  # the model is read before the create
    wait_until(page, "!document.querySelector('#forecast').disabled", timeout=8_000)

    page.route("**/models/1d", lambda route: route.fulfill(
        status=429, content_type="application/json", headers={"Retry-After": "2"},
        body='{"message":"Too Many Requests"}'))
    forecast(page, "X:BTCUSDT", "1d")
    assert "Try again in 2 s" in page.text_content("#status")
    page.unroute("**/models/4h")
    wait_until(page, "!document.querySelector('#forecast').disabled", timeout=4_000)
    forecast(page, "X:BTCUSDT", "4h")  # asked again: a refused read is not kept
    assert page.evaluate("window.candlecast.drawn") is True, page.text_content("#status")
    page.close()


def test_the_monthly_forecast_is_drawn_on_a_logarithmic_price_axis(browser, site):
    """At 1m the 95 % band reaches thousands of times the price: on a linear axis the candles flatten into a
    line at the bottom (and the axis goes below zero); on a log axis they keep their bodies."""
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    page.goto(f"{site}/")
    forecast(page, "XRPUSD", "1m")
    assert page.evaluate("window.candlecast.drawn") is True, page.text_content("#status")
    logarithmic = page.evaluate("LightweightCharts.PriceScaleMode.Logarithmic")
    assert page.evaluate("window.candlecast.priceScaleMode") == logarithmic
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "forecast-page-1m.png"), full_page=True)
    # The recent candles' bodies: about 6,000 pixels on the log axis, about 1,400 on a linear one.
    recent = painted(page, "#chart", (0x00, 0x89, 0x7B)) + painted(page, "#chart", (0xEF, 0x53, 0x50))
    assert recent > 3000, recent
    assert expected_candles_painted(page) > 300
    page.close()


def test_a_page_on_another_origin_can_page_through_a_list(browser, site):
    """CORS exposes X-Next-Cursor: a script served from elsewhere reads it and fetches the next page."""
    page = browser.new_page()
    # The same server under another name is another origin (a page off the loopback may not fetch from it).
    other_origin = f"http://localhost:{urlsplit(site).port}"
    assert urlsplit(site).hostname != "localhost"
    page.goto(f"{other_origin}/openapi.json")  # a document that calls no throttled route itself
    seen = page.evaluate("""async (api) => {
        const first = await fetch(`${api}/symbols/top?limit=2`);
        const cursor = first.headers.get("x-next-cursor");
        const second = cursor && await fetch(`${api}/symbols/top?limit=2&cursor=${encodeURIComponent(cursor)}`);
        return { cursor, first: (await first.json()).map((s) => s.ticker),
                 second: second ? (await second.json()).map((s) => s.ticker) : null };
    }""", site)
    assert seen["cursor"], "X-Next-Cursor is not readable from another origin"
    assert len(seen["first"]) == 2 and seen["second"] and not set(seen["first"]) & set(seen["second"])
    page.close()


def test_docs_is_powertools_swagger_ui_over_the_whole_api_offline(browser, site):
    import json

    page = browser.new_page()
    escaped = local_only(page, site)
    page.add_init_script(RECORD_POLICY_VIOLATIONS)
    page.goto(f"{site}/docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    document = json.loads((ROOT / "infra" / "openapi.json").read_text())
    operations = sum(len(item) for item in document["paths"].values())
    assert page.locator(".opblock").count() == operations
    assert page.locator(".opblock-summary-path", has_text="/models/{timeframe}").count() == 1
    # "Try it out" on POST /predictions starts from the documented example, a symbol the stack has, and creates a
    # forecast (a body generated from the pattern named a random ticker: 404).
    create = page.locator(".opblock-post", has=page.locator(".opblock-summary-path", has_text="/predictions"))
    create.locator(".opblock-summary").click()
    create.locator("button.try-out__btn").click()
    body = json.loads(create.locator("textarea.body-param__text").input_value())
    assert body == {"symbol": "X:BTCUSDT", "timeframe": "1d"}
    create.locator("button.execute").click()
    status = create.locator(".live-responses-table tr.response .response-col_status").first
    status.wait_for(timeout=30_000)
    assert status.inner_text().strip() in ("200", "201")
    assert escaped == [] and page.evaluate("window.policyViolations") == []
    page.close()


# Each chart's drawing (the table Lightweight Charts lays its canvases out in) against its box, and the page's width.
CHART_WIDTHS = """() => ({
  charts: ['chart', 'reliability'].map((id) => [document.getElementById(id).clientWidth,
                                              document.querySelector(`#${id} table`).getBoundingClientRect().width]),
  page: document.documentElement.scrollWidth, window: window.innerWidth,
})"""


RECENT_IN_VIEW = """() => {
  const range = window.candlecast.visibleRange;
  return range ? Math.round(Math.min(range.to, 119) - Math.max(range.from, 0)) + 1 : 0;
}"""


def test_the_charts_follow_the_window_as_it_is_resized(browser, site):
    page = btc_daily_forecast(browser, site, 1280, 900)
    for width in (700, 375, 1000, 1280):  # 375: a phone's
        resize(page, width)
        seen = page.evaluate(CHART_WIDTHS)
        assert seen["page"] <= seen["window"] == width, seen  # nothing sticks out: no sideways scrolling
        for box, drawn in seen["charts"]:
            assert abs(box - drawn) <= 1, seen
        # Every recent candle stays in view: the visible range is kept, not the bars' spacing.
        assert page.evaluate(RECENT_IN_VIEW) == 120, width
        if width == 375:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "forecast-page-375.png"), full_page=True)
    assert expected_candles_painted(page) > 200  # still drawn after the resizes
    page.close()


def test_prices_under_a_cent_keep_their_digits(browser, site):
    """X:BTTUSDT closes near 0.0036: with the default two decimals every price label read 0.00."""
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    page.goto(f"{site}/")
    forecast(page, "X:BTTUSDT", "1d")
    state = page.evaluate("window.candlecast")
    assert state["drawn"] is True, page.text_content("#status")
    assert 0 < state["lastClose"] < 0.01
    label = state["priceLabel"]
    assert abs(float(label) / state["lastClose"] - 1) < 1e-4, label
    assert len(label.split(".")[1].lstrip("0")) >= 4, label  # 4 significant digits at least
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "forecast-page-under-a-cent.png"), full_page=True)
    page.close()


def test_a_symbols_timeframes_without_candles_are_disabled_and_a_refusal_names_those_it_has(browser, site):
    """X:ETHUSD has only 1d, 1w and 1m candles in the sample, and the local stack no Polygon key: at the default 1h
    the page showed the API's developer message (set POLYGON_API_KEY)."""
    page = browser.new_page()
    page.goto(f"{site}/")
    wait_until(page, "document.querySelectorAll('#symbols option').length > 0")
    disabled = "[...document.querySelectorAll('#timeframe option')].filter((o) => o.disabled).map((o) => o.value)"
    page.fill("#symbol", "X:ETHUSD")
    assert page.evaluate(disabled) == ["1h", "4h"]
    assert page.input_value("#timeframe") == "1d"  # the 1h chosen before has no candles
    page.fill("#symbol", "X:BTCUSDT")
    assert page.evaluate(disabled) == []

    # A request for a timeframe the symbol has no candles at (sent as a script could): the refusal says which
    # timeframes it has, for a symbol typed in another form too.
    page.fill("#symbol", "eth-usd")
    assert page.evaluate(disabled) == ["1h", "4h"]
    page.evaluate("""() => {
        const option = document.querySelector('#timeframe option[value="4h"]');
        option.disabled = false;
        document.querySelector('#timeframe').value = '4h';
        document.querySelector('#controls').requestSubmit();
    }""")
    wait_until(page, "document.querySelector('#status').className === 'error'", timeout=30_000)
    status = page.text_content("#status")
    assert status.startswith("X:ETHUSD has no 4h candles here; it can be forecast at 1d, 1w, 1m"), status
    assert "candles_unavailable" in status
    page.close()


# While window.shortTimeouts is set, a request's time limit is a hundredth of what the page asks for (30 s: 0.3 s).
SHORT_TIMEOUTS = """const timeoutNow = AbortSignal.timeout;
AbortSignal.timeout = (milliseconds) =>
  timeoutNow.call(AbortSignal, milliseconds / (window.shortTimeouts ? 100 : 1));"""


def test_a_hung_or_unreachable_request_is_named_and_the_page_can_forecast_again(browser, site):
    page = browser.new_page()
    page.add_init_script(SHORT_TIMEOUTS)
    page.goto(f"{site}/")
    forecast(page, "X:BTCUSDT", "1d")  # the model read, which is shared, and the symbols are in
    assert page.evaluate("window.candlecast.drawn") is True, page.text_content("#status")
    held = []
    page.route("**/predictions", lambda route: held.append(route))  # never answered
    page.evaluate("window.shortTimeouts = true")
    forecast(page, "X:BTCUSDT", "1d")
    status = page.text_content("#status")
    assert status == ("POST /predictions got no answer in 30 s: the API is slow or down. It may still have been "
                      "stored. Try again."), status
    assert "error" in page.get_attribute("#status", "class") and held
    assert not page.is_disabled("#forecast") and page.get_attribute("#forecast", "aria-busy") == "false"
    page.unroute("**/predictions")
    page.evaluate("window.shortTimeouts = false")
    # No answer at all (offline, a refused connection): fetch's bare "Failed to fetch" said nothing of what failed.
    page.route("**/predictions", lambda route: route.abort("internetdisconnected"))
    forecast(page, "X:BTCUSDT", "1d")
    assert page.text_content("#status") == "could not reach the API (POST /predictions)"
    assert not page.is_disabled("#forecast")
    page.unroute("**/predictions")
    page.press("#symbol", "Enter")
    wait_until(page, "window.candlecast.drawn === true", timeout=30_000)
    page.close()


def test_a_refused_symbol_list_says_so_and_is_asked_for_again(browser, site):
    """The first GET /symbols/top is turned away as API Gateway's throttle does (429, no Retry-After): the page
    shows it as an error and asks again after the default wait, and loads without a console error."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    refused: list[str] = []

    def throttle_once(route):
        if refused:
            return route.continue_()
        refused.append(route.request.url)
        return route.fulfill(status=429, content_type="application/json", body='{"message":"Too Many Requests"}')

    page.route("**/symbols/top*", throttle_once)
    page.goto(f"{site}/")
    wait_until(page, "document.querySelector('#status').textContent.startsWith('symbols:')", timeout=10_000)
    assert page.get_attribute("#status", "class") == "error"
    assert "Asking again in 5 s" in page.text_content("#status")
    wait_until(page, "document.querySelectorAll('#symbols option').length > 0", timeout=15_000)
    assert page.text_content("#status") == "" and len(refused) == 1
    assert errors == ["Failed to load resource: the server responded with a status of 429 (Too Many Requests)"]
    page.close()

# Every element with text of its own: its colour over the backgrounds under it, and the WCAG contrast ratio.
CONTRAST = r"""() => {
  const rgba = (css) => {
    const parts = css.match(/[\d.]+/g).map(Number);
    return parts.length > 3 ? parts : [...parts, 1];
  };
  const over = (top, under) => [0, 1, 2].map((i) => top[i] * top[3] + under[i] * (1 - top[3]));
  const luminance = (rgb) => {
    const [r, g, b] = rgb.map((v) => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const backdrop = (element) => {
    const layers = [];
    for (let e = element; e; e = e.parentElement) {
      const colour = rgba(getComputedStyle(e).backgroundColor);
      if (colour[3] > 0) layers.push(colour);
      if (colour[3] === 1) break;
    }
    return layers.reverse().reduce((under, top) => over(top, under), [255, 255, 255]);
  };
  const seen = [];
  for (const element of document.querySelectorAll("body *")) {
    const text = [...element.childNodes].filter((node) => node.nodeType === Node.TEXT_NODE)
      .map((node) => node.textContent).join("").trim();
    if (!text || element.tagName === "SCRIPT" || !element.getClientRects().length) continue;
    const style = getComputedStyle(element);
    const background = backdrop(element);
    const [light, dark] = [luminance(over(rgba(style.color), background)), luminance(background)]
      .sort((a, b) => b - a);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (Number(style.fontWeight) >= 700 && size >= 18.66);
    seen.push({ text: text.slice(0, 40), color: style.color, ratio: (light + 0.05) / (dark + 0.05),
                needs: large ? 3 : 4.5 });
  }
  return seen;
}"""


def too_faint(page) -> list[dict]:
    return [text for text in page.evaluate(CONTRAST) if text["ratio"] < text["needs"]]


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_text_on_the_page_has_aa_contrast(browser, site, scheme):
    """Muted text, the timeframes without candles and a held button's countdown: 4.5:1 at least (3:1 if large)."""
    page = browser.new_page(viewport={"width": 1200, "height": 1100}, color_scheme=scheme)
    page.goto(f"{site}/")
    wait_until(page, "document.querySelectorAll('#symbols option').length > 0")
    forecast(page, "X:ETHUSD", "1d")  # X:ETHUSD has no 1h or 4h candles: those options are disabled
    assert page.evaluate("window.candlecast.drawn") is True, page.text_content("#status")
    # As a list box Chromium draws the options with their own colours (a closed select's computed ones are not those
    # its menu shows).
    page.evaluate("document.querySelector('#timeframe').size = 5")
    assert too_faint(page) == []
    page.evaluate("document.querySelector('#timeframe').size = 0")
    page.route("**/models/4h", lambda route: route.fulfill(
        status=429, content_type="application/json", headers={"Retry-After": "30"}, body='{"message":"x"}'))
    forecast(page, "X:BTCUSDT", "4h")  # an error, and the button held with its countdown
    assert page.is_disabled("#forecast") and "(" in page.text_content("#forecast")
    assert too_faint(page) == []
    page.close()


# Ink (dark pixels) in the outer two columns of the reliability chart's horizontal axis, under its top border: a label
# cut at an edge leaves some there.
AXIS_EDGE_INK = """() => {
  const rows = document.querySelectorAll('#reliability table tr');
  const axis = [...rows[rows.length - 1].querySelectorAll('canvas')]
    .reduce((wide, canvas) => (canvas.width > wide.width ? canvas : wide));
  const { width, height } = axis;
  const data = axis.getContext('2d').getImageData(0, 0, width, height).data;
  let ink = 0;
  for (const x of [0, 1, width - 2, width - 1]) {
    for (let y = 3; y < height; y++) {
      const i = (y * width + x) * 4;
      if (data[i + 3] > 100 && data[i] < 160) ink++;
    }
  }
  return ink;
}"""


def test_the_reliability_axis_labels_are_not_cut_at_its_ends(browser, site):
    page = btc_daily_forecast(browser, site, 1200, 1100)
    assert page.evaluate(AXIS_EDGE_INK) == 0
    for width in (375, 1000):
        resize(page, width)
        assert page.evaluate(AXIS_EDGE_INK) == 0, width
    page.close()


FOCUSED = "document.activeElement.id || document.activeElement.tagName"


def test_the_keyboard_focus_stays_with_the_forecast_button_through_a_request(browser, site):
    """A button that disables itself drops the focus to <body>, where the next Tab starts from the top of the page:
    while it is disabled the status line (which says why) holds the focus, and gives it back once it is enabled."""
    page = slow_hourly_page(browser, site, 2000)
    page.focus("#forecast")
    page.keyboard.press("Enter")
    wait_until(page, "document.querySelector('#forecast').disabled", timeout=2_000)
    assert page.evaluate(FOCUSED) == "status"
    wait_until(page, "window.candlecast.drawn === true", timeout=30_000)
    assert page.evaluate(FOCUSED) == "forecast"

    # Held after a 429: the status line holds the focus for the wait, and the button has it back after.
    page.route("**/models/4h", lambda route: route.fulfill(
        status=429, content_type="application/json", headers={"Retry-After": "2"}, body='{"message":"x"}'))
    page.select_option("#timeframe", "4h")
    page.focus("#forecast")
    page.keyboard.press("Enter")
    wait_until(page, "document.querySelector('#status').className === 'error'", timeout=10_000)
    assert page.is_disabled("#forecast") and page.evaluate(FOCUSED) == "status"
    wait_until(page, "!document.querySelector('#forecast').disabled", timeout=5_000)
    assert page.evaluate(FOCUSED) == "forecast"

    # Focus the user moved elsewhere meanwhile stays there.
    page.unroute("**/models/4h")
    page.select_option("#timeframe", "1h")
    page.focus("#forecast")
    page.keyboard.press("Enter")
    page.focus("#symbol")
    wait_until(page, "window.candlecast.drawn === true", timeout=30_000)
    assert page.evaluate(FOCUSED) == "symbol"
    page.close()


def test_each_chart_says_what_it_shows_in_words_and_numbers(browser, site):
    """The canvases give a screen reader nothing: each chart is an image whose name states the forecast's numbers
    (from the answers the page drew) and the reliability points, and says nothing of a forecast no longer drawn."""
    page = browser.new_page()
    page.goto(f"{site}/")
    forecast(page, "X:BTCUSDT", "1h")
    assert page.evaluate("window.candlecast.drawn") is True, page.text_content("#status")
    prediction_id = page.text_content("#status").removeprefix("prediction ")
    with urlopen(f"{site}/predictions/{prediction_id}") as response:
        last = json.load(response)["steps"][-1]
    price = page.get_by_role("img", name=re.compile(r"^X:BTCUSDT 1h ")).get_attribute("aria-label")
    state = page.evaluate("window.candlecast")
    shown = {name: page.evaluate("formatPrice", last[name])
             for name in ("close", "lower_80", "upper_80", "lower_95", "upper_95")}
    assert ("120 recent candles" in price and f"last close {state['priceLabel']}" in price
            and f"30 expected candles to {last['ts']}" in price), price
    assert (f"median close of {shown['close']}" in price
            and f"80 % band from {shown['lower_80']} to {shown['upper_80']}" in price
            and f"95 % band from {shown['lower_95']} to {shown['upper_95']}" in price), price
    reliability = page.get_by_role("img", name=re.compile(r"^Reliability of candlecast-1h")).get_attribute("aria-label")
    points = state["reliability"]["live"] + state["reliability"]["backtest"]
    assert reliability.count(" stated, ") == points > 0, reliability

    forecast(page, "X:BTCUSDT", "1d")  # the names follow the charts
    assert page.get_by_role("img", name=re.compile(r"^X:BTCUSDT 1d ")).count() == 1
    forecast(page, "NOPE-USD", "1h")
    names = [page.get_attribute(chart, "aria-label") for chart in ("#chart", "#reliability")]
    assert not any("X:BTCUSDT" in name or " stated, " in name for name in names), names
    page.close()


# What each chart draws, read from the charts themselves (every series of every pane, the axis lines, the crosshair),
# and the legend's keys, each with the colour a reader sees and its WCAG contrast ratio against the background there.
GRAPHICS = r"""() => {
  const probe = document.createElement("canvas").getContext("2d");
  const rgba = (css) => {
    probe.fillStyle = "#000000";
    probe.fillStyle = css; // any CSS colour, normalised: #rrggbb, or rgba(r, g, b, a) when translucent
    const value = probe.fillStyle;
    if (value.startsWith("#")) return [1, 3, 5].map((i) => parseInt(value.slice(i, i + 2), 16)).concat(1);
    const parts = value.match(/[\d.]+/g).map(Number);
    return parts.length > 3 ? parts : [...parts, 1];
  };
  const over = (top, under) => [0, 1, 2].map((i) => top[i] * top[3] + under[i] * (1 - top[3]));
  const luminance = (rgb) => {
    const [r, g, b] = rgb.map((v) => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const ratio = (colour, background) => {
    const [light, dark] = [luminance(over(rgba(colour), background)), luminance(background)].sort((a, b) => b - a);
    return (light + 0.05) / (dark + 0.05);
  };
  const seen = [];
  for (const [id, chart] of [["chart", priceChart], ["reliability", reliabilityChart]]) {
    const options = chart.options();
    if (options.layout.background.type !== "solid") throw new Error(`${id}: not a solid background`);
    const background = over(rgba(options.layout.background.color), [255, 255, 255]);
    const add = (what, colour) => seen.push({ where: id, what, colour, ratio: colour ? ratio(colour, background) : 0 });
    chart.panes().forEach((pane, p) => pane.getSeries().forEach((series, s) => {
      const o = series.options();
      const name = `${series.seriesType()} series ${p}.${s}`;
      if (!o.visible) return;
      if (series.seriesType() === "Candlestick") {
        // A candle's shape is its outline when drawn (a pale body inside may be faint), else its body.
        const [up, down] = o.borderVisible ? [o.borderUpColor, o.borderDownColor] : [o.upColor, o.downColor];
        add(`${name} ${o.borderVisible ? "outline" : "body"} up`, up);
        add(`${name} ${o.borderVisible ? "outline" : "body"} down`, down);
        if (o.wickVisible) add(`${name} wick up`, o.wickUpColor), add(`${name} wick down`, o.wickDownColor);
      } else if (series.seriesType() === "Line") {
        if (o.lineVisible) add(`${name} line`, o.color);
        if (o.pointMarkersVisible) add(`${name} points`, o.pointMarkersColor || o.color);
      } else {
        add(`${name}: a kind this test cannot read yet`, null);
      }
      if (o.priceLineVisible && o.priceLineColor) add(`${name} price line`, o.priceLineColor);
    }));
    const time = chart.timeScale().options();
    if (time.visible && time.borderVisible) add("time axis line", time.borderColor);
    for (const side of ["left", "right"]) {
      const scale = chart.priceScale(side).options();
      if (scale.visible && scale.borderVisible) add(`${side} price axis line`, scale.borderColor);
    }
    if (options.crosshair.mode !== LightweightCharts.CrosshairMode.Hidden) {
      for (const line of ["vertLine", "horzLine"]) {
        if (options.crosshair[line].visible) add(`crosshair ${line}`, options.crosshair[line].color);
      }
    }
  }
  // The legend's keys against the page: a key drawn as a line or an outline is its border, else its fill.
  for (const key of document.querySelectorAll(".legend .key")) {
    const style = getComputedStyle(key);
    const edged = parseFloat(style.borderTopWidth) > 0 && style.borderTopStyle !== "none";
    const colour = edged ? style.borderTopColor : style.backgroundColor;
    seen.push({ where: "legend", what: key.className, colour, ratio: ratio(colour, [255, 255, 255]),
                shown: rgba(colour).slice(0, 3) });
  }
  return seen;
}"""

BANDS = """() => Object.fromEntries(Object.entries(bands).map(([name, series]) => {
  const { color, lineStyle, lineWidth } = series.options();
  return [name, { color, lineStyle, lineWidth }];
}))"""


def test_every_line_outline_and_point_on_the_charts_has_3_to_1_contrast(browser, site):
    """WCAG 2.1 SC 1.4.11: what a reader needs to read the charts (the candles, the expected candles' outlines, both
    bands, the reliability points and diagonal, the axis lines, the crosshair, the legend's keys) is 3:1 at least
    against the background under it. The 95 % band (#90a4f5) was 2.4:1, the diagonal (#bdbdbd) 1.9:1, the
    expected candles (#ffb74d) 1.7:1. The colours are the ones the page drew with, read from its charts."""
    page = btc_daily_forecast(browser, site, 1200, 1100)
    seen = page.evaluate(GRAPHICS)
    charted = [graphic for graphic in seen if graphic["where"] != "legend"]
    # Both charts were read: the price chart's two candle series and four band lines, the diagonal and the two
    # series of reliability points.
    assert sum("Candlestick" in graphic["what"] for graphic in charted) >= 8, charted
    assert sum(graphic["what"].endswith(" line") and "Line series" in graphic["what"] for graphic in charted) >= 5
    assert sum(graphic["what"].endswith(" points") for graphic in charted) == 2, charted
    faint = [graphic for graphic in seen if graphic["ratio"] < 3]
    assert faint == [], faint
    # The 80 % and 95 % bands stay apart: another dash and another colour.
    drawn = page.evaluate(BANDS)
    assert drawn["upper_80"] == drawn["lower_80"] and drawn["upper_95"] == drawn["lower_95"]
    assert drawn["upper_80"]["lineStyle"] != drawn["upper_95"]["lineStyle"], drawn
    assert drawn["upper_80"]["color"].lower() != drawn["upper_95"]["color"].lower(), drawn
    # Each legend key is a colour the charts draw with, so the legend describes what is on them.
    chart_colours = {tuple(int(graphic["colour"][i:i + 2], 16) for i in (1, 3, 5))
                     for graphic in charted if graphic["colour"].startswith("#") and len(graphic["colour"]) == 7}
    keys = [graphic for graphic in seen if graphic["where"] == "legend"]
    assert len(keys) == 7 and all(tuple(key["shown"]) in chart_colours for key in keys), (keys, chart_colours)
    page.close()


# Where the keyboard's focus is: None on <body> (before the first stop, or past the last).
FOCUS_STOP = """() => {
  const element = document.activeElement;
  if (!element || element === document.body || element === document.documentElement) return null;
  return { tag: element.tagName, id: element.id, href: element.getAttribute("href"),
           text: element.textContent.trim().slice(0, 60), title: element.getAttribute("title"),
           inImage: Boolean(element.parentElement && element.parentElement.closest('[role="img"]')) };
}"""


def test_the_keyboard_never_lands_inside_a_chart_and_the_charts_are_credited_beside_them(browser, site):
    """A chart is an image (role="img"), whose children a screen reader does not see: the TradingView logo link the
    library draws in each chart took the keyboard's focus there, and was announced as nothing. The credit its licence
    asks for (the NOTICE's attribution and a link to https://www.tradingview.com/) is a link outside the charts."""
    page = btc_daily_forecast(browser, site, 1200, 1100)
    page.mouse.click(2, 2)  # the page's top corner, outside everything: the next Tab starts from the top
    stops: list[dict] = []
    for _ in range(40):  # every stop of one pass through the page, from the top
        page.keyboard.press("Tab")
        stop = page.evaluate(FOCUS_STOP)
        if stop is None or stop in stops[:1]:
            break
        stops.append(stop)
    assert [stop["id"] for stop in stops[:3]] == ["", "symbol", "timeframe"], stops  # "API docs", then the form
    assert [stop for stop in stops if stop["inImage"]] == [], stops
    assert page.locator('[role="img"] a, [role="img"] [tabindex]').count() == 0

    credit = page.locator("#chart-credit")
    assert credit.is_visible() and credit.get_attribute("href") == "https://www.tradingview.com/"
    assert "TradingView Lightweight Charts" in credit.inner_text()
    assert credit.evaluate("(link) => link.closest('[role=\"img\"]')") is None
    assert any(stop["id"] == "chart-credit" for stop in stops), stops
    notice = (ROOT / "infra" / "web" / "vendor" / "lightweight-charts" / "NOTICE").read_text()
    credited = " ".join(page.locator("footer").inner_text().split())
    assert all(" ".join(line.split()) in credited for line in notice.splitlines() if line.strip()), credited
    page.close()
