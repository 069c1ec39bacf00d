"""`make bench-score-year`: the Score function's code (`scoring.run`) on a production-shaped year of predictions.

On the local stack (embedded PostgreSQL, moto S3): 150 synthetic symbols with production-length candle files
(1h 730 days, 1d 3650 days, resampled to 4h, 1w and 1m) ending at the last weekly refresh (Monday 00:30 UTC
before NOW), recorded as the refresh records them (symbols.metadata candle_timeframes and candles_through);
30 symbols without files (served live: outside the top N, or delisted); --predictions predictions (default
33,333, i.e. 1M steps) of 30 steps created over the year before NOW, mixed over 1h/4h/1d/1w/1m. Then times
(1) the first run over the whole table (every score_next_at NULL: the first run after migration 0006, or any
backlog) and (2) the next two hourly runs with no new candles, each printing predictions looked at, steps
scored, batches, run time, per-batch medians (due query / record / schedule), candle files read from S3 and
peak RSS. Asserts nothing; not part of `make test`.

`--compare REVISION` (`make bench-score-backlog`, on 1M predictions) times the first run's backlog instead:
REVISION's scoring code on its own schema for --budget seconds, then this checkout's on the same predictions,
and prints each one's predictions/s and whether the track-record tables they left are identical.

State (PostgreSQL data, the S3 bucket) is kept under .local/bench-score-year and reused, reset to its state
before any scoring (the track-record tables emptied, every score_next_at NULL); --rebuild builds it again.
"""

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg

from infra.bench_score import Timed
from infra.local_stack import ROOT, seeded_stack

STATE = ROOT / ".local" / "bench-score-year"
BUCKET = "candlecast-bench-score-year"
SYMBOLS_WITH_FILES, SYMBOLS_NO_FILE = 150, 30
MIX = {"1h": 0.35, "4h": 0.20, "1d": 0.25, "1w": 0.12, "1m": 0.08}
VOL = {"1h": 0.008, "4h": 0.016, "1d": 0.04, "1w": 0.10, "1m": 0.20}  # per-candle log-price volatility
SOURCES = {"1h": (730, 3600, ("4h",)), "1d": (3650, 86400, ("1w", "1m"))}  # days, seconds a candle, resampled to
YEAR = timedelta(days=365)
STEPS = 30


def tickers() -> tuple[list[str], list[str]]:
    return ([f"X:SYN{i:03d}USD" for i in range(SYMBOLS_WITH_FILES)],
            [f"X:NOF{i:03d}USD" for i in range(SYMBOLS_NO_FILE)])


def last_refresh(now: datetime) -> datetime:
    """The weekly refresh before `now`: Monday 00:30 UTC."""
    monday = (now - timedelta(days=now.weekday())).replace(hour=0, minute=30, second=0, microsecond=0)
    return monday if monday <= now else monday - timedelta(weeks=1)


def synthetic_files(end: datetime, rng: np.random.Generator) -> dict:
    """{timeframe: Candles} of one symbol: random walks of production length whose last candle closed by `end`."""
    from candlecast.candles import Candles
    from candlecast.forecast.dataset import resample

    files, end_ts = {}, int(end.timestamp())
    for source, (days, step, targets) in SOURCES.items():
        last_open = (end_ts - step) - (end_ts - step) % step
        n = days * 86400 // step
        sigma = VOL[source]
        close = np.exp(np.log(100) + np.cumsum(rng.normal(0, sigma, n)))
        open_ = np.r_[close[0], close[:-1]]
        candles = Candles(open_time=(last_open - step * np.arange(n)[::-1]).astype(np.int64), open=open_,
                          high=np.maximum(open_, close) * (1 + np.abs(rng.normal(0, sigma / 2, n))),
                          low=np.minimum(open_, close) * (1 - np.abs(rng.normal(0, sigma / 2, n))),
                          close=close, volume=rng.uniform(1e3, 1e6, n))
        files[source] = candles
        for target in targets:
            files[target] = resample(candles, source, target)
    return files


