"""`make faults`: each backing service fails under load, and the service's answers are measured.

A bounded load driver (a few threads, mixed reads and creates, each request timed) runs against the API
of a served local stack (infra/served_stack.py) while one piece at a time is frozen (SIGSTOP), killed
(SIGKILL) and, for PostgreSQL and Redis, restarted on the same data. The suite prints one table of
targets and measurements and exits non-zero when a target is missed. Only 127.0.0.1 is ever reached.

    Redis       SIGSTOP 10 s, SIGKILL, restart: 0 failed reads; p99 added latency <= 300 ms
    slow Redis  every command held 10 s by a proxy (infra/slow_proxy.py) between slow and timed out (midway
                between REDIS_SLOW_SECONDS and the socket timeout): 0 failed requests; each request within its
                own p99 (with the cache, or skipping it) plus SLOW_STRIKES x 2 socket timeouts; each container
                stops sending commands after its strikes; every container that skipped the cache uses it again
                within a probe interval of Redis answering quickly
    PostgreSQL  SIGSTOP 10 s, SIGKILL, restart on the same data folder: every 503 carries Retry-After;
                the first 503, and every create, comes within the database's bound (db.longest_wait with the
                create function's settings: 1.35 s as shipped) plus the create's own p99 with the database up
                (the load's just before the freeze; for the burst, the same burst of other fresh combinations),
                so a loaded machine's slower service is not counted as the outage's, each from when a local
                container took it (the API reports the wait, which Lambda would not have); recovery within
                2 s of the restart; 0 acknowledged writes lost, checked row by row against every 201; no
                prediction stored without its 30 steps
    S3          SIGSTOP, then SIGKILL: creates whose candles are not cached fail fast with
                storage_unavailable; cached reads are unaffected

    Throttling  the template as shipped (its route throttles and reserved concurrency, nothing overridden):
                bursts of 3x each function's reservation, then a sustained load, get only 2xx and API
                Gateway's 429, never a 5xx; every 201 is kept. Beside it, the same create burst with the
                route throttles off shows the 500 that Lambda's throttle gives (what the throttles prevent).

The API runs each function in its own containers (infra/lambda_runtime.py), warm before the first scenario
as a service under steady load is (`--warm`). The dependency scenarios drive more load than the template's
throttles admit, so their API runs with the capacity limits off (`--no-route-throttles
--no-reserved-concurrency`): capacity is not the fault under test there (`--report-waits`: each answer says
how long it waited for one of the 4 local containers). The throttling scenario then
restarts the API with the template as shipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from infra.bench import percentile
from infra.concurrency import budgets
from infra.lambda_runtime import DEFAULT_MAX_CONTAINERS
from infra.local_api import WAIT_HEADER
from infra.sam_template import DEFAULT_TEMPLATE, find_route, load_template, parameter_values, parse_functions
from infra.served_stack import ServedStack, signal_all

if TYPE_CHECKING:
    from candlecast.config import Settings

ROOT = Path(__file__).resolve().parent.parent
TIMEFRAMES = ("1h", "4h", "1d", "1w", "1m")
REQUEST_TIMEOUT = 20.0  # seconds; far above any target, so a hang shows as a slow answer, not a lost one
UNLIMITED = ["--no-route-throttles", "--no-reserved-concurrency", "--report-waits"]
GATEWAY_429 = {"message": "Too Many Requests"}


@dataclass
class Sample:
    kind: str  # "read" or "create"
    started: float  # time.monotonic()
    seconds: float
    status: int  # 0: no answer (connection error or client timeout)
    code: str = ""
    retry_after: str | None = None
    prediction_id: str | None = None
    path: str = ""
    body: object = None  # the JSON of an answer that has no "error" (API Gateway's own, or a result)
    waited: float = 0.0  # seconds it waited for a free local container (WAIT_HEADER): not the service's time

    @property
    def ended(self) -> float:
        return self.started + self.seconds


def sample_combos(data_dir: Path) -> list[tuple[str, str]]:
    """(ticker, timeframe) pairs with stored candles in the sample."""
    return sorted((path.parent.name, path.stem) for path in data_dir.glob("*/*.parquet")
                  if path.stem in TIMEFRAMES)


@dataclass
class Load:
    """Closed-loop workers: each sends one request, records it, waits `think` seconds, and goes on."""

    base_url: str
    read_ids: list[str]
    tickers: list[str]
    keyed_combos: list[tuple[str, str]]
    workers: int = 6
    create_share: float = 0.3
    think: float = 0.02
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        self._stop.clear()
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, args=(random.Random(index),), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT + 5)
        self._threads.clear()

    def record(self, sample: Sample) -> None:
        with self._lock:
            self.samples.append(sample)

    def _work(self, rng: random.Random) -> None:
        with httpx.Client(base_url=self.base_url, timeout=REQUEST_TIMEOUT) as client:
            while not self._stop.is_set():
                if rng.random() < self.create_share:
                    ticker, timeframe = rng.choice(self.keyed_combos)
                    self.record(send(client, "create", "POST", "/predictions",
                                     json={"symbol": ticker, "timeframe": timeframe},
                                     headers={"Idempotency-Key": f"fault-{uuid.uuid4()}"}))
                else:
                    choice = rng.random()
                    if choice < 0.6:
                        path = f"/predictions/{rng.choice(self.read_ids)}"
                    elif choice < 0.85:
                        path = f"/symbols/{rng.choice(self.tickers)}"
                    else:
                        path = f"/symbols?q={rng.choice(self.tickers)[:3].lower()}&limit=5"
                    self.record(send(client, "read", "GET", path))
                self._stop.wait(self.think)

    def window(self, start: float, end: float, kind: str | None = None) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if start <= s.started < end and (kind is None or s.kind == kind)]


def send(client: httpx.Client, kind: str, method: str, path: str, **kwargs) -> Sample:
    started = time.monotonic()
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError:
        return Sample(kind, started, time.monotonic() - started, 0, "no_answer")
    seconds = time.monotonic() - started
    code, prediction_id, body = "", None, None
    try:
        body = response.json()
        if isinstance(body, dict):
            code = str((body.get("error") or {}).get("code", ""))
            prediction_id = body.get("id") if response.status_code in (200, 201) and method == "POST" else None
    except ValueError:
        code = "not_json"
    return Sample(kind, started, seconds, response.status_code, code, response.headers.get("retry-after"),
                  prediction_id, f"{method} {path}", body if response.status_code == 429 else None,
                  float(response.headers.get(WAIT_HEADER) or 0) / 1000)


def template_settings(function_id: str = "PredictionCreateFunction") -> Settings:
    """The database and cache settings the template gives a function (the rest are stand-ins)."""
    from candlecast.config import Settings

    notes = logging.getLogger("local_api")
    level = notes.level
    notes.setLevel(logging.ERROR)  # its notes on layers a local run skips
    try:
        environment = parse_functions(load_template(DEFAULT_TEMPLATE))[function_id].environment
    finally:
        notes.setLevel(level)
    settings = {name.lower(): value for name, value in environment.items()
                if name.startswith(("DB_", "REDIS_")) and name != "REDIS_URL"}
    return Settings(database_url="postgresql://", redis_url="redis://", data_bucket="stand-in", **settings)


def create_database_bound() -> float:
    """db.longest_wait under the settings the template gives the create function."""
    from candlecast.db import longest_wait

    return longest_wait(template_settings())


def cache_outages(log: Path, since: float, until: float, end: float) -> tuple[list[float], list[float]]:
    """The times (time.time()) at which the API's containers logged the cache down in [since, until), and
    back up in [until, end), from their structured log lines."""
    from datetime import datetime

    down, back = [], []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{") or "cache" not in line:
            continue
        try:
            record = json.loads(line)
            at = datetime.strptime(record["timestamp"], "%Y-%m-%d %H:%M:%S,%f%z").timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        message = record.get("message")
        if message in ("cache too slow; serving without it", "cache unavailable; serving without it") \
                and since <= at < until:
            down.append(at)
        elif message == "cache available again" and until <= at < end:
            back.append(at)
    return down, back


@dataclass
class Check:
    fault: str
    target: str
    measured: str
    ok: bool


@dataclass
class Suite:
    served: ServedStack
    combos: list[tuple[str, str]]
    checks: list[Check] = field(default_factory=list)
    acknowledged: list[Sample] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)
    database_bound: float = field(default_factory=lambda: create_database_bound())

    def check(self, fault: str, target: str, measured: str, ok: bool) -> None:
        self.checks.append(Check(fault, target, measured, ok))
        print(f"  {'ok  ' if ok else 'MISS'} {fault:10} {target:55} {measured}", flush=True)

    def load(self, keyed_combos: list[tuple[str, str]]) -> Load:
        with httpx.Client(base_url=self.served.base_url, timeout=REQUEST_TIMEOUT) as client:
            ids = []
            for ticker, timeframe in keyed_combos:
                sample = send(client, "create", "POST", "/predictions", json={"symbol": ticker, "timeframe": timeframe},
                              headers={"Idempotency-Key": f"seed-{uuid.uuid4()}"})
                if sample.status != 201:
                    raise RuntimeError(f"could not create a prediction for {ticker} {timeframe}: {sample}")
                self.acknowledged.append(sample)
                ids.append(sample.prediction_id)
        tickers = sorted({ticker for ticker, _ in self.combos})
        return Load(self.served.base_url, ids, tickers, keyed_combos)

    def warm(self, settled: float = 1.0, quiet: float = 3.0, longest: float = 90.0) -> None:
        """The load, unmeasured, until no request has taken over `settled` s for `quiet` s: every container has
        then served the load's requests once (its first create loads the model and the forecast code)."""
        load = self.load(self.combos[:3]).start()
        started = time.monotonic()
        try:
            while time.monotonic() - started < longest:
                time.sleep(0.5)
                now = time.monotonic()
                recent = load.window(now - quiet - REQUEST_TIMEOUT, now)
                if now - started > quiet and not any(s.seconds > settled for s in recent if s.ended > now - quiet):
                    break
        finally:
            load.stop()
        self.acknowledged += [s for s in load.samples if s.status == 201]
        print(f"warm: {len(load.samples)} requests in {time.monotonic() - started:.0f} s", flush=True)

    def finish(self, name: str, load: Load) -> None:
        load.stop()
        self.acknowledged += [s for s in load.samples if s.status == 201]
        self.requests[name] = len(load.samples)

    # --- Redis --------------------------------------------------------------------------------------

    def redis(self, freeze: float, after: float, baseline: float) -> None:
        load = self.load(self.combos[:3]).start()
        time.sleep(baseline)
        process = self.served.redis_process()
        frozen = time.monotonic()
        process.send_signal(signal.SIGSTOP)
        time.sleep(freeze)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        killed = time.monotonic()
        self.served.restart_redis()
        time.sleep(after)
        self.finish("redis", load)
        before = load.window(frozen - baseline, frozen)
        during = load.window(frozen, killed + after)
        reads = [s for s in during if s.kind == "read"]
        failed = [s for s in reads if s.status not in (200, 404)]
        self.check("redis", "failed reads during the outage = 0", f"{len(failed)} of {len(reads)}"
                   + (f" ({sorted({(s.status, s.code) for s in failed})})" if failed else ""),
                   not failed and bool(reads))
        added = percentile([s.seconds for s in during], 0.99) - percentile([s.seconds for s in before], 0.99)
        self.check("redis", "p99 added latency <= 300 ms (all requests)",
                   f"{added * 1000:.0f} ms (p99 {percentile([s.seconds for s in during], 0.99) * 1000:.0f} ms "
                   f"vs {percentile([s.seconds for s in before], 0.99) * 1000:.0f} ms before)",
                   added <= 0.3 and bool(during) and bool(before))
        created = [s for s in during if s.kind == "create"]
        failed_creates = [s for s in created if s.status not in (200, 201)]
        self.check("redis", "failed creates during the outage = 0", f"{len(failed_creates)} of {len(created)}"
                   + (f" ({sorted({(s.status, s.code) for s in failed_creates})})" if failed_creates else ""),
                   not failed_creates and bool(created))

    def slow_redis(self, slow: float, after: float, baseline: float, first_reads: list[tuple[str, str]]) -> None:
        """Redis answers every command late (the proxy between the API and Redis holds each one), within the
        socket timeout, so no command fails: the strikes, not an error, must take the cache out of the path.

        `first_reads`: one uncached create per create container, all at once, before: a container's first read
        from S3 loaded what its init left lazy (before `forecasting.prepare` built the boto3 read client at init,
        boto3 or pyarrow's S3 filesystem: 1-2.5 s at load ~9.5), which a container that found
        its candles in Redis until then pays once when it skips the cache. That is the cache-less path's cold
        start, not the strikes'; the freeze scenario leaves it paid, and this makes the scenario not depend on it."""
        from candlecast.cache import PROBE_INTERVAL_SECONDS, SLOW_STRIKES

        proxy = self.served.redis_proxy
        assert proxy is not None, "the API must reach Redis through the proxy"
        settings = template_settings()
        delay = (settings.redis_slow_seconds + settings.redis_socket_timeout) / 2

        def create(combo: tuple[str, str]) -> Sample:
            with httpx.Client(base_url=self.served.base_url, timeout=REQUEST_TIMEOUT) as client:
                return send(client, "create", "POST", "/predictions", json={"symbol": combo[0], "timeframe": combo[1]})

        with ThreadPoolExecutor(len(first_reads)) as pool:
            firsts = list(pool.map(create, first_reads))
        self.acknowledged += [s for s in firsts if s.status == 201]
        print(f"  first S3 reads: {len(firsts)} creates at once, slowest {max(s.seconds for s in firsts):.2f} s",
              flush=True)
        load = self.load(self.combos[:3]).start()
        time.sleep(baseline)
        slowed, slowed_at = time.monotonic(), time.time()
        proxy.delay = delay
        time.sleep(slow)
        containers = len(self.served.api_containers())
        fast, fast_at = time.monotonic(), time.time()
        proxy.delay = 0.0
        time.sleep(after)
        self.finish("slow redis", load)
        ended = time.monotonic()

        during = load.window(slowed, ended)
        failed = [s for s in during if s.status not in (200, 201, 404)]
        self.check("slow redis", "failed requests while slow and after = 0 (no 5xx)", f"{len(failed)} of {len(during)}"
                   + (f" ({sorted({(s.status, s.code) for s in failed})})" if failed else ""),
                   not failed and bool(during))

        # What this loaded machine gives without the strikes: the slowest request of its kind with Redis fast
        # (before) or skipped by every container (after the last one's strikes; without the cache, a create reads
        # its candles from S3). Until a container has counted SLOW_STRIKES slow commands, each may add up to the
        # socket timeout, and one health-check PING before it (redis-py pings a connection idle past its
        # interval). From when a container took the request, as in PostgreSQL's checks.
        down, back = cache_outages(self.served.api_log, slowed_at, fast_at, time.time())
        skipped_from = slowed + max(down, default=fast_at) - slowed_at
        added_bound = SLOW_STRIKES * 2 * settings.redis_socket_timeout

        def own(samples: list[Sample]) -> float:
            return max((s.seconds - s.waited for s in samples if s.status < 300), default=0.0)  # none: the other's

        slowest = {kind: (own(load.window(slowed - baseline, slowed, kind)), own(load.window(skipped_from, fast, kind)))
                   for kind in ("read", "create")}
        over = [s.seconds - s.waited - max(slowest[s.kind]) for s in load.window(slowed, fast)]
        self.check("slow redis", "every request within its kind's slowest without strikes + their bound",
                   f"+{max(over, default=0):.2f} s at most (bound {added_bound:.2f} s); slowest with the cache / "
                   f"skipping it: reads {slowest['read'][0]:.2f} / {slowest['read'][1]:.2f} s, creates "
                   f"{slowest['create'][0]:.2f} / {slowest['create'][1]:.2f} s; {delay * 1000:.0f} ms per command",
                   bool(over) and all(slowest[kind][0] > 0 for kind in slowest) and max(over) <= added_bound)

        # Each container stops sending commands after its strikes; the probes' pings (and a reconnection's
        # set-up) are all that reach Redis until it is fast again.
        own_commands = {"PING", "CLIENT", "HELLO", "SELECT", "AUTH"}
        reached = [name for name in proxy.commands(slowed, fast) if name not in own_commands]
        before = [name for name in proxy.commands(slowed - baseline, slowed) if name not in own_commands]
        self.check("slow redis", "cache skipped: commands while slow <= strikes x containers",
                   f"{len(reached)} <= {SLOW_STRIKES} x {containers} ({len(before)} in the {baseline:.0f} s before)",
                   len(reached) <= SLOW_STRIKES * containers and bool(before))

        # Each container's probe pings every PROBE_INTERVAL_SECONDS. A ping in flight when Redis turns fast is
        # still answered late; the next, an interval later, is answered quickly (within the socket timeout at
        # most) and restores the cache.
        back_bound = delay + PROBE_INTERVAL_SECONDS + settings.redis_socket_timeout
        latest = max(back, default=float("inf")) - fast_at
        resumed = [name for name in proxy.commands(fast + back_bound, ended) if name not in own_commands]
        self.check("slow redis", "every container that skipped the cache uses it again",
                   f"{len(down)} down, {len(back)} back, the last {latest:.2f} s after Redis was fast (bound "
                   f"{back_bound:.2f} s); {len(resumed)} commands after", bool(down) and len(back) >= len(down)
                   and latest <= back_bound and len(resumed) > 0)

    # --- PostgreSQL ---------------------------------------------------------------------------------

    def postgres(self, freeze: float, after: float, baseline: float, burst: list[tuple[str, str]],
                 calibration: list[tuple[str, str]]) -> None:
        load = self.load(self.combos[:3]).start()

        def fire(combos: list[tuple[str, str]], samples: list[Sample]) -> list[threading.Thread]:
            def unkeyed(combo: tuple[str, str]) -> None:
                with httpx.Client(base_url=self.served.base_url, timeout=REQUEST_TIMEOUT) as client:
                    samples.append(send(client, "create", "POST", "/predictions",
                                        json={"symbol": combo[0], "timeframe": combo[1]}))

            threads = [threading.Thread(target=unkeyed, args=(combo,)) for combo in combos]
            for thread in threads:
                thread.start()
            return threads

        # The same burst of other fresh combinations first, the database up: what such creates take under this
        # load (candles read from S3, a timeframe's model loaded) is their own time, not the outage's.
        calibration_samples: list[Sample] = []
        for thread in fire(calibration, calibration_samples):
            thread.join(REQUEST_TIMEOUT)
        self.acknowledged += [s for s in calibration_samples if s.status == 201]
        time.sleep(baseline)
        # Unkeyed creates of fresh combinations race the freeze: the commits most at risk of being lost.
        burst_samples: list[Sample] = []
        burst_threads = fire(burst, burst_samples)
        time.sleep(0.15)
        pids = self.served.postgres_pids()
        frozen = time.monotonic()
        signal_all(pids, signal.SIGSTOP)
        time.sleep(freeze)
        signal_all(pids, signal.SIGKILL)
        killed = time.monotonic()
        self.served.restart_postgres(pids)
        restarted = time.monotonic()
        time.sleep(after)
        for thread in burst_threads:
            thread.join(REQUEST_TIMEOUT)
        self.finish("postgres", load)
        load.samples += burst_samples
        self.acknowledged += [s for s in burst_samples if s.status == 201]

        outage = [s for s in load.window(frozen, restarted) if s.status == 503 or s.status == 0]
        creates = [s for s in load.window(frozen, killed, "create")] + \
                  [s for s in burst_samples if s.started < frozen < s.ended]
        # The outage may add the database's bound to a request, no more; the rest of a request's time is the
        # service's own, as slow as this machine's load makes it with the database up: the load's creates just
        # before the freeze, and the calibration burst for the burst's.
        def own(samples: list[Sample]) -> float:
            times = [s.seconds - s.waited for s in samples if s.status == 201]
            return percentile(times, 0.99) if times else float("inf")

        own_load = own(load.window(frozen - baseline, frozen, "create"))
        own_burst = max(own_load, own(calibration_samples))
        first_503 = min((s.ended for s in outage if s.status == 503), default=float("inf")) - frozen
        bound = self.database_bound + own_load
        self.check("postgres", "first 503 within the bound of the freeze",
                   f"{first_503:.2f} s (bound {bound:.2f} s: {self.database_bound:.2f} + create p99 {own_load:.2f})",
                   first_503 <= bound)
        # From the freeze for a create already in flight (its queueing before is not the outage's), else
        # from its start; either way from when a container took it: only 4 containers per function run
        # locally, and a create waiting behind others' outage waits would not wait on Lambda.
        def over(s: Sample) -> float:
            return s.ended - max(s.started + s.waited, frozen) - (own_burst if s in burst_samples else own_load)

        slowest = max(creates, key=over, default=None)
        self.check("postgres", "every create answered within the bound of the freeze or its start",
                   f"{len(creates)}; slowest over its own p99 (load {own_load:.2f} s, burst {own_burst:.2f} s): "
                   f"{over(slowest) if slowest else 0:.2f} s, bound {self.database_bound:.2f} s",
                   bool(creates) and over(slowest) <= self.database_bound)
        missing = [s for s in load.samples if s.status == 503 and not (s.retry_after or "").isdigit()]
        unanswered = [s for s in outage if s.status == 0]
        self.check("postgres", "every 503 carries Retry-After; none unanswered",
                   f"{len(missing)} without, {len(unanswered)} unanswered, of "
                   f"{sum(s.status == 503 for s in load.samples)}", not missing and not unanswered)
        recovered = min((s.ended for s in load.samples
                         if s.kind == "create" and s.status == 201 and s.started >= restarted), default=float("inf"))
        self.check("postgres", "recovery: a 201 within 2 s of the restart",
                   f"{recovered - restarted:.2f} s (restart took {restarted - killed:.2f} s)",
                   recovered - restarted <= 2.0)
        wrong = [s for s in load.window(frozen, restarted) if s.status >= 500 and s.status != 503]
        self.check("postgres", "no 5xx other than 503", f"{len(wrong)} of {len(load.window(frozen, restarted))}",
                   not wrong and bool(load.window(frozen, restarted)))

    def lost_writes(self) -> None:
        """Every 201's id, row by row: the prediction and its 30 steps are in the database."""
        import psycopg

        ids = [s.prediction_id for s in self.acknowledged]
        with psycopg.connect(self.served.stack.database_url, autocommit=True) as conn:
            rows = dict(conn.execute(
                "SELECT p.id::text, count(s.step) FROM predictions p LEFT JOIN prediction_steps s "
                "ON s.prediction_id = p.id WHERE p.id = ANY(%s::uuid[]) GROUP BY p.id", (ids,)).fetchall())
            # Creates that failed mid-write (the server frozen or killed under them) must leave nothing behind.
            partial, total = conn.execute(
                "SELECT count(*) FILTER (WHERE steps <> 30), count(*) FROM (SELECT p.id, count(s.step) AS steps "
                "FROM predictions p LEFT JOIN prediction_steps s ON s.prediction_id = p.id GROUP BY p.id) counted"
            ).fetchone()
        lost = [prediction_id for prediction_id in ids if rows.get(prediction_id) != 30]
        self.check("postgres", "acknowledged writes lost = 0 (row by row, every 201)",
                   f"{len(lost)} of {len(ids)}", not lost and len(ids) > 0)
        self.check("postgres", "partial writes = 0 (predictions without 30 steps)", f"{partial} of {total}",
                   partial == 0 and total >= len(ids))

    # --- S3 -----------------------------------------------------------------------------------------

    def s3(self, freeze: float, killed_for: float, baseline: float, uncached: list[tuple[str, str]]) -> None:
        import redis

        from candlecast.cache import keys

        load = self.load(self.combos[:3])
        load.create_share = 0.15
        # The load's own candles stay cached, and every timeframe's model is loaded (a warm container).
        warm = self.combos[:3] + [next(combo for combo in uncached[::-1] if combo[1] == timeframe)
                                  for timeframe in sorted({tf for _, tf in uncached})]
        with httpx.Client(base_url=self.served.base_url, timeout=REQUEST_TIMEOUT) as client:
            for ticker, timeframe in warm:
                send(client, "create", "POST", "/predictions", json={"symbol": ticker, "timeframe": timeframe})
        uncached = [combo for combo in uncached if combo not in warm]
        load.start()
        time.sleep(baseline)
        cache = redis.Redis.from_url(self.served.stack.redis_url)
        cache.delete(*[keys.candles(f"X:{ticker}", timeframe) for ticker, timeframe in uncached])
        process = self.served.moto.process
        frozen = time.monotonic()
        process.send_signal(signal.SIGSTOP)
        creates: list[Sample] = []
        with httpx.Client(base_url=self.served.base_url, timeout=REQUEST_TIMEOUT) as client:
            deadline = frozen + freeze
            for ticker, timeframe in uncached:
                if time.monotonic() > deadline:
                    break
                creates.append(send(client, "create", "POST", "/predictions",
                                    json={"symbol": ticker, "timeframe": timeframe}))
            time.sleep(max(0.0, deadline - time.monotonic()))
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            dead = time.monotonic()
            for ticker, timeframe in uncached[:5]:
                creates.append(send(client, "create", "POST", "/predictions",
                                    json={"symbol": ticker, "timeframe": timeframe}))
            time.sleep(max(0.0, dead + killed_for - time.monotonic()))
        self.finish("s3", load)
        frozen_creates = [s for s in creates if s.started < dead]
        wrong = [s for s in creates if (s.status, s.code) != (503, "storage_unavailable")]
        self.check("s3", "uncached creates fail with storage_unavailable",
                   f"{len(creates) - len(wrong)} of {len(creates)}" +
                   (f" (others: {sorted({(s.status, s.code) for s in wrong})})" if wrong else ""),
                   not wrong and bool(creates))
        slowest_frozen = max((s.seconds for s in frozen_creates), default=0.0)
        slowest_dead = max((s.seconds for s in creates if s.started >= dead), default=0.0)
        self.check("s3", "they fail fast: <= 3 s frozen, <= 1.5 s stopped",
                   f"slowest {slowest_frozen:.2f} s frozen, {slowest_dead:.2f} s stopped",
                   slowest_frozen <= 3.0 and slowest_dead <= 1.5 and bool(frozen_creates))
        reads = [s for s in load.window(frozen, time.monotonic(), "read")]
        failed = [s for s in reads if s.status not in (200, 404)]
        before = load.window(frozen - baseline, frozen, "read")
        self.check("s3", "cached reads unaffected: 0 failed",
                   f"{len(failed)} of {len(reads)}; p99 {percentile([s.seconds for s in reads], .99) * 1000:.0f} ms "
                   f"vs {percentile([s.seconds for s in before], .99) * 1000:.0f} ms before",
                   not failed and bool(reads))

    # --- Throttling ---------------------------------------------------------------------------------

    def throttle(self, factor: int, seconds: float, workers: int, then: list[str] | None = None) -> None:
        """Restarts the API twice (route throttles off, then the template as shipped), and at the end with
        `then`, warmed, when scenarios follow."""
        try:
            self._throttle(factor, seconds, workers)
        finally:
            if then is not None:
                self.served.restart_api(then)
                self.warm()  # the new containers load their models, as before the first scenario

    def _throttle(self, factor: int, seconds: float, workers: int) -> None:
        template = load_template(DEFAULT_TEMPLATE)
        functions = {item.function_id: item for item in budgets(
            template, parameter_values(template), DEFAULT_TEMPLATE.parent)}
        ids = self.load(self.combos[:3]).read_ids  # three creates by the unlimited API, before the restarts
        tickers = sorted({ticker for ticker, _ in self.combos})
        rng = random.Random(11)

        def request(function_id: str) -> tuple[str, str, str, dict]:
            """(kind, method, path, options) of one request to one of the function's routes."""
            if function_id == "PredictionCreateFunction":
                ticker, timeframe = rng.choice(self.combos)
                return "create", "POST", "/predictions", {
                    "json": {"symbol": ticker, "timeframe": timeframe},
                    "headers": {"Idempotency-Key": f"throttle-{uuid.uuid4()}"}}
            route = rng.choice(functions[function_id].routes)
            ticker = rng.choice(tickers)
            path = (route.path.replace("{id}", rng.choice(ids)).replace("{ticker}", ticker)
                    .replace("{timeframe}", rng.choice(TIMEFRAMES)))
            return "read", "GET", path + ("?q=" + ticker[:3].lower() if route.path == "/symbols" else ""), {}

        def fire(requests: list[tuple[str, str, str, dict]]) -> list[Sample]:
            """All at once: each on its own connection, released together."""
            start = threading.Barrier(len(requests))

            def one(item: tuple[str, str, str, dict]) -> Sample:
                kind, method, path, options = item
                with httpx.Client(base_url=self.served.base_url, timeout=REQUEST_TIMEOUT) as client:
                    start.wait()
                    return send(client, kind, method, path, **options)

            with ThreadPoolExecutor(len(requests)) as pool:
                return list(pool.map(one, requests))

        def burst(only: set[str] | None = None) -> list[Sample]:
            return fire([request(name) for name, item in functions.items() if not only or name in only
                         for _ in range(factor * (item.reserved or 0))])

        # The reservation alone, as the template was: Lambda's throttle, which API Gateway answers with 500.
        self.served.restart_api(["--no-route-throttles"])
        bare = burst({"PredictionCreateFunction"})
        self.acknowledged += [s for s in bare if s.status == 201]
        refused = sum(s.status == 500 for s in bare)
        self.check("throttle", f"without route throttles, {len(bare)} creates at once get 500s",
                   f"{refused} of {len(bare)} got 500 (reserved {functions['PredictionCreateFunction'].reserved})",
                   refused > 0)

        self.served.restart_api([])  # the template as shipped
        samples = burst()
        load = Load(self.served.base_url, [], [], [], workers=workers)
        threads = [threading.Thread(target=self._throttled_worker, args=(load, request, seconds), daemon=True)
                   for _ in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + REQUEST_TIMEOUT + 5)
        sustained = load.samples
        # A bucket never holds more than its burst, so whatever it did before, in the window from the first
        # request to the last answer it lets through at most burst + rate x window.
        window = max(s.ended for s in samples + sustained) - min(s.started for s in samples + sustained)
        self.acknowledged += [s for s in samples + sustained if s.status == 201]
        self.requests["throttle"] = len(bare) + len(samples) + len(sustained)

        for name, group in (("a burst of 3x each reservation", samples), (f"{workers} workers for {seconds:.0f} s",
                                                                           sustained)):
            counts = {status: sum(s.status == status for s in group) for status in sorted({s.status for s in group})}
            wrong = [s for s in group if s.status not in (200, 201, 429)]
            self.check("throttle", f"{name}: only 200, 201 and 429",
                       ", ".join(f"{count} x {status}" for status, count in counts.items()),
                       not wrong and counts.get(429, 0) > 0)
        throttled = [s for s in samples + sustained if s.status == 429]
        odd = [s for s in throttled if s.body != GATEWAY_429]
        self.check("throttle", "every 429 is API Gateway's {\"message\": \"Too Many Requests\"}",
                   f"{len(throttled) - len(odd)} of {len(throttled)}", not odd and bool(throttled))
        through: dict[str, int] = {}
        routes = [route for item in functions.values() for route in item.routes]
        for s in samples + sustained:
            if s.status != 429:
                method, _, target = s.path.partition(" ")
                route = find_route(routes, method, target.split("?", 1)[0])[0]
                through[route.route_key] = through.get(route.route_key, 0) + 1
        over = {key: count for key, count in through.items()
                if count > next(r.throttle.burst + r.throttle.rate * window for r in routes if r.route_key == key)}
        self.check("throttle", "let through per route <= burst + rate x time",
                   f"{sum(through.values())} in {window:.1f} s, {len(over)} routes over" +
                   (f" {json.dumps(over)}" if over else ""), not over)

    def _throttled_worker(self, load: Load, request, seconds: float) -> None:
        rng = random.Random()
        names = ["HealthFunction", "SymbolsFunction", "PredictionGetFunction", "PredictionCreateFunction"]
        deadline = time.monotonic() + seconds
        with httpx.Client(base_url=load.base_url, timeout=REQUEST_TIMEOUT) as client:
            while time.monotonic() < deadline:
                kind, method, path, options = request(rng.choice(names))
                load.record(send(client, kind, method, path, **options))
                time.sleep(0.05)

    def table(self) -> str:
        width = max(len(check.target) for check in self.checks)
        lines = [f"{'fault':10}  {'target':{width}}  {'measured':50}  result", "-" * (width + 72)]
        lines += [f"{c.fault:10}  {c.target:{width}}  {c.measured:50}  {'ok' if c.ok else 'MISSED'}"
                  for c in self.checks]
        lines.append("requests: " + ", ".join(f"{name} {count}" for name, count in self.requests.items()))
        return "\n".join(lines)


