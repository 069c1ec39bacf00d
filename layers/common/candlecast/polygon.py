"""A small Polygon.io (Massive) REST client: bearer auth, next_url pagination, retries within a time budget.

One time budget covers a whole list, every page and retry of it: a next_url that points back at a page
already read (Polygon has sent one: polygon-io/issues#289), or more than MAX_PAGES pages, is a bad response.

Why not the official `massive` package: it decodes a malformed body as an empty result (a silent data
gap), retries without a total time budget, and reports 401/403 as a generic BadResponse. This client
needs only urllib3 and raises a distinct error for each of those cases.

The API key travels only in the Authorization header (never in a URL), and next_url is always
re-based onto the configured host, so the key is never sent elsewhere. Messages and log records name a request
by our own description of it ("aggregates X:BTCUSD 1h page 3"), never by its path: a next_url's path is the
upstream's text, and can echo what it was sent (an apiKey query parameter, say).
"""

import math
import random
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlencode, urlsplit

from aws_lambda_powertools import Logger

from candlecast import strictjson
from candlecast.errors import CandlecastError, NotFound, ServiceUnavailable

logger = Logger(child=True)

DEFAULT_BASE_URL = "https://api.polygon.io"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Far more pages than any list we ask for has: two years of hourly bars are about 20, the crypto tickers a few.
MAX_PAGES = 1000
# An aggregates page holds up to `limit` base (minute) aggregates: two years of hours are 21 pages of 50,000 minutes.
# A list may take twice the pages its range holds, plus PAGE_MARGIN (short pages around gaps), and no more: a
# next_url that yields a new cursor each time never ends otherwise (audit J: 57 pages and counting at 1 request/s).
AGGREGATES_LIMIT = 50000
PAGE_MARGIN = 40
# A list's bars are at most one a step over its range, and ROW_MARGIN more (a day's bar stamped at 04:00Z beside one
# at midnight).
SPAN_MS = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000, "week": 7 * 86_400_000}
ROW_MARGIN = 10
# A bar is 100 to 115 bytes of compact JSON, as Polygon sends it, and 235 to 245 pretty-printed, as the client
# libraries recorded it (tests/fixtures/polygon): a page of AGGREGATES_LIMIT bars, the most one may carry, is 5.5 MB
# or 11.7 MB. A page's decoded body is read as it arrives, up to MAX_BODY_BYTES: a bad response past it, never held
# in memory (a 0.3 MB gzip body can decode to 300 MB).
MAX_BAR_BYTES = 320
MAX_BODY_BYTES = AGGREGATES_LIMIT * MAX_BAR_BYTES
# Each key and value decoding makes follows a `{`, `[`, `,` or `:` of the body (a bar: 17, its object and 8 fields),
# so counting those bounds a page's decoded size before it is decoded: past a full page's, with room for a ninth
# field, it is a bad response (a body under the cap was decoded whole before its bars were counted: 290,000 bars in
# 32 MB peaked at 223 MB, 32 MB of `{}` at 874 MB; a full page peaks at 38 MB, what is refused now at most 71 MB).
MAX_VALUES_PER_BAR = 20
MAX_VALUES = AGGREGATES_LIMIT * MAX_VALUES_PER_BAR
_VALUE_MARKS = (b"{", b"[", b",", b":")
READ_CHUNK = 64 << 10
MAX_RETRY_AFTER = 7 * 86400  # seconds: a longer Retry-After holds the client this long


class PolygonError(ServiceUnavailable):
    code = "polygon_unavailable"


class PolygonAuthError(PolygonError):
    """401/403: the key is missing, wrong, or its plan does not cover the request."""

    code = "polygon_auth"


class PolygonNotEntitled(PolygonAuthError):
    """403 on one request: the plan does not cover that ticker, timeframe or range, or the key is refused
    everywhere; PolygonClient.confirm_key tells which."""

    code = "polygon_not_entitled"


class PolygonBadResponse(PolygonError):
    """A body that is not the JSON object the endpoint documents."""

    code = "polygon_bad_response"


class PolygonNotFound(NotFound):
    """404 from Polygon: the ticker or route does not exist there."""

    code = "polygon_not_found"


