"""The repositories against real PostgreSQL: each query's rows, order and limits, and the create race made
visible (a trigger holds every insert open long enough for unserialised twins to collide)."""

import threading
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg.rows import dict_row

from candlecast.errors import Conflict
from candlecast.repositories import models as model_repository
from candlecast.repositories import predictions as prediction_repository
from candlecast.repositories import symbols as symbol_repository
from candlecast.schemas import ModelCreate, PredictionCreate, PredictionStepCreate, SymbolCreate

pytestmark = pytest.mark.integration


@pytest.fixture
def conn(clean_db):
    with psycopg.connect(clean_db.database_url, autocommit=True, row_factory=dict_row) as connection:
        yield connection


def add_symbols(conn, *rows):
    symbol_repository.upsert_symbols(conn, [
        SymbolCreate(ticker=ticker, name=name, base_currency=ticker[2:5], quote_currency="USD", volume_24h=volume,
                     volume_rank=None) for ticker, name, volume in rows])


def add_model(conn, timeframe="1d", version="1", activate=True):
    return model_repository.register_model(conn, ModelCreate(
        timeframe=timeframe, name=f"m-{timeframe}", version=version, kind="baseline",
        s3_key=f"models/{timeframe}/{version}.pkl", sha256="a" * 64), activate=activate)


def steps(start: datetime):
    return [{"step": n, "ts": start + timedelta(days=n), "open": 100.0, "high": 140.0, "low": 90.0, "close": 100.0 + n,
             "lower_80": 95.0, "upper_80": 105.0 + n, "lower_95": 90.0, "upper_95": 111.0 + n, "confidence": 0.5}
            for n in range(1, 31)]


def prediction(conn, key: str | None = None, *, ticker="X:BTCUSD", model_id=None,
               last=datetime(2024, 1, 1, tzinfo=UTC)):
    symbol = symbol_repository.get_symbol_by_ticker(conn, ticker)
    return PredictionCreate(symbol_id=symbol["id"], ticker=ticker, timeframe="1d", model_id=model_id,
                            last_candle_at=last, last_close=100.0, idempotency_key=key, steps=steps(last))


# ---------------------------------------------------------------------------------------- symbols


def test_upsert_updates_in_place_and_lookup_by_ticker(conn):
    add_symbols(conn, ("X:BTCUSD", "Bitcoin", 10))
    add_symbols(conn, ("X:BTCUSD", "Bitcoin Renamed", 20))
    row = symbol_repository.get_symbol_by_ticker(conn, "X:BTCUSD")
    assert (row["name"], float(row["volume_24h"]), row["is_active"]) == ("Bitcoin Renamed", 20.0, True)
    assert conn.execute("SELECT count(*) AS n FROM symbols").fetchone()["n"] == 1
    assert symbol_repository.get_symbol_by_ticker(conn, "X:NOPEUSD") is None
    symbol_repository.upsert_symbol(conn, SymbolCreate(ticker="X:ETHUSD", name="Ethereum", base_currency="ETH",
                                                       quote_currency="USD"))
    assert symbol_repository.get_symbol_by_ticker(conn, "X:ETHUSD")["name"] == "Ethereum"
    assert symbol_repository.upsert_symbols(conn, []) == 0


def test_a_refresh_of_some_timeframes_keeps_the_others_stored_through(conn):
    add_symbols(conn, ("X:BTCUSD", "Bitcoin", 10))
    symbol_repository.set_candle_timeframes(conn, "X:BTCUSD", ["1d", "1h"],
                                            {"1h": "2026-01-01T10:00:00+00:00", "1d": "2025-12-31T00:00:00+00:00"},
                                            lock_timeout=1.0)
    symbol_repository.set_candle_timeframes(conn, "X:BTCUSD", ["1d", "1h"], {"1h": "2026-01-08T10:00:00+00:00"},
                                            lock_timeout=1.0)
    metadata = conn.execute("SELECT metadata FROM symbols WHERE ticker = 'X:BTCUSD'").fetchone()["metadata"]
    assert metadata["candle_timeframes"] == ["1d", "1h"]
    assert metadata["candles_through"] == {"1h": "2026-01-08T10:00:00+00:00", "1d": "2025-12-31T00:00:00+00:00"}


