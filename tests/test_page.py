"""The forecast page at `/` and the Swagger UI at `/docs`, in a real browser.

Debian's chromium (`make browser` installs it when missing), driven headless by playwright; no browser is
downloaded. The page runs against the local stack: real PostgreSQL, Redis and moto's S3, the sample seeded
with its track record. A screenshot of the drawn page is kept in .local/test-artifacts/.
"""

import json
import os
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
def site(clean_db):
    """The seeded local stack (with the sample's track record) behind the local API."""
    from candlecast import seed
    from candlecast.services import forecasting

    forecasting.forget_models()
    seed.seed(progress=False, track_record=True)
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
    page.goto(f"{site}/")
    page.wait_for_function("document.querySelectorAll('#symbols option').length > 0")
    with psycopg.connect(clean_db.database_url) as conn:
        before = conn.execute("SELECT count(*) FROM predictions").fetchone()[0]

    page.fill("#symbol", "X:BTCUSDT")
    page.select_option("#timeframe", "1h")
    page.click("#forecast")
    page.wait_for_function("window.candlecast.drawn === true", timeout=30_000)
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

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "forecast-page.png"), full_page=True)
    # The chart drew: the expected candles, both bands and the recent candles are on the canvas.
    assert painted(page, "#chart", (0xFF, 0xB7, 0x4D)) > 200  # expected candles
    assert painted(page, "#chart", (0x29, 0x62, 0xFF)) > 20  # 80 % band (1 px lines)
    assert painted(page, "#chart", (0x90, 0xA4, 0xF5)) > 20  # 95 % band (dashed)
    assert painted(page, "#chart", (0x26, 0xA6, 0x9A)) + painted(page, "#chart", (0xEF, 0x53, 0x50)) > 200
    assert painted(page, "#reliability", (0xE6, 0x51, 0x00)) > 20  # live (or replay) reliability dots
    assert painted(page, "#reliability", (0x45, 0x5A, 0x64)) > 20  # backtest reliability dots
    # Live figures when the seed found origins after the model's training window, else the labelled replay.
    with urlopen(f"{site}/models/1h") as response:
        live = json.load(response)["live"]["n_scored"] > 0
    assert page.text_content("#live-head") == ("live" if live else "replay (in-sample)")

    assert errors == [] and escaped == []
    page.close()


def test_the_page_says_why_a_forecast_failed(browser, site):
    page = browser.new_page()
    page.goto(f"{site}/")
    page.fill("#symbol", "NOPE-USD")
    page.click("#forecast")
    page.wait_for_function("document.querySelector('#status').classList.contains('error')")
    assert "symbol_not_found" in page.text_content("#status")
    assert page.evaluate("window.candlecast.drawn") is False
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
    page.goto(f"{site}/docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    document = json.loads((ROOT / "infra" / "openapi.json").read_text())
    operations = sum(len(item) for item in document["paths"].values())
    assert page.locator(".opblock").count() == operations
    assert page.locator(".opblock-summary-path", has_text="/models/{timeframe}").count() == 1
    assert escaped == []
    page.close()