class PolygonRejected(PolygonError):
    """Another 4xx than 401, 403, 404 and 429 (a 400, say): Polygon refuses this request as it is; sending it
    again, in this chunk or the next, gets the same answer."""


class PolygonDeadline(PolygonError):
    """The run's deadline came before this request's turn: it was not sent (the caller hands the work on)."""


class PolygonRateLimited(PolygonDeadline):
    """Polygon's 429 asked the key to wait (Retry-After) past the run's deadline, or past what is left of the list's
    time budget where there is no deadline: not sent (again); the caller hands the work on."""


# About what a worker spends on one request besides waiting its turn: Polygon's answer, the parse, its writes.
WORKER_SECONDS_PER_REQUEST = 2.0


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After of delay seconds, or None. HTTP dates are not read; headers come decoded as Latin-1, where
    '²' passes str.isdigit() and fails float()."""
    return float(value) if value and value.isascii() and value.isdigit() else None


class RateLimiter:
    """Spaces requests at least 1/rate seconds apart, across threads, and none before the time a 429's Retry-After
    named (`hold`): Polygon limits the key, not the request."""

    def __init__(self, per_second: float | None):
        self.interval = 1.0 / per_second if per_second else 0.0
        self._next = 0.0
        self.not_before = 0.0  # time.monotonic() before which no request is sent (a 429's Retry-After)
        self.held_for = 0.0  # the longest Retry-After seen, in seconds
        self._lock = threading.Lock()

    def hold(self, seconds: float) -> None:
        """Polygon's 429 said to wait `seconds`: no request from this client before then."""
        with self._lock:
            self.not_before = max(self.not_before, time.monotonic() + seconds)
            self.held_for = max(self.held_for, seconds)

    def held(self) -> float:
        """Seconds until the key may be used again (0 when it may now)."""
        return max(0.0, self.not_before - time.monotonic())

    def wait(self, latest: float | None = None) -> float | None:
        """Wait for this request's turn; the seconds waited. None, without taking a turn, when the turn would
        come after `latest` (time.monotonic())."""
        if not self.interval and not self.not_before:
            return 0.0
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next, self.not_before)
            if latest is not None and start > latest:
                return None
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)
        return start - now

    def workers(self, wanted: int) -> int:
        """How many workers the rate keeps busy, at most `wanted`: more only queue here, each holding a symbol
        whose pages then take that many times longer (at the free tier's 0.083/s, one)."""
        if not self.interval:
            return wanted
        return max(1, min(wanted, math.ceil(WORKER_SECONDS_PER_REQUEST / self.interval)))


class _Budget:
    """A time budget whose clock stops while a request waits its turn at the rate limiter: at Polygon's free
    tier (a request every 12 s) the turns of a two-year hourly backfill (21 pages) alone are four minutes."""

    def __init__(self, seconds: float):
        self.ends = time.monotonic() + seconds

    def left(self) -> float:
        return self.ends - time.monotonic()

    def pause(self, seconds: float) -> None:
        self.ends += seconds


