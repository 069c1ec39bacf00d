"""`python -m infra.bench_score`: the Score function's cost per batch at 100k and 1M stored predictions.

Each stage is a database of its own: 1h predictions spread over the year before the sample's last candle
(`NOW`), on the sample's 1h series, loaded with generate_series. Every step that matured before the last hour
is already scored and each prediction's next look (`score_next_at`) set, as the hourly runs leave them (scores
are loaded for the 45-day scoring window only; older score rows would only deepen the primary key). Then
`scoring.run`, the Score function's own code, scores the last hour's matured steps at `NOW` in batches of 200,
through the committed model and the stored candles.

Prints per batch: the due query, the Python scoring and the insert of the scores, medians over rounds that
take turns between the stages; then the due query's plan as the pool's connection runs it (prepared, with
its generic/custom counts) at the largest stage. Asserts nothing. Heavy (≈ 2.5 GB at 1M): not in `make test`.
BENCH_SCORE_STAGES=20000,100000 runs smaller stages; the data directory lives under TMPDIR.
"""

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from infra.bench_stages import STEPS_OF_NEW_SQL, copy_database, stage_pools
from infra.local_stack import ROOT, seeded_stack

STAGES = tuple(int(n) for n in os.environ.get("BENCH_SCORE_STAGES", "100000,1000000").split(","))
ROUNDS = 5
CHUNK = 50_000  # predictions per loading statement
HISTORY = timedelta(days=365)

_GROW_SQL = """
WITH new AS (
    INSERT INTO predictions (symbol_id, ticker, timeframe, model_id, last_candle_at, last_close, horizon,
                             request_hash, created_at)
    SELECT s.id, s.ticker, '1h', m.id, date_trunc('hour', g.created_at) - interval '1 hour', 100, 30,
           md5('bench-score-' || g.i), g.created_at
    FROM (SELECT i, %(now)s::timestamptz - %(history)s::interval + (i + 1) * %(spacing)s::interval AS created_at,
                 (%(tickers)s::text[])[1 + i %% %(series)s] AS ticker
          FROM generate_series(%(start)s, %(stop)s - 1) i) g
    JOIN symbols s ON s.ticker = g.ticker
    JOIN models m ON m.timeframe = '1h' AND m.is_active
    RETURNING id, last_candle_at
)""" + STEPS_OF_NEW_SQL

# What the hourly runs before NOW left: every step in the scoring window up to the last hour scored.
_SCORED_BEFORE_SQL = """
INSERT INTO prediction_scores (prediction_id, step, model_id, ts, realised_close, inside_80, inside_95, confidence,
                               event, pinball, baseline_pinball, in_sample)
SELECT ps.prediction_id, ps.step, p.model_id, ps.ts, 100, true, true, 0.5, true, 1, 1, false
FROM prediction_steps ps JOIN predictions p ON p.id = ps.prediction_id
WHERE ps.ts > %(now)s::timestamptz - interval '45 days' AND ps.ts < %(now)s
"""

# ... and when each prediction is next due: its step at NOW, or never (every step scored or given up).
_NEXT_SQL = """
UPDATE predictions SET score_next_at = CASE WHEN last_candle_at + interval '30 hours' >= %(now)s
                                            THEN %(now)s ELSE 'infinity'::timestamptz END
WHERE %(all)s OR last_candle_at + interval '30 hours' >= %(now)s
"""


def sample_series() -> tuple[datetime, list[str]]:
    """The sample's last 1h candle and the tickers whose 1h file reaches it."""
    from candlecast.forecast.dataset import read_ohlcv
    from candlecast.tickers import normalize_ticker

    ends = {path.parent.name: int(read_ohlcv(path).open_time[-1]) for path in (ROOT / "data").glob("*/1h.parquet")}
    last = max(ends.values())
    return datetime.fromtimestamp(last, UTC), sorted(normalize_ticker(name) for name, end in ends.items()
                                                     if end == last)


