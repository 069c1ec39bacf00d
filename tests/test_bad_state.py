"""Stored state and dependencies that misbehave without being down: values in Redis this service did not
write, damaged candle files, and Secrets Manager failing. Each is a clear answer (a miss, a 503 naming the
dependency with Retry-After), never a 500 and never a foreign body served as ours."""

import json
import os
from datetime import UTC, datetime

import pytest
import redis

from candlecast import cache
from tests.conftest import invoke, load_event, path_event
from tests.test_predictions import create, get

pytestmark = [pytest.mark.integration, pytest.mark.s3]

FOREIGN = [b"\xff\xfe not utf-8", b"not json", b"42"]


def _reads(prediction_id: str) -> dict:
    """Each cached read route: (function, event) and the cache key its answer is kept under."""
    return {
        cache.keys.prediction(prediction_id): (
            "predictions_get", path_event("prediction_get.json", f"/predictions/{prediction_id}", id=prediction_id)),
        cache.keys.symbol("X:BTCUSDT"): (
            "symbols", path_event("symbol_get.json", "/symbols/BTCUSDT", ticker="BTCUSDT")),
        cache.keys.top_symbols(10): ("symbols", load_event("symbols_top.json")),
        cache.keys.search("btc", 5): ("symbols", load_event("symbols_search.json")),
        cache.keys.track_record(None): ("symbols", load_event("models_list.json")),
        cache.keys.track_record("1h"): ("symbols", path_event("model_get.json", "/models/1h", timeframe="1h")),
    }


@pytest.mark.parametrize("foreign", FOREIGN, ids=["binary", "text", "number"])
def test_a_foreign_value_under_a_cache_key_is_a_miss_and_the_answer_is_the_stored_one(seeded, foreign):
    status, _, created = create({"symbol": "BTCUSDT", "timeframe": "1h"})
    assert status == 201
    server = redis.Redis.from_url(seeded.redis_url)
    for key, (function, event) in _reads(created["id"]).items():
        server.delete(key)
        expected = invoke(function, event)
        assert expected[0] == 200, (key, expected)
        server.set(key, foreign)
        assert invoke(function, event)[::2] == expected[::2], key
    # A create reads the candles and the request pointer; foreign values there are misses too.
    server.set(cache.keys.candles("X:BTCUSDT", "1h"), foreign)
    server.set(cache.keys.prediction_request("X:BTCUSDT", "1h"), foreign)
    server.set(cache.keys.prediction(created["id"]), foreign)
    status, _, repeat = create({"symbol": "BTCUSDT", "timeframe": "1h"})
    assert (status, repeat) == (200, created), repeat
    assert get(created["id"])[2] == created


# --- Secrets Manager ----------------------------------------------------------------------------