class PolygonClient:
    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float = 20.0,
        time_budget: float = 90.0,
        request_timeout: float = 30.0,
        max_attempts: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_rps: float | None = None,
        pool_size: int = 16,
        budget_counts_turns: bool = False,
    ):
        api_key = api_key.strip()  # a pasted or `echo`ed key ends in a newline
        if not api_key:
            raise PolygonAuthError("no Polygon API key is configured (set POLYGON_API_KEY)")
        if not all(" " <= char <= "~" for char in api_key):
            # Never the key itself: http.client's own error for it quotes the whole header.
            raise PolygonAuthError("the Polygon API key contains a control or non-ASCII character; set "
                                   "POLYGON_API_KEY (or its secret) to the key alone")
        import urllib3  # ~50 ms: only code that really talks to Polygon pays for it
        parts = urlsplit(base_url.rstrip("/"))
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.time_budget = time_budget
        self.request_timeout = request_timeout  # wall-clock seconds one request may take, its body included
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.max_attempts = max_attempts
        # A request inside an API call has its time budget and no more: its turns at the rate limiter (a 429's
        # Retry-After) count too. A batch run's budgets stop while it waits its turn (_Budget).
        self.budget_counts_turns = budget_counts_turns
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.limiter = RateLimiter(max_rps)
        self.requests_made = 0
        self.key_accepted = False  # a request has succeeded with the key
        self._key_refused = ""  # confirm_key's finding (its message): every request would fail
        self._confirm_lock = threading.Lock()
        self._http = urllib3.PoolManager(
            maxsize=pool_size,
            block=True,
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json",
                     "Accept-Encoding": "gzip", "User-Agent": "candlecast-ingest"},
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=False,
        )

    def __repr__(self) -> str:  # never shows the key
        return f"PolygonClient({self.origin})"

    def close(self) -> None:
        self._http.clear()

    def _url(self, path_or_url: str, params: dict | None) -> str:
        parts = urlsplit(path_or_url)
        # next_url carries Polygon's own host: keep only path and query so the key goes to our origin only.
        url = self.origin + parts.path + (f"?{parts.query}" if parts.query else "")
        if params:
            url += ("&" if parts.query else "?") + urlencode(params)
        return url

    def get_json(self, path_or_url: str, params: dict | None = None, *, what: str,
                 budget: _Budget | None = None, stop: float | None = None) -> dict:
        """GET one JSON object, retrying 429/5xx/connection errors with exponential backoff and jitter
        (honouring Retry-After) until max_attempts or the time budget (the list's `budget`, else time_budget;
        turns waited at the rate limiter not counted unless budget_counts_turns) runs out. No attempt starts
        after `stop` (time.monotonic(), the run's deadline): PolygonDeadline.
        Each attempt, from its connect to its body's last byte, takes at most request_timeout seconds and what
        is left of the budget (a body trickled in is cut there), and its decoded body at most MAX_BODY_BYTES.
        `what` names the request in errors and logs (never its path, which may be the upstream's text)."""
        import urllib3
        from urllib3.exceptions import HTTPError

        url = self._url(path_or_url, params)
        started = time.monotonic()
        budget = budget or _Budget(self.time_budget)
        problem = ""
        for attempt in range(1, self.max_attempts + 1):
            if self._key_refused:
                raise PolygonAuthError(self._key_refused)
            if stop is not None and time.monotonic() >= stop:
                raise PolygonDeadline(f"the run's time was up before {what}")
            held = self.limiter.held()
            if held and (held > budget.left() if stop is None else time.monotonic() + held > stop):
                raise PolygonRateLimited(self.rate_limit_message() + f": {what} not sent")
            latest = stop
            if self.budget_counts_turns:  # a turn past the budget is not waited for (at 0.083/s, 12 s)
                latest = min(stop if stop is not None else math.inf, time.monotonic() + budget.left())
            waited = self.limiter.wait(latest=latest)
            if waited is None:
                raise PolygonDeadline(f"the time was up before {what}'s turn at the rate limiter")
            if not self.budget_counts_turns:
                budget.pause(waited)
            limit = min(self.request_timeout, budget.left())
            attempt_ends = time.monotonic() + limit  # the headers' wait included, not only the body's
            if limit <= 0:
                problem = problem or "no time left"
                break
            self.requests_made += 1
            try:
                response = self._http.request(
                    "GET", url, preload_content=False,
                    timeout=urllib3.Timeout(total=limit, connect=min(self.connect_timeout, limit),
                                            read=min(self.read_timeout, limit)))
                status = response.status
                data = _read_body(response, attempt_ends, what) if status == 200 else _discard(response)
            except _TooSlow:
                status, problem, retry_after = None, f"answer took more than {limit:.3g}s", None
            except HTTPError as error:
                status, problem, retry_after = None, f"connection error: {type(error).__name__}", None
            else:
                if status == 200:
                    self.key_accepted = True
                    return _decode(data, what)
                # Polygon's own text is never passed on: it can echo what it was sent, the key included.
                if status == 403:
                    raise PolygonNotEntitled(
                        f"Polygon answered HTTP 403 for {what}: the plan does not cover this request "
                        "(or the key is refused)"
                    )
                if status == 401:
                    raise PolygonAuthError(
                        f"Polygon refused the API key with HTTP {status} for {what} "
                        "(check POLYGON_API_KEY and the plan's entitlements)"
                    )
                if status == 404:
                    raise PolygonNotFound(f"Polygon has nothing for {what}")
                if 400 <= status < 500 and status not in RETRY_STATUSES:
                    raise PolygonRejected(f"Polygon answered HTTP {status} for {what}")
                if status not in RETRY_STATUSES:
                    raise PolygonError(f"Polygon answered HTTP {status} for {what}")
                problem, retry_after = f"HTTP {status}", retry_after_seconds(response.headers.get("Retry-After"))
            delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            if status == 429 and retry_after is not None:
                # The key's limit: every worker waits, not only this request (audit J: 208 requests in 5 s into a
                # 24 h limit, each "kept failing after 1 attempts"). A week at most: the next weekly run starts then.
                seconds = min(retry_after, MAX_RETRY_AFTER)
                self.limiter.hold(seconds)
                if seconds > budget.left() or (stop is not None and time.monotonic() + seconds > stop):
                    raise PolygonRateLimited(self.rate_limit_message() + f": {what} not sent again")
                continue  # its next turn at the limiter is after the hold
            if retry_after is not None:
                delay = max(delay, retry_after)
            if (attempt == self.max_attempts or delay > budget.left()
                    or (stop is not None and time.monotonic() + delay > stop)):
                break
            logger.info("polygon retry", extra={"request": what, "problem": problem, "attempt": attempt,
                                                "delay_s": round(delay, 2)})
            time.sleep(delay)
        if budget.left() <= 0:
            # The list's budget ran out while this request waited: its time limit was what was left of it.
            raise PolygonError(f"Polygon took more than {self.time_budget:g}s for {what} ({problem}; "
                               f"{attempt} attempts)")
        raise PolygonError(
            f"Polygon kept failing for {what} ({problem}) after {attempt} attempts in "
            f"{time.monotonic() - started:.1f}s"
        )

    def rate_limited_past(self, stop: float | None) -> bool:
        """Whether a 429's Retry-After keeps the key waiting past `stop` (time.monotonic()), or, without one, longer
        than a list's time budget: no request of this client would be sent before then."""
        held = self.limiter.held()
        return bool(held) and (held > self.time_budget if stop is None else time.monotonic() + held > stop)

    def rate_limit_message(self) -> str:
        return f"Polygon rate-limited the key for {self.limiter.held_for:.0f} s (Retry-After)"

    def confirm_key(self) -> None:
        """After a 403 on one request: raise PolygonAuthError if the key itself is refused (a 401 or 403 on
        the crypto ticker listing, which every plan covers), so the caller stops instead of trying every
        symbol; return if the key works. Asks Polygon at most once per client, and not at all once a request
        has succeeded. A failure that proves nothing either way (a 5xx) returns."""
        with self._confirm_lock:
            if self.key_accepted:
                return
            if self._key_refused:
                raise PolygonAuthError(self._key_refused)
            try:
                self.get_json("/v3/reference/tickers", {"market": "crypto", "active": "true", "limit": 1},
                              what="key check (crypto ticker listing)")
            except PolygonAuthError as error:
                status = 403 if isinstance(error, PolygonNotEntitled) else 401
                self._key_refused = (f"Polygon refused the API key with HTTP {status} on /v3/reference/tickers "
                                     "(check POLYGON_API_KEY and the plan's entitlements)")
                raise PolygonAuthError(self._key_refused) from None
            except CandlecastError as error:
                logger.warning("could not confirm the Polygon key", extra={"code": error.code})

    def pages(self, path: str, params: dict | None = None, *, what: str, stop: float | None = None,
              max_pages: int | None = None) -> Iterator[dict]:
        """Every page of a list endpoint, following next_url (auth is re-added by the header), all within
        one time budget (turns waited at the rate limiter not counted), none started after `stop`.
        PolygonBadResponse for a next_url seen before or more than `max_pages` (at most MAX_PAGES) pages,
        PolygonError when the budget runs out. `what` names the list; its pages are "`what` page N"."""
        max_pages = min(MAX_PAGES, max_pages or MAX_PAGES)
        budget = _Budget(self.time_budget)
        seen = {self._url(path, params)}
        page = self.get_json(path, params, what=f"{what} page 1", budget=budget, stop=stop)
        yield page
        while next_url := page.get("next_url"):
            if not isinstance(next_url, str):
                raise PolygonBadResponse(f"Polygon sent a next_url that is not a string for {what}")
            url = self._url(next_url, None)
            if url in seen:
                raise PolygonBadResponse(f"Polygon's next_url for {what} repeats an earlier page "
                                         f"(after {len(seen)} pages)")
            if len(seen) >= max_pages:
                raise PolygonBadResponse(f"Polygon sent more than {max_pages} pages for {what}")
            if budget.left() <= 0:
                raise PolygonError(f"Polygon's pages for {what} took more than {self.time_budget:g}s "
                                   f"({len(seen)} pages)")
            seen.add(url)
            page = self.get_json(url, what=f"{what} page {len(seen)}", budget=budget, stop=stop)
            yield page

    # --- endpoints ------------------------------------------------------------------------------

    def crypto_tickers(self, *, page_size: int = 1000) -> list[dict]:
        """Reference rows of every active crypto ticker."""
        return self.crypto_listing(page_size=page_size)[0]

    def crypto_listing(self, *, page_size: int = 1000) -> tuple[list[dict], bool]:
        """(reference rows of every active crypto ticker, whether the listing is known to be whole). It is whole
        when its last page is shorter than `page_size`: a full page with no next_url may be a listing that
        stopped early without an error, so a ticker missing from it is not known to be gone."""
        params = {"market": "crypto", "active": "true", "limit": page_size, "order": "asc", "sort": "ticker"}
        rows: list[dict] = []
        last: list = []
        for page in self.pages("/v3/reference/tickers", params, what="crypto ticker listing"):
            last = page.get("results") or []
            rows += last
        return rows, len(last) < page_size

    def grouped_daily(self, day: str) -> list[dict]:
        """The day's bar of every crypto ticker (`T` is the ticker)."""
        page = self.get_json(f"/v2/aggs/grouped/locale/global/market/crypto/{day}", {"adjusted": "true"},
                             what=f"grouped daily bars {day}")
        return page.get("results") or []

    def aggregates(self, ticker: str, multiplier: int, timespan: str, start_ms: int, end_ms: int, *,
                   stop: float | None = None) -> list[dict]:
        """Bars of `ticker` opening in [start_ms, end_ms], oldest first, over every page (none started after
        `stop`)."""
        return [row for rows in self.aggregate_pages(ticker, multiplier, timespan, start_ms, end_ms, stop=stop)
                for row in rows]

    def aggregate_pages(self, ticker: str, multiplier: int, timespan: str, start_ms: int, end_ms: int, *,
                        stop: float | None = None) -> Iterator[list]:
        """Each page's bars of `ticker` opening in [start_ms, end_ms], oldest first (none started after `stop`), for
        the caller to make compact as they come. A page of more bars than the `limit` asked for, or a list of more
        than its range can hold (one bar a step, and a few more), is a bad response: a hostile answer's bars are
        never all held (audit J: pages of 30 MB, kept decoded, took a refresh past its 1024 MB in 6 s)."""
        path = f"/v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{start_ms}/{end_ms}"
        params = {"adjusted": "true", "sort": "asc", "limit": AGGREGATES_LIMIT}
        what = f"aggregates {ticker} {multiplier}{timespan[:1]}"
        minutes = max(0, end_ms - start_ms) // 60000 + 1
        max_pages = 2 * math.ceil(minutes / AGGREGATES_LIMIT) + PAGE_MARGIN
        step_ms = multiplier * SPAN_MS.get(timespan, 60000)
        max_rows = max(0, end_ms - start_ms) // step_ms + ROW_MARGIN
        rows = 0
        for number, page in enumerate(self.pages(path, params, what=what, stop=stop, max_pages=max_pages), 1):
            results = page.get("results") or []
            if not isinstance(results, list):
                raise PolygonBadResponse(f"Polygon sent results that are not a list for {what} page {number}")
            if len(results) > AGGREGATES_LIMIT:
                raise PolygonBadResponse(f"Polygon sent {len(results)} bars on {what} page {number}, more than the "
                                         f"{AGGREGATES_LIMIT} asked for")
            rows += len(results)
            if rows > max_rows:
                raise PolygonBadResponse(f"Polygon sent more bars for {what} than its range holds ({max_rows}, "
                                         f"by page {number})")
            yield results


