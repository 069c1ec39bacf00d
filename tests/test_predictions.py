"""Prediction create/get through real v2 events, with the committed sample data and models seeded."""

import base64
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import psycopg
import pytest
from dateutil.relativedelta import relativedelta

from candlecast import storage
from infra.events import create_event
from tests.conftest import ROOT, invoke, load_event, path_event

pytestmark = [pytest.mark.integration, pytest.mark.s3]

SAMPLE_TICKER = "X:BTCUSDT"
# An oracle independent of candlecast.timeframes: the calendar step of each timeframe.
CALENDAR_STEP = {"1h": relativedelta(hours=1), "4h": relativedelta(hours=4), "1d": relativedelta(days=1),
                 "1w": relativedelta(weeks=1), "1m": relativedelta(months=1)}


def sample_timeframes() -> list[str]:
    folder = ROOT / "data" / storage.candles_key(SAMPLE_TICKER, "1h").split("/")[1]
    return sorted(path.stem for path in folder.glob("*.parquet"))


def create(body, headers: dict | None = None):
    event = create_event(body)
    event["headers"].update(headers or {})
    return invoke("predictions_create", event)


def get(prediction_id: str):
    return invoke("predictions_get", path_event("prediction_get.json", f"/predictions/{prediction_id}",
                                                id=prediction_id))