def test_top_by_volume_orders_limits_pages_and_skips_inactive(conn):
    add_symbols(conn, ("X:AAAUSD", "A", 30), ("X:BBBUSD", "B", 20), ("X:CCCUSD", "C", 10), ("X:DDDUSD", "D", None))
    tickers = lambda rows: [row["ticker"] for row in rows]  # noqa: E731
    assert tickers(symbol_repository.get_top_symbols_by_volume(conn, 10)) == ["X:AAAUSD", "X:BBBUSD", "X:CCCUSD",
                                                                              "X:DDDUSD"]
    assert tickers(symbol_repository.get_top_symbols_by_volume(conn, 2)) == ["X:AAAUSD", "X:BBBUSD"]
    assert tickers(symbol_repository.get_top_symbols_by_volume(conn, 2, ("X:BBBUSD", 20))) == ["X:CCCUSD", "X:DDDUSD"]
    # The position as the page showed it, whether or not that symbol is still there or still has that volume.
    assert tickers(symbol_repository.get_top_symbols_by_volume(conn, 2, ("X:BBCUSD", 20))) == ["X:CCCUSD", "X:DDDUSD"]
    assert tickers(symbol_repository.get_top_symbols_by_volume(conn, 2, ("X:BBBUSD", 25))) == ["X:BBBUSD", "X:CCCUSD"]
    assert tickers(symbol_repository.get_top_symbols_by_volume(conn, 2, ("X:CCCUSD", None))) == ["X:DDDUSD"]
    assert symbol_repository.mark_inactive_except(conn, ["X:AAAUSD", "X:CCCUSD"]) == 2
    assert symbol_repository.mark_inactive_except(conn, ["X:AAAUSD", "X:CCCUSD"]) == 0  # already inactive
    assert tickers(symbol_repository.get_top_symbols_by_volume(conn, 10)) == ["X:AAAUSD", "X:CCCUSD"]
    assert tickers(symbol_repository.search_symbols(conn, "BBB", 10)) == []  # inactive: not found


def test_search_ranks_exact_then_prefix_then_name_and_pages(conn):
    add_symbols(conn, ("X:BTCUSD", "Bitcoin", 5), ("X:BTCUSDT", "Bitcoin Tether", 50),
                ("X:BTTUSD", "BitTorrent", 500), ("X:WBTCUSD", "Wrapped Bitcoin", 900), ("X:ETHUSD", "Ether", 1))
    tickers = lambda rows: [row["ticker"] for row in rows]  # noqa: E731
    found = tickers(symbol_repository.search_symbols(conn, "BTCUSD", 10))
    assert found[0] == "X:BTCUSD"  # exact ticker first, although its volume is the smallest
    assert "X:BTCUSDT" in found and "X:ETHUSD" not in found
    by_name = tickers(symbol_repository.search_symbols(conn, "bit", 10))
    assert set(by_name) == {"X:BTCUSD", "X:BTCUSDT", "X:BTTUSD"}  # name prefix, case-insensitive
    assert "X:WBTCUSD" not in tickers(symbol_repository.search_symbols(conn, "BTC", 10))  # a prefix, not a substring
    first_rows = symbol_repository.search_symbols(conn, "bit", 2)
    first = tickers(first_rows)
    last = first_rows[-1]
    second = tickers(symbol_repository.search_symbols(
        conn, "bit", 2, (last["ticker"], last["volume_24h"], last["name"], last["part"])))
    assert len(first) == 2 and len(second) == 1 and set(first + second) == set(by_name)
    assert symbol_repository.search_symbols(conn, "%", 10) == []  # LIKE wildcards match themselves
    assert symbol_repository.search_symbols(conn, "_TC", 10) == []


def test_search_lowers_the_name_term_as_the_index_does_and_ends_its_range_in_sql(conn):
    add_symbols(conn, ("X:AAAUSD", "Élan", 1), ("X:BBBUSD", "İzmir", 2), ("X:CCCUSD", "x\ud7ffz", 3),
                ("X:DDDUSD", "x\ue000", 4), ("X:EEEUSD", "y\U0010ffff", 5))
    tickers = lambda query: [row["ticker"] for row in symbol_repository.search_symbols(conn, query, 10)]  # noqa: E731
    assert tickers("ÉLAN") == tickers("élan") == ["X:AAAUSD"]
    assert tickers("İZMİR") == tickers("izmir") == ["X:BBBUSD"]
    assert tickers("x\ud7ff") == ["X:CCCUSD"]  # the range ends at x + U+E000, over the surrogates
    assert tickers("y\U0010ffff") == []  # no next code point: an empty range, not an error


@pytest.mark.parametrize(("prefix", "end"), [
    ("BTC", "BTD"), ("bitcoin ", "bitcoin!"), ("x\ud7ff", "x\ue000"),  # over the surrogates
    ("x\udffe", "x\ue000"),
])
def test_prefix_range_is_the_next_string_after_every_match(prefix, end):
    assert symbol_repository.prefix_range(prefix) == (prefix, end)