def run(freeze: float = 10.0, only: str | None = None) -> int:
    combos = sample_combos(ROOT / "data")
    rng = random.Random(7)
    load_combos = [combo for combo in combos if combo[1] == "1h"][:3]
    fresh = [combo for combo in combos if combo not in load_combos]
    rng.shuffle(fresh)
    # 16 unkeyed creates race the freeze, after 16 others of their kind; 16 meet a dead S3; one per create container
    # reads from S3 before Redis turns slow
    burst, uncached, calibration = fresh[:16], fresh[16:32], fresh[32:48]
    first_reads = fresh[48:48 + DEFAULT_MAX_CONTAINERS]
    started = time.monotonic()
    print("starting the served stack (PostgreSQL, Redis, moto S3, the API)...", flush=True)
    with ServedStack(api_args=["--warm", str(DEFAULT_MAX_CONTAINERS), *UNLIMITED], proxied_redis=True) as served:
        suite = Suite(served, load_combos + fresh)
        api_args = list(served.api_args)
        scenarios: dict[str, Callable[[], None]] = {
            "redis": lambda: suite.redis(freeze, after=4.0, baseline=4.0),
            "slow-redis": lambda: suite.slow_redis(slow=freeze, after=4.0, baseline=4.0, first_reads=first_reads),
            "postgres": lambda: suite.postgres(freeze, after=5.0, baseline=3.0, burst=burst,
                                              calibration=calibration),
            # Before S3's, which leaves S3 dead; it restarts the API, then gives the others theirs back.
            "throttle": lambda: suite.throttle(factor=3, seconds=8.0, workers=8, then=None if only else api_args),
            "s3": lambda: suite.s3(min(freeze, 8.0), killed_for=3.0, baseline=3.0, uncached=uncached),
        }
        if only != "throttle":
            suite.warm()
        for name, scenario in scenarios.items():
            if only and name != only:
                continue
            print(f"{name}: " + ("bursts past the reservations, then load..." if name == "throttle"
                                 else f"slow {freeze:.0f} s under load..." if name == "slow-redis"
                                 else f"frozen {freeze:.0f} s under load..."), flush=True)
            scenario()
        suite.lost_writes()
        print(f"\nfault suite ({time.monotonic() - started:.0f} s; API log {served.api_log})\n{suite.table()}")
    passed = sum(check.ok for check in suite.checks)
    print(f"faults: {passed} passed, {len(suite.checks) - passed} failed")
    return 0 if passed == len(suite.checks) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--freeze", type=float, default=10.0, help="seconds each service stays frozen")
    parser.add_argument("--only", choices=("redis", "slow-redis", "postgres", "s3", "throttle"))
    args = parser.parse_args(argv)
    return run(args.freeze, args.only)


if __name__ == "__main__":
    sys.exit(main())
