"""`make bench-scale`: the hot paths at 1k, 100k and 1M stored predictions (30 steps each), in one run.

Loads 50k symbols and grows predictions/prediction_steps with generate_series (one statement per chunk,
never a million inserts), then times each hot path through the Lambda handlers against the real embedded
PostgreSQL and Redis, and shows each hot query's plan as the pool runs it (prepared statements included).
Prints figures; asserts nothing. Heavy (30M rows, a few GB of disk): not part of `make test`.

BENCH_SCALE_STAGES=1000,20000 runs smaller stages (a quick look); the data directory lives under TMPDIR.
"""

import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

import psycopg

from infra.bench import percentile
from infra.bench_stages import STEPS_OF_NEW_SQL, copy_database, stage_pools
from infra.events import create_event, load_event, path_event
from infra.lambda_loader import LambdaContext, load_handler
from infra.local_stack import ROOT, LocalStack, seeded_stack

STAGES = tuple(int(n) for n in os.environ.get("BENCH_SCALE_STAGES", "1000,100000,1000000").split(","))
SYMBOLS = 50_000
HOT_TICKER = "X:BTCUSDT"  # the committed sample's symbol: creates forecast it, and it gets HOT_SHARE of the rows
HOT_SHARE = 0.2
CHUNK = 50_000  # predictions per loading statement (1.5M steps)
HISTORY = timedelta(days=365)  # the loaded predictions are spread over a year, oldest first
MAX_RUNS, MIN_RUNS, BUDGET_SECONDS, ROUND = 200, 20, 30.0, 5
WARM_UP = 12  # untimed calls first: a warm container, past psycopg's prepare threshold and PostgreSQL's 5 custom plans
TIMEFRAME_MIX = ["1h"] * 5 + ["4h"] * 2 + ["1d"] * 2 + ["1w", "1m"]

_SYMBOLS_SQL = """
INSERT INTO symbols (ticker, name, base_currency, quote_currency, volume_24h, is_active)
SELECT 'X:' || base || quote, initcap(lower(base)) || ' Coin', base, quote,
       round((random() * 1e8)::numeric, 2), true
FROM (SELECT i, translate(upper(substr(md5(i::text), 1, 3)), '0123456789', 'GHIJKLMNOP') || i AS base,
             (ARRAY['USD', 'USDT', 'EUR', 'BTC'])[1 + i %% 4] AS quote
      FROM generate_series(1, %(count)s) i) g
ON CONFLICT (ticker) DO NOTHING
RETURNING id
"""

_GROW_SQL = """
WITH new AS (
    INSERT INTO predictions (symbol_id, ticker, timeframe, model_id, last_candle_at, last_close, horizon,
                             idempotency_key, request_hash, created_at)
    SELECT s.id, s.ticker, g.timeframe, m.id, date_trunc('hour', g.created_at), 100, 30,
           CASE WHEN g.i %% 4 = 0 THEN 'bench-' || g.i END, md5('bench-' || g.i), g.created_at
    FROM (SELECT i,
                 CASE WHEN random() < %(hot_share)s THEN %(hot_id)s
                      ELSE %(first_id)s + floor(random() * %(span)s)::bigint END AS symbol_id,
                 (%(timeframes)s::text[])[1 + i %% %(mix)s] AS timeframe,
                 %(origin)s::timestamptz + i * %(spacing)s::interval AS created_at
          FROM generate_series(%(start)s, %(stop)s - 1) i) g
    JOIN symbols s ON s.id = g.symbol_id
    JOIN models m ON m.timeframe = g.timeframe AND m.is_active
    RETURNING id, last_candle_at
)""" + STEPS_OF_NEW_SQL


def report_line(name: str, value, note: str = "") -> None:
    print(f"  {name:<52} {value!s:>22}  {note}", flush=True)


def side_by_side(calls: dict[int, tuple[Callable[[], dict], Callable[[], None] | None]],
                 use_stage: Callable[[int], None]) -> dict[int, list[float]]:
    """Milliseconds of each stage's call (a handler invocation), the stages taking turns in rounds of
    ROUND calls, so a noisy neighbour slows every stage alike. `before` runs outside the clock."""
    samples: dict[int, list[float]] = {stage: [] for stage in calls}

    def run(stage: int, count: int, keep: bool) -> None:
        use_stage(stage)
        call, before = calls[stage]
        for _ in range(count):
            if before is not None:
                before()
            clock = time.perf_counter()
            response = call()
            elapsed = (time.perf_counter() - clock) * 1000
            assert response["statusCode"] < 500, response
            if keep:
                samples[stage].append(elapsed)

    for stage in calls:
        run(stage, WARM_UP, keep=False)
    started = time.monotonic()
    while any(len(taken) < MIN_RUNS for taken in samples.values()) or (
            time.monotonic() - started < BUDGET_SECONDS and all(len(taken) < MAX_RUNS for taken in samples.values())):
        for stage in calls:
            run(stage, ROUND, keep=True)
    return samples