def load(url: str, count: int, now: datetime, tickers: list[str]) -> float:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET session_replication_role = replica")  # generated rows reference existing rows
        os.setpriority(os.PRIO_PROCESS, conn.info.backend_pid, 19)
        for start in range(0, count, CHUNK):
            conn.execute(_GROW_SQL, {"now": now, "history": HISTORY, "spacing": HISTORY / count, "tickers": tickers,
                                     "series": len(tickers), "start": start, "stop": min(count, start + CHUNK)})
            print(f"\r  loading predictions: {min(count, start + CHUNK):>9,} / {count:,}", end="", flush=True)
        print()
        conn.execute(_SCORED_BEFORE_SQL, {"now": now})
        conn.execute(_NEXT_SQL, {"now": now, "all": True})
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def forget_the_hour(url: str, now: datetime) -> None:
    """Undo a measured run: the hour's scores and the sums they made (only that run wrote them)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM prediction_scores WHERE ts >= %s", (now,))
        conn.execute("DELETE FROM live_outcomes WHERE ts >= %s", (now,))
        conn.execute(_NEXT_SQL, {"now": now, "all": False})
        conn.execute("DELETE FROM model_live_stats")
        conn.execute("DELETE FROM model_live_days")
        conn.execute("UPDATE models SET accuracy = NULL")


class Timed:
    """Wall time of the repository calls scoring.run makes, per call; with `tally`, the sum of tally(result)."""

    def __init__(self, module, name: str, tally: Callable[[Any], int] | None = None):
        self.module, self.name, self.original = module, name, getattr(module, name)
        self.seconds: list[float] = []
        self.tally, self.total = tally, 0

    def __enter__(self) -> "Timed":
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                result = self.original(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - started)
            if self.tally is not None:
                self.total += self.tally(result)
            return result

        setattr(self.module, self.name, timed)
        return self

    def __exit__(self, *_) -> None:
        setattr(self.module, self.name, self.original)


def one_run(now: datetime) -> dict:
    from candlecast.services import scoring

    batches: list[float] = []
    last = [time.perf_counter()]

    def on_batch(_report) -> None:
        clock = time.perf_counter()
        batches.append(clock - last[0])
        last[0] = clock

    with Timed(scoring.score_repository, "get_due_predictions") as due, \
            Timed(scoring.score_repository, "record_scores") as record:
        report = scoring.run(float("inf"), now=now, since=now - scoring.SCORING_WINDOW, on_batch=on_batch)
    n = report.batches
    return {"predictions": report.predictions, "scored": report.scored, "batches": n, "seconds": report.seconds,
            "batch": statistics.median(batches) if batches else 0.0,
            "due": statistics.median(due.seconds[:n]) if n else 0.0,
            "record": statistics.median(record.seconds) if record.seconds else 0.0,
            "last_due": due.seconds[-1]}


def main() -> int:
    os.environ["DB_POOL_MAX_SIZE"] = "1"  # the one connection whose prepared statements we inspect
    os.environ["DB_STATEMENT_TIMEOUT"] = "60"  # as the Score function has it (template.yaml)
    load_avg = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"candlecast bench-score: {', '.join(f'{n:,}' for n in STAGES)} predictions x 30 steps (1h), one database "
          f"each; PostgreSQL data under {tempfile.gettempdir()}; load average {load_avg}")
    with seeded_stack("candlecast-bench-score") as stack:
        from candlecast import db
        from candlecast.repositories import scores as score_repository

        now, tickers = sample_series()
        print(f"NOW = {now:%Y-%m-%dT%H:%MZ} (the sample's last 1h candle), {len(tickers)} series")
        urls = {}
        for stage in STAGES:
            urls[stage] = copy_database(stack.database_url, f"score_{stage}")
            print(f"== {stage:,} predictions")
            seconds = load(urls[stage], stage, now, tickers)
            with psycopg.connect(urls[stage]) as conn:
                scored, size = conn.execute("SELECT (SELECT count(*) FROM prediction_scores), "
                                            "pg_size_pretty(pg_database_size(current_database()))").fetchone()
            print(f"  loaded in {seconds:.0f} s: {stage * 30:,} steps, {scored:,} already scored; database {size}")

        with stage_pools(urls) as use_stage:
            results: dict[int, list[dict]] = {stage: [] for stage in STAGES}
            for _ in range(ROUNDS):  # the stages take turns, so a noisy neighbour slows each alike
                for stage in STAGES:
                    use_stage(stage)
                    results[stage].append(one_run(now))
                    forget_the_hour(urls[stage], now)
            print(f"\nscoring.run at NOW, batches of {200}: medians of {ROUNDS} runs per stage (stages in turns); "
                  f"load average now {', '.join(f'{value:.1f}' for value in os.getloadavg())}")
            print(f"  {'stored':>10} {'due preds':>9} {'steps':>6} {'batches':>7} {'run s':>7} {'per batch ms':>12} "
                  f"{'due query ms':>12} {'insert ms':>9} {'python ms':>9} {'empty due ms':>12}")
            for stage, runs in results.items():
                med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                python = med["batch"] - med["due"] - med["record"]
                print(f"  {stage:>10,} {med['predictions']:>9,.0f} {med['scored']:>6,.0f} {med['batches']:>7.0f} "
                      f"{med['seconds']:>7.2f} {1000 * med['batch']:>12.1f} {1000 * med['due']:>12.1f} "
                      f"{1000 * med['record']:>9.1f} {1000 * python:>9.1f} {1000 * med['last_due']:>12.1f}")

            from infra.plans import explain_prepared, recording

            largest = STAGES[-1]
            use_stage(largest)
            with recording() as executed:
                one_run(now)
            due = next(item for item in executed if item.query == score_repository._DUE)
            forget_the_hour(urls[largest], now)  # so the explained first batch finds the hour's steps due again
            with db.connection() as conn:
                for generic in (False, True):
                    plan = explain_prepared(conn, due, force_generic=generic)
                    label = "forced generic plan" if generic else "the plan the next execution uses"
                    if plan is None:
                        print(f"\ndue query at {largest:,}: not prepared on the pool's connection")
                        break
                    print(f"\ndue query at {largest:,}, {label} ({plan.generic_plans} generic / "
                          f"{plan.custom_plans} custom so far), first batch:\n{plan.plan}")
            forget_the_hour(urls[largest], now)
    return 0


if __name__ == "__main__":
    sys.exit(main())