def test_prefix_range_of_the_last_code_point_is_a_string_not_an_error():
    start, end = symbol_repository.prefix_range("x\U0010ffff")  # there is no next code point
    assert start == "x\U0010ffff" and end.startswith("x") and len(end) == 2


# ---------------------------------------------------------------------------------------- models


def test_only_one_active_model_per_timeframe(conn):
    first = add_model(conn, "1d", "1")
    assert model_repository.get_active_model_by_timeframe(conn, "1d")["id"] == first
    second = add_model(conn, "1d", "2")
    assert model_repository.get_active_model_by_timeframe(conn, "1d")["id"] == second
    add_model(conn, "1h", "1")
    add_model(conn, "1d", "3", activate=False)
    assert model_repository.get_active_model_by_timeframe(conn, "1d")["id"] == second
    active = {row["timeframe"]: row["version"] for row in model_repository.get_all_active_models(conn)}
    assert active == {"1d": "2", "1h": "1"}
    assert model_repository.get_active_model_by_timeframe(conn, "1w") is None


def test_registrations_of_one_timeframe_at_once_both_succeed_in_turn(conn, clean_db):
    """A second registration that starts while the first's transaction is open (two seeds, or a seed beside a
    `train --register`) waits for it, then deactivates its row: before, its update had already looked for active
    rows and its insert failed on models_one_active_per_timeframe."""
    add_model(conn, "1d", "1")
    errors = []

    def second():
        try:
            with psycopg.connect(clean_db.database_url, autocommit=True, row_factory=dict_row) as own:
                add_model(own, "1d", "3")
        except Exception as error:  # collected: a unique violation is the defect
            errors.append(error)

    with psycopg.connect(clean_db.database_url, autocommit=True, row_factory=dict_row) as first:
        racer = threading.Thread(target=second)
        with first.transaction():
            add_model(first, "1d", "2")
            racer.start()
            for _ in range(200):  # until the second registration waits for a lock the first holds
                waiting = conn.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                       "AND datname = current_database()").fetchone()["n"]
                if waiting:
                    break
                racer.join(0.02)
        racer.join(10)
    assert errors == []
    active = conn.execute("SELECT version FROM models WHERE timeframe = '1d' AND is_active").fetchall()
    assert [row["version"] for row in active] == ["3"]
    assert conn.execute("SELECT count(*) AS n FROM models WHERE timeframe = '1d'").fetchone()["n"] == 3


def test_registering_the_same_file_again_keeps_its_live_accuracy(conn):
    def register(sha256: str, accuracy: float | None = None):
        return model_repository.register_model(conn, ModelCreate(
            timeframe="1d", name="m-1d", version="1", kind="baseline", s3_key="models/1d/1.pkl", sha256=sha256,
            accuracy=accuracy))

    def accuracy() -> float | None:
        return conn.execute("SELECT accuracy FROM models WHERE name = 'm-1d'").fetchone()["accuracy"]

    model_id = register("a" * 64)
    conn.execute("UPDATE models SET accuracy = 0.79 WHERE id = %s", (model_id,))  # as scoring sets it
    assert register("a" * 64) == model_id and accuracy() == 0.79
    assert register("a" * 64, accuracy=0.5) == model_id and accuracy() == 0.5  # one given still wins


def test_another_file_under_a_registered_name_and_version_is_refused_and_changes_nothing(conn):
    """Audit: ON CONFLICT (name, version) wrote the new sha256 over the row its predictions name (and seed the file
    over its versioned key). A changed model is a new version; the refusal leaves every row as it was."""
    from candlecast.errors import ModelVersionTaken

    first = add_model(conn, version="1")
    conn.execute("UPDATE models SET accuracy = 0.79 WHERE id = %s", (first,))
    add_model(conn, version="2")  # the active one now
    before = conn.execute("SELECT * FROM models ORDER BY version").fetchall()
    with pytest.raises(ModelVersionTaken, match="m-1d 1 is registered with another file"):
        model_repository.register_model(conn, ModelCreate(
            timeframe="1d", name="m-1d", version="1", kind="baseline", s3_key="models/1d/1.pkl", sha256="b" * 64))
    assert conn.execute("SELECT * FROM models ORDER BY version").fetchall() == before  # 2 still the active one


