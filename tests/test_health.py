"""GET /health: ok, degraded when the cache is down, 503 fast when the database is down, and recovery."""

import time

import pytest

from tests.conftest import invoke, load_event, redis_refusing_writes

pytestmark = pytest.mark.integration


def health():
    return invoke("health", load_event("health.json"))


def test_health_reports_each_dependency_with_latency(clean_db):
    status, _, body = health()
    assert status == 200
    assert set(body["checks"]) == {"database", "cache", "storage"}
    for check in body["checks"].values():
        assert check["latency_ms"] >= 0
    assert body["checks"]["database"]["status"] == "up"
    assert body["checks"]["cache"]["status"] == "up"
    assert set(body["models"]) == {"1h", "4h", "1d", "1w", "1m"}
    assert body["status"] == ("ok" if body["checks"]["storage"]["status"] == "up" else "degraded")


def test_health_is_degraded_when_redis_is_down(clean_db, needs_embedded_redis):
    needs_embedded_redis.stop()
    try:
        status, _, body = health()
    finally:
        needs_embedded_redis.start()
    assert status == 200
    assert body["status"] == "degraded"
    assert body["checks"]["cache"]["status"] == "down"
    assert body["checks"]["cache"]["error"] == "no answer (ConnectionError)"  # was "False"


@pytest.mark.parametrize("how, why", [("oom", "OutOfMemoryError"), ("readonly", "ReadOnlyError")])
def test_health_is_degraded_while_redis_refuses_writes(clean_db, how, why):
    """Redis out of memory (noeviction) or a read-only replica answers PING: health said ok, cache up, while no
    invalidation was taken and the old entries were served."""
    with redis_refusing_writes(clean_db.redis_url, how):
        status, _, body = health()
    assert status == 200
    assert body["status"] == "degraded"
    assert (body["checks"]["cache"]["status"], body["checks"]["cache"]["error"]) == (
        "degraded", f"refusing writes ({why})")


def test_health_is_503_within_two_seconds_when_database_is_down_then_recovers(clean_db, needs_embedded_postgres):
    assert health()[0] == 200
    needs_embedded_postgres.stop()
    try:
        started = time.perf_counter()
        status, _, body = health()
        elapsed = time.perf_counter() - started
    finally:
        needs_embedded_postgres.start()
    assert status == 503
    assert body["status"] == "down"
    assert body["checks"]["database"]["status"] == "down"
    assert {model["status"] for model in body["models"].values()} == {"unknown"}  # not "missing"
    assert elapsed < 2.0
    deadline = time.monotonic() + 15
    while health()[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health()[0] == 200