class _TooSlow(Exception):
    """The answer did not arrive whole within the request's time."""


def _read_body(response, ends: float, what: str) -> bytes:
    """The decoded body, read as it arrives (each read returns what has come, decompressed to at most READ_CHUNK
    bytes): PolygonBadResponse past MAX_BODY_BYTES, _TooSlow past `ends` (time.monotonic()). A timer shuts the
    connection at `ends`, so a read that waits for a byte a second stops there too."""
    from urllib3.exceptions import HTTPError, ProtocolError

    timer = threading.Timer(max(0.0, ends - time.monotonic()), response.shutdown)
    timer.daemon = True
    timer.start()
    body = bytearray()
    try:
        try:
            while chunk := response.read1(READ_CHUNK):
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise PolygonBadResponse(f"Polygon sent a body larger than {MAX_BODY_BYTES / 2**20:.1f} MB "
                                             f"for {what}")
                if time.monotonic() >= ends:
                    raise _TooSlow
        except (OSError, ValueError, HTTPError) as error:  # the timer shut the connection, or it broke
            if time.monotonic() >= ends:
                raise _TooSlow from None
            if isinstance(error, HTTPError):
                raise
            raise ProtocolError(type(error).__name__) from None
        if time.monotonic() >= ends:  # shut by the timer: what came is not the whole body
            raise _TooSlow
    except BaseException:
        _discard(response)
        raise
    finally:
        timer.cancel()
    response.release_conn()
    return bytes(body)