def test_symbol_and_active_model_in_one_round_trip_and_the_stats(conn):
    from candlecast.repositories import stats as stats_repository

    add_symbols(conn, ("X:BTCUSD", "Bitcoin", 1))
    model_id = model_repository.register_model(conn, ModelCreate(
        timeframe="1d", name="m", version="1", kind="learned", s3_key="k", sha256="b" * 64, features=["ret_1"]))
    symbol, model, keyed = model_repository.get_symbol_and_active_model(conn, "X:BTCUSD", "1d", "no-such-key")
    assert (symbol["ticker"], model["id"], keyed) == ("X:BTCUSD", model_id, None)  # registered active by default
    assert model_repository.get_symbol_and_active_model(conn, "X:NOPEUSD", "1h") == (None, None, None)
    features = conn.execute("SELECT features FROM models WHERE id = %s", (model_id,)).fetchone()["features"]
    assert features == ["ret_1"]
    assert stats_repository.test_connection(conn) is True
    stats = stats_repository.get_database_stats(conn)
    assert (stats["symbols"], stats["active_symbols"], stats["models"], stats["active_models"]) == (1, 1, 1, 1)
    assert (stats["predictions"], stats["prediction_steps"]) == (0, 0) and stats["database_bytes"] > 0


# ---------------------------------------------------------------------------------------- predictions


def test_create_read_back_repeat_and_key_reuse(conn):
    add_symbols(conn, ("X:BTCUSD", "Bitcoin", 1))
    model_id = add_model(conn)
    created = prediction_repository.create_prediction(conn, prediction(conn, model_id=model_id), "hash-a")
    assert created["created"] is True
    stored = prediction_repository.get_prediction_by_id(conn, created["id"])
    assert [step["step"] for step in stored["steps"]] == list(range(1, 31))
    assert stored["steps"][4]["close"] == 105.0 and stored["ticker"] == "X:BTCUSD"
    repeat = prediction_repository.create_prediction(conn, prediction(conn, model_id=model_id), "hash-a")
    assert (repeat["id"], repeat["created"]) == (created["id"], False)
    other = prediction_repository.create_prediction(conn, prediction(conn, model_id=model_id), "hash-b")
    assert other["created"] is True and other["id"] != created["id"]
    keyed = prediction_repository.create_prediction(conn, prediction(conn, "key-1", model_id=model_id), "hash-a")
    assert keyed["created"] is True  # a key is its own identity
    # The same request after a new candle or model (another hash) is a retry of the key ...
    retried = prediction_repository.create_prediction(conn, prediction(conn, "key-1", model_id=model_id), "hash-c")
    assert (retried["id"], retried["created"]) == (keyed["id"], False)
    # ... another symbol is not.
    add_symbols(conn, ("X:ETHUSD", "Ether", 2))
    with pytest.raises(Conflict) as reused:
        prediction_repository.create_prediction(
            conn, prediction(conn, "key-1", ticker="X:ETHUSD", model_id=model_id), "hash-a")
    assert reused.value.code == "idempotency_key_reused"
    assert reused.value.message == "Idempotency-Key was already used for another symbol or timeframe"
    assert prediction_repository.get_prediction_by_id(conn, uuid.uuid4()) is None


def test_a_create_failing_in_the_database_stores_nothing_and_leaves_the_connection_usable(conn):
    """The insert's COMMIT is sent with it: a statement that fails makes the server skip that COMMIT, and the
    open transaction is rolled back, not left for the next user of the connection."""
    add_symbols(conn, ("X:BTCUSD", "Bitcoin", 1))
    model_id = add_model(conn)
    bad_steps = steps(datetime(2024, 1, 1, tzinfo=UTC))
    bad_steps[3]["low"] = 1000.0  # above the candle: the table's CHECK refuses it
    request = prediction(conn, model_id=model_id).model_copy(update={"steps": [
        PredictionStepCreate.model_construct(**step) for step in bad_steps]})
    with pytest.raises(psycopg.errors.CheckViolation):
        prediction_repository.create_prediction(conn, request, "hash-bad")
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert conn.execute("SELECT count(*) AS n FROM predictions").fetchone()["n"] == 0
    created = prediction_repository.create_prediction(conn, prediction(conn, model_id=model_id), "hash-bad")
    assert created["created"] is True


