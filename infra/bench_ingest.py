"""Ingest benchmark: N symbols x M candles from the fake Polygon server into the local stack's S3.

The ingest runs in a child process (so its peak RSS is its own), against a private database and
bucket (the symbol refresh marks unknown symbols inactive, which must not touch other figures).
Wall time includes the local moto and fake servers (pure Python, sharing one process), so
candles_per_cpu_s (the ingest process's own CPU) is the figure that carries over to Lambda.
Two runs: the backfill of M hourly and M daily candles per symbol, then a weekly refresh one
simulated week later. Projected weekly time at the paid tier = that refresh's requests at the rate
cap, or the measured local time if that is longer (S3 and CPU work overlap the requests).

    .venv/bin/python -m infra.bench_ingest [--symbols 500] [--candles 1000]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAY, HOUR, WEEK = 86400, 3600, 7 * 86400
PAID_RATES = (50.0, 100.0)  # our default cap, and Polygon's "stay under ~100/s"
BENCH_BUCKET = "candlecast-bench-ingest"
BENCH_DATABASE = "candlecast_bench_ingest"


def _child(symbols: int, candles: int, now: int, concurrency: int) -> dict:
    import resource
    import tracemalloc

    from candlecast import ingest
    from candlecast.config import get_settings, polygon_api_key
    from candlecast.polygon import PolygonClient

    tracemalloc.start()
    settings = get_settings()
    client = PolygonClient(polygon_api_key(settings), settings.polygon_base_url, max_rps=None)
    history = {"1h": candles * HOUR // DAY + 1, "1d": candles}
    figures = {}
    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    for name, run_now in (("backfill", now), ("weekly", now + WEEK)):
        started, cpu_started = time.perf_counter(), cpu()
        summary = ingest.run_ingest(client, symbols=symbols, now=run_now, history_days=history,
                                    concurrency=concurrency, refresh=True)
        elapsed, cpu_seconds = time.perf_counter() - started, cpu() - cpu_started
        figures[name] = {
            "seconds": round(elapsed, 2),
            "requests": summary.requests,
            "symbols_done": summary.symbols_done,
            "files_written": summary.files_written,
            "candles_added": summary.candles_added,
            "candles_per_s": round(summary.candles_added / elapsed),
            "cpu_seconds": round(cpu_seconds, 2),  # the ingest's own work; wall time includes moto and the fake
            "candles_per_cpu_s": round(summary.candles_added / max(cpu_seconds, 1e-9)),
            "errors": len(summary.errors),
        }
    figures["tracemalloc_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return figures


def _private_database(database_url: str) -> str:
    import psycopg
    from psycopg.conninfo import make_conninfo

    with psycopg.connect(database_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DATABASE,)).fetchone()
        if exists:
            conn.execute(f'DROP DATABASE "{BENCH_DATABASE}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{BENCH_DATABASE}"')
    conninfo = make_conninfo(database_url, dbname=BENCH_DATABASE)
    from candlecast import migrate

    migrate.apply(conninfo)
    return conninfo


def bench_ingest(stack=None, *, symbols: int = 500, candles: int = 1000, concurrency: int = 8) -> dict:
    """Run the benchmark; returns the figures as a dict (`make bench` prints them)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "layers" / "common")]
    from infra.local_stack import LocalStack, create_bucket
    from tests.fake_polygon import FakePolygon, make_market

    own_stack = stack is None
    if own_stack:
        stack = LocalStack.start(bucket=BENCH_BUCKET)
    try:
        create_bucket(stack.s3_endpoint_url, BENCH_BUCKET)
        conninfo = _private_database(stack.database_url)
        now = int(time.time()) // HOUR * HOUR + 60
        market = make_market(symbols, now=now + WEEK, history_days=candles)
        market.bars_per_page = 50000
        with FakePolygon(market, api_key="bench-key") as fake:
            env = {
                **os.environ, **stack.environment(),
                "DATABASE_URL": conninfo, "DATA_BUCKET": BENCH_BUCKET,
                "POLYGON_API_KEY": "bench-key", "POLYGON_BASE_URL": fake.url,
                "POWERTOOLS_LOG_LEVEL": "ERROR", "PYTHONPATH": f"{ROOT}:{ROOT / 'layers' / 'common'}",
            }
            command = [sys.executable, "-m", "infra.bench_ingest", "--child", "--symbols", str(symbols),
                       "--candles", str(candles), "--now", str(now), "--concurrency", str(concurrency)]
            result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"ingest benchmark child failed:\n{result.stderr[-3000:]}")
        figures = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        if own_stack:
            stack.close()
    weekly = figures["weekly"]
    figures["symbols"], figures["candles_per_symbol"], figures["concurrency"] = symbols, candles, concurrency
    for rate in PAID_RATES:
        at_rate = weekly["requests"] / rate
        figures[f"projected_weekly_refresh_s_at_{int(rate)}rps"] = round(max(at_rate, weekly["seconds"]), 1)
    figures["targets"] = {"peak_rss_mb": "< 512", "weekly_refresh": "< 900 s per Lambda run (or chunked)"}
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--candles", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--now", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.symbols, args.candles, args.now, args.concurrency)))
    else:
        print(json.dumps(bench_ingest(symbols=args.symbols, candles=args.candles,
                                      concurrency=args.concurrency), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
