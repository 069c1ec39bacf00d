"""A local fake of the Polygon.io (Massive) REST API: stdlib http.server on 127.0.0.1, in a thread.

Responses keep the envelopes of the real ones in tests/fixtures/polygon/ (field names, status,
request_id, next_url pointing at the real host) around deterministic generated bars, and the real
files can be served verbatim with `serve_file`. Faults (HTTP status, malformed body, dropped
connection) are injected per path, and `hold` keeps requests waiting until `release`, so a client can be
caught halfway without racing it. Used by tests/test_ingest.py and the ingest benchmark.
"""

import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "polygon"
REAL_HOST = "https://api.polygon.io"
HOUR, DAY = 3600, 86400
# Polygon's 403 for a good key whose plan does not cover the request (its 401 is for an unknown key).
NOT_ENTITLED_BODY = (b'{"status":"NOT_AUTHORIZED","request_id":"fake","message":"You are not entitled to this data. '
                     b'Please upgrade your plan at https://polygon.io/pricing"}')


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@dataclass
class FakeSymbol:
    ticker: str  # X:BTCUSD
    base: str
    quote: str
    name: str
    price: float = 100.0
    listed_at: int = 0  # epoch seconds of the first bar
    daily_volume: float = 1000.0  # base units per day, for grouped daily


@dataclass
class Fault:
    match: str  # substring of the request path (with query)
    kind: str  # "status", "malformed", "drop", "trickle" (body, a byte at a time) or "gzip" (body, gzip-encoded)
    status: int = 500
    times: int = 1
    body: bytes = b'{"status":"ERROR","request_id":"fake","error":"injected"}'
    headers: dict[str, str] = field(default_factory=dict)  # sent with a "status" fault's answer (Retry-After, say)


@dataclass
class FakeMarket:
    """Deterministic bars: each symbol's price wanders smoothly with time, so any range is reproducible."""

    symbols: list[FakeSymbol] = field(default_factory=list)
    now: int = 1_700_000_000  # the market clock: bars open strictly before this
    bars_per_page: int = 5000
    tickers_per_page: int = 1000
    # Daily bars stamped this long after UTC midnight: 4 or 5 hours, US/Eastern midnight, as Polygon's older bars.
    daily_stamp_offset: int = 0

    def by_ticker(self) -> dict[str, FakeSymbol]:
        return {symbol.ticker: symbol for symbol in self.symbols}

    def bar(self, symbol: FakeSymbol, start: int, step: int) -> dict:
        seed = int(hashlib.sha256(symbol.ticker.encode()).hexdigest()[:6], 16) % 1000
        mid = symbol.price * (1 + 0.2 * math.sin(start / (86400 * 9.0) + seed))
        wiggle = symbol.price * 0.01 * (1 + math.cos(start / 7200.0 + seed))
        open_, close = mid - wiggle / 2, mid + wiggle / 2
        volume = symbol.daily_volume * step / DAY
        return {"v": volume, "vw": round(mid, 6), "o": round(open_, 6), "c": round(close, 6),
                "h": round(close + wiggle, 6), "l": round(open_ - wiggle, 6), "t": start * 1000, "n": 7}

    def bars(self, ticker: str, step: int, start: int, end: int) -> list[dict]:
        """Bars opening in [start, end] (seconds), up to `now` (the current bar is still forming)."""
        symbol = self.by_ticker().get(ticker)
        if symbol is None:
            return []
        first = max(start, symbol.listed_at)
        offset = self.daily_stamp_offset if step == DAY else 0
        first += (offset - first) % step
        last = min(end, self.now)
        return [self.bar(symbol, t, step) for t in range(first, last + 1, step)]


def _millis_or_date(value: str) -> int:
    if value.isdigit():
        return int(value) // 1000
    return int(datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())