@pytest.fixture
def stalled_endpoint():
    """A TCP endpoint that accepts connections and never answers (a stalled dependency)."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(2)
    for connection in held:
        connection.close()
    listener.close()


def _secret_from(stack, monkeypatch, endpoint: str | None, variable: str, value: str | None) -> None:
    """`variable` names a secret in moto holding `value` (None: a secret that does not exist); Secrets Manager is
    reached at `endpoint` (None: moto). A new container: no settings, pool or secret read before."""
    from tests.conftest import moto_secret, reset_clients

    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:candlecast-missing-AbCdEf"
    if value is not None:
        arn = moto_secret(stack, value, "candlecast/bad")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", endpoint or stack.s3_endpoint_url)
    monkeypatch.delenv(variable.removesuffix("_SECRET_ARN") if variable != "DB_SECRET_ARN" else "DATABASE_URL",
                       raising=False)
    monkeypatch.setenv(variable, arn)
    reset_clients()


@pytest.fixture
def new_container(seeded, monkeypatch):
    from candlecast.services import model_loading
    from tests.conftest import reset_clients

    model_loading.forget_models()
    yield monkeypatch
    monkeypatch.undo()
    reset_clients()
    model_loading.forget_models()


CANARY = "canary-secret-value-7f3a"


@pytest.mark.parametrize(("value", "code"), [
    (None, "secrets_unavailable"),
    (CANARY + " {not json", "secret_invalid"),
    (json.dumps({"host": "db.internal", "username": "app", "note": CANARY}), "secret_invalid"),
], ids=["missing", "not-json", "no-password"])
def test_a_database_secret_that_cannot_be_read_is_a_503_naming_it(new_container, seeded, value, code, capfd):
    _secret_from(seeded, new_container, None, "DB_SECRET_ARN", value)
    for function, event in [("symbols", path_event("symbol_get.json", "/symbols/BTCUSDT", ticker="BTCUSDT")),
                            ("predictions_create", load_event("predictions_create.json"))]:
        status, headers, body = invoke(function, event)
        assert (status, body["error"]["code"]) == (503, code), body
        assert headers.get("Retry-After", "").isdigit()
    logged = capfd.readouterr()
    assert CANARY not in logged.out + logged.err


def test_a_signing_key_secret_that_cannot_be_read_is_a_503_naming_it(new_container, seeded):
    _secret_from(seeded, new_container, None, "MODEL_SIGNING_KEY_SECRET_ARN", None)
    status, headers, body = invoke("predictions_create", load_event("predictions_create.json"))
    assert (status, body["error"]["code"]) == (503, "secrets_unavailable"), body
    assert headers.get("Retry-After", "").isdigit()


def test_a_stalled_secrets_manager_fails_a_request_in_seconds_not_at_the_function_timeout(
        new_container, seeded, stalled_endpoint):
    import time

    _secret_from(seeded, new_container, stalled_endpoint, "DB_SECRET_ARN", None)
    started = time.monotonic()
    status, _, body = invoke("symbols", path_event("symbol_get.json", "/symbols/BTCUSDT", ticker="BTCUSDT"))
    elapsed = time.monotonic() - started
    assert (status, body["error"]["code"]) == (503, "secrets_unavailable"), body
    assert elapsed < 4.0, f"{elapsed:.1f} s"


# --- damaged candle files -----------------------------------------------------------------------


def _table(**changes):
    import numpy as np
    import pyarrow as pa

    rows = 300
    close = np.linspace(1.0, 2.0, rows)
    columns = {"open_time": np.arange(rows, dtype=np.int64) * 3600 + 1_599_998_400, "open": close,
               "high": close * 1.01, "low": close * 0.99, "close": close, "volume": np.ones(rows)}
    columns.update(changes)
    return pa.table({name: value for name, value in columns.items() if value is not None})


def _parquet(table, **options) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return sink.getvalue().to_pybytes()


DAMAGED = {
    "no-close-column": lambda: _parquet(_table(close=None)),
    "capitalised-columns": lambda: _parquet(_table().rename_columns(["Open_Time", "Open", "High", "Low", "Close",
                                                                    "Volume"])),
    "text-prices": lambda: _parquet(_table(close=["n/a"] * 300)),
    "times-past-year-9999": lambda: _parquet(_table(open_time=_table()["open_time"].to_numpy() + 10**13)),
    "times-in-milliseconds": lambda: _parquet(_table(open_time=_table()["open_time"].to_numpy() * 1000)),
    "not-parquet": lambda: b"PAR1 this is not parquet PAR1",
    "zero-bytes": lambda: b"",
    "truncated": lambda: _parquet(_table())[:-100],
}


def _put_candle_file(data: bytes) -> None:
    from candlecast import storage

    storage.put_bytes(storage.candles_key("X:ADAUSDT", "1h"), data)
    cache.delete(cache.keys.candles("X:ADAUSDT", "1h"))


@pytest.mark.parametrize("damage", DAMAGED, ids=list(DAMAGED))
def test_a_damaged_candle_file_is_refused_by_name_not_as_an_outage_and_nothing_is_stored(seeded, damage, caplog):
    """No retry mends such a file: 503 candle_file_invalid with a long Retry-After (an S3 outage is
    storage_unavailable, Retry-After 2), and one log line, naming the file and its problem (the API's 'request
    failed' line for the same cause was a second)."""
    from candlecast import storage
    from tests.test_predictions import stored_predictions

    _put_candle_file(DAMAGED[damage]())
    before = stored_predictions(seeded.database_url)
    status, headers, body = create({"symbol": "ADAUSDT", "timeframe": "1h"})
    assert (status, body["error"]["code"]) == (503, "candle_file_invalid"), body
    assert "X:ADAUSDT" in body["error"]["message"] and int(headers["Retry-After"]) >= 60
    assert stored_predictions(seeded.database_url) == before
    [record] = [record for record in caplog.records if record.getMessage().startswith("invalid candle file")]
    assert record.key == storage.candles_key("X:ADAUSDT", "1h") and record.problem
    assert not [record for record in caplog.records if record.getMessage() == "request failed"]


def test_an_invalid_candle_file_is_not_read_again_until_it_changes(seeded, monkeypatch):
    from candlecast import storage

    _put_candle_file(DAMAGED["times-in-milliseconds"]())
    reads = []
    read_tail = storage._read_tail
    monkeypatch.setattr(storage, "_read_tail", lambda *args: reads.append(1) or read_tail(*args))
    for _ in range(2):
        status, _, body = create({"symbol": "ADAUSDT", "timeframe": "1h"})
        assert (status, body["error"]["code"]) == (503, "candle_file_invalid")
    assert len(reads) == 1
    _put_candle_file(_parquet(_table()))  # repaired: a new ETag
    status, _, body = create({"symbol": "ADAUSDT", "timeframe": "1h"})
    assert status == 201, body
    assert len(reads) == 2


def test_rows_out_of_order_or_repeated_are_sorted_and_deduplicated_at_read(seeded):
    """A file this service did not write may hold its rows unsorted or twice: read as `normalize_candles` writes
    them (sorted, the last of repeated rows wins), from the whole file when the tail's row groups are out of order."""

    import numpy as np
    import pyarrow as pa

    from candlecast import storage

    rows = 3000  # three row groups, the newest candles first: the last group holds the oldest
    close = np.linspace(1.0, 2.0, rows)
    times = np.arange(rows, dtype=np.int64) * 3600 + 1_599_998_400
    backwards = _table(open_time=times[::-1].copy(), open=close[::-1].copy(), high=close[::-1] * 1.01,
                       low=close[::-1] * 0.99, close=close[::-1].copy(), volume=np.ones(rows))
    _put_candle_file(_parquet(backwards, row_group_size=storage.ROW_GROUP_SIZE))
    status, _, body = create({"symbol": "ADAUSDT", "timeframe": "1h"})
    assert status == 201, body
    assert body["last_close"] == pytest.approx(2.0)
    assert datetime.fromisoformat(body["last_candle_at"]) == datetime.fromtimestamp(int(times[-1]), UTC)

    table = _table()
    last = table.slice(table.num_rows - 1, 1)
    last = last.set_column(4, "close", pa.array([9.0])).set_column(2, "high", pa.array([9.5]))
    _put_candle_file(_parquet(pa.concat_tables([table, last])))
    status, _, body = create({"symbol": "ADAUSDT", "timeframe": "1h"})
    assert status == 201, body
    assert body["last_close"] == pytest.approx(9.0)  # the later of the two rows with the last open time


# --- a rotated database password ----------------------------------------------------------------


@pytest.fixture
def password_role(seeded, needs_embedded_postgres):
    """A role that must give its password (scram), though the embedded server trusts every other role."""
    import psycopg

    with psycopg.connect(seeded.database_url, autocommit=True) as conn:
        hba_file = conn.execute("SHOW hba_file").fetchone()[0]
        with open(hba_file) as file:
            trusted = file.read()
        with open(hba_file, "w") as file:
            file.write("local all rotated scram-sha-256\nhost all rotated 127.0.0.1/32 scram-sha-256\n" + trusted)
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("DROP ROLE IF EXISTS rotated")
        conn.execute("CREATE ROLE rotated LOGIN PASSWORD 'first-password'")
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO rotated")
    yield
    with psycopg.connect(seeded.database_url, autocommit=True) as conn:
        with open(hba_file, "w") as file:
            file.write(trusted)
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'rotated'")
        conn.execute("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM rotated")
        conn.execute("DROP ROLE rotated")


def test_a_rotated_database_password_is_picked_up_without_a_new_container(new_container, seeded, password_role):
    import time

    import boto3
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(seeded.database_url)
    secret = {"host": params["host"], "port": int(params.get("port") or 5432), "dbname": params["dbname"],
              "username": "rotated", "password": "first-password", "sslmode": "disable"}
    _secret_from(seeded, new_container, None, "DB_SECRET_ARN", json.dumps(secret))
    event = path_event("symbol_get.json", "/symbols/BTCUSDT", ticker="BTCUSDT")
    assert invoke("symbols", event)[0] == 200
    arn = os.environ["DB_SECRET_ARN"]
    # Rotation as Secrets Manager does it: the role's password and the secret change, old sessions end.
    with psycopg.connect(seeded.database_url, autocommit=True) as conn:
        conn.execute("ALTER ROLE rotated PASSWORD 'second-password'")
        boto3.client("secretsmanager", endpoint_url=seeded.s3_endpoint_url, region_name="us-east-1").put_secret_value(
            SecretId=arn, SecretString=json.dumps({**secret, "password": "second-password"}))
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'rotated'")
    server = redis.Redis.from_url(seeded.redis_url)
    answers, deadline = [], time.monotonic() + 10
    while time.monotonic() < deadline:
        server.delete(cache.keys.symbol("X:BTCUSDT"))
        status, headers, body = invoke("symbols", event)
        answers.append(status)
        if status == 200:
            break
        assert (status, body["error"]["code"]) == (503, "database_unavailable") and "Retry-After" in headers
        time.sleep(0.5)
    assert answers[-1] == 200, answers


# --- a models row whose registered figures are malformed ----------------------------------------


@pytest.mark.parametrize("metrics", [
    [],
    {"test": {"per_horizon": [{"n_pairs": 3}]}},
    {"comparison": {"reference": "learned", "methods": {}}},
    {"comparison": {"reference": "learned", "methods": {"learned": {"per_horizon": {"coverage_80": [0.8],
                                                                                      "coverage_95": []}}}}},
    {"test": {"coverage_80": "high"}},
], ids=["a-list", "horizon-without-h", "no-reference", "ragged-horizons", "text-figure"])
def test_malformed_registered_figures_leave_the_model_listed_without_them(seeded, metrics):
    import psycopg
    from psycopg.types.json import Jsonb

    with psycopg.connect(seeded.database_url, autocommit=True) as conn:
        conn.execute("UPDATE models SET metrics = %s WHERE timeframe = '1h' AND is_active", (Jsonb(metrics),))
    for function, event in [("symbols", load_event("models_list.json")),
                            ("symbols", path_event("model_get.json", "/models/1h", timeframe="1h"))]:
        status, _, body = invoke(function, event)
        assert status == 200, body
        record = next(item for item in body if item["timeframe"] == "1h") if isinstance(body, list) else body
        assert record["backtest"]["coverage_80"] is None and record["model"]["name"]


OFF_GRID = {  # (timeframe, first open time, step): a series off its timeframe's grid
    "1m-on-the-31st": ("1m", "2024-01-31", "month"),
    "1d-at-noon": ("1d", "2024-01-01T12:00:00", 86400),
    "4h-at-02": ("4h", "2024-01-01T02:00:00", 4 * 3600),
    "1w-on-sundays": ("1w", "2024-01-07", 7 * 86400),
}


@pytest.mark.parametrize("case", OFF_GRID, ids=list(OFF_GRID))
def test_a_candle_file_off_its_timeframes_grid_is_refused_not_continued_off_it(seeded, case):
    """Audit K: 1m candles on the 31st were a 500 (no 31st in the next month), 1d candles at noon were
    continued at noon."""
    import numpy as np
    from dateutil.relativedelta import relativedelta

    from candlecast import storage
    from candlecast.candles import Candles

    timeframe, first, step = OFF_GRID[case]
    start = datetime.fromisoformat(first).replace(tzinfo=UTC)
    rows = 60
    if step == "month":
        times = [int((start + relativedelta(months=n)).timestamp()) for n in range(rows)]
    else:
        times = [int(start.timestamp()) + n * step for n in range(rows)]
    close = np.linspace(1.0, 2.0, rows)
    candles = Candles(np.asarray(times, dtype=np.int64), close, close * 1.01, close * 0.99, close, np.ones(rows))
    storage.put_bytes(storage.candles_key("X:ADAUSDT", timeframe), storage.candles_to_parquet(candles))
    cache.delete(cache.keys.candles("X:ADAUSDT", timeframe))
    status, _, body = create({"symbol": "ADAUSDT", "timeframe": timeframe})
    assert (status, body["error"]["code"]) == (503, "candle_file_invalid"), body


def test_a_candle_file_with_open_times_in_the_future_is_refused(seeded):
    """Audit K: a row dated 2031 gave a 201 whose steps were all in 2031-2032, and kept the catch-up from
    Polygon from ever extending the file."""
    import time

    import numpy as np

    from candlecast import storage
    from candlecast.candles import Candles

    rows, day = 300, 86400
    now = int(time.time()) // day * day
    times = np.arange(rows, dtype=np.int64) * day + now - (rows - 1) * day
    times[-1] = now + 5 * 365 * day
    close = np.linspace(1.0, 2.0, rows)
    storage.put_bytes(storage.candles_key("X:ADAUSDT", "1d"),
                      storage.candles_to_parquet(Candles(times, close, close * 1.01, close * 0.99, close,
                                                         np.ones(rows))))
    cache.delete(cache.keys.candles("X:ADAUSDT", "1d"))
    status, _, body = create({"symbol": "ADAUSDT", "timeframe": "1d"})
    assert (status, body["error"]["code"]) == (503, "candle_file_invalid"), body
    assert "X:ADAUSDT" in body["error"]["message"]
