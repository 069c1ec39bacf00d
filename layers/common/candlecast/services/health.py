"""Health: the database, the cache and storage, each with its latency; model status per timeframe, with whether
storage holds each active model's file and signature (which POST /predictions reads)."""

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aws_lambda_powertools import Logger

from candlecast import cache, db, storage
from candlecast.drift import drifting
from candlecast.errors import CandlecastError, ServiceUnavailable
from candlecast.repositories import models as model_repository
from candlecast.repositories import scores as score_repository
from candlecast.repositories import stats as stats_repository
from candlecast.timeframes import TIMEFRAMES

logger = Logger(child=True)
# What the database check said when Health last answered 503 (None: it did not): a warning when that starts or its
# reason changes, one line when it ends, not one per request.
_down_with: str | None = None
# The active models whose file or signature storage lacked at the last check that could tell ({timeframe: keys}):
# a warning when that set starts or changes, one line when it empties, not one per request.
_files_missing: dict[str, list[str]] = {}


class Degraded(Exception):
    """A dependency that answers but does not do all it should (a cache refusing writes): "degraded", with why."""


def _timed(check: Callable[[], object]) -> dict:
    started = time.perf_counter()
    status = None
    try:
        detail = check()
        ok = detail is not False
    except Degraded as error:
        ok, status, detail = False, "degraded", str(error)
    except CandlecastError as error:
        ok, detail = False, error.message
    except Exception as error:  # a health check reports every failure instead of raising
        # The class only: this endpoint is public, and messages can name hosts and buckets.
        ok, detail = False, type(error).__name__
    latency_ms = round((time.perf_counter() - started) * 1000, 2)
    result = {"status": status or ("up" if ok else "down"), "latency_ms": latency_ms}
    if not ok and detail is not None:
        result["error"] = str(detail)[:300]
    return result


def _database() -> dict:
    with db.connection() as conn:
        stats_repository.test_connection(conn)
        active = {row["timeframe"]: row for row in model_repository.get_all_active_models(conn)}
        for timeframe, figures in drifting(score_repository.get_active_live_days(conn)).items():
            if timeframe in active:
                active[timeframe]["drift"] = figures
        return active


def _cache() -> None:
    if (problem := cache.ping_problem()) is not None:
        raise ServiceUnavailable(problem, code="cache_unavailable")
    if (problem := cache.write_problem()) is not None:  # entries it holds may outlive the data they show
        raise Degraded(problem)


def _storage(held: set[str]) -> None:
    """The bucket answers (an unsigned HEAD), then the keys of the model files it holds (one LIST of the models
    prefix) into `held`; a bucket that answers but cannot be listed is "degraded", the files then unknown."""
    storage.check_bucket()
    try:
        held.update(storage.model_keys())
    except Exception as error:
        raise Degraded(f"model files not listed ({storage.failure_code(error)})") from error


def prepare() -> None:
    """At init: what the first check would otherwise build inside the first invoke (see storage)."""
    storage.prepare_bucket_check()
    storage.prepare_model_listing()


def _model(row: dict | None, absent: str, held: set[str] | None, missing: dict[str, list[str]]) -> dict:
    """A timeframe's model: "active" (registered, its file and signature stored), "file_missing" (registered, but
    the file or its signature is not in storage: loads from the bucket fail), "unknown" (storage could not be
    listed), or `absent` when no model is registered."""
    if row is None:
        return {"status": absent}
    gone = storage.missing_model_files(row["s3_key"], held) if held is not None else None
    if gone:
        missing[row["timeframe"]] = gone
    status = "unknown" if gone is None else "file_missing" if gone else "active"
    return {"status": status, "name": row["name"], "version": row["version"], "kind": row["kind"]}


def check() -> tuple[int, bytes]:
    """(HTTP status, JSON body): 200 "ok", 200 "degraded" when cache or storage is down (or the cache refuses
    writes), an active model's file or signature is not in storage, or a timeframe has no model registered (its
    forecasts answer 503 model_unavailable); 503 when the database is down."""
    active_models: dict = {}
    held: set[str] = set()

    def database() -> bool:
        active_models.update(_database())
        return True

    def storage_check() -> None:
        _storage(held)

    # At once: a request (and a cold start, which connects to all three) waits for the slowest, not the sum.
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="health") as pool:
        work = (("database", database), ("cache", _cache), ("storage", storage_check))
        futures = {name: pool.submit(_timed, check) for name, check in work}
    checks = {name: future.result() for name, future in futures.items()}
    _log_transition(checks["database"])
    absent = "unknown" if checks["database"]["status"] == "down" else "missing"
    listed = held if checks["storage"]["status"] == "up" else None
    missing: dict[str, list[str]] = {}
    models = {timeframe: _model(active_models.get(timeframe), absent, listed, missing) for timeframe in TIMEFRAMES}
    if listed is not None and checks["database"]["status"] == "up":  # both answered: the files are known
        _log_files_transition(missing)
    unregistered = [timeframe for timeframe, model in models.items() if model["status"] == "missing"]
    if checks["database"]["status"] == "down":
        status, code = "down", 503
    elif missing or unregistered or any(item["status"] != "up" for item in checks.values()):
        status, code = "degraded", 200
    else:
        status, code = "ok", 200
    drift = {}
    for timeframe, row in active_models.items():
        if "drift" in row:
            drift[timeframe] = row["drift"]
            models[timeframe]["drift"] = True
    return code, json.dumps({"status": status, "checks": checks, "models": models, "drift": drift}).encode()


def _log_transition(database: dict) -> None:
    """A 503 from Health, and why: its database check's error is what the response body says (public, so free of
    secrets; the class only for an unexpected error). db logs a connection failure's cause itself, once per outage;
    a secret without `host`, say, never reaches db and was logged nowhere."""
    global _down_with
    if database["status"] == "down":
        error = database.get("error", "down")
        if error != _down_with:
            logger.warning("health answers 503: the database check failed", extra={"error": error})
        _down_with = error
    elif _down_with is not None:
        logger.info("health answers 200 again: the database check passed", extra={"was": _down_with})
        _down_with = None


def _log_files_transition(missing: dict[str, list[str]]) -> None:
    """Active models whose file or signature is not in storage: what the body says by timeframe, with the keys
    (logs are private; the body is not), when that starts or changes, and one line when every file is back."""
    global _files_missing
    if missing and missing != _files_missing:
        logger.warning("health answers degraded: active model files are missing from storage; scoring, and "
                       "POST /predictions unless the function ships that very file, fail for these timeframes: "
                       "restore the files and signatures or activate other models",
                       extra={"missing": missing})
    elif not missing and _files_missing:
        logger.info("health: every active model's file and signature are in storage again",
                    extra={"was": _files_missing})
    _files_missing = missing