def test_a_create_commits_synchronously_even_where_the_database_default_is_off(conn, clean_db):
    """Audit K: with `ALTER DATABASE ... SET synchronous_commit = off`, 6 of 6 answered-201 predictions were gone
    after a kill -9 of PostgreSQL. The create sets it on for its own transaction (SET LOCAL): a trigger records
    the setting the insert ran under, and the session keeps its default afterwards."""
    database = conn.execute("SELECT current_database() AS name").fetchone()["name"]
    conn.execute("CREATE TABLE test_commit_mode (mode text)")
    conn.execute("CREATE FUNCTION test_record_commit_mode() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                 "INSERT INTO test_commit_mode VALUES (current_setting('synchronous_commit')); RETURN NEW; END $$")
    conn.execute("CREATE TRIGGER test_record_commit_mode BEFORE INSERT ON predictions "
                 "FOR EACH ROW EXECUTE FUNCTION test_record_commit_mode()")
    conn.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = off')
    try:
        add_symbols(conn, ("X:BTCUSD", "Bitcoin", 1))
        model_id = add_model(conn)
        with psycopg.connect(clean_db.database_url, autocommit=True, row_factory=dict_row) as fresh:
            assert fresh.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == "off"
            for key in (None, "durable-key"):
                created = prediction_repository.create_prediction(fresh, prediction(conn, key, model_id=model_id),
                                                                  "hash-durable")
                assert created["created"] is True
            assert fresh.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == "off"
        modes = [row["mode"] for row in conn.execute("SELECT mode FROM test_commit_mode").fetchall()]
        assert modes == ["on", "on"]
    finally:
        conn.execute(f'ALTER DATABASE "{database}" RESET synchronous_commit')
        conn.execute("DROP TRIGGER test_record_commit_mode ON predictions")
        conn.execute("DROP FUNCTION test_record_commit_mode()")
        conn.execute("DROP TABLE test_commit_mode")


def test_recent_by_symbol_newest_first_filtered_and_paged(conn):
    add_symbols(conn, ("X:BTCUSD", "Bitcoin", 1), ("X:ETHUSD", "Ether", 1))
    model_id = add_model(conn)
    ids = [prediction_repository.create_prediction(conn, prediction(conn, model_id=model_id), f"h{n}")["id"]
           for n in range(3)]
    prediction_repository.create_prediction(conn, prediction(conn, ticker="X:ETHUSD", model_id=model_id), "e")
    btc = symbol_repository.get_symbol_by_ticker(conn, "X:BTCUSD")["id"]
    recent = prediction_repository.get_recent_predictions_by_symbol(conn, btc, None, 10)
    assert [row["id"] for row in recent] == ids[::-1]
    after_newest = (recent[0]["created_at"], recent[0]["id"])
    older = prediction_repository.get_recent_predictions_by_symbol(conn, btc, None, 2, after_newest)
    assert [row["id"] for row in older] == ids[::-1][1:]
    assert prediction_repository.get_recent_predictions_by_symbol(conn, btc, "1h", 10) == []
    assert len(prediction_repository.get_recent_predictions_by_symbol(conn, btc, "1d", 10)) == 3


@pytest.fixture
def slow_inserts(clean_db):
    """Every insert into predictions waits 0.3 s after its statement took its snapshot: without the
    advisory lock and its transaction, identical creates all see no twin and all insert."""
    with psycopg.connect(clean_db.database_url, autocommit=True) as admin:
        admin.execute("CREATE FUNCTION test_slow_insert() RETURNS trigger LANGUAGE plpgsql AS "
                      "$$ BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$")
        admin.execute("CREATE TRIGGER test_slow_insert BEFORE INSERT ON predictions "
                      "FOR EACH ROW EXECUTE FUNCTION test_slow_insert()")
        try:
            yield
        finally:
            admin.execute("DROP TRIGGER test_slow_insert ON predictions")
            admin.execute("DROP FUNCTION test_slow_insert()")


@pytest.mark.parametrize("key", [None, "race-key"], ids=["unkeyed", "keyed"])
def test_identical_creates_racing_store_exactly_one(conn, clean_db, slow_inserts, key):
    add_symbols(conn, ("X:BTCUSD", "Bitcoin", 1))
    request = prediction(conn, key, model_id=add_model(conn))
    racers = 8
    barrier, results, errors = threading.Barrier(racers), [], []

    def race():
        try:
            with psycopg.connect(clean_db.database_url, autocommit=True, row_factory=dict_row) as own:
                barrier.wait()
                results.append(prediction_repository.create_prediction(own, request, "same-hash"))
        except Exception as error:  # collected: a unique violation is a failure of the lock too
            errors.append(error)

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert conn.execute("SELECT count(*) AS n FROM predictions").fetchone()["n"] == 1
    assert sorted(result["created"] for result in results) == [False] * (racers - 1) + [True]
    assert len({result["id"] for result in results}) == 1