def stored_predictions(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM predictions").fetchone()[0]


@pytest.mark.parametrize("timeframe", ["1h", "4h", "1d", "1w", "1m"])
def test_create_returns_thirty_consistent_steps_continuing_the_last_candle(seeded, timeframe):
    if timeframe not in sample_timeframes():
        pytest.skip(f"no {timeframe} sample for {SAMPLE_TICKER}")
    status, _, body = create({"symbol": "btc-usdt", "timeframe": timeframe})
    assert status == 201, body
    assert body["ticker"] == SAMPLE_TICKER
    assert body["timeframe"] == timeframe
    steps = body["steps"]
    assert [step["step"] for step in steps] == list(range(1, 31))
    last_open = datetime.fromtimestamp(int(storage.read_all_candles(SAMPLE_TICKER, timeframe).open_time[-1]), UTC)
    assert datetime.fromisoformat(body["last_candle_at"]) == last_open
    for step in steps:
        assert datetime.fromisoformat(step["ts"]) == last_open + step["step"] * CALENDAR_STEP[timeframe]
        assert step["low"] <= min(step["open"], step["close"])
        assert step["high"] >= max(step["open"], step["close"])
        assert step["lower_95"] <= step["lower_80"] <= step["upper_80"] <= step["upper_95"]
        assert 0.0 <= step["confidence"] <= 1.0
    assert steps[0]["open"] == pytest.approx(body["last_close"])
    # Uncertainty grows with the horizon.
    assert steps[-1]["upper_80"] - steps[-1]["lower_80"] > steps[0]["upper_80"] - steps[0]["lower_80"]


def test_repeat_within_fifteen_minutes_returns_the_stored_prediction(seeded):
    first = create({"symbol": "BTCUSDT", "timeframe": "1h"})
    second = create({"symbol": "X:BTCUSDT", "timeframe": "1h"})
    assert first[0] == 201
    assert second[0] == 200
    assert second[1]["X-Cache"] == "HIT"
    assert second[2]["id"] == first[2]["id"]
    assert stored_predictions(seeded.database_url) == 1


def test_each_create_logs_one_line_naming_the_prediction_and_what_made_it(seeded, caplog):
    """An operator tracing one forecast a client complains about found no line naming it: a create from fresh
    candles logged nothing, a stale one no id or model, and a repeat nothing (audit)."""
    def lines_about(prediction_id: str) -> list:
        return [record for record in caplog.records if getattr(record, "prediction_id", None) == prediction_id]

    with caplog.at_level("INFO"):
        status, _, made = create({"symbol": "BTCUSDT", "timeframe": "1h"}, {"Idempotency-Key": "traced"})
        assert status == 201
        [line] = lines_about(made["id"])
        assert (line.ticker, line.timeframe, line.model_id, line.model_version, line.data_age_bars) == (
            made["ticker"], "1h", made["model_id"], made["model_version"], made["data_age_bars"])
        assert line.last_candle_at == made["last_candle_at"].replace("Z", "+00:00") and len(line.request_hash) == 64
        assert create({"symbol": "BTCUSDT", "timeframe": "1h"}, {"Idempotency-Key": "traced"})[0] == 200
        _, _, repeated = create({"symbol": "BTCUSDT", "timeframe": "4h"})
        assert create({"symbol": "BTCUSDT", "timeframe": "4h"})[0] == 200
    assert [line.matched_by for line in lines_about(made["id"])[1:]] == ["idempotency_key"]
    assert [getattr(line, "matched_by", None) for line in lines_about(repeated["id"])] == [None, "repeat"]


def test_get_returns_the_stored_prediction_then_from_cache(seeded):
    _, _, created = create({"symbol": "BTCUSDT", "timeframe": "1d"})
    from candlecast import cache

    cache.delete(cache.keys.prediction(created["id"]))
    status, headers, body = get(created["id"])
    assert status == 200
    assert headers["X-Cache"] == "MISS"
    assert body == created
    status, headers, body = get(created["id"])
    assert (status, headers["X-Cache"]) == (200, "HIT")
    assert body == created


def test_recent_predictions_for_a_symbol(seeded):
    _, _, first = create({"symbol": "BTCUSDT", "timeframe": "1h"})
    status, _, second = create({"symbol": "BTCUSDT", "timeframe": "1d"})
    assert status == 201, second
    event = path_event("symbol_predictions.json", "/symbols/BTC-USDT/predictions", ticker="BTC-USDT")
    status, _, body = invoke("symbols", event | {"queryStringParameters": {"limit": "10"}})
    assert status == 200, body
    assert [item["id"] for item in body] == [second["id"], first["id"]]
    status, _, body = invoke("symbols", event | {"queryStringParameters": {"timeframe": "1d"}})
    assert [item["id"] for item in body] == [second["id"]]
    status, _, body = invoke("symbols", event | {"queryStringParameters": {"timeframe": "2d"}})
    assert status == 400


def test_idempotency_key_returns_the_same_prediction_even_without_redis(seeded, needs_embedded_redis):
    key = {"idempotency-key": f"client-{uuid.uuid4()}"}
    first = create({"symbol": "BTCUSDT", "timeframe": "4h"}, key)
    needs_embedded_redis.stop()
    try:
        again = create({"symbol": "BTCUSDT", "timeframe": "4h"}, key)
    finally:
        needs_embedded_redis.start()
    assert first[0] == 201
    assert again[0] == 200
    assert again[2]["id"] == first[2]["id"]
    reused = create({"symbol": "BTCUSDT", "timeframe": "1d"}, key)
    assert reused[0] == 409
    assert reused[2]["error"]["code"] == "idempotency_key_reused"
    assert stored_predictions(seeded.database_url) == 1


def test_a_retried_key_returns_its_prediction_after_the_candles_moved_on(seeded):
    key = {"idempotency-key": f"client-{uuid.uuid4()}"}
    status, _, first = create({"symbol": "BTCUSDT", "timeframe": "1h"}, key)
    assert status == 201
    candles = storage.read_all_candles(SAMPLE_TICKER, "1h")
    following = candles.tail(1)
    storage.write_candles(SAMPLE_TICKER, "1h", storage.merge_candles(candles, type(following)(
        following.open_time + 3600, following.open, following.high, following.low, following.close,
        following.volume)))
    status, _, again = create({"symbol": "BTCUSDT", "timeframe": "1h"}, key)
    assert (status, again) == (200, first)
    status, _, fresh = create({"symbol": "BTCUSDT", "timeframe": "1h"})  # without the key: the new candle
    assert status == 201 and fresh["last_candle_at"] > first["last_candle_at"]
    assert stored_predictions(seeded.database_url) == 2


def test_a_retried_key_needs_neither_the_model_nor_the_candles(seeded, monkeypatch):
    from candlecast import cache
    from candlecast.config import get_settings
    from candlecast.services import model_loading

    key = {"idempotency-key": f"client-{uuid.uuid4()}"}
    status, _, first = create({"symbol": "ETHUSDT", "timeframe": "1h"}, key)
    assert status == 201
    cache.delete_pattern(cache.keys.all_keys())
    model_loading.forget_models()
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    get_settings.cache_clear()
    storage.reset_clients()
    try:
        status, _, again = create({"symbol": "ETHUSDT", "timeframe": "1h"}, key)
        reused = create({"symbol": "ETHUSDT", "timeframe": "4h"}, key)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        storage.reset_clients()
    assert (status, again) == (200, first)
    assert (reused[0], reused[2]["error"]["code"]) == (409, "idempotency_key_reused")


@pytest.mark.slow
@pytest.mark.parametrize("redis_up", [True, False], ids=["redis-up", "redis-down"])
def test_thirty_two_concurrent_identical_creates_store_exactly_one(seeded, needs_embedded_redis, redis_up,
                                                                   monkeypatch):
    from tests.conftest import reset_clients

    # 32 connections, so 32 transactions really race (as 32 Lambda containers would).
    monkeypatch.setenv("DB_POOL_MAX_SIZE", "32")
    reset_clients()
    create({"symbol": "ETHUSDT", "timeframe": "1h"})  # warm the model and candle caches
    with psycopg.connect(seeded.database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE predictions CASCADE")
    from candlecast import cache

    cache.delete_pattern(cache.keys.all_prediction_keys())
    if not redis_up:
        needs_embedded_redis.stop()
    barrier = threading.Barrier(32)

    def one(_):
        barrier.wait()
        return create({"symbol": "ETHUSDT", "timeframe": "1h"})

    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(one, range(32)))
    finally:
        if not redis_up:
            needs_embedded_redis.start()
    monkeypatch.undo()
    reset_clients()
    # On a starved machine one of 32 connects at once can outlast connect_timeout: that create answers 503
    # database_unavailable with Retry-After (a client retries it), never a second row.
    retry_later = [(body["error"]["code"], "Retry-After" in headers) for status, headers, body in results
                   if status == 503]
    assert set(retry_later) <= {("database_unavailable", True)} and len(retry_later) <= 16, retry_later
    answered = [(status, body) for status, _, body in results if status != 503]
    assert sorted(status for status, _ in answered) == [200] * (len(answered) - 1) + [201]
    assert len({body["id"] for _, body in answered}) == 1
    assert stored_predictions(seeded.database_url) == 1


def test_unknown_symbol_is_404(seeded):
    status, _, body = create({"symbol": "NOPE-USD", "timeframe": "1h"})
    assert status == 404
    assert body["error"]["code"] == "symbol_not_found"


def test_a_symbol_no_longer_listed_is_not_forecast_but_its_keyed_prediction_is_still_returned(seeded):
    """A delisted or renamed coin (the refresh marks it inactive) has candles that no longer grow: a 201 would be
    a forecast of the past. A retry of a prediction made while it was listed still gets that prediction."""
    keyed = create({"symbol": "BTCUSDT", "timeframe": "1h"}, {"Idempotency-Key": "made-while-listed"})
    assert keyed[0] == 201
    with psycopg.connect(seeded.database_url, autocommit=True) as conn:
        conn.execute("UPDATE symbols SET is_active = false WHERE ticker = %s", (SAMPLE_TICKER,))

    status, _, body = create({"symbol": "BTCUSDT", "timeframe": "4h"})
    assert (status, body["error"]["code"]) == (404, "symbol_inactive")
    assert SAMPLE_TICKER in body["error"]["message"] and "is inactive" in body["error"]["message"]
    assert stored_predictions(seeded.database_url) == 1
    retried = create({"symbol": "BTCUSDT", "timeframe": "1h"}, {"Idempotency-Key": "made-while-listed"})
    assert (retried[0], retried[2]["id"]) == (200, keyed[2]["id"])


def test_symbol_without_candles_for_timeframe_is_404_saying_so(seeded, monkeypatch):
    monkeypatch.delenv("POLYGON_API_KEY", raising=False)
    # Every listed symbol has some candles; a daily-only one has no 1h candles, and says so.
    daily_only = sorted(path.name for path in (ROOT / "data").iterdir()
                        if path.is_dir() and not (path / "1h.parquet").exists())
    ticker = f"X:{daily_only[0]}"
    _, _, symbol = invoke("symbols", path_event("symbol_get.json", f"/symbols/{ticker}", ticker=ticker))
    assert "1h" not in symbol["candle_timeframes"] and symbol["fetchable"] is False
    status, _, body = create({"symbol": ticker, "timeframe": "1h"})
    assert (status, body["error"]["code"]) == (404, "candles_unavailable")
    assert "candles" in body["error"]["message"]


def test_no_active_model_is_503(seeded):
    with psycopg.connect(seeded.database_url, autocommit=True) as conn:
        conn.execute("UPDATE models SET is_active = false WHERE timeframe = '1h'")
    status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1h"})
    assert status == 503
    assert "1h" in body["error"]["message"]


def damage_model_file(bucket: str, key: str, how: str) -> None:
    """A model file in the bucket "deleted", with one byte flipped ("flip-byte") or without its .sig."""
    if how == "deleted":
        storage.s3_client().delete_object(Bucket=bucket, Key=key)
    elif how == "flip-byte":
        data = bytearray(storage.get_bytes(key))
        data[len(data) // 2] ^= 0xFF
        storage.put_bytes(key, bytes(data))
    elif how == "drop-signature":
        storage.s3_client().delete_object(Bucket=bucket, Key=storage.signature_key(key))


@pytest.mark.parametrize("tamper", ["flip-byte", "drop-signature", "garbled-signature", "wrong-sha-row"])
def test_tampered_or_unsigned_model_is_refused_and_nothing_is_stored(seeded, tamper):
    with psycopg.connect(seeded.database_url) as conn:
        key = conn.execute("SELECT s3_key FROM models WHERE timeframe = '1h' AND is_active").fetchone()[0]
    if tamper in ("flip-byte", "drop-signature"):
        damage_model_file(seeded.bucket, key, tamper)
    elif tamper == "garbled-signature":
        storage.put_bytes(storage.signature_key(key), b"\xff\xfe not hex")
    else:
        with psycopg.connect(seeded.database_url, autocommit=True) as conn:
            conn.execute("UPDATE models SET sha256 = repeat('0', 64) WHERE timeframe = '1h'")
    status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1h"})
    assert status == 503
    assert body["error"]["code"] == "model_integrity"
    assert stored_predictions(seeded.database_url) == 0


def test_a_row_naming_another_timeframes_signed_file_is_refused_and_nothing_is_stored(seeded):
    """Audit K: the 1d row pointed at the 4h file (validly signed, its sha256 in the row) and 1d was answered by
    the 4h model. The loaded model's timeframe, name and version must be the row's."""
    with psycopg.connect(seeded.database_url, autocommit=True) as conn:
        four_hours = conn.execute("SELECT s3_key, sha256 FROM models WHERE timeframe = '4h' AND is_active").fetchone()
        conn.execute("UPDATE models SET s3_key = %s, sha256 = %s WHERE timeframe = '1d' AND is_active", four_hours)
    status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1d"})
    assert (status, body["error"]["code"]) == (503, "model_integrity")
    assert "4h" in body["error"]["message"] and "registered" in body["error"]["message"]
    assert stored_predictions(seeded.database_url) == 0
    status, _, _ = create({"symbol": "BTCUSDT", "timeframe": "4h"})  # the file is fine for its own row
    assert status == 201


def test_a_signed_file_that_is_no_model_is_refused_without_quoting_it(seeded):
    """Signed with the stage's key and registered, yet not a model file: a 503 whose message holds none of its bytes."""
    import hashlib

    from candlecast.config import LOCAL_MODEL_SIGNING_KEY
    from candlecast.forecast.artifact import sign

    junk = b"gsecret-looking/text/that/is/not/joblib\n"  # pickle's GET opcode: its error quotes the line
    with psycopg.connect(seeded.database_url, autocommit=True) as conn:
        key = conn.execute("SELECT s3_key FROM models WHERE timeframe = '1h' AND is_active").fetchone()[0]
        conn.execute("UPDATE models SET sha256 = %s WHERE timeframe = '1h'", (hashlib.sha256(junk).hexdigest(),))
    storage.put_bytes(key, junk)
    storage.put_bytes(storage.signature_key(key), sign(junk, LOCAL_MODEL_SIGNING_KEY.encode()).encode())
    status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1h"})
    assert (status, body["error"]["code"]) == (503, "model_integrity")
    assert "secret-looking" not in body["error"]["message"] and "cannot be read" in body["error"]["message"]
    assert stored_predictions(seeded.database_url) == 0


@pytest.mark.parametrize(("damage", "code"), [("deleted", "model_file_missing"), ("flip-byte", "model_integrity"),
                                              ("drop-signature", "model_integrity"),
                                              ("other-timeframes-file", "model_integrity")])
def test_a_refused_model_file_is_logged_once_by_key_and_the_answer_does_not_name_it(seeded, damage, code, caplog):
    """DR audit: a deleted or replaced model file was a 503 whose log line ('request failed') named neither the file's
    key nor its signature's, so the operator could not tell what to restore. One line names them (and the model,
    the timeframe and why); the client's answer names neither key nor bucket."""
    import json
    import logging

    with psycopg.connect(seeded.database_url, autocommit=True) as conn:
        row = conn.execute("SELECT name, version, s3_key FROM models WHERE timeframe = '1d' AND is_active").fetchone()
        if damage == "other-timeframes-file":  # a validly signed file, of another model
            four_hours = conn.execute("SELECT s3_key, sha256 FROM models WHERE timeframe = '4h' AND is_active"
                                      ).fetchone()
            conn.execute("UPDATE models SET s3_key = %s, sha256 = %s WHERE timeframe = '1d' AND is_active",
                         four_hours)
            row = (row[0], row[1], four_hours[0])
    name, version, key = row
    if damage in ("deleted", "flip-byte", "drop-signature"):
        damage_model_file(seeded.bucket, key, damage)
    with caplog.at_level(logging.INFO):
        status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1d"})
    assert (status, body["error"]["code"]) == (503, code)
    text = json.dumps(body)
    assert key not in text and seeded.bucket not in text and "models/" not in text
    warnings = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert [record.getMessage().split(":")[0] for record in warnings] == ["model file refused"]  # no 'request failed'
    [record] = warnings
    assert record.levelno == logging.ERROR
    assert (record.timeframe, record.model, record.version) == ("1d", name, version)
    assert (record.s3_key, record.signature_key) == (key, storage.signature_key(key))
    assert (record.code, record.reason) == (code, body["error"]["message"])


@pytest.mark.parametrize(
    ("body", "status", "mentions"),
    [
        ({"symbol": "BTCUSDT", "timeframe": "2h"}, 422, "timeframe"),
        ({"symbol": "BTCUSDT", "timeframe": "1h", "extra": 1}, 422, "extra"),
        ({"symbol": "BTCUSDT"}, 422, "timeframe"),
        ({"symbol": 42, "timeframe": "1h"}, 422, "symbol"),
        ({"symbol": ["BTC"], "timeframe": "1h"}, 422, "symbol"),
        ({"symbol": "BTC\x00USDT", "timeframe": "1h"}, 400, "ticker"),
        ({"symbol": "'; DROP TABLE predictions; --", "timeframe": "1h"}, 400, "ticker"),
        ({"symbol": "B" * 10_000, "timeframe": "1h"}, 422, "symbol"),
        ("not json", 400, "JSON"),
        ("[]", 422, "body"),
        ("", 422, "body"),
        ("x" * 100_000, 413, "limit"),
    ],
)
def test_bad_create_input_is_4xx_naming_the_problem(seeded, body, status, mentions):
    got_status, _, got = create(body)
    assert got_status == status
    assert mentions in got["error"]["message"]
    assert stored_predictions(seeded.database_url) == 0


@pytest.mark.parametrize("header", ["has space", "x" * 300, "tab\there"])
def test_bad_idempotency_key_is_400(seeded, header):
    status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1h"}, {"idempotency-key": header})
    assert status == 400
    assert "idempotency-key" in body["error"]["message"]


@pytest.mark.parametrize("bad_id", ["nope", "1234", "'; DROP TABLE predictions; --", "%00", "a" * 5000])
def test_get_with_non_uuid_id_is_400(seeded, bad_id):
    status, _, body = get(bad_id)
    assert status == 400
    assert body["error"]["code"] == "invalid_prediction_id"


def test_get_unknown_id_is_404(seeded):
    status, _, body = get(str(uuid.uuid4()))
    assert status == 404
    assert body["error"]["code"] == "prediction_not_found"


def test_created_prediction_is_still_served_when_database_recovers(seeded, needs_embedded_postgres):
    _, _, created = create({"symbol": "BTCUSDT", "timeframe": "1w"})
    needs_embedded_postgres.stop()
    try:
        status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1d"})
        assert status == 503
        assert body["error"]["code"] == "database_unavailable"
        # A cached prediction is still served while the database is down.
        assert get(created["id"])[0] == 200
    finally:
        needs_embedded_postgres.start()
    deadline = time.monotonic() + 15
    while (status := create({"symbol": "BTCUSDT", "timeframe": "1d"})[0]) != 201 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 201


def test_a_read_only_database_is_a_503_and_the_warm_container_writes_again_once_it_is_writable(seeded):
    """A writer during a failover, or a standby behind a stale name: its sessions refuse to write (25006)."""
    from tests.conftest import reset_clients

    with psycopg.connect(seeded.database_url, dbname="postgres", autocommit=True) as admin:
        admin.execute("ALTER DATABASE candlecast SET default_transaction_read_only = on")
        try:
            reset_clients()  # a new container: its sessions are read-only from the start, as after a failover
            status, headers, body = create({"symbol": "BTCUSDT", "timeframe": "1d"})
            assert (status, body["error"]["code"]) == (503, "database_unavailable"), body
            assert int(headers["Retry-After"]) >= 1
        finally:
            admin.execute("ALTER DATABASE candlecast RESET default_transaction_read_only")
    # Writable again; the same warm container drops its read-only sessions instead of lending them again (a
    # replacement the pool opened while the database was still read-only is dropped the same way).
    answers = []
    for _ in range(5):
        status, headers, body = create({"symbol": "BTCUSDT", "timeframe": "1d"})
        answers.append(status)
        if status == 201:
            break
        assert (status, body["error"]["code"]) == (503, "database_unavailable") and "Retry-After" in headers, body
    assert answers[-1] == 201, answers
    assert stored_predictions(seeded.database_url) == 1


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data"])
def test_body_that_is_not_json_by_content_type_is_415(seeded, content_type):
    status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1h"}, {"content-type": content_type})
    assert status == 415
    assert "application/json" in body["error"]["message"]
    assert stored_predictions(seeded.database_url) == 0


def test_json_with_charset_is_accepted(seeded):
    status, _, _ = create({"symbol": "BTCUSDT", "timeframe": "1h"}, {"content-type": "application/json; charset=utf-8"})
    assert status == 201


@pytest.mark.parametrize(
    ("body", "base64_encoded", "status", "mentions"),
    [
        ("[" * 5000 + "]" * 5000, False, 400, "JSON"),
        ('{"a":' * 2000 + "1" + "}" * 2000, False, 400, "JSON"),
        ("not base64 at all!", True, 400, "base64"),
        (base64.b64encode(b"\xff\xfe{").decode(), True, 400, "UTF-8"),
        (base64.b64encode(b"x" * 20_000).decode(), True, 413, "limit"),
        ("é" * 9000, False, 413, "limit"),  # 18,000 bytes in 9,000 characters
    ],
    ids=["deep-array", "deep-object", "bad-base64", "not-utf8", "big-base64", "multibyte"],
)
def test_bodies_that_cannot_be_read_are_4xx(seeded, body, base64_encoded, status, mentions):
    event = load_event("predictions_create.json", body=body, isBase64Encoded=base64_encoded)
    got_status, _, got = invoke("predictions_create", event)
    assert got_status == status
    assert mentions in got["error"]["message"]
    assert stored_predictions(seeded.database_url) == 0


@pytest.mark.parametrize("model_loaded", [False, True], ids=["model-not-loaded", "model-loaded"])
def test_storage_outage_is_503_not_500(seeded, monkeypatch, model_loaded):
    from candlecast import cache
    from candlecast.config import get_settings
    from candlecast.services import model_loading

    if model_loaded:
        assert create({"symbol": "BTCUSDT", "timeframe": "1h"})[0] == 201
    cache.delete_pattern(cache.keys.all_keys())
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    get_settings.cache_clear()
    storage.reset_clients()
    if not model_loaded:
        model_loading.forget_models()
    try:
        status, _, body = create({"symbol": "ETHUSDT", "timeframe": "1h"})
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        storage.reset_clients()
    assert status == 503
    assert body["error"]["code"] == "storage_unavailable"


def _write_candles(ticker: str, closes: list[float], start: int = 1_599_998_400):  # 2020-09-13T12:00Z: on the hour
    import numpy as np

    from candlecast.candles import Candles

    close = np.asarray(closes, dtype=float)
    storage.write_candles(ticker, "1h", Candles(
        open_time=np.arange(len(close), dtype=np.int64) * 3600 + start, open=close, high=close * 1.01,
        low=close * 0.99, close=close, volume=np.ones(len(close))))
    return start


def test_candles_with_too_few_usable_rows_are_404(seeded):
    _write_candles("X:ADAUSDT", [0.0] * 197 + [1.2, 1.3])
    status, _, body = create({"symbol": "ADAUSDT", "timeframe": "1h"})
    assert status == 404
    assert "usable" in body["error"]["message"]


@pytest.mark.parametrize("timeframe", ["1h", "4h", "1d", "1w", "1m"])
def test_fewer_usable_candles_than_the_models_warm_up_are_404_naming_both(seeded, timeframe):
    """Audit K: 3 bars were enough (1w from 4 bars: first-step confidence 0.999) although every model was
    evaluated with at least min_history bars (48/32/24/12/6) before an origin."""
    import numpy as np

    from candlecast.candles import Candles
    from candlecast.forecast.features import CONFIGS
    from candlecast.timeframes import add_steps

    need = CONFIGS[timeframe].min_history
    for rows, expected in ((need - 1, 404), (need, 201)):
        first = datetime(2015, 1, 1, tzinfo=UTC)  # a Thursday: 1w starts on the Monday after
        first = first if timeframe != "1w" else datetime(2015, 1, 5, tzinfo=UTC)
        times = np.array([int(add_steps(first, timeframe, n).timestamp()) for n in range(rows)], dtype=np.int64)
        close = 1.0 + 0.01 * (np.arange(rows) % 7)
        storage.write_candles("X:ADAUSDT", timeframe, Candles(times, close, close * 1.01, close * 0.99, close,
                                                               np.ones(rows)))
        status, _, body = create({"symbol": "ADAUSDT", "timeframe": timeframe})
        assert status == expected, (rows, body)
        if expected == 404:
            assert body["error"]["code"] == "too_little_history"
            assert f"has {rows} usable" in body["error"]["message"] and f"at least {need}" in body["error"]["message"]


def _jumping_1d_candles(rows: int = 40):
    """Finite 1d candles that jump 10⁶⁰× up and down every 4 days (no bad print: each level holds 4 days)."""
    import numpy as np

    from candlecast.candles import Candles

    step = 0.01 * np.where(np.arange(rows) % 2, 1.0, -1.0)
    step[10::4] = np.log(1e60) * np.where(np.arange(len(step[10::4])) % 2, -1.0, 1.0)
    close = np.exp(np.cumsum(step))
    open_ = np.r_[close[0], close[:-1]]
    times = 1_420_070_400 + 86400 * np.arange(rows, dtype=np.int64)  # 2015-01-01
    return Candles(times, open_, np.maximum(open_, close) * 1.01, np.minimum(open_, close) / 1.01, close,
                   np.ones(rows))


def test_candles_whose_forecast_overflows_are_a_404_naming_them_not_a_model_failure(seeded):
    """Finite candles with jumps of 10¹⁷× and more (a fuzzed 1w series) put the 95 % band's upper bound past a
    float (inf): that was a 503 model_output_invalid, a data problem reported as the model's failure."""
    storage.write_candles("X:ADAUSDT", "1d", _jumping_1d_candles())
    status, headers, body = create({"symbol": "ADAUSDT", "timeframe": "1d"})
    assert (status, body["error"]["code"]) == (404, "candles_out_of_range"), body
    assert "X:ADAUSDT's 1d candles swing too far to forecast" in body["error"]["message"]
    assert "retry-after" not in {name.lower() for name in headers}


def test_a_model_that_forecasts_nan_from_finite_candles_is_still_a_503(seeded, monkeypatch):
    import numpy as np

    from candlecast.forecast.model import ForecastModel

    real = ForecastModel.predict

    def nan_band(self, candles):
        forecast = real(self, candles)
        forecast.upper_95[3] = np.nan
        return forecast

    monkeypatch.setattr(ForecastModel, "predict", nan_band)
    status, _, body = create({"symbol": "BTC-USD", "timeframe": "1d"})
    assert (status, body["error"]["code"]) == (503, "model_output_invalid"), body


def test_the_committed_sample_has_enough_history_for_every_timeframe_it_serves():
    from candlecast.candles import usable_candles
    from candlecast.forecast.features import CONFIGS

    for path in sorted((ROOT / "data").glob("*/*.parquet")):
        config = CONFIGS[path.stem]
        candles = usable_candles(storage.parquet_to_candles(path.read_bytes()).tail(config.lookback))
        assert len(candles) >= config.min_history, path


def test_a_bad_last_candle_is_skipped_and_the_forecast_continues_the_last_good_one(seeded):
    closes = [1.0 + 0.01 * (index % 7) for index in range(300)] + [float("nan")]
    start = _write_candles("X:ADAUSDT", closes)
    status, _, body = create({"symbol": "ADAUSDT", "timeframe": "1h"})
    assert status == 201, body
    assert body["last_close"] == pytest.approx(closes[-2])
    assert datetime.fromisoformat(body["last_candle_at"]) == datetime.fromtimestamp(start + 299 * 3600, UTC)


def _raw_candle_file(closes: list[float], start: int = 1_599_998_400) -> bytes:  # on the hour
    import numpy as np

    from candlecast.candles import Candles

    close = np.asarray(closes, dtype=float)
    return storage.candles_to_parquet(Candles(
        open_time=np.arange(len(close), dtype=np.int64) * 3600 + start, open=close, high=close * 1.01,
        low=close * 0.99, close=close, volume=np.ones(len(close))))


BAD_CLOSES = [1.0 + 0.01 * (index % 7) for index in range(300)]
FIXED_CLOSES = [10 * close for close in BAD_CLOSES]  # the same open times: a shifted decimal point, fixed


def test_a_candle_file_fixed_in_place_is_a_new_request_not_a_repeat(seeded):
    """Audit K: the repeat-request hash named only the last open time, so after the file was fixed (same open
    times) a retry without a key got the prediction from the bad file (200 X-Cache HIT). The hash covers the
    candles' content: once the fixed file is read (the cached candles gone, as after their TTL), it is new."""
    from candlecast import cache

    key = storage.candles_key("X:ADAUSDT", "1h")
    storage.put_bytes(key, _raw_candle_file(BAD_CLOSES))
    status, _, first = create({"symbol": "ADAUSDT", "timeframe": "1h"})
    assert status == 201 and first["last_close"] == pytest.approx(BAD_CLOSES[-1])
    storage.s3_client().put_object(Bucket=seeded.bucket, Key=key, Body=_raw_candle_file(FIXED_CLOSES))
    cache.delete(cache.keys.candles("X:ADAUSDT", "1h"))  # expired; the request pointer is still there
    status, headers, fixed = create({"symbol": "ADAUSDT", "timeframe": "1h"})
    assert (status, headers.get("X-Cache")) == (201, None)
    assert fixed["id"] != first["id"] and fixed["last_close"] == pytest.approx(FIXED_CLOSES[-1])
    status, headers, again = create({"symbol": "ADAUSDT", "timeframe": "1h"})
    assert (status, headers.get("X-Cache"), again["id"]) == (200, "HIT", fixed["id"])  # repeats still are


def test_a_candle_file_replaced_by_the_operator_is_used_by_the_next_forecast(seeded, tmp_path):
    """Audit K: after the operator replaced a bad candle file, forecasts still came from the cached bad candles
    for up to an hour. `candlecast put-candles` drops them (seed no longer replaces a file the bucket holds:
    tests/test_seed.py)."""
    from candlecast import cli

    storage.put_bytes(storage.candles_key("X:ADAUSDT", "1h"), _raw_candle_file(BAD_CLOSES))
    status, _, first = create({"symbol": "ADAUSDT", "timeframe": "1h"}, {"Idempotency-Key": "before-the-fix"})
    assert status == 201 and first["last_close"] == pytest.approx(BAD_CLOSES[-1])
    fixed_file = tmp_path / "fixed.parquet"
    fixed_file.write_bytes(_raw_candle_file(FIXED_CLOSES))
    assert cli.main(["put-candles", str(fixed_file), "--symbol", "ADA-USDT", "--timeframe", "1h"]) == 0
    for headers in ({}, {"Idempotency-Key": "after-the-fix"}):
        status, _, body = create({"symbol": "ADAUSDT", "timeframe": "1h"}, headers)
        assert status == 201 and body["last_close"] == pytest.approx(FIXED_CLOSES[-1])


@pytest.mark.parametrize("bad", ["not parquet", "1d at 04:00Z", "1h a year ahead"])
def test_put_candles_refuses_a_file_every_read_would_refuse_and_changes_nothing(seeded, tmp_path, capsys, bad):
    """Audit N: put-candles checked `damage()` without the timeframe or now, so a 1d file of Polygon's daily bars
    stamped at US/Eastern midnight (04:00Z) or a 1h file a year ahead was stored (exit 0), and every forecast from
    it was then a 503 candle_file_invalid. It checks with the read path's own check (`storage.candle_damage`)."""
    import time

    import numpy as np

    from candlecast import cli
    from candlecast.candles import Candles

    timeframe = "1d" if bad == "1d at 04:00Z" else "1h"
    key = storage.candles_key("X:ADAUSDT", timeframe)
    before = storage.get_bytes(key)  # the sample's
    assert before is not None
    junk = tmp_path / "junk.parquet"
    if bad == "not parquet":
        junk.write_bytes(b"PAR1 not parquet PAR1")
    else:
        start, step = ((1_599_955_200 + 4 * 3600, 86400) if timeframe == "1d"  # 2020-09-13T04:00Z, daily
                       else (int(time.time()) // 3600 * 3600 + 365 * 86400, 3600))
        close = np.asarray(BAD_CLOSES)
        junk.write_bytes(storage.candles_to_parquet(Candles(
            open_time=start + step * np.arange(len(close), dtype=np.int64), open=close, high=close * 1.01,
            low=close * 0.99, close=close, volume=np.ones(len(close)))))
    assert cli.main(["put-candles", str(junk), "--symbol", "ADAUSDT", "--timeframe", timeframe]) == 1
    assert storage.get_bytes(key) == before
    assert f"is not a usable {timeframe} candle file (" in capsys.readouterr().err


def test_an_unreadable_candle_file_is_503(seeded):
    from candlecast import cache

    storage.put_bytes(storage.candles_key("X:ADAUSDT", "1h"), b"PAR1 this is not parquet PAR1")
    cache.delete(cache.keys.candles("X:ADAUSDT", "1h"))
    status, _, body = create({"symbol": "ADAUSDT", "timeframe": "1h"})
    assert status == 503
    assert body["error"]["code"] == "candle_file_invalid"
    assert "unreadable" in body["error"]["message"]


def test_a_missing_signing_key_is_503_naming_it(seeded, monkeypatch, caplog):
    """Named by the code and the log line; the answer's message says nothing of the configuration."""
    import logging

    from candlecast.config import get_settings
    from candlecast.services import model_loading

    monkeypatch.delenv("MODEL_SIGNING_KEY")
    get_settings.cache_clear()
    model_loading.forget_models()
    try:
        with caplog.at_level(logging.ERROR):
            status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1h"})
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        model_loading.forget_models()
    assert (status, body["error"]["code"]) == (503, "model_signing_key_missing")
    assert "MODEL_SIGNING_KEY" not in body["error"]["message"]
    [record] = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert "MODEL_SIGNING_KEY" in record.reason


@pytest.fixture
def shipped_models(tmp_path, monkeypatch):
    """A function folder holding the committed models, as functions/predictions_create/Makefile ships them."""
    from candlecast.services import model_loading

    (tmp_path / "models").mkdir()
    for model in (ROOT / "models").glob("*.pkl"):
        (tmp_path / "models" / model.name).write_bytes(model.read_bytes())
    monkeypatch.setenv("LAMBDA_TASK_ROOT", str(tmp_path))
    model_loading.forget_models()
    yield tmp_path / "models"
    model_loading.forget_models()


def _active_1h_key(database_url: str) -> str:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT s3_key FROM models WHERE timeframe = '1h' AND is_active").fetchone()[0]


def test_the_shipped_model_is_used_without_the_bucket_when_it_is_the_registered_one(seeded, shipped_models):
    key = _active_1h_key(seeded.database_url)
    storage.s3_client().delete_object(Bucket=seeded.bucket, Key=key)  # only the shipped copy is left
    status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1h"})
    assert status == 201, body


def test_a_shipped_model_that_is_not_the_registered_one_is_ignored_for_the_bucket(seeded, shipped_models):
    shipped = shipped_models / "1h.pkl"
    shipped.write_bytes(shipped.read_bytes() + b"stale")  # another file than the registered one
    status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1h"})
    assert status == 201, body  # read and verified from the bucket


def test_a_stage_with_a_key_of_its_own_uses_the_shipped_model(seeded, shipped_models, monkeypatch):
    """A deployed stage refuses the development key the committed signatures carry; `seed --resign` signs the
    bucket's copies with the stage's key. The shipped file is the registered one, so it is used as it is."""
    from candlecast import seed
    from candlecast.config import get_settings

    monkeypatch.setenv("STAGE", "prod")
    monkeypatch.setenv("MODEL_SIGNING_KEY", "a-key-of-this-stage-only")
    get_settings.cache_clear()
    try:
        seed.register_models(seed.checked_models(ROOT / "models", resign=True), progress=False)
        storage.s3_client().delete_object(Bucket=seeded.bucket, Key=_active_1h_key(seeded.database_url))
        status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1h"})
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert status == 201, body


def test_a_stored_symbol_is_forecast_from_the_candles_that_closed_since_the_refresh(seeded, monkeypatch):
    """The bucket's file ends where the last refresh left it (the sample: years ago). With a Polygon key, the
    forecast starts from the last closed candle, so its steps lie ahead of the clock, not in the past."""
    from candlecast import polygon
    from candlecast.config import get_settings
    from candlecast.ingest import SETTLE_SECONDS
    from tests.fake_polygon import FakeMarket, FakePolygon, FakeSymbol

    now = int(time.time())
    stored = storage.read_candles(SAMPLE_TICKER, "1h", 10)
    market = FakeMarket([FakeSymbol(SAMPLE_TICKER, "BTC", "USDT", "Bitcoin - Tether", price=float(stored.close[-1]),
                                    listed_at=now - 60 * 86400)], now=now)
    with FakePolygon(market) as fake:
        monkeypatch.setenv("POLYGON_API_KEY", "test-key")
        monkeypatch.setenv("POLYGON_BASE_URL", fake.url)
        get_settings.cache_clear()
        polygon.reset_client()
        try:
            status, _, body = create({"symbol": "BTC-USDT", "timeframe": "1h"})
        finally:
            polygon.reset_client()
            get_settings.cache_clear()
    answered = int(time.time())
    assert status == 201, body

    def last_settled_open(at: int) -> int:  # a bar counts once closed for SETTLE_SECONDS
        return (at - SETTLE_SECONDS) // 3600 * 3600 - 3600

    last_candle_at = int(datetime.fromisoformat(body["last_candle_at"]).timestamp())
    assert last_settled_open(now) <= last_candle_at <= last_settled_open(answered)
    assert int(datetime.fromisoformat(body["steps"][0]["ts"]).timestamp()) == last_candle_at + 3600
    assert fake.count("/range/1/hour/") == 1


def _new_container():
    from candlecast.config import get_settings
    from candlecast.services import model_loading

    get_settings.cache_clear()
    model_loading.forget_models()


def _all_signed_with(bucket_keys: list[str], key: bytes) -> bool:
    from candlecast.forecast.artifact import sign

    return all(storage.get_bytes(storage.signature_key(name)).decode() == sign(storage.get_bytes(name), key)
               for name in bucket_keys)


def test_a_signing_key_rotation_without_an_outage(seeded, monkeypatch):
    """Audit K: one key only, so a rotation always failed every cold create (503 model_integrity) until the files
    were re-signed, and then failed every container still on the old key; `seed --resign` re-uploaded data/ and
    re-registered. Now: the new key as current with the old as previous accepts both; `candlecast resign-models`
    re-signs the registered files' .sig in place; then the previous key is dropped."""
    from candlecast import cli
    from candlecast.config import LOCAL_MODEL_SIGNING_KEY

    with psycopg.connect(seeded.database_url) as conn:
        registered = [row[0] for row in conn.execute("SELECT s3_key FROM models").fetchall()]
        timeframes = [row[0] for row in conn.execute("SELECT timeframe FROM models WHERE is_active").fetchall()]
        rows_before = conn.execute("SELECT id, s3_key, sha256, is_active FROM models ORDER BY id").fetchall()
    active_copies = [storage.active_model_key(timeframe) for timeframe in timeframes]
    data_before = storage.head_etag(storage.candles_key(SAMPLE_TICKER, "1h"))
    new_key = "the-rotated-key-of-this-stage"
    try:
        monkeypatch.setenv("MODEL_SIGNING_KEY", new_key)  # rotated, files still under the old key
        _new_container()
        status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1h"})
        assert (status, body["error"]["code"]) == (503, "model_integrity")

        monkeypatch.setenv("MODEL_SIGNING_KEY_PREVIOUS", LOCAL_MODEL_SIGNING_KEY)  # step 1: new + previous
        _new_container()
        assert create({"symbol": "BTCUSDT", "timeframe": "1h"})[0] == 201  # an old-key file, accepted

        assert cli.main(["resign-models"]) == 0  # step 2
        assert _all_signed_with(registered + active_copies, new_key.encode())
        assert cli.main(["resign-models"]) == 0  # again: nothing to do
        with psycopg.connect(seeded.database_url) as conn:
            rows_after = conn.execute("SELECT id, s3_key, sha256, is_active FROM models ORDER BY id").fetchall()
        assert rows_after == rows_before
        assert storage.head_etag(storage.candles_key(SAMPLE_TICKER, "1h")) == data_before  # no data re-uploaded

        monkeypatch.delenv("MODEL_SIGNING_KEY_PREVIOUS")  # step 3: the old key dropped
        _new_container()
        assert create({"symbol": "BTCUSDT", "timeframe": "4h"})[0] == 201

        monkeypatch.setenv("MODEL_SIGNING_KEY", LOCAL_MODEL_SIGNING_KEY)  # the old key alone no longer verifies
        _new_container()
        status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1d"})
        assert (status, body["error"]["code"]) == (503, "model_integrity")
    finally:
        monkeypatch.undo()
        _new_container()


def test_resign_models_refuses_a_tampered_file_and_leaves_it_unsigned_for_the_new_key(seeded, monkeypatch):
    from candlecast import cli
    from candlecast.config import LOCAL_MODEL_SIGNING_KEY

    with psycopg.connect(seeded.database_url) as conn:
        key = conn.execute("SELECT s3_key FROM models WHERE timeframe = '1h' AND is_active").fetchone()[0]
    data = bytearray(storage.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    storage.put_bytes(key, bytes(data))
    old_signature = storage.get_bytes(storage.signature_key(key))
    try:
        monkeypatch.setenv("MODEL_SIGNING_KEY", "the-rotated-key-of-this-stage")
        monkeypatch.setenv("MODEL_SIGNING_KEY_PREVIOUS", LOCAL_MODEL_SIGNING_KEY)
        _new_container()
        assert cli.main(["resign-models"]) == 1
        assert storage.get_bytes(storage.signature_key(key)) == old_signature
    finally:
        monkeypatch.undo()
        _new_container()


@pytest.mark.parametrize(("hours_behind", "age"), [(1, 0), (2, 1), (24 * 90, 24 * 90 - 1)])
def test_a_prediction_says_how_many_candles_it_was_behind_when_it_was_made(seeded, hours_behind, age, caplog):
    """Audit K: candles 90 days old gave 30 steps all in the past and nothing said so. The age is the candles
    that had closed after the last one when the forecast was made, so a GET later says the same."""
    now = int(time.time())
    last_open = now - now % 3600 - hours_behind * 3600
    _write_candles("X:ADAUSDT", [1.0 + 0.01 * (index % 7) for index in range(300)], start=last_open - 299 * 3600)
    status, _, body = create({"symbol": "ADAUSDT", "timeframe": "1h"})
    assert status == 201, body
    if int(time.time()) // 3600 != now // 3600:
        pytest.skip("the hour turned during the create")
    assert (body["data_age_bars"], body["stale"]) == (age, age > 0)
    said = [record.levelname for record in caplog.records if record.getMessage() == "forecast from stale candles"]
    assert said == (["INFO"] if age else [])  # not a WARNING per successful create
    status, _, fetched = get(body["id"])
    assert (status, fetched["data_age_bars"], fetched["stale"]) == (200, age, age > 0)


def test_the_committed_sample_is_served_as_stale(seeded):
    status, _, body = create({"symbol": "BTCUSDT", "timeframe": "1d"})
    assert status == 201, body
    assert body["stale"] is True and body["data_age_bars"] > 365


@pytest.mark.parametrize("timeframe", ["1h", "1w"])
def test_a_series_of_flat_zero_volume_fills_is_404_no_trades_not_a_forecast(seeded, timeframe):
    """Audit K: a constant price in zero-volume flat rows (an outage's fills) was forecast with confidence
    0.9999 and ±0.006 % intervals: usable_candles keeps flat rows when fewer than 3 others are left."""
    import numpy as np

    from candlecast.candles import Candles
    from candlecast.forecast.features import CONFIGS
    from candlecast.timeframes import add_steps

    rows = 200
    first = datetime(2015, 1, 5, tzinfo=UTC)  # a Monday
    times = np.array([int(add_steps(first, timeframe, n).timestamp()) for n in range(rows)], dtype=np.int64)
    price, volume = np.full(rows, 100.0), np.zeros(rows)
    volume[-2:] = 1.0  # two traded candles: fewer than any model's warm-up
    storage.write_candles("X:ADAUSDT", timeframe, Candles(times, price, price, price, price, volume))
    status, _, body = create({"symbol": "ADAUSDT", "timeframe": timeframe})
    assert (status, body["error"]["code"]) == (404, "no_trades"), body
    assert "2 " in body["error"]["message"] and f"at least {CONFIGS[timeframe].min_history}" in body["error"]["message"]
