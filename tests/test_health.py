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


def test_health_is_degraded_while_a_timeframe_has_no_model_registered(clean_db):
    """Audit: with no model for a timeframe its forecasts answer 503 model_unavailable, and health said "ok"."""
    status, _, body = health()
    assert (status, body["status"], body["checks"]["database"]["status"]) == (200, "degraded", "up")
    assert {model["status"] for model in body["models"].values()} == {"missing"}


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


def _active_model_key(seeded, timeframe: str) -> str:
    import psycopg

    with psycopg.connect(seeded.database_url) as conn:
        return conn.execute("SELECT s3_key FROM models WHERE timeframe = %s AND is_active",
                            (timeframe,)).fetchone()[0]


def _create(timeframe: str) -> tuple[int, dict]:
    import uuid

    from infra.events import create_event

    status, _, body = invoke("predictions_create", create_event({"symbol": "X:BTCUSD", "timeframe": timeframe},
                                                                 idempotency_key=uuid.uuid4().hex))
    return status, body


def test_health_is_ok_when_every_active_models_file_and_signature_are_stored(seeded):
    status, _, body = health()
    assert (status, body["status"], body["checks"]["storage"]["status"]) == (200, "ok", "up")
    assert {model["status"] for model in body["models"].values()} == {"active"}


@pytest.mark.parametrize("which, code", [("file", "model_file_missing"), ("signature", "model_integrity")])
def test_health_is_degraded_naming_the_timeframe_whose_model_file_or_signature_is_missing(
        seeded, which, code, caplog):
    """/health said ok (1d "active": its models row) while every POST /predictions for 1d answered 503: the
    active model's file, or its signature, was not in the bucket. A warning is logged when that starts and a
    line when it ends, not one per request."""
    import logging

    from candlecast import storage
    from candlecast.services import model_loading

    model_key = _active_model_key(seeded, "1d")
    gone = model_key if which == "file" else storage.signature_key(model_key)
    kept = storage.get_bytes(gone)
    storage.s3_client().delete_object(Bucket=seeded.bucket, Key=gone)
    model_loading.forget_models()
    assert _create("1d")[0] == 503 and _create("1d")[1]["error"]["code"] == code  # what /health must foresee
    with caplog.at_level(logging.INFO):
        answers = [health() for _ in range(3)]
    for status, _, body in answers:
        assert (status, body["status"], body["checks"]["storage"]["status"]) == (200, "degraded", "up")
        assert body["models"]["1d"]["status"] == "file_missing"
        assert body["models"]["1d"]["name"] and body["models"]["1d"]["version"] and body["models"]["1d"]["kind"]
        assert {tf: model["status"] for tf, model in body["models"].items() if tf != "1d"} == {
            "1h": "active", "4h": "active", "1w": "active", "1m": "active"}
        assert model_key not in str(body)  # keys and the bucket stay out of the public answer
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING
                and record.getMessage().startswith("health answers degraded")]
    assert len(warnings) == 1, [record.getMessage() for record in caplog.records]
    assert warnings[0].missing == {"1d": [gone]}

    storage.put_bytes(gone, kept)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert [health()[2]["status"] for _ in range(2)] == ["ok", "ok"]
    again = [record for record in caplog.records if record.getMessage().startswith("health: every active model")]
    assert len(again) == 1 and again[0].was == {"1d": [gone]}


def test_health_reports_model_files_unknown_not_missing_while_storage_is_down(seeded, monkeypatch):
    from candlecast import storage
    from infra.local_stack import free_port
    from tests.conftest import reset_clients

    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    reset_clients()
    try:
        status, _, body = health()
    finally:
        monkeypatch.undo()
        reset_clients()
        storage.reset_clients()
    assert (status, body["status"], body["checks"]["storage"]["status"]) == (200, "degraded", "down")
    assert {model["status"] for model in body["models"].values()} == {"unknown"}  # registered; files unknown
    assert all(model["name"] and model["version"] for model in body["models"].values())


def test_a_bucket_that_answers_but_refuses_the_listing_is_degraded_with_model_files_unknown(seeded, monkeypatch):
    """A role without s3:ListBucket on models/ (say): the bucket answers its HEAD, the model files cannot be told."""
    from botocore.exceptions import ClientError

    from candlecast import storage

    def refused():
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": f"no: {seeded.bucket}"}}, "ListObjectsV2")

    monkeypatch.setattr(storage, "model_keys", refused)
    status, _, body = health()
    assert (status, body["status"]) == (200, "degraded")
    assert body["checks"]["storage"]["status"] == "degraded"
    assert body["checks"]["storage"]["error"] == "model files not listed (AccessDenied)"  # S3's text stays out
    assert {model["status"] for model in body["models"].values()} == {"unknown"}
