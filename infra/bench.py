"""`make bench`: speed and memory figures against the real local stack. Prints figures; asserts nothing.

Targets (from the issues) are printed beside each figure so a reader can compare.
"""

import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path

import psycopg

from infra.artifacts import cold_start_table
from infra.events import create_event, load_event, path_event
from infra.lambda_loader import LambdaContext, load_handler
from infra.local_stack import LocalStack, seeded_stack

ROOT = Path(__file__).resolve().parent.parent
COLD_RUNS = 5


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest rank; 0.0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def warm(function: str, request: dict | None, runs: int, make_request=None) -> dict:
    handler = load_handler(ROOT / "functions" / function)
    context = LambdaContext()
    samples = []
    # Each invocation still writes its metrics line, as in Lambda; here it goes to /dev/null.
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        for index in range(runs):
            payload = make_request(index) if make_request else request
            started = time.perf_counter()
            response = handler(payload, context)
            samples.append((time.perf_counter() - started) * 1000)
            assert response["statusCode"] < 500, response
    return {"p50_ms": round(percentile(samples, 0.5), 3), "p99_ms": round(percentile(samples, 0.99), 3),
            "runs": runs}


def report(name: str, value, target: str = "") -> None:
    print(f"  {name:<58} {value!s:>14}  {target}")


def main() -> int:
    with seeded_stack("candlecast-bench", quiet=False) as stack:
        print("\ncandlecast benchmark (real embedded PostgreSQL and Redis, moto S3; 2-core machine)\n")

        # From the x86_64 twin of `sam build`, run as Lambda runs it, beside the dev tree (infra/artifacts.py);
        # BENCH_BASELINE=<git ref> adds that ref's own twin build, measured in the same run.
        cold_start_table(stack, COLD_RUNS, os.environ.get("BENCH_BASELINE") or None)

        print("\nwarm, in process")
        report("health p50 / p99", _pair(warm("health", load_event("health.json"), 300)))
        search = load_event("symbols_search.json", queryStringParameters={"q": "eth", "limit": "5"})
        warm("symbols", search, 1)
        report("cached search p50 / p99", _pair(warm("symbols", search, 2000)), "target p50 <= 0.5 ms")

        from candlecast import cache

        def uncached(index: int) -> dict:
            cache.delete_pattern(cache.keys.all_search_keys())
            return search

        report("uncached search p50 / p99 (cache cleared each time)", _pair(warm("symbols", None, 300, uncached)))

        request = {"symbol": "BTCUSDT", "timeframe": "1h"}
        unkeyed_event = create_event(request)
        warm("predictions_create", unkeyed_event, 1)

        def keyed_create(index: int) -> dict:
            return create_event(request, str(uuid.uuid4()))

        def unkeyed_create(index: int) -> dict:
            # Outside the timed call: forget the previous twin, so this request stores a new prediction.
            with psycopg.connect(stack.database_url, autocommit=True) as conn:
                conn.execute("DELETE FROM predictions")  # its steps go with it (ON DELETE CASCADE)
            cache.delete_pattern(cache.keys.all_prediction_keys())
            return unkeyed_event

        report("create p50 / p99 (new prediction stored, candles cached)",
               _pair(warm("predictions_create", None, 300, unkeyed_create)), "target p50 <= 5 ms")
        report("create p50 / p99 (with Idempotency-Key: commit waits for WAL flush)",
               _pair(warm("predictions_create", None, 300, keyed_create)))
        report("repeat create p50 / p99 (X-Cache: HIT)", _pair(warm("predictions_create", unkeyed_event, 1000)))
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # its metrics line, as in warm()
            response = load_handler(ROOT / "functions/predictions_create")(unkeyed_event, LambdaContext())
        created = json.loads(response["body"])
        prediction_get = path_event("prediction_get.json", f"/predictions/{created['id']}", id=created["id"])
        report("GET cached prediction p50 / p99", _pair(warm("predictions_get", prediction_get, 2000)),
               "target p50 <= 0.3 ms")

        _other_figures(stack)
    return 0


def _pair(figures: dict) -> str:
    return f"{figures['p50_ms']:.3f} / {figures['p99_ms']:.3f} ms"


def _other_figures(stack: LocalStack) -> None:
    """Inference alone, built sizes and ingest: measured by their own areas' benchmark functions."""
    from candlecast.forecast.bench import bench_forecast
    from infra.bench_ingest import bench_ingest
    from infra.bench_pool import bench_pool
    from infra.template_checks import BUILD_DIR, size_report

    print("\npool checkout policies, side by side (one indexed read per request)")
    for name, value in bench_pool(stack.database_url).items():
        report(name, value)
    print("\nforecast (model alone)")
    for name, value in bench_forecast().items():
        report(name, value, "target <= 2 ms" if "inference" in name else "")
    print("\nbuilt sizes, function + its layers, unzipped (limit 250 MB; prediction target <= 200 MB)")
    if BUILD_DIR.is_dir():
        size_report()
    else:
        print("  (no .aws-sam/build: run `make check-template` first)")
    print("\ningest against the fake Polygon server (500 symbols x 1000 candles)")
    for name, value in bench_ingest(stack).items():
        report(name, value)


if __name__ == "__main__":
    sys.exit(main())
