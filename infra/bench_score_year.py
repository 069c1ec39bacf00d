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

State (PostgreSQL data, the S3 bucket) is kept under .local/bench-score-year and reused, restored to its state
before any scoring; --rebuild builds it again.
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
from psycopg.conninfo import make_conninfo

from infra.bench_score import Timed
from infra.bench_stages import copy_database
from infra.local_stack import ROOT, seeded_stack

STATE = ROOT / ".local" / "bench-score-year"
BUCKET = "candlecast-bench-score-year"
SNAPSHOT = "bench_score_year_base"  # the database as built, before any scoring
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
                            "confidence": draw.uniform(0.05, 0.95), "hash": f"bench-score-year-{i}"})
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


def load_predictions(url: str, predictions: list[dict]) -> None:
    """COPY the predictions and their steps (quantiles widening with the square root of the step)."""
    from candlecast.timeframes import add_steps

    with psycopg.connect(url, autocommit=True) as conn:
        symbol = dict(conn.execute("SELECT ticker, id FROM symbols").fetchall())
        model = dict(conn.execute("SELECT timeframe, id FROM models WHERE is_active").fetchall())
        with conn.cursor() as cur:
            with cur.copy("COPY predictions (id, symbol_id, ticker, timeframe, model_id, last_candle_at, last_close, "
                          "horizon, request_hash, created_at) FROM STDIN") as copy:
                for p in predictions:
                    copy.write_row((p["id"], symbol[p["ticker"]], p["ticker"], p["timeframe"], model[p["timeframe"]],
                                    p["last_candle_at"], p["close"], STEPS, p["hash"], p["created_at"]))
            with cur.copy("COPY prediction_steps (prediction_id, step, ts, open, high, low, close, lower_80, "
                          "upper_80, lower_95, upper_95, confidence) FROM STDIN") as copy:
                for done, p in enumerate(predictions, 1):
                    close, sigma = p["close"], VOL[p["timeframe"]]
                    for k in range(1, STEPS + 1):
                        l95, l80, u80, u95 = (close * np.exp(z * sigma * k ** 0.5) for z in (-1.96, -1.2816,
                                                                                             1.2816, 1.96))
                        copy.write_row((p["id"], k, add_steps(p["last_candle_at"], p["timeframe"], k), close, u80,
                                        l80, close, l80, u80, l95, u95, p["confidence"]))
                    if done % 1000 == 0 or done == len(predictions):
                        print(f"\r  predictions: {done:>9,} / {len(predictions):,}", end="", flush=True)
        print()
        conn.execute("ANALYZE")


def restore(url: str) -> None:
    """The database as built (SNAPSHOT), before any scoring."""
    with psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS candlecast WITH (FORCE)")
    copy_database(make_conninfo(url, dbname=SNAPSHOT), "candlecast")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_run(label: str, now: datetime) -> None:
    from candlecast import storage
    from candlecast.services import scoring

    batches, last = [], [time.perf_counter()]

    def on_batch(_report) -> None:
        clock = time.perf_counter()
        batches.append(clock - last[0])
        last[0] = clock

    def milliseconds(timed: Timed) -> str:
        return f"{1000 * statistics.median(timed.seconds):.0f} ms" if timed.seconds else "-"

    repository = scoring.score_repository
    with Timed(repository, "get_due_predictions") as due, Timed(repository, "record_scores") as record, \
            Timed(repository, "schedule_next") as schedule, Timed(storage, "read_all_candles") as files, \
            Timed(storage, "get_bytes", tally=lambda data: len(data or b"")) as s3:
        report = scoring.run(float("inf"), now=now, on_batch=on_batch)
    print(f"\n== {label}, now = {now:%Y-%m-%d %H:%M}Z")
    print(f"  predictions looked at {report.predictions:,}, steps newly scored {report.scored:,}, unmatured "
          f"{report.unmatured:,}, failed {len(report.failed)}; {report.batches} batches in {report.seconds:.1f} s")
    if batches:
        print(f"  per batch: median {statistics.median(batches):.2f} s, max {max(batches):.2f} s; medians: due query "
              f"{milliseconds(due)} (max {1000 * max(due.seconds):.0f} ms), record {milliseconds(record)}, "
              f"schedule {milliseconds(schedule)}")
    print(f"  candle files read from S3: {len(files.seconds):,} ({s3.total / 1e6:,.1f} MB read in "
          f"{sum(s3.seconds):.1f} s); peak RSS {peak_rss_mb():.0f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.bench_score_year", description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", type=int, default=33_333, help="predictions of 30 steps (default 33,333)")
    parser.add_argument("--rebuild", action="store_true", help=f"build the state under {STATE} again")
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
            copy_database(stack.database_url, SNAPSHOT)
            built = {"now": now.isoformat(), "predictions": args.predictions}
            marker.write_text(json.dumps(built))
            print(f"  built in {time.perf_counter() - started:.0f} s")
        else:
            restore(stack.database_url)
        now = datetime.fromisoformat(built["now"])
        with psycopg.connect(stack.database_url) as conn:
            mix, steps, size = conn.execute(
                "SELECT (SELECT string_agg(timeframe || ' ' || n, ', ' ORDER BY timeframe) FROM "
                "(SELECT timeframe, count(*) n FROM predictions GROUP BY 1) t), "
                "(SELECT count(*) FROM prediction_steps), pg_size_pretty(pg_database_size(current_database()))"
            ).fetchone()
        print(f"NOW = {now:%Y-%m-%dT%H:%MZ}, files through {last_refresh(now):%Y-%m-%dT%H:%MZ}; predictions {mix}; "
              f"{steps:,} steps; database {size}; peak RSS before scoring {peak_rss_mb():.0f} MB")
        timed_run("first run (every prediction's score_next_at NULL)", now)
        timed_run("next hourly run, no new candles", now + timedelta(hours=1))
        timed_run("and the one after", now + timedelta(hours=2))
        db.close_pool()
    return 0


if __name__ == "__main__":
    sys.exit(main())