def _discard(response) -> bytes:
    """Close an answer whose body is not wanted (never read: it may be large or slow) and free its pool slot."""
    response.close()
    response.release_conn()
    return b""


def _decode(data: bytes, what: str) -> dict:
    if sum(data.count(mark) for mark in _VALUE_MARKS) > MAX_VALUES:
        raise PolygonBadResponse(f"Polygon sent more JSON values than a page of {AGGREGATES_LIMIT} bars holds for "
                                 f"{what}")
    try:
        body = strictjson.loads(data)
    except ValueError:
        raise PolygonBadResponse(f"Polygon sent a body that is not JSON for {what}") from None
    if not isinstance(body, dict):
        raise PolygonBadResponse(f"Polygon sent JSON that is not an object for {what}")
    if body.get("status") == "ERROR":
        raise PolygonError(f"Polygon reported an error for {what}")
    return body


# Inside an API request (15 s Lambda timeout) Polygon gets 6 s, its waits for a 429's Retry-After included; the
# weekly refresh gets minutes.
INTERACTIVE_LIMITS = {"connect_timeout": 2.0, "read_timeout": 4.0, "request_timeout": 4.0, "time_budget": 6.0,
                      "max_attempts": 2, "budget_counts_turns": True}
_clients: dict[bool, PolygonClient] = {}
_client_lock = threading.Lock()


def get_client(*, interactive: bool = False) -> PolygonClient | None:
    """The container's client (one for API requests, one for batch work), or None when no key is configured."""
    client = _clients.get(interactive)
    if client is None:
        from candlecast.config import get_settings, polygon_api_key

        with _client_lock:
            client = _clients.get(interactive)
            if client is None:
                settings = get_settings()
                api_key = polygon_api_key(settings)
                if not api_key:
                    return None
                limits = INTERACTIVE_LIMITS if interactive else {}
                client = _clients[interactive] = PolygonClient(
                    api_key, settings.polygon_base_url, max_rps=settings.polygon_max_rps, **limits
                )
    return client


def reset_client() -> None:
    with _client_lock:
        for client in _clients.values():
            client.close()
        _clients.clear()