class FakePolygon:
    def __init__(self, market: FakeMarket | None = None, api_key: str = "test-key"):
        self.market = market or FakeMarket()
        self.api_key = api_key
        self.faults: list[Fault] = []
        self.files: dict[str, tuple[int, bytes]] = {}  # exact path?query -> (status, body)
        self.requests: list[str] = []
        self.bad_auth: list[str] = []
        self.delay = 0.0  # seconds before each answer, to slow a run down
        self.trickle_interval = 0.2  # seconds between the bytes of a "trickle" fault's body
        # Aggregates whose path contains one of these answer a next_url back to the page just sent, as Polygon
        # has done (polygon-io/issues#289): a client that follows it blindly never stops.
        self.looping: list[str] = []
        self._hold: tuple[str, int] | None = None  # (path fragment, requests let through before holding)
        self._released = threading.Event()
        # Echo what each request sent (headers, the key among them) in every answer, as a hostile or
        # careless upstream might: nothing of it may reach our clients or logs.
        self.echo = False
        # Aggregates' first pages answer a next_url with this path: the upstream's own text (it may echo the key).
        self.next_path: str | None = None
        # Aggregates whose path contains one of these answer a next_url to a new cursor every time, past the last
        # bar with empty pages: pages that never end, though none repeats.
        self.endless: list[str] = []
        # Aggregates whose path contains a key here stamp their bars' `t` in that unit ("s", "us" or "ns") instead
        # of milliseconds, as a hostile or broken upstream might.
        self.time_units: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "FakePolygon":
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-polygon", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def add_fault(self, match: str, kind: str = "status", status: int = 500, times: int = 1, **kwargs) -> Fault:
        fault = Fault(match, kind, status, times, **kwargs)
        with self._lock:
            self.faults.append(fault)
        return fault

    def not_entitled(self, match: str, times: int = 1000) -> Fault:
        """Requests whose path contains `match` get the 403 Polygon answers when the key is good but its plan
        does not cover the data (a ticker, a timeframe or a range the plan excludes)."""
        return self.add_fault(match, status=403, times=times, body=NOT_ENTITLED_BODY)

    def serve_file(self, path_and_query: str, fixture: str, status: int = 200) -> None:
        """Answer exactly this path (and query, if given) with a real response file, byte for byte."""
        self.files[path_and_query] = (status, (FIXTURES / fixture).read_bytes())

    def hold(self, match: str, after: int) -> None:
        """Requests whose path contains `match`, after the first `after` of them, get no answer until
        `release` (or the server's end)."""
        self._released.clear()
        self._hold = (match, after)

    def release(self) -> None:
        self._hold = None
        self._released.set()

    def held(self) -> int:
        """How many requests are waiting for `release` now (or were, once released)."""
        if self._hold is None:
            return 0
        match, after = self._hold
        return max(0, self.count(match) - after)

    def _is_held(self, target: str) -> bool:
        """Whether the request just recorded (the lock held) waits for `release`."""
        hold = self._hold
        return hold is not None and hold[0] in target and sum(hold[0] in r for r in self.requests) > hold[1]

    def count(self, fragment: str) -> int:
        return sum(fragment in request for request in self.requests)

    def _take_fault(self, target: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.match in target:
                    fault.times -= 1
                    return fault
        return None

    # --- routes ---------------------------------------------------------------------------------

    @staticmethod
    def echoed(body: bytes, target: str, headers: dict[str, str]) -> bytes:
        """The answer with what was sent folded in: in `error`/`message` text and as an `echo` field."""
        sent = f"you sent {target} with Authorization: {headers.get('Authorization')}"
        try:
            document = json.loads(body)
        except ValueError:
            return body + sent.encode()
        if isinstance(document, dict):
            document["echo"] = {"path": target, "headers": headers}
            document["request_id"] = sent
            if document.get("status") != "OK":
                document["error"] = f"{document.get('error') or document.get('message') or 'refused'}: {sent}"
                document["message"] = document["error"]
        return json.dumps(document).encode()

    def route(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict]:
        parts = path.strip("/").split("/")
        if path == "/v3/reference/tickers":
            return 200, self._tickers(query)
        if parts[:6] == ["v2", "aggs", "grouped", "locale", "global", "market"] and len(parts) == 8:
            return 200, self._grouped(parts[7])
        if parts[:3] == ["v2", "aggs", "ticker"] and len(parts) == 9 and parts[4] == "range":
            return 200, self._aggregates(path, parts[3], int(parts[5]), parts[6], parts[7], parts[8], query)
        return 404, {"status": "NOT_FOUND", "request_id": "fake", "message": "Route not found"}

    def _tickers(self, query: dict[str, list[str]]) -> dict:
        envelope = load_fixture("reference_tickers_page1.json")
        offset = int(query.get("cursor", ["0"])[0])
        size = min(int(query.get("limit", ["100"])[0]), self.market.tickers_per_page)
        rows = [
            {"ticker": s.ticker, "name": s.name, "market": "crypto", "locale": "global", "active": True,
             "currency_symbol": s.quote, "currency_name": s.quote, "base_currency_symbol": s.base,
             "base_currency_name": s.base, "last_updated_utc": "2026-11-01T00:00:00Z"}
            for s in sorted(self.market.symbols, key=lambda s: s.ticker)
        ]
        page = rows[offset : offset + size]
        envelope.update(results=page, count=len(page))
        envelope.pop("next_url", None)
        if offset + size < len(rows):
            envelope["next_url"] = f"{REAL_HOST}/v3/reference/tickers?cursor={offset + size}"
        return envelope

    def _grouped(self, day: str) -> dict:
        envelope = load_fixture("grouped_crypto_2020-10-14.json")
        start = _millis_or_date(day)
        results = []
        for symbol in self.market.symbols:
            if symbol.listed_at <= start and start + DAY <= self.market.now:
                bar = self.market.bar(symbol, start, DAY)
                results.append({"T": symbol.ticker, **{k: bar[k] for k in ("v", "vw", "o", "c", "h", "l")},
                                "t": (start + DAY) * 1000 - 1})
        envelope.update(results=results, queryCount=len(results), resultsCount=len(results))
        return envelope

    def _aggregates(self, path, ticker, multiplier, timespan, start, end, query) -> dict:
        step = {"hour": HOUR, "day": DAY}[timespan] * multiplier
        bars = self.market.bars(ticker, step, _millis_or_date(start), _millis_or_date(end))
        offset = int(query.get("cursor", ["0"])[0])
        size = self.market.bars_per_page
        envelope = load_fixture("aggs_X-BTCUSD_range_1_day.json")
        page = bars[offset : offset + size]
        for match, unit in self.time_units.items():
            if match in path:
                scale = {"s": 0.001, "us": 1000, "ns": 1_000_000}[unit]
                page = [bar | {"t": int(bar["t"] * scale)} for bar in page]
        envelope.update(ticker=ticker, results=page, queryCount=len(page), resultsCount=len(page))
        if not page:
            envelope.pop("results")
        if offset + size < len(bars):
            envelope["next_url"] = f"{REAL_HOST}{path}?cursor={offset + size}"
        if self.next_path and offset == 0:
            envelope["next_url"] = f"{REAL_HOST}{self.next_path}"
        if any(match in path for match in self.endless):
            envelope["next_url"] = f"{REAL_HOST}{path}?cursor={offset + size}"
        if any(match in path for match in self.looping):
            envelope["next_url"] = f"{REAL_HOST}{path}?cursor={offset}"
        return envelope

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                if fake.echo:
                    body = fake.echoed(body, self.path, dict(self.headers))
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _send_raw(self, fault: Fault) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(fault.body)))
                if fault.kind == "gzip":
                    self.send_header("Content-Encoding", "gzip")
                self.end_headers()
                try:
                    if fault.kind == "gzip":
                        self.wfile.write(fault.body)
                    else:
                        for index in range(len(fault.body)):
                            self.wfile.write(fault.body[index : index + 1])
                            self.wfile.flush()
                            time.sleep(fake.trickle_interval)
                except OSError:  # the client gave up
                    self.close_connection = True

            def do_GET(self) -> None:
                target = self.path
                with fake._lock:
                    fake.requests.append(target)
                    held = fake._is_held(target)
                if held:
                    fake._released.wait()
                if fake.delay:
                    time.sleep(fake.delay)
                if self.headers.get("Authorization") != f"Bearer {fake.api_key}" or "apiKey" in target:
                    with fake._lock:
                        fake.bad_auth.append(target)
                    body = {"status": "ERROR", "request_id": "fake", "error": "Unknown API Key"}
                    return self._send(401, json.dumps(body).encode())
                fault = fake._take_fault(target)
                if fault is not None:
                    if fault.kind == "drop":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return None
                    if fault.kind in ("trickle", "gzip"):
                        return self._send_raw(fault)
                    if fault.kind == "malformed":
                        return self._send(200, b'{"status":"OK","results":[{"v":1,"o":')
                    return self._send(fault.status, fault.body, fault.headers)
                if target in fake.files:
                    return self._send(*fake.files[target])
                parts = urlsplit(target)
                if parts.path in fake.files:
                    return self._send(*fake.files[parts.path])
                status, payload = fake.route(parts.path, parse_qs(parts.query))
                return self._send(status, json.dumps(payload).encode())

        return Handler


def make_market(count: int, *, now: int, history_days: int = 60, seed_volume: float = 1000.0) -> FakeMarket:
    """`count` USD pairs, listed `history_days` ago; later pairs tend to trade less."""
    symbols = [
        FakeSymbol(ticker=f"X:C{index:03d}USD", base=f"C{index:03d}", quote="USD", name=f"Coin {index:03d} - USD",
                   price=10.0 + index, listed_at=now - history_days * DAY - (now % DAY),
                   daily_volume=seed_volume * (count - index) / (10.0 + index))
        for index in range(count)
    ]
    return FakeMarket(symbols=symbols, now=now)