class Loader:
    """Grows the tables on its own connection (not the pool), chunk by chunk, with progress."""

    def __init__(self, database_url: str, embedded: bool):
        self.conn = psycopg.connect(database_url, autocommit=True)
        self.conn.execute("SET synchronous_commit = off")
        self.conn.execute("SET maintenance_work_mem = '1GB'")
        if embedded:
            # The load runs at the lowest priority and the timing at normal priority: the load's work is
            # done by this connection's server process (index builds too, with no parallel workers).
            self.conn.execute("SET max_parallel_maintenance_workers = 0")
            os.setpriority(os.PRIO_PROCESS, self.conn.info.backend_pid, 19)
        # Generated rows reference existing rows by construction: skip the per-row foreign-key triggers.
        self.conn.execute("SET session_replication_role = replica")
        self.loaded = 0
        self.seconds = 0.0

    def symbols(self, count: int) -> tuple[int, int]:
        """Loads `count` symbols; returns their first and last id."""
        started = time.perf_counter()
        ids = [row[0] for row in self.conn.execute(_SYMBOLS_SQL, {"count": count})]
        self.seconds += time.perf_counter() - started
        return min(ids), max(ids)

    def grow(self, target: int, hot_id: int, first_id: int, last_id: int) -> float:
        started = time.perf_counter()
        bulk = target - self.loaded > 200_000
        saved = self._drop_step_indexes() if bulk else []
        origin = self.conn.execute("SELECT now() - %s::interval", (HISTORY,)).fetchone()[0]
        while self.loaded < target:
            stop = min(target, self.loaded + CHUNK)
            self.conn.execute(_GROW_SQL, {
                "hot_share": HOT_SHARE, "hot_id": hot_id, "first_id": first_id, "span": last_id - first_id + 1,
                "timeframes": TIMEFRAME_MIX, "mix": len(TIMEFRAME_MIX), "origin": origin,
                "spacing": HISTORY / max(STAGES), "start": self.loaded, "stop": stop,
            })
            self.loaded = stop
            print(f"\r  loading predictions: {self.loaded:>9,} / {target:,}  ({time.perf_counter() - started:.0f} s)",
                  end="", flush=True)
        print()
        if saved:
            print("  rebuilding prediction_steps indexes ...", flush=True)
            self._restore(saved)
        self.conn.execute("VACUUM (ANALYZE) predictions, prediction_steps, symbols")
        elapsed = time.perf_counter() - started
        self.seconds += elapsed
        return elapsed

    def _drop_step_indexes(self) -> list[str]:
        """A bulk load builds the secondary indexes once (a sort) instead of 27M random inserts. Foreign keys
        that lean on them (prediction_scores) go first and come back last."""
        rows = self.conn.execute("""
            SELECT 0, c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid), NULL FROM pg_constraint c
            WHERE c.confrelid = 'prediction_steps'::regclass AND c.contype = 'f'
            UNION ALL
            SELECT 1, 'prediction_steps', c.conname, pg_get_constraintdef(c.oid), NULL FROM pg_constraint c
            WHERE c.conrelid = 'prediction_steps'::regclass AND c.contype = 'u'
            UNION ALL
            SELECT 2, 'prediction_steps', i.indexrelid::regclass::text, NULL, pg_get_indexdef(i.indexrelid)
            FROM pg_index i
            WHERE i.indrelid = 'prediction_steps'::regclass AND NOT i.indisprimary
              AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
            ORDER BY 1
        """).fetchall()
        restore = []
        for _, table, name, constraint, index in rows:
            if constraint is not None:
                self.conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
                restore.insert(0, f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {constraint}')
            else:
                self.conn.execute(f"DROP INDEX {name}")
                restore.insert(0, index)
        return restore

    def _restore(self, statements: list[str]) -> None:
        for statement in statements:
            self.conn.execute(statement)


def sizes(conn: psycopg.Connection) -> dict[str, int]:
    return dict(conn.execute("""
        SELECT relname, pg_relation_size(oid) FROM pg_class
        WHERE relname IN ('predictions', 'prediction_steps') OR oid IN (
            SELECT indexrelid FROM pg_index WHERE indrelid IN ('predictions'::regclass, 'prediction_steps'::regclass))
        ORDER BY 1
    """).fetchall())


def megabytes(value: int) -> str:
    return f"{value / 2**20:,.0f} MB"


class HotPaths:
    """Each hot path as one handler call, with what must happen outside the clock."""

    def __init__(self, database_url: str):
        from candlecast import cache

        self.cache = cache
        self.create = load_handler(ROOT / "functions/predictions_create")
        self.get = load_handler(ROOT / "functions/predictions_get")
        self.symbols = load_handler(ROOT / "functions/symbols")
        self.context = LambdaContext()
        self.create_event = create_event({"symbol": HOT_TICKER, "timeframe": "1h"})
        self.admin = psycopg.connect(database_url, autocommit=True)
        self.last_created: str | None = None
        self.depths: dict[str, int] = {}  # rows before the deepest page, by timeframe

    def _call(self, handler, request: dict) -> dict:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            return handler(request, self.context)

    def plan(self) -> list[tuple[Callable[[], dict], Callable[[], None] | None]]:
        """(call, before) of each of FIGURES, in order."""
        ids = self.sample_ids(500)
        return [
            (self.create_new_unkeyed, self.forget_twin),
            (self.create_new_keyed, None),
            (self.repeat, None),
            (self.repeat, self.forget_cached_repeat),
            self.get_by_id(ids),
            (self.recent("1h"), None),
            (self.recent(None), None),
            (self.recent("1h", deepest=True), None),
            (self.recent(None, deepest=True), None),
            self.search("BTCUSDT"),
            self.search("b"),
        ]

    def create_new_unkeyed(self) -> dict:
        response = self._call(self.create, self.create_event)
        self.last_created = json.loads(response["body"])["id"]
        return response

    def forget_twin(self) -> None:
        """The same request again would be a repeat: delete the previous one (its steps cascade)."""
        if self.last_created is not None:
            self.admin.execute("DELETE FROM predictions WHERE id = %s", (self.last_created,))
        self.cache.delete_pattern(self.cache.keys.all_prediction_keys())

    def create_new_keyed(self) -> dict:
        # Inside the clock: a copy with a new key, not a fresh event from its file.
        keyed = dict(self.create_event, headers={**self.create_event["headers"], "idempotency-key": str(uuid.uuid4())})
        return self._call(self.create, keyed)

    def repeat(self) -> dict:
        return self._call(self.create, self.create_event)

    def forget_cached_repeat(self) -> None:
        self.cache.delete_pattern(self.cache.keys.all_prediction_keys())

    def sample_ids(self, count: int) -> list[str]:
        return [str(row[0]) for row in self.admin.execute(
            "SELECT id FROM predictions ORDER BY random() LIMIT %s", (count,))]

    def get_by_id(self, ids: list[str]) -> tuple[Callable, Callable]:
        request: list[dict] = []

        def before() -> None:  # the event is made here, outside the clock
            chosen = random.choice(ids)
            request[:] = [path_event("prediction_get.json", f"/predictions/{chosen}", id=chosen)]
            self.cache.delete(self.cache.keys.prediction(chosen))

        def call() -> dict:
            return self._call(self.get, request[0])

        return call, before

    def deepest_cursor(self, timeframe: str | None) -> tuple[str, int]:
        """The cursor of the hot symbol's last page of 20 (its oldest predictions), as the API would give it out
        after the page before, and how many rows come before that page."""
        from candlecast.pagination import encode_cursor
        from candlecast.services import predictions

        row = self.admin.execute(
            "SELECT p.created_at, p.id, count(*) OVER () FROM predictions p JOIN symbols s ON s.id = p.symbol_id "
            "WHERE s.ticker = %s AND (p.timeframe = %s OR %s::text IS NULL) ORDER BY p.created_at, p.id LIMIT 21",
            (HOT_TICKER, timeframe, timeframe)).fetchall()[-1]
        anchor = {"created_at": row[0], "id": row[1]}
        return encode_cursor(predictions.list_scope(HOT_TICKER, timeframe), predictions.position(anchor)), row[2] - 20

    def recent(self, timeframe: str | None, deepest: bool = False) -> Callable[[], dict]:
        query = {"limit": "20", **({"timeframe": timeframe} if timeframe else {})}
        if deepest:
            cursor, depth = self.deepest_cursor(timeframe)
            query["cursor"] = cursor
            self.depths[timeframe or "any"] = depth
        request = load_event("symbol_predictions.json", rawPath="/symbols/BTC-USDT/predictions",
                        rawQueryString="&".join(f"{k}={v}" for k, v in query.items()),
                        queryStringParameters=query, pathParameters={"ticker": "BTC-USDT"})
        return lambda: self._call(self.symbols, request)

    def search(self, query: str) -> tuple[Callable, Callable]:
        request = load_event("symbols_search.json", rawQueryString=f"q={query}&limit=20",
                        queryStringParameters={"q": query, "limit": "20"})
        return (lambda: self._call(self.symbols, request),
                lambda: self.cache.delete_pattern(self.cache.keys.all_search_keys()))


FIGURES = [
    "create, new unkeyed",
    "create, new keyed (Idempotency-Key)",
    "create, repeat (Redis hit)",
    "create, repeat (Redis cleared: the database finds it)",
    "GET /predictions/{id}, uncached",
    "recent by symbol, timeframe=1h",
    "recent by symbol, no timeframe",
    "recent by symbol, timeframe=1h, last page (cursor)",
    "recent by symbol, no timeframe, last page (cursor)",
    "search, exact ticker (BTCUSDT)",
    "search, one-letter prefix (b)",
]


def measure(stages: dict[int, "HotPaths"], use_stage: Callable[[int], None]) -> dict[str, dict[int, list[float]]]:
    """Every figure, each with the stages side by side."""
    plans = {stage: paths.plan() for stage, paths in stages.items()}
    for stage, paths in stages.items():
        print(f"  {stage:,}: the last page of {HOT_TICKER}'s predictions starts after "
              + ", ".join(f"{depth:,} rows ({timeframe})" for timeframe, depth in paths.depths.items()))
    figures = {}
    for index, name in enumerate(FIGURES):
        print(f"  {name} ...", flush=True)
        figures[name] = side_by_side({stage: plan[index] for stage, plan in plans.items()}, use_stage)
    return figures


def show_plans(paths: HotPaths) -> None:
    """One more call of each hot path, recorded; then the plan each prepared statement now runs with."""
    from candlecast import db
    from infra.plans import explain_prepared, recording

    get_call, get_before = paths.get_by_id(paths.sample_ids(5))
    calls = [
        ("create, new unkeyed", paths.create_new_unkeyed, paths.forget_twin),
        ("create, new keyed", paths.create_new_keyed, None),
        ("create, repeat (database)", paths.repeat, paths.forget_cached_repeat),
        ("GET by id", get_call, get_before),
        ("recent, timeframe=1h", paths.recent("1h"), None),
        ("recent, no timeframe", paths.recent(None), None),
        ("recent, 1h, last page", paths.recent("1h", deepest=True), None),
        ("recent, no timeframe, last page", paths.recent(None, deepest=True), None),
        ("search exact", *paths.search("BTCUSDT")),
        ("search prefix", *paths.search("b")),
    ]
    seen: set[str] = set()
    for label, call, before in calls:
        if label in ("recent, no timeframe", "recent, no timeframe, last page", "search prefix"):
            seen.clear()  # the same statement as the line before, with other values: show it again
        if before is not None:
            before()
        with recording() as executed:
            call()
        with db.connection() as conn:
            for statement in executed:
                if statement.query in seen or not statement.params:
                    continue
                seen.add(statement.query)
                prepared = explain_prepared(conn, statement)
                first_line = " ".join(statement.query.split())[:110]
                print(f"\n  [{label}] {first_line} ...")
                if prepared is None:
                    print("    (not prepared on this connection)")
                    continue
                print(f"    prepared as {prepared.name}: {prepared.generic_plans} generic / "
                      f"{prepared.custom_plans} custom plans so far")
                print("    " + prepared.plan.replace("\n", "\n    "))


def retention_figures(loader: Loader, symbol_ids: tuple[int, int, int]) -> None:
    """The scheduled function's service at the largest stage: delete rate, then what the space does."""
    from candlecast.config import get_settings

    try:
        from candlecast.services import retention
    except ImportError:
        print("  (no retention in this version)")
        return
    conn = loader.conn
    before = sizes(conn)
    started = time.perf_counter()
    from candlecast import db

    with db.batch(60.0):  # the Retention function's DB_STATEMENT_TIMEOUT, not a request's 1 s
        report = retention.run(budget_seconds=3600, retention_days=330)
    elapsed = time.perf_counter() - started
    deleted = report["deleted"]
    report_line(f"deleted {deleted:,} predictions (+{deleted * 30:,} steps)", f"{elapsed:.1f} s",
                f"{deleted / elapsed:,.0f} predictions/s, {report['batches']} transactions of at most "
                f"{get_settings().retention_batch_size:,}")
    after_delete = sizes(conn)
    started = time.perf_counter()
    conn.execute("VACUUM predictions, prediction_steps")
    vacuum_seconds = time.perf_counter() - started
    after_vacuum = sizes(conn)
    loader.grow(loader.loaded + deleted, *symbol_ids)
    after_refill = sizes(conn)
    print(f"  relation sizes: before delete -> after delete -> after VACUUM ({vacuum_seconds:.0f} s) -> "
          f"after {deleted:,} new predictions")
    for name in before:
        report_line(name, " -> ".join(megabytes(size[name]) for size in (before, after_delete, after_vacuum,
                                                                           after_refill)))


def main() -> int:
    print(f"candlecast bench-scale: {', '.join(f'{n:,}' for n in STAGES)} predictions x 30 steps, one database each, "
          f"{SYMBOLS:,} symbols; PostgreSQL data under {tempfile.gettempdir()}")
    os.environ["DB_POOL_MAX_SIZE"] = "1"  # one pooled connection: the one whose prepared statements we inspect
    with seeded_stack("candlecast-bench-scale") as stack:
        template = Loader(stack.database_url, embedded=stack.postgres is not None)
        hot_id = template.conn.execute("SELECT id FROM symbols WHERE ticker = %s", (HOT_TICKER,)).fetchone()[0]
        symbol_ids = (hot_id, *template.symbols(SYMBOLS))
        print(f"  {SYMBOLS:,} symbols loaded in {template.seconds:.1f} s")
        template.conn.close()
        urls, loaders = {}, {}
        for stage in STAGES:
            urls[stage] = copy_database(stack.database_url, f"bench_{stage}")
            loaders[stage] = Loader(urls[stage], embedded=stack.postgres is not None)
            print(f"\n== {stage:,} predictions ({stage * 30:,} steps)")
            elapsed = loaders[stage].grow(stage, *symbol_ids)
            print(f"  loaded in {elapsed:.1f} s; database {megabytes(database_size(loaders[stage].conn))}")
        with stage_pools(urls) as use_stage:
            stages = {stage: HotPaths(urls[stage]) for stage in STAGES}
            print("\nmeasuring, stages side by side:")
            results = measure(stages, use_stage)
            total = sum(loader.seconds for loader in loaders.values())
            print(f"\nload: {total:.0f} s in all; databases "
                  f"{', '.join(megabytes(database_size(loaders[n].conn)) for n in STAGES)}; "
                  f"data directory {du(stack)}")
            summary(results)
            largest = STAGES[-1]
            use_stage(largest)
            print(f"\nplans at {largest:,} predictions, through the pool's connection (EXPLAIN ANALYZE EXECUTE of "
                  "the prepared statement: the plan its next execution uses; writes EXPLAINed only)")
            show_plans(stages[largest])
            print(f"\nretention at {largest:,} predictions: keep 330 days (deletes the oldest ~10 %)")
            retention_figures(loaders[largest], symbol_ids)
    return 0


def database_size(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]


def du(stack: LocalStack) -> str:
    if stack.postgres is None:
        return "(external database)"
    result = subprocess.run(["du", "-sh", str(stack.postgres.data_dir)], capture_output=True, text=True)
    return result.stdout.split()[0] if result.returncode == 0 else "?"


def summary(results: dict[str, dict[int, list[float]]]) -> None:
    first, last = STAGES[0], STAGES[-1]
    header = " | ".join(f"{n:,}: p50 / p99" for n in STAGES)
    print(f"\n| hot path | {header} | {last:,} / {first:,} (p50) |")
    print("|---" * (len(STAGES) + 2) + "|")
    for name in FIGURES:
        figure = results[name]
        cells = " | ".join(f"{percentile(figure[n], 0.5):.2f} / {percentile(figure[n], 0.99):.2f} ms" for n in STAGES)
        ratio = percentile(figure[last], 0.5) / percentile(figure[first], 0.5)
        print(f"| {name} | {cells} | {ratio:.2f}x |")
    runs = min(len(samples) for figure in results.values() for samples in figure.values())
    print(f"(at least {runs} timed runs per cell, after {WARM_UP} untimed)")
    print("targets: every p50 at the largest stage within 1.5x of the smallest; create p50 <= 5 ms at 1M")


if __name__ == "__main__":
    sys.exit(main())