def draw_predictions(count: int, now: datetime) -> list[dict]:
    """`count` predictions over the year before `now`, each on the candle before the one it was made in."""
    from candlecast.timeframes import add_steps, bucket_start

    draw = random.Random(7)
    everyone = [ticker for group in tickers() for ticker in group]
    predictions = []
    for i in range(count):
        timeframe = draw.choices(list(MIX), list(MIX.values()))[0]
        created = now - timedelta(seconds=draw.uniform(0, YEAR.total_seconds()))
        predictions.append({"id": uuid.UUID(int=draw.getrandbits(128), version=4), "ticker": draw.choice(everyone),
                            "timeframe": timeframe, "created_at": created, "close": 100.0,
                            "last_candle_at": add_steps(bucket_start(created, timeframe), timeframe, -1),
                            "hash": f"bench-score-year-{i}"})
    return predictions


def add_symbols(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.cursor().executemany("INSERT INTO symbols (ticker, name, base_currency, quote_currency) "
                                  "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                                  [(t, t[2:], t[2:-3], "USD") for group in tickers() for t in group])


def write_symbol_files(predictions: list[dict], now: datetime) -> None:
    """Each symbol's files into S3 and what the refresh records of them; the predictions on them get their
    last candle's close. One symbol's files in memory at a time."""
    from candlecast import ingest, storage

    end, rng = last_refresh(now), np.random.default_rng(1)
    by_series: dict[tuple[str, str], list[dict]] = {}
    for prediction in predictions:
        by_series.setdefault((prediction["ticker"], prediction["timeframe"]), []).append(prediction)
    with_files = tickers()[0]
    for done, ticker in enumerate(with_files, 1):
        files = synthetic_files(end, rng)
        for timeframe, candles in files.items():
            storage.write_candles(ticker, timeframe, candles)
            for prediction in by_series.get((ticker, timeframe), []):
                at = int(prediction["last_candle_at"].timestamp())
                pos = np.searchsorted(candles.open_time, at)
                if pos < len(candles) and candles.open_time[pos] == at:
                    prediction["close"] = float(candles.close[pos])
        ingest.record_candle_timeframes(ticker, {tf: int(c.open_time[-1]) for tf, c in files.items()})
        if done % 10 == 0 or done == len(with_files):
            print(f"\r  symbols with files: {done:>4} / {len(with_files)}", end="", flush=True)
    print()


_STEPS_SQL = """
INSERT INTO prediction_steps (prediction_id, step, ts, open, high, low, close, lower_80, upper_80, lower_95,
                              upper_95, confidence)
SELECT p.id, k, p.last_candle_at + k * v.step, p.last_close, b.u80, b.l80, p.last_close, b.l80, b.u80, b.l95, b.u95,
       p.confidence
FROM (SELECT id, timeframe, last_candle_at, last_close, (get_byte(decode(md5(request_hash), 'hex'), 0) + 0.5) / 256
             * 0.9 + 0.05 AS confidence
      FROM predictions WHERE request_hash LIKE 'bench-score-year-%%' AND timeframe = %(timeframe)s) p
JOIN (VALUES ('1h', interval '1 hour', 0.008::float8), ('4h', interval '4 hours', 0.016),
             ('1d', interval '1 day', 0.04), ('1w', interval '1 week', 0.10),
             ('1m', interval '1 month', 0.20)) v(timeframe, step, sigma)
     USING (timeframe)
CROSS JOIN generate_series(1, 30) k
CROSS JOIN LATERAL (SELECT p.last_close * exp(-1.96 * v.sigma * sqrt(k)) AS l95,
                           p.last_close * exp(-1.2816 * v.sigma * sqrt(k)) AS l80,
                           p.last_close * exp(1.2816 * v.sigma * sqrt(k)) AS u80,
                           p.last_close * exp(1.96 * v.sigma * sqrt(k)) AS u95) b
"""


def load_predictions(url: str, predictions: list[dict]) -> None:
    """COPY the predictions; their steps (quantiles widening with the square root of the step) are generated in
    SQL, one timeframe at a time, with prediction_steps' secondary indexes built once afterwards."""
    from infra.bench_scale import Loader

    with psycopg.connect(url, autocommit=True) as conn:
        symbol = dict(conn.execute("SELECT ticker, id FROM symbols").fetchall())
        model = dict(conn.execute("SELECT timeframe, id FROM models WHERE is_active").fetchall())
        with conn.cursor() as cur, cur.copy("COPY predictions (id, symbol_id, ticker, timeframe, model_id, "
                                            "last_candle_at, last_close, horizon, request_hash, created_at) "
                                            "FROM STDIN") as copy:
            for p in predictions:
                copy.write_row((p["id"], symbol[p["ticker"]], p["ticker"], p["timeframe"], model[p["timeframe"]],
                                p["last_candle_at"], p["close"], STEPS, p["hash"], p["created_at"]))
    loader = Loader(url, embedded=False)
    try:
        loader.conn.execute("SET TimeZone = 'UTC'")  # calendar months in UTC, as timeframes.add_steps
        saved = loader._drop_step_indexes()
        for timeframe in MIX:
            started = time.perf_counter()
            count = loader.conn.execute(_STEPS_SQL, {"timeframe": timeframe}).rowcount
            print(f"  {timeframe} steps: {count:,} in {time.perf_counter() - started:.0f} s", flush=True)
        loader._restore(saved)
        loader.conn.execute("SET session_replication_role = origin")
        loader.conn.execute("VACUUM (ANALYZE) predictions, prediction_steps")
        loader.conn.execute("CREATE TABLE bench_base_accuracy AS SELECT id, accuracy FROM models")
    finally:
        loader.conn.close()


def reset(url: str) -> None:
    """The database as built, before any scoring: cheaper than a copy of it (two of 6 GB at 1M)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE prediction_scores, live_outcomes, model_live_stats, model_live_days")
        conn.execute("UPDATE predictions SET score_next_at = NULL WHERE score_next_at IS NOT NULL")
        conn.execute("UPDATE models m SET accuracy = b.accuracy FROM bench_base_accuracy b WHERE b.id = m.id")
        conn.execute("VACUUM (ANALYZE) predictions, prediction_scores, live_outcomes, model_live_stats, "
                     "model_live_days")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_run(label: str, now: datetime, scoring=None, budget: float = float("inf"), last_id=None, after=None,
              batch: int | None = None):
    """scoring.run (this checkout's, or `scoring` given) at `now`, from `after` if given, with its figures printed;
    with `last_id` it stops after that prediction (the due query answers nothing past it)."""
    from candlecast import storage

    if scoring is None:
        from candlecast.services import scoring
    batches, last = [], [time.perf_counter()]

    def on_batch(_report) -> None:
        clock = time.perf_counter()
        batches.append(clock - last[0])
        last[0] = clock

    def milliseconds(timed: Timed) -> str:
        return f"{1000 * statistics.median(timed.seconds):.0f} ms" if timed.seconds else "-"

    repository = scoring.score_repository
    original, passed = repository.get_due_predictions, [False]

    def due_until_last(conn, now, after, limit):
        due = [] if passed[0] else original(conn, now, after, limit)
        for position, prediction in enumerate(due):
            if prediction["id"] == last_id:
                passed[0] = True
                return due[:position + 1]
        return due

    if last_id is not None:
        repository.get_due_predictions = due_until_last
    try:
        with Timed(repository, "get_due_predictions") as due, Timed(repository, "record_scores") as record, \
                Timed(repository, "schedule_next") as schedule, Timed(storage, "read_all_candles") as files, \
                Timed(storage, "get_bytes", tally=lambda data: len(data or b"")) as s3:
            report = scoring.run(budget, now=now, on_batch=on_batch, **({"after": after} if after else {}),
                                 **({"batch": batch} if batch else {}))
    finally:
        repository.get_due_predictions = original
    print(f"\n== {label}, now = {now:%Y-%m-%d %H:%M}Z")
    print(f"  predictions looked at {report.predictions:,}, steps newly scored {report.scored:,}, unmatured "
          f"{report.unmatured:,}, failed {len(report.failed)}; {report.batches} batches in {report.seconds:.1f} s"
          f" ({report.predictions / max(report.seconds, 1e-9):,.0f} predictions/s)")
    if batches:
        print(f"  per batch: median {statistics.median(batches):.2f} s, max {max(batches):.2f} s; medians: due query "
              f"{milliseconds(due)} (max {1000 * max(due.seconds):.0f} ms), record {milliseconds(record)}, "
              f"schedule {milliseconds(schedule)}")
    print(f"  candle files read from S3: {len(files.seconds):,} ({s3.total / 1e6:,.1f} MB read in "
          f"{sum(s3.seconds):.1f} s); peak RSS {peak_rss_mb():.0f} MB")
    return report


def code_at(revision: str):
    """`revision`'s services/scoring.py with its repositories/scores.py, as modules (the rest is this checkout's)."""
    import subprocess
    import types

    def module(path: str, name: str) -> types.ModuleType:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:layers/common/candlecast/{path}"],
                                check=True, capture_output=True, text=True).stdout
        loaded = types.ModuleType(name)
        exec(compile(source, f"{revision}:{path}", "exec"), loaded.__dict__)  # noqa: S102 (our own history)
        return loaded

    scoring = module("services/scoring.py", "scoring_at_revision")
    scoring.score_repository = module("repositories/scores.py", "scores_at_revision")
    return scoring


# What a run leaves, compared old against new (the columns a clock sets are left out).
_OUTCOME_TABLES = {
    "prediction_scores": "prediction_id, step, model_id, ts, realised_close, inside_80, inside_95, confidence, event, "
                         "pinball, baseline_pinball, in_sample",
    "live_outcomes": "model_id, ticker, timeframe, origin_at, step, ts",
    "model_live_stats": "model_id, in_sample, horizon, confidence_bin, n, inside_80, inside_95, events, "
                        "confidence_sum, pinball_sum, baseline_pinball_sum, first_ts, last_ts",
    "predictions": "id, score_next_at",
    "models": "id, accuracy",
}


def keep_outcomes(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for table, columns in _OUTCOME_TABLES.items():
            conn.execute(f"DROP TABLE IF EXISTS bench_old_{table}")
            conn.execute(f"CREATE TABLE bench_old_{table} AS SELECT {columns} FROM {table}")


def compare_outcomes(url: str) -> bool:
    """Prints, per table, the rows the old run left and how many differ in the new run's (either way)."""
    same = True
    with psycopg.connect(url, autocommit=True) as conn:
        for table, columns in _OUTCOME_TABLES.items():
            rows, differ = conn.execute(
                f"SELECT (SELECT count(*) FROM bench_old_{table}), (SELECT count(*) FROM "
                f"((SELECT * FROM bench_old_{table} EXCEPT ALL SELECT {columns} FROM {table}) UNION ALL "
                f"(SELECT {columns} FROM {table} EXCEPT ALL SELECT * FROM bench_old_{table})) d)").fetchone()
            print(f"  {table}: {rows:,} rows after the old run, {differ:,} differ after the new one")
            same &= differ == 0
            conn.execute(f"DROP TABLE bench_old_{table}")
    return same


def pending_since(revision: str) -> list[str]:
    """The migrations in this checkout that `revision` does not have."""
    import subprocess

    listed = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{revision}:migrations"],
                            check=True, capture_output=True, text=True).stdout.split()
    return sorted(path.name[:-4] for path in (ROOT / "migrations").glob("*.sql")
                  if not path.name.endswith(".rollback.sql") and path.name not in listed)


def compare(url: str, now: datetime, revision: str, budget: float, batch: int | None = None) -> None:
    """Old (`revision`'s code and schema) against new on the same backlog: the old code for `budget` seconds,
    then this checkout's on the same predictions, each from the state before scoring. Both start at the first
    symbol with files (in series order the symbols without come first, and cost no scoring)."""
    from candlecast import db, migrate

    after = (tickers()[0][0], "", uuid.UUID(int=0))

    newer = pending_since(revision)
    if newer:
        migrate.rollback(url, len(newer))
        print(f"  rolled back for the old run: {', '.join(newer)}")
    old = timed_run(f"old ({revision}), backlog for {budget:.0f} s", now, code_at(revision), budget, after=after)
    db.close_pool()
    keep_outcomes(url)
    reset(url)
    if newer:
        started = time.perf_counter()
        migrate.apply(url)
        print(f"  applied {', '.join(newer)} in {time.perf_counter() - started:.1f} s")
    last_id = uuid.UUID(old.continuation["after"][2]) if old.continuation else None
    new = timed_run(f"new (this checkout), the same predictions{f', batches of {batch}' if batch else ''}", now,
                    last_id=last_id, after=after, batch=batch)
    db.close_pool()
    same = compare_outcomes(url)
    print(f"\nbacklog throughput: old {old.predictions / old.seconds:,.0f} predictions/s, new "
          f"{new.predictions / new.seconds:,.0f} predictions/s ({old.seconds / new.seconds:.1f}x); "
          f"outcomes {'identical' if same else 'DIFFER'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.bench_score_year", description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", type=int, default=33_333, help="predictions of 30 steps (default 33,333)")
    parser.add_argument("--rebuild", action="store_true", help=f"build the state under {STATE} again")
    parser.add_argument("--compare", metavar="REVISION", help="the first run's backlog, REVISION's code (and schema) "
                        "against this checkout's on the same predictions, instead of the three runs")
    parser.add_argument("--budget", type=float, default=120, help="seconds of the old code's run (--compare)")
    parser.add_argument("--batch", type=int, help="predictions a batch in the new code's run (--compare; default "
                        "scoring.BATCH_PREDICTIONS)")
    args = parser.parse_args(argv)
    marker = STATE / "built.json"
    built = json.loads(marker.read_text()) if marker.exists() else None
    if built and built["predictions"] != args.predictions:
        print(f"{STATE} holds {built['predictions']:,} predictions, not {args.predictions:,}: rebuilding")
    if args.rebuild or (built and built["predictions"] != args.predictions):
        shutil.rmtree(STATE, ignore_errors=True)
        built = None
    os.environ["DB_STATEMENT_TIMEOUT"] = "60"  # as the Score function has it (template.yaml)
    print(f"candlecast bench-score-year: {args.predictions:,} predictions x {STEPS} steps over a year, "
          f"{SYMBOLS_WITH_FILES} symbols with files + {SYMBOLS_NO_FILE} without; state under {STATE}; "
          f"load average {', '.join(f'{value:.1f}' for value in os.getloadavg())}")
    with seeded_stack(BUCKET, state_dir=STATE) as stack:
        from candlecast import db

        if built is None:
            started = time.perf_counter()
            now = datetime.now(UTC).replace(minute=5, second=0, microsecond=0)
            predictions = draw_predictions(args.predictions, now)
            add_symbols(stack.database_url)
            write_symbol_files(predictions, now)
            db.close_pool()
            load_predictions(stack.database_url, predictions)
            del predictions
            built = {"now": now.isoformat(), "predictions": args.predictions}
            marker.write_text(json.dumps(built))
            print(f"  built in {time.perf_counter() - started:.0f} s")
        else:
            reset(stack.database_url)
        now = datetime.fromisoformat(built["now"])
        with psycopg.connect(stack.database_url) as conn:
            mix, steps, size = conn.execute(
                "SELECT (SELECT string_agg(timeframe || ' ' || n, ', ' ORDER BY timeframe) FROM "
                "(SELECT timeframe, count(*) n FROM predictions GROUP BY 1) t), "
                "(SELECT count(*) FROM prediction_steps), pg_size_pretty(pg_database_size(current_database()))"
            ).fetchone()
        print(f"NOW = {now:%Y-%m-%dT%H:%MZ}, files through {last_refresh(now):%Y-%m-%dT%H:%MZ}; predictions {mix}; "
              f"{steps:,} steps; database {size}; peak RSS before scoring {peak_rss_mb():.0f} MB")
        if args.compare:
            compare(stack.database_url, now, args.compare, args.budget, args.batch)
        else:
            timed_run("first run (every prediction's score_next_at NULL)", now)
            timed_run("next hourly run, no new candles", now + timedelta(hours=1))
            timed_run("and the one after", now + timedelta(hours=2))
        db.close_pool()
    return 0


if __name__ == "__main__":
    sys.exit(main())
